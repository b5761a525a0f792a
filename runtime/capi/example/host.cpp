// The test host of libfewstep (fewstep.h, ABI 2; example/minimal.cpp is the program a service writes): open an
// engine folder, generate images for class labels and a seed, write the raw bytes (and a PGM/PPM strip to look at),
// print the latency.
//
//   fewstep_host ENGINE_DIR [--labels 0,1,2] [--n N] [--seed S] [--nfe K] [--backend B] [--precision P]
//                [--cpu-threads C] [--out images.u8] [--pnm images.pgm] [--repeat R] [--threads T]
//                [--check-recovery]
//
// --out: (N, H, W, C) uint8, row-major, no header. --repeat: time R calls. --threads: T host threads generate
// the same request at once and must get the same bytes. --check-recovery: bad calls (label out of range, n = 0,
// a buffer one byte short, an NFE the engine does not serve, NULL params, non-finite caller noise) must fail with
// a message, then the engine must still generate the same bytes. Exit status: 0 ok, 1 a fewstep call failed (the message on stderr), 2 bad
// arguments, 3 a check of --threads / --check-recovery failed.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "fewstep.h"

namespace {

struct Options {
    std::string engine, backend = "auto", precision = "fp32", out, pnm;
    std::vector<int64_t> labels;
    int32_t n = 0, nfe = 0, repeat = 1, threads = 1, cpu_threads = 0;
    uint64_t seed = 0;
    bool check_recovery = false;
};

int usage(const std::string& why) {
    std::cerr << "error: " << why << "\nusage: fewstep_host ENGINE_DIR [--labels 0,1,2] [--n N] [--seed S] "
              << "[--nfe K] [--backend B] [--precision P] [--cpu-threads C] [--out FILE] [--pnm FILE] [--repeat R] "
              << "[--threads T] "
              << "[--check-recovery]\n";
    return 2;
}

bool parse(int argc, char** argv, Options& o, std::string& why) {
    try {
        for (int i = 1; i < argc; ++i) {
            std::string a = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
                return argv[++i];
            };
            if (a == "--labels") {
                std::string s = value();
                for (size_t at = 0; at <= s.size();) {
                    size_t comma = std::min(s.find(',', at), s.size());
                    if (comma > at) o.labels.push_back(std::stoll(s.substr(at, comma - at)));
                    at = comma + 1;
                }
            } else if (a == "--n") o.n = std::stoi(value());
            else if (a == "--seed") o.seed = std::stoull(value());
            else if (a == "--nfe") o.nfe = std::stoi(value());
            else if (a == "--backend") o.backend = value();
            else if (a == "--precision") o.precision = value();
            else if (a == "--out") o.out = value();
            else if (a == "--pnm") o.pnm = value();
            else if (a == "--repeat") o.repeat = std::max(1, std::stoi(value()));
            else if (a == "--threads") o.threads = std::max(1, std::stoi(value()));
            else if (a == "--cpu-threads") o.cpu_threads = std::max(0, std::stoi(value()));
            else if (a == "--check-recovery") o.check_recovery = true;
            else if (!a.empty() && a[0] == '-') throw std::invalid_argument("unknown option " + a);
            else if (o.engine.empty()) o.engine = a;
            else throw std::invalid_argument("one engine folder only");
        }
    } catch (const std::exception& e) {
        why = e.what();
        return false;
    }
    if (o.engine.empty()) why = "give an engine folder";
    return !o.engine.empty();
}

int fewstep_failed(const char* what) {
    std::cerr << "error: " << fewstep_last_error() << "\n";
    (void)what;
    return 1;
}

// All N images side by side in one row: P5 (grey) or P6 (RGB).
bool write_pnm(const std::string& path, const std::vector<uint8_t>& images, int n, int h, int w, int c) {
    if (c != 1 && c != 3) return false;
    std::ofstream f(path, std::ios::binary);
    f << (c == 1 ? "P5" : "P6") << "\n" << n * w << " " << h << "\n255\n";
    for (int y = 0; y < h; ++y)
        for (int k = 0; k < n; ++k)
            f.write(reinterpret_cast<const char*>(&images[((size_t)k * h + y) * w * c]), (std::streamsize)w * c);
    return bool(f);
}

}  // namespace

int main(int argc, char** argv) {
    Options o;
    std::string why;
    if (!parse(argc, argv, o, why)) return usage(why);

    fewstep_context* engine = fewstep_open(o.engine.c_str(), o.backend.c_str(), o.precision.c_str(), o.cpu_threads);
    if (!engine) return fewstep_failed("open");
    int32_t h = 0, w = 0, c = 0;
    fewstep_image_shape(engine, &h, &w, &c);
    const int32_t classes = fewstep_num_classes(engine);

    // labels: as given (repeated to --n), else 0, 1, ..., classes-1, 0, ... ; none for unconditional engines
    int32_t n = o.n ? o.n : (o.labels.empty() ? 4 : (int32_t)o.labels.size());
    std::vector<int64_t> labels;
    if (classes > 0 || !o.labels.empty())
        for (int32_t k = 0; k < n; ++k)
            labels.push_back(o.labels.empty() ? k % std::max(classes, 1) : o.labels[k % o.labels.size()]);
    const int64_t* label_ptr = labels.empty() ? nullptr : labels.data();

    const size_t bytes = (size_t)std::max(n, 0) * h * w * c;
    std::vector<uint8_t> images(std::max<size_t>(bytes, 1));
    auto request = [&](const int64_t* labels_, int32_t n_, int32_t nfe_, const float* noise_) {
        fewstep_params p;
        fewstep_params_init(&p);
        p.labels = labels_;
        p.n = n_;
        p.nfe = nfe_;
        p.seed = o.seed;
        p.noise = noise_;
        return p;
    };
    const fewstep_params params = request(label_ptr, n, o.nfe, nullptr);
    std::vector<double> ms;
    for (int r = 0; r < o.repeat; ++r) {
        if (fewstep_generate(engine, &params, images.data(), bytes) != FEWSTEP_OK) {
            int code = fewstep_failed("generate");
            fewstep_close(engine);
            return code;
        }
        ms.push_back(fewstep_last_latency_ms());
    }
    std::cout << "generated " << n << " images of " << h << "x" << w << "x" << c << " (seed " << o.seed << ") in "
              << ms[0] << " ms\n";
    if (o.repeat > 1) {
        std::vector<double> sorted(ms.begin() + 1, ms.end());
        std::sort(sorted.begin(), sorted.end());
        std::cout << "latency_ms: first " << ms[0] << ", then min " << sorted.front() << ", median "
                  << sorted[sorted.size() / 2] << " over " << sorted.size() << " calls\n";
    }

    int status = 0;
    if (o.threads > 1) {  // the same request from several host threads at once: same bytes
        std::vector<std::vector<uint8_t>> got(o.threads, std::vector<uint8_t>(bytes));
        std::vector<int> codes(o.threads);
        std::vector<std::thread> pool;
        for (int t = 0; t < o.threads; ++t)
            pool.emplace_back([&, t] { codes[t] = fewstep_generate(engine, &params, got[t].data(), bytes); });
        for (auto& t : pool) t.join();
        bool same = true;
        for (int t = 0; t < o.threads; ++t) same = same && codes[t] == FEWSTEP_OK && got[t] == images;
        std::cout << "threads: " << o.threads << " concurrent calls " << (same ? "gave the same bytes" : "DIFFER")
                  << "\n";
        if (!same) status = 3;
    }
    if (o.check_recovery) {  // every bad call fails with a message, and the engine serves on unchanged
        std::vector<uint8_t> again(bytes);
        std::vector<int64_t> bad(labels);
        if (!bad.empty()) bad[0] = classes;  // one past the last class
        std::vector<float> nan_noise((size_t)n * std::max(fewstep_draws(engine, o.nfe), 1) * h * w * c, 0.0f);
        nan_noise[nan_noise.size() / 2] = std::numeric_limits<float>::quiet_NaN();
        struct Case { const char* name; fewstep_params params; size_t size; int want; bool null_params; };
        std::vector<Case> cases = {
            {"n = 0", request(label_ptr, 0, o.nfe, nullptr), bytes, FEWSTEP_ERROR_INPUT, false},
            {"buffer one byte short", params, bytes - 1, FEWSTEP_ERROR_BUFFER, false},
            {"nfe 99", request(label_ptr, n, 99, nullptr), bytes, FEWSTEP_ERROR_INPUT, false},
            {"NULL params", params, bytes, FEWSTEP_ERROR_INPUT, true},
            {"non-finite noise", request(label_ptr, n, o.nfe, nan_noise.data()), bytes, FEWSTEP_ERROR_INPUT, false}};
        if (classes > 0)
            cases.insert(cases.begin(), {"label out of range", request(bad.data(), n, o.nfe, nullptr), bytes,
                                         FEWSTEP_ERROR_INPUT, false});
        for (const Case& k : cases) {
            int code = fewstep_generate(engine, k.null_params ? nullptr : &k.params, again.data(), k.size);
            bool ok = code == k.want && std::strlen(fewstep_last_error()) > 0;
            std::cout << "recovery: " << k.name << " -> status " << code << ": " << fewstep_last_error()
                      << (ok ? "" : "  [UNEXPECTED]") << "\n";
            if (!ok) status = 3;
        }
        int code = fewstep_generate(engine, &params, again.data(), bytes);
        bool same = code == FEWSTEP_OK && again == images;
        std::cout << "recovery: the engine " << (same ? "still generates the same bytes" : "FAILED afterwards")
                  << "\n";
        if (!same) status = 3;
    }
    fewstep_close(engine);

    if (!o.out.empty()) {
        std::ofstream f(o.out, std::ios::binary);
        f.write(reinterpret_cast<const char*>(images.data()), (std::streamsize)bytes);
        if (!f) return usage("cannot write " + o.out);
        std::cout << "wrote " << o.out << " (" << bytes << " bytes: " << n << "x" << h << "x" << w << "x" << c
                  << " uint8)\n";
    }
    if (!o.pnm.empty()) {
        if (write_pnm(o.pnm, images, n, h, w, c)) std::cout << "wrote " << o.pnm << "\n";
        else std::cout << "no picture: " << c << "-channel images fit neither PGM nor PPM\n";
    }
    return status;
}

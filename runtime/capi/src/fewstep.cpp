// libfewstep: the engine folder's few-step loop in C++ (docs/engine_spec.md), behind the C ABI of fewstep.h.
//
// The same arithmetic as the Python runtime, operation for operation (runtime/noise.py, runtime/convention.py,
// runtime/pipeline.py, and runtime/_native.c, which does it in C for Python): float64 state, float32 network
// inputs, x0 from the raw prediction in float64, round-half-to-even uint8. Built with -ffp-contract=off (no fused
// multiply-adds), so the bytes equal the Python runtime's for the same backend.
#include "fewstep.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend.hpp"

namespace fewstep {
namespace {

using json = nlohmann::json;

constexpr int kEngineFormat = 1;  // the newest engine format this library reads
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMaxDraws = 256;
constexpr double kTwoPi = 6.283185307179586;  // 2.0 * numpy.pi as a double, as noise.py computes it
constexpr uint64_t kMaxSeed = 9223372036854775807ULL;  // 2^63 - 1

// ---- the documented noise (runtime/noise.py) -----------------------------------------------------------------

uint64_t splitmix64(uint64_t z) {
    z += kGolden;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

double uniform(uint64_t key, uint64_t i) {
    return (static_cast<double>(splitmix64(key + i) >> 11) + 0.5) / 9007199254740992.0;  // 2^53
}

// Draw `draw` of image `image` of a request: n floats (Box-Muller pairs, float64, rounded to float32).
void fill_noise(uint64_t seed, uint64_t image, uint64_t draw, int64_t n, float* dst) {
    const uint64_t key = splitmix64(splitmix64(seed) ^ (image * kMaxDraws + draw));
    for (int64_t j = 0; 2 * j < n; ++j) {
        const double r = std::sqrt(-2.0 * std::log(uniform(key, 2 * static_cast<uint64_t>(j))));
        const double angle = kTwoPi * uniform(key, 2 * static_cast<uint64_t>(j) + 1);
        dst[2 * j] = static_cast<float>(r * std::cos(angle));
        if (2 * j + 1 < n) dst[2 * j + 1] = static_cast<float>(r * std::sin(angle));
    }
}

// ---- the engine manifest ----------------------------------------------------------------------------------

struct Schedule {
    int32_t nfe = 0;
    std::vector<double> sigmas, timesteps;
    bool afs = false;
    bool fresh_noise = true;  // DMD2 ("fresh_noise") or SFD's Euler loop ("none")
    int32_t draws() const { return fresh_noise ? nfe : 1; }
};

struct Manifest {
    std::string prediction_type, parameterization = "vp";
    double sigma_data = 0.5;
    int64_t channels = 0, height = 0, width = 0;
    int32_t num_classes = 0;
    std::vector<std::string> inputs;
    std::map<int32_t, Schedule> schedules;
    int32_t default_nfe = 0;
    json files;
    int64_t max_batch = 0;
};

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

Manifest read_manifest(const std::string& dir) {
    const std::string path = dir + "/fewstep_engine.json";
    if (!std::filesystem::is_regular_file(path)) {
        if (!std::filesystem::is_directory(dir))
            throw Error(FEWSTEP_ERROR_ENGINE, "engine folder " + dir + " does not exist; export one with python -m "
                                              "export.onnx");
        throw Error(FEWSTEP_ERROR_ENGINE, dir + " has no fewstep_engine.json: not a fewstep engine folder (export one "
                                          "with python -m export.onnx)");
    }
    json m;
    try {
        m = json::parse(read_file(path));
    } catch (const json::exception& e) {
        throw Error(FEWSTEP_ERROR_ENGINE, path + " is not readable JSON (" + e.what() + "); export the engine again");
    }
    Manifest out;
    try {
        if (!m.contains("format_version") || !m["format_version"].is_number_integer())
            throw Error(FEWSTEP_ERROR_ENGINE, path + " has no format_version; export the engine again");
        const int version = m["format_version"].get<int>();
        if (version > kEngineFormat)
            throw Error(FEWSTEP_ERROR_ENGINE, dir + " was written by a newer fewstep (engine format " +
                                              std::to_string(version) + "); this library reads format " +
                                              std::to_string(kEngineFormat) + " and older: upgrade fewstep");
        for (const char* key : {"prediction_type", "inputs", "outputs", "files", "image", "conditioning"})
            if (!m.contains(key)) throw Error(FEWSTEP_ERROR_ENGINE, path + " lacks '" + key + "'; export the engine again");
        const json& cond = m["conditioning"];
        const std::string kind = cond.value("kind", "none");
        if (kind == "text")
            throw Error(FEWSTEP_ERROR_UNSUPPORTED, dir + " is a text-to-image engine: its tokenizers and text encoders "
                                                   "are served by the Python runtime only (runtime.Pipeline)");
        if (kind == "class") out.num_classes = cond.at("num_classes").get<int32_t>();
        out.prediction_type = m["prediction_type"].get<std::string>();
        out.parameterization = m.value("parameterization", std::string("vp"));
        out.sigma_data = m.value("sigma_data", 0.5);
        const json& image = m["image"];
        if (image.contains("latent_shape"))
            throw Error(FEWSTEP_ERROR_UNSUPPORTED, dir + " is a latent engine: served by the Python runtime only");
        out.channels = image.at("channels").get<int64_t>();
        out.height = image.at("height").get<int64_t>();
        out.width = image.at("width").get<int64_t>();
        for (const json& input : m["inputs"]) out.inputs.push_back(input.at("name").get<std::string>());
        json schedules = m.value("schedules", json::object());
        if (m.contains("schedule")) schedules[std::to_string(m["schedule"].at("nfe").get<int>())] = m["schedule"];
        for (auto it = schedules.begin(); it != schedules.end(); ++it) {
            Schedule s;
            s.nfe = it.value().at("nfe").get<int32_t>();
            s.sigmas = it.value().at("sigmas").get<std::vector<double>>();
            s.timesteps = it.value().at("timesteps").get<std::vector<double>>();
            s.afs = it.value().value("afs", false);
            s.fresh_noise = it.value().at("renoise").get<std::string>() == "fresh_noise";
            out.schedules[s.nfe] = s;
        }
        if (out.schedules.empty()) throw Error(FEWSTEP_ERROR_ENGINE, path + " has no sampling schedule");
        out.default_nfe = m.contains("schedule") ? m["schedule"]["nfe"].get<int32_t>() : out.schedules.rbegin()->first;
        out.files = m["files"];
        out.max_batch = m.value("max_batch", static_cast<int64_t>(0));
    } catch (const json::exception& e) {
        throw Error(FEWSTEP_ERROR_ENGINE, path + " does not match the engine format (" + e.what() + ")");
    }
    const std::string& p = out.prediction_type;
    const bool known = out.parameterization == "vp" ? (p == "epsilon" || p == "v_prediction" || p == "sample")
                       : out.parameterization == "edm" ? (p == "epsilon" || p == "v_prediction" || p == "sample")
                       : out.parameterization == "flow" ? (p == "flow" || p == "epsilon" || p == "sample")
                                                          : false;
    if (!known)
        throw Error(FEWSTEP_ERROR_ENGINE, path + ": unknown prediction type " + p + " for parameterization " +
                                          out.parameterization);
    return out;
}

// ---- the loop's arithmetic (runtime/convention.py, pipeline.py) -----------------------------------------------

// x0 from the raw prediction at sigma s (the float32 sigma fed to the graph, as a double): the closed forms of
// convention.x0_from_output, operation for operation.
void x0_from_output(const Manifest& m, const float* p, const double* x, double s, int64_t size, double* x0) {
    const std::string& kind = m.prediction_type;
    if (kind == "sample") {
        for (int64_t i = 0; i < size; ++i) x0[i] = static_cast<double>(p[i]);
        return;
    }
    if (m.parameterization == "vp") {
        if (kind == "epsilon") {
            for (int64_t i = 0; i < size; ++i) x0[i] = x[i] - s * static_cast<double>(p[i]);
        } else {  // v_prediction: x / (1 + s * s) - s / sqrt(1 + s * s) * out
            const double d = 1 + s * s, c = s / std::sqrt(1 + s * s);
            for (int64_t i = 0; i < size; ++i) x0[i] = x[i] / d - c * static_cast<double>(p[i]);
        }
        return;
    }
    double c_skip, c_out;  // convention.affine_coefficients: x0 = c_skip x + c_out prediction
    if (m.parameterization == "edm") {
        const double sd = m.sigma_data;
        const double co = s * sd / std::sqrt(s * s + sd * sd);
        c_skip = sd * sd / (s * s + sd * sd);
        c_out = kind == "v_prediction" ? -co : co;
    } else if (kind == "flow") {
        c_skip = 1 / (1 + s);
        c_out = -s / (1 + s);
    } else {  // flow engines with epsilon prediction
        c_skip = 1;
        c_out = -s;
    }
    for (int64_t i = 0; i < size; ++i) x0[i] = c_skip * x[i] + c_out * static_cast<double>(p[i]);
}

// (N, C, H, W) float64 in [-1, 1] -> (N, H, W, C) uint8: round((clip(x, -1, 1) + 1) * 127.5), half to even.
void to_uint8(const double* x, int64_t n, int64_t c, int64_t h, int64_t w, uint8_t* out) {
    for (int64_t i = 0; i < n; ++i)
        for (int64_t ch = 0; ch < c; ++ch)
            for (int64_t q = 0; q < h * w; ++q) {
                double v = x[(i * c + ch) * h * w + q];
                v = v < -1 ? -1 : v > 1 ? 1 : v;
                v = std::nearbyint((v + 1) * 127.5);
                out[(i * h * w + q) * c + ch] = v == v ? static_cast<uint8_t>(v) : 0;
            }
}

// ---- errors and logging ---------------------------------------------------------------------------------------

thread_local std::string last_error;
thread_local double last_latency_ms = 0.0;
std::mutex log_mutex;
fewstep_log_fn log_fn = nullptr;
void* log_user = nullptr;

void log(int level, const std::string& message) {
    fewstep_log_fn fn;
    void* user;
    {
        std::lock_guard<std::mutex> lock(log_mutex);
        fn = log_fn;
        user = log_user;
    }
    if (fn) fn(level, message.c_str(), user);
}

int fail(int status, const std::string& message) {
    last_error = message;
    return status;
}

std::string join(const std::vector<int32_t>& values) {
    std::string s;
    for (size_t i = 0; i < values.size(); ++i) s += (i ? ", " : "") + std::to_string(values[i]);
    return s;
}

}  // namespace
}  // namespace fewstep

struct fewstep_context {
    fewstep::Manifest manifest;
    std::unique_ptr<fewstep::Backend> backend;
    std::string dir;
};

namespace fewstep {
namespace {

const Schedule& schedule_for(const Manifest& m, int32_t nfe) {
    const int32_t want = nfe == 0 ? m.default_nfe : nfe;
    auto it = m.schedules.find(want);
    if (it == m.schedules.end()) {
        std::vector<int32_t> served;
        for (const auto& [k, v] : m.schedules) served.push_back(k);
        throw Error(FEWSTEP_ERROR_INPUT, "this engine serves NFE " + join(served) + ", not " + std::to_string(want));
    }
    return it->second;
}

std::unique_ptr<Backend> open_backend(const Manifest& m, const std::string& dir, const std::string& backend,
                                      const std::string& precision, int32_t threads) {
    const json& files = m.files;
    if (backend == "tensorrt" || (backend == "auto" && files.contains("trt_" + precision))) {
#ifdef FEWSTEP_WITH_TENSORRT
        if (!files.contains("trt_" + precision))
            throw Error(FEWSTEP_ERROR_ENGINE, dir + " has no TensorRT " + precision + " plan (python -m export.trt)");
        return open_tensorrt(dir + "/" + files["trt_" + precision]["path"].get<std::string>(), m.inputs);
#else
        if (backend == "tensorrt")
            throw Error(FEWSTEP_ERROR_UNSUPPORTED, "this libfewstep was built without TensorRT (CMake found no "
                                                   "TensorRT headers and libraries); use backend openvino-cpu");
#endif
    }
    if (backend != "auto" && backend != "openvino-cpu" && backend != "onnxruntime-cpu" && backend != "tensorrt")
        throw Error(FEWSTEP_ERROR_INPUT, "unknown backend '" + backend + "'; choose auto, openvino-cpu, onnxruntime-cpu "
                                         "or tensorrt");
#ifndef FEWSTEP_WITH_ONNXRUNTIME
    if (backend == "onnxruntime-cpu")
        throw Error(FEWSTEP_ERROR_UNSUPPORTED, "this libfewstep was built without ONNX Runtime (configure CMake with "
                                               "-Donnxruntime_ROOT=<an ONNX Runtime C package>); use openvino-cpu");
#endif
    if (!files.contains(precision) || files[precision]["path"].get<std::string>().find(".onnx") == std::string::npos) {
        std::string have;
        for (auto it = files.begin(); it != files.end(); ++it)
            if (it.value()["path"].get<std::string>().find(".onnx") != std::string::npos)
                have += (have.empty() ? "" : ", ") + it.key();
        throw Error(FEWSTEP_ERROR_INPUT, dir + " has no " + precision + " ONNX file; precisions here: " + have);
    }
    const json& entry = files[precision];
    const std::string file = dir + "/" + entry["path"].get<std::string>();
#ifdef FEWSTEP_WITH_ONNXRUNTIME
    if (backend == "onnxruntime-cpu") {
        if (entry.contains("backend"))  // bf16: the fp32 file in OpenVINO's bf16 kernels
            throw Error(FEWSTEP_ERROR_INPUT, dir + "'s " + precision + " runs on backend " +
                                                 entry["backend"].get<std::string>() + ", not onnxruntime-cpu");
        return open_onnxruntime(file, threads, m.inputs);
    }
#endif
    return open_openvino(file, entry.value("inference_precision", std::string("f32")), threads, m.inputs);
}

// The manifest's loop on one chunk of `count` images whose noise is `noise` (count, draws, C, H, W); x0 into `x`.
void sample(fewstep_context* ctx, const Schedule& s, const float* noise, const int64_t* labels, int64_t count,
            std::vector<double>& x, const fewstep_params& params, int64_t chunk_index) {
    const Manifest& m = ctx->manifest;
    const int64_t size = m.channels * m.height * m.width;
    const int64_t draws = s.draws();
    x.assign(static_cast<size_t>(count * size), 0.0);
    for (int64_t i = 0; i < count; ++i)
        for (int64_t e = 0; e < size; ++e)
            x[i * size + e] = static_cast<double>(noise[(i * draws) * size + e]) * s.sigmas[0];
    std::vector<float> xf(static_cast<size_t>(count * size)), pred(xf.size()), sigma(count), t(count);
    std::vector<int64_t> nfe_in(static_cast<size_t>(count), s.nfe);
    std::vector<double> x0(x.size());
    Feed feed;
    feed.batch = count;
    feed.x_shape = {m.channels, m.height, m.width};
    feed.x = xf.data();
    feed.sigma = sigma.data();
    feed.timestep = t.data();
    feed.class_labels = m.num_classes ? labels : nullptr;
    feed.nfe = nfe_in.data();
    auto denoise = [&](size_t i) {  // x0 at sigmas[i]: one network call
        for (size_t k = 0; k < x.size(); ++k) xf[k] = static_cast<float>(x[k]);
        std::fill(sigma.begin(), sigma.end(), static_cast<float>(s.sigmas[i]));
        std::fill(t.begin(), t.end(), static_cast<float>(s.timesteps[i]));
        ctx->backend->run(feed, pred.data());
        x0_from_output(m, pred.data(), x.data(), static_cast<double>(sigma[0]), count * size, x0.data());
    };
    int32_t calls = 0;
    auto progress = [&]() {
        ++calls;
        if (params.progress && chunk_index == 0) params.progress(calls, s.nfe, params.user_data);
    };
    if (!s.fresh_noise) {  // SFD: Euler steps; AFS makes the first one without the network
        for (size_t i = 0; i + 1 < s.sigmas.size(); ++i) {
            const double step = s.sigmas[i + 1] - s.sigmas[i];
            if (i == 0 && s.afs) {
                const double scale = std::sqrt(1 + s.sigmas[0] * s.sigmas[0]);
                for (double& v : x) v = v + step * (v / scale);
                continue;
            }
            denoise(i);
            for (size_t k = 0; k < x.size(); ++k) x[k] = x[k] + step * ((x[k] - x0[k]) / s.sigmas[i]);
            progress();
        }
        return;
    }
    for (int32_t i = 0; i < s.nfe; ++i) {  // DMD2: predict x0, re-noise with fresh noise
        denoise(static_cast<size_t>(i));
        if (i + 1 < s.nfe)
            for (int64_t j = 0; j < count; ++j)
                for (int64_t e = 0; e < size; ++e)
                    x[j * size + e] = x0[j * size + e] + s.sigmas[i + 1] *
                                      static_cast<double>(noise[(j * draws + i + 1) * size + e]);
        progress();
    }
    x = x0;
}

int generate(fewstep_context* ctx, const fewstep_params* params, uint8_t* out, size_t out_size) {
    const auto t0 = std::chrono::steady_clock::now();
    if (!ctx || !params || !out) return fail(FEWSTEP_ERROR_INPUT, "context, params and out must not be NULL");
    const Manifest& m = ctx->manifest;
    const fewstep_params& p = *params;
    if (p.n < 1) return fail(FEWSTEP_ERROR_INPUT, "n must be at least 1");
    const Schedule& s = schedule_for(m, p.nfe);
    if (m.num_classes) {
        if (!p.labels)
            return fail(FEWSTEP_ERROR_INPUT, "this engine is class-conditional: give labels in 0.." +
                                             std::to_string(m.num_classes - 1));
        const auto [lo, hi] = std::minmax_element(p.labels, p.labels + p.n);
        if (*lo < 0 || *hi >= m.num_classes)  // the Python runtime's message, word for word
            return fail(FEWSTEP_ERROR_INPUT, "class labels must lie in 0.." + std::to_string(m.num_classes - 1) +
                                             "; got " + std::to_string(*lo) + ".." + std::to_string(*hi));
    } else if (p.labels) {
        return fail(FEWSTEP_ERROR_INPUT, "this engine is unconditional; pass labels = NULL");
    }
    if (!p.noise && p.seed > kMaxSeed)
        return fail(FEWSTEP_ERROR_INPUT, "seed must be an integer in 0..9223372036854775807");
    const int64_t size = m.channels * m.height * m.width;
    const size_t need = static_cast<size_t>(p.n) * static_cast<size_t>(size);
    if (out_size < need)
        return fail(FEWSTEP_ERROR_BUFFER, "the output buffer holds " + std::to_string(out_size) + " bytes; " +
                                          std::to_string(p.n) + " images need " + std::to_string(need));
    const int64_t draws = s.draws();
    if (p.noise) {
        const int64_t total = p.n * draws * size;
        for (int64_t i = 0; i < total; ++i)
            if (!std::isfinite(p.noise[i])) return fail(FEWSTEP_ERROR_INPUT, "the noise contains NaN or inf");
    }
    const int64_t limit = ctx->backend->max_batch() ? ctx->backend->max_batch() : m.max_batch;
    const int64_t batch = p.batch_size > 0 ? p.batch_size : (limit ? limit : 16);
    if (batch < 1 || (limit && batch > limit))
        return fail(FEWSTEP_ERROR_INPUT, "batch_size must lie in 1.." + (limit ? std::to_string(limit) : "any") +
                                         " for this engine; got " + std::to_string(batch));
    std::vector<float> chunk_noise;
    std::vector<double> x;
    for (int64_t start = 0, index = 0; start < p.n; start += batch, ++index) {
        const int64_t count = std::min<int64_t>(batch, p.n - start);
        const float* noise = p.noise ? p.noise + start * draws * size : nullptr;
        if (!noise) {
            chunk_noise.resize(static_cast<size_t>(count * draws * size));
            for (int64_t i = 0; i < count; ++i)
                for (int64_t d = 0; d < draws; ++d)
                    fill_noise(p.seed, static_cast<uint64_t>(start + i), static_cast<uint64_t>(d), size,
                               chunk_noise.data() + (i * draws + d) * size);
            noise = chunk_noise.data();
        }
        sample(ctx, s, noise, m.num_classes ? p.labels + start : nullptr, count, x, p, index);
        to_uint8(x.data(), count, m.channels, m.height, m.width, out + start * size);
    }
    last_latency_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return FEWSTEP_OK;
}

}  // namespace
}  // namespace fewstep

extern "C" {

void fewstep_set_log(fewstep_log_fn log, void* user_data) {
    std::lock_guard<std::mutex> lock(fewstep::log_mutex);
    fewstep::log_fn = log;
    fewstep::log_user = user_data;
}

fewstep_context* fewstep_open(const char* engine_dir, const char* backend, const char* precision, int32_t threads) {
    fewstep::last_error.clear();
    if (!engine_dir) {
        fewstep::fail(FEWSTEP_ERROR_INPUT, "engine_dir must not be NULL");
        return nullptr;
    }
    try {
        auto ctx = std::make_unique<fewstep_context>();
        ctx->dir = engine_dir;
        ctx->manifest = fewstep::read_manifest(ctx->dir);
        ctx->backend = fewstep::open_backend(ctx->manifest, ctx->dir, backend ? backend : "auto",
                                             precision ? precision : "fp32", threads);
        fewstep::log(0, ctx->dir + ": backend " + ctx->backend->name());
        return ctx.release();
    } catch (const fewstep::Error& e) {
        fewstep::fail(e.status, e.what());
    } catch (const std::exception& e) {
        fewstep::fail(FEWSTEP_ERROR_RUNTIME, std::string("cannot open ") + engine_dir + ": " + e.what());
    }
    return nullptr;
}

void fewstep_params_init(fewstep_params* params) {
    if (!params) return;
    std::memset(params, 0, sizeof *params);
    params->n = 1;
}

int fewstep_generate(fewstep_context* ctx, const fewstep_params* params, uint8_t* out, size_t out_size) {
    fewstep::last_error.clear();
    try {
        return fewstep::generate(ctx, params, out, out_size);
    } catch (const fewstep::Error& e) {
        return fewstep::fail(e.status, e.what());
    } catch (const std::exception& e) {
        return fewstep::fail(FEWSTEP_ERROR_RUNTIME, std::string("the backend failed: ") + e.what());
    }
}

int fewstep_image_shape(const fewstep_context* ctx, int32_t* height, int32_t* width, int32_t* channels) {
    fewstep::last_error.clear();
    if (!ctx || !height || !width || !channels)
        return fewstep::fail(FEWSTEP_ERROR_INPUT, "context and the three outputs must not be NULL");
    *height = static_cast<int32_t>(ctx->manifest.height);
    *width = static_cast<int32_t>(ctx->manifest.width);
    *channels = static_cast<int32_t>(ctx->manifest.channels);
    return FEWSTEP_OK;
}

int32_t fewstep_num_classes(const fewstep_context* ctx) { return ctx ? ctx->manifest.num_classes : 0; }

int32_t fewstep_draws(const fewstep_context* ctx, int32_t nfe) {
    if (!ctx) return 0;
    const auto& schedules = ctx->manifest.schedules;
    auto it = schedules.find(nfe == 0 ? ctx->manifest.default_nfe : nfe);
    return it == schedules.end() ? 0 : it->second.draws();
}

const char* fewstep_backend(const fewstep_context* ctx) { return ctx ? ctx->backend->name() : ""; }

double fewstep_last_latency_ms(void) { return fewstep::last_latency_ms; }

const char* fewstep_last_error(void) { return fewstep::last_error.c_str(); }

void fewstep_close(fewstep_context* ctx) { delete ctx; }

}  // extern "C"

// The whole program a C++ service writes to serve a fewstep engine (README, "Embedding in C and C++").
#include <cstdio>
#include <vector>

#include "fewstep.h"

int main(int argc, char** argv) {
    if (argc < 2) return std::fprintf(stderr, "usage: %s ENGINE_DIR\n", argv[0]), 2;
    fewstep_context* ctx = fewstep_open(argv[1], "auto", "fp32", /*threads*/ 0);
    if (!ctx) return std::fprintf(stderr, "error: %s\n", fewstep_last_error()), 1;

    int32_t h, w, c;
    fewstep_image_shape(ctx, &h, &w, &c);
    std::vector<int64_t> labels = {3, 1, 4, 1};
    std::vector<uint8_t> images(labels.size() * h * w * c);

    fewstep_params params;
    fewstep_params_init(&params);
    params.labels = fewstep_num_classes(ctx) ? labels.data() : nullptr;
    params.n = static_cast<int32_t>(labels.size());
    params.seed = 42;
    if (fewstep_generate(ctx, &params, images.data(), images.size()) != FEWSTEP_OK) {
        std::fprintf(stderr, "error: %s\n", fewstep_last_error());
        fewstep_close(ctx);
        return 1;
    }
    std::printf("%d images of %dx%dx%d in %.2f ms\n", params.n, h, w, c, fewstep_last_latency_ms());
    fewstep_close(ctx);
    return 0;
}

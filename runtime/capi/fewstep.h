/*
 * fewstep.h: the C ABI of fewstep's native runtime (ABI version 2). Open an engine folder (python -m export.onnx),
 * generate uint8 images for class labels and a seed (or your own noise), close it. Plain C; usable from C++ as is.
 *
 * No Python inside: libfewstep is C++17 over OpenVINO's C++ API (and TensorRT's, where it was built with it). It
 * reads fewstep_engine.json and runs the manifest's few-step loop (docs/engine_spec.md) with the runtime's
 * documented counter-based noise, so the same engine, labels and seed give the bytes of the Python runtime
 * (`runtime.Pipeline.load(dir, "openvino-cpu").generate(labels, seed=seed)`; tests/test_capi.py checks them, and
 * the golden vectors of `python -m runtime.golden`). Text-to-image engines are served by the Python runtime only:
 * opening one is an error that says so.
 *
 * Threads: every function may be called from any thread, and one context may serve several threads at once
 * (fewstep_generate keeps no per-call state in the context). fewstep_close() must not run while another thread
 * uses the same context.
 *
 * Errors: fewstep_open() returns NULL and the other calls a non-zero fewstep_status; fewstep_last_error() then
 * holds a one-line message for this thread. A failed call leaves the context as it was: it keeps serving.
 *
 * Memory: the library frees what it allocates; the caller owns the output buffer and the params it passes.
 */
#ifndef FEWSTEP_H
#define FEWSTEP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#if defined(FEWSTEP_BUILDING)
#define FEWSTEP_API __declspec(dllexport)
#else
#define FEWSTEP_API __declspec(dllimport)
#endif
#elif defined(__GNUC__)
#define FEWSTEP_API __attribute__((visibility("default")))
#else
#define FEWSTEP_API
#endif

#define FEWSTEP_ABI_VERSION 2

typedef struct fewstep_context fewstep_context;

enum fewstep_status {
    FEWSTEP_OK = 0,
    FEWSTEP_ERROR_INPUT = 1,       /* bad request: label out of range, n < 1, NFE not served, NULL pointer, ... */
    FEWSTEP_ERROR_BUFFER = 2,      /* out_size is smaller than n * height * width * channels */
    FEWSTEP_ERROR_RUNTIME = 3,     /* the backend failed (the message says where) */
    FEWSTEP_ERROR_ENGINE = 4,      /* the engine folder is missing, incomplete, or from a newer fewstep */
    FEWSTEP_ERROR_UNSUPPORTED = 5  /* an engine or backend this build does not serve (e.g. text-to-image) */
};

/* Log lines (level 0 info, 1 warning) and per-step progress, both optional. Called on the calling thread. */
typedef void (*fewstep_log_fn)(int level, const char* message, void* user_data);
typedef void (*fewstep_progress_fn)(int32_t step, int32_t steps, void* user_data);

/* Where log lines go (NULL: nowhere, the default). Process-wide. */
FEWSTEP_API void fewstep_set_log(fewstep_log_fn log, void* user_data);

/* Open an engine folder. backend: "auto" or NULL (TensorRT where this build has it and the folder has a plan,
 * else OpenVINO), "openvino-cpu", "onnxruntime-cpu" (where this build has ONNX Runtime's C API), "tensorrt";
 * precision: "fp32" or NULL, "fp16", "int8", "int8-cpu", "bf16" (a file the folder has); threads: the backend's
 * CPU threads, 0 for its default. NULL on failure. */
FEWSTEP_API fewstep_context* fewstep_open(const char* engine_dir, const char* backend, const char* precision,
                                          int32_t threads);

/* One request. Fill with fewstep_params_init() (which sets every field's default), then set what you need. */
typedef struct fewstep_params {
    const int64_t* labels;  /* n class labels in 0..num_classes-1; NULL for unconditional engines */
    int32_t n;              /* images (default 1) */
    int32_t nfe;            /* network calls per image; 0: the engine's default schedule */
    uint64_t seed;          /* 0..2^63-1: the documented counter-based noise (default 0) */
    const float* noise;     /* or the caller's noise, (n, draws, C, H, W) float32 (draws: fewstep_draws); NULL: seed */
    int32_t batch_size;     /* images per network call; 0: the engine's largest batch, else 16 */
    fewstep_progress_fn progress;
    void* user_data;        /* passed to progress */
} fewstep_params;

FEWSTEP_API void fewstep_params_init(fewstep_params* params);

/* Generate params->n images into out as (n, height, width, channels) uint8, row-major. Returns a fewstep_status. */
FEWSTEP_API int fewstep_generate(fewstep_context* ctx, const fewstep_params* params, uint8_t* out, size_t out_size);

/* The shape of one image (out needs n * height * width * channels bytes). Returns a fewstep_status. */
FEWSTEP_API int fewstep_image_shape(const fewstep_context* ctx, int32_t* height, int32_t* width, int32_t* channels);

/* Class-conditional engines: the number of classes; 0 for unconditional ones (and for NULL). */
FEWSTEP_API int32_t fewstep_num_classes(const fewstep_context* ctx);

/* Noise draws per image at `nfe` (0: the default schedule): nfe for DMD2 engines, 1 for SFD ones; 0 when the
 * engine does not serve that NFE. */
FEWSTEP_API int32_t fewstep_draws(const fewstep_context* ctx, int32_t nfe);

/* The backend in use ("openvino-cpu", "onnxruntime-cpu", "tensorrt"); "" for NULL. Valid while the context is
 * open. */
FEWSTEP_API const char* fewstep_backend(const fewstep_context* ctx);

/* Wall-clock milliseconds of this thread's last successful fewstep_generate() (the whole call), 0 before one. */
FEWSTEP_API double fewstep_last_latency_ms(void);

/* This thread's last failure as one line ("" when none); valid until this thread's next fewstep call. */
FEWSTEP_API const char* fewstep_last_error(void);

/* Release a context (NULL is allowed). */
FEWSTEP_API void fewstep_close(fewstep_context* ctx);

#ifdef __cplusplus
}
#endif

#endif /* FEWSTEP_H */

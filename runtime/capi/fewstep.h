/*
 * fewstep.h: the C ABI of fewstep's runtime. Open an engine folder (python -m export.onnx), generate uint8
 * images for class labels and a seed, close it. Plain C; usable from C++ as is.
 *
 * THIS ABI EMBEDS CPYTHON. The runtime is Python (numpy + ONNX Runtime): libfewstep.so starts a CPython
 * interpreter inside the host process on the first fewstep_open() and calls runtime.Pipeline, so the images
 * are byte for byte those of `Pipeline.load(dir).generate(labels, seed=seed)`. A host that wants no Python
 * reimplements the sampling loop from docs/engine_spec.md against ONNX Runtime's C/C++ API and checks itself
 * with the golden vectors of `python -m runtime.golden`.
 *
 * Which Python: the interpreter behaves as if started as FEWSTEP_PYTHON (an environment variable: the path of a
 * python executable, e.g. a virtual environment's bin/python, whose site-packages then apply), else as the
 * Python the library was built against (CMake's Python3_EXECUTABLE). FEWSTEP_PYTHONPATH (colon-separated) is
 * put in front of sys.path to find the `runtime` package (default: the checkout the library was built from).
 * PYTHONHOME / PYTHONPATH work as for python itself. If the host process already runs Python, that
 * interpreter is used. The interpreter is started once and lives until the process exits.
 *
 * Threads: every function may be called from any thread, and one engine may serve several threads at once
 * (each call takes the GIL; ONNX Runtime releases it while the network runs). fewstep_close() must not run
 * while another thread uses the same engine.
 *
 * Errors: fewstep_open() returns NULL and the other calls a non-zero fewstep_status; fewstep_last_error()
 * then holds a one-line message (the runtime's own UserError text for bad input). A failed call leaves the
 * engine as it was: it keeps serving.
 */
#ifndef FEWSTEP_H
#define FEWSTEP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FEWSTEP_API __declspec(dllimport)
#elif defined(__GNUC__)
#define FEWSTEP_API __attribute__((visibility("default")))
#else
#define FEWSTEP_API
#endif

#define FEWSTEP_ABI_VERSION 1

typedef struct fewstep_engine fewstep_engine;

enum fewstep_status {
    FEWSTEP_OK = 0,
    FEWSTEP_ERROR_INPUT = 1,   /* bad input (label out of range, n < 1, unknown NFE, seed > 2^63 - 1, ...) */
    FEWSTEP_ERROR_BUFFER = 2,  /* out_size is smaller than n * height * width * channels */
    FEWSTEP_ERROR_RUNTIME = 3, /* an unexpected failure inside the runtime (the message names the exception) */
    FEWSTEP_ERROR_PYTHON = 4   /* CPython could not start, or the runtime package could not be imported */
};

/* Open an engine folder. backend: "auto" (or NULL), "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt",
 * "pytorch"; precision: "fp32" (or NULL), "fp16", "int8". NULL on failure (see fewstep_last_error()). */
FEWSTEP_API fewstep_engine* fewstep_open(const char* engine_dir, const char* backend, const char* precision);

/* The shape of one image: out needs n * height * width * channels bytes. Returns a fewstep_status. */
FEWSTEP_API int fewstep_image_shape(const fewstep_engine* engine, int32_t* height, int32_t* width,
                                    int32_t* channels);

/* Class-conditional engines: the number of classes (labels lie in 0..count-1); 0 for unconditional engines. */
FEWSTEP_API int32_t fewstep_num_classes(const fewstep_engine* engine);

/* Generate n images into out as (n, height, width, channels) uint8, row-major. labels: n class labels (NULL for
 * unconditional engines); nfe: network calls per image, 0 for the engine's default; seed: 0..2^63-1 (the
 * documented counter-based noise: the same seed and labels give the same bytes on every host and batch split).
 * Returns a fewstep_status (0 on success). */
FEWSTEP_API int fewstep_generate(fewstep_engine* engine, const int64_t* labels, int32_t n, int32_t nfe,
                                 uint64_t seed, uint8_t* out, size_t out_size);

/* Wall-clock milliseconds of this thread's last successful fewstep_generate() (the whole call), 0 before one. */
FEWSTEP_API double fewstep_last_latency_ms(void);

/* This thread's last failure as one line ("" when none); valid until this thread's next fewstep call. */
FEWSTEP_API const char* fewstep_last_error(void);

/* Release an engine (NULL is allowed). */
FEWSTEP_API void fewstep_close(fewstep_engine* engine);

#ifdef __cplusplus
}
#endif

#endif /* FEWSTEP_H */

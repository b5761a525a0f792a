/*
 * runtime._native: the runtime's per-request arithmetic in C (noise, x0, uint8), the same formulas as
 * runtime/noise.py, runtime/convention.py and runtime/pipeline.py's to_uint8, on caller-allocated buffers.
 *
 * Why: around a 1-step call the numpy versions are ~30 small array operations, and between network calls they run
 * cold (0.2-0.4 ms against a 1.5 ms call on a 2-core CPU); here they are three loops. Optional: pip builds it where a
 * C compiler is present, and runtime/native.py falls back to numpy otherwise.
 *
 * Results: x0 and uint8 are the same float64 operations in the same order as numpy's (built with
 * -ffp-contract=off, so no fused multiply-adds): bit-identical. Noise uses the C library's log/sqrt/cos/sin where
 * numpy may use its own SIMD versions, so the last float32 bit can differ (docs/engine_spec.md allows 1e-6).
 *
 * Only the buffer protocol is used (no numpy headers), and the GIL is released in the loops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define MAX_DRAWS 256
#define TWO_PI 6.283185307179586 /* 2.0 * numpy.pi as a double, as noise.py computes it */

static uint64_t splitmix64(uint64_t z) {
    z += GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static double uniform(uint64_t key, uint64_t i) {
    return ((double)(splitmix64(key + i) >> 11) + 0.5) / 9007199254740992.0; /* 2^53 */
}

/* The buffer's items are the C type `code` stands for ('f' float, 'd' double, 'B' uint8), in native order. */
static int has_format(const Py_buffer* view, char code) {
    const char* f = view->format ? view->format : "B";
    if (f[0] == '@' || f[0] == '=' || f[0] == '<')
        f++;
    return f[0] == code && f[1] == '\0';
}

/* A writable (or read-only) C-contiguous buffer of exactly `size` items of type `code`. */
static int get_buffer(PyObject* obj, Py_buffer* view, Py_ssize_t size, Py_ssize_t itemsize, char code, int writable,
                      const char* name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (!has_format(view, code) || view->itemsize != itemsize || size > PY_SSIZE_T_MAX / itemsize ||
        view->len != size * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of type '%c', got %zd bytes of '%s'", name, size, code,
                     view->len, view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* a * b * c without overflow, or -1 */
static Py_ssize_t product(Py_ssize_t a, Py_ssize_t b, Py_ssize_t c) {
    if (a < 0 || b < 0 || c < 0)
        return -1;
    if (b && a > PY_SSIZE_T_MAX / b)
        return -1;
    Py_ssize_t ab = a * b;
    if (c && ab > PY_SSIZE_T_MAX / c)
        return -1;
    return ab * c;
}

/* noise(seed, start, count, draws, n, out): out (count, draws, n) float32 = every draw of images start.. of a
 * request, as runtime.noise.request_noise. */
static PyObject* noise(PyObject* self, PyObject* args) {
    unsigned long long seed, start;
    Py_ssize_t count, draws, n;
    PyObject* out_obj;
    if (!PyArg_ParseTuple(args, "KKnnnO", &seed, &start, &count, &draws, &n, &out_obj))
        return NULL;
    Py_ssize_t size = product(count, draws, n);
    if (size < 0 || draws > MAX_DRAWS) {
        PyErr_SetString(PyExc_ValueError, "noise: count, draws (<= 256) and n must be non-negative, and fit memory");
        return NULL;
    }
    Py_buffer out;
    if (get_buffer(out_obj, &out, size, sizeof(float), 'f', 1, "noise out") < 0)
        return NULL;
    float* z = (float*)out.buf;
    Py_BEGIN_ALLOW_THREADS
    uint64_t mix = splitmix64((uint64_t)seed);
    for (Py_ssize_t image = 0; image < count; image++) {
        for (Py_ssize_t draw = 0; draw < draws; draw++) {
            uint64_t key = splitmix64(mix ^ (((uint64_t)start + (uint64_t)image) * MAX_DRAWS + (uint64_t)draw));
            float* dst = z + (image * draws + draw) * n;
            for (Py_ssize_t j = 0; 2 * j < n; j++) {
                double r = sqrt(-2.0 * log(uniform(key, 2 * (uint64_t)j)));
                double angle = TWO_PI * uniform(key, 2 * (uint64_t)j + 1);
                dst[2 * j] = (float)(r * cos(angle));
                if (2 * j + 1 < n)
                    dst[2 * j + 1] = (float)(r * sin(angle));
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* x0(prediction float32, x float64, sigma, kind, out float64): kind 0 epsilon, 1 v_prediction, 2 sample; the
 * formulas of convention.x0_from_output for one sigma, operation for operation. */
static PyObject* x0(PyObject* self, PyObject* args) {
    PyObject *pred_obj, *x_obj, *out_obj;
    double s;
    int kind;
    if (!PyArg_ParseTuple(args, "OOdiO", &pred_obj, &x_obj, &s, &kind, &out_obj))
        return NULL;
    if (kind < 0 || kind > 2) {
        PyErr_SetString(PyExc_ValueError, "x0: kind must be 0 (epsilon), 1 (v_prediction) or 2 (sample)");
        return NULL;
    }
    Py_buffer pred, x, out;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0)
        return NULL;
    Py_ssize_t size = out.len / (Py_ssize_t)sizeof(double);
    if (!has_format(&out, 'd') || out.itemsize != sizeof(double)) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "x0 out: expected float64");
        return NULL;
    }
    if (get_buffer(pred_obj, &pred, size, sizeof(float), 'f', 0, "x0 prediction") < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    if (get_buffer(x_obj, &x, size, sizeof(double), 'd', 0, "x0 x") < 0) {
        PyBuffer_Release(&pred);
        PyBuffer_Release(&out);
        return NULL;
    }
    const float* p = (const float*)pred.buf;
    const double* xs = (const double*)x.buf;
    double* o = (double*)out.buf;
    Py_BEGIN_ALLOW_THREADS
    if (kind == 0) {
        for (Py_ssize_t i = 0; i < size; i++)
            o[i] = xs[i] - s * (double)p[i];
    } else if (kind == 1) {
        double d = 1 + s * s;          /* x / (1 + s * s) */
        double c = s / sqrt(1 + s * s); /* s / math.sqrt(1 + s * s), then * out */
        for (Py_ssize_t i = 0; i < size; i++)
            o[i] = xs[i] / d - c * (double)p[i];
    } else {
        for (Py_ssize_t i = 0; i < size; i++)
            o[i] = (double)p[i];
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x);
    PyBuffer_Release(&pred);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* to_uint8(x float64 (N, C, H, W), N, C, H, W, out uint8 (N, H, W, C)): round((clip(x, -1, 1) + 1) * 127.5), half
 * to even (nearbyint in the default rounding mode), as pipeline.to_uint8. NaN becomes 0. */
static PyObject* to_uint8(PyObject* self, PyObject* args) {
    PyObject *x_obj, *out_obj;
    Py_ssize_t n, c, h, w;
    if (!PyArg_ParseTuple(args, "OnnnnO", &x_obj, &n, &c, &h, &w, &out_obj))
        return NULL;
    Py_ssize_t size = product(n, c, h) < 0 ? -1 : product(product(n, c, h), w, 1);
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "to_uint8: dimensions must be non-negative and fit memory");
        return NULL;
    }
    Py_buffer x, out;
    if (get_buffer(x_obj, &x, size, sizeof(double), 'd', 0, "to_uint8 x") < 0)
        return NULL;
    if (get_buffer(out_obj, &out, size, 1, 'B', 1, "to_uint8 out") < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    const double* xs = (const double*)x.buf;
    uint8_t* o = (uint8_t*)out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t ch = 0; ch < c; ch++)
            for (Py_ssize_t p = 0; p < h * w; p++) {
                double v = xs[(i * c + ch) * h * w + p];
                v = v < -1 ? -1 : v > 1 ? 1 : v;
                v = nearbyint((v + 1) * 127.5);
                o[(i * h * w + p) * c + ch] = v == v ? (uint8_t)v : 0;
            }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    PyBuffer_Release(&x);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"noise", noise, METH_VARARGS, "noise(seed, start, count, draws, n, out): request noise into float32 out"},
    {"x0", x0, METH_VARARGS, "x0(prediction, x, sigma, kind, out): x0 for one sigma into float64 out"},
    {"to_uint8", to_uint8, METH_VARARGS, "to_uint8(x, N, C, H, W, out): NCHW float64 -> NHWC uint8"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }

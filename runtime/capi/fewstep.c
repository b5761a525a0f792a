/*
 * libfewstep: the C ABI of fewstep.h over an embedded CPython that runs runtime.Pipeline (through
 * runtime/embed.py). The C side only marshals: labels and the output buffer go to Python as memoryviews over the
 * caller's memory, and Python exceptions come back as a status and one line of text.
 *
 * GIL: the interpreter is started once (pthread_once); the starting thread then releases the GIL, and every
 * entry point takes it with PyGILState_Ensure / PyGILState_Release, so any host thread may call in. ONNX Runtime
 * releases the GIL while the network runs, so calls from several threads overlap there.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fewstep.h"

#ifndef FEWSTEP_DEFAULT_PYTHON
#define FEWSTEP_DEFAULT_PYTHON ""
#endif
#ifndef FEWSTEP_DEFAULT_PYTHONPATH
#define FEWSTEP_DEFAULT_PYTHONPATH ""
#endif

#define MESSAGE_SIZE 2048

struct fewstep_engine {
    PyObject* pipeline;  /* runtime.Pipeline */
    int32_t height, width, channels, num_classes;
};

static _Thread_local char last_error[MESSAGE_SIZE];
static _Thread_local double last_latency_ms;

static pthread_once_t start_once = PTHREAD_ONCE_INIT;
static char start_error[MESSAGE_SIZE];  /* why the interpreter did not start; written once, before any reader */
static PyObject* embed_module;          /* runtime.embed, imported under the GIL on the first successful open */
static PyObject* user_error;            /* runtime.errors.UserError */

static int fail(int status, const char* format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(last_error, sizeof last_error, format, args);
    va_end(args);
    return status;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return 1e3 * (double)t.tv_sec + 1e-6 * (double)t.tv_nsec;
}

/* The pending Python exception as a status and one line: a UserError's own text, else "Type: text". Clears it. */
static int fail_from_python(void) {
    PyObject *type = NULL, *value = NULL, *traceback = NULL;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    int status = FEWSTEP_ERROR_RUNTIME;
    if (value && user_error && PyObject_IsInstance(value, user_error) == 1)
        status = FEWSTEP_ERROR_INPUT;
    PyObject* text = value ? PyObject_Str(value) : NULL;
    const char* message = text ? PyUnicode_AsUTF8(text) : NULL;
    if (!message) {
        PyErr_Clear();
        message = "(no message)";
    }
    if (status == FEWSTEP_ERROR_INPUT)
        fail(status, "%s", message);
    else
        fail(status, "%s: %s", type ? ((PyTypeObject*)type)->tp_name : "error", message);
    char* newline = strchr(last_error, '\n');  /* one line, as the header promises */
    if (newline)
        *newline = '\0';
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);  /* frees the traceback's frames, and with them any view of the caller's memory */
    Py_XDECREF(traceback);
    return status;
}

/* Start CPython once, as if it were the FEWSTEP_PYTHON executable, then hand the GIL back. */
static void start_python(void) {
    /* Extension modules (numpy, onnxruntime) find the C API in the global symbol scope; a host that dlopen()ed
     * this library with RTLD_LOCAL would hide libpython, so promote it. */
    Dl_info info;
    if (dladdr((void*)&Py_InitializeFromConfig, &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
    if (Py_IsInitialized())
        return;  /* the host runs Python itself (e.g. ctypes): use its interpreter */
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0;  /* SIGINT and friends stay the host's */
    config.parse_argv = 0;
    const char* python = getenv("FEWSTEP_PYTHON");
    if (!python || !*python)
        python = FEWSTEP_DEFAULT_PYTHON;
    if (*python && access(python, X_OK) != 0) {
        snprintf(start_error, sizeof start_error, "cannot start CPython as %s (%s): set FEWSTEP_PYTHON to a python "
                 "executable that has numpy and onnxruntime (e.g. a virtual environment's bin/python)", python,
                 strerror(errno));
        PyConfig_Clear(&config);
        return;
    }
    PyStatus status = PyStatus_Ok();
    if (*python)  /* its pyvenv.cfg, prefix and site-packages then apply, as when that python runs */
        status = PyConfig_SetBytesString(&config, &config.program_name, python);
    if (!PyStatus_Exception(status))
        status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        snprintf(start_error, sizeof start_error, "could not start CPython as %s (%s%s%s); set FEWSTEP_PYTHON to "
                 "a python executable (or PYTHONHOME)", *python ? python : "the built-in default",
                 status.func ? status.func : "", status.func ? ": " : "", status.err_msg ? status.err_msg : "?");
        return;
    }
    PyEval_SaveThread();  /* release the GIL: from now on every call takes it with PyGILState_Ensure */
}

/* Under the GIL: import runtime.embed once, with FEWSTEP_PYTHONPATH in front of sys.path. */
static int import_runtime(void) {
    if (embed_module)
        return FEWSTEP_OK;
    const char* extra = getenv("FEWSTEP_PYTHONPATH");
    if (!extra)
        extra = FEWSTEP_DEFAULT_PYTHONPATH;
    PyObject* sys_path = PySys_GetObject("path");  /* borrowed */
    if (sys_path && *extra) {
        char* paths = strdup(extra);
        Py_ssize_t at = 0;
        for (char *save = NULL, *p = strtok_r(paths, ":", &save); p; p = strtok_r(NULL, ":", &save)) {
            PyObject* entry = PyUnicode_DecodeFSDefault(p);
            if (entry && PySequence_Contains(sys_path, entry) == 0)
                PyList_Insert(sys_path, at++, entry);
            Py_XDECREF(entry);
        }
        free(paths);
        PyErr_Clear();
    }
    PyObject* module = PyImport_ImportModule("runtime.embed");
    PyObject* errors = module ? PyImport_ImportModule("runtime.errors") : NULL;
    PyObject* error_type = errors ? PyObject_GetAttrString(errors, "UserError") : NULL;
    Py_XDECREF(errors);
    if (!error_type) {
        Py_XDECREF(module);
        fail_from_python();
        char reason[MESSAGE_SIZE];
        snprintf(reason, sizeof reason, "%s", last_error);
        return fail(FEWSTEP_ERROR_PYTHON, "could not import fewstep's runtime (%s); set FEWSTEP_PYTHONPATH to the "
                    "fewstep checkout and FEWSTEP_PYTHON to a python with numpy and onnxruntime", reason);
    }
    user_error = error_type;
    embed_module = module;
    return FEWSTEP_OK;
}

static int as_int32(PyObject* item, int32_t* out) {
    long value = PyLong_AsLong(item);
    *out = (int32_t)value;
    return !(value == -1 && PyErr_Occurred());
}

FEWSTEP_API fewstep_engine* fewstep_open(const char* engine_dir, const char* backend, const char* precision) {
    last_error[0] = '\0';
    if (!engine_dir) {
        fail(FEWSTEP_ERROR_INPUT, "engine_dir is NULL; give the path of an engine folder (python -m export.onnx)");
        return NULL;
    }
    pthread_once(&start_once, start_python);
    if (start_error[0]) {
        fail(FEWSTEP_ERROR_PYTHON, "%s", start_error);
        return NULL;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    fewstep_engine* engine = NULL;
    PyObject* result = NULL;
    if (import_runtime() != FEWSTEP_OK)
        goto done;
    result = PyObject_CallMethod(embed_module, "open_engine", "sss", engine_dir, backend ? backend : "auto",
                                 precision ? precision : "fp32");
    if (!result) {
        fail_from_python();
        goto done;
    }
    engine = calloc(1, sizeof *engine);
    if (!engine || !PyTuple_Check(result) || PyTuple_Size(result) != 5 ||
        !as_int32(PyTuple_GET_ITEM(result, 1), &engine->height) ||
        !as_int32(PyTuple_GET_ITEM(result, 2), &engine->width) ||
        !as_int32(PyTuple_GET_ITEM(result, 3), &engine->channels) ||
        !as_int32(PyTuple_GET_ITEM(result, 4), &engine->num_classes)) {
        PyErr_Clear();
        free(engine);
        engine = NULL;
        fail(FEWSTEP_ERROR_RUNTIME, "runtime.embed.open_engine returned an unexpected value");
        goto done;
    }
    engine->pipeline = PyTuple_GET_ITEM(result, 0);
    Py_INCREF(engine->pipeline);
done:
    Py_XDECREF(result);
    PyGILState_Release(gil);
    return engine;
}

FEWSTEP_API int fewstep_image_shape(const fewstep_engine* engine, int32_t* height, int32_t* width,
                                    int32_t* channels) {
    if (!engine)
        return fail(FEWSTEP_ERROR_INPUT, "engine is NULL (did fewstep_open fail?)");
    if (height)
        *height = engine->height;
    if (width)
        *width = engine->width;
    if (channels)
        *channels = engine->channels;
    return FEWSTEP_OK;
}

FEWSTEP_API int32_t fewstep_num_classes(const fewstep_engine* engine) {
    return engine ? engine->num_classes : 0;
}

FEWSTEP_API int fewstep_generate(fewstep_engine* engine, const int64_t* labels, int32_t n, int32_t nfe,
                                 uint64_t seed, uint8_t* out, size_t out_size) {
    last_error[0] = '\0';
    if (!engine)
        return fail(FEWSTEP_ERROR_INPUT, "engine is NULL (did fewstep_open fail?)");
    if (n < 1)
        return fail(FEWSTEP_ERROR_INPUT, "n must be at least 1 (the number of images); got %d", (int)n);
    if (nfe < 0)
        return fail(FEWSTEP_ERROR_INPUT, "nfe must be 0 (the engine's default) or a step count it serves; got %d",
                    (int)nfe);
    size_t image = (size_t)engine->height * (size_t)engine->width * (size_t)engine->channels;
    size_t need = (size_t)n * image;
    if (!out || out_size < need)
        return fail(FEWSTEP_ERROR_BUFFER, "the output buffer holds %zu bytes; %d images of %dx%dx%d uint8 need %zu "
                    "(size it with fewstep_image_shape)", out ? out_size : (size_t)0, (int)n, (int)engine->height,
                    (int)engine->width, (int)engine->channels, need);
    double start = now_ms();
    PyGILState_STATE gil = PyGILState_Ensure();
    int status = FEWSTEP_OK;
    PyObject* label_view = labels ? PyMemoryView_FromMemory((char*)labels, (Py_ssize_t)n * 8, PyBUF_READ)
                                  : Py_NewRef(Py_None);
    PyObject* out_view = PyMemoryView_FromMemory((char*)out, (Py_ssize_t)need, PyBUF_WRITE);
    PyObject* result = NULL;
    if (label_view && out_view)
        result = PyObject_CallMethod(embed_module, "generate_into", "OOiiKO", engine->pipeline, label_view, (int)n,
                                     (int)nfe, (unsigned long long)seed, out_view);
    if (!result)
        status = fail_from_python();
    Py_XDECREF(result);
    Py_XDECREF(label_view);
    if (out_view) {  /* no Python object may keep a view of the caller's buffer after we return */
        PyObject* released = PyObject_CallMethod(out_view, "release", NULL);
        Py_XDECREF(released);
        PyErr_Clear();
        Py_DECREF(out_view);
    }
    PyGILState_Release(gil);
    if (status == FEWSTEP_OK)
        last_latency_ms = now_ms() - start;
    return status;
}

FEWSTEP_API double fewstep_last_latency_ms(void) {
    return last_latency_ms;
}

FEWSTEP_API const char* fewstep_last_error(void) {
    return last_error;
}

FEWSTEP_API void fewstep_close(fewstep_engine* engine) {
    if (!engine)
        return;
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_XDECREF(engine->pipeline);
    PyGILState_Release(gil);
    free(engine);
}

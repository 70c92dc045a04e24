/* Model.forward's lean binding (docs/performance.md, "Batch 1: the per-call
 * overhead"): one C call from Python to the network, for the common case
 * only (C-contiguous aligned native arrays of the model's dtypes).
 *
 *   forward(table, f32, i8, i32, norm, norm_kinds, x, n_out, work)
 *       -> a new float32 array (n, n_out); None (not the common case); or
 *          the network's status, an int (it refused the arguments)
 *
 * For None or a status the caller takes its full path, which checks
 * everything and raises the error. Every
 * argument that reaches Fortran is checked there (sizes, table, slices,
 * workspace: pykd_network's check_network); here only what Fortran cannot
 * see: types, dtypes, memory layout, ranks, writability. Nothing is copied
 * or cast. The GIL is released around the network, as f2py's threadsafe.
 *
 * The network's entry (pykd_network_forward_c, in the f2py extension) comes
 * from bind(), called once by pykd.models with the address the shim gives;
 * this module links no Fortran (one copy of the kernels and their state).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <limits.h>
#include <stdint.h>

enum { N_FIELDS = 14 };   /* pykd_codes (tests/test_lean.py ties it to pykd._codes) */

typedef void (*network_fn)(const int64_t *table, int nl, const float *f32, int64_t nf32,
                           const int8_t *i8, int64_t ni8, const int32_t *i32, int64_t ni32,
                           const float *norm, int64_t nnorm, const int *norm_kinds,
                           const float *x, int n_in, int n, float *y, int n_out, float *work,
                           int64_t nw, int *stat, int *bad_layer);

static network_fn entry = NULL;

static PyObject *bind(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long addr = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (addr == 0) {
        PyErr_SetString(PyExc_ValueError, "bind: a null entry");
        return NULL;
    }
    entry = (network_fn)(uintptr_t)addr;
    Py_RETURN_NONE;
}

/* arr if it is a native aligned C-contiguous ndarray of this type and rank
 * (writable if asked), else NULL (no exception). */
static PyArrayObject *plain(PyObject *o, int type, int ndim, int writable)
{
    if (!PyArray_Check(o)) return NULL;
    PyArrayObject *a = (PyArrayObject *)o;
    int need = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | (writable ? NPY_ARRAY_WRITEABLE : 0);
    if (PyArray_TYPE(a) != type || PyArray_NDIM(a) != ndim || !PyArray_CHKFLAGS(a, need) ||
        !PyArray_ISNOTSWAPPED(a))
        return NULL;
    return a;
}

static PyObject *forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 9 || entry == NULL) Py_RETURN_NONE;
    PyArrayObject *table = plain(args[0], NPY_INT64, 2, 0), *f32 = plain(args[1], NPY_FLOAT32, 1, 0),
                  *i8 = plain(args[2], NPY_INT8, 1, 0), *i32 = plain(args[3], NPY_INT32, 1, 0),
                  *norm = plain(args[4], NPY_FLOAT32, 1, 0), *kinds = plain(args[5], NPY_INT, 1, 0),
                  *x = plain(args[6], NPY_FLOAT32, 2, 0), *work = plain(args[8], NPY_FLOAT32, 1, 1);
    if (!table || !f32 || !i8 || !i32 || !norm || !kinds || !x || !work) Py_RETURN_NONE;
    long n_out = PyLong_AsLong(args[7]);
    if (n_out == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    npy_intp nl = PyArray_DIM(table, 0), n = PyArray_DIM(x, 0), n_in = PyArray_DIM(x, 1);
    if (PyArray_DIM(table, 1) != N_FIELDS || PyArray_DIM(kinds, 0) != 2 || nl < 1 || nl > INT_MAX ||
        n < 1 || n > INT_MAX || n_in > INT_MAX || n_out < 1 || n_out > INT_MAX)
        Py_RETURN_NONE;
    npy_intp dims[2] = {n, (npy_intp)n_out};
    PyArrayObject *y = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (y == NULL) return NULL;
    int stat = -1, bad = 0;
    Py_BEGIN_ALLOW_THREADS
    entry(PyArray_DATA(table), (int)nl, PyArray_DATA(f32), PyArray_SIZE(f32), PyArray_DATA(i8),
          PyArray_SIZE(i8), PyArray_DATA(i32), PyArray_SIZE(i32), PyArray_DATA(norm),
          PyArray_SIZE(norm), PyArray_DATA(kinds), PyArray_DATA(x), (int)n_in, (int)n,
          PyArray_DATA(y), (int)n_out, PyArray_DATA(work), PyArray_SIZE(work), &stat, &bad);
    Py_END_ALLOW_THREADS
    if (stat != 0) {   /* PYKD_OK */
        Py_DECREF(y);
        return PyLong_FromLong(stat);
    }
    return (PyObject *)y;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_O, "bind(address): the network entry (pykd.models calls it once)"},
    {"forward", (PyCFunction)(void (*)(void))forward, METH_FASTCALL,
     "forward(table, f32, i8, i32, norm, norm_kinds, x, n_out, work) -> y, None or a status"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lean",
                                    "Model.forward's lean binding (see pykd/_lean.c)", -1, methods};

PyMODINIT_FUNC PyInit__lean(void)
{
    import_array();
    return PyModule_Create(&module);
}

/* The products of one training step on a BLAS library loaded at run time,
 * timed natively: the sgemm part of the floor in benchmarks/bench_train.py.
 *
 * Built by bench_train.py (cc -O2 -fopenmp -shared) and called through
 * ctypes, one call per list of products, so Python's overhead and the GIL
 * stay out of the products' time. Each product runs in one of two modes:
 *   0  threaded: one call, the library's own threads (nthreads of them);
 *   1  split: an OpenMP team of nthreads, each thread one single-threaded
 *      call on its share (rows of C, or columns for C = A B^T, as pykd's
 *      training step splits dW), aligned to 16.
 * tf_time measures one product in one mode; bench_train picks the faster
 * mode of each product, and tf_run then runs the whole list, one barrier
 * after each product (as the products of a step depend on each other).
 */
#include <dlfcn.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *, size_t, size_t);

typedef struct {
    void *handle;
    sgemm_fn sgemm;
    void (*openblas_threads)(int);
    int (*openblas_get)(void);
    void (*blis_threads)(long);
    long (*blis_get)(void);
} tf_lib;

typedef struct {
    char ta, tb;
    int m, n, k, mode;
    float *a, *b, *c;
} tf_call;

typedef struct {
    tf_lib *lib;
    int ncalls, nthreads;
    tf_call *calls;
} tf_plan;

void *tf_open(const char *path)
{
    tf_lib *lib = calloc(1, sizeof *lib);
    if (!lib)
        return NULL;
    lib->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib->handle)
        lib->sgemm = (sgemm_fn)dlsym(lib->handle, "sgemm_");
    if (!lib->sgemm) {
        free(lib);
        return NULL;
    }
    lib->openblas_threads = (void (*)(int))dlsym(lib->handle, "openblas_set_num_threads");
    lib->openblas_get = (int (*)(void))dlsym(lib->handle, "openblas_get_num_threads");
    lib->blis_threads = (void (*)(long))dlsym(lib->handle, "bli_thread_set_num_threads");
    lib->blis_get = (long (*)(void))dlsym(lib->handle, "bli_thread_get_num_threads");
    return lib;
}

static void set_threads(const tf_lib *lib, int n)
{
    if (lib->blis_threads)
        lib->blis_threads(n);
    else if (lib->openblas_threads)
        lib->openblas_threads(n);
}

/* The library's thread count (0: unknown), to restore after a run. */
static int get_threads(const tf_lib *lib)
{
    if (lib->blis_threads)
        return lib->blis_get ? (int)lib->blis_get() : 0;
    return lib->openblas_get ? lib->openblas_get() : 0;
}

static float *filled(size_t n, unsigned seed)
{
    float *p = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    if (p)
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1664525u + 1013904223u;
            p[i] = (float)(seed >> 9) / 8388608.0f - 1.0f;
        }
    return p;
}

void tf_plan_free(void *plan);

/* spec: 5 ints per call: transa ('N'/'T'), transb, m, n, k. */
void *tf_plan_new(void *lib, int ncalls, const int *spec, int nthreads)
{
    tf_plan *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->lib = lib;
    p->ncalls = ncalls;
    p->nthreads = nthreads;
    p->calls = calloc((size_t)ncalls, sizeof *p->calls);
    for (int i = 0; p->calls && i < ncalls; i++) {
        tf_call *c = &p->calls[i];
        c->ta = (char)spec[5 * i];
        c->tb = (char)spec[5 * i + 1];
        c->m = spec[5 * i + 2];
        c->n = spec[5 * i + 3];
        c->k = spec[5 * i + 4];
        c->a = filled((size_t)c->m * c->k, 1u + i);
        c->b = filled((size_t)c->k * c->n, 7u + i);
        c->c = filled((size_t)c->m * c->n, 13u + i);
    }
    for (int i = 0; p->calls && i < ncalls; i++)
        if (!p->calls[i].a || !p->calls[i].b || !p->calls[i].c) {
            tf_plan_free(p);
            return NULL;
        }
    if (!p->calls) {
        free(p);
        return NULL;
    }
    return p;
}

void tf_plan_free(void *plan)
{
    tf_plan *p = plan;
    for (int i = 0; p->calls && i < p->ncalls; i++) {
        free(p->calls[i].a);
        free(p->calls[i].b);
        free(p->calls[i].c);
    }
    free(p->calls);
    free(p);
}

/* Thread t's share [lo, hi) of 0..n in blocks of 16. */
static void share(int n, int t, int nt, int *lo, int *hi)
{
    int blocks = (n + 15) / 16, per = blocks / nt, extra = blocks % nt;
    *lo = (t * per + (t < extra ? t : extra)) * 16;
    *hi = *lo + (per + (t < extra)) * 16;
    if (*lo > n)
        *lo = n;
    if (*hi > n)
        *hi = n;
}

/* Thread t of nt: its part of call c (all of it when nt == 1). */
static void part(const tf_lib *lib, const tf_call *c, int t, int nt)
{
    const float one = 1.0f, zero = 0.0f;
    int lda = c->ta == 'N' ? c->m : c->k, ldb = c->tb == 'N' ? c->k : c->n, ldc = c->m;
    int lo, hi, m = c->m, n = c->n;
    const float *a = c->a, *b = c->b;
    float *out = c->c;
    if (c->ta == 'N' && c->tb == 'T') { /* columns of C */
        share(c->n, t, nt, &lo, &hi);
        n = hi - lo;
        b += lo;
        out += (size_t)lo * ldc;
    } else { /* rows of C */
        share(c->m, t, nt, &lo, &hi);
        m = hi - lo;
        a += c->ta == 'N' ? (size_t)lo : (size_t)lo * lda;
        out += lo;
    }
    if (m > 0 && n > 0)
        lib->sgemm(&c->ta, &c->tb, &m, &n, &c->k, &one, a, &lda, b, &ldb, &zero, out, &ldc, 1, 1);
}

static void run_call(const tf_plan *p, const tf_call *c, int mode)
{
    if (mode == 0 || p->nthreads == 1) {
        set_threads(p->lib, p->nthreads);
        part(p->lib, c, 0, 1);
        return;
    }
    set_threads(p->lib, 1);
#pragma omp parallel num_threads(p->nthreads)
    part(p->lib, c, omp_get_thread_num(), omp_get_num_threads());
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The fastest of `reps` runs of call i in `mode`, in seconds. */
double tf_time(void *plan, int i, int mode, int reps)
{
    tf_plan *p = plan;
    double best = 1e30;
    int before = get_threads(p->lib);
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        run_call(p, &p->calls[i], mode);
        double dt = now() - t0;
        if (dt < best)
            best = dt;
    }
    if (before > 0)
        set_threads(p->lib, before);
    return best;
}

void tf_set_mode(void *plan, int i, int mode)
{
    ((tf_plan *)plan)->calls[i].mode = mode;
}

/* Every call of the list once, each in its mode. */
void tf_run(void *plan)
{
    tf_plan *p = plan;
    int before = get_threads(p->lib);
    for (int i = 0; i < p->ncalls; i++)
        run_call(p, &p->calls[i], p->calls[i].mode);
    if (before > 0)
        set_threads(p->lib, before);
}

/* Operand `which` (0: A, 1: B, 2: C) of call i, for the tests. */
float *tf_operand(void *plan, int i, int which)
{
    tf_call *c = &((tf_plan *)plan)->calls[i];
    return which == 0 ? c->a : which == 1 ? c->b : c->c;
}

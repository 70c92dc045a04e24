/* Adam's elementwise update on one contiguous range (pykd_optim's
 * adam_plain calls it on each thread's share), on the CPU path chosen once
 * per process: avx512 (AVX-512F, 16 floats a vector), avx2 (8), or portable
 * (plain C, any CPU). PYKD_OPTIM_PATH=portable|avx2|avx512 forces a path
 * the CPU has.
 *
 * Every path computes, per element and in this order, with one rounding per
 * operation (no FMA: the build passes -ffp-contract=off and the vector
 * paths use separate multiplies and adds):
 *   gi = g + wd * p
 *   m  = b1 * m + (1 - b1) * gi
 *   v  = b2 * v + ((1 - b2) * gi) * gi
 *   p  = p - (step * m) / (sqrt(v) * inv + eps)
 * sqrt and division are correctly rounded in IEEE arithmetic, so every path
 * gives the bits of the Fortran loop (adam_masked with every entry kept,
 * tests/test_optim_paths.py). Why vectors by hand: the loop is bound by
 * sqrt and division, and on AMD Zen 5 the 16-wide path takes 0.26 ns a
 * parameter in cache against 0.38 for gfortran's 8-wide loop. */
#include <stddef.h>
#include <stdint.h>
#include <math.h>

#include "pykd_cpu_path.h"

/* -DPYKD_NO_SIMD builds the portable path alone, as on a non-x86 CPU. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(PYKD_NO_SIMD)
#include <immintrin.h>
#define PYKD_X86 1
#endif

enum { P_PORTABLE = 0, P_AVX2 = 1, P_AVX512 = 2, P_COUNT = 3 };
static const char *const path_names[P_COUNT] = {"portable", "avx2", "avx512"};

static int cpu_has(int p)
{
    if (p == P_PORTABLE) return 1;
#ifdef PYKD_X86
    __builtin_cpu_init();
    if (p == P_AVX2) return __builtin_cpu_supports("avx2");
    if (p == P_AVX512) return __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

static int chosen = -1;

int pykd_optim_path(void)
{
    return pykd_path_get(&chosen, "PYKD_OPTIM_PATH", path_names, P_COUNT, cpu_has);
}

/* The path's name, blank padded to len (for Fortran). */
void pykd_optim_path_name(char *name, int len)
{
    pykd_path_name_fill(path_names, pykd_optim_path(), name, len);
}

typedef struct {
    float step, inv, b1, b2, one_b1, one_b2, eps, wd;
} adam_consts;

static void adam_portable(int64_t lo, int64_t n, float *p, const float *g, float *m, float *v,
                          const adam_consts *c)
{
    for (int64_t i = lo; i < n; i++) {
        float gi = g[i] + c->wd * p[i];
        m[i] = c->b1 * m[i] + c->one_b1 * gi;
        v[i] = c->b2 * v[i] + c->one_b2 * gi * gi;
        p[i] = p[i] - c->step * m[i] / (sqrtf(v[i]) * c->inv + c->eps);
    }
}

#ifdef PYKD_X86
__attribute__((target("avx2")))
static int64_t adam_avx2(int64_t n, float *p, const float *g, float *m, float *v,
                         const adam_consts *c)
{
    const __m256 wd = _mm256_set1_ps(c->wd), b1 = _mm256_set1_ps(c->b1),
                 b2 = _mm256_set1_ps(c->b2), ob1 = _mm256_set1_ps(c->one_b1),
                 ob2 = _mm256_set1_ps(c->one_b2), st = _mm256_set1_ps(c->step),
                 inv = _mm256_set1_ps(c->inv), eps = _mm256_set1_ps(c->eps);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 pi = _mm256_loadu_ps(p + i);
        __m256 gi = _mm256_add_ps(_mm256_loadu_ps(g + i), _mm256_mul_ps(wd, pi));
        __m256 mi = _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(m + i)), _mm256_mul_ps(ob1, gi));
        __m256 vi = _mm256_add_ps(_mm256_mul_ps(b2, _mm256_loadu_ps(v + i)),
                                  _mm256_mul_ps(_mm256_mul_ps(ob2, gi), gi));
        __m256 den = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vi), inv), eps);
        _mm256_storeu_ps(m + i, mi);
        _mm256_storeu_ps(v + i, vi);
        _mm256_storeu_ps(p + i, _mm256_sub_ps(pi, _mm256_div_ps(_mm256_mul_ps(st, mi), den)));
    }
    return i; /* the tail is the portable loop's */
}

__attribute__((target("avx512f")))
static int64_t adam_avx512(int64_t n, float *p, const float *g, float *m, float *v,
                        const adam_consts *c)
{
    const __m512 wd = _mm512_set1_ps(c->wd), b1 = _mm512_set1_ps(c->b1),
                 b2 = _mm512_set1_ps(c->b2), ob1 = _mm512_set1_ps(c->one_b1),
                 ob2 = _mm512_set1_ps(c->one_b2), st = _mm512_set1_ps(c->step),
                 inv = _mm512_set1_ps(c->inv), eps = _mm512_set1_ps(c->eps);
    int64_t i = 0;
    /* Plain loads and stores in the body: masked stores streaming from
     * memory ran at less than half the speed here (AMD Zen 5). */
    for (; i + 16 <= n; i += 16) {
        __m512 pi = _mm512_loadu_ps(p + i);
        __m512 gi = _mm512_add_ps(_mm512_loadu_ps(g + i), _mm512_mul_ps(wd, pi));
        __m512 mi = _mm512_add_ps(_mm512_mul_ps(b1, _mm512_loadu_ps(m + i)), _mm512_mul_ps(ob1, gi));
        __m512 vi = _mm512_add_ps(_mm512_mul_ps(b2, _mm512_loadu_ps(v + i)),
                                  _mm512_mul_ps(_mm512_mul_ps(ob2, gi), gi));
        __m512 den = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), inv), eps);
        _mm512_storeu_ps(m + i, mi);
        _mm512_storeu_ps(v + i, vi);
        _mm512_storeu_ps(p + i, _mm512_sub_ps(pi, _mm512_div_ps(_mm512_mul_ps(st, mi), den)));
    }
    return i; /* the tail is the portable loop's (the same bits) */
}
#endif

/* Adam on p[0:n] (see the top of the file); thread-safe on disjoint ranges. */
void pykd_adam_plain(int64_t n, float *p, const float *g, float *m, float *v, float step,
                     float inv, float b1, float b2, float eps, float wd)
{
    /* 1 - b as the Fortran loop computes it: in float32 */
    adam_consts c = {step, inv, b1, b2, 1.0f - b1, 1.0f - b2, eps, wd};
    int64_t done = 0;
    if (n <= 0) return;
#ifdef PYKD_X86
    switch (pykd_optim_path()) {
    case P_AVX512:
        done = adam_avx512(n, p, g, m, v, &c);
        break;
    case P_AVX2:
        done = adam_avx2(n, p, g, m, v, &c);
        break;
    default:
        break;
    }
#endif
    adam_portable(done, n, p, g, m, v, &c);
}

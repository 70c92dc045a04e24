/* The dense layer's one-sample product (docs/performance.md, "Batch 1").
 *
 * y(j) = act(sum_i w(j, i) * x(i) + b(j)) for the outputs j0 <= j < j1
 * (0-based), w the model's Fortran w(n_out, n_in) float32, read in place.
 * act is fused for identity and relu (the codes of pykd_codes); for any
 * other code the caller applies it after the bias.
 *
 * Each output is summed in input order, one float32 multiply and one add per
 * term, starting from 0 (no FMA on any path: this file is built with
 * -ffp-contract=off and no "fma" target). A vector lane is one output, so
 * the avx2 and portable paths give the same bits, whatever range of outputs
 * a thread takes: the bits depend neither on the path nor on the thread
 * count. (They differ from sgemv's, which sums in another order.)
 *
 * Paths: avx512 (16 outputs per zmm register, up to 256 outputs per pass
 * over the inputs, masked tails), avx2 (8 per ymm, 64 per pass, a scalar
 * tail), portable (plain C, any CPU). PYKD_DENSE_PATH=portable|avx2|avx512
 * forces one the CPU has.
 *
 * No OpenMP and no BLAS here: a call runs on the calling thread, so a small
 * product wakes no thread.
 */
#pragma GCC optimize("fp-contract=off")
#include <stdlib.h>
#include <string.h>

#include "pykd_cpu_path.h"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(PYKD_NO_SIMD)
#include <immintrin.h>
#define PYKD_X86 1
#endif

/* pykd_codes: ACT_IDENTITY = 0, ACT_RELU = 1 (tests/test_codes.py checks them). */
enum { ACT_IDENTITY = 0, ACT_RELU = 1 };
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

/* Chosen once per process (PYKD_DENSE_PATH forces a path). */
static int chosen = -1;

int pykd_f32_path(void)
{
    return pykd_path_get(&chosen, "PYKD_DENSE_PATH", path_names, P_COUNT, cpu_has);
}

/* The name of the path in use, blank padded to len (a Fortran buffer). */
void pykd_f32_path_name(char *name, int len)
{
    pykd_path_name_fill(path_names, pykd_f32_path(), name, len);
}

/* z < 0 ? 0 : z keeps NaN and -0.0, as the relu of pykd_activation.
 * b == NULL: no bias (the first factor of a low-rank layer). */
static inline float finish(float acc, const float *b, int act)
{
    float z = b ? acc + *b : acc;
    return (act == ACT_RELU && z < 0.0f) ? 0.0f : z;
}

/* Outputs per portable tile (the accumulators live on the stack). */
#define PJ 64

static void gemv_portable(int n_out, int n_in, const float *w, const float *x, int j0, int j1,
                          const float *b, int act, float *y)
{
    float acc[PJ];
    for (int j = j0; j < j1; j += PJ) {
        int m = j1 - j < PJ ? j1 - j : PJ;
        for (int k = 0; k < m; k++) acc[k] = 0.0f;
        for (int i = 0; i < n_in; i++) {
            const float *col = w + (size_t)i * n_out + j;
            float xi = x[i];
            for (int k = 0; k < m; k++) acc[k] = acc[k] + col[k] * xi;
        }
        for (int k = 0; k < m; k++) y[j + k] = finish(acc[k], b ? b + j + k : NULL, act);
    }
}

#ifdef PYKD_X86
#define AVX2 __attribute__((target("avx2")))

/* NV vectors of 8 outputs from j: NV accumulators stay in registers while
 * the inputs stream by (a compile-time NV, from the switch below). */
AVX2 static inline __attribute__((always_inline)) void
block_avx2(const int NV, int n_out, int n_in, const float *w, const float *x, int j,
           const float *b, int act, float *y)
{
    __m256 acc[8];
    for (int v = 0; v < NV; v++) acc[v] = _mm256_setzero_ps();
    const float *col = w + j;
    for (int i = 0; i < n_in; i++, col += n_out) {
        __m256 xi = _mm256_broadcast_ss(x + i);
        for (int v = 0; v < NV; v++)
            acc[v] = _mm256_add_ps(acc[v], _mm256_mul_ps(_mm256_loadu_ps(col + 8 * v), xi));
    }
    const __m256 zero = _mm256_setzero_ps();
    for (int v = 0; v < NV; v++) {
        __m256 z = b ? _mm256_add_ps(acc[v], _mm256_loadu_ps(b + j + 8 * v)) : acc[v];
        if (act == ACT_RELU) z = _mm256_blendv_ps(z, zero, _mm256_cmp_ps(z, zero, _CMP_LT_OQ));
        _mm256_storeu_ps(y + j + 8 * v, z);
    }
}

AVX2 static void gemv_avx2(int n_out, int n_in, const float *w, const float *x, int j0, int j1,
                           const float *b, int act, float *y)
{
    int j = j0;
    for (; j + 64 <= j1; j += 64) block_avx2(8, n_out, n_in, w, x, j, b, act, y);
    switch ((j1 - j) / 8) {
    case 7: block_avx2(7, n_out, n_in, w, x, j, b, act, y); break;
    case 6: block_avx2(6, n_out, n_in, w, x, j, b, act, y); break;
    case 5: block_avx2(5, n_out, n_in, w, x, j, b, act, y); break;
    case 4: block_avx2(4, n_out, n_in, w, x, j, b, act, y); break;
    case 3: block_avx2(3, n_out, n_in, w, x, j, b, act, y); break;
    case 2: block_avx2(2, n_out, n_in, w, x, j, b, act, y); break;
    case 1: block_avx2(1, n_out, n_in, w, x, j, b, act, y); break;
    default: break;
    }
    j += (j1 - j) / 8 * 8;
    /* The last < 8 outputs one at a time, in the same order. */
    if (j < j1) gemv_portable(n_out, n_in, w, x, j, j1, b, act, y);
}

#define AVX512 __attribute__((target("avx512f")))

/* NV vectors of 16 outputs from j, the last one holding only the lanes of
 * `last` (masked loads read nothing past them, masked stores write
 * nothing): the tail of a layer needs no scalar loop. Each lane sums its
 * output in input order with one multiply and one add, as the other paths. */
AVX512 static inline __attribute__((always_inline)) void
block_avx512(const int NV, int n_out, int n_in, const float *w, const float *x, int j,
             __mmask16 last, const float *b, int act, float *y)
{
    __m512 acc[16];
    for (int v = 0; v < NV; v++) acc[v] = _mm512_setzero_ps();
    const float *col = w + j;
    for (int i = 0; i < n_in; i++, col += n_out) {
        __m512 xi = _mm512_set1_ps(x[i]);
        for (int v = 0; v < NV - 1; v++)
            acc[v] = _mm512_add_ps(acc[v], _mm512_mul_ps(_mm512_loadu_ps(col + 16 * v), xi));
        acc[NV - 1] = _mm512_add_ps(
            acc[NV - 1], _mm512_mul_ps(_mm512_maskz_loadu_ps(last, col + 16 * (NV - 1)), xi));
    }
    const __m512 zero = _mm512_setzero_ps();
    for (int v = 0; v < NV; v++) {
        __mmask16 m = v == NV - 1 ? last : (__mmask16)0xFFFF;
        __m512 z = b ? _mm512_add_ps(acc[v], _mm512_maskz_loadu_ps(m, b + j + 16 * v)) : acc[v];
        if (act == ACT_RELU) z = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ), z, zero);
        _mm512_mask_storeu_ps(y + j + 16 * v, m, z);
    }
}

/* Blocks of up to 16 vectors (256 outputs: 16 accumulators of the 32
 * registers); an output range of any length is whole blocks plus one
 * shorter block with a masked last vector. */
AVX512 static void gemv_avx512(int n_out, int n_in, const float *w, const float *x, int j0,
                               int j1, const float *b, int act, float *y)
{
    for (int j = j0; j < j1; j += 256) {
        int m = j1 - j < 256 ? j1 - j : 256;
        int nv = (m + 15) / 16;
        __mmask16 last = (__mmask16)(0xFFFFu >> (16 * nv - m));
        switch (nv) {
#define CASE(k) case k: block_avx512(k, n_out, n_in, w, x, j, last, b, act, y); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
        CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
#undef CASE
        default: break;
        }
    }
}
#endif

/* y[j0:j1] of one sample; act other than identity and relu: bias only. */
void pykd_f32_gemv(int n_out, int n_in, const float *w, const float *x, int j0, int j1,
                   const float *b, int act, float *y)
{
    if (act != ACT_RELU) act = ACT_IDENTITY;
#ifdef PYKD_X86
    int p = pykd_f32_path();
    if (p == P_AVX512) {
        gemv_avx512(n_out, n_in, w, x, j0, j1, b, act, y);
        return;
    }
    if (p == P_AVX2) {
        gemv_avx2(n_out, n_in, w, x, j0, j1, b, act, y);
        return;
    }
#endif
    gemv_portable(n_out, n_in, w, x, j0, j1, b, act, y);
}

/* The same without a bias (y = w x on [j0, j1)). */
void pykd_f32_gemv_nobias(int n_out, int n_in, const float *w, const float *x, int j0, int j1,
                          float *y)
{
    pykd_f32_gemv(n_out, n_in, w, x, j0, j1, NULL, ACT_IDENTITY, y);
}

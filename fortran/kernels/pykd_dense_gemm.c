/* The dense layer's batch product (docs/performance.md, "Batch 256").
 *
 * y(j, s) = act(sum_i w(j, i) * x(i, s) + b(j)) for n samples, w the model's
 * Fortran w(n_out, n_in) float32, x(n_in, n), y(n_out, n). act is fused
 * for identity and relu (pykd_codes); for any other code the caller applies
 * it after the bias.
 *
 * Each output is summed in input order from 0 with one fused multiply-add
 * per term, acc = fma(w, x, acc), then acc + b: on every path (avx512 zmm
 * FMA, avx2 ymm FMA, portable fmaf, which is correctly rounded wherever it
 * runs), whatever the sample or output range, tile or thread, so the bits
 * depend neither on the path nor on the batch size or the thread count.
 * They differ from the one-sample kernel's (a multiply and an add per term,
 * pykd_dense_simd.c) and from sgemm's.
 *
 * Why FMA (benchmarks/gemm_f32_probe.c, AMD Zen 4): with a multiply and an
 * add per term both FP pipe pairs are full and every broadcast of x costs a
 * cycle; an FMA leaves a slot for it. The avx512 path packs a panel of 16 tv
 * outputs of W at a time into `work` (each input's panel weights
 * contiguous, 64-byte aligned), then runs tiles of ts samples x up to tv zmm
 * vectors over them; the panel stays in L2 while every tile of the batch
 * streams it. The tile (24 accumulators either way) follows the CPU:
 *   4 x 6 on AMD: a zmm broadcast of x takes an FP pipe slot on Zen 4, so
 *     few samples per tile;
 *   8 x 3 on Intel: broadcasts are load-port work, and the panel streamed
 *     from L2 per FLOP halves (Xeon family 6 model 207, one thread: the
 *     student at batch 256 4% faster than with 4 x 6, alternating in one
 *     process; benchmarks/gemm_f32_probe.c: 1.19x OpenBLAS's speed on the
 *     student's products, against 1.11x).
 * The tile changes no bit: each output is the same FMA chain.
 *
 * PYKD_DENSE_PATH=portable|avx2|avx512 forces a path the CPU has (the same
 * choice as the one-sample kernel), PYKD_DENSE_TILE=4x6|8x3 the avx512
 * tile. No OpenMP, no BLAS: a call runs on the calling thread
 * (network_forward gives each thread its own samples).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pykd_cpu_path.h"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(PYKD_NO_SIMD)
#include <immintrin.h>
#define PYKD_X86 1
#endif

int pykd_f32_path(void);

/* pykd_codes: ACT_RELU = 1 (tests/test_codes.py checks it). */
enum { ACT_RELU = 1 };
enum { P_PORTABLE = 0, P_AVX2 = 1, P_AVX512 = 2 };

/* avx512 tiles: at most TS samples x TV zmm vectors of outputs (a packed
 * panel holds 16 TV outputs at most). */
#define TS 8
#define TV 6
#define PANEL (16 * TV)
/* From this many samples the avx512 path packs W's panels (measured:
 * docs/performance.md, "Batch 256"); below, its tiles read W in place. */
#define PACK_MIN 8

/* Words of work the avx512 path packs into: the widest panel, aligned. */
long pykd_f32_gemm_words(int n_in) { return (long)PANEL * n_in + 16; }

/* z < 0 ? 0 : z keeps NaN and -0.0, as the relu of pykd_activation. */
static inline float finish(float acc, float b, int act)
{
    float z = acc + b;
    return (act == ACT_RELU && z < 0.0f) ? 0.0f : z;
}

static void gemm_portable(int n_out, int n_in, int n, const float *w, const float *x,
                          const float *b, int act, float *y)
{
    for (int s = 0; s < n; s++) {
        const float *xs = x + (ptrdiff_t)s * n_in;
        float *ys = y + (ptrdiff_t)s * n_out;
        for (int j = 0; j < n_out; j++) ys[j] = 0.0f;
        for (int i = 0; i < n_in; i++) {
            const float *wi = w + (ptrdiff_t)i * n_out;
            float xi = xs[i];
            for (int j = 0; j < n_out; j++) ys[j] = fmaf(wi[j], xi, ys[j]);
        }
        for (int j = 0; j < n_out; j++) ys[j] = finish(ys[j], b[j], act);
    }
}

#ifdef PYKD_X86
/* ---- avx2: W in place, tiles of up to 4 samples x 2 ymm (16 outputs); the
 * outputs past the last whole vector of 8 in the portable loop's form. */
#define A2 __attribute__((target("avx2,fma")))

A2 static inline __attribute__((always_inline)) void tile2(const int S, const int NV, int n_out,
                                                              int n_in, const float *w,
                                                              const float *x, int j,
                                                              const float *b, int act, float *y)
{
    __m256 acc[4][2];
    for (int s = 0; s < S; s++)
        for (int v = 0; v < NV; v++) acc[s][v] = _mm256_setzero_ps();
    const float *col = w + j;
    for (int i = 0; i < n_in; i++, col += n_out) {
        __m256 wv[2];
        for (int v = 0; v < NV; v++) wv[v] = _mm256_loadu_ps(col + 8 * v);
        for (int s = 0; s < S; s++) {
            __m256 xb = _mm256_broadcast_ss(x + (ptrdiff_t)s * n_in + i);
            for (int v = 0; v < NV; v++) acc[s][v] = _mm256_fmadd_ps(wv[v], xb, acc[s][v]);
        }
    }
    const __m256 zero = _mm256_setzero_ps();
    for (int v = 0; v < NV; v++) {
        __m256 bv = _mm256_loadu_ps(b + j + 8 * v);
        for (int s = 0; s < S; s++) {
            __m256 z = _mm256_add_ps(acc[s][v], bv);
            if (act == ACT_RELU) z = _mm256_blendv_ps(z, zero, _mm256_cmp_ps(z, zero, _CMP_LT_OQ));
            _mm256_storeu_ps(y + (ptrdiff_t)s * n_out + j + 8 * v, z);
        }
    }
}

#define CASE2(S, NV) case S: tile2(S, NV, n_out, n_in, w, xs, j, b, act, ys); break;

A2 static void gemm_avx2(int n_out, int n_in, int n, const float *w, const float *x,
                         const float *b, int act, float *y)
{
    int whole = n_out / 8 * 8;
    for (int s0 = 0; s0 < n; s0 += 4) {
        int sn = n - s0 < 4 ? n - s0 : 4;
        const float *xs = x + (ptrdiff_t)s0 * n_in;
        float *ys = y + (ptrdiff_t)s0 * n_out;
        for (int j = 0; j < whole; j += 16) {
            if (whole - j >= 16) {
                switch (sn) { CASE2(1, 2) CASE2(2, 2) CASE2(3, 2) CASE2(4, 2) default: break; }
            } else {
                switch (sn) { CASE2(1, 1) CASE2(2, 1) CASE2(3, 1) CASE2(4, 1) default: break; }
            }
        }
        for (int s = 0; s < sn; s++)   /* the tail: the same fma chain per output */
            for (int j = whole; j < n_out; j++) {
                float acc = 0.0f;
                for (int i = 0; i < n_in; i++)
                    acc = fmaf(w[(ptrdiff_t)i * n_out + j], xs[(ptrdiff_t)s * n_in + i], acc);
                ys[(ptrdiff_t)s * n_out + j] = finish(acc, b[j], act);
            }
    }
}

/* ---- avx512: packed panels of PANEL outputs, tiles of TS x NV zmm ---- */
#define A5 __attribute__((target("avx512f,fma")))

/* wp[i * 16 nv + l] = w(j + l, i), 0 past n_out. */
A5 static void pack_panel(int n_out, int n_in, const float *w, int j, int nv, float *wp)
{
    int m = n_out - j;
    __mmask16 last = (__mmask16)(m >= 16 * nv ? 0xFFFFu : 0xFFFFu >> (16 * nv - m));
    for (int i = 0; i < n_in; i++) {
        const float *col = w + (ptrdiff_t)i * n_out + j;
        float *dst = wp + (ptrdiff_t)i * 16 * nv;
        for (int v = 0; v < nv - 1; v++) _mm512_store_ps(dst + 16 * v, _mm512_loadu_ps(col + 16 * v));
        _mm512_store_ps(dst + 16 * (nv - 1), _mm512_maskz_loadu_ps(last, col + 16 * (nv - 1)));
    }
}

/* PACKED: wp is a packed panel (16 NV floats per input, aligned, 0-padded);
 * else wp is w + j read in place (n_out floats per input, the last vector
 * masked). */
A5 static inline __attribute__((always_inline)) void tile5(const int S, const int NV,
                                                              const int PACKED, int n_out,
                                                              int n_in, const float *wp,
                                                              const float *x, int j,
                                                              __mmask16 last, const float *b,
                                                              int act, float *y)
{
    __m512 acc[TS][TV];
    for (int s = 0; s < S; s++)
        for (int v = 0; v < NV; v++) acc[s][v] = _mm512_setzero_ps();
    const float *col = wp;
    const float *xs = x;
    const ptrdiff_t stride = PACKED ? 16 * NV : n_out;
    for (int i = 0; i < n_in; i++, col += stride, xs++) {
        __m512 wv[TV];
        for (int v = 0; v < NV; v++) {
            if (PACKED)
                wv[v] = _mm512_load_ps(col + 16 * v);
            else
                wv[v] = v < NV - 1 ? _mm512_loadu_ps(col + 16 * v)
                                   : _mm512_maskz_loadu_ps(last, col + 16 * v);
            /* in a register: GCC 12 would fold the load into every sample's
             * FMA (S loads of each vector per input: load-bound on Zen 4) */
            __asm__("" : "+v"(wv[v]));
        }
        for (int s = 0; s < S; s++) {
            __m512 xb = _mm512_set1_ps(xs[(ptrdiff_t)s * n_in]);
            for (int v = 0; v < NV; v++) acc[s][v] = _mm512_fmadd_ps(wv[v], xb, acc[s][v]);
        }
    }
    const __m512 zero = _mm512_setzero_ps();
    for (int v = 0; v < NV; v++) {
        __mmask16 m = v == NV - 1 ? last : (__mmask16)0xFFFF;
        __m512 bv = _mm512_maskz_loadu_ps(m, b + j + 16 * v);
        for (int s = 0; s < S; s++) {
            __m512 z = _mm512_add_ps(acc[s][v], bv);
            if (act == ACT_RELU) z = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ), z, zero);
            _mm512_mask_storeu_ps(y + (ptrdiff_t)s * n_out + j + 16 * v, m, z);
        }
    }
}

/* The guards drop the tiles a tile shape cannot reach (ts, tv constant). */
#define CASE5(S, NV, P) case S: if (S <= ts && NV <= tv) tile5(S, NV, P, n_out, n_in, P ? wp : w + j, xs, j, last, b, act, ys); break;
#define SAMPLES5(NV, P)                                                                      \
    switch (sn) {                                                                            \
    CASE5(1, NV, P) CASE5(2, NV, P) CASE5(3, NV, P) CASE5(4, NV, P)                          \
    CASE5(5, NV, P) CASE5(6, NV, P) CASE5(7, NV, P) CASE5(8, NV, P) default: break;          \
    }
#define VECTORS5(P)                                                                          \
    switch (nv) {                                                                            \
    case 1: SAMPLES5(1, P) break;                                                            \
    case 2: SAMPLES5(2, P) break;                                                            \
    case 3: SAMPLES5(3, P) break;                                                            \
    case 4: SAMPLES5(4, P) break;                                                            \
    case 5: SAMPLES5(5, P) break;                                                            \
    case 6: SAMPLES5(6, P) break;                                                            \
    default: break;                                                                          \
    }

/* Panels of 16 tv outputs, tiles of ts samples (ts <= TS, tv <= TV; both
 * constants where gemm_avx512 is inlined). */
A5 static inline __attribute__((always_inline)) void
gemm_avx512(const int ts, const int tv, int n_out, int n_in, int n, const float *w,
            const float *x, const float *b, int act, float *y, float *work)
{
    float *wp = (float *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    for (int j = 0; j < n_out; j += 16 * tv) {
        int m = n_out - j < 16 * tv ? n_out - j : 16 * tv;
        int nv = (m + 15) / 16;
        __mmask16 last = (__mmask16)(0xFFFFu >> (16 * nv - m));
        int packed = n >= PACK_MIN;   /* a few samples do not pay for the packing */
        if (packed) pack_panel(n_out, n_in, w, j, nv, wp);
        for (int s0 = 0; s0 < n; s0 += ts) {
            int sn = n - s0 < ts ? n - s0 : ts;
            const float *xs = x + (ptrdiff_t)s0 * n_in;
            float *ys = y + (ptrdiff_t)s0 * n_out;
            if (packed) {
                VECTORS5(1)
            } else {
                VECTORS5(0)
            }
        }
    }
}

A5 static void gemm_avx512_4x6(int n_out, int n_in, int n, const float *w, const float *x,
                               const float *b, int act, float *y, float *work)
{
    gemm_avx512(4, 6, n_out, n_in, n, w, x, b, act, y, work);
}

A5 static void gemm_avx512_8x3(int n_out, int n_in, int n, const float *w, const float *x,
                               const float *b, int act, float *y, float *work)
{
    gemm_avx512(8, 3, n_out, n_in, n, w, x, b, act, y, work);
}

enum { TILE_4X6 = 0, TILE_8X3 = 1, TILE_COUNT = 2 };
static const char *const tile_names[TILE_COUNT] = {"4x6", "8x3"};

/* The avx512 tile: PYKD_DENSE_TILE, else by vendor (see the top). Both run
 * on any avx512 CPU, so pykd_path_get's "best runnable" default does not
 * apply. */
static int avx512_tile(void)
{
    static int cache = -1;
    int t = __atomic_load_n(&cache, __ATOMIC_ACQUIRE);
    if (t < 0) {
        const char *want = getenv("PYKD_DENSE_TILE");
        __builtin_cpu_init();
        t = __builtin_cpu_is("intel") ? TILE_8X3 : TILE_4X6;
        for (int k = 0; want && k < TILE_COUNT; k++)
            if (strcmp(want, tile_names[k]) == 0) t = k;
        __atomic_store_n(&cache, t, __ATOMIC_RELEASE);
    }
    return t;
}

static int has_fma(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("fma");
}
#endif

/* The avx512 path's tile in this process ("4x6", "8x3"; "none" without
 * x86 SIMD), blank-padded to len characters. */
void pykd_f32_gemm_tile_name(char *name, int len)
{
#ifdef PYKD_X86
    pykd_path_name_fill(tile_names, avx512_tile(), name, len);
#else
    static const char *const none[1] = {"none"};
    pykd_path_name_fill(none, 0, name, len);
#endif
}

/* y = act(w x + b) for n samples; work: pykd_f32_gemm_words(n_in) floats
 * (the avx512 path's panel; work_words smaller: W is read by the avx2 path's
 * tiles instead, the same bits). act other than identity and relu: bias
 * only. */
void pykd_f32_gemm(int n_out, int n_in, int n, const float *w, const float *x, const float *b,
                   int act, float *y, float *work, long work_words)
{
    if (n <= 0 || n_out <= 0) return;
#ifdef PYKD_X86
    int p = pykd_f32_path();
    if (p == P_AVX512 && work && work_words >= pykd_f32_gemm_words(n_in)) {
        if (avx512_tile() == TILE_8X3)
            gemm_avx512_8x3(n_out, n_in, n, w, x, b, act, y, work);
        else
            gemm_avx512_4x6(n_out, n_in, n, w, x, b, act, y, work);
        return;
    }
    if (p >= P_AVX2 && has_fma()) {
        gemm_avx2(n_out, n_in, n, w, x, b, act, y);
        return;
    }
#endif
    (void)work;
    (void)work_words;
    gemm_portable(n_out, n_in, n, w, x, b, act, y);
}

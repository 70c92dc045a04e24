/* The int8 layer's product with run-time CPU dispatch (docs/performance.md).
 *
 * y(j, s) = (float)acc(j, s) * (scale[j] * sx[s]) + b[j],
 * acc(j, s) = sum_i q(j, i) * x(i, s), exact in int32.
 *
 * q is Fortran q(n_out, n_in) int8 (the model's buffer, read only, never
 * repacked); x is the quantized batch as int16, x(ldx, n) with ldx even and
 * x(n_in + 1, s) = 0 when n_in is odd, so inputs come in (i, i + 1) pairs.
 *
 * Every path multiplies int16 by int16 into int32 (127 * 127 and the pair
 * sums fit; never vpmaddubsw, which saturates), adds in int32, and rescales
 * with one float32 multiply and one add: no FMA on any path (this file is
 * built with -ffp-contract=off and no "fma" target), so all paths give the
 * same bits. Integer sums are exact, so their order does not matter.
 *
 * Paths: portable (plain C, any CPU), avx2 (vpmaddwd), avxvnni and
 * avx512vnni (the same kernel with vpdpwssd, the non-saturating form, on
 * 256-bit registers). PYKD_INT8_PATH=portable|avx2|avxvnni|avx512vnni forces
 * one when the CPU has it; otherwise the best one the CPU has runs.
 */
#pragma GCC optimize("fp-contract=off")
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pykd_cpu_path.h"

/* -DPYKD_NO_SIMD builds the portable path alone, as on a non-x86 CPU. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(PYKD_NO_SIMD)
#include <immintrin.h>
#define PYKD_X86 1
#endif

enum { P_PORTABLE = 0, P_AVX2 = 1, P_AVXVNNI = 2, P_AVX512VNNI = 3, P_COUNT = 4 };
static const char *const path_names[P_COUNT] = {"portable", "avx2", "avxvnni", "avx512vnni"};

/* Outputs per portable tile, and samples per tile on every path. */
#define TJ 16
#define TS 4

static int cpu_has(int p)
{
    if (p == P_PORTABLE) return 1;
#ifdef PYKD_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2")) return 0;
    if (p == P_AVX2) return 1;
    if (p == P_AVXVNNI) return __builtin_cpu_supports("avxvnni") != 0;
    if (p == P_AVX512VNNI)
        return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
#endif
    return 0;
}

/* Chosen once per process (PYKD_INT8_PATH forces a path). */
static int chosen = -1;

int pykd_i8_path(void)
{
    return pykd_path_get(&chosen, "PYKD_INT8_PATH", path_names, P_COUNT, cpu_has);
}

/* The path's name, blank padded to len (for Fortran). */
void pykd_i8_path_name(char *name, int len)
{
    pykd_path_name_fill(path_names, pykd_i8_path(), name, len);
}

/* pykd_codes: ACT_RELU = 1 (tests/test_codes.py checks it). */
#define ACT_RELU 1

/* raw(j, s) = acc for samples [0, S), outputs j .. j + r - 1 (pykd_i8_gemm). */
static inline void store_tile(int S, int r, const int32_t *acc, int lda, int32_t *raw,
                              ptrdiff_t ldr)
{
    for (int s = 0; s < S; s++) memcpy(raw + s * ldr, acc + s * lda, sizeof(int32_t) * r);
}

/* y for samples [0, S) of a tile: acc[s * lda + jj], outputs j .. j + r - 1;
 * with relu fused (z < 0 ? 0 : z keeps NaN and -0.0, as pykd_activation). */
static inline void rescale_tile(int S, int r, const int32_t *acc, int lda, const float *scale,
                                const float *sx, const float *b, int act, float *y, ptrdiff_t ldy)
{
    for (int s = 0; s < S; s++)
        for (int jj = 0; jj < r; jj++) {
            float m = scale[jj] * sx[s];
            float p = (float)acc[s * lda + jj] * m;
            float z = p + b[jj];
            y[s * ldy + jj] = (act == ACT_RELU && z < 0.0f) ? 0.0f : z;
        }
}

/* ---- portable: plain C, TS samples per pass over q ---------------------- */

static void portable_tile(int S, int r, const int8_t *q, ptrdiff_t ldq, int n_in,
                          const int16_t *x, ptrdiff_t ldx, int32_t acc[TS][TJ])
{
    memset(acc, 0, sizeof(int32_t) * TS * TJ);
    for (int i = 0; i < n_in; i++) {
        const int8_t *qi = q + (ptrdiff_t)i * ldq;
        for (int s = 0; s < S; s++) {
            int32_t xs = x[s * ldx + i];
            for (int jj = 0; jj < r; jj++) acc[s][jj] += (int32_t)qi[jj] * xs;
        }
    }
}

static void portable_range(int n_out, int n_in, const int8_t *q, const int16_t *x, ptrdiff_t ldx,
                           int s0, int s1, int j0, int j1, const float *scale, const float *sx,
                           const float *b, int act, float *y, int32_t *raw)
{
    int32_t acc[TS][TJ];
    for (int s = s0; s < s1; s += TS) {
        int S = s1 - s < TS ? s1 - s : TS;
        for (int j = j0; j < j1; j += TJ) {
            int r = j1 - j < TJ ? j1 - j : TJ;
            portable_tile(S, r, q + j, n_out, n_in, x + (ptrdiff_t)s * ldx, ldx, acc);
            if (raw)
                store_tile(S, r, &acc[0][0], TJ, raw + (ptrdiff_t)s * n_out + j, n_out);
            else
                rescale_tile(S, r, &acc[0][0], TJ, scale + j, sx + s, b + j, act,
                             y + (ptrdiff_t)s * n_out + j, n_out);
        }
    }
}

/* Leading inputs i (an even count, or n_in) whose reads of `width` bytes at
 * q(j + 1, i) stay inside q: the rest go through a zero-padded copy. */
static inline int safe_inputs(int n_out, int n_in, int j, int width)
{
    if (j + width <= n_out) return n_in;
    ptrdiff_t room = (ptrdiff_t)n_out * n_in - j - width;
    if (room < 0) return 0;
    ptrdiff_t k = room / n_out + 1;
    return (int)(k < n_in ? k : n_in) & ~1;
}

#ifdef PYKD_X86
/* ---- x86: one kernel, three multiply-adds -------------------------------
 * A tile: NJ x 16 outputs x S samples (NJ x S <= 4: 8 accumulators). For an
 * input pair (i, i + 1) the two 16-byte pieces of q are sign-extended to
 * int16 and interleaved, so each 32-bit lane holds (q(j, i), q(j, i + 1));
 * the sample's (x(i), x(i + 1)) is one broadcast 32-bit word. unpacklo/hi
 * work per 128-bit lane: lo holds outputs 0-3 and 8-11, hi 4-7 and 12-15;
 * the store puts them back in order. Lanes past the last output read bytes
 * of the next column (never past q, see safe_inputs) and are not stored.
 * For small batches NJ > 1 uses a whole cache line of q per load. */
#define TJMAX 64
#define TAILK 32
#define JC 256   /* outputs per chunk: a multiple of 16 */
#define KB 96    /* inputs per block: even */

#define DEFINE_TILE(NAME, TARGET, MAC)                                                          \
    static inline __attribute__((always_inline, target(TARGET))) void NAME##_tile_k(           \
        const int NJ, const int S, const int8_t *q, ptrdiff_t ldq, int n_in, const int16_t *x,  \
        ptrdiff_t ldx, int32_t *acc, int lda)                                                   \
    {                                                                                           \
        __m256i lo[4][TS], hi[4][TS];                                                           \
        for (int c = 0; c < NJ; c++)                                                            \
            for (int s = 0; s < S; s++) lo[c][s] = hi[c][s] = _mm256_setzero_si256();           \
        int i = 0;                                                                              \
        for (; i + 1 < n_in; i += 2) {                                                          \
            const int8_t *qa = q + i * ldq, *qb = qa + ldq;                                     \
            for (int c = 0; c < NJ; c++) {                                                      \
                __m256i wa = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qa + 16 * c))); \
                __m256i wb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qb + 16 * c))); \
                __m256i wl = _mm256_unpacklo_epi16(wa, wb), wh = _mm256_unpackhi_epi16(wa, wb); \
                for (int s = 0; s < S; s++) {                                                   \
                    int32_t pair;                                                               \
                    memcpy(&pair, x + s * ldx + i, sizeof pair);                                \
                    __m256i xv = _mm256_set1_epi32(pair);                                       \
                    lo[c][s] = MAC(lo[c][s], wl, xv);                                           \
                    hi[c][s] = MAC(hi[c][s], wh, xv);                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        if (i < n_in) { /* odd n_in: the partner weight is 0, x(n_in + 1) is 0 */               \
            const int8_t *qa = q + i * ldq;                                                     \
            __m256i z = _mm256_setzero_si256();                                                 \
            for (int c = 0; c < NJ; c++) {                                                      \
                __m256i wa = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qa + 16 * c))); \
                __m256i wl = _mm256_unpacklo_epi16(wa, z), wh = _mm256_unpackhi_epi16(wa, z);   \
                for (int s = 0; s < S; s++) {                                                   \
                    __m256i xv = _mm256_set1_epi32((int32_t)(uint16_t)x[s * ldx + i]);          \
                    lo[c][s] = MAC(lo[c][s], wl, xv);                                           \
                    hi[c][s] = MAC(hi[c][s], wh, xv);                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int s = 0; s < S; s++)                                                             \
            for (int c = 0; c < NJ; c++) { /* acc += the outputs, in order */                   \
                __m256i *a = (__m256i *)(acc + s * lda + 16 * c);                               \
                __m256i o0 = _mm256_permute2x128_si256(lo[c][s], hi[c][s], 0x20);               \
                __m256i o1 = _mm256_permute2x128_si256(lo[c][s], hi[c][s], 0x31);               \
                _mm256_storeu_si256(a, _mm256_add_epi32(_mm256_loadu_si256(a), o0));            \
                _mm256_storeu_si256(a + 1, _mm256_add_epi32(_mm256_loadu_si256(a + 1), o1));    \
            }                                                                                   \
    }                                                                                           \
    /* acc += the tile's product; NJ and S are constants in each call. */                       \
    static __attribute__((target(TARGET))) void NAME##_tile(int NJ, int S, const int8_t *q,     \
        ptrdiff_t ldq, int n_in, const int16_t *x, ptrdiff_t ldx, int32_t *acc, int lda)        \
    {                                                                                           \
        switch (NJ * 8 + S) {                                                                   \
        case 4 * 8 + 1: NAME##_tile_k(4, 1, q, ldq, n_in, x, ldx, acc, lda); break;                  \
        case 3 * 8 + 1: NAME##_tile_k(3, 1, q, ldq, n_in, x, ldx, acc, lda); break;                  \
        case 2 * 8 + 1: NAME##_tile_k(2, 1, q, ldq, n_in, x, ldx, acc, lda); break;                  \
        case 2 * 8 + 2: NAME##_tile_k(2, 2, q, ldq, n_in, x, ldx, acc, lda); break;                  \
        case 1 * 8 + 2: NAME##_tile_k(1, 2, q, ldq, n_in, x, ldx, acc, lda); break;                  \
        case 1 * 8 + 3: NAME##_tile_k(1, 3, q, ldq, n_in, x, ldx, acc, lda); break;                  \
        case 1 * 8 + 4: NAME##_tile_k(1, 4, q, ldq, n_in, x, ldx, acc, lda); break;                  \
        default: NAME##_tile_k(1, 1, q, ldq, n_in, x, ldx, acc, lda); break;                         \
        }                                                                                       \
    }                                                                                           \
    /* Samples in blocks of TS, outputs in chunks of JC (acc on the stack),   \
     * inputs in blocks of KB: a block of q (KB x JC bytes) stays in L1 while   \
     * every tile of the chunk uses it. */                                      \
    static __attribute__((target(TARGET))) void NAME##_range(int n_out, int n_in,               \
        const int8_t *q, const int16_t *x, ptrdiff_t ldx, int s0, int s1, int j0, int j1,       \
        const float *scale, const float *sx, const float *b, int act, float *y, int32_t *raw)   \
    {                                                                                           \
        int32_t acc[TS * JC];                                                                   \
        int8_t panel[TAILK * TJMAX];                                                            \
        for (int s = s0; s < s1; s += TS) {                                                     \
            int S = s1 - s < TS ? s1 - s : TS;                                                  \
            int nj_max = S == 1 ? 4 : S == 2 ? 2 : 1;                                           \
            const int16_t *xs = x + (ptrdiff_t)s * ldx;                                         \
            for (int jc = j0; jc < j1; jc += JC) {                                              \
                int jc1 = j1 - jc < JC ? j1 : jc + JC;                                          \
                memset(acc, 0, sizeof(int32_t) * TS * JC);                                      \
                for (int k0 = 0; k0 < n_in; k0 += KB) {                                         \
                    int nk = n_in - k0 < KB ? n_in - k0 : KB;                                   \
                    for (int j = jc; j < jc1;) {                                                \
                        int nj = (jc1 - j + 15) / 16;                                           \
                        if (nj > nj_max) nj = nj_max;                                           \
                        int width = 16 * nj, r = jc1 - j < width ? jc1 - j : width;             \
                        int n_safe = safe_inputs(n_out, n_in, j, width) - k0;                   \
                        n_safe = n_safe < 0 ? 0 : n_safe > nk ? nk : n_safe;                    \
                        int32_t *a = acc + (j - jc);                                            \
                        if (n_safe > 0)                                                         \
                            NAME##_tile(nj, S, q + (ptrdiff_t)k0 * n_out + j, n_out, n_safe,    \
                                        xs + k0, ldx, a, JC);                                   \
                        for (int k = n_safe; k < nk; k += TAILK) { /* the last few inputs */   \
                            int nt = nk - k < TAILK ? nk - k : TAILK;                           \
                            memset(panel, 0, (size_t)width * nt);                               \
                            for (int i = 0; i < nt; i++)                                        \
                                memcpy(panel + i * width,                                       \
                                       q + (ptrdiff_t)(k0 + k + i) * n_out + j, r);             \
                            NAME##_tile(nj, S, panel, width, nt, xs + k0 + k, ldx, a, JC);      \
                        }                                                                       \
                        j += width;                                                             \
                    }                                                                           \
                }                                                                               \
                if (raw)                                                                \
                    store_tile(S, jc1 - jc, acc, JC, raw + (ptrdiff_t)s * n_out + jc, n_out);   \
                else                                                                            \
                    rescale_tile(S, jc1 - jc, acc, JC, scale + jc, sx + s, b + jc, act,         \
                                 y + (ptrdiff_t)s * n_out + jc, n_out);                         \
            }                                                                                   \
        }                                                                                       \
    }

#define MAC_AVX2(acc, w, x) _mm256_add_epi32((acc), _mm256_madd_epi16((w), (x)))
#define MAC_AVXVNNI(acc, w, x) _mm256_dpwssd_avx_epi32((acc), (w), (x))
#define MAC_AVX512VNNI(acc, w, x) _mm256_dpwssd_epi32((acc), (w), (x))

DEFINE_TILE(avx2, "avx2", MAC_AVX2)
DEFINE_TILE(avxvnni, "avx2,avxvnni", MAC_AVXVNNI)
DEFINE_TILE(avx512vnni, "avx2,avx512f,avx512vl,avx512vnni", MAC_AVX512VNNI)
#endif

/* The product, rescale and bias for samples [s0, s1) and outputs [j0, j1)
 * (0-based, half open), on the chosen path; act == ACT_RELU fuses the relu
 * (any other code: the caller applies its activation). Threads call it on
 * disjoint ranges; it reads q, x, scale, sx, b and writes only its part of y. */
static void dense_or_raw(int path, int n_out, int n_in, const int8_t *q, const int16_t *x,
                         int ldx, int s0, int s1, int j0, int j1, const float *scale,
                         const float *sx, const float *b, int act, float *y, int32_t *raw)
{
    switch (path) {
#ifdef PYKD_X86
    case P_AVX2:
        avx2_range(n_out, n_in, q, x, ldx, s0, s1, j0, j1, scale, sx, b, act, y, raw);
        return;
    case P_AVXVNNI:
        avxvnni_range(n_out, n_in, q, x, ldx, s0, s1, j0, j1, scale, sx, b, act, y, raw);
        return;
    case P_AVX512VNNI:
        avx512vnni_range(n_out, n_in, q, x, ldx, s0, s1, j0, j1, scale, sx, b, act, y, raw);
        return;
#endif
    default:
        portable_range(n_out, n_in, q, x, ldx, s0, s1, j0, j1, scale, sx, b, act, y, raw);
    }
}

void pykd_i8_dense(int path, int n_out, int n_in, const int8_t *q, const int16_t *x, int ldx,
                   int s0, int s1, int j0, int j1, const float *scale, const float *sx,
                   const float *b, int act, float *y)
{
    dense_or_raw(path, n_out, n_in, q, x, ldx, s0, s1, j0, j1, scale, sx, b, act, y, NULL);
}

/* The exact int32 sums alone, raw(j, s) for the same ranges (pykd.int8_gemm):
 * the same tiles, stored instead of rescaled. Any int8 q and x (-128 too):
 * a vpmaddwd pair sums to at most 2 * 128 * 128. */
void pykd_i8_gemm(int path, int n_out, int n_in, const int8_t *q, const int16_t *x, int ldx,
                  int s0, int s1, int j0, int j1, int32_t *raw)
{
    dense_or_raw(path, n_out, n_in, q, x, ldx, s0, s1, j0, j1, NULL, NULL, NULL, 0, NULL, raw);
}

/* The sparse layers' C helpers (pykd_sparse_kernel.f90), with a run-time
 * choice of path: portable, avx2, avx512 (F, BW, VL); PYKD_SPARSE_PATH
 * forces one the CPU has.
 *
 * - The panel kernel's transposes: gfortran turns a transpose into one load
 *   and one store per element (1.5 ns each on Zen 3, a third of a
 *   90%-sparse 784 x 200 product at batch 256); avx2 and avx512 do 8 x 8
 *   tiles with AVX2 shuffles.
 * - The CSR pattern check that runs before every product (on Zen 5 it took
 *   a third of a 90%-sparse 784 x 200 batch-1 call as a Fortran loop):
 *   avx512 tests 16 indices per instruction.
 * - The one-sample product (scatter, the same on every path): y[c] =
 *   y[c] + x[i] * w over the entries of the rows with x[i] != 0, inputs
 *   ascending, one multiply and one add per entry (no FMA: this file is
 *   built with -ffp-contract=off), exactly the panel kernel's order.
 * - The one-sample product on sparse_csr's planes (the derived layout of
 *   pykd_sparse_kernel.f90, docs/model.md): avx512 keeps 13 blocks of 16
 *   outputs in zmm registers and does each plane as one vpermt2ps of the
 *   32-input chunk, one multiply and one add; the other paths the same
 *   terms in the same order in scalar code. Empty lanes add x * 0 = +-0,
 *   which leaves every sum unchanged (a sum of +0 and products is never
 *   -0), so the planes give the scatter's bits.
 *   The call (pykd_sp_planes_run) is the layer's whole batch-1 path but a
 *   transcendental activation: the plane counts summed (avx512: vpsadbw)
 *   and compared with the table's before anything is read, x tested for
 *   NaN/inf on the chunks as they are loaded, b added and relu applied as
 *   the outputs are stored (exact per element: the same bits).
 * Only data moves, or each entry is one multiply and one add on every
 * path: every path gives the same bits and the same verdict.
 * -DPYKD_NO_SIMD builds the portable path alone. */
#pragma GCC optimize("fp-contract=off")
#include <stddef.h>
#include <stdint.h>

#include "pykd_cpu_path.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(PYKD_NO_SIMD)
#define PYKD_SP_X86 1
#include <immintrin.h>
#endif

enum { P_PORTABLE = 0, P_AVX2 = 1, P_AVX512 = 2, P_COUNT = 3 };
static const char *const path_names[P_COUNT] = {"portable", "avx2", "avx512"};

static int cpu_has(int p)
{
    if (p == P_PORTABLE) return 1;
#ifdef PYKD_SP_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2")) return 0;
    if (p == P_AVX2) return 1;
    if (p == P_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
#endif
    return 0;
}

static int chosen = -1;

static int sp_path(void)
{
    return pykd_path_get(&chosen, "PYKD_SPARSE_PATH", path_names, P_COUNT, cpu_has);
}

/* The path's name, blank padded to len (for Fortran). */
void pykd_sp_path_name(char *name, int len)
{
    pykd_path_name_fill(path_names, sp_path(), name, len);
}

/* ---- transposes ----------------------------------------------------------- */

/* b(j, i) = a(i, j) for i < rows, j < cols; column-major, leading
 * dimensions lda >= rows and ldb >= cols. */
static void transpose_portable(const float *a, int lda, float *b, int ldb, int rows, int cols)
{
    for (int j = 0; j < cols; j++)
        for (int i = 0; i < rows; i++)
            b[j + (size_t)i * ldb] = a[i + (size_t)j * lda];
}

#ifdef PYKD_SP_X86
__attribute__((target("avx2")))
static void transpose_avx2(const float *a, int lda, float *b, int ldb, int rows, int cols)
{
    int r8 = rows & ~7, c8 = cols & ~7;
    for (int j = 0; j < c8; j += 8) {
        for (int i = 0; i < r8; i += 8) {
            const float *p = a + i + (size_t)j * lda;
            __m256 r0 = _mm256_loadu_ps(p), r1 = _mm256_loadu_ps(p + lda);
            __m256 r2 = _mm256_loadu_ps(p + 2 * (size_t)lda), r3 = _mm256_loadu_ps(p + 3 * (size_t)lda);
            __m256 r4 = _mm256_loadu_ps(p + 4 * (size_t)lda), r5 = _mm256_loadu_ps(p + 5 * (size_t)lda);
            __m256 r6 = _mm256_loadu_ps(p + 6 * (size_t)lda), r7 = _mm256_loadu_ps(p + 7 * (size_t)lda);
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *q = b + j + (size_t)i * ldb;
            _mm256_storeu_ps(q, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(q + ldb, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(q + 2 * (size_t)ldb, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(q + 3 * (size_t)ldb, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(q + 4 * (size_t)ldb, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(q + 5 * (size_t)ldb, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(q + 6 * (size_t)ldb, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(q + 7 * (size_t)ldb, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
    }
    /* The edges: rows past r8 in every column, columns past c8 in every row. */
    for (int j = 0; j < cols; j++)
        for (int i = (j < c8 ? r8 : 0); i < rows; i++)
            b[j + (size_t)i * ldb] = a[i + (size_t)j * lda];
}
#endif

void pykd_sp_transpose(const float *a, const int *lda, float *b, const int *ldb,
                       const int *rows, const int *cols)
{
#ifdef PYKD_SP_X86
    if (sp_path() >= P_AVX2) {
        transpose_avx2(a, *lda, b, *ldb, *rows, *cols);
        return;
    }
#endif
    transpose_portable(a, *lda, b, *ldb, *rows, *cols);
}

/* ---- the pattern check ---------------------------------------------------- */

/* Valid: indptr[0] = 0, non-decreasing, indptr[n_in] = nnz; indices in
 * [0, n_out) and strictly increasing within a row. Counted as the
 * neighbours k - 1, k with indices[k] <= indices[k - 1], less those where
 * k starts a (non-empty) row; the range as unsigned (a negative index is
 * >= n_out). */
static int starts_bad(int n_in, int64_t nnz, const int32_t *indptr, const int32_t *idx)
{
    int32_t bad = 0;
    if (nnz < 2) return 0;
    for (int i = 1; i < n_in; i++) {   /* without a branch: k clamped into [1, nnz) */
        int32_t k = indptr[i], kk = k < 1 ? 1 : k >= nnz ? (int32_t)(nnz - 1) : k;
        bad += (k >= 1) & (k < indptr[i + 1]) & (idx[kk] <= idx[kk - 1]);
    }
    return bad;   /* at most n_in */
}

static int pattern_portable(int n_in, int n_out, int64_t nnz, const int32_t *indptr,
                            const int32_t *idx)
{
    int down = 0, over = 0;
    for (int i = 0; i < n_in; i++) down |= indptr[i + 1] < indptr[i];
    if (down) return 0;
    /* int32 counts (nnz < 2^31) and plain compares: gcc vectorizes this */
    int32_t bad = 0;
    if (nnz > 0) over = idx[0] < 0 || idx[0] >= n_out;
    for (int64_t k = 1; k < nnz; k++) {
        over |= (idx[k] < 0) | (idx[k] >= n_out);
        bad += idx[k] <= idx[k - 1];
    }
    if (over) return 0;
    return bad == starts_bad(n_in, nnz, indptr, idx);
}

#ifdef PYKD_SP_X86
#define TGT5 __attribute__((target("avx2,avx512f,avx512bw,avx512vl,popcnt")))

static inline __attribute__((always_inline)) TGT5 __mmask16 tail16(int64_t left)
{
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* Full blocks of 16 unmasked (one load each: 64-byte loads at idx + k - 1
 * and idx + k both split cache lines), the tail masked once; the unsigned maximum
 * of the indices (a negative one is huge) and the count of non-increasing
 * neighbours in vector registers. */
static TGT5 int pattern_avx512(int n_in, int n_out, int64_t nnz, const int32_t *indptr,
                               const int32_t *idx)
{
    __mmask16 down = 0;
    for (int i = 0; i < n_in; i += 16) {   /* indptr[i + 1] < indptr[i], i < n_in */
        __mmask16 m = tail16(n_in - i);
        __m512i a = _mm512_maskz_loadu_epi32(m, indptr + i), b = _mm512_maskz_loadu_epi32(m, indptr + i + 1);
        down |= _mm512_mask_cmplt_epi32_mask(m, b, a);
    }
    if (down) return 0;
    if (nnz == 0) return 1;
    const __m512i one = _mm512_set1_epi32(1);
    __m512i top = _mm512_set1_epi32(idx[0]), badv = _mm512_setzero_si512();
    __m512i prev = _mm512_set1_epi32(idx[0]);   /* lane 15: idx[k - 1] */
    int64_t k = 1;
    for (; k + 16 <= nnz; k += 16) {   /* idx[k] <= idx[k - 1]; one load, the shifted copy by valignd */
        __m512i b = _mm512_loadu_si512(idx + k), a = _mm512_alignr_epi32(b, prev, 15);
        top = _mm512_max_epu32(top, b);
        badv = _mm512_mask_add_epi32(badv, _mm512_cmple_epi32_mask(b, a), badv, one);
        prev = b;
    }
    if (k < nnz) {
        __mmask16 m = tail16(nnz - k);
        __m512i a = _mm512_maskz_loadu_epi32(m, idx + k - 1), b = _mm512_maskz_loadu_epi32(m, idx + k);
        top = _mm512_max_epu32(top, b);   /* masked lanes are 0 */
        badv = _mm512_mask_add_epi32(badv, _mm512_mask_cmple_epi32_mask(m, b, a), badv, one);
    }
    if ((uint32_t)_mm512_reduce_max_epu32(top) >= (uint32_t)n_out) return 0;
    /* each lane counts at most nnz / 16 + 1 < 2^31: the sum fits */
    return _mm512_reduce_add_epi32(badv) == starts_bad(n_in, nnz, indptr, idx);
}
#endif

/* 1 if the pattern (0-based CSR, rows = inputs) is valid, else 0. */
int pykd_sp_pattern_ok(int n_in, int n_out, int64_t nnz, const int32_t *indptr,
                       const int32_t *indices)
{
    if (indptr[0] != 0 || indptr[n_in] != nnz) return 0;
#ifdef PYKD_SP_X86
    if (sp_path() == P_AVX512) return pattern_avx512(n_in, n_out, nnz, indptr, indices);
#endif
    return pattern_portable(n_in, n_out, nnz, indptr, indices);
}

/* ---- one sample ------------------------------------------------------------ */

static inline float entry(const float *values, const uint8_t *codes, const float *cent,
                          int use_codes, int32_t k)
{
    return use_codes ? cent[codes[k]] : values[k];
}

/* The plain loop: on Zen 5 it ran at ~1.8 cycles per entry (instruction
 * bound, 7 per entry); listing the rows with x[i] != 0 first without a
 * branch, or an avx512 multiply of 16 entries before the scalar adds, or
 * vgatherdps/vscatterdps, were all slower (0.8-2x the time). */
static void scatter_plain(int n_in, const int32_t *indptr, const int32_t *idx,
                          const float *values, const uint8_t *codes, const float *cent,
                          int use_codes, const float *x, float *y)
{
    for (int i = 0; i < n_in; i++) {
        float xi = x[i];
        if (xi == 0.0f) continue;
        for (int32_t k = indptr[i]; k < indptr[i + 1]; k++)
            y[idx[k]] = y[idx[k]] + xi * entry(values, codes, cent, use_codes, k);
    }
}

/* y (n_out, zeroed by the caller) += the entries of the rows with x[i] != 0
 * times x[i]: values[k], or cent[codes[k]] when use_codes. A valid pattern
 * (pykd_sp_pattern_ok) and codes (< the number of centroids). */
void pykd_sp_scatter(int n_in, const int32_t *indptr, const int32_t *indices, const float *values,
                     const uint8_t *codes, const float *cent, int use_codes, const float *x,
                     float *y)
{
    if (use_codes)
        scatter_plain(n_in, indptr, indices, values, codes, cent, 1, x, y);
    else
        scatter_plain(n_in, indptr, indices, values, codes, cent, 0, x, y);
}

/* ---- one sample on the planes ------------------------------------------ */

enum { PL_LANES = 16, PL_CHUNK = 32, PL_GROUP = 13 };

/* The planes of all the cells (n_cells counts): what the kernel will read. */
int64_t pykd_sp_planes_total(int64_t n_cells, const uint8_t *counts)
{
    int64_t t = 0;
    for (int64_t k = 0; k < n_cells; k++) t += counts[k];
    return t;
}

/* y[j] = sum over the planes of x[32 c + idx] * val, in the planes' order:
 * groups of PL_GROUP blocks, chunks ascending, the group's blocks
 * ascending, the cell's planes in order. */
static void planes_portable(int n_in, int n_out, const uint8_t *cnt, const uint8_t *ix,
                            const float *val, const float *x, float *y)
{
    int nb = (n_out + PL_LANES - 1) / PL_LANES, nc = (n_in + PL_CHUNK - 1) / PL_CHUNK;
    float xc[PL_CHUNK];
    for (int j = 0; j < n_out; j++) y[j] = 0.0f;
    for (int g0 = 0; g0 < nb; g0 += PL_GROUP) {
        int g1 = g0 + PL_GROUP < nb ? g0 + PL_GROUP : nb;
        for (int c = 0; c < nc; c++) {
            int w = n_in - PL_CHUNK * c < PL_CHUNK ? n_in - PL_CHUNK * c : PL_CHUNK;
            for (int i = 0; i < PL_CHUNK; i++) xc[i] = i < w ? x[PL_CHUNK * c + i] : 0.0f;
            for (int b = g0; b < g1; b++) {
                float *yb = y + PL_LANES * b;
                int lanes = n_out - PL_LANES * b < PL_LANES ? n_out - PL_LANES * b : PL_LANES;
                for (int l = *cnt++; l > 0; l--) {
                    for (int t = 0; t < lanes; t++)
                        yb[t] = yb[t] + xc[ix[t] & (PL_CHUNK - 1)] * val[t];
                    ix += PL_LANES;
                    val += PL_LANES;
                }
            }
        }
    }
}

#ifdef PYKD_SP_X86
/* How far ahead (floats of val: 32 planes, 2 KiB) the plane loop asks for
 * the values. The hardware prefetcher alone kept the 784 x 200 layer's
 * 162 KB of planes at ~23 B/cycle from L2 (2.58 us on Intel model 207);
 * with this 2.12 us. 512 B to 4 KiB ahead all did as well; the indices'
 * own prefetch (a fifth of the bytes) gained nothing. A prefetch past the
 * end never faults. */
enum { PL_AHEAD = 512 };

/* One block's planes of the cell: acc += x[idx] * val (vpermt2ps reads the
 * low 5 bits of each index: any byte stays inside the chunk). */
#define PL_BLOCK(B)                                                                      \
    if (B < nbg) {                                                                      \
        for (int l = *cnt++; l > 0; l--) {                                              \
            _mm_prefetch((const char *)(val + PL_AHEAD), _MM_HINT_T0);                  \
            __m512i id = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)ix));    \
            __m512 p = _mm512_permutex2var_ps(xlo, id, xhi);                            \
            a##B = _mm512_add_ps(a##B, _mm512_mul_ps(p, _mm512_loadu_ps(val)));        \
            ix += PL_LANES;                                                             \
            val += PL_LANES;                                                            \
        }                                                                               \
    }
#define PL_STORE(B)                                                                      \
    if (B < nbg) {                                                                      \
        int j = PL_LANES * (g0 + B), left = n_out - j;                                  \
        __mmask16 m = tail16(left);                                                     \
        __m512 z = _mm512_add_ps(a##B, _mm512_maskz_loadu_ps(m, bias + j));             \
        if (relu)                                                                       \
            z = _mm512_mask_mov_ps(z, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), \
                                   _mm512_setzero_ps());                                \
        _mm512_mask_storeu_ps(y + j, m, z);                                             \
    }

/* The sum of n bytes, 64 at a time by vpsadbw (~10 ns for the 784 x 200
 * layer's 325 counts, against 160 ns for the byte loop). */
static TGT5 int64_t bytes_sum_avx512(int64_t n, const uint8_t *c)
{
    __m512i acc = _mm512_setzero_si512();
    const __m512i zero = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= n; k += 64)
        acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_loadu_si512(c + k), zero));
    if (k < n) {
        __mmask64 m = (__mmask64)-1 >> (64 - (n - k));
        acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_maskz_loadu_epi8(m, c + k), zero));
    }
    return _mm512_reduce_add_epi64(acc);
}

/* The lanes of v that are NaN or +-inf: |v| > FLT_MAX, unordered. */
static inline __attribute__((always_inline)) TGT5 __mmask16 nonfinite16(__m512 v)
{
    const __m512 big = _mm512_set1_ps(3.40282347e38f);
    __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF)));
    return _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
}

/* The planes with the group's 13 accumulators in registers (13 blocks of
 * 16 outputs: the 784-200 layer's 200 in one pass over x); a chunk of 32
 * zeros (or -0) is skipped: its terms are all +-0. On Zen 5 ~2 cycles per
 * plane, bound by L2 bandwidth (80 bytes per plane). Each output is stored
 * as acc + b[j], then max with 0 when relu (z < 0 -> 0: NaN and -0 kept,
 * as pykd_activation). Returns 1 when x has a NaN or inf (tested on the
 * chunks as they are loaded), else 0. */
static TGT5 int planes_avx512(int n_in, int n_out, const uint8_t *cnt, const uint8_t *ix,
                              const float *val, const float *x, const float *bias, int relu,
                              float *y)
{
    int nb = (n_out + PL_LANES - 1) / PL_LANES, nc = (n_in + PL_CHUNK - 1) / PL_CHUNK;
    __mmask16 bad = 0;
    for (int g0 = 0; g0 < nb; g0 += PL_GROUP) {
        int nbg = nb - g0 < PL_GROUP ? nb - g0 : PL_GROUP;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
               a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0, a12 = a0;
        for (int c = 0; c < nc; c++) {
            int64_t left = n_in - (int64_t)PL_CHUNK * c;
            __m512 xlo = _mm512_maskz_loadu_ps(tail16(left), x + PL_CHUNK * c);
            __m512 xhi = _mm512_maskz_loadu_ps(left > 16 ? tail16(left - 16) : 0,
                                               x + PL_CHUNK * c + 16);
            const __m512 zero = _mm512_setzero_ps();
            bad |= nonfinite16(xlo) | nonfinite16(xhi);
            if (!(_mm512_cmpneq_ps_mask(xlo, zero) | _mm512_cmpneq_ps_mask(xhi, zero))) {
                for (int b = 0; b < nbg; b++) {
                    ix += PL_LANES * (size_t)cnt[b];
                    val += PL_LANES * (size_t)cnt[b];
                }
                cnt += nbg;
                continue;
            }
            PL_BLOCK(0) PL_BLOCK(1) PL_BLOCK(2) PL_BLOCK(3) PL_BLOCK(4) PL_BLOCK(5) PL_BLOCK(6)
            PL_BLOCK(7) PL_BLOCK(8) PL_BLOCK(9) PL_BLOCK(10) PL_BLOCK(11) PL_BLOCK(12)
        }
        PL_STORE(0) PL_STORE(1) PL_STORE(2) PL_STORE(3) PL_STORE(4) PL_STORE(5) PL_STORE(6)
        PL_STORE(7) PL_STORE(8) PL_STORE(9) PL_STORE(10) PL_STORE(11) PL_STORE(12)
    }
    return bad != 0;
}
#undef PL_BLOCK
#undef PL_STORE
#endif

/* One sample on the planes, the whole layer but a transcendental
 * activation: y (n_out) = (the product of x (n_in) with the planes: counts
 * (n_cells = pykd_sp_planes_total's), idx and val (16 per plane)) + b,
 * then max(y, 0) when relu. Returns 0; 1 when x has a NaN or inf (y is
 * then all NaN, without b or relu: the caller finishes it as any other
 * kernel's); 2 when the counts do not add up to n_planes (nothing read
 * past them, y untouched): so no per-call pass of its own over x or the
 * counts. Every path gives the same bits (the same terms and order; +b
 * and the max are exact per element). */
int pykd_sp_planes_run(int n_in, int n_out, int64_t n_cells, int64_t n_planes, const uint8_t *counts,
                       const uint8_t *idx, const float *val, const float *x, const float *b,
                       int relu, float *y)
{
    int bad = 0;
#ifdef PYKD_SP_X86
    if (sp_path() == P_AVX512) {
        if (bytes_sum_avx512(n_cells, counts) != n_planes) return 2;
        bad = planes_avx512(n_in, n_out, counts, idx, val, x, b, relu, y);
    } else
#endif
    {
        if (pykd_sp_planes_total(n_cells, counts) != n_planes) return 2;
        for (int i = 0; i < n_in; i++) bad |= !(x[i] - x[i] == 0.0f);   /* NaN for NaN and inf */
        planes_portable(n_in, n_out, counts, idx, val, x, y);
        for (int j = 0; j < n_out; j++) {
            float z = y[j] + b[j];
            y[j] = relu && z < 0.0f ? 0.0f : z;
        }
    }
    if (bad) {
        const union { uint32_t u; float f; } qnan = {0x7FC00000u};
        for (int j = 0; j < n_out; j++) y[j] = qnan.f;
        return 1;
    }
    return 0;
}

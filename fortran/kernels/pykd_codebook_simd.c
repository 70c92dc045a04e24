/* The codebook layer's product with run-time CPU dispatch (docs/performance.md,
 * "Codebook layers").
 *
 * y(j, s) = act(acc(j, s) + b[j]),  acc(j, s) = sum_i W[i, j] x(i, s),
 * W[i, j] = tab[index(i n_out + j)], the indices packed `bits` (1, 2, 4, 8)
 * to a weight, least significant bit first (docs/format.md, "Bit streams").
 *
 * The packed indices are read in place (the model's buffer, never repacked).
 * One summation order everywhere: acc(j, s) = fma(W[i, j], x(i, s), acc)
 * for i = 0, 1, ..., n_in - 1 in turn, starting from +0, then one add of
 * b[j]. Every path (portable C with fmaf, avx2 with vfmadd) and every batch
 * size and thread split runs exactly that, so all give the same bits (this
 * file is built with -ffp-contract=off; the only multiply-adds are the
 * explicit fused ones). NaN and inf in x propagate as IEEE arithmetic does,
 * as in the dense product.
 *
 * The table has 2^bits entries (256 for 8 bits): the centroids, then NaN.
 * An index >= n_codes (a corrupt buffer) so gives NaN outputs and never
 * reads out of bounds; the caller looks for bad indices only when the
 * returned flag says an output before the activation was NaN.
 *
 * Paths: portable (plain C, any CPU, aarch64 included), avx2 (AVX2 + FMA)
 * and avx512 (F, BW, DQ, VL; described at its code below).
 * PYKD_CODEBOOK_PATH=portable|avx2|avx512 forces one when the CPU has it.
 *
 * avx2 decodes 8 weights into a register: 1 bit: vpsllvd moves each bit to
 * the sign and vblendvps picks centroid 0 or 1; 2 bits: vpsrlvd and one
 * vpermps on an 8-entry table (entry k = centroid k & 3, so the bits above
 * the index need no mask); 4 bits: vpsrlvd, two vpermps (codes 0-7, 8-15)
 * and a vblendvps on bit 3 (vpsllvd to the sign); 8 bits: vpmovzxbd and
 * vgatherdps on the 256-entry table. Small batches (n <= SMALL_N) multiply
 * those registers straight into the accumulators (8 vectors x 1 sample, 4
 * x 2, ...); larger ones decode a panel of KC x JB weights into an L1
 * buffer once and run a 16-output x 6-sample FMA microkernel over it.
 */
#pragma GCC optimize("fp-contract=off")
/* No memcpy/memset calls made up from loops: a call inside a kernel's loop
 * makes gcc keep the accumulators in memory. */
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#include <math.h>
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

enum { P_PORTABLE = 0, P_AVX2 = 1, P_AVX512 = 2, P_COUNT = 3 };
static const char *const path_names[P_COUNT] = {"portable", "avx2", "avx512"};

static int cpu_has(int p)
{
    if (p == P_PORTABLE) return 1;
#ifdef PYKD_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
    if (p == P_AVX2) return 1;
    if (p == P_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
    return 0;
}

/* Chosen once per process (PYKD_CODEBOOK_PATH forces a path). */
static int chosen = -1;

int pykd_cb_path(void)
{
    return pykd_path_get(&chosen, "PYKD_CODEBOOK_PATH", path_names, P_COUNT, cpu_has);
}

/* The path's name, blank padded to len (for Fortran). */
void pykd_cb_path_name(char *name, int len)
{
    pykd_path_name_fill(path_names, pykd_cb_path(), name, len);
}

/* One layer's read-only data. */
typedef struct {
    int bits, n_codes, n_in, n_out, relu;
    const uint8_t *packed;
    int64_t nbytes;
    const float *tab; /* 2^bits entries */
    const float *b;
} cb_layer;

/* y = act(acc + b) for one output; returns 1 if acc + b is NaN. */
static inline int finish(float acc, float b, int relu, float *y)
{
    float v = acc + b;
    *y = relu && v < 0.0f ? 0.0f : v;
    return v != v;
}

/* ---- portable: plain C, PS samples x PJ outputs per pass ---------------- */

#define PJ 64
#define PS 4

static inline unsigned get_index(const cb_layer *L, int64_t e)
{
    int64_t t = e * L->bits;
    return (unsigned)(L->packed[t >> 3] >> (t & 7)) & ((1u << L->bits) - 1u);
}

static int portable_range(const cb_layer *L, const float *x, ptrdiff_t ldx, int s0, int s1,
                          int j0, int j1, float *y)
{
    float w[PJ], acc[PS][PJ];
    int nan = 0;
    for (int s = s0; s < s1; s += PS) {
        int S = s1 - s < PS ? s1 - s : PS;
        for (int j = j0; j < j1; j += PJ) {
            int r = j1 - j < PJ ? j1 - j : PJ;
            memset(acc, 0, sizeof acc);
            for (int i = 0; i < L->n_in; i++) {
                int64_t e = (int64_t)i * L->n_out + j;
                for (int jj = 0; jj < r; jj++) w[jj] = L->tab[get_index(L, e + jj)];
                for (int ss = 0; ss < S; ss++) {
                    float xs = x[(ptrdiff_t)(s + ss) * ldx + i];
                    for (int jj = 0; jj < r; jj++) acc[ss][jj] = fmaf(w[jj], xs, acc[ss][jj]);
                }
            }
            for (int ss = 0; ss < S; ss++)
                for (int jj = 0; jj < r; jj++)
                    nan |= finish(acc[ss][jj], L->b[j + jj], L->relu,
                                  y + (ptrdiff_t)(s + ss) * L->n_out + j + jj);
        }
    }
    return nan;
}

#ifdef PYKD_X86
/* ---- avx2 ---------------------------------------------------------------- */

#define TGT __attribute__((target("avx2,fma")))
#define INL static inline __attribute__((always_inline, target("avx2,fma")))

#define SMALL_N 4  /* batches up to this decode into registers */
#define SPAN 64    /* bytes a row segment of 64 weights may read (8 bits) */
#define KC 256     /* panel: input rows */
#define JB 16      /* panel: outputs, a multiple of 16 (KC x JB floats = 16 KiB, in L1) */
#define MS 6       /* microkernel: samples */

/* Tables and shift counts for one layer, in registers. */
typedef struct {
    __m256 t0, t1;         /* 2 bits: tab[k & 3]; 4 bits: codes 0-7, 8-15; 1 bit: tab[0], tab[1] */
    __m256i sr[4], sl[4];  /* per-group shift counts */
    const float *tab;
} cb_regs;

INL void make_regs(const cb_layer *L, cb_regs *R)
{
    const float *t = L->tab;
    R->tab = t;
    #pragma GCC unroll 16
    for (int h = 0; h < 4; h++) {
        int sr[8], sl[8];
        #pragma GCC unroll 16
        for (int d = 0; d < 8; d++) {
            if (L->bits == 1) { sr[d] = 0; sl[d] = 31 - 8 * h - d; }
            else if (L->bits == 2) { sr[d] = 16 * (h & 1) + 2 * d; sl[d] = 0; }
            else { sr[d] = 4 * d; sl[d] = 28 - 4 * d; }
        }
        R->sr[h] = _mm256_loadu_si256((const __m256i *)sr);
        R->sl[h] = _mm256_loadu_si256((const __m256i *)sl);
    }
    if (L->bits == 1) {
        R->t0 = _mm256_set1_ps(t[0]);
        R->t1 = _mm256_set1_ps(t[1]);
    } else if (L->bits == 2) {
        R->t0 = _mm256_setr_ps(t[0], t[1], t[2], t[3], t[0], t[1], t[2], t[3]);
        R->t1 = R->t0;
    } else if (L->bits == 4) {
        R->t0 = _mm256_loadu_ps(t);
        R->t1 = _mm256_loadu_ps(t + 8);
    } else {
        R->t0 = R->t1 = _mm256_setzero_ps();
    }
}

/* The packed bits of the 64 weights from element e on, realigned so that
 * they start at bit 0 of the returned pointer; SPAN bytes may be read
 * there. pad and tmp are the caller's scratch (SPAN bytes each). */
INL const uint8_t *row_bits(const cb_layer *L, int64_t e, uint8_t *pad, uint8_t *tmp)
{
    int64_t t = e * L->bits, B = t >> 3;
    int sh = (int)(t & 7);
    const uint8_t *p = L->packed + B;
    if (B + SPAN > L->nbytes) { /* the stream's last bytes: a zero-padded copy */
        int m = (int)(L->nbytes - B);
        for (int k = 0; k < SPAN; k++) pad[k] = k < m ? p[k] : 0;
        p = pad;
    }
    if (sh) { /* dword d = (dword d >> sh) | (dword d + 1 << (32 - sh)); 8 bits never get here */
        __m256i a = _mm256_loadu_si256((const __m256i *)p);
        __m256i c = _mm256_loadu_si256((const __m256i *)(p + 4));
        __m256i r = _mm256_or_si256(_mm256_srl_epi32(a, _mm_cvtsi32_si128(sh)),
                                    _mm256_sll_epi32(c, _mm_cvtsi32_si128(32 - sh)));
        _mm256_storeu_si256((__m256i *)tmp, r);
        p = tmp;
    }
    return p;
}

static inline int32_t load32(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Weights 8g .. 8g + 7 of a realigned row segment p. */
INL __m256 decode8(const int BITS, const cb_regs *R, const uint8_t *p, int g)
{
    if (BITS == 8) {
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * g)));
        return _mm256_i32gather_ps(R->tab, idx, 4);
    }
    const int per = 4 / BITS; /* groups per dword */
    __m256i v = _mm256_set1_epi32(load32(p + 4 * (g / per)));
    if (BITS == 1)
        return _mm256_blendv_ps(R->t0, R->t1,
                                _mm256_castsi256_ps(_mm256_sllv_epi32(v, R->sl[g % 4])));
    __m256i idx = _mm256_srlv_epi32(v, R->sr[g % per]);
    if (BITS == 2) return _mm256_permutevar8x32_ps(R->t0, idx);
    __m256 lo = _mm256_permutevar8x32_ps(R->t0, idx), hi = _mm256_permutevar8x32_ps(R->t1, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_sllv_epi32(v, R->sl[0])));
}

static const int32_t lane_mask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

/* Lanes 0 .. r - 1 set (0 <= r <= 8). */
INL __m256i mask8(int r)
{
    return _mm256_loadu_si256((const __m256i *)(lane_mask + 8 - r));
}

/* y(jj, s) = act(acc + b) for the r <= 8 outputs of a vector at y, b;
 * returns 1 if any acc + b is NaN. Masked loads and stores at the edge. */
INL int finish8(__m256 acc, const float *b, int r, int relu, float *y)
{
    __m256i m = mask8(r);
    __m256 v = _mm256_add_ps(acc, r == 8 ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, m));
    int nan = _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) & ((1 << r) - 1);
    if (relu) v = _mm256_andnot_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ), v);
    if (r == 8)
        _mm256_storeu_ps(y, v);
    else
        _mm256_maskstore_ps(y, m, v);
    return nan != 0;
}

/* ---- small batches: decode into registers -------------------------------- */

/* NJ vectors (8 NJ outputs from j) x NS samples, all n_in rows; r outputs
 * are stored. Lanes past r decode whatever bits follow (never past the
 * stream: row_bits) and are dropped. */
INL int reg_tile(const int BITS, const int NJ, const int NS, const cb_layer *L, const cb_regs *R,
                 int j, int r, const float *x, ptrdiff_t ldx, float *y)
{
    __m256 acc[8][4];
    uint8_t pad[SPAN], tmp[SPAN];
    #pragma GCC unroll 16
    for (int c = 0; c < NJ; c++)
        #pragma GCC unroll 16
        for (int s = 0; s < NS; s++) acc[c][s] = _mm256_setzero_ps();
    int64_t e = j;
    for (int i = 0; i < L->n_in; i++, e += L->n_out) {
        const uint8_t *p = row_bits(L, e, pad, tmp);
        __m256 xs[4];
        #pragma GCC unroll 16
        for (int s = 0; s < NS; s++) xs[s] = _mm256_broadcast_ss(x + s * ldx + i);
        #pragma GCC unroll 16
        for (int c = 0; c < NJ; c++) {
            __m256 w = decode8(BITS, R, p, c);
            #pragma GCC unroll 16
            for (int s = 0; s < NS; s++) acc[c][s] = _mm256_fmadd_ps(w, xs[s], acc[c][s]);
        }
    }
    int nan = 0;
    #pragma GCC unroll 16
    for (int s = 0; s < NS; s++)
        #pragma GCC unroll 16
        for (int c = 0; c < NJ; c++) {
            int rr = r - 8 * c < 8 ? r - 8 * c : 8;
            if (rr > 0)
                nan |= finish8(acc[c][s], L->b + j + 8 * c, rr, L->relu,
                               y + (ptrdiff_t)s * L->n_out + j + 8 * c);
        }
    return nan;
}

/* 4 bits, 64 outputs x 1 sample: table lookups with vpshufb on the four
 * byte planes of the 16 centroids, put back together with unpacks. 37
 * vector operations per 64 weights where decode8 takes 56. The
 * accumulators hold the outputs in the unpacks' order (acc q: outputs
 * 4q'.. of each 128-bit lane, see below) until the end. */
static TGT int reg_tile4_shuffle(const cb_layer *L, int j, int r, const float *x, float *y)
{
    uint8_t tb[4][32], pad[SPAN], tmp[SPAN];
    for (int c = 0; c < 16; c++) {
        uint32_t u;
        memcpy(&u, L->tab + c, sizeof u);
        for (int k = 0; k < 4; k++) tb[k][c] = tb[k][c + 16] = (uint8_t)(u >> (8 * k));
    }
    const __m256i T0 = _mm256_loadu_si256((const __m256i *)tb[0]);
    const __m256i T1 = _mm256_loadu_si256((const __m256i *)tb[1]);
    const __m256i T2 = _mm256_loadu_si256((const __m256i *)tb[2]);
    const __m256i T3 = _mm256_loadu_si256((const __m256i *)tb[3]);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[8];
#pragma GCC unroll 16
    for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
    int64_t e = j;
    for (int i = 0; i < L->n_in; i++, e += L->n_out) {
        const uint8_t *p = row_bits(L, e, pad, tmp);
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        /* per 128-bit lane l: h = 0 gives weights 32 l + 0 .. 15, h = 1 32 l + 16 .. 31 */
        __m256i ab[2] = {_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi)};
        __m256 xs = _mm256_broadcast_ss(x + i);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i p0 = _mm256_shuffle_epi8(T0, ab[h]), p1 = _mm256_shuffle_epi8(T1, ab[h]);
            __m256i p2 = _mm256_shuffle_epi8(T2, ab[h]), p3 = _mm256_shuffle_epi8(T3, ab[h]);
            __m256i u0 = _mm256_unpacklo_epi8(p0, p1), u1 = _mm256_unpackhi_epi8(p0, p1);
            __m256i v0 = _mm256_unpacklo_epi8(p2, p3), v1 = _mm256_unpackhi_epi8(p2, p3);
            /* acc 4h + q: weights 32 l + 16 h + 4 q .. + 3 */
            acc[4 * h + 0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(u0, v0)), xs, acc[4 * h + 0]);
            acc[4 * h + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(u0, v0)), xs, acc[4 * h + 1]);
            acc[4 * h + 2] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(u1, v1)), xs, acc[4 * h + 2]);
            acc[4 * h + 3] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(u1, v1)), xs, acc[4 * h + 3]);
        }
    }
    __m256 o[8];
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) { /* outputs 8 q .. and 32 + 8 q .. */
        o[q] = _mm256_permute2f128_ps(acc[2 * q], acc[2 * q + 1], 0x20);
        o[q + 4] = _mm256_permute2f128_ps(acc[2 * q], acc[2 * q + 1], 0x31);
    }
    int nan = 0;
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) {
        int rr = r - 8 * c < 8 ? r - 8 * c : 8;
        if (rr > 0) nan |= finish8(o[c], L->b + j + 8 * c, rr, L->relu, y + j + 8 * c);
    }
    return nan;
}

#define REG_CASE(B, NJ, NS) \
    case (NS) * 16 + (NJ): return reg_tile(B, NJ, NS, L, R, j, r, x, ldx, y);
#define DEFINE_REG(B)                                                                        \
    static TGT int reg_tile_##B(int nj, int ns, const cb_layer *L, const cb_regs *R, int j,  \
                                int r, const float *x, ptrdiff_t ldx, float *y)              \
    {                                                                                        \
        switch (ns * 16 + nj) {                                                              \
        REG_CASE(B, 1, 1) REG_CASE(B, 2, 1) REG_CASE(B, 3, 1) REG_CASE(B, 4, 1)              \
        REG_CASE(B, 5, 1) REG_CASE(B, 6, 1) REG_CASE(B, 7, 1) REG_CASE(B, 8, 1)              \
        REG_CASE(B, 1, 2) REG_CASE(B, 2, 2) REG_CASE(B, 3, 2) REG_CASE(B, 4, 2)              \
        REG_CASE(B, 1, 3) REG_CASE(B, 2, 3) REG_CASE(B, 1, 4) REG_CASE(B, 2, 4)              \
        default: return 0;                                                                   \
        }                                                                                    \
    }
DEFINE_REG(1)
DEFINE_REG(2)
DEFINE_REG(4)
DEFINE_REG(8)

static TGT int reg_range(const cb_layer *L, const float *x, ptrdiff_t ldx, int s0, int s1, int j0,
                         int j1, float *y)
{
    cb_regs R;
    make_regs(L, &R);
    int nan = 0;
    for (int s = s0; s < s1; s += SMALL_N) {
        int ns = s1 - s < SMALL_N ? s1 - s : SMALL_N;
        int njmax = ns == 1 ? 8 : ns == 2 ? 4 : 2;
        const float *xs = x + (ptrdiff_t)s * ldx;
        float *ys = y + (ptrdiff_t)s * L->n_out;
        for (int j = j0; j < j1; j += 8 * njmax) {
            int r = j1 - j < 8 * njmax ? j1 - j : 8 * njmax;
            int nj = (r + 7) / 8;
            switch (L->bits) {
            case 1: nan |= reg_tile_1(nj, ns, L, &R, j, r, xs, ldx, ys); break;
            case 2: nan |= reg_tile_2(nj, ns, L, &R, j, r, xs, ldx, ys); break;
            case 4:
                if (ns == 1 && nj > 4)
                    nan |= reg_tile4_shuffle(L, j, r, xs, ys);
                else
                    nan |= reg_tile_4(nj, ns, L, &R, j, r, xs, ldx, ys);
                break;
            default: nan |= reg_tile_8(nj, ns, L, &R, j, r, xs, ldx, ys); break;
            }
        }
    }
    return nan;
}

/* ---- larger batches: a decoded panel and an FMA microkernel -------------- */

/* D(k, 0 .. JB) = W[k0 + k, j .. j + JB) for k < kc; columns r .. w16 are 0. */
INL void decode_panel(const int BITS, const cb_layer *L, const cb_regs *R, int k0, int kc, int j,
                      int r, float *D)
{
    uint8_t pad[SPAN], tmp[SPAN];
    int nv = (r + 7) / 8, w16 = (r + 15) / 16 * 16;
    for (int k = 0; k < kc; k++) {
        const uint8_t *p = row_bits(L, (int64_t)(k0 + k) * L->n_out + j, pad, tmp);
        float *d = D + (ptrdiff_t)k * JB;
        for (int c = 0; c < nv; c++) _mm256_store_ps(d + 8 * c, decode8(BITS, R, p, c));
        for (int c = r; c < w16; c++) d[c] = 0.0f;
    }
}

#define DEFINE_PANEL(B)                                                                          \
    static TGT void decode_panel_##B(const cb_layer *L, const cb_regs *R, int k0, int kc, int j, \
                                     int r, float *D)                                            \
    {                                                                                            \
        decode_panel(B, L, R, k0, kc, j, r, D);                                                  \
    }
DEFINE_PANEL(1)
DEFINE_PANEL(2)
DEFINE_PANEL(4)
DEFINE_PANEL(8)

/* 16 outputs x S samples over kc panel rows, x packed as xp(s, k) (MS
 * samples per row k): acc = y (or 0 on the first
 * panel), acc = fma(D(k, :), x(k0 + k, s), acc) for k in turn, then y = acc,
 * or act(acc + b) on the last panel. r <= 16 outputs are valid. */
INL int micro(const int S, const float *D, int kc, const float *xp, float *y, ptrdiff_t ldy,
              int r, int first, int last, const float *b, int relu)
{
    __m256 a0[MS], a1[MS];
    int r0 = r < 8 ? r : 8, r1 = r < 8 ? 0 : r - 8;
    __m256i m0 = mask8(r0), m1 = mask8(r1);
    #pragma GCC unroll 16
    for (int s = 0; s < S; s++) {
        if (first) {
            a0[s] = a1[s] = _mm256_setzero_ps();
        } else if (r == 16) {
            a0[s] = _mm256_loadu_ps(y + s * ldy);
            a1[s] = _mm256_loadu_ps(y + s * ldy + 8);
        } else {
            a0[s] = _mm256_maskload_ps(y + s * ldy, m0);
            a1[s] = _mm256_maskload_ps(y + s * ldy + 8, m1);
        }
    }
    for (int k = 0; k < kc; k++) {
        __m256 w0 = _mm256_load_ps(D + k * JB), w1 = _mm256_load_ps(D + k * JB + 8);
        #pragma GCC unroll 16
        for (int s = 0; s < S; s++) {
            __m256 xb = _mm256_broadcast_ss(xp + k * MS + s);
            a0[s] = _mm256_fmadd_ps(w0, xb, a0[s]);
            a1[s] = _mm256_fmadd_ps(w1, xb, a1[s]);
        }
    }
    int nan = 0;
    #pragma GCC unroll 16
    for (int s = 0; s < S; s++) {
        float *ys = y + s * ldy;
        if (last) {
            nan |= finish8(a0[s], b, r0, relu, ys);
            if (r1 > 0) nan |= finish8(a1[s], b + 8, r1, relu, ys + 8);
        } else if (r == 16) {
            _mm256_storeu_ps(ys, a0[s]);
            _mm256_storeu_ps(ys + 8, a1[s]);
        } else {
            _mm256_maskstore_ps(ys, m0, a0[s]);
            _mm256_maskstore_ps(ys + 8, m1, a1[s]);
        }
    }
    return nan;
}

#define MICRO_CASE(S) \
    case S: return micro(S, D, kc, xp, y, ldy, r, first, last, b, relu);
static TGT int micro_s(int S, const float *D, int kc, const float *xp, float *y, ptrdiff_t ldy,
                       int r, int first, int last, const float *b, int relu)
{
    switch (S) {
    MICRO_CASE(1) MICRO_CASE(2) MICRO_CASE(3) MICRO_CASE(4) MICRO_CASE(5)
    default: return micro(MS, D, kc, xp, y, ldy, r, first, last, b, relu);
    }
}

/* xp = x(k0 .. k0 + kc, s0 .. s1) in blocks of MS samples, xp(s, k) per
 * block (the microkernel's broadcasts then read consecutive words); the
 * missing samples of the last block are 0. */
static void pack_x(const float *x, ptrdiff_t ldx, int s0, int s1, int k0, int kc, float *xp)
{
    for (int sb = s0; sb < s1; sb += MS) {
        float *blk = xp + (ptrdiff_t)(sb - s0) * kc;
        for (int s = 0; s < MS; s++) {
            const float *xs = x + (ptrdiff_t)(sb + s) * ldx + k0;
            if (sb + s < s1)
                for (int k = 0; k < kc; k++) blk[k * MS + s] = xs[k];
            else
                for (int k = 0; k < kc; k++) blk[k * MS + s] = 0.0f;
        }
    }
}

static TGT int panel_range(const cb_layer *L, const float *x, ptrdiff_t ldx, int s0, int s1,
                           int j0, int j1, float *y, int kcmax, float *xp)
{
    float D[KC * JB] __attribute__((aligned(32)));
    cb_regs R;
    make_regs(L, &R);
    if (kcmax > KC) kcmax = KC;
    int nan = 0;
    for (int k0 = 0; k0 < L->n_in; k0 += kcmax) {
        int kc = L->n_in - k0 < kcmax ? L->n_in - k0 : kcmax;
        int first = k0 == 0, last = k0 + kc == L->n_in;
        pack_x(x, ldx, s0, s1, k0, kc, xp);
        for (int jb = j0; jb < j1; jb += JB) {
            int r = j1 - jb < JB ? j1 - jb : JB;
            switch (L->bits) {
            case 1: decode_panel_1(L, &R, k0, kc, jb, r, D); break;
            case 2: decode_panel_2(L, &R, k0, kc, jb, r, D); break;
            case 4: decode_panel_4(L, &R, k0, kc, jb, r, D); break;
            default: decode_panel_8(L, &R, k0, kc, jb, r, D); break;
            }
            for (int s = s0; s < s1; s += MS) {
                int S = s1 - s < MS ? s1 - s : MS;
                const float *xps = xp + (ptrdiff_t)(s - s0) * kc;
                for (int jj = 0; jj < r; jj += 16) {
                    int rr = r - jj < 16 ? r - jj : 16;
                    nan |= micro_s(S, D + jj, kc, xps, y + (ptrdiff_t)s * L->n_out + jb + jj,
                                   L->n_out, rr, first, last, L->b + jb + jj, L->relu);
                }
            }
        }
    }
    return nan;
}

/* ---- avx512 (F, BW, DQ, VL) ----------------------------------------------- */

/* The same sums as avx2 (one fma per weight, inputs in turn), on 16 lanes:
 * - 16 weights in input-row order ("natural"): 1 bit: the 16 bits are the
 *   blend mask; 2 bits: vpsrlvd + vpermps on a 16-entry table whose entry
 *   k is centroid k & 3; 4 bits: 8 bytes doubled, vpmovzxbd, vpsrlvd,
 *   vpermps on the 16 centroids; 8 bits: vpmovzxbd and vpermt2ps on 32
 *   table entries (n_codes <= 32, e.g. 5-bit codebooks, stored as 8 bits),
 *   two vpermt2ps and a blend on bit 5 (<= 64), else vgatherdps.
 * - 4 bits, small batches ("raw"): one 64-byte load is 128 weights; lane d
 *   of (raw >> 4 m) holds weight 8 d + m in its low nibble, which is all
 *   vpermps reads: one shift and one vpermps per 16 weights. The outputs
 *   stay in that order until the end.
 * vpermt2ps reads 5 index bits (6 with the blend): a byte >= 32 (>= 64)
 * would wrap onto a valid centroid, so the bytes read are OR-ed together
 * and such a byte makes the call report NaN (the caller then finds the
 * bad index, as for the table's NaN entries). */

#define TGT5 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")))
#define INL5 static inline __attribute__((always_inline, target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")))

/* Kinds of decode: bits, and for 8 bits how the table is read. */
enum { K1 = 1, K2 = 2, K4 = 4, K8_32 = 8, K8_64 = 9, K8_G = 10 };
#define SPAN5 128  /* bytes a row segment may read: 128 weights at 8 bits */
#define JB5 32     /* panel: outputs (two vectors); KC x JB5 floats = 32 KiB */

typedef struct {
    __m512 t0, t1, t2, t3;
    __m512i sr2, sr4;
    const float *tab;
} cb5_regs;

INL5 int kind_of(const cb_layer *L)
{
    if (L->bits < 8) return L->bits;
    return L->n_codes <= 32 ? K8_32 : L->n_codes <= 64 ? K8_64 : K8_G;
}

INL5 void make5(const cb_layer *L, cb5_regs *R)
{
    const float *t = L->tab;
    int sr2[16], sr4[16];
    for (int d = 0; d < 16; d++) { sr2[d] = 2 * d; sr4[d] = 4 * (d & 1); }
    R->sr2 = _mm512_loadu_si512(sr2);
    R->sr4 = _mm512_loadu_si512(sr4);
    R->tab = t;
    R->t0 = R->t1 = R->t2 = R->t3 = _mm512_setzero_ps();
    if (L->bits == 1) {
        R->t0 = _mm512_set1_ps(t[0]);
        R->t1 = _mm512_set1_ps(t[1]);
    } else if (L->bits == 2) {
        float q[16];
        for (int k = 0; k < 16; k++) q[k] = t[k & 3];
        R->t0 = _mm512_loadu_ps(q);
    } else {   /* 4 bits: 16 entries; 8 bits: the first 64 (tab has 256) */
        R->t0 = _mm512_loadu_ps(t);
        if (L->bits == 8) {
            R->t1 = _mm512_loadu_ps(t + 16);
            R->t2 = _mm512_loadu_ps(t + 32);
            R->t3 = _mm512_loadu_ps(t + 48);
        }
    }
}

/* n bytes at p (0 if n <= 0), the rest of the 64 zero; masked-out bytes are
 * never touched, so nothing past the stream is read. */
INL5 __m512i load_upto(const uint8_t *p, int64_t n)
{
    if (n <= 0) return _mm512_setzero_si512();
    __mmask64 m = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
    return _mm512_maskz_loadu_epi8(m, p);
}

/* The packed bits of the row segment from element e on, starting at bit 0
 * of the returned pointer; SPAN5 bytes may be read there (for bits < 8,
 * the first 124 hold the stream's bits). tmp: the caller's 128 bytes. */
INL5 const uint8_t *row_bits5(const cb_layer *L, int64_t e, uint8_t *tmp)
{
    int64_t t = e * L->bits, B = t >> 3;
    int sh = (int)(t & 7);
    const uint8_t *p = L->packed + B;
    if (!sh && B + SPAN5 <= L->nbytes) return p;
    int64_t left = L->nbytes - B;
    __m512i a0 = load_upto(p, left), a1 = load_upto(p + 64, left - 64);
    if (sh) { /* dword d = (dword d >> sh) | (dword d + 1 << (32 - sh)) */
        __m128i cr = _mm_cvtsi32_si128(sh), cl = _mm_cvtsi32_si128(32 - sh);
        __m512i n0 = _mm512_alignr_epi32(a1, a0, 1), n1 = _mm512_alignr_epi32(a1, a1, 1);
        a0 = _mm512_or_si512(_mm512_srl_epi32(a0, cr), _mm512_sll_epi32(n0, cl));
        a1 = _mm512_or_si512(_mm512_srl_epi32(a1, cr), _mm512_sll_epi32(n1, cl));
    }
    _mm512_storeu_si512(tmp, a0);
    _mm512_storeu_si512(tmp + 64, a1);
    return tmp;
}

/* Table lookup of 16 indices (8 bits: the low byte of each lane, for K8_G;
 * the low 5 or 6 bits for K8_32, K8_64). */
INL5 __m512 look8(const int K, const cb5_regs *R, __m512i idx)
{
    if (K == K8_32) return _mm512_permutex2var_ps(R->t0, idx, R->t1);
    if (K == K8_64) {
        __mmask16 hi = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
        return _mm512_mask_blend_ps(hi, _mm512_permutex2var_ps(R->t0, idx, R->t1),
                                    _mm512_permutex2var_ps(R->t2, idx, R->t3));
    }
    return _mm512_i32gather_ps(idx, R->tab, 4);
}

/* Weights 16 g .. 16 g + 15 of a realigned segment p; *orb collects the
 * 8-bit indices read (see above). */
INL5 __m512 decode16(const int K, const cb5_regs *R, const uint8_t *p, int g, __m128i *orb)
{
    if (K == K1) {
        uint16_t m;
        memcpy(&m, p + 2 * g, sizeof m);
        return _mm512_mask_blend_ps((__mmask16)m, R->t0, R->t1);
    }
    if (K == K2) {
        __m512i idx = _mm512_srlv_epi32(_mm512_set1_epi32(load32(p + 4 * g)), R->sr2);
        return _mm512_permutexvar_ps(idx, R->t0);
    }
    if (K == K4) {
        __m128i b = _mm_loadl_epi64((const __m128i *)(p + 8 * g));
        __m512i idx = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), R->sr4);
        return _mm512_permutexvar_ps(idx, R->t0);
    }
    __m128i b = _mm_loadu_si128((const __m128i *)(p + 16 * g));
    if (K != K8_G) *orb = _mm_or_si128(*orb, b);
    return look8(K, R, _mm512_cvtepu8_epi32(b));
}

/* 1 if an 8-bit index read would wrap in vpermt2ps. */
INL5 int wrapped(const int K, __m128i orb)
{
    if (K == K8_32) return !_mm_testz_si128(orb, _mm_set1_epi8((char)0xE0));
    if (K == K8_64) return !_mm_testz_si128(orb, _mm_set1_epi8((char)0xC0));
    return 0;
}

/* y = act(v + b) on lanes < r (r <= 16); returns 1 if a valid v + b is NaN. */
INL5 int finish16(__m512 v, const float *b, int r, int relu, float *y)
{
    __mmask16 m = r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << r) - 1);
    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b));
    int nan = (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) & m) != 0;
    if (relu) v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ),
                                     _mm512_setzero_ps());
    _mm512_mask_storeu_ps(y, m, v);
    return nan;
}

/* nj <= 8 vectors (16 nj outputs from j, r of them stored) x NS samples,
 * natural order; nj NS <= 16 accumulators. */
INL5 int nat_tile(const int K, const int NS, const cb_layer *L, const cb5_regs *R, int nj, int j,
                  int r, const float *x, ptrdiff_t ldx, float *y)
{
    __m512 acc[8][4];
    uint8_t tmp[SPAN5] __attribute__((aligned(64)));
    __m128i orb = _mm_setzero_si128();
    #pragma GCC unroll 16
    for (int c = 0; c < 8; c++)
        #pragma GCC unroll 16
        for (int s = 0; s < NS; s++) acc[c][s] = _mm512_setzero_ps();
    int64_t e = j;
    for (int i = 0; i < L->n_in; i++, e += L->n_out) {
        const uint8_t *p = row_bits5(L, e, tmp);
        __m512 xs[4];
        #pragma GCC unroll 16
        for (int s = 0; s < NS; s++) xs[s] = _mm512_set1_ps(x[s * ldx + i]);
        #pragma GCC unroll 16
        for (int c = 0; c < 8; c++) {
            if (c < nj) {
                __m512 w = decode16(K, R, p, c, &orb);
                #pragma GCC unroll 16
                for (int s = 0; s < NS; s++) acc[c][s] = _mm512_fmadd_ps(w, xs[s], acc[c][s]);
            }
        }
    }
    int nan = wrapped(K, orb);
    #pragma GCC unroll 16
    for (int s = 0; s < NS; s++)
        #pragma GCC unroll 16
        for (int c = 0; c < 8; c++) {
            int rr = r - 16 * c;
            if (c < nj && rr > 0)
                nan |= finish16(acc[c][s], L->b + j + 16 * c, rr, L->relu,
                                y + (ptrdiff_t)s * L->n_out + j + 16 * c);
        }
    return nan;
}

/* 4 bits, 128 outputs from j (r <= 128 stored) x NS <= 2 samples, raw
 * order: acc[m] lane d is output 8 d + m. */
INL5 int raw4_tile(const int NS, const cb_layer *L, const cb5_regs *R, int j, int r,
                   const float *x, ptrdiff_t ldx, float *y)
{
    __m512 acc[8][2];
    uint8_t tmp[SPAN5] __attribute__((aligned(64)));
    #pragma GCC unroll 16
    for (int m = 0; m < 8; m++)
        #pragma GCC unroll 4
        for (int s = 0; s < NS; s++) acc[m][s] = _mm512_setzero_ps();
    int64_t e = j;
    for (int i = 0; i < L->n_in; i++, e += L->n_out) {
        __m512i raw = _mm512_loadu_si512(row_bits5(L, e, tmp));
        __m512 xs[2];
        #pragma GCC unroll 4
        for (int s = 0; s < NS; s++) xs[s] = _mm512_set1_ps(x[s * ldx + i]);
        #pragma GCC unroll 16
        for (int m = 0; m < 8; m++) {
            __m512 w = _mm512_permutexvar_ps(m ? _mm512_srli_epi32(raw, 4 * m) : raw, R->t0);
            #pragma GCC unroll 4
            for (int s = 0; s < NS; s++) acc[m][s] = _mm512_fmadd_ps(w, xs[s], acc[m][s]);
        }
    }
    int nan = 0;
    for (int s = 0; s < NS; s++) {
        float a[8][16] __attribute__((aligned(64))), o[128] __attribute__((aligned(64)));
        #pragma GCC unroll 16
        for (int m = 0; m < 8; m++) _mm512_store_ps(a[m], acc[m][s]);
        for (int k = 0; k < 128; k++) o[k] = a[k & 7][k >> 3];
        for (int c = 0; 16 * c < r; c++)
            nan |= finish16(_mm512_load_ps(o + 16 * c), L->b + j + 16 * c, r - 16 * c, L->relu,
                            y + (ptrdiff_t)s * L->n_out + j + 16 * c);
    }
    return nan;
}

/* 8 bits (K8_32, K8_64), 64 outputs from j (r <= 64 stored) x NS <= 4
 * samples, raw order: lane d of (raw >> 8 m) holds weight 4 d + m in its
 * low byte, all that vpermt2ps reads; acc[m] lane d is output 4 d + m. */
INL5 int raw8_tile(const int K, const int NS, const cb_layer *L, const cb5_regs *R, int j, int r,
                   const float *x, ptrdiff_t ldx, float *y)
{
    __m512 acc[4][4];
    uint8_t tmp[SPAN5] __attribute__((aligned(64)));
    __m512i orv = _mm512_setzero_si512();
    #pragma GCC unroll 16
    for (int m = 0; m < 4; m++)
        #pragma GCC unroll 4
        for (int s = 0; s < NS; s++) acc[m][s] = _mm512_setzero_ps();
    int64_t e = j;
    for (int i = 0; i < L->n_in; i++, e += L->n_out) {
        __m512i raw = _mm512_loadu_si512(row_bits5(L, e, tmp));
        orv = _mm512_or_si512(orv, raw);
        __m512 xs[4];
        #pragma GCC unroll 4
        for (int s = 0; s < NS; s++) xs[s] = _mm512_set1_ps(x[s * ldx + i]);
        #pragma GCC unroll 4
        for (int m = 0; m < 4; m++) {
            __m512 w = look8(K, R, m ? _mm512_srli_epi32(raw, 8 * m) : raw);
            #pragma GCC unroll 4
            for (int s = 0; s < NS; s++) acc[m][s] = _mm512_fmadd_ps(w, xs[s], acc[m][s]);
        }
    }
    __m128i orb = _mm_or_si128(_mm_or_si128(_mm512_extracti32x4_epi32(orv, 0), _mm512_extracti32x4_epi32(orv, 1)),
                               _mm_or_si128(_mm512_extracti32x4_epi32(orv, 2), _mm512_extracti32x4_epi32(orv, 3)));
    int nan = wrapped(K, orb);
    for (int s = 0; s < NS; s++) {
        float a[4][16] __attribute__((aligned(64))), o[64] __attribute__((aligned(64)));
        #pragma GCC unroll 4
        for (int m = 0; m < 4; m++) _mm512_store_ps(a[m], acc[m][s]);
        for (int k = 0; k < 64; k++) o[k] = a[k & 3][k >> 2];
        for (int c = 0; 16 * c < r; c++)
            nan |= finish16(_mm512_load_ps(o + 16 * c), L->b + j + 16 * c, r - 16 * c, L->relu,
                            y + (ptrdiff_t)s * L->n_out + j + 16 * c);
    }
    return nan;
}

#define DEFINE_RAW8(K, NS)                                                                      \
    static TGT5 int raw8_##K##_##NS(const cb_layer *L, const cb5_regs *R, int nj, int j, int r, \
                                    const float *x, ptrdiff_t ldx, float *y)                   \
    {                                                                                          \
        (void)nj;                                                                              \
        return raw8_tile(K, NS, L, R, j, r, x, ldx, y);                                        \
    }
DEFINE_RAW8(K8_32, 1) DEFINE_RAW8(K8_32, 2) DEFINE_RAW8(K8_32, 3) DEFINE_RAW8(K8_32, 4)
DEFINE_RAW8(K8_64, 1) DEFINE_RAW8(K8_64, 2) DEFINE_RAW8(K8_64, 3) DEFINE_RAW8(K8_64, 4)

/* 8 bits with more than 64 codes, one sample, 64 outputs from j (r <= 64
 * stored), on CPUs with AVX512-VBMI: the 256-entry table as four byte
 * planes (byte q of every centroid), each looked up for 64 indices at once
 * with two vpermt2b (128 entries each) and a blend on the index's bit 7,
 * then the planes interleaved into floats by unpacks: about 21 operations
 * per 64 weights instead of four 16-lane gathers. acc[m] lane 4 L + t is
 * output 16 L + 4 m + t (the unpacks' order). */
#define TGT5V __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")))
static TGT5V int raw8v_tile(const cb_layer *L, int j, int r, const float *x, float *y)
{
    uint8_t planes[4][256] __attribute__((aligned(64)));
    for (int c = 0; c < 256; c++) {
        uint32_t u;
        memcpy(&u, L->tab + c, sizeof u);
        for (int q = 0; q < 4; q++) planes[q][c] = (uint8_t)(u >> (8 * q));
    }
    __m512i T[4][4];
    for (int q = 0; q < 4; q++)
        for (int h = 0; h < 4; h++) T[q][h] = _mm512_load_si512(planes[q] + 64 * h);
    __m512 acc[4];
    for (int m = 0; m < 4; m++) acc[m] = _mm512_setzero_ps();
    uint8_t tmp[SPAN5] __attribute__((aligned(64)));
    int64_t e = j;
    for (int i = 0; i < L->n_in; i++, e += L->n_out) {
        __m512i idx = _mm512_loadu_si512(row_bits5(L, e, tmp));
        __mmask64 hi = _mm512_movepi8_mask(idx);
        __m512i p[4];
        #pragma GCC unroll 4
        for (int q = 0; q < 4; q++)
            p[q] = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(T[q][0], idx, T[q][1]),
                                          _mm512_permutex2var_epi8(T[q][2], idx, T[q][3]));
        __m512i a = _mm512_unpacklo_epi8(p[0], p[1]), b = _mm512_unpackhi_epi8(p[0], p[1]);
        __m512i c = _mm512_unpacklo_epi8(p[2], p[3]), d = _mm512_unpackhi_epi8(p[2], p[3]);
        __m512 xs = _mm512_set1_ps(x[i]);
        acc[0] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(a, c)), xs, acc[0]);
        acc[1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(a, c)), xs, acc[1]);
        acc[2] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(b, d)), xs, acc[2]);
        acc[3] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(b, d)), xs, acc[3]);
    }
    float a4[4][16] __attribute__((aligned(64))), o[64] __attribute__((aligned(64)));
    for (int m = 0; m < 4; m++) _mm512_store_ps(a4[m], acc[m]);
    for (int k = 0; k < 64; k++) o[k] = a4[(k >> 2) & 3][4 * (k >> 4) + (k & 3)];
    int nan = 0;
    for (int cc = 0; 16 * cc < r; cc++)
        nan |= finish16(_mm512_load_ps(o + 16 * cc), L->b + j + 16 * cc, r - 16 * cc, L->relu,
                        y + j + 16 * cc);
    return nan;
}

static int has_vbmi(void)
{
    static int v = -1;
    int got = __atomic_load_n(&v, __ATOMIC_ACQUIRE);
    if (got < 0) {
        __builtin_cpu_init();
        got = __builtin_cpu_supports("avx512vbmi") != 0;
        __atomic_store_n(&v, got, __ATOMIC_RELEASE);
    }
    return got;
}

#define DEFINE_NAT(K, NS)                                                                       \
    static TGT5 int nat_##K##_##NS(const cb_layer *L, const cb5_regs *R, int nj, int j, int r, \
                                   const float *x, ptrdiff_t ldx, float *y)                   \
    {                                                                                         \
        return nat_tile(K, NS, L, R, nj, j, r, x, ldx, y);                                    \
    }
#define DEFINE_NAT4(K) DEFINE_NAT(K, 1) DEFINE_NAT(K, 2) DEFINE_NAT(K, 3) DEFINE_NAT(K, 4)
DEFINE_NAT4(K1)
DEFINE_NAT4(K2)
DEFINE_NAT4(K4)
DEFINE_NAT4(K8_32)
DEFINE_NAT4(K8_64)
DEFINE_NAT4(K8_G)

static TGT5 int raw4_1(const cb_layer *L, const cb5_regs *R, int j, int r, const float *x,
                       ptrdiff_t ldx, float *y)
{
    return raw4_tile(1, L, R, j, r, x, ldx, y);
}
static TGT5 int raw4_2(const cb_layer *L, const cb5_regs *R, int j, int r, const float *x,
                       ptrdiff_t ldx, float *y)
{
    return raw4_tile(2, L, R, j, r, x, ldx, y);
}

typedef int (*nat_fn)(const cb_layer *, const cb5_regs *, int, int, int, const float *,
                      ptrdiff_t, float *);

static nat_fn nat_for(int K, int ns)
{
    static const nat_fn t[6][4] = {
        {nat_K1_1, nat_K1_2, nat_K1_3, nat_K1_4},         {nat_K2_1, nat_K2_2, nat_K2_3, nat_K2_4},
        {nat_K4_1, nat_K4_2, nat_K4_3, nat_K4_4},         {nat_K8_32_1, nat_K8_32_2, nat_K8_32_3, nat_K8_32_4},
        {nat_K8_64_1, nat_K8_64_2, nat_K8_64_3, nat_K8_64_4}, {nat_K8_G_1, nat_K8_G_2, nat_K8_G_3, nat_K8_G_4}};
    int row = K == K1 ? 0 : K == K2 ? 1 : K == K4 ? 2 : K == K8_32 ? 3 : K == K8_64 ? 4 : 5;
    return t[row][ns - 1];
}

static TGT5 int reg5_range(const cb_layer *L, const float *x, ptrdiff_t ldx, int s0, int s1,
                           int j0, int j1, float *y)
{
    cb5_regs R;
    make5(L, &R);
    int K = kind_of(L), nan = 0, vbmi = K == K8_G && has_vbmi();
    for (int s = s0; s < s1; s += SMALL_N) {
        int ns = s1 - s < SMALL_N ? s1 - s : SMALL_N;
        int njmax = 16 / ns < 8 ? 16 / ns : 8;
        const float *xs = x + (ptrdiff_t)s * ldx;
        float *ys = y + (ptrdiff_t)s * L->n_out;
        nat_fn f = nat_for(K, ns);
        for (int j = j0; j < j1;) {
            int left = j1 - j;
            if (K == K8_G && left > 32 && vbmi) {   /* one sample at a time */
                int r = left < 64 ? left : 64;
                for (int q = 0; q < ns; q++)
                    nan |= raw8v_tile(L, j, r, xs + (ptrdiff_t)q * ldx, ys + (ptrdiff_t)q * L->n_out);
                j += r;
            } else if ((K == K8_32 || K == K8_64) && left > 32) {   /* more than half a raw block */
                static const nat_fn r8[2][4] = {
                    {raw8_K8_32_1, raw8_K8_32_2, raw8_K8_32_3, raw8_K8_32_4},
                    {raw8_K8_64_1, raw8_K8_64_2, raw8_K8_64_3, raw8_K8_64_4}};
                int r = left < 64 ? left : 64;
                nan |= r8[K == K8_64][ns - 1](L, &R, 4, j, r, xs, ldx, ys);
                j += r;
            } else if (K == K4 && ns <= 2 && left > 64) {   /* more than half a raw block */
                int r = left < 128 ? left : 128;
                nan |= ns == 1 ? raw4_1(L, &R, j, r, xs, ldx, ys) : raw4_2(L, &R, j, r, xs, ldx, ys);
                j += r;
            } else {
                int r = left < 16 * njmax ? left : 16 * njmax;
                nan |= f(L, &R, (r + 15) / 16, j, r, xs, ldx, ys);
                j += r;
            }
        }
    }
    return nan;
}

/* D(k, 0 .. JB5) = W[k0 + k, j .. j + JB5) for k < kc, columns past r 0. */
INL5 int decode_panel5(const int K, const cb_layer *L, const cb5_regs *R, int k0, int kc, int j,
                       int r, float *D)
{
    uint8_t tmp[SPAN5] __attribute__((aligned(64)));
    __m128i orb = _mm_setzero_si128();
    __mmask16 m0 = r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << r) - 1);
    __mmask16 m1 = r >= 32 ? (__mmask16)0xFFFF : r <= 16 ? 0 : (__mmask16)((1u << (r - 16)) - 1);
    for (int k = 0; k < kc; k++) {
        const uint8_t *p = row_bits5(L, (int64_t)(k0 + k) * L->n_out + j, tmp);
        float *d = D + (ptrdiff_t)k * JB5;
        _mm512_store_ps(d, _mm512_maskz_mov_ps(m0, decode16(K, R, p, 0, &orb)));
        _mm512_store_ps(d + 16, m1 ? _mm512_maskz_mov_ps(m1, decode16(K, R, p, 1, &orb))
                                   : _mm512_setzero_ps());
    }
    return wrapped(K, orb);
}

#define DEFINE_PANEL5(K)                                                                       \
    static TGT5 int decode_panel5_##K(const cb_layer *L, const cb5_regs *R, int k0, int kc,   \
                                      int j, int r, float *D)                                 \
    {                                                                                         \
        return decode_panel5(K, L, R, k0, kc, j, r, D);                                       \
    }
DEFINE_PANEL5(K1)
DEFINE_PANEL5(K2)
DEFINE_PANEL5(K4)
DEFINE_PANEL5(K8_32)
DEFINE_PANEL5(K8_64)
DEFINE_PANEL5(K8_G)

/* 32 outputs (r valid) x S samples over kc panel rows: as micro, on two
 * 16-lane vectors. */
INL5 int micro5(const int NV, const int S, const float *D, int kc, const float *xp, ptrdiff_t ldx,
                float *y, ptrdiff_t ldy, int r, int first, int last, const float *b, int relu)
{
    __m512 a0[MS], a1[MS];
    int r0 = r < 16 ? r : 16, r1 = r < 16 ? 0 : r - 16;
    __mmask16 m0 = (__mmask16)((1u << r0) - 1), m1 = (__mmask16)((1u << r1) - 1);
    #pragma GCC unroll 16
    for (int s = 0; s < S; s++) {
        if (first) {
            a0[s] = a1[s] = _mm512_setzero_ps();
        } else {
            a0[s] = _mm512_maskz_loadu_ps(m0, y + s * ldy);
            a1[s] = NV == 2 ? _mm512_maskz_loadu_ps(m1, y + s * ldy + 16) : a0[s];
        }
    }
    for (int k = 0; k < kc; k++) {
        __m512 w0 = _mm512_load_ps(D + k * JB5), w1 = NV == 2 ? _mm512_load_ps(D + k * JB5 + 16) : w0;
        #pragma GCC unroll 16
        for (int s = 0; s < S; s++) {
            __m512 xb = _mm512_set1_ps(xp[s * ldx + k]);
            a0[s] = _mm512_fmadd_ps(w0, xb, a0[s]);
            if (NV == 2) a1[s] = _mm512_fmadd_ps(w1, xb, a1[s]);
        }
    }
    int nan = 0;
    #pragma GCC unroll 16
    for (int s = 0; s < S; s++) {
        float *ys = y + s * ldy;
        if (last) {
            nan |= finish16(a0[s], b, r0, relu, ys);
            if (NV == 2 && r1 > 0) nan |= finish16(a1[s], b + 16, r1, relu, ys + 16);
        } else {
            _mm512_mask_storeu_ps(ys, m0, a0[s]);
            if (NV == 2) _mm512_mask_storeu_ps(ys + 16, m1, a1[s]);
        }
    }
    return nan;
}

/* Narrow panels (r <= 16 outputs) run one vector per sample. */
#define MICRO5_CASE(S)                                                                \
    case S:                                                                           \
        return r > 16 ? micro5(2, S, D, kc, xp, ldx, y, ldy, r, first, last, b, relu) \
                      : micro5(1, S, D, kc, xp, ldx, y, ldy, r, first, last, b, relu);
static TGT5 int micro5_s(int S, const float *D, int kc, const float *xp, ptrdiff_t ldx, float *y,
                         ptrdiff_t ldy, int r, int first, int last, const float *b, int relu)
{
    switch (S) {
    MICRO5_CASE(1) MICRO5_CASE(2) MICRO5_CASE(3) MICRO5_CASE(4) MICRO5_CASE(5)
    MICRO5_CASE(MS)
    default: return 0;
    }
}

/* x is read in place (the broadcasts of S samples: S sequential streams),
 * not packed as on the avx2 path: packing cost more than the product on
 * narrow layers (200 x 10). */
static TGT5 int panel5_range(const cb_layer *L, const float *x, ptrdiff_t ldx, int s0, int s1,
                             int j0, int j1, float *y, int kcmax)
{
    float D[KC * JB5] __attribute__((aligned(64)));
    cb5_regs R;
    make5(L, &R);
    int K = kind_of(L), nan = 0;
    if (kcmax > KC) kcmax = KC;
    for (int k0 = 0; k0 < L->n_in; k0 += kcmax) {
        int kc = L->n_in - k0 < kcmax ? L->n_in - k0 : kcmax;
        int first = k0 == 0, last = k0 + kc == L->n_in;
        for (int jb = j0; jb < j1; jb += JB5) {
            int r = j1 - jb < JB5 ? j1 - jb : JB5;
            switch (K) {
            case K1: nan |= decode_panel5_K1(L, &R, k0, kc, jb, r, D); break;
            case K2: nan |= decode_panel5_K2(L, &R, k0, kc, jb, r, D); break;
            case K4: nan |= decode_panel5_K4(L, &R, k0, kc, jb, r, D); break;
            case K8_32: nan |= decode_panel5_K8_32(L, &R, k0, kc, jb, r, D); break;
            case K8_64: nan |= decode_panel5_K8_64(L, &R, k0, kc, jb, r, D); break;
            default: nan |= decode_panel5_K8_G(L, &R, k0, kc, jb, r, D); break;
            }
            for (int s = s0; s < s1; s += MS) {
                int S = s1 - s < MS ? s1 - s : MS;
                nan |= micro5_s(S, D, kc, x + (ptrdiff_t)s * ldx + k0, ldx,
                                y + (ptrdiff_t)s * L->n_out + jb, L->n_out, r, first, last,
                                L->b + jb, L->relu);
            }
        }
    }
    return nan;
}

#endif

/* The product, bias and (with relu != 0) relu for samples [s0, s1) and
 * outputs [j0, j1) (0-based, half open) on the given path. x is Fortran
 * x(ldx, n), y is y(n_out, n). Batches above SMALL_N (s1 - s0 > 4) pack x
 * into work: ceil((s1 - s0) / 6) * 6 * kc words, kc (at most 256) input
 * rows per panel. Threads call it on disjoint ranges (and disjoint work); it
 * reads the layer's arrays and x and writes only its part of y. Returns 1
 * if an output before the activation is NaN (a NaN or inf input, or an
 * index >= n_codes), else 0. */
int pykd_cb_product(int path, int bits, int n_codes, int n_in, int n_out, const uint8_t *packed,
                    int64_t nbytes, const float *centroids, const float *b, int relu,
                    const float *x, int ldx, int s0, int s1, int j0, int j1, float *y, int kc,
                    float *work)
{
    float tab[256] __attribute__((aligned(32)));
    int nt = 1 << bits;
    for (int c = 0; c < nt; c++) tab[c] = c < n_codes ? centroids[c] : NAN;
    cb_layer L = {bits, n_codes, n_in, n_out, relu, packed, nbytes, tab, b};
    if (s1 <= s0 || j1 <= j0) return 0;
#ifdef PYKD_X86
    if (path == P_AVX512) {
        if (s1 - s0 <= SMALL_N) return reg5_range(&L, x, ldx, s0, s1, j0, j1, y);
        return panel5_range(&L, x, ldx, s0, s1, j0, j1, y, kc);
    }
    if (path == P_AVX2) {
        if (s1 - s0 <= SMALL_N) return reg_range(&L, x, ldx, s0, s1, j0, j1, y);
        return panel_range(&L, x, ldx, s0, s1, j0, j1, y, kc, work);
    }
#endif
    (void)path;
    (void)kc;
    (void)work;
    return portable_range(&L, x, ldx, s0, s1, j0, j1, y);
}

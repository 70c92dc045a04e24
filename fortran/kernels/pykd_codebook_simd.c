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
 * Paths: portable (plain C, any CPU, aarch64 included) and avx2 (AVX2 +
 * FMA). PYKD_CODEBOOK_PATH=portable|avx2 forces one when the CPU has it.
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

enum { P_PORTABLE = 0, P_AVX2 = 1, P_COUNT = 2 };
static const char *const path_names[P_COUNT] = {"portable", "avx2"};

static int cpu_has(int p)
{
    if (p == P_PORTABLE) return 1;
#ifdef PYKD_X86
    __builtin_cpu_init();
    if (p == P_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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
    int bits, n_in, n_out, relu;
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
    cb_layer L = {bits, n_in, n_out, relu, packed, nbytes, tab, b};
    if (s1 <= s0 || j1 <= j0) return 0;
#ifdef PYKD_X86
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

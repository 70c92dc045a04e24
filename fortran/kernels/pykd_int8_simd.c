/* The int8 layer's kernel with run-time CPU dispatch (docs/performance.md,
 * "The int8 kernel").
 *
 * y(j, s) = (float)acc(j, s) * (scale[j] * sx[s]) + b[j], then relu if asked,
 * acc(j, s) = sum_i q(j, i) qx(i, s), exact in int32.
 *
 * Pre-packed weights (pykd_i8_pack, once per model; the model's i32 slice of
 * a dense_int8 layer, derived from q and never saved). With G = ceil(n_out /
 * 16) groups of 16 outputs and NQ = ceil(n_in / 4) quads of inputs, in int32
 * words:
 *   [0, 16 G)              csum[j] = 128 * sum_i q(j, i) (0 past n_out)
 *   16 G + (g NQ + k) 16 + jj   the 4 bytes q(16 g + jj, 4 k + t), t = 0..3
 *                          (0 past n_in or n_out)
 * so one 64-byte load holds 4 inputs x 16 outputs, the layout of vpdpbusd
 * on a zmm register (two ymm halves of 8 outputs for the 256-bit paths).
 *
 * The offset trick: vpdpbusd multiplies unsigned by signed bytes, so the
 * activations qx in [-127, 127] (or [-128, 127] for pykd.int8_gemm) are
 * stored as u = qx + 128 in [0, 255] and acc = sum q u - csum. Every step
 * wraps modulo 2**32 and the true sum fits int32 (n_in <= 131071), so acc is
 * exact whatever the order of the additions.
 *
 * Paths: portable (plain C, any CPU), avx2 (exact: bytes widened to int16,
 * vpmaddwd; never vpmaddubsw, which saturates), avxvnni (vpdpbusd on ymm)
 * and avx512vnni (vpdpbusd on zmm, masked tails). All give the same int32
 * sums, quantize with the same float operations (x * (1 / sx), round half
 * to even, clamp) and rescale with one float32 multiply and one add: no FMA
 * on any path (built with -ffp-contract=off and no "fma" target), so all
 * paths give the same bits. PYKD_INT8_PATH=portable|avx2|avxvnni|avx512vnni
 * forces one when the CPU has it; otherwise the best one the CPU has runs.
 */
#pragma GCC optimize("fp-contract=off")
#include <float.h>
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

static int cpu_has(int p)
{
    if (p == P_PORTABLE) return 1;
#ifdef PYKD_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2")) return 0;
    if (p == P_AVX2) return 1;
    if (p == P_AVXVNNI) return __builtin_cpu_supports("avxvnni") != 0;
    if (p == P_AVX512VNNI)
        return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512f");
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
#define QMAX 127.0f

/* ---- the packed weights ------------------------------------------------- */

static inline int64_t groups(int n_out) { return ((int64_t)n_out + 15) / 16; }
static inline int64_t quads(int n_in) { return ((int64_t)n_in + 3) / 4; }

/* int32 words of the packed copy of a q(n_out, n_in) (0 for bad sizes). */
int64_t pykd_i8_packed_words(int n_out, int n_in)
{
    if (n_out < 1 || n_in < 1) return 0;
    return 16 * groups(n_out) * (1 + quads(n_in));
}

/* packed = the layout above for Fortran q(n_out, n_in) (C q[i][j], the
 * model's buffer), pykd_i8_packed_words words. */
void pykd_i8_pack(int n_out, int n_in, const int8_t *q, int32_t *packed)
{
    int64_t G = groups(n_out), NQ = quads(n_in);
    uint8_t *w = (uint8_t *)(packed + 16 * G);
    memset(packed, 0, sizeof(int32_t) * (size_t)pykd_i8_packed_words(n_out, n_in));
    for (int j = 0; j < n_out; j++) {
        int64_t sum = 0;
        for (int i = 0; i < n_in; i++) {
            int8_t v = q[(ptrdiff_t)i * n_out + j];
            sum += v;
            w[(((j / 16) * NQ + i / 4) * 16 + j % 16) * 4 + i % 4] = (uint8_t)v;
        }
        packed[j] = (int32_t)(128 * sum);   /* |sum| <= 131071 * 128: fits */
    }
}

/* ---- activation quantization -------------------------------------------
 * Column s of x (n_in floats) into u(ldx bytes) = qx + 128, padding 128
 * (qx = 0); sx[s] = x_scale (static, > 0) or max|x| / 127 (dynamic, at least
 * FLT_MIN, 1 for an all-zero column); qx = clamp(rint(x * (1 / sx)), -127,
 * 127), round half to even. Returns 1 if the column holds NaN or inf (its u
 * and sx are then meaningless). The same float operations on every path. */

static inline float scale_of(float amax)
{
    if (!(amax > 0)) return 1.0f;
    float s = amax / QMAX;
    return s < FLT_MIN ? FLT_MIN : s;
}

static int quantize_portable(int n_in, int ldx, const float *x, float x_scale, uint8_t *u,
                             float *sx)
{
    uint32_t bits = 0;   /* the bit-pattern max of |x|: NaN and inf are the largest */
    for (int i = 0; i < n_in; i++) {
        uint32_t v;
        memcpy(&v, x + i, sizeof v);
        v &= 0x7fffffffu;
        bits = v > bits ? v : bits;
    }
    float amax;
    memcpy(&amax, &bits, sizeof amax);
    int bad = bits >= 0x7f800000u;
    float s = x_scale > 0 ? x_scale : scale_of(amax);
    float inv = 1.0f / s;
    *sx = s;
    for (int i = 0; i < n_in; i++) {
        float v = x[i] * inv;
        v = v >= -QMAX ? v : -QMAX;     /* NaN -> -127: defined, and flagged */
        v = v <= QMAX ? v : QMAX;
        v = (v + 12582912.0f) - 12582912.0f;   /* round half to even (|v| < 2**22) */
        u[i] = (uint8_t)((int)v + 128);
    }
    memset(u + n_in, 128, (size_t)(ldx - n_in));
    return bad;
}

#ifdef PYKD_X86
#define T512 "avx2,avx512f,avx512bw,avx512vl,avx512vnni"

/* The bit-pattern max of |x|: for finite x the integer order is the float
 * order, and NaN or inf have the largest patterns. */
static __attribute__((target(T512))) uint32_t absmax_bits_512(int n_in, const float *x)
{
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    __m512i m0 = _mm512_setzero_si512(), m1 = m0;
    int i = 0;
    for (; i + 32 <= n_in; i += 32) {
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(x + i), absmask));
        m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(x + i + 16), absmask));
    }
    for (; i < n_in; i += 16) {
        __mmask16 m = n_in - i >= 16 ? 0xffff : (__mmask16)((1u << (n_in - i)) - 1);
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_maskz_loadu_epi32(m, x + i), absmask));
    }
    return _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
}

/* u = clamp(rint(x * inv), -127, 127) + 128, then padding 128 up to ldx.
 * 64 values per step: clamp above in float (so cvtps2dq never sees a value
 * above 127; NaN -> 127: its sample is flagged), round half to even
 * (MXCSR), narrow with the saturating packs (anything below -128, and
 * cvtps2dq's 0x80000000 for -inf or huge, becomes -128), then the byte max
 * with -127: the same bytes as clamping both sides first, in 19 instead of
 * 32 instructions. Dynamic scales (CLAMP 0) need no clamp at all: with
 * inv = 1 / (max|x| / 127), |x * inv| <= 127 (1 + 4 ulp) < 127.5, so
 * every value rounds into [-127, 127] (a NaN or inf sample is flagged and
 * its bytes never used). The tail takes 16 at a time, clamped in float. */
static inline __attribute__((always_inline, target(T512))) void quantize_row_512(
    const int CLAMP, int n_in, int ldx, const float *x, float inv1, uint8_t *u)
{
    const __m512 inv = _mm512_set1_ps(inv1), lo = _mm512_set1_ps(-QMAX), hi = _mm512_set1_ps(QMAX);
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i bmin = _mm512_set1_epi8(-127), boff = _mm512_set1_epi8((char)0x80);
    int i = 0;
#define QI(v) _mm512_cvtps_epi32(CLAMP ? _mm512_min_ps(_mm512_mul_ps(v, inv), hi) : _mm512_mul_ps(v, inv))
    for (; i + 64 <= n_in; i += 64) {
        __m512i a = _mm512_packs_epi32(QI(_mm512_loadu_ps(x + i)), QI(_mm512_loadu_ps(x + i + 16)));
        __m512i b = _mm512_packs_epi32(QI(_mm512_loadu_ps(x + i + 32)), QI(_mm512_loadu_ps(x + i + 48)));
        /* per 128-bit lane k: dwords (x[4k..], x[16 + 4k..], x[32 + 4k..], x[48 + 4k..]) */
        __m512i c = _mm512_permutexvar_epi32(order, _mm512_packs_epi16(a, b));
        if (CLAMP) c = _mm512_max_epi8(c, bmin);
        _mm512_storeu_si512(u + i, _mm512_xor_si512(c, boff));
    }
#undef QI
    const __m128i off = _mm_set1_epi8((char)0x80);
#define QV(v) _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(                    \
                  _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), lo), hi))), off)
    for (; i + 16 <= n_in; i += 16)
        _mm_storeu_si128((__m128i *)(u + i), QV(_mm512_loadu_ps(x + i)));
    for (; i < ldx; i += 16) {   /* the tail and the padding (0 * inv -> 128) */
        int nx = n_in - i > 0 ? n_in - i : 0, nu = ldx - i < 16 ? ldx - i : 16;
        __mmask16 m = (__mmask16)((1u << nx) - 1), mw = (__mmask16)((1u << nu) - 1);
        _mm_mask_storeu_epi8(u + i, mw, QV(_mm512_maskz_loadu_ps(m, x + i)));
    }
#undef QV
}

/* Samples [s0, s1): in blocks of 8, first every sample's max, then the
 * scales, then the bytes, so the samples' chains (reduction, two
 * divisions, the pass that needs their result) overlap instead of running
 * one after another (short rows were latency bound: 25 ns each at 200
 * inputs); 8 rows of x stay in L1 between the two passes. */
static __attribute__((target(T512))) int quantize_512(int n_in, int ldx, const float *x, int s0,
                                                      int s1, float x_scale, uint8_t *u, float *sx)
{
    int bad = 0;
    for (int b0 = s0; b0 < s1; b0 += 8) {
        int nb = s1 - b0 < 8 ? s1 - b0 : 8;
        uint32_t bits[8];
        float inv[8];
        for (int r = 0; r < nb; r++)
            bits[r] = absmax_bits_512(n_in, x + (ptrdiff_t)(b0 + r) * n_in);
        for (int r = 0; r < nb; r++) {
            float a;
            memcpy(&a, bits + r, sizeof a);
            float sc = x_scale > 0 ? x_scale : scale_of(a);
            sx[b0 + r] = sc;
            inv[r] = 1.0f / sc;
            bad += bits[r] >= 0x7f800000u;
        }
        for (int r = 0; r < nb; r++) {
            const float *xr = x + (ptrdiff_t)(b0 + r) * n_in;
            uint8_t *ur = u + (ptrdiff_t)(b0 + r) * ldx;
            if (x_scale > 0)
                quantize_row_512(1, n_in, ldx, xr, inv[r], ur);
            else
                quantize_row_512(0, n_in, ldx, xr, inv[r], ur);
        }
    }
    return bad;
}

__attribute__((target("avx2"))) static int quantize_256(int n_in, int ldx, const float *x,
                                                        float x_scale, uint8_t *u, float *sx)
{
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
    __m256i m0 = _mm256_setzero_si256(), m1 = m0;
    int i = 0;
    for (; i + 16 <= n_in; i += 16) {   /* the bit-pattern max, as quantize_512 */
        m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), absmask));
        m1 = _mm256_max_epu32(m1, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i + 8)), absmask));
    }
    uint32_t lanes[8], bits = 0;
    _mm256_storeu_si256((__m256i *)lanes, _mm256_max_epu32(m0, m1));
    for (int k = 0; k < 8; k++) bits = lanes[k] > bits ? lanes[k] : bits;
    for (; i < n_in; i++) {
        uint32_t v;
        memcpy(&v, x + i, sizeof v);
        v &= 0x7fffffffu;
        bits = v > bits ? v : bits;
    }
    float a;
    memcpy(&a, &bits, sizeof a);
    float s = x_scale > 0 ? x_scale : scale_of(a);
    float inv1 = 1.0f / s;
    const __m256 inv = _mm256_set1_ps(inv1), lo = _mm256_set1_ps(-QMAX), hi = _mm256_set1_ps(QMAX);
    const __m256i off = _mm256_set1_epi32(128);
    *sx = s;
    for (i = 0; i + 8 <= n_in; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), inv);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        __m256i r = _mm256_add_epi32(_mm256_cvtps_epi32(v), off);
        __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storel_epi64((__m128i *)(u + i), _mm_packus_epi16(w, w));
    }
    for (; i < n_in; i++) {   /* the scalar steps of quantize_portable */
        float v = x[i] * inv1;
        v = v >= -QMAX ? v : -QMAX;
        v = v <= QMAX ? v : QMAX;
        v = (v + 12582912.0f) - 12582912.0f;
        u[i] = (uint8_t)((int)v + 128);
    }
    memset(u + n_in, 128, (size_t)(ldx - n_in));
    return bits >= 0x7f800000u;
}
#endif

/* Samples [s0, s1) of x(n_in, n) into u(ldx, n) and sx; the count of
 * samples with NaN or inf. */
int pykd_i8_quantize(int path, int n_in, int ldx, const float *x, int s0, int s1, float x_scale,
                     uint8_t *u, float *sx)
{
    int bad = 0;
    (void)path;   /* one path without SIMD */
#ifdef PYKD_X86
    if (path == P_AVX512VNNI) return quantize_512(n_in, ldx, x, s0, s1, x_scale, u, sx);
#endif
    for (int s = s0; s < s1; s++) {
        const float *xs = x + (ptrdiff_t)s * n_in;
        uint8_t *us = u + (ptrdiff_t)s * ldx;
#ifdef PYKD_X86
        if (path != P_PORTABLE)
            bad += quantize_256(n_in, ldx, xs, x_scale, us, sx + s);
        else
#endif
            bad += quantize_portable(n_in, ldx, xs, x_scale, us, sx + s);
    }
    return bad;
}

/* What a tile does with its sums: y (rescale, bias, relu) or raw int32. */
typedef struct {
    int n_out, act;
    const float *scale, *sx, *b;
    float *y;        /* y(n_out, n), or NULL: */
    int32_t *raw;    /* raw(n_out, n) = acc */
} sink_t;

/* One output: the rescale of every path (z < 0 ? 0 : z keeps NaN and -0.0,
 * as pykd_activation's relu). */
static inline float rescale1(int32_t acc, float scale, float sx, float b, int act)
{
    float m = scale * sx;
    float p = (float)acc * m;
    float z = p + b;
    return (act == ACT_RELU && z < 0.0f) ? 0.0f : z;
}

/* ---- portable: plain C on the packed layout ---------------------------- */

static void portable_range(int n_in, const int32_t *packed, const uint8_t *u, int ldx, int s0,
                           int s1, int g0, int g1, const sink_t *o)
{
    int64_t G = groups(o->n_out), NQ = quads(n_in);
    const uint8_t *w = (const uint8_t *)(packed + 16 * G);
    for (int s = s0; s < s1; s++) {
        const uint8_t *us = u + (ptrdiff_t)s * ldx;
        for (int g = g0; g < g1; g++) {
            uint32_t acc[16] = {0};   /* unsigned: wraps modulo 2**32, as the SIMD paths */
            const int8_t *wg = (const int8_t *)w + g * NQ * 64;
            for (int64_t k = 0; k < NQ; k++) {
                const int8_t *wk = wg + 64 * k;
                int32_t u0 = us[4 * k], u1 = us[4 * k + 1], u2 = us[4 * k + 2], u3 = us[4 * k + 3];
                for (int jj = 0; jj < 16; jj++)   /* |4 products| < 2**17: no overflow */
                    acc[jj] += (uint32_t)(wk[4 * jj] * u0 + wk[4 * jj + 1] * u1 +
                                          wk[4 * jj + 2] * u2 + wk[4 * jj + 3] * u3);
            }
            for (int jj = 0; jj < 16 && 16 * g + jj < o->n_out; jj++) {
                int j = 16 * g + jj;
                int32_t a = (int32_t)(acc[jj] - (uint32_t)packed[j]);
                if (o->raw)
                    o->raw[(ptrdiff_t)s * o->n_out + j] = a;
                else
                    o->y[(ptrdiff_t)s * o->n_out + j] =
                        rescale1(a, o->scale[j], o->sx[s], o->b[j], o->act);
            }
        }
    }
}

#ifdef PYKD_X86
/* ---- avx512vnni: vpdpbusd on zmm -----------------------------------------
 * A tile: NJ groups x NS samples of zmm accumulators (at most 8 x 1 or
 * 4 x 6), one 64-byte load per group and quad, one broadcast per sample and
 * quad; the epilogue subtracts csum, rescales and stores with a mask on the
 * last group. */
#define NS512 12

/* acc += the 4-byte dot products of u8 x and s8 w. Inline asm, because
 * GCC 12 keeps the intrinsics' accumulators in registers poorly (a copy
 * per vpdpbusd in the tile loop: 4x slower); "+v" pins acc to one register. */
#define DPBUSD512(acc, x, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "vm"(w))
#define DPBUSD256(acc, x, w) __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(x), "xm"(w))

/* The epilogue of a zmm tile, one group (16 outputs) at a time: z_col
 * loads what the group's outputs share, z_out finishes one sample's
 * accumulator. One call per named accumulator: an array of them (as an
 * earlier version passed) made GCC zero-fill 6 kB of stack and spill every
 * accumulator per tile, ~200 cycles a tile (a third of a 200-input layer). */
typedef struct {
    __mmask16 m;
    __m512i cs;        /* csum */
    __m512 sc, bb;     /* scale and b (0 past n_out) */
} zcol_t;

static inline __attribute__((always_inline, target(T512))) zcol_t z_col(const int32_t *packed,
                                                                        int g, const sink_t *o)
{
    zcol_t c;
    int j = 16 * g, left = o->n_out - j;
    c.m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
    c.cs = _mm512_loadu_si512(packed + j);   /* csum: 16 G words, padded */
    c.sc = c.bb = _mm512_setzero_ps();
    if (!o->raw) {
        c.sc = _mm512_maskz_loadu_ps(c.m, o->scale + j);   /* no fault past n_out */
        c.bb = _mm512_maskz_loadu_ps(c.m, o->b + j);
    }
    return c;
}

static inline __attribute__((always_inline, target(T512))) void z_out(const zcol_t *c,
                                                                      __m512i acc, int s, int g,
                                                                      const sink_t *o)
{
    __m512i a = _mm512_sub_epi32(acc, c->cs);
    ptrdiff_t at = (ptrdiff_t)s * o->n_out + 16 * g;
    if (o->raw) {
        _mm512_mask_storeu_epi32(o->raw + at, c->m, a);
        return;
    }
    __m512 mm = _mm512_mul_ps(c->sc, _mm512_set1_ps(o->sx[s]));
    __m512 z = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), mm), c->bb);
    /* max(0, z) is z < 0 ? 0 : z: vmaxps returns its second operand for
     * two zeros (-0.0 stays) and for a NaN. */
    if (o->act == ACT_RELU) z = _mm512_max_ps(_mm512_setzero_ps(), z);
    _mm512_mask_storeu_ps(o->y + at, c->m, z);
}

/* The accumulators are named variables, not an array: GCC 12 keeps an
 * array of them on the stack (a load and store around every vpdpbusd). */
#define ZB(r) _mm512_set1_epi32(load4(u + (ptrdiff_t)(r) * ldx + 4 * k))

static inline int32_t load4(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* NJ (1 or 2) groups x NS (1..12) samples. */
static inline __attribute__((always_inline, target(T512))) void z_tile(
    const int NJ, const int NS, int NQ, const int32_t *packed, const int32_t *wg, int64_t gstride,
    const uint8_t *u, int ldx, int s, int g, const sink_t *o)
{
#define ZDECL(r) __m512i p##r = _mm512_setzero_si512(), q##r = _mm512_setzero_si512();
    ZDECL(0) ZDECL(1) ZDECL(2) ZDECL(3) ZDECL(4) ZDECL(5)
    ZDECL(6) ZDECL(7) ZDECL(8) ZDECL(9) ZDECL(10) ZDECL(11)
    for (int k = 0; k < NQ; k++) {
        __m512i w0 = _mm512_loadu_si512(wg + 16 * k), w1 = w0;
        if (NJ > 1) w1 = _mm512_loadu_si512(wg + gstride + 16 * k);
#define ZSTEP(r)                              \
        if (NS > r) {                         \
            __m512i xb = ZB(r);               \
            DPBUSD512(p##r, xb, w0);          \
            if (NJ > 1) DPBUSD512(q##r, xb, w1); \
        }
        ZSTEP(0) ZSTEP(1) ZSTEP(2) ZSTEP(3) ZSTEP(4) ZSTEP(5)
        ZSTEP(6) ZSTEP(7) ZSTEP(8) ZSTEP(9) ZSTEP(10) ZSTEP(11)
    }
    /* Copies of the sink's fields: the stores to y could alias *o. */
    const sink_t oc = *o;
    zcol_t c0 = z_col(packed, g, &oc), c1 = c0;
    if (NJ > 1) c1 = z_col(packed, g + 1, &oc);
#define ZOUT(r)                                                \
    if (NS > r) {                                              \
        z_out(&c0, p##r, s + r, g, &oc);                       \
        if (NJ > 1) z_out(&c1, q##r, s + r, g + 1, &oc);       \
    }
    ZOUT(0) ZOUT(1) ZOUT(2) ZOUT(3) ZOUT(4) ZOUT(5)
    ZOUT(6) ZOUT(7) ZOUT(8) ZOUT(9) ZOUT(10) ZOUT(11)
#undef ZOUT
}

/* One sample, NJ (1..8) groups: NJ independent sums per quad. */
static inline __attribute__((always_inline, target(T512))) void z_tile1(
    const int NJ, int NQ, const int32_t *packed, const int32_t *wg, int64_t gstride,
    const uint8_t *u, int ldx, int s, int g, const sink_t *o)
{
    ZDECL(0) ZDECL(1) ZDECL(2) ZDECL(3)
    (void)ldx;
    for (int k = 0; k < NQ; k++) {
        __m512i xb = ZB(0);
#define ZONE(c, acc) if (NJ > c) DPBUSD512(acc, xb, _mm512_loadu_si512(wg + c * gstride + 16 * k));
        ZONE(0, p0) ZONE(1, p1) ZONE(2, p2) ZONE(3, p3)
        ZONE(4, q0) ZONE(5, q1) ZONE(6, q2) ZONE(7, q3)
    }
    const sink_t oc = *o;
#define ZOUT1(c, acc) \
    if (NJ > c) { zcol_t cc = z_col(packed, g + c, &oc); z_out(&cc, acc, s, g + c, &oc); }
    ZOUT1(0, p0) ZOUT1(1, p1) ZOUT1(2, p2) ZOUT1(3, p3)
    ZOUT1(4, q0) ZOUT1(5, q1) ZOUT1(6, q2) ZOUT1(7, q3)
#undef ZOUT1
}

#define Z_CASE(NJ, NS) \
    case NJ * 16 + NS: z_tile(NJ, NS, NQ, packed, wg, gs, us, ldx, s, g, o); break;
#define Z_ONE(NJ) \
    case NJ * 16 + 1: z_tile1(NJ, NQ, packed, wg, gs, us, ldx, s, g, o); break;

/* One sample: up to 8 groups per tile (8 independent sums). More: panels
 * of 2 groups (2 x 16 outputs x n_in bytes, in L1 for n_in <= ~800) times
 * blocks of up to 12 samples (24 accumulators): per quad 2 loads of
 * weights and 12 broadcasts feed 24 vpdpbusd. */
static __attribute__((target(T512))) void z_range(int n_in, const int32_t *packed,
                                                  const uint8_t *u, int ldx, int s0, int s1,
                                                  int g0, int g1, const sink_t *o)
{
    int NQ = (int)quads(n_in);
    int64_t G = groups(o->n_out), gs = 16 * (int64_t)NQ;
    int nj_max = s1 - s0 == 1 ? 8 : 2;
    for (int g = g0; g < g1; g += nj_max) {
        int nj = g1 - g < nj_max ? g1 - g : nj_max;
        const int32_t *wg = packed + 16 * G + g * gs;
        for (int s = s0; s < s1; s += NS512) {
            int ns = s1 - s < NS512 ? s1 - s : NS512;
            const uint8_t *us = u + (ptrdiff_t)s * ldx;
            switch (nj * 16 + ns) {
                Z_ONE(1) Z_ONE(2) Z_ONE(3) Z_ONE(4)
                Z_ONE(5) Z_ONE(6) Z_ONE(7) Z_ONE(8)
                Z_CASE(1, 2) Z_CASE(2, 2) Z_CASE(1, 3) Z_CASE(2, 3)
                Z_CASE(1, 4) Z_CASE(2, 4) Z_CASE(1, 5) Z_CASE(2, 5)
                Z_CASE(1, 6) Z_CASE(2, 6) Z_CASE(1, 7) Z_CASE(2, 7)
                Z_CASE(1, 8) Z_CASE(2, 8) Z_CASE(1, 9) Z_CASE(2, 9)
                Z_CASE(1, 10) Z_CASE(2, 10) Z_CASE(1, 11) Z_CASE(2, 11)
                Z_CASE(1, 12) Z_CASE(2, 12)
            default: break;
            }
        }
    }
}

/* ---- avxvnni and avx2: ymm, 8 outputs (half a group) per register -------
 * A tile: NH halves x NS samples. avxvnni: one vpdpbusd per half, sample
 * and quad. avx2 (exact): each 16 bytes of weights (4 outputs x 4 inputs)
 * sign-extended to int16, the sample's 4 bytes zero-extended and repeated,
 * vpmaddwd gives 2 partial sums per output; two accumulators per half, and
 * one vphaddd + permute at the end put the 8 outputs in order. */
#define NS256 3
#define NH_MAX 4

static inline __attribute__((always_inline, target("avx2"))) void y_epilogue(
    const int NH, const int NS, __m256i acc[NH_MAX][NS256], const int32_t *packed, int s, int h0,
    const sink_t *o)
{
    _Pragma("GCC unroll 8")
    for (int c = 0; c < NH; c++) {
        int j = 8 * (h0 + c), left = o->n_out - j;
        if (left <= 0) continue;
        __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes);
        __m256i cs = _mm256_loadu_si256((const __m256i *)(packed + j));
        __m256 sc = o->raw ? _mm256_setzero_ps() : _mm256_maskload_ps(o->scale + j, m);
        __m256 bb = o->raw ? _mm256_setzero_ps() : _mm256_maskload_ps(o->b + j, m);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < NS; r++) {
            __m256i a = _mm256_sub_epi32(acc[c][r], cs);
            ptrdiff_t at = (ptrdiff_t)(s + r) * o->n_out + j;
            if (o->raw) {
                _mm256_maskstore_epi32(o->raw + at, m, a);
                continue;
            }
            __m256 mm = _mm256_mul_ps(sc, _mm256_set1_ps(o->sx[s + r]));
            __m256 z = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), mm), bb);
            if (o->act == ACT_RELU)
                z = _mm256_andnot_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ), z);
            _mm256_maskstore_ps(o->y + at, m, z);
        }
    }
}

/* The words of half h (8 outputs) at quad k. */
#define HALF(h, k) (w + ((h) >> 1) * gs + 16 * (int64_t)(k) + 8 * ((h) & 1))

/* Named accumulators (see z_tile): A##c##r for half c, sample r. */
#define YDECL(P)                                                                \
    __m256i P##00 = _mm256_setzero_si256(), P##01 = P##00, P##02 = P##00,       \
            P##10 = P##00, P##11 = P##00, P##12 = P##00, P##20 = P##00,         \
            P##21 = P##00, P##22 = P##00, P##30 = P##00, P##31 = P##00, P##32 = P##00;
#define YOUT(P, acc)                                                            \
    __m256i acc[NH_MAX][NS256] = {{P##00, P##01, P##02}, {P##10, P##11, P##12}, \
                                  {P##20, P##21, P##22}, {P##30, P##31, P##32}};
#define YB(r) _mm256_set1_epi32(load4(u + (ptrdiff_t)(r) * ldx + 4 * k))

static inline __attribute__((always_inline, target("avx2,avxvnni"))) void v_tile(
    const int NH, const int NS, int NQ, const int32_t *packed, const int32_t *w, int64_t gs,
    const uint8_t *u, int ldx, int s, int h0, const sink_t *o)
{
    YDECL(a)
    for (int k = 0; k < NQ; k++) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)HALF(h0, k)), w1 = w0, w2 = w0, w3 = w0;
        if (NH > 1) w1 = _mm256_loadu_si256((const __m256i *)HALF(h0 + 1, k));
        if (NH > 2) w2 = _mm256_loadu_si256((const __m256i *)HALF(h0 + 2, k));
        if (NH > 3) w3 = _mm256_loadu_si256((const __m256i *)HALF(h0 + 3, k));
#define VSTEP(r)                                                                \
        if (NS > r) {                                                           \
            __m256i xb = YB(r);                                                 \
            DPBUSD256(a0##r, xb, w0);                                           \
            if (NH > 1) DPBUSD256(a1##r, xb, w1);                               \
            if (NH > 2) DPBUSD256(a2##r, xb, w2);                               \
            if (NH > 3) DPBUSD256(a3##r, xb, w3);                               \
        }
        VSTEP(0) VSTEP(1) VSTEP(2)
    }
    YOUT(a, acc)
    y_epilogue(NH, NS, acc, packed, s, h0, o);
}

static inline __attribute__((always_inline, target("avx2"))) void a_tile(
    const int NH, const int NS, int NQ, const int32_t *packed, const int32_t *w, int64_t gs,
    const uint8_t *u, int ldx, int s, int h0, const sink_t *o)
{
    YDECL(l) YDECL(h)
    for (int k = 0; k < NQ; k++) {
        __m256i wl0, wh0, wl1 = _mm256_setzero_si256(), wh1 = wl1, wl2 = wl1, wh2 = wl1,
                          wl3 = wl1, wh3 = wl1;
#define AW(c)                                                                   \
        if (NH > c) {                                                           \
            const __m128i *p = (const __m128i *)HALF(h0 + c, k);                \
            wl##c = _mm256_cvtepi8_epi16(_mm_loadu_si128(p));      /* outputs 0-3 */ \
            wh##c = _mm256_cvtepi8_epi16(_mm_loadu_si128(p + 1));  /* outputs 4-7 */ \
        }
        wl0 = wh0 = _mm256_setzero_si256();
        AW(0) AW(1) AW(2) AW(3)
#define AMAC(c, r)                                                              \
        if (NH > c) {                                                           \
            l##c##r = _mm256_add_epi32(l##c##r, _mm256_madd_epi16(wl##c, xb));  \
            h##c##r = _mm256_add_epi32(h##c##r, _mm256_madd_epi16(wh##c, xb));  \
        }
#define ASTEP(r)                                                                \
        if (NS > r) {                                                           \
            __m256i xb = _mm256_cvtepu8_epi16(_mm_set1_epi32(load4(u + (ptrdiff_t)(r) * ldx + 4 * k))); \
            AMAC(0, r) AMAC(1, r) AMAC(2, r) AMAC(3, r)                         \
        }
        ASTEP(0) ASTEP(1) ASTEP(2)
    }
    YOUT(l, lo) YOUT(h, hi)
    __m256i acc[NH_MAX][NS256];
    for (int c = 0; c < NH; c++)
        for (int r = 0; r < NS; r++)   /* (0 1 4 5 | 2 3 6 7) -> 0 .. 7 */
            acc[c][r] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo[c][r], hi[c][r]), 0xd8);
    y_epilogue(NH, NS, acc, packed, s, h0, o);
}

#define Y_CASE(T, NH, NS) \
    case NH * 8 + NS: T##_tile(NH, NS, NQ, packed, w, gs, us, ldx, s, h, o); break;

#define DEFINE_YRANGE(T, TARGET, NHM)                                                          \
    static __attribute__((target(TARGET))) void T##_range(int n_in, const int32_t *packed,     \
        const uint8_t *u, int ldx, int s0, int s1, int g0, int g1, const sink_t *o)             \
    {                                                                                           \
        int NQ = (int)quads(n_in);                                                              \
        int64_t G = groups(o->n_out), gs = 16 * (int64_t)NQ;                                    \
        const int32_t *w = packed + 16 * G;                                                     \
        int h1 = 2 * g1 < (o->n_out + 7) / 8 ? 2 * g1 : (o->n_out + 7) / 8;                     \
        for (int s = s0; s < s1; s += NS256) {                                                  \
            int ns = s1 - s < NS256 ? s1 - s : NS256, nh_max = ns == 1 ? NH_MAX : NHM;          \
            const uint8_t *us = u + (ptrdiff_t)s * ldx;                                         \
            for (int h = 2 * g0; h < h1; h += nh_max) {                                         \
                int nh = h1 - h < nh_max ? h1 - h : nh_max;                                     \
                switch (nh * 8 + ns) {                                                          \
                    Y_CASE(T, 1, 1) Y_CASE(T, 2, 1) Y_CASE(T, 3, 1) Y_CASE(T, 4, 1)             \
                    Y_CASE(T, 1, 2) Y_CASE(T, 2, 2) Y_CASE(T, 3, 2) Y_CASE(T, 4, 2)             \
                    Y_CASE(T, 1, 3) Y_CASE(T, 2, 3) Y_CASE(T, 3, 3) Y_CASE(T, 4, 3)             \
                default: break;                                                                 \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_YRANGE(v, "avx2,avxvnni", 4)
DEFINE_YRANGE(a, "avx2", 2)
#endif

/* The product and its sink for samples [s0, s1) and output groups [g0, g1)
 * (0-based, half open) on the chosen path. Threads call it on disjoint
 * ranges; it reads packed, u, scale, sx, b and writes only its part. */
static void run_range(int path, int n_in, const int32_t *packed, const uint8_t *u, int ldx,
                      int s0, int s1, int g0, int g1, const sink_t *o)
{
    switch (path) {
#ifdef PYKD_X86
    case P_AVX2: a_range(n_in, packed, u, ldx, s0, s1, g0, g1, o); return;
    case P_AVXVNNI: v_range(n_in, packed, u, ldx, s0, s1, g0, g1, o); return;
    case P_AVX512VNNI: z_range(n_in, packed, u, ldx, s0, s1, g0, g1, o); return;
#endif
    default: portable_range(n_in, packed, u, ldx, s0, s1, g0, g1, o);
    }
}

/* y(j, s) for samples [s0, s1), groups of 16 outputs [g0, g1): the product
 * on the quantized u(ldx, n), sx, then the rescale, bias and relu (act ==
 * ACT_RELU; other codes: the caller applies them). */
void pykd_i8_dense(int path, int n_out, int n_in, const int32_t *packed, const uint8_t *u,
                   int ldx, int s0, int s1, int g0, int g1, const float *scale, const float *sx,
                   const float *b, int act, float *y)
{
    sink_t o = {n_out, act, scale, sx, b, y, NULL};
    run_range(path, n_in, packed, u, ldx, s0, s1, g0, g1, &o);
}

/* The exact int32 sums alone, raw(j, s), for u = qx + 128 (pykd.int8_gemm;
 * q and qx may hold -128). */
void pykd_i8_gemm(int path, int n_out, int n_in, const int32_t *packed, const uint8_t *u, int ldx,
                  int s0, int s1, int g0, int g1, int32_t *raw)
{
    sink_t o = {n_out, 0, NULL, NULL, NULL, NULL, raw};
    run_range(path, n_in, packed, u, ldx, s0, s1, g0, g1, &o);
}

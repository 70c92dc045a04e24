/* Probe (issue 11, "float32 batch 256: no slower than ONNX Runtime"): could a
 * pykd batch kernel for the dense layer's forward beat OpenBLAS's sgemm (plus
 * the bias/relu pass) at the student's shapes on one thread, keeping the
 * bits of the batch-1 kernel pykd_f32_gemv? docs/performance.md, "Tried and
 * not kept", has the answer measured on AMD EPYC Zen 4: no.
 *
 * y(j, s) = relu(sum_k w(j, k) x(k, s) + b(j)), w Fortran (n_out, n_in)
 * (input k's outputs contiguous), x (n_in, n), y (n_out, n). Each kernel
 * but the last sums every output in input order from 0 with one multiply
 * and one add per term (no FMA), as pykd_f32_gemv; the probe checks their
 * bits against pykd_f32_gemv sample by sample. Kernels (avx512):
 *   inplace   register tile of TS samples x TV zmm vectors of outputs, W read
 *             in place, x broadcast in the loop, bias and relu fused, masked
 *             last vector (the design of the Zen 5 attempt)
 *   packed    the same on a packed copy of W (panels of 16 TV outputs, each
 *             input's row 64-byte aligned and contiguous, zero-padded)
 *   prebcast  packed W, x broadcast once per chunk of KC inputs into a buffer
 *             every panel loads (no broadcast in the inner loop)
 *   replic    no broadcast anywhere in the loop: a zmm lane is (output, sample),
 *             W copied 4 times (w4), x repeated 4 times per chunk
 *   pack-fma  packed with one FMA per term (acc = fma(w, x, acc): other bits,
 *             checked against a scalar fmaf loop): OpenBLAS's arithmetic
 * It also times the inner loop alone with its operands in L1 (the ceiling
 * of each form). Shapes: the student 784-200-200-10 at 256 samples and at
 * 128 (network_forward's slice per thread on 2 threads), 1200 x 1200.
 *
 * Build (from the repository root; -DTS= -DTV= choose the tile, 4 x 6 default):
 *   gcc -O3 -ffp-contract=off -Ifortran/kernels benchmarks/gemm_f32_probe.c \
 *       fortran/kernels/pykd_dense_simd.c fortran/kernels/pykd_cpu_path.c \
 *       -o /tmp/gemm_probe -lopenblas -lm
 * Run (one thread, OpenBLAS's own kernel choice; the argument is the rounds):
 *   env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 /tmp/gemm_probe 21
 * Times are thread CPU time (the VM is shared), the kernels alternate within
 * each round, medians over the rounds.
 */
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void sgemm_(const char *ta, const char *tb, const int *m, const int *n, const int *k,
            const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
            const float *beta, float *c, const int *ldc);
void openblas_set_num_threads(int);
void pykd_f32_gemv(int n_out, int n_in, const float *w, const float *x, int j0, int j1,
                   const float *b, int act, float *y);

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define AVX512 __attribute__((target("avx512f,fma")))

/* ---- variant A: W read in place, S samples x NV zmm vectors per tile ---- */
AVX512 static inline __attribute__((always_inline)) void
tile(const int S, const int NV, int n_out, int n_in, const float *w, const float *x, int j,
     __mmask16 last, const float *b, int act, float *y)
{
    __m512 acc[8][6];
    for (int s = 0; s < S; s++)
        for (int v = 0; v < NV; v++) acc[s][v] = _mm512_setzero_ps();
    const float *col = w + j;
    for (int i = 0; i < n_in; i++, col += n_out) {
        __m512 wv[6];
        for (int v = 0; v < NV - 1; v++) wv[v] = _mm512_loadu_ps(col + 16 * v);
        wv[NV - 1] = _mm512_maskz_loadu_ps(last, col + 16 * (NV - 1));
        for (int s = 0; s < S; s++) {
            __m512 xb = _mm512_set1_ps(x[(size_t)s * n_in + i]);
            for (int v = 0; v < NV; v++)
                acc[s][v] = _mm512_add_ps(acc[s][v], _mm512_mul_ps(wv[v], xb));
        }
    }
    const __m512 zero = _mm512_setzero_ps();
    for (int v = 0; v < NV; v++) {
        __mmask16 m = v == NV - 1 ? last : (__mmask16)0xFFFF;
        __m512 bv = _mm512_maskz_loadu_ps(m, b + j + 16 * v);
        for (int s = 0; s < S; s++) {
            __m512 z = _mm512_add_ps(acc[s][v], bv);
            if (act) z = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ), z, zero);
            _mm512_mask_storeu_ps(y + (size_t)s * n_out + j + 16 * v, m, z);
        }
    }
}

/* Packed panel: wp[i * 16 NV + l] = w(j + l, i) (0 past n_out). */
AVX512 static inline __attribute__((always_inline)) void
tile_p(const int S, const int NV, const int PV, int n_out, int n_in, const float *wp, const float *x, int j,
       __mmask16 last, const float *b, int act, float *y, const int F)
{
    __m512 acc[8][6];
    for (int s = 0; s < S; s++)
        for (int v = 0; v < NV; v++) acc[s][v] = _mm512_setzero_ps();
    const float *col = wp;
    const float *xs = x;
    for (int i = 0; i < n_in; i++, col += 16 * PV, xs++) {
        __m512 wv[6];
        for (int v = 0; v < NV; v++) wv[v] = _mm512_load_ps(col + 16 * v);
        for (int s = 0; s < S; s++) {
            __m512 xb = _mm512_set1_ps(xs[(size_t)s * n_in]);
            for (int v = 0; v < NV; v++)
                acc[s][v] = F ? _mm512_fmadd_ps(wv[v], xb, acc[s][v])
                              : _mm512_add_ps(acc[s][v], _mm512_mul_ps(wv[v], xb));
        }
    }
    const __m512 zero = _mm512_setzero_ps();
    for (int v = 0; v < NV; v++) {
        __mmask16 m = v == NV - 1 ? last : (__mmask16)0xFFFF;
        __m512 bv = _mm512_maskz_loadu_ps(m, b + j + 16 * v);
        for (int s = 0; s < S; s++) {
            __m512 z = _mm512_add_ps(acc[s][v], bv);
            if (act) z = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ), z, zero);
            _mm512_mask_storeu_ps(y + (size_t)s * n_out + j + 16 * v, m, z);
        }
    }
}

#ifndef TS
#define TS 4
#endif
#ifndef TV
#define TV 6
#endif

#define TB2(Sv, NVv, ...) TB(Sv, NVv)
#define SW(NVv, F, ...)                                                                     \
    switch (sn) {                                                                           \
    case 1: F(1, NVv, __VA_ARGS__); break;                                                  \
    case 2: F(2, NVv, __VA_ARGS__); break;                                                  \
    case 3: F(3, NVv, __VA_ARGS__); break;                                                  \
    case 4: F(4, NVv, __VA_ARGS__); break;                                                  \
    case 5: F(5, NVv, __VA_ARGS__); break;                                                  \
    case 6: F(6, NVv, __VA_ARGS__); break;                                                  \
    case 7: if (TS >= 7) F(7 <= TS ? 7 : 1, NVv, __VA_ARGS__); break;                       \
    case 8: if (TS >= 8) F(8 <= TS ? 8 : 1, NVv, __VA_ARGS__); break;                       \
    default: break;                                                                         \
    }

AVX512 static void gemm_a(int n_out, int n_in, int n, const float *w, const float *x,
                          const float *b, int act, float *y)
{
    for (int j = 0; j < n_out; j += 16 * TV) {
        int m = n_out - j < 16 * TV ? n_out - j : 16 * TV;
        int nv = (m + 15) / 16;
        __mmask16 last = (__mmask16)(0xFFFFu >> (16 * nv - m));
        for (int s = 0; s < n; s += TS) {
            int sn = n - s < TS ? n - s : TS;
            const float *xs = x + (size_t)s * n_in;
            float *ys = y + (size_t)s * n_out;
            if (nv == TV && sn == TS) { tile(TS, TV, n_out, n_in, w, xs, j, last, b, act, ys); continue; }
            if (nv == 1) { SW(1, tile, n_out, n_in, w, xs, j, last, b, act, ys) }
            else if (nv == 2 && TV >= 2) { SW(2 <= TV ? 2 : 1, tile, n_out, n_in, w, xs, j, last, b, act, ys) }
            else if (nv == 3 && TV >= 3) { SW(3 <= TV ? 3 : 1, tile, n_out, n_in, w, xs, j, last, b, act, ys) }
            else if (nv == 4 && TV >= 4) { SW(4 <= TV ? 4 : 1, tile, n_out, n_in, w, xs, j, last, b, act, ys) }
            else if (nv == 5 && TV >= 5) { SW(5 <= TV ? 5 : 1, tile, n_out, n_in, w, xs, j, last, b, act, ys) }
            else if (nv == 6 && TV >= 6) { SW(6 <= TV ? 6 : 1, tile, n_out, n_in, w, xs, j, last, b, act, ys) }
        }
    }
}

/* Packed copy: panels of 16 TV outputs (0-padded), panel p at p * 16 TV * n_in. */
static float *pack(int n_out, int n_in, const float *w)
{
    int np = (n_out + 16 * TV - 1) / (16 * TV);
    float *p = aligned_alloc(64, (size_t)np * 16 * TV * n_in * sizeof(float) + 64);
    for (int q = 0; q < np; q++)
        for (int i = 0; i < n_in; i++)
            for (int l = 0; l < 16 * TV; l++) {
                int j = q * 16 * TV + l;
                p[((size_t)q * n_in + i) * 16 * TV + l] = j < n_out ? w[(size_t)i * n_out + j] : 0.0f;
            }
    return p;
}

__attribute__((target("avx512f,fma"), always_inline)) static inline void
gemm_pi(int n_out, int n_in, int n, const float *wp, const float *x, const float *b, int act,
        float *y, const int FM)
{
    for (int j = 0, q = 0; j < n_out; j += 16 * TV, q++) {
        int m = n_out - j < 16 * TV ? n_out - j : 16 * TV;
        int nv = (m + 15) / 16;
        __mmask16 last = (__mmask16)(0xFFFFu >> (16 * nv - m));
        const float *wq = wp + (size_t)q * n_in * 16 * TV;
        for (int s = 0; s < n; s += TS) {
            int sn = n - s < TS ? n - s : TS;
            const float *xs = x + (size_t)s * n_in;
            float *ys = y + (size_t)s * n_out;
            if (sn == TS && nv == TV) { tile_p(TS, TV, TV, n_out, n_in, wq, xs, j, last, b, act, ys, FM); continue; }
            if (nv == 1) { SW(1, tile_p, TV, n_out, n_in, wq, xs, j, last, b, act, ys, FM) }
            else if (nv == 2 && TV >= 2) { SW(2 <= TV ? 2 : 1, tile_p, TV, n_out, n_in, wq, xs, j, last, b, act, ys, FM) }
            else if (nv == 3 && TV >= 3) { SW(3 <= TV ? 3 : 1, tile_p, TV, n_out, n_in, wq, xs, j, last, b, act, ys, FM) }
            else if (nv == 4 && TV >= 4) { SW(4 <= TV ? 4 : 1, tile_p, TV, n_out, n_in, wq, xs, j, last, b, act, ys, FM) }
            else if (nv == 5 && TV >= 5) { SW(5 <= TV ? 5 : 1, tile_p, TV, n_out, n_in, wq, xs, j, last, b, act, ys, FM) }
            else if (nv == 6 && TV >= 6) { SW(6 <= TV ? 6 : 1, tile_p, TV, n_out, n_in, wq, xs, j, last, b, act, ys, FM) }
        }
    }
}

/* Packed, each output summed in input order with one mul and one add (the bits of pykd_f32_gemv). */
__attribute__((target("avx512f,fma"), noinline)) static void
gemm_p(int n_out, int n_in, int n, const float *wp, const float *x, const float *b, int act, float *y)
{
    gemm_pi(n_out, n_in, n, wp, x, b, act, y, 0);
}
/* The same with an FMA per term (other bits: acc = fma(w, x, acc)), OpenBLAS's arithmetic. */
__attribute__((target("avx512f,fma"), noinline)) static void
gemm_pf(int n_out, int n_in, int n, const float *wp, const float *x, const float *b, int act, float *y)
{
    gemm_pi(n_out, n_in, n, wp, x, b, act, y, 1);
}

/* ---- variant B: packed W panels, x pre-broadcast per chunk of KC inputs ----
 * xb[kk][s] = 16 copies of x(k0 + kk, s): a zmm broadcast costs an FP pipe
 * slot on Zen 4, so each x is broadcast once per chunk and loaded (a plain
 * load) by every panel. Between chunks the accumulators go through y
 * (float32 in, float32 out: the bits are unchanged). */
#ifndef KC
#define KC 32
#endif
AVX512 static inline __attribute__((always_inline)) void
tile_b(const int S, const int NV, const int PV, int n_out, int kc, const float *wp,
       const float *xb, int j, __mmask16 last, int first, int final, const float *b, int act,
       float *y)
{
    __m512 acc[8][6];
    for (int s = 0; s < S; s++)
        for (int v = 0; v < NV; v++) {
            __mmask16 m = v == NV - 1 ? last : (__mmask16)0xFFFF;
            acc[s][v] = first ? _mm512_setzero_ps()
                              : _mm512_maskz_loadu_ps(m, y + (size_t)s * n_out + j + 16 * v);
        }
    const float *col = wp;
    for (int i = 0; i < kc; i++, col += 16 * PV, xb += 16 * S) {
        __m512 wv[6];
        for (int v = 0; v < NV; v++) wv[v] = _mm512_load_ps(col + 16 * v);
        for (int s = 0; s < S; s++) {
            __m512 xv = _mm512_load_ps(xb + 16 * s);
            for (int v = 0; v < NV; v++)
                acc[s][v] = _mm512_add_ps(acc[s][v], _mm512_mul_ps(wv[v], xv));
        }
    }
    const __m512 zero = _mm512_setzero_ps();
    for (int v = 0; v < NV; v++) {
        __mmask16 m = v == NV - 1 ? last : (__mmask16)0xFFFF;
        __m512 bv = _mm512_maskz_loadu_ps(m, b + j + 16 * v);
        for (int s = 0; s < S; s++) {
            __m512 z = acc[s][v];
            if (final) {
                z = _mm512_add_ps(z, bv);
                if (act) z = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ), z, zero);
            }
            _mm512_mask_storeu_ps(y + (size_t)s * n_out + j + 16 * v, m, z);
        }
    }
}

AVX512 static void gemm_b(int n_out, int n_in, int n, const float *wp, const float *x,
                          const float *b, int act, float *y)
{
    float xb[KC * TS * 16] __attribute__((aligned(64)));
    for (int s0 = 0; s0 < n; s0 += TS) {
        int sn = n - s0 < TS ? n - s0 : TS;
        const float *xs = x + (size_t)s0 * n_in;
        float *ys = y + (size_t)s0 * n_out;
        for (int k0 = 0; k0 < n_in; k0 += KC) {
            int kc = n_in - k0 < KC ? n_in - k0 : KC;
            for (int kk = 0; kk < kc; kk++)
                for (int s = 0; s < sn; s++)
                    _mm512_store_ps(xb + (kk * sn + s) * 16, _mm512_set1_ps(xs[(size_t)s * n_in + k0 + kk]));
            int first = k0 == 0, final = k0 + kc == n_in;
            for (int j = 0, q = 0; j < n_out; j += 16 * TV, q++) {
                int m = n_out - j < 16 * TV ? n_out - j : 16 * TV;
                int nv = (m + 15) / 16;
                __mmask16 last = (__mmask16)(0xFFFFu >> (16 * nv - m));
                const float *wq = wp + ((size_t)q * n_in + k0) * 16 * TV;
#define TB(Sv, NVv) tile_b(Sv, NVv, TV, n_out, kc, wq, xb, j, last, first, final, b, act, ys)
                if (sn == TS && nv == TV) { TB(TS, TV); continue; }
                if (nv == 1) { SW(1, TB2) }
                else if (nv == 2 && TV >= 2) { SW(2 <= TV ? 2 : 1, TB2) }
                else if (nv == 3 && TV >= 3) { SW(3 <= TV ? 3 : 1, TB2) }
                else if (nv == 4 && TV >= 4) { SW(4 <= TV ? 4 : 1, TB2) }
                else if (nv == 5 && TV >= 5) { SW(5 <= TV ? 5 : 1, TB2) }
                else if (nv == 6 && TV >= 6) { SW(6 <= TV ? 6 : 1, TB2) }
            }
        }
    }
}

/* ---- variant R: both operands replicated, no broadcast in the loop ----
 * A zmm lane 4a + c holds output 4i + a of a panel and sample 4g + c of a
 * tile. w4 (a derived copy of W, 4 times its size) holds each weight 4
 * times: w4[panel][k][i][4a + c] = w(16 panel + 4i + a, k); x4 (built per
 * call, per chunk of RKC inputs) holds 4 samples' x(k) repeated 4 times:
 * x4[kk][g][4a + c] = x(k0 + kk, 4g + c). So the inner loop is RA + RB
 * plain loads and RA RB multiplies and adds per input. */
#ifndef RA
#define RA 4
#endif
#ifndef RB
#define RB 6
#endif
#ifndef RKC
#define RKC 32
#endif
static float *pack4(int n_out, int n_in, const float *w)
{
    int np = (n_out + 4 * RA - 1) / (4 * RA);
    float *p = aligned_alloc(64, (size_t)np * n_in * RA * 16 * sizeof(float) + 64);
    for (int q = 0; q < np; q++)
        for (int k = 0; k < n_in; k++)
            for (int i = 0; i < RA; i++)
                for (int a = 0; a < 4; a++) {
                    int j = q * 4 * RA + 4 * i + a;
                    float v = j < n_out ? w[(size_t)k * n_out + j] : 0.0f;
                    for (int c = 0; c < 4; c++) p[(((size_t)q * n_in + k) * RA + i) * 16 + 4 * a + c] = v;
                }
    return p;
}

AVX512 static inline __attribute__((always_inline)) void
rtile(const int NA, const int NB, int kc, const float *w4, const float *x4, float *sc, int first)
{
    __m512 acc[RA][RB];
    for (int i = 0; i < NA; i++)
        for (int g = 0; g < NB; g++)
            acc[i][g] = first ? _mm512_setzero_ps() : _mm512_load_ps(sc + (i * RB + g) * 16);
    for (int kk = 0; kk < kc; kk++, w4 += RA * 16, x4 += RB * 16) {
        __m512 wv[RA];
        for (int i = 0; i < NA; i++) wv[i] = _mm512_load_ps(w4 + 16 * i);
        for (int g = 0; g < NB; g++) {
            __m512 xv = _mm512_load_ps(x4 + 16 * g);
            for (int i = 0; i < NA; i++) acc[i][g] = _mm512_add_ps(acc[i][g], _mm512_mul_ps(wv[i], xv));
        }
    }
    for (int i = 0; i < NA; i++)
        for (int g = 0; g < NB; g++) _mm512_store_ps(sc + (i * RB + g) * 16, acc[i][g]);
}

#define RT(NAv, NBv) rtile(NAv, NBv, kc, wq, x4, scq, first)
#define RSWB(NAv)                                                                           \
    switch (nb) {                                                                           \
    case 1: RT(NAv, 1); break;                                                              \
    case 2: RT(NAv, 2 <= RB ? 2 : 1); break;                                                \
    case 3: RT(NAv, 3 <= RB ? 3 : 1); break;                                                \
    case 4: RT(NAv, 4 <= RB ? 4 : 1); break;                                                \
    case 5: RT(NAv, 5 <= RB ? 5 : 1); break;                                                \
    case 6: RT(NAv, 6 <= RB ? 6 : 1); break;                                                \
    default: break;                                                                         \
    }

AVX512 static void gemm_r(int n_out, int n_in, int n, const float *w4, const float *x,
                          const float *b, int act, float *y)
{
    int np = (n_out + 4 * RA - 1) / (4 * RA);
    float *sc = aligned_alloc(64, (size_t)np * RA * RB * 16 * sizeof(float));
    float x4[RKC * RB * 16] __attribute__((aligned(64)));
    for (int s0 = 0; s0 < n; s0 += 4 * RB) {
        int ns = n - s0 < 4 * RB ? n - s0 : 4 * RB;
        int nb = (ns + 3) / 4;
        for (int k0 = 0; k0 < n_in; k0 += RKC) {
            int kc = n_in - k0 < RKC ? n_in - k0 : RKC;
            for (int g = 0; g < nb; g++) {
                const float *xr[4];
                for (int c = 0; c < 4; c++) {
                    int sidx = s0 + 4 * g + c < n ? s0 + 4 * g + c : s0 + 4 * g;  /* a real row */
                    xr[c] = x + (size_t)sidx * n_in + k0;
                }
                int kk = 0;
                for (; kk + 4 <= kc; kk += 4) {
                    __m128 r0 = _mm_loadu_ps(xr[0] + kk), r1 = _mm_loadu_ps(xr[1] + kk);
                    __m128 r2 = _mm_loadu_ps(xr[2] + kk), r3 = _mm_loadu_ps(xr[3] + kk);
                    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
                    _mm512_store_ps(x4 + ((kk + 0) * RB + g) * 16, _mm512_broadcast_f32x4(r0));
                    _mm512_store_ps(x4 + ((kk + 1) * RB + g) * 16, _mm512_broadcast_f32x4(r1));
                    _mm512_store_ps(x4 + ((kk + 2) * RB + g) * 16, _mm512_broadcast_f32x4(r2));
                    _mm512_store_ps(x4 + ((kk + 3) * RB + g) * 16, _mm512_broadcast_f32x4(r3));
                }
                for (; kk < kc; kk++)
                    _mm512_store_ps(x4 + (kk * RB + g) * 16,
                                    _mm512_broadcast_f32x4(_mm_setr_ps(xr[0][kk], xr[1][kk], xr[2][kk], xr[3][kk])));
            }
            int first = k0 == 0;
            for (int q = 0; q < np; q++) {
                int na = (n_out - q * 4 * RA + 3) / 4;
                if (na > RA) na = RA;
                const float *wq = w4 + ((size_t)q * n_in + k0) * RA * 16;
                float *scq = sc + (size_t)q * RA * RB * 16;
                if (na == RA && nb == RB) { RT(RA, RB); continue; }
                if (na == 1) { RSWB(1) }
                else if (na == 2) { RSWB(2 <= RA ? 2 : 1) }
                else if (na == 3) { RSWB(3 <= RA ? 3 : 1) }
                else if (na == 4) { RSWB(4 <= RA ? 4 : 1) }
                else if (na == 5) { RSWB(5 <= RA ? 5 : 1) }
                else if (na == 6) { RSWB(6 <= RA ? 6 : 1) }
            }
        }
        /* The finish: bias and relu as pykd_f32_gemv's, from the scratch. */
        for (int q = 0; q < np; q++)
            for (int i = 0; i < RA; i++)
                for (int a = 0; a < 4; a++) {
                    int o = q * 4 * RA + 4 * i + a;
                    if (o >= n_out) continue;
                    for (int g = 0; g < nb; g++)
                        for (int c = 0; c < 4; c++) {
                            int sidx = s0 + 4 * g + c;
                            if (sidx >= n) continue;
                            float z = sc[((size_t)q * RA * RB + i * RB + g) * 16 + 4 * a + c] + b[o];
                            y[(size_t)sidx * n_out + o] = (act && z < 0.0f) ? 0.0f : z;
                        }
                }
    }
    free(sc);
}

/* OpenBLAS + the bias/relu pass (as pykd's layer does). */
static void blas_path(int n_out, int n_in, int n, const float *w, const float *x, const float *b,
                      int act, float *y)
{
    const float one = 1, zero = 0;
    sgemm_("N", "N", &n_out, &n, &n_in, &one, w, &n_out, x, &n_in, &zero, y, &n_out);
    for (int s = 0; s < n; s++)
        for (int j = 0; j < n_out; j++) {
            float z = y[(size_t)s * n_out + j] + b[j];
            y[(size_t)s * n_out + j] = (act && z < 0.0f) ? 0.0f : z;
        }
}

/* ---- the inner loop alone, operands in L1 (why the kernels stop where they do) ----
 * S samples x NV vectors, KP inputs per pass: NV loads of W, S broadcasts
 * of x (mode 0), S plain loads of pre-broadcast x (mode 1), or no operand
 * traffic at all (mode 2, registers only); S NV multiplies and adds per
 * input. Mode 3 is OpenBLAS's form: S broadcasts and S NV FMAs. */
#define KP 64
static float pw[KP * 16 * 8] __attribute__((aligned(64)));
static float px[KP * 16 * 8] __attribute__((aligned(64)));
__attribute__((target("avx512f,fma"), always_inline)) static inline double
peak(const int S, const int NV, const int mode)
{
    __m512 a[8][8];
    for (int s = 0; s < S; s++)
        for (int v = 0; v < NV; v++) a[s][v] = _mm512_set1_ps(1e-9f * (s + v));
    const long reps = 200000;
    __m512 c0 = _mm512_set1_ps(1e-9f);
    double t = now();
    for (long it = 0; it < reps; it++) {
        const float *w = pw, *x = px;
        __asm__ volatile("" : "+r"(w), "+r"(x), "+v"(c0));
        for (int k = 0; k < KP; k++, w += (mode == 2 ? 0 : 16 * NV), x += (mode == 1 ? 16 * S : S)) {
            __m512 wv[8];
            for (int v = 0; v < NV; v++) wv[v] = mode == 2 ? c0 : _mm512_load_ps(w + 16 * v);
            for (int s = 0; s < S; s++) {
                __m512 xb = mode == 1 ? _mm512_load_ps(x + 16 * s)
                          : mode == 2 ? c0 : _mm512_set1_ps(x[s]);
                for (int v = 0; v < NV; v++)
                    a[s][v] = mode == 3 ? _mm512_fmadd_ps(wv[v], xb, a[s][v])
                                        : _mm512_add_ps(a[s][v], _mm512_mul_ps(wv[v], xb));
            }
        }
    }
    t = now() - t;
    for (int s = 0; s < S; s++)
        for (int v = 0; v < NV; v++) __asm__ volatile("" ::"v"(a[s][v]));
    return 32.0 * S * NV * KP * reps / t / 1e9;
}
#define PK(S, NV, M) \
    __attribute__((target("avx512f,fma"), noinline)) static double peak_##S##_##NV##_##M(void) { return peak(S, NV, M); }
PK(6, 4, 2) PK(8, 3, 0) PK(6, 4, 0) PK(4, 6, 0) PK(5, 5, 0) PK(6, 4, 1) PK(4, 6, 1) PK(6, 4, 3) PK(4, 6, 3)

static void peaks(int rounds)
{
    printf("inner loop alone, operands in L1, GFLOP/s (best of %d):\n", rounds);
    double r[9] = {0};
    for (int q = 0; q < rounds; q++) {
        double v[9] = {peak_6_4_2(), peak_8_3_0(), peak_6_4_0(), peak_4_6_0(), peak_5_5_0(),
                       peak_6_4_1(), peak_4_6_1(), peak_6_4_3(), peak_4_6_3()};
        for (int i = 0; i < 9; i++) r[i] = v[i] > r[i] ? v[i] : r[i];
    }
    printf("  mul+add, registers only (24 accumulators)       %5.1f\n", r[0]);
    printf("  mul+add, broadcast x: 8x3 %5.1f  6x4 %5.1f  4x6 %5.1f  5x5 %5.1f\n", r[1], r[2], r[3], r[4]);
    printf("  mul+add, pre-broadcast x loaded: 6x4 %5.1f  4x6 %5.1f\n", r[5], r[6]);
    printf("  FMA, broadcast x (OpenBLAS's form): 6x4 %5.1f  4x6 %5.1f\n", r[7], r[8]);
}

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

struct shape { int n_out, n_in, n, act; };

int main(int argc, char **argv)
{
    openblas_set_num_threads(1);
    int rounds = argc > 1 ? atoi(argv[1]) : 15;
    if (rounds > 64) rounds = 64;
    if (rounds < 1) rounds = 1;
    peaks(5);
    struct shape sh[] = {{200, 784, 256, 1}, {200, 200, 256, 1}, {10, 200, 256, 0},
                         {200, 784, 128, 1}, {200, 200, 128, 1}, {10, 200, 128, 0},
                         {1200, 1200, 256, 1}, {1200, 784, 64, 1}};
    int nsh = sizeof sh / sizeof sh[0];
    enum { NK = 6 };
    const char *kn[NK] = {"openblas", "inplace", "packed", "prebcast", "replic", "pack-fma"};
    double tot[2][NK] = {{0}};
    printf("tile %d samples x %d zmm vectors (KC %d); thread CPU time, medians of %d rounds "
           "(the kernels alternate in each round), us per call; replic %dx%d RKC %d\n", TS, TV, KC, rounds, RA, RB, RKC);
    printf("%-14s %9s %9s %9s %9s %9s %9s   %-36s %s\n", "n x in x out", kn[0], kn[1], kn[2],
           kn[3], kn[4], kn[5], "openblas time / kernel time", "GFLOP/s");
    for (int t = 0; t < nsh; t++) {
        int n_out = sh[t].n_out, n_in = sh[t].n_in, n = sh[t].n, act = sh[t].act;
        float *w = aligned_alloc(64, sizeof(float) * n_out * n_in + 64);
        float *x = aligned_alloc(64, sizeof(float) * n_in * n + 64);
        float *b = aligned_alloc(64, sizeof(float) * n_out + 64);
        float *yr = aligned_alloc(64, sizeof(float) * n_out * n + 64);
        float *yk[NK];
        for (int k = 0; k < NK; k++) yk[k] = aligned_alloc(64, sizeof(float) * n_out * n + 64);
        srand(1 + t);
        for (int i = 0; i < n_out * n_in; i++) w[i] = (rand() / (float)RAND_MAX - 0.5f) * 0.1f;
        for (int i = 0; i < n_in * n; i++) x[i] = rand() / (float)RAND_MAX;
        for (int i = 0; i < n_out; i++) b[i] = (rand() / (float)RAND_MAX - 0.5f);
        float *wp = pack(n_out, n_in, w), *w4 = pack4(n_out, n_in, w);
        for (int s = 0; s < n; s++)
            pykd_f32_gemv(n_out, n_in, w, x + (size_t)s * n_in, 0, n_out, b, act, yr + (size_t)s * n_out);
        double flop = 2.0 * n_out * n_in * n;
        int reps = (int)(1e8 / flop) + 1;
        double tm[NK][64];
        for (int r = 0; r < rounds; r++)
            for (int k = 0; k < NK; k++) {
                double t0 = now();
                for (int q = 0; q < reps; q++) {
                    if (k == 0) blas_path(n_out, n_in, n, w, x, b, act, yk[0]);
                    else if (k == 1) gemm_a(n_out, n_in, n, w, x, b, act, yk[1]);
                    else if (k == 2) gemm_p(n_out, n_in, n, wp, x, b, act, yk[2]);
                    else if (k == 3) gemm_b(n_out, n_in, n, wp, x, b, act, yk[3]);
                    else if (k == 4) gemm_r(n_out, n_in, n, w4, x, b, act, yk[4]);
                    else gemm_pf(n_out, n_in, n, wp, x, b, act, yk[5]);
                }
                tm[k][r] = (now() - t0) / reps * 1e6;
            }
        double med[NK];
        for (int k = 0; k < NK; k++) {
            qsort(tm[k], rounds, sizeof(double), cmpd);
            med[k] = tm[k][rounds / 2];
        }
        char name[32], bits[64] = "";
        snprintf(name, sizeof name, "%dx%dx%d", n, n_in, n_out);
        for (int k = 1; k < NK - 1; k++)
            if (memcmp(yk[k], yr, sizeof(float) * n_out * n)) snprintf(bits + strlen(bits), 16, " %s-BITS", kn[k]);
        for (int s = 0; s < n; s++)   /* pack-fma against a scalar fmaf loop */
            for (int j = 0; j < n_out; j++) {
                float acc = 0.0f;
                for (int i = 0; i < n_in; i++) acc = fmaf(w[(size_t)i * n_out + j], x[(size_t)s * n_in + i], acc);
                float z = acc + b[j];
                z = (act && z < 0.0f) ? 0.0f : z;
                if (memcmp(&z, yk[5] + (size_t)s * n_out + j, 4)) { strcpy(bits + strlen(bits), " fma-BITS"); s = n; break; }
            }
        printf("%-14s", name);
        for (int k = 0; k < NK; k++) printf(" %9.1f", med[k]);
        printf("  ");
        for (int k = 1; k < NK; k++) printf(" %6.3f", med[0] / med[k]);
        printf("   ");
        for (int k = 0; k < NK; k++) printf("%4.0f ", flop / med[k] / 1e3);
        printf("%s\n", bits);
        for (int k = 0; k < NK; k++)
            if (t < 6) tot[t / 3][k] += med[k];
        free(w); free(x); free(b); free(yr); free(wp); free(w4);
        for (int k = 0; k < NK; k++) free(yk[k]);
    }
    for (int g = 0; g < 2; g++)
    {
        printf("student %d:  ", g ? 128 : 256);
        for (int k = 0; k < NK; k++) printf(" %9.1f", tot[g][k]);
        printf("  ");
        for (int k = 1; k < NK; k++) printf(" %6.3f", tot[g][0] / tot[g][k]);
        printf("\n");
    }
    return 0;
}

/* The int8 multiply-add peak of one core: independent vpdpbusd on registers
 * (12 chains hide the latency), zmm and ymm, in GMAC/s (one vpdpbusd zmm =
 * 64 multiply-adds). benchmarks/bench_int8.py compiles and runs it when a C
 * compiler is there; prints "zmm <GMAC/s> ymm <GMAC/s>" (0 when absent). */
#include <stdio.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define N 200000000L
static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
#define CHAINS(T, Z, MAC, X, W)                                                              \
    T a0 = Z, a1 = Z, a2 = Z, a3 = Z, a4 = Z, a5 = Z, a6 = Z, a7 = Z, a8 = Z, a9 = Z,          \
      a10 = Z, a11 = Z;                                                                        \
    double t = now();                                                                          \
    for (long i = 0; i < N / 12; i++) {                                                        \
        __asm__ volatile("" : "+v"(X), "+v"(W));                                               \
        MAC(a0); MAC(a1); MAC(a2); MAC(a3); MAC(a4); MAC(a5);                                  \
        MAC(a6); MAC(a7); MAC(a8); MAC(a9); MAC(a10); MAC(a11);                                \
    }                                                                                          \
    t = now() - t;                                                                             \
    __asm__ volatile("" ::"v"(a0), "v"(a1), "v"(a2), "v"(a3), "v"(a4), "v"(a5), "v"(a6),      \
                     "v"(a7), "v"(a8), "v"(a9), "v"(a10), "v"(a11));

__attribute__((target("avx512f,avx512vnni"))) static double zmm(void)
{
    __m512i x = _mm512_set1_epi32(3), w = _mm512_set1_epi32(5);
#define ZM(a) a = _mm512_dpbusd_epi32(a, x, w)
    CHAINS(__m512i, _mm512_setzero_si512(), ZM, x, w)
    return 64.0 * N / t / 1e9;
}

__attribute__((target("avx2,avxvnni"))) static double ymm(void)
{
    __m256i x = _mm256_set1_epi32(3), w = _mm256_set1_epi32(5);
#define YM(a) a = _mm256_dpbusd_avx_epi32(a, x, w)
    CHAINS(__m256i, _mm256_setzero_si256(), YM, x, w)
    return 32.0 * N / t / 1e9;
}

int main(void)
{
    double z = 0, y = 0;
    __builtin_cpu_init();
    for (int r = 0; r < 3; r++) {   /* best of 3: the peak, not the load */
        if (__builtin_cpu_supports("avx512vnni")) { double v = zmm(); z = v > z ? v : z; }
        if (__builtin_cpu_supports("avxvnni")) { double v = ymm(); y = v > y ? v : y; }
    }
    printf("zmm %.1f ymm %.1f\n", z, y);
    return 0;
}
#else
int main(void)
{
    printf("zmm 0 ymm 0\n");
    return 0;
}
#endif

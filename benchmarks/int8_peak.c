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
/* The chains start from different values: started equal, GCC proved them
 * equal and kept one chain (the first version of this file timed one
 * dependent chain and counted it 12 times: "708 GMAC/s" on Zen 5, whose
 * real peak is 2 zmm vpdpbusd per cycle: 128 per cycle, ~500 GMAC/s at 3.9 GHz). */
#define CHAINS(T, Z, MAC, X, W)                                                              \
    T a0 = Z(0), a1 = Z(1), a2 = Z(2), a3 = Z(3), a4 = Z(4), a5 = Z(5), a6 = Z(6), a7 = Z(7), \
      a8 = Z(8), a9 = Z(9), a10 = Z(10), a11 = Z(11);                                          \
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
    CHAINS(__m512i, _mm512_set1_epi32, ZM, x, w)
    return 64.0 * N / t / 1e9;
}

__attribute__((target("avx2,avxvnni"))) static double ymm(void)
{
    __m256i x = _mm256_set1_epi32(3), w = _mm256_set1_epi32(5);
#define YM(a) a = _mm256_dpbusd_avx_epi32(a, x, w)
    CHAINS(__m256i, _mm256_set1_epi32, YM, x, w)
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

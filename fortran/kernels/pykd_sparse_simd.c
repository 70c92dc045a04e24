/* Transposes for the sparse layers' panel kernel (pykd_sparse_kernel.f90).
 *
 * gfortran turns a transpose into one load and one store per element
 * (1.5 ns each here, a third of a 90%-sparse 784 x 200 product at batch
 * 256). This does 8 x 8 tiles with AVX2 shuffles when the CPU has AVX2
 * (chosen at run time; the file is compiled for the baseline CPU like
 * pykd_int8_simd.c), else one element at a time. Only data moves: every
 * path gives the same bits. -DPYKD_NO_SIMD builds the portable path alone.
 */
#include <stddef.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(PYKD_NO_SIMD)
#define PYKD_SP_X86 1
#include <immintrin.h>
#endif

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

static int sp_path = -1;   /* -1 not chosen yet, 0 portable, 1 avx2 */

void pykd_sp_transpose(const float *a, const int *lda, float *b, const int *ldb,
                       const int *rows, const int *cols)
{
    if (sp_path < 0) {
        int p = 0;
#ifdef PYKD_SP_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2"))
            p = 1;
#endif
        sp_path = p;   /* every thread computes the same value */
    }
#ifdef PYKD_SP_X86
    if (sp_path == 1) {
        transpose_avx2(a, *lda, b, *ldb, *rows, *cols);
        return;
    }
#endif
    transpose_portable(a, *lda, b, *ldb, *rows, *cols);
}

/* Whether the training step may split its products across an OpenMP team
 * (pykd_step_layers): it calls single-threaded products from every thread of
 * the team, which is safe and fast only when a BLAS call made inside a
 * parallel region runs on the calling thread alone.
 *
 * OpenBLAS tells its build through openblas_get_parallel(): 0 sequential,
 * 1 pthreads (one shared pool: concurrent callers queue on it and
 * oversubscribe the cores), 2 OpenMP (inside a parallel region a call runs
 * on the calling thread). BLIS and the reference BLAS thread per call and
 * default to one thread. The symbol is weak, so any BLAS links. */

extern int openblas_get_parallel(void) __attribute__((weak));

/* 1 when BLAS calls from the threads of a parallel region may run side by side. */
int pykd_blas_team_safe(void)
{
    if (openblas_get_parallel) return openblas_get_parallel() != 1;
    return 1;
}

/* OpenBLAS's OpenMP build sizes its team from omp_get_max_threads() and not
 * from OMP_THREAD_LIMIT: with a limit below OMP_NUM_THREADS (or the core
 * count) a product waited forever for threads the runtime never starts
 * (OpenBLAS 0.3.21: OMP_THREAD_LIMIT=1 or 2 with OMP_NUM_THREADS=4 hung in
 * the first sgemm). A team can never be larger than the limit anyway, so
 * when the library loads the OpenMP thread count is capped at the limit, and
 * OpenBLAS's own count with it. Weak symbols: any BLAS, with or without
 * OpenMP, links. */
extern int openblas_get_num_threads(void) __attribute__((weak));
extern void openblas_set_num_threads(int) __attribute__((weak));
extern int omp_get_thread_limit(void) __attribute__((weak));
extern int omp_get_max_threads(void) __attribute__((weak));
extern void omp_set_num_threads(int) __attribute__((weak));

static void cap_threads(void)
{
    if (!omp_get_thread_limit || !omp_get_max_threads || !omp_set_num_threads) return;
    int limit = omp_get_thread_limit();
    if (limit < 1) return;
    if (omp_get_max_threads() > limit) omp_set_num_threads(limit);
    if (openblas_get_parallel && openblas_get_parallel() == 2 && openblas_get_num_threads &&
        openblas_set_num_threads && openblas_get_num_threads() > limit)
        openblas_set_num_threads(limit);
}

__attribute__((constructor)) static void cap_threads_at_load(void)
{
    cap_threads();
}

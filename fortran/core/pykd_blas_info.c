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

/* Flush-to-zero of float results (MXCSR.FTZ) for the training steps
 * (pykd_fp_env.f90). A result below 2^-126 (a subnormal) costs an Intel
 * core a microcode assist of ~100+ cycles: once a teacher is confident, its
 * softmax tails, their gradients and Adam's second moments (g^2 of a 1e-20
 * gradient) are full of them, and its epochs ran 2.1x slower on Intel model
 * 207 (1.80 against 0.87 s per 6000 samples; FTZ alone as fast as FTZ and
 * DAZ). Flushed values are below 1.2e-38: no training outcome changes, and
 * every x86-64 CPU gives the same bits. Elsewhere (no MXCSR) these are
 * no-ops and subnormals are kept. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <xmmintrin.h>

/* This thread's FTZ: 1 (flush) or 0. */
int pykd_ftz_get(void)
{
    return (_mm_getcsr() & _MM_FLUSH_ZERO_ON) != 0;
}

void pykd_ftz_set(int on)
{
    unsigned csr = _mm_getcsr() & ~(unsigned)_MM_FLUSH_ZERO_ON;
    _mm_setcsr(on ? csr | _MM_FLUSH_ZERO_ON : csr);
}
#else
int pykd_ftz_get(void) { return 0; }
void pykd_ftz_set(int on) { (void)on; }
#endif

/* One sample through a chain of products (dense layers, a low-rank layer's
 * two factors, codebook layers) on several cores (docs/performance.md,
 * "Batch 1 on two cores").
 *
 * Each product's outputs are cut into `parts` ranges of whole 16-output
 * vectors (fixed by the width and the part count). Part 0 runs on the
 * calling thread, part p on helper thread p, a persistent thread of this
 * file: it takes the same rows of every W on every call, so they stay in its
 * core's L2. A product starts when every part of the one before has finished.
 *
 * Why not an OpenMP region: a region's end waits for every thread of the
 * team, so when the OS has descheduled one (another process has its core)
 * the call waits a time slice (0.8 ms medians measured on the loaded VM,
 * against 9 us on one thread). Here the caller claims any part its helper
 * has not started and runs it itself: a late helper makes the call a
 * one-thread call, never a blocked one. The caller waits only for a part a
 * helper is running.
 *
 * Each output is pykd_f32_gemv's (pykd_cb_product's) sum in input order,
 * whoever runs it, so the bits are those of one thread for any part count,
 * thread or timing.
 *
 * One caller at a time uses the helpers (a second concurrent caller runs
 * its sample on its own thread). Helpers spin about SPIN_NS after a call,
 * then sleep on a condition variable; the caller never waits for a wake-up.
 * A forked child starts its own helpers.
 *
 * Late helpers: when the caller had to run a helper's part itself in
 * LATE_LIMIT of the last 8 calls (another process holds that core, or the
 * calls come too far apart for the helper to be awake), the split does not
 * pay: the caller then streams the helper's rows from another core's cache
 * on every call. It runs alone for ALONE_NS (all of W then settles in its
 * own L2) and tries the helpers again after that.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

void pykd_f32_gemv(int n_out, int n_in, const float *w, const float *x, int j0, int j1,
                   const float *b, int act, float *y);
void pykd_f32_gemv_nobias(int n_out, int n_in, const float *w, const float *x, int j0, int j1,
                          float *y);
int pykd_cb_path(void);
int pykd_cb_product(int path, int bits, int n_codes, int n_in, int n_out, const uint8_t *packed,
                    int64_t nbytes, const float *centroids, const float *b, int relu,
                    const float *x, int ldx, int s0, int s1, int j0, int j1, float *y, int kc,
                    float *work);

enum { MAX_PARTS = 4, MAX_LAYERS = 16 };
/* pykd_codes: ACT_RELU = 1 (tests/test_codes.py checks it). */
enum { ACT_RELU = 1 };
/* Spin about 0.1 ms after a call (a loop of calls never sleeps), yielding
 * the core every YIELD_EVERY pauses. */
#define SPIN_NS 100000L
#define YIELD_EVERY 64
/* Late helpers in the last 8 calls that make the caller run alone for ALONE_NS:
 * persistently late (another process holds that core), not the odd late
 * call of a quiet machine (an interrupt, a wake-up after an alone period). */
#define LATE_LIMIT 6
#define ALONE_NS 20000000L

/* One product of the chain: pykd_network's chain_entry_t (bind(c)). */
typedef struct {
    int n_out, n_in, act;   /* act: identity or relu */
    int bits, n_codes;      /* a codebook layer: index bits (0: dense) and codes */
    int64_t nbytes;         /* a codebook layer: bytes of packed */
    const float *w;         /* dense: W (n_out, n_in); codebook: the centroids */
    const float *b;         /* null: no bias (a low-rank layer's t = U x) */
    const uint8_t *packed;  /* a codebook layer: the packed indices */
    const float *x;
    float *y;
} layer_t;

/* A call's word: its number, layer count and part count in one atomic
 * (number << 8 | nl << 3 | parts), so a helper reads all three at once.
 * Words grow with the number. */
static uint64_t call_word(uint64_t number, int nl, int parts)
{
    return number << 8 | (uint64_t)nl << 3 | (uint64_t)parts;
}
static int word_nl(uint64_t g) { return (int)(g >> 3 & 31); }
static int word_parts(uint64_t g) { return (int)(g & 7); }

/* The call word that claimed / finished a part, and whether its codebook
 * product saw a NaN (written before fin); own cache line. */
typedef struct {
    _Atomic uint64_t claim, fin;
    int nan;
    char pad[64 - 2 * sizeof(uint64_t) - sizeof(int)];
} part_t;

static struct {
    pthread_mutex_t busy;            /* held by the caller using the helpers */
    pthread_mutex_t sleep_mu;
    pthread_cond_t wake;
    _Atomic uint64_t gen;            /* the current call's word; helpers wait for a new one */
    _Atomic int sleepers;
    int helpers;                     /* started (by the holder of busy) */
    /* The holder of busy's: one bit per recent split call (1: a helper was
     * late), the end of an alone period, and counts for the tests. */
    unsigned late_bits;
    int64_t alone_until;             /* now_ns() at the end of an alone period, or 0 */
    long n_split, n_alone, n_late;
    _Atomic int hold;                /* tests: helpers claim nothing while set */
    layer_t layer[MAX_LAYERS];       /* the current call's, written before gen */
    part_t part[MAX_LAYERS][MAX_PARTS] __attribute__((aligned(64)));
} T = {.busy = PTHREAD_MUTEX_INITIALIZER, .sleep_mu = PTHREAD_MUTEX_INITIALIZER,
       .wake = PTHREAD_COND_INITIALIZER};

/* Part p of parts of product L; 1 if a codebook product saw a NaN. */
static int run_part(const layer_t *L, int p, int parts)
{
    int nv = (L->n_out + 15) / 16;
    int j0 = 16 * (nv * p / parts), j1 = 16 * (nv * (p + 1) / parts);
    if (j1 > L->n_out) j1 = L->n_out;
    if (j1 <= j0) return 0;
    if (L->bits)   /* one sample: no panel, no workspace */
        return pykd_cb_product(pykd_cb_path(), L->bits, L->n_codes, L->n_in, L->n_out, L->packed,
                               L->nbytes, L->w, L->b, L->act == ACT_RELU, L->x, L->n_in, 0, 1,
                               j0, j1, L->y, 0, NULL) != 0;
    if (L->b)
        pykd_f32_gemv(L->n_out, L->n_in, L->w, L->x, j0, j1, L->b, L->act, L->y);
    else   /* a low-rank layer's t = U x (identity) */
        pykd_f32_gemv_nobias(L->n_out, L->n_in, L->w, L->x, j0, j1, L->y);
    return 0;
}

/* Runs part p of product k of call g and publishes it. */
static void run_and_publish(int k, int p, int parts, uint64_t g)
{
    T.part[k][p].nan = run_part(&T.layer[k], p, parts);
    atomic_store_explicit(&T.part[k][p].fin, g, memory_order_release);
}

/* Part p of layer k for call g, unless someone has it. Every part of a call
 * is claimed before the call returns, so a successful claim means the call
 * is still running (its layers are valid) and a helper late from an old
 * call cannot take a part of a newer one (its word is smaller). */
static int claim(int k, int p, uint64_t g)
{
    uint64_t c = atomic_load_explicit(&T.part[k][p].claim, memory_order_relaxed);
    return c < g && atomic_compare_exchange_strong(&T.part[k][p].claim, &c, g);
}

static int layer_done(int k, int parts, uint64_t g)
{
    for (int p = 0; p < parts; p++)
        if (atomic_load_explicit(&T.part[k][p].fin, memory_order_acquire) != g) return 0;
    return 1;
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The next call after `seen`: spin SPIN_NS, then sleep until woken. */
static uint64_t next_call(uint64_t seen)
{
    int64_t t0 = now_ns();
    for (long i = 1;; i++) {
        uint64_t g = atomic_load(&T.gen);
        if (g != seen) return g;
        if (i % YIELD_EVERY == 0) {
            if (now_ns() - t0 > SPIN_NS) break;
            sched_yield();   /* a core shared with the caller or another task goes to it */
        }
        CPU_RELAX();
    }
    pthread_mutex_lock(&T.sleep_mu);
    atomic_fetch_add(&T.sleepers, 1);
    uint64_t g;
    while ((g = atomic_load(&T.gen)) == seen) pthread_cond_wait(&T.wake, &T.sleep_mu);
    atomic_fetch_sub(&T.sleepers, 1);
    pthread_mutex_unlock(&T.sleep_mu);
    return g;
}

/* Helper p: its own part of each layer of each call, once the layer before
 * is complete; a call that has moved on is left (its layers are read only
 * after a successful claim). */
static void *helper(void *arg)
{
    int p = (int)(intptr_t)arg;
    uint64_t seen = 0;
    for (;;) {
        uint64_t g = seen = next_call(seen);
        int nl = word_nl(g), parts = word_parts(g);
        for (int k = 0; k < nl && p < parts; k++) {
            while (k > 0 && !layer_done(k - 1, parts, g)) {
                if (atomic_load(&T.gen) != g) break;
                CPU_RELAX();
            }
            if (atomic_load_explicit(&T.hold, memory_order_relaxed) || !claim(k, p, g)) continue;
            run_and_publish(k, p, parts, g);
        }
    }
    return NULL;
}

static void after_fork_child(void)
{
    pthread_mutex_init(&T.busy, NULL);
    pthread_mutex_init(&T.sleep_mu, NULL);
    pthread_cond_init(&T.wake, NULL);
    atomic_store(&T.sleepers, 0);
    T.helpers = 0;
    T.late_bits = 0;
    T.alone_until = 0;
}

/* Whether the holder of busy is in an alone period. */
static int alone_now(void)
{
    if (T.alone_until && now_ns() < T.alone_until) return 1;
    T.alone_until = 0;
    return 0;
}

/* After a split call: remember whether a helper was late; too many late
 * calls start an alone period. */
static void note_call(int late)
{
    T.n_split++;
    T.n_late += late;
    T.late_bits = (T.late_bits << 1 | (unsigned)late) & 0xffu;
    if (__builtin_popcount(T.late_bits) < LATE_LIMIT) return;
    T.late_bits = 0;
    T.alone_until = now_ns() + ALONE_NS;
}

/* Helpers 1 .. parts-1 (the caller holds busy). 0 if one cannot start. */
static int start_helpers(int parts)
{
    static int registered = 0;
    if (!registered) {
        if (pthread_atfork(NULL, NULL, after_fork_child) != 0) return 0;
        registered = 1;
    }
    while (T.helpers < parts - 1) {
        pthread_t th;
        pthread_attr_t at;
        if (pthread_attr_init(&at) != 0) return 0;
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&at, 256 * 1024);
        int rc = pthread_create(&th, &at, helper, (void *)(intptr_t)(T.helpers + 1));
        pthread_attr_destroy(&at);
        if (rc != 0) return 0;
        T.helpers++;
    }
    return 1;
}

static int run_alone(int nl, const layer_t *layer)
{
    int nan = 0;
    for (int k = 0; k < nl; k++) nan |= run_part(&layer[k], 0, 1);
    return nan;
}

/* Products 0..nl-1 of one sample (x of product k is y of product k-1),
 * parts <= MAX_PARTS, nl <= MAX_LAYERS (else one thread). Returns 1 if a
 * codebook product saw a NaN (a NaN input or a corrupt index: the caller
 * runs the layers again on one thread for their own status), else 0. */
int pykd_one_chain(int nl, const layer_t *chain, int parts)
{
    if (nl <= 0) return 0;
    if (nl > MAX_LAYERS) return run_alone(nl, chain);   /* the caller splits at most MAX_LAYERS */
    if (parts > MAX_PARTS) parts = MAX_PARTS;
    if (parts < 2 || pthread_mutex_trylock(&T.busy) != 0) return run_alone(nl, chain);
    if (alone_now() || !start_helpers(parts)) {
        T.n_alone++;
        pthread_mutex_unlock(&T.busy);
        return run_alone(nl, chain);
    }
    for (int k = 0; k < nl; k++) T.layer[k] = chain[k];
    uint64_t g = call_word((atomic_load(&T.gen) >> 8) + 1, nl, parts);
    atomic_store(&T.gen, g);                       /* publishes the call (seq_cst) */
    if (atomic_load(&T.sleepers) > 0) {
        pthread_mutex_lock(&T.sleep_mu);
        pthread_cond_broadcast(&T.wake);
        pthread_mutex_unlock(&T.sleep_mu);
    }
    int late = 0, nan = 0;
    for (int k = 0; k < nl; k++) {
        for (int p = 0; p < parts; p++) {          /* ours, then any not started */
            if (!claim(k, p, g)) continue;
            late |= p > 0;
            run_and_publish(k, p, parts, g);
        }
        while (!layer_done(k, parts, g)) CPU_RELAX();
        for (int p = 0; p < parts; p++) nan |= T.part[k][p].nan;   /* after fin's acquire */
    }
    note_call(late);
    pthread_mutex_unlock(&T.busy);
    return nan;
}

/* For the tests: counts[0..2] = split calls, calls run alone (an alone
 * period or no helpers), split calls with a late helper, since the process
 * started or the last reset; then hold = 1 makes the helpers claim nothing
 * (as if descheduled), 0 releases them, -1 leaves it, and reset = 1 zeroes
 * the counts and ends an alone period. Waits for a caller using the helpers. */
void pykd_f32_team_probe(int hold, int reset, long *counts)
{
    pthread_mutex_lock(&T.busy);
    counts[0] = T.n_split;
    counts[1] = T.n_alone;
    counts[2] = T.n_late;
    if (hold >= 0) atomic_store(&T.hold, hold != 0);
    if (reset) {
        T.n_split = T.n_alone = T.n_late = 0;
        T.late_bits = 0;
        T.alone_until = 0;
    }
    pthread_mutex_unlock(&T.busy);
}

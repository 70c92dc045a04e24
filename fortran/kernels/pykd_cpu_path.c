/* Run-time choice of a kernel's instruction path (see pykd_cpu_path.h). */
#include <stdlib.h>
#include <string.h>

#include "pykd_cpu_path.h"

static int choose(const char *env, const char *const *names, int count,
                  pykd_path_runnable runnable)
{
    const char *want = getenv(env);
    if (want != NULL)
        for (int p = 0; p < count; p++)
            if (strcmp(want, names[p]) == 0 && runnable(p)) return p;
    for (int p = count - 1; p > 0; p--)
        if (runnable(p)) return p;
    return 0;
}

int pykd_path_get(int *cache, const char *env, const char *const *names, int count,
                  pykd_path_runnable runnable)
{
    int p = __atomic_load_n(cache, __ATOMIC_ACQUIRE);
    if (p < 0) {
        p = choose(env, names, count, runnable);
        __atomic_store_n(cache, p, __ATOMIC_RELEASE);
    }
    return p;
}

void pykd_path_name_fill(const char *const *names, int path, char *name, int len)
{
    const char *s = names[path];
    int k = (int)strlen(s);
    for (int c = 0; c < len; c++) name[c] = c < k ? s[c] : ' ';
}

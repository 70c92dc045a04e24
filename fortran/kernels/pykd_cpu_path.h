/* Run-time choice of a kernel's instruction path, shared by the SIMD files.
 *
 * Each kernel file names its paths (index 0 is the portable one) and says
 * which the CPU can run; pykd_path_get picks the environment variable's path
 * when it names a runnable one, else the highest runnable path, once per
 * process. The choice is deterministic, so racing first calls agree. */
#ifndef PYKD_CPU_PATH_H
#define PYKD_CPU_PATH_H

typedef int (*pykd_path_runnable)(int path);

int pykd_path_get(int *cache, const char *env, const char *const *names, int count,
                  pykd_path_runnable runnable);

/* names[path], blank padded to len (a Fortran character buffer). */
void pykd_path_name_fill(const char *const *names, int path, char *name, int len);

#endif

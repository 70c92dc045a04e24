/* fsync of the directory that holds a file, so that a rename into it is
 * durable (the model writer's last step, as pykd/io.py's atomic_write). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* 0 on success, -1 if the directory cannot be opened or fsynced. `path` is
 * a NUL-terminated file name; its directory is the part before the last '/'
 * ("/" for "/name", "." for a bare name). */
int pykd_fsync_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    size_t n = slash == NULL ? 1 : (slash == path ? 1 : (size_t)(slash - path));
    char *dir = malloc(n + 1);
    if (dir == NULL) return -1;
    memcpy(dir, slash == NULL ? "." : path, n);
    dir[n] = '\0';
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(dir);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc == 0 ? 0 : -1;
}

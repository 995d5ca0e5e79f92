/*
 * layerwrite: write the plain members of a layer's tar stream without the GIL.
 *
 * Loaded with ctypes by sandbox/layerwrite.py (ctypes releases the GIL for the length of each
 * call). One call of layerwrite_run takes a window of decoded tar bytes starting at a member's
 * header and writes, one after the other, the members it fully holds that are of the common
 * kinds: regular files, directories and symlinks in a plain header. It stops at the first
 * member it does not take, and the Python writer (sandbox/unpack.py) goes on from there, so
 * every decision it makes is one the Python path makes the same way, and everything else
 * (long names, PAX records, hardlinks, devices, whiteouts, the root, a path that exists, a
 * parent that does not) is left to Python, which stays the reference.
 *
 * Taken: a header that sandbox.unpack.simple_member parses (checksum as the unsigned sum,
 * numbers in octal, with only spaces before and NULs or spaces after the digits), of type '0',
 * '\0' (not an old V7 directory named with a trailing slash), '5' or '2'; a name (the ustar
 * prefix, '/', the name) whose components, once empty ones and '.' are dropped, hold no '..'
 * and whose last does not start with ".wh."; mtime below 2^32 (so that Python's nanoseconds,
 * round(float(mtime) * 1e9), are exact and equal ours); a symlink target that is not empty;
 * a file whose data is all in the window and within the byte budget; and no more members
 * than the entry budget.
 *
 * Written as sandbox.unpack.LayerWriter writes (see its docstring for why it is safe): the
 * parent directory is resolved in the root with openat2(RESOLVE_IN_ROOT |
 * RESOLVE_NO_MAGICLINKS), or is a directory this call created (opened O_NOFOLLOW in such a
 * parent); the last component is created with O_CREAT | O_EXCL | O_NOFOLLOW, mkdirat or
 * symlinkat, so nothing that exists is ever followed or changed here. A parent that cannot be
 * resolved, or a name that exists, hands the member back before anything is done. Then
 * fchown before fchmod (chown clears the setuid bits), futimens / utimensat for files and
 * symlinks; a directory's time is the caller's to set once every member is written.
 *
 * Every path created goes into `created` (NUL-terminated, components joined by '/') and every
 * directory into dir_offsets (where its path starts in `created`) and dir_mtimes, for the
 * Python writer's own records. A failure once a member was begun (write ENOSPC, fchown EPERM,
 * ...) stops the call with res->err set: the member at res->consumed failed.
 *
 * layerwrite_dir_times sets those directory times at the end of a layer, as
 * sandbox.unpack.LayerWriter.finish did in Python: each path resolved in the root with
 * openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS), O_DIRECTORY, then futimens. In Python that
 * loop was the serial tail of every import (~30 ms for the 821 directories of a Debian rootfs,
 * with nothing else left to overlap it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BLOCK 512
#define PATH_CAP 512 /* 155 (prefix) + 1 + 100 (name), with room to spare */
#define CACHED_DIRS 16
#define MAX_MTIME 0x100000000LL

struct layerwrite_result {
    int64_t consumed;     /* bytes of whole members written, from the window's start */
    int64_t entries;      /* members written */
    int64_t file_bytes;   /* file data written */
    int64_t created_len;  /* bytes of `created` used */
    int64_t dirs;         /* entries of dir_offsets and dir_mtimes used */
    int32_t err;          /* errno of a member that failed once begun, at `consumed`; else 0 */
    int32_t pad;
};

struct header {
    char type; /* '0' file, '5' directory, '2' symlink */
    char path[PATH_CAP];
    size_t path_len;
    size_t base; /* where the last component starts in path */
    char target[101];
    int64_t mode, uid, gid, size, mtime;
};

struct dir_cache {
    char path[CACHED_DIRS][PATH_CAP];
    int fd[CACHED_DIRS];
    uint64_t used[CACHED_DIRS];
    uint64_t clock;
};

/* An octal field as simple_member reads it: spaces, digits, then only NULs and spaces. */
static int octal(const unsigned char *field, size_t width, int64_t *out)
{
    size_t i = 0;
    int64_t value = 0;
    while (i < width && field[i] == ' ')
        i++;
    for (; i < width && field[i] >= '0' && field[i] <= '7'; i++)
        value = value * 8 + (field[i] - '0');
    for (; i < width; i++)
        if (field[i] != 0 && field[i] != ' ')
            return -1;
    *out = value;
    return 0;
}

static int all_zero(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/* Append the components of a NUL-padded field to h->path, as parse_member_path keeps them. */
static int add_components(struct header *h, const unsigned char *field, size_t width)
{
    size_t n = strnlen((const char *)field, width), i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n && field[j] != '/')
            j++;
        size_t len = j - i;
        if (len == 2 && field[i] == '.' && field[i + 1] == '.')
            return -1;
        if (len > 0 && !(len == 1 && field[i] == '.')) {
            if (h->path_len + len + 2 > PATH_CAP)
                return -1;
            if (h->path_len)
                h->path[h->path_len++] = '/';
            h->base = h->path_len;
            memcpy(h->path + h->path_len, field + i, len);
            h->path_len += len;
        }
        i = j + 1;
    }
    h->path[h->path_len] = 0;
    return 0;
}

/* 0 and the member in h, or -1: a header this file leaves to Python. */
static int parse(const unsigned char *b, struct header *h)
{
    int64_t checksum, unused;
    unsigned sum = 8 * ' ';
    for (int i = 0; i < BLOCK; i++)
        if (i < 148 || i >= 156)
            sum += b[i];
    if (octal(b + 148, 8, &checksum) || checksum != (int64_t)sum)
        return -1;
    h->type = (char)b[156];
    size_t name_len = strnlen((const char *)b, 100);
    if (h->type == 0 && !(name_len && b[name_len - 1] == '/'))
        h->type = '0';
    if (h->type != '0' && h->type != '5' && h->type != '2')
        return -1;
    if (octal(b + 100, 8, &h->mode) || octal(b + 108, 8, &h->uid) || octal(b + 116, 8, &h->gid)
        || octal(b + 124, 12, &h->size) || octal(b + 136, 12, &h->mtime))
        return -1;
    if (!all_zero(b + 329, 16) && (octal(b + 329, 8, &unused) || octal(b + 337, 8, &unused)))
        return -1;
    if (h->mtime >= MAX_MTIME)
        return -1;
    h->path_len = 0;
    h->base = 0;
    if (b[345] && add_components(h, b + 345, 155))
        return -1;
    if (add_components(h, b, 100) || h->path_len == 0)
        return -1;
    if (strncmp(h->path + h->base, ".wh.", 4) == 0)
        return -1;
    if (h->type == '2') {
        memcpy(h->target, b + 157, 100);
        h->target[100] = 0;
        if (!h->target[0])
            return -1;
    }
    return 0;
}

static int cache_find(struct dir_cache *c, const char *path)
{
    for (int i = 0; i < CACHED_DIRS; i++)
        if (c->fd[i] >= 0 && strcmp(c->path[i], path) == 0) {
            c->used[i] = ++c->clock;
            return c->fd[i];
        }
    return -1;
}

/* Keep fd (now owned by the cache) for path, in place of the least recently used. */
static void cache_put(struct dir_cache *c, const char *path, int fd)
{
    int slot = 0;
    for (int i = 1; i < CACHED_DIRS; i++)
        if (c->used[i] < c->used[slot])
            slot = i;
    if (c->fd[slot] >= 0)
        close(c->fd[slot]);
    strcpy(c->path[slot], path);
    c->fd[slot] = fd;
    c->used[slot] = ++c->clock;
}

/* The parent directory of h, or -1 (nothing done): resolved in the root, never outside it. */
static int parent_fd(int root, struct dir_cache *c, struct header *h)
{
    if (h->base == 0)
        return root;
    char parent[PATH_CAP];
    memcpy(parent, h->path, h->base - 1);
    parent[h->base - 1] = 0;
    int fd = cache_find(c, parent);
    if (fd >= 0)
        return fd;
    struct open_how how = {
        .flags = O_PATH | O_DIRECTORY | O_CLOEXEC,
        .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    fd = (int)syscall(SYS_openat2, root, parent, &how, sizeof how);
    if (fd >= 0)
        cache_put(c, parent, fd);
    return fd;
}

static int write_all(int fd, const unsigned char *data, int64_t size)
{
    while (size > 0) {
        ssize_t n = write(fd, data, (size_t)size);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        size -= n;
    }
    return 0;
}

/* 1: written; 0: handed back, nothing done; -1: failed once begun (errno set). */
static int write_file(int parent, struct header *h, const unsigned char *data)
{
    int fd = openat(parent, h->path + h->base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                    0600);
    if (fd < 0)
        return 0;
    struct timespec times[2] = {{h->mtime, 0}, {h->mtime, 0}};
    int failed = write_all(fd, data, h->size) || fchown(fd, (uid_t)h->uid, (gid_t)h->gid)
                 || fchmod(fd, (mode_t)(h->mode & 07777)) || futimens(fd, times);
    int saved = errno;
    close(fd);
    errno = saved;
    return failed ? -1 : 1;
}

/* As write_file; a directory's fd is kept as the parent of the members that follow. */
static int write_directory(int parent, struct dir_cache *c, struct header *h)
{
    if (mkdirat(parent, h->path + h->base, 0700) < 0)
        return 0;
    int fd = openat(parent, h->path + h->base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fchown(fd, (uid_t)h->uid, (gid_t)h->gid) || fchmod(fd, (mode_t)(h->mode & 07777))) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    cache_put(c, h->path, fd);
    return 1;
}

static int write_symlink(int parent, struct header *h)
{
    const char *name = h->path + h->base;
    if (symlinkat(h->target, parent, name) < 0)
        return 0;
    struct timespec times[2] = {{h->mtime, 0}, {h->mtime, 0}};
    if (fchownat(parent, name, (uid_t)h->uid, (gid_t)h->gid, AT_SYMLINK_NOFOLLOW)
        || utimensat(parent, name, times, AT_SYMLINK_NOFOLLOW))
        return -1;
    return 1;
}

void layerwrite_run(const unsigned char *window, int64_t len, int root, int64_t max_entries,
                   int64_t max_bytes, char *created, int64_t created_cap, int64_t *dir_offsets,
                   int64_t *dir_mtimes, int64_t dir_cap, struct layerwrite_result *res)
{
    struct dir_cache cache;
    struct header h;
    memset(&cache, 0, sizeof cache);
    for (int i = 0; i < CACHED_DIRS; i++)
        cache.fd[i] = -1;
    memset(res, 0, sizeof *res);
    int64_t off = 0;
    while (off + BLOCK <= len && res->entries < max_entries && res->dirs < dir_cap
           && res->created_len + PATH_CAP <= created_cap) {
        const unsigned char *b = window + off;
        if (parse(b, &h))
            break;
        int64_t data = h.type == '0' ? (h.size + BLOCK - 1) / BLOCK * BLOCK : 0;
        if (data > len - off - BLOCK || (h.type == '0' && h.size > max_bytes - res->file_bytes))
            break;
        int parent = parent_fd(root, &cache, &h);
        if (parent < 0)
            break;
        int done = h.type == '0'   ? write_file(parent, &h, b + BLOCK)
                   : h.type == '5' ? write_directory(parent, &cache, &h)
                                   : write_symlink(parent, &h);
        if (done < 0)
            res->err = errno ? errno : EIO;
        if (done <= 0)
            break;
        if (h.type == '5') {
            dir_offsets[res->dirs] = res->created_len;
            dir_mtimes[res->dirs++] = h.mtime;
        } else if (h.type == '0') {
            res->file_bytes += h.size;
        }
        memcpy(created + res->created_len, h.path, h.path_len + 1);
        res->created_len += (int64_t)h.path_len + 1;
        res->entries++;
        off += BLOCK + data;
    }
    res->consumed = off;
    for (int i = 0; i < CACHED_DIRS; i++)
        if (cache.fd[i] >= 0)
            close(cache.fd[i]);
}

/* Set the mtime (and atime) of each of the `count` directories in `paths` (NUL-terminated,
 * components joined by '/', "" for the root) to mtimes_ns[i], in that order. A path that is
 * no longer a directory (ENOENT, ENOTDIR, ELOOP: replaced or removed by a later member) is
 * skipped; the root never is. Returns `count`, or the index of the path that failed with
 * *err its errno and *call 0 for openat2, 1 for futimens. */
int64_t layerwrite_dir_times(int root, const char *paths, int64_t count, const int64_t *mtimes_ns,
                             int32_t *err, int32_t *call)
{
    const char *path = paths;
    for (int64_t i = 0; i < count; path += strlen(path) + 1, i++) {
        struct open_how how = {
            .flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC,
            .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        };
        int fd = (int)syscall(SYS_openat2, root, *path ? path : ".", &how, sizeof how);
        if (fd < 0) {
            if (*path && (errno == ENOENT || errno == ENOTDIR || errno == ELOOP))
                continue;
            *err = errno;
            *call = 0;
            return i;
        }
        /* Floor division, as os.utime(ns=...) splits nanoseconds before 1970. */
        int64_t sec = mtimes_ns[i] / 1000000000, nsec = mtimes_ns[i] % 1000000000;
        if (nsec < 0) {
            sec -= 1;
            nsec += 1000000000;
        }
        struct timespec times[2] = {{sec, nsec}, {sec, nsec}};
        int failed = futimens(fd, times) < 0 ? errno : 0;
        close(fd);
        if (failed) {
            *err = failed;
            *call = 1;
            return i;
        }
    }
    return count;
}

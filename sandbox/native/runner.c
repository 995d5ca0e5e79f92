/*
 * runtimed-runner: sets up one sandbox and runs its command (steps 2 to 10 of a run).
 *
 * Why C: each run used to fork a warm Python helper three times and wrap every system call
 * in milliseconds of interpreter work (about 20 ms a run); this does the same system calls
 * in well under one, and a static binary execs in a fraction of a millisecond. runc does the
 * same for the same reason (libcontainer/nsenter/nsexec.c). The policy stays in Python: the
 * launcher decides, plans and encodes everything (sandbox/wire.py); this program only
 * executes the plan, in a fixed order, and reports.
 *
 * Started by the launcher (sandbox/runner.py) with posix_spawn, never through a shell:
 *
 *     runtimed-runner PARENT_PID      fd 0/1/2: the command's stdio
 *                                     fd 3: the shape of the sandbox (read to EOF first)
 *                                     fd 4: status, one JSON object per line
 *                                     fd 5: the command (read to EOF by PID 1 once the
 *                                           sandbox is built: a runner can build one ahead)
 * Both halves of the plan are NUL-separated tokens (sandbox/wire.py).
 *
 * or forked by a spawner the launcher keeps (posix_spawn of a runner from the daemon, a big
 * process, waits for the exec; a fork of this small one does not):
 *
 *     runtimed-runner spawner PARENT_PID   fd 3: a SOCK_SEQPACKET socket; each message
 *                                          carries the six fds above (stdin, stdout, stderr,
 *                                          status, shape, command) and a socket to answer on,
 *                                          and as data "r" and the NUL-terminated paths of
 *                                          the run's cgroups, to create first
 * It creates the cgroups, then clones a runner with CLONE_PARENT, so that the runner is the
 * launcher's child as a posix_spawn'd one is (reaped by it, killed by PR_SET_PDEATHSIG with
 * it), and answers with two ints, the runner's PID and 0, and a pidfd for it; or -errno and
 * the index of the cgroup it could not create (-1: the clone failed), the cgroups it did
 * create removed again. EOF on fd 3 ends it.
 *
 * Processes:
 *
 *     runner ── [user namespace child] ── unshare, fork ──► PID 1 ── fork ──► command
 *     moves PID 1 into the run's cgroups,   reaps zombies, forwards    drops privileges,
 *     forwards TERM/INT/HUP, exits with     signals, exits with the    chdir, PTRACE_TRACEME,
 *     PID 1's status; dies with the         command's status           exec
 *     launcher (PR_SET_PDEATHSIG)
 *
 * Status lines (parsed by sandbox/runner.py):
 *     {"type":"error","syscall":S,"errno":N,"path":HEX|null,"flags":N|null,"op":I|null}
 *     {"type":"exec_error","errno":N}
 *     {"type":"started","pid":N,"exe":HEX}
 *     {"type":"exited","code":N}  /  {"type":"exited","signal":N}
 *     {"type":"finished","accounting":[HEX|null,...]}
 *                                 PID 1 was reaped: the sandbox's processes are all gone; the
 *                                 text of each accounting file of the plan, read then. The
 *                                 runner removes the run's cgroups next and exits 0, or
 *                                 CGROUPS_LEFT if one stayed (the launcher removes it).
 * Paths travel hex-encoded: any byte string is a valid Linux path, not every one valid JSON.
 *
 * Every destination below the new root is resolved with openat2(RESOLVE_IN_ROOT) and mounted
 * through its O_PATH descriptor (/proc/self/fd/N), so a rootfs symlink such as /etc -> /
 * cannot redirect a mount onto the host (runc CVE-2019-16884 class).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/openat2.h>
#include <linux/sched.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define SHAPE_FD 3
#define COMMAND_FD 5
#define STATUS_FD 4
#define MAX_PLAN (4 << 20)
#define SETUP_FAILED 125
#define EXEC_FAILED 126
#define NOT_FOUND 127
#define CAP_PTRACE_BIT 19
#define CGROUPS_LEFT 124    /* exit status: a cgroup of the run could not be removed */
#define MAX_ACCOUNTING 8    /* accounting files, */
#define ACCOUNTING_TEXT 1024 /* and the bytes read of each */
#define REMOVE_TRIES 5000   /* 1 ms apart: a cgroup busy for 5 s is left to the launcher */

extern char **environ;

/* --- status ------------------------------------------------------------------------------- */

static void send_line(const char *line, size_t len) {
    /* One write per message: pipe writes up to PIPE_BUF are atomic. */
    while (write(STATUS_FD, line, len) < 0 && errno == EINTR) {
    }
}

static void hex(char *out, size_t size, const char *in) {
    static const char digits[] = "0123456789abcdef";
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p && n + 3 < size; p++) {
        out[n++] = digits[*p >> 4];
        out[n++] = digits[*p & 15];
    }
    out[n] = 0;
}

/* The op being applied when a step fails (-1 outside the ops), reported with the error. */
static int current_op = -1;

static _Noreturn void fail_with(const char *syscall_name, int err, const char *path,
                                const long long *flags, int code) {
    char path_hex[8192], flags_text[32], line[8400];
    char op_text[16];
    if (flags)
        snprintf(flags_text, sizeof flags_text, "%lld", *flags);
    else
        strcpy(flags_text, "null");
    if (current_op >= 0)
        snprintf(op_text, sizeof op_text, "%d", current_op);
    else
        strcpy(op_text, "null");
    int len;
    if (path) {
        hex(path_hex, sizeof path_hex, path);
        len = snprintf(line, sizeof line,
                       "{\"type\":\"error\",\"syscall\":\"%s\",\"errno\":%d,\"path\":\"%s\","
                       "\"flags\":%s,\"op\":%s}\n",
                       syscall_name, err, path_hex, flags_text, op_text);
    } else {
        len = snprintf(line, sizeof line,
                       "{\"type\":\"error\",\"syscall\":\"%s\",\"errno\":%d,\"path\":null,"
                       "\"flags\":%s,\"op\":%s}\n",
                       syscall_name, err, flags_text, op_text);
    }
    if (len > 0)
        send_line(line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1);
    _exit(code);
}

static _Noreturn void fail(const char *syscall_name, const char *path) {
    fail_with(syscall_name, errno, path, NULL, SETUP_FAILED);
}

static _Noreturn void fail_flags(const char *syscall_name, const char *path, long long flags) {
    fail_with(syscall_name, errno, path, &flags, SETUP_FAILED);
}

/* A malformed plan: the launcher wrote it, so this is a bug there, reported as EINVAL. */
static _Noreturn void bad_plan(void) {
    fail_with("plan", EINVAL, NULL, NULL, SETUP_FAILED);
}

static void send_fmt(const char *fmt, ...) {
    char line[8400];
    va_list args;
    va_start(args, fmt);
    int len = vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    if (len > 0)
        send_line(line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1);
}

/* --- the plan ----------------------------------------------------------------------------- */

enum op_kind { OP_BIND, OP_TMPFS, OP_PROC, OP_SYSFS, OP_DEVPTS, OP_SYMLINK, OP_MASK,
               OP_READONLY, OP_FILE };

struct op {
    enum op_kind kind;
    const char *destination;
    const char *source; /* bind: host path; symlink: target; file: content */
    unsigned long mode, size;
    int readonly, noexec, nodev;
};

struct rlim {
    int resource;
    rlim_t soft, hard;
};

struct plan {
    const char *overlay, *workspace, *hostname, *uid_map, *gid_map, *cwd;
    int namespaces, user, cgroupns, loopback, scratch;
    const char **binfmt, **cgroups, **accounting;
    int nbinfmt, ncgroups, naccounting;
    struct op *ops;
    int nops;
    uid_t uid;
    gid_t gid;
    gid_t *groups;
    int ngroups;
    struct rlim *rlimits;
    int nrlimits;
    uint64_t capabilities;
    char **argv, **envp;
};

struct tokens {
    char *next, *end;
};

static const char *token(struct tokens *t) {
    if (t->next >= t->end)
        bad_plan();
    char *start = t->next;
    char *nul = memchr(start, 0, (size_t)(t->end - start));
    if (!nul)
        bad_plan();
    t->next = nul + 1;
    return start;
}

static void expect(struct tokens *t, const char *key) {
    if (strcmp(token(t), key) != 0)
        bad_plan();
}

static unsigned long long number(struct tokens *t) {
    const char *text = token(t);
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-')
        bad_plan();
    return value;
}

static int count(struct tokens *t, int limit) {
    unsigned long long n = number(t);
    if (n > (unsigned long long)limit)
        bad_plan();
    return (int)n;
}

static void *array(int n, size_t size) {
    void *p = calloc((size_t)n + 1, size);
    if (!p)
        fail("calloc", NULL);
    return p;
}

static const char **strings(struct tokens *t, const char *key, int *n) {
    expect(t, key);
    *n = count(t, 1 << 16);
    const char **out = array(*n, sizeof *out);
    for (int i = 0; i < *n; i++)
        out[i] = token(t);
    return out;
}

/* The ops that name nothing but their destination. */
static const struct {
    const char *name;
    enum op_kind kind;
} DESTINATION_OPS[] = {
    {"proc", OP_PROC},  {"sysfs", OP_SYSFS},       {"devpts", OP_DEVPTS},
    {"mask", OP_MASK},  {"readonly", OP_READONLY},
};

static void read_op(struct tokens *t, struct op *op) {
    const char *kind = token(t);
    memset(op, 0, sizeof *op);
    for (size_t i = 0; i < sizeof DESTINATION_OPS / sizeof *DESTINATION_OPS; i++) {
        if (!strcmp(kind, DESTINATION_OPS[i].name)) {
            op->kind = DESTINATION_OPS[i].kind;
            op->destination = token(t);
            return;
        }
    }
    if (!strcmp(kind, "bind")) {
        op->kind = OP_BIND;
        op->source = token(t);
        op->destination = token(t);
        op->readonly = (int)number(t);
    } else if (!strcmp(kind, "tmpfs")) {
        op->kind = OP_TMPFS;
        op->destination = token(t);
        op->mode = (unsigned long)number(t);
        op->size = (unsigned long)number(t);
        op->noexec = (int)number(t);
        op->nodev = (int)number(t);
    } else if (!strcmp(kind, "symlink")) {
        op->kind = OP_SYMLINK;
        op->source = token(t);
        op->destination = token(t);
    } else if (!strcmp(kind, "file")) {
        op->kind = OP_FILE;
        op->destination = token(t);
        op->source = token(t);
    } else {
        bad_plan();
    }
    if (op->destination[0] != '/')
        bad_plan();
}

/* RLIMIT_* names as sandbox/spec.py accepts them: lowercase, without the prefix. */
static int rlimit_resource(const char *name) {
    static const struct { const char *name; int resource; } names[] = {
        {"as", RLIMIT_AS},         {"core", RLIMIT_CORE},     {"cpu", RLIMIT_CPU},
        {"data", RLIMIT_DATA},     {"fsize", RLIMIT_FSIZE},   {"memlock", RLIMIT_MEMLOCK},
        {"msgqueue", RLIMIT_MSGQUEUE}, {"nice", RLIMIT_NICE}, {"nofile", RLIMIT_NOFILE},
        {"nproc", RLIMIT_NPROC},   {"rtprio", RLIMIT_RTPRIO}, {"stack", RLIMIT_STACK},
    };
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++)
        if (!strcmp(name, names[k].name))
            return names[k].resource;
    bad_plan();
}

/* Namespace names as in sandbox/plan.py: "user" and "cgroup" are not unshared with the others
 * (the user namespace first, by a child; the cgroup one by PID 1 once it is in its cgroups). */
static void read_namespaces(struct tokens *t, struct plan *plan) {
    static const struct { const char *name; int flag; } names[] = {
        {"mount", CLONE_NEWNS}, {"pid", CLONE_NEWPID}, {"uts", CLONE_NEWUTS},
        {"ipc", CLONE_NEWIPC},  {"net", CLONE_NEWNET},
    };
    int n;
    const char **list = strings(t, "namespaces", &n);
    for (int i = 0; i < n; i++) {
        if (!strcmp(list[i], "user")) {
            plan->user = 1;
            continue;
        }
        if (!strcmp(list[i], "cgroup")) {
            plan->cgroupns = 1;
            continue;
        }
        size_t k = 0;
        while (k < sizeof names / sizeof names[0] && strcmp(list[i], names[k].name))
            k++;
        if (k == sizeof names / sizeof names[0])
            bad_plan();
        plan->namespaces |= names[k].flag;
    }
}

/* Everything until EOF on `fd` (closed then), as tokens that start with `magic`. */
static struct tokens read_tokens(int fd, const char *magic) {
    char *buffer = malloc(MAX_PLAN);
    if (!buffer)
        fail("malloc", NULL);
    size_t size = 0;
    for (;;) {
        ssize_t n = read(fd, buffer + size, MAX_PLAN - size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail("read", "plan");
        if (n == 0)
            break;
        size += (size_t)n;
        if (size == MAX_PLAN)
            bad_plan();
    }
    close(fd);
    struct tokens t = {buffer, buffer + size};
    expect(&t, magic);
    return t;
}

static void expect_end(struct tokens *t) {
    expect(t, "end");
    if (t->next != t->end)
        bad_plan();
}

/* The first half of the plan, the sandbox itself: everything up to pivot_root. */
static void read_shape(struct plan *plan) {
    struct tokens t = read_tokens(SHAPE_FD, "runtimed-shape-1");
    expect(&t, "overlay");
    plan->overlay = token(&t);
    expect(&t, "workspace");
    plan->workspace = token(&t);
    expect(&t, "scratch");
    plan->scratch = (int)number(&t);
    read_namespaces(&t, plan);
    expect(&t, "hostname");
    plan->hostname = token(&t);
    expect(&t, "loopback");
    plan->loopback = (int)number(&t);
    expect(&t, "uid_map");
    plan->uid_map = token(&t);
    expect(&t, "gid_map");
    plan->gid_map = token(&t);
    plan->binfmt = strings(&t, "binfmt", &plan->nbinfmt);
    expect(&t, "ops");
    plan->nops = count(&t, 4096);
    plan->ops = array(plan->nops, sizeof *plan->ops);
    for (int i = 0; i < plan->nops; i++)
        read_op(&t, &plan->ops[i]);
    /* Last, so that the launcher adds a spare's cgroups to a shape it encoded once. */
    plan->cgroups = strings(&t, "cgroups", &plan->ncgroups);
    plan->accounting = strings(&t, "accounting", &plan->naccounting);
    if (plan->naccounting > MAX_ACCOUNTING)
        bad_plan();
    expect_end(&t);
}

/* The second half, what to run in it: read by PID 1 once the sandbox is built, so a runner
 * can build one ahead of the request that fills it in. */
static void read_command(struct plan *plan) {
    struct tokens t = read_tokens(COMMAND_FD, "runtimed-command-1");
    expect(&t, "cwd");
    plan->cwd = token(&t);
    expect(&t, "uid");
    plan->uid = (uid_t)number(&t);
    expect(&t, "gid");
    plan->gid = (gid_t)number(&t);
    expect(&t, "groups");
    plan->ngroups = count(&t, 65536);
    plan->groups = array(plan->ngroups, sizeof *plan->groups);
    for (int i = 0; i < plan->ngroups; i++)
        plan->groups[i] = (gid_t)number(&t);
    expect(&t, "rlimits");
    plan->nrlimits = count(&t, 64);
    plan->rlimits = array(plan->nrlimits, sizeof *plan->rlimits);
    for (int i = 0; i < plan->nrlimits; i++) {
        plan->rlimits[i].resource = rlimit_resource(token(&t));
        plan->rlimits[i].soft = (rlim_t)number(&t);
        plan->rlimits[i].hard = (rlim_t)number(&t);
    }
    expect(&t, "capabilities");
    plan->capabilities = (uint64_t)number(&t);
    int n;
    plan->argv = (char **)strings(&t, "argv", &n);
    if (n == 0)
        bad_plan();
    plan->envp = (char **)strings(&t, "env", &n);
    expect_end(&t);
}

/* --- small wrappers ----------------------------------------------------------------------- */

static void fd_path(char *out, size_t size, int fd) {
    snprintf(out, size, "/proc/self/fd/%d", fd);
}

static int open_how(int dirfd, const char *path, unsigned long long flags,
                    unsigned long long resolve) {
    struct open_how how = {.flags = flags | O_CLOEXEC, .mode = 0, .resolve = resolve};
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
}

static void do_mount(const char *source, const char *target, const char *type,
                     unsigned long flags, const char *data, const char *shown) {
    if (mount(source, target, type, flags, data) < 0)
        fail_flags("mount", shown, (long long)flags);
}

static void write_file(const char *path, const char *text, const char *syscall_name) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        fail("open", path);
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len)
        fail(syscall_name, path);
    close(fd);
}

static const char *relative(const char *path) {
    while (*path == '/')
        path++;
    return *path ? path : ".";
}

/* Split "/a/b/c" into a parent "/a/b" (in buf) and a name "c"; the path has no trailing /. */
static const char *split(const char *path, char *parent, size_t size) {
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 0;
    if (n >= size)
        n = size - 1;
    memcpy(parent, path, n);
    parent[n] = 0;
    return slash ? slash + 1 : path;
}

/* --- resolution inside the new root (sandbox/mounts.py before; runc securejoin) ----------- */

#define IN_ROOT (RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
#define BENEATH (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)

/* The directory `path` inside the root, created (with its parents) when missing. */
static int open_directory(int root_fd, const char *path) {
    char clean[4096];
    snprintf(clean, sizeof clean, "%s", path);
    size_t len = strlen(clean);
    while (len > 1 && clean[len - 1] == '/')
        clean[--len] = 0;
    int fd = open_how(root_fd, relative(clean), O_PATH | O_DIRECTORY, IN_ROOT);
    if (fd >= 0)
        return fd;
    if (errno != ENOENT)
        fail_flags("openat2", relative(clean), IN_ROOT);
    char parent[4096];
    const char *name = split(clean, parent, sizeof parent);
    int parent_fd = open_directory(root_fd, parent);
    if (mkdirat(parent_fd, name, 0755) < 0 && errno != EEXIST)
        fail("mkdirat", clean);
    close(parent_fd);
    fd = open_how(root_fd, relative(clean), O_PATH | O_DIRECTORY, IN_ROOT);
    if (fd < 0)
        fail_flags("openat2", relative(clean), IN_ROOT);
    return fd;
}

/* Make `name` below `parent_fd` a real directory or file to mount on: a symlink there (such as
 * debootstrap's proc -> /proc) is replaced, in the run's upper directory. */
static void make_mount_point(int parent_fd, const char *name, int directory) {
    struct stat st;
    if (fstatat(parent_fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0) {
        if (!S_ISLNK(st.st_mode))
            return; /* a type mismatch fails the mount */
        if (unlinkat(parent_fd, name, 0) < 0)
            fail("unlinkat", name);
    } else if (errno != ENOENT) {
        fail("fstatat", name);
    }
    if (directory) {
        if (mkdirat(parent_fd, name, 0755) < 0)
            fail("mknodat", name);
    } else {
        int fd = openat(parent_fd, name, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC,
                        0644);
        if (fd < 0)
            fail("mknodat", name);
        close(fd);
    }
}

/* An O_PATH fd of `path` inside the root; with `create` (1 dir, 2 file) a mount point made when
 * missing, else -1 with errno ENOENT when missing. */
static int open_in_root(int root_fd, const char *path, int create, int missing_ok) {
    const char *rel = relative(path);
    if (!create || !strcmp(rel, ".")) {
        int fd = open_how(root_fd, rel, O_PATH, IN_ROOT);
        if (fd < 0 && !(missing_ok && errno == ENOENT))
            fail_flags("openat2", rel, IN_ROOT);
        return fd;
    }
    char parent[4096];
    const char *name = split(path, parent, sizeof parent);
    int parent_fd = open_directory(root_fd, parent[0] ? parent : "/");
    make_mount_point(parent_fd, name, create == 1);
    int fd = open_how(parent_fd, name, O_PATH, BENEATH);
    if (fd < 0)
        fail_flags("openat2", name, BENEATH);
    close(parent_fd);
    return fd;
}

/* Make the mount on `destination` read-only, keeping its locked flags (a bind remount inside a
 * user namespace must repeat them: mount(2) MS_REMOUNT, bubblewrap bind_mount()). Opened again:
 * an fd taken before the bind points at the mount underneath. */
static void remount_readonly(int root_fd, const char *destination) {
    static const struct { unsigned long st, ms; } kept[] = {
        {ST_NOSUID, MS_NOSUID},       {ST_NODEV, MS_NODEV},
        {ST_NOEXEC, MS_NOEXEC},       {ST_NOATIME, MS_NOATIME},
        {ST_NODIRATIME, MS_NODIRATIME}, {ST_RELATIME, MS_RELATIME},
    };
    int fd = open_in_root(root_fd, destination, 0, 0);
    char path[64];
    fd_path(path, sizeof path, fd);
    struct statvfs vfs;
    if (statvfs(path, &vfs) < 0)
        fail("statvfs", destination);
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY;
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++)
        if (vfs.f_flag & kept[i].st)
            flags |= kept[i].ms;
    do_mount(NULL, path, NULL, flags, NULL, destination);
    close(fd);
}

/* --- the ops ------------------------------------------------------------------------------ */

static void apply_existing(const struct op *op, int root_fd) {
    int fd = open_in_root(root_fd, op->destination, 0, 1);
    if (fd < 0)
        return; /* nothing to hide or protect */
    char path[64];
    fd_path(path, sizeof path, fd);
    if (op->kind == OP_READONLY) {
        do_mount(path, path, NULL, MS_BIND | MS_REC, NULL, op->destination);
        remount_readonly(root_fd, op->destination);
    } else {
        struct stat st;
        if (stat(path, &st) < 0)
            fail("stat", op->destination);
        if (S_ISDIR(st.st_mode))
            do_mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=0",
                     op->destination);
        else
            do_mount("/dev/null", path, NULL, MS_BIND, NULL, op->destination);
    }
    close(fd);
}

static void apply_symlink(const struct op *op, int root_fd) {
    char parent[4096];
    const char *name = split(op->destination, parent, sizeof parent);
    int parent_fd = open_directory(root_fd, parent[0] ? parent : "/");
    if (symlinkat(op->source, parent_fd, name) < 0 && errno != EEXIST)
        fail("symlinkat", op->destination);
    close(parent_fd);
}

/* The content of a file op, written into the workspace (outside the new root) to bind. */
static void write_workspace_file(const struct op *op, const char *workspace, char *out,
                                 size_t size) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/files", workspace);
    if (mkdir(dir, 0755) < 0 && errno != EEXIST)
        fail("mkdir", dir);
    int n = snprintf(out, size, "%s/", dir);
    for (const char *p = relative(op->destination); *p && (size_t)n + 1 < size; p++)
        out[n++] = *p == '/' ? '_' : *p;
    out[n] = 0;
    int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0)
        fail("open", out);
    size_t len = strlen(op->source);
    if (write(fd, op->source, len) != (ssize_t)len)
        fail("write", out);
    close(fd);
}

static void apply(const struct op *op, int root_fd, const char *workspace) {
    if (op->kind == OP_MASK || op->kind == OP_READONLY) {
        apply_existing(op, root_fd);
        return;
    }
    if (op->kind == OP_SYMLINK) {
        apply_symlink(op, root_fd);
        return;
    }
    char file[8192];
    const char *source = NULL;
    int create = 1;
    if (op->kind == OP_BIND) {
        struct stat st;
        create = stat(op->source, &st) == 0 && S_ISDIR(st.st_mode) ? 1 : 2;
        source = op->source;
    } else if (op->kind == OP_FILE) {
        write_workspace_file(op, workspace, file, sizeof file);
        create = 2;
        source = file;
    }
    int fd = open_in_root(root_fd, op->destination, create, 0);
    char target[64];
    fd_path(target, sizeof target, fd);
    char data[128];
    switch (op->kind) {
    case OP_BIND:
    case OP_FILE:
        do_mount(source, target, NULL, MS_BIND | MS_REC, NULL, op->destination);
        if (op->kind == OP_BIND && op->readonly)
            remount_readonly(root_fd, op->destination);
        break;
    case OP_TMPFS:
        if (op->size)
            snprintf(data, sizeof data, "mode=%lo,size=%lu", op->mode, op->size);
        else
            snprintf(data, sizeof data, "mode=%lo", op->mode);
        do_mount("tmpfs", target, "tmpfs",
                 MS_NOSUID | (op->nodev ? MS_NODEV : 0) | (op->noexec ? MS_NOEXEC : 0), data,
                 op->destination);
        break;
    case OP_PROC:
        do_mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL,
                 op->destination);
        break;
    case OP_DEVPTS:
        do_mount("devpts", target, "devpts", MS_NOSUID | MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620", op->destination);
        break;
    case OP_SYSFS:
        if (mount("sysfs", target, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  NULL) < 0) {
            /* A fresh sysfs needs a network namespace owned by our user namespace; with the
             * host's network from a private user namespace, bind the host's read-only. */
            if (errno != EPERM)
                fail_flags("mount", op->destination, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC);
            do_mount("/sys", target, NULL, MS_BIND | MS_REC, NULL, op->destination);
            remount_readonly(root_fd, op->destination);
        }
        break;
    default:
        bad_plan();
    }
    close(fd);
}

/* --- signals ------------------------------------------------------------------------------ */

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP};
static volatile sig_atomic_t target_pid;
static volatile sig_atomic_t pending_mask;

static void forward(int signum) {
    int saved = errno;
    if (target_pid > 0)
        kill((pid_t)target_pid, signum);
    else
        pending_mask |= 1 << signum;
    errno = saved;
}

static void install_forwarding(void) {
    struct sigaction action = {.sa_handler = forward};
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < 3; i++)
        sigaction(forwarded[i], &action, NULL);
}

/* Signals that came before the target existed are delivered once it does (PID 1 of a PID
 * namespace otherwise drops signals it has no handler for, pid_namespaces(7)). */
static void attach(pid_t pid) {
    sigset_t block, old;
    sigemptyset(&block);
    for (size_t i = 0; i < 3; i++)
        sigaddset(&block, forwarded[i]);
    sigprocmask(SIG_BLOCK, &block, &old);
    target_pid = pid;
    for (size_t i = 0; i < 3; i++)
        if (pending_mask & (1 << forwarded[i]))
            kill(pid, forwarded[i]);
    pending_mask = 0;
    sigprocmask(SIG_SETMASK, &old, NULL);
}

static int wait_status_code(int status) {
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return WEXITSTATUS(status);
}

/* Wait for `pid` (retrying interrupted waits); its exit code as a shell shows it. */
static int supervise(pid_t pid) {
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return SETUP_FAILED;
    }
    return wait_status_code(status);
}

/* --- capabilities ------------------------------------------------------------------------- */

static void set_capabilities(uint64_t mask) {
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    for (int i = 0; i < 2; i++) {
        uint32_t word = (uint32_t)(mask >> (32 * i));
        data[i].effective = data[i].permitted = word;
        data[i].inheritable = 0;
    }
    if (syscall(SYS_capset, &header, data) < 0)
        fail_flags("capset", NULL, (long long)mask);
}

/* PID 1's half of the privilege drop: rlimits, then the bounding, ambient and effective sets.
 * PID 1 keeps CAP_SYS_PTRACE (outside the bounding set, so no exec regains it) until it has
 * read the command's /proc/PID/exe: that needs it when the command runs as another user. */
static void drop_capabilities(const struct plan *plan) {
    for (int i = 0; i < plan->nrlimits; i++) {
        struct rlimit limit = {plan->rlimits[i].soft, plan->rlimits[i].hard};
        if (setrlimit(plan->rlimits[i].resource, &limit) < 0)
            fail_flags("setrlimit", NULL, plan->rlimits[i].resource);
    }
    char text[16] = {0};
    int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || read(fd, text, sizeof text - 1) <= 0)
        fail("read", "/proc/sys/kernel/cap_last_cap");
    close(fd);
    int last = atoi(text);
    for (int cap = 0; cap <= last; cap++)
        if (!(plan->capabilities & (1ULL << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            fail_flags("prctl", "PR_CAPBSET_DROP", cap);
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        fail_flags("prctl", "PR_CAP_AMBIENT", PR_CAP_AMBIENT_CLEAR_ALL);
    set_capabilities(plan->capabilities | (1ULL << CAP_PTRACE_BIT));
}

/* --- the command -------------------------------------------------------------------------- */

static void drop_privileges(const struct plan *plan) {
    if (setgroups((size_t)plan->ngroups, plan->groups) < 0) {
        /* A user namespace with setgroups "deny" keeps the groups it was created with:
         * acceptable only when none were asked for (user_namespaces(7)). */
        char text[16] = {0};
        int saved = errno;
        int fd = open("/proc/self/setgroups", O_RDONLY | O_CLOEXEC);
        int denied = fd >= 0 && read(fd, text, sizeof text - 1) > 0 && !strncmp(text, "deny", 4);
        if (fd >= 0)
            close(fd);
        errno = saved;
        if (plan->ngroups || saved != EPERM || !denied)
            fail("setgroups", NULL);
    }
    if (setresgid(plan->gid, plan->gid, plan->gid) < 0)
        fail_flags("setresgid", NULL, plan->gid);
    if (setresuid(plan->uid, plan->uid, plan->uid) < 0)
        fail_flags("setresuid", NULL, plan->uid);
    /* A non-root uid lost every capability with setresuid (capabilities(7)); root keeps the
     * plan's set, without PID 1's CAP_SYS_PTRACE. */
    if (plan->uid == 0)
        set_capabilities(plan->capabilities);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        fail_flags("prctl", "PR_SET_NO_NEW_PRIVS", 1);
}

/* rt_sigaction(2) directly: glibc's sigaction refuses the two real-time signals it keeps for
 * itself (32, 33), and an ignored one is inherited across execve like any other. */
static void reset_signals(void) {
    struct {
        void *handler;
        unsigned long flags;
        void *restorer;
        uint64_t mask;
    } action = {SIG_DFL, 0, NULL, 0};
    for (int sig = 1; sig <= 64; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            syscall(SYS_rt_sigaction, sig, &action, NULL, sizeof action.mask);
}

static _Noreturn void run_command(const struct plan *plan, int done_fd) {
    /* Every disposition back to its default: an ignored SIGPIPE, say, would be inherited
     * across execve and change how pipelines in the command end. */
    sigset_t none;
    sigemptyset(&none);
    reset_signals();
    sigprocmask(SIG_SETMASK, &none, NULL);
    drop_privileges(plan);
    if (chdir(plan->cwd) < 0)
        fail("chdir", plan->cwd);
    /* Stop right after a successful execve, so PID 1 reads the new image's /proc/PID/exe
     * however short-lived the command is. */
    if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) < 0)
        fail("ptrace", NULL);
    environ = plan->envp; /* execvp searches the PATH of the environment it runs with */
    execvp(plan->argv[0], plan->argv);
    int err = errno;
    send_fmt("{\"type\":\"exec_error\",\"errno\":%d}\n", err);
    (void)!write(done_fd, "x", 1);
    _exit(err == ENOENT ? NOT_FOUND : EXEC_FAILED);
}

/* Fork the command and report what runs; its PID, and in *early its wait status if it ended
 * before the stop after execve (a failure, or killed). */
static pid_t start_command(const struct plan *plan, int *early) {
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) < 0)
        fail("pipe2", NULL);
    pid_t pid = fork();
    if (pid < 0)
        fail("fork", NULL);
    if (pid == 0) {
        close(pipe_fds[0]);
        run_command(plan, pipe_fds[1]);
    }
    close(pipe_fds[1]);
    char byte;
    ssize_t n;
    while ((n = read(pipe_fds[0], &byte, 1)) < 0 && errno == EINTR) {
    }
    close(pipe_fds[0]);
    *early = -1;
    if (n > 0)
        return pid; /* the exec failed: the command reported why; its status comes by wait */
    for (;;) {
        int status;
        if (waitpid(pid, &status, 0) < 0) {
            if (errno == EINTR)
                continue;
            fail("waitpid", NULL);
        }
        if (!WIFSTOPPED(status)) {
            *early = status; /* killed before it could stop */
            return pid;
        }
        if (WSTOPSIG(status) == SIGTRAP)
            break;
        ptrace(PTRACE_CONT, pid, NULL, (void *)(long)WSTOPSIG(status));
    }
    char link[64], exe[4096], exe_hex[8200];
    snprintf(link, sizeof link, "/proc/%d/exe", pid);
    ssize_t len = readlink(link, exe, sizeof exe - 1);
    exe[len < 0 ? 0 : len] = 0;
    ptrace(PTRACE_DETACH, pid, NULL, NULL);
    hex(exe_hex, sizeof exe_hex, exe);
    send_fmt("{\"type\":\"started\",\"pid\":%d,\"exe\":\"%s\"}\n", pid, exe_hex);
    return pid;
}

/* PID 1: reap every zombie until the command ends; its exit status. */
static int serve_init(pid_t command, int early) {
    int status = early;
    while (status == -1) {
        int reaped;
        pid_t pid = wait(&reaped);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            return SETUP_FAILED;
        }
        if (pid == command)
            status = reaped;
    }
    if (WIFSIGNALED(status)) {
        send_fmt("{\"type\":\"exited\",\"signal\":%d}\n", WTERMSIG(status));
        return 128 + WTERMSIG(status);
    }
    send_fmt("{\"type\":\"exited\",\"code\":%d}\n", WEXITSTATUS(status));
    return WEXITSTATUS(status);
}

/* The command's stdio is the command's: once it has its copies, the runner's processes let go
 * of theirs, so the launcher sees EOF as soon as the sandbox's own processes are done. */
static void close_stdio(void) {
    for (int fd = 0; fd < 3; fd++)
        close(fd);
}

/* --- namespaces --------------------------------------------------------------------------- */

/* Hermetic emulation: fork a child into a new, identity-mapped user namespace; its PID (0 in
 * the child). The parent writes the maps: a process inside cannot map more than its own ID. */
static pid_t enter_user_namespace(const struct plan *plan) {
    int ready[2], mapped[2];
    if (pipe2(ready, O_CLOEXEC) < 0 || pipe2(mapped, O_CLOEXEC) < 0)
        fail("pipe2", NULL);
    pid_t pid = fork();
    if (pid < 0)
        fail("fork", NULL);
    char byte = 0;
    if (pid == 0) {
        close(ready[0]);
        close(mapped[1]);
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        if (unshare(CLONE_NEWUSER) < 0)
            fail_flags("unshare", NULL, CLONE_NEWUSER);
        (void)!write(ready[1], "u", 1);
        if (read(mapped[0], &byte, 1) != 1 || byte != 'm')
            _exit(SETUP_FAILED); /* the parent reported why */
        close(ready[1]);
        close(mapped[0]);
        return 0;
    }
    close(ready[1]);
    close(mapped[0]);
    if (read(ready[0], &byte, 1) == 1 && byte == 'u') {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/uid_map", pid);
        write_file(path, plan->uid_map, "write");
        snprintf(path, sizeof path, "/proc/%d/gid_map", pid);
        write_file(path, plan->gid_map, "write");
        (void)!write(mapped[1], "m", 1);
    }
    close(ready[0]);
    close(mapped[1]);
    return pid;
}

/* `lo` up with SIOCSIFFLAGS, as `ip link set lo up` would (netdevice(7)). */
static void bring_up_loopback(void) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        fail("socket", NULL);
    struct ifreq request;
    memset(&request, 0, sizeof request);
    strcpy(request.ifr_name, "lo");
    if (ioctl(sock, SIOCGIFFLAGS, &request) < 0)
        fail_flags("ioctl", "lo", SIOCGIFFLAGS);
    request.ifr_flags |= IFF_UP;
    if (ioctl(sock, SIOCSIFFLAGS, &request) < 0)
        fail_flags("ioctl", "lo", SIOCSIFFLAGS);
    close(sock);
}

/* Register the plan's handlers in this user namespace's own binfmt_misc instance (Linux >= 6.7)
 * while the host's interpreters are in reach: with F the kernel opens them now. The fd kept
 * open holds the instance until PID 1 exits. */
static int register_emulators(const struct plan *plan) {
    if (!plan->nbinfmt)
        return -1;
    char instance[4096], path[4200];
    snprintf(instance, sizeof instance, "%s/binfmt_misc", plan->workspace);
    if (mkdir(instance, 0700) < 0)
        fail("mkdir", instance);
    do_mount("binfmt_misc", instance, "binfmt_misc", MS_NOSUID | MS_NODEV, NULL, instance);
    snprintf(path, sizeof path, "%s/register", instance);
    for (int i = 0; i < plan->nbinfmt; i++)
        write_file(path, plan->binfmt[i], "write");
    int fd = open(instance, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        fail("open", instance);
    return fd;
}

/* PID 1 of the sandbox: the new root (steps 3 to 7), privileges, the command, then reap. */
static _Noreturn void init(struct plan *plan, int joined) {
    install_forwarding();
    do_mount(NULL, "/", NULL, MS_SLAVE | MS_REC, NULL, "/");
    do_mount("tmpfs", plan->workspace, "tmpfs", MS_NOSUID | MS_NODEV, "mode=700",
             plan->workspace);
    char newroot[4200];
    snprintf(newroot, sizeof newroot, "%s/root", plan->workspace);
    if (mkdir(newroot, 0755) < 0)
        fail("mkdir", newroot);
    if (plan->scratch) {
        /* The overlay's upper and work directories live on this private tmpfs: nothing to
         * create or remove on disk, and the run's writes are charged to its memory cgroup. */
        const char *names[] = {"upper", "work"};
        for (size_t i = 0; i < 2; i++) {
            char dir[4200];
            snprintf(dir, sizeof dir, "%s/%s", plan->workspace, names[i]);
            if (mkdir(dir, 0755) < 0)
                fail("mkdir", dir);
        }
    }
    int emulators = register_emulators(plan);
    (void)emulators; /* held open until PID 1 exits */
    do_mount("overlay", newroot, "overlay", 0, plan->overlay, newroot);
    int root_fd = open(newroot, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0)
        fail("open", newroot);
    for (int i = 0; i < plan->nops; i++) {
        current_op = i;
        apply(&plan->ops[i], root_fd, plan->workspace);
    }
    current_op = -1;
    close(root_fd);
    if (chdir(newroot) < 0)
        fail("chdir", newroot);
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        fail("pivot_root", ".");
    /* The old root is now stacked on "/": detach it so nothing of the host stays reachable. */
    if (umount2(".", MNT_DETACH) < 0)
        fail_flags("umount2", ".", MNT_DETACH);
    if (chdir("/") < 0)
        fail("chdir", "/");
    read_command(plan);
    /* The working directory, created when missing, resolved in the new root like the ops. */
    root_fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0)
        fail("open", "/");
    close(open_directory(root_fd, plan->cwd));
    close(root_fd);
    char byte = 0;
    if (read(joined, &byte, 1) != 1 || byte != 'j')
        _exit(SETUP_FAILED); /* the runner reported why */
    close(joined);
    if (plan->cgroupns && unshare(CLONE_NEWCGROUP) < 0)
        fail_flags("unshare", NULL, CLONE_NEWCGROUP);
    drop_capabilities(plan);
    int early;
    pid_t command = start_command(plan, &early);
    close_stdio();
    attach(command);
    set_capabilities(plan->capabilities);
    _exit(serve_init(command, early));
}

/* --- the run's cgroups --------------------------------------------------------------------- */

/* Opened before the mount namespace changes: PID 1's pivot_root moves the root of every
 * process of that namespace, this one's too, and the host's cgroupfs is out of reach then. */
struct cgroups {
    int *procs;         /* each directory's cgroup.procs, for PID 1's move */
    int *parents;       /* each directory's parent (O_PATH), for its removal */
    const char **names; /* each directory's last component */
    int *accounting;    /* the accounting files (-1: could not be opened, reported null) */
};

static int open_parent(const char *dir, const char **name) {
    const char *slash = strrchr(dir, '/');
    if (!slash || slash == dir || !slash[1])
        bad_plan();
    char parent[4200];
    snprintf(parent, sizeof parent, "%.*s", (int)(slash - dir), dir);
    *name = slash + 1;
    int fd = open(parent, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        fail("open", parent);
    return fd;
}

static struct cgroups open_cgroups(const struct plan *plan) {
    struct cgroups cg = {
        array(plan->ncgroups, sizeof(int)),
        array(plan->ncgroups, sizeof(int)),
        array(plan->ncgroups, sizeof(char *)),
        array(plan->naccounting, sizeof(int)),
    };
    for (int i = 0; i < plan->ncgroups; i++) {
        char path[4200];
        snprintf(path, sizeof path, "%s/cgroup.procs", plan->cgroups[i]);
        cg.procs[i] = open(path, O_WRONLY | O_CLOEXEC);
        if (cg.procs[i] < 0)
            fail("open", path);
        cg.parents[i] = open_parent(plan->cgroups[i], &cg.names[i]);
    }
    for (int i = 0; i < plan->naccounting; i++)
        cg.accounting[i] = open(plan->accounting[i], O_RDONLY | O_CLOEXEC);
    return cg;
}

static void close_cgroups(const struct plan *plan, const struct cgroups *cg) {
    for (int i = 0; i < plan->ncgroups; i++) {
        close(cg->procs[i]);
        close(cg->parents[i]);
    }
    for (int i = 0; i < plan->naccounting; i++)
        if (cg->accounting[i] >= 0)
            close(cg->accounting[i]);
}

/* The finished line, with what the run used: read here, once PID 1 is reaped, the launcher
 * has nothing to read from cgroupfs after a run. */
static void send_finished(const struct plan *plan, const struct cgroups *cg) {
    static char line[64 + MAX_ACCOUNTING * (2 * ACCOUNTING_TEXT + 8)];
    size_t n = (size_t)snprintf(line, sizeof line, "{\"type\":\"finished\",\"accounting\":[");
    for (int i = 0; i < plan->naccounting; i++) {
        char text[ACCOUNTING_TEXT + 1];
        int fd = cg->accounting[i];
        ssize_t got = fd < 0 ? -1 : pread(fd, text, ACCOUNTING_TEXT, 0);
        if (i)
            line[n++] = ',';
        if (got < 0) {
            memcpy(line + n, "null", 4);
            n += 4;
            continue;
        }
        text[got] = 0;
        line[n++] = '"';
        hex(line + n, 2 * ACCOUNTING_TEXT + 1, text);
        n += strlen(line + n);
        line[n++] = '"';
    }
    memcpy(line + n, "]}\n", 3);
    send_line(line, n + 3);
}

/* Remove the run's cgroups, last first, as the launcher would: the last of PID 1's processes
 * leaves them asynchronously after it was reaped, so EBUSY is retried for a while. */
static int remove_cgroups(const struct plan *plan, const struct cgroups *cg) {
    for (int i = plan->ncgroups - 1; i >= 0; i--) {
        int tries = 0;
        while (unlinkat(cg->parents[i], cg->names[i], AT_REMOVEDIR) < 0 && errno != ENOENT) {
            if (errno != EBUSY || ++tries > REMOVE_TRIES)
                return -1;
            usleep(1000);
        }
    }
    return 0;
}

/* --- the spawner -------------------------------------------------------------------------- */

#define SPAWNER_FD 3
#define RUNNER_FDS 6      /* stdin, stdout, stderr, status, shape, command: */
#define REQUEST_FDS 7     /* and the socket to answer on */
#define REQUEST_SPARE_FD 16 /* above every fd a runner is given, for moving them into place */
#define REQUEST_DATA (16 * 4096) /* "r" and the cgroups' paths */

static int runner(void);

/* One request: REQUEST_FDS descriptors and its data (NUL-terminated), or 0 at EOF, or -1
 * for a malformed message (its descriptors closed: its sender sees the answer socket closed). */
static int receive_request(int fds[REQUEST_FDS], char *data, size_t *size) {
    struct iovec iov = {data, REQUEST_DATA};
    union {
        struct cmsghdr header;
        char buffer[CMSG_SPACE(REQUEST_FDS * sizeof(int))];
    } control;
    struct msghdr message = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer,
        .msg_controllen = sizeof control.buffer,
    };
    ssize_t n;
    while ((n = recvmsg(SPAWNER_FD, &message, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR) {
    }
    if (n <= 0)
        return 0;
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    if (!header || header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS)
        return -1;
    size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    memcpy(fds, CMSG_DATA(header), count * sizeof(int));
    *size = (size_t)n;
    int ends = n == 1 || data[n - 1] == 0;
    if (count != REQUEST_FDS || (message.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) || data[0] != 'r' ||
        !ends) {
        for (size_t i = 0; i < count; i++)
            close(fds[i]);
        return -1;
    }
    return 1;
}

/* The runner's side of a spawn: its fds into place (moved above them first, as a received
 * fd may sit on a target), then the runner itself, as if exec'd. */
static _Noreturn void become_runner(const int fds[REQUEST_FDS], pid_t parent) {
    static const int targets[RUNNER_FDS] = {0, 1, 2, STATUS_FD, SHAPE_FD, COMMAND_FD};
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (getppid() != parent)
        _exit(2);
    int moved[RUNNER_FDS];
    for (int i = 0; i < RUNNER_FDS; i++)
        if ((moved[i] = fcntl(fds[i], F_DUPFD, REQUEST_SPARE_FD)) < 0)
            _exit(2);
    for (int i = 0; i < RUNNER_FDS; i++)
        if (dup2(moved[i], targets[i]) < 0)
            _exit(2);
    _exit(runner());
}

static void answer(int socket_fd, int value, int index, int pidfd) {
    int ints[2] = {value, index};
    struct iovec iov = {ints, sizeof ints};
    union {
        struct cmsghdr header;
        char buffer[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr message = {.msg_iov = &iov, .msg_iovlen = 1};
    if (pidfd >= 0) {
        message.msg_control = control.buffer;
        message.msg_controllen = sizeof control.buffer;
        struct cmsghdr *header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(header), &pidfd, sizeof(int));
    }
    while (sendmsg(socket_fd, &message, MSG_NOSIGNAL) < 0 && errno == EINTR) {
    }
}

#define REQUEST_CGROUPS 16

/* The request's cgroups: the NUL-terminated paths after "r"; -1 beyond REQUEST_CGROUPS. */
static int request_cgroups(const char *data, size_t size, const char *paths[REQUEST_CGROUPS]) {
    int n = 0;
    for (size_t at = 1; at < size; at += strlen(data + at) + 1) {
        if (n == REQUEST_CGROUPS)
            return -1;
        paths[n++] = data + at;
    }
    return n;
}

static void remove_made(const char *paths[], int made) {
    int err = errno;
    while (made-- > 0)
        rmdir(paths[made]);
    errno = err;
}

/* Create them in order: the index of the one that failed (errno set, the others removed
 * again), or -1. */
static int make_cgroups(const char *paths[], int n) {
    for (int i = 0; i < n; i++) {
        if (mkdir(paths[i], 0755) < 0) {
            remove_made(paths, i);
            return i;
        }
    }
    return -1;
}

/* Answer a request that gets no runner, and let go of its fds. */
static void refuse(const int fds[REQUEST_FDS], int err, int index) {
    answer(fds[RUNNER_FDS], -err, index, -1);
    for (int i = 0; i < REQUEST_FDS; i++)
        close(fds[i]);
}

static int spawner(pid_t parent) {
    if (syscall(SYS_close_range, SPAWNER_FD + 1, ~0U, 0) < 0)
        return 2;
    static char data[REQUEST_DATA];
    for (;;) {
        int fds[REQUEST_FDS];
        size_t size = 0;
        int got = receive_request(fds, data, &size);
        if (got == 0)
            return 0;
        if (got < 0)
            continue;
        const char *paths[REQUEST_CGROUPS];
        int ncgroups = request_cgroups(data, size, paths);
        if (ncgroups < 0) {
            refuse(fds, E2BIG, -1);
            continue;
        }
        int failed = make_cgroups(paths, ncgroups);
        if (failed >= 0) {
            refuse(fds, errno, failed);
            continue;
        }
        int pidfd = -1;
        struct clone_args args;
        memset(&args, 0, sizeof args);
        args.flags = CLONE_PARENT | CLONE_PIDFD;
        args.pidfd = (uint64_t)(uintptr_t)&pidfd;
        long pid = syscall(SYS_clone3, &args, sizeof args);
        if (pid == 0)
            become_runner(fds, parent);
        if (pid < 0)
            remove_made(paths, ncgroups);
        answer(fds[RUNNER_FDS], pid < 0 ? -errno : (int)pid, -1, pid < 0 ? -1 : pidfd);
        if (pidfd >= 0)
            close(pidfd);
        for (int i = 0; i < REQUEST_FDS; i++)
            close(fds[i]);
    }
}

int main(int argc, char **argv) {
    /* The run dies with the launcher: nothing is left running when it goes away. */
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (argc == 3 && !strcmp(argv[1], "spawner") && getppid() == (pid_t)atoi(argv[2]))
        return spawner(getppid());
    if (argc != 2 || getppid() != (pid_t)atoi(argv[1])) {
        fprintf(stderr, "usage: runtimed-runner [spawner] PARENT_PID (started by runtimed)\n");
        return 2;
    }
    return runner();
}

/* A runner: the sandbox of the shape on fd 3, the command from fd 5 in it, status on fd 4. */
static int runner(void) {
    /* Only the five descriptors it was given: whatever else the launcher left inheritable
     * would reach the command. The status fd stays ours: with it, a command could forge
     * status lines. */
    if (syscall(SYS_close_range, COMMAND_FD + 1, ~0U, 0) < 0 ||
        fcntl(STATUS_FD, F_SETFD, FD_CLOEXEC) < 0 || fcntl(COMMAND_FD, F_SETFD, FD_CLOEXEC) < 0)
        return 2;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    struct plan plan;
    memset(&plan, 0, sizeof plan);
    read_shape(&plan);
    if (plan.user) {
        pid_t child = enter_user_namespace(&plan);
        if (child > 0) {
            close_stdio();
            close(COMMAND_FD);
            install_forwarding();
            attach(child);
            return supervise(child);
        }
    }
    struct cgroups cg = open_cgroups(&plan);
    int joined[2];
    if (pipe2(joined, O_CLOEXEC) < 0)
        fail("pipe2", NULL);
    if (unshare(plan.namespaces) < 0)
        fail_flags("unshare", NULL, plan.namespaces);
    if (plan.loopback)
        bring_up_loopback();
    if ((plan.namespaces & CLONE_NEWUTS) && sethostname(plan.hostname, strlen(plan.hostname)) < 0)
        fail("sethostname", plan.hostname);
    install_forwarding();
    pid_t pid1 = fork();
    if (pid1 < 0)
        fail("fork", NULL);
    if (pid1 == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        close(joined[1]);
        close_cgroups(&plan, &cg);
        target_pid = 0;
        init(&plan, joined[0]);
    }
    close(joined[0]);
    close_stdio();
    close(COMMAND_FD);
    attach(pid1);
    /* Move PID 1 into the run's cgroups while it builds the root: the first write to a
     * cgroup.procs waits for an RCU grace period, overlapped with the mounts this way. */
    char text[24];
    int len = snprintf(text, sizeof text, "%d", pid1);
    for (int i = 0; i < plan.ncgroups; i++) {
        if (write(cg.procs[i], text, (size_t)len) < 0) {
            if (errno == ESRCH)
                break; /* PID 1 ended already: its own status says why */
            int err = errno;
            close(joined[1]); /* PID 1 stops at the closed pipe */
            errno = err;
            fail_flags("write", plan.cgroups[i], pid1);
        }
    }
    (void)!write(joined[1], "j", 1);
    close(joined[1]);
    supervise(pid1);
    send_finished(&plan, &cg);
    return remove_cgroups(&plan, &cg) < 0 ? CGROUPS_LEFT : 0;
}

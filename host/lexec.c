/* lexec.c -- bmdb.exec: a command run as a body's I/O, fenced (iofence.h).
 *
 * core.exec(opts, session_or_nil) spawns argv (no shell) with posix_spawn
 * in a process group of its own, feeds it stdin, collects stdout and
 * stderr, and waits in one poll() on a pidfd, the pipes and the fence's
 * eventfd, so a lost lock stops it at once rather than at a next tick.
 *
 * The group is the unit. On the call's own timeout, on output past
 * max_output and on a fence stop (lock taken away, session lost, host
 * cancelling) the group gets SIGTERM, its leader `grace` seconds to exit,
 * then SIGKILL. When the leader exits by itself, whatever it left running
 * in its group is killed: nothing a lock started outlives the call. Every
 * signal to the group goes out before the leader is reaped (it is at most
 * a zombie then), so its pid -- the group's id -- cannot have been reused.
 *
 * Nothing is left behind on any path: every error is raised after the
 * leader is reaped and the descriptors are closed (lua_error longjmps).
 * The state lives in a userdata whose __gc does the same, for the one
 * raise that can come earlier: Lua running out of memory while the
 * result is built.
 *
 * The child gets an empty signal mask and default dispositions (the host
 * blocks signals for its signalfd, and a child would inherit that), no
 * descriptor of the host but its stdin, stdout and stderr, and the host's
 * environment without the host's database credentials (BMDB_DSN,
 * PGPASSWORD) unless opts.env gives them. */
#define _GNU_SOURCE /* pipe2, posix_spawn's _np actions, sigabbrev_np */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lauxlib.h>

#include "iofence.h"
#include "lcore.h"
#include "lerror.h"
#include "lifecycle.h"
#include "metrics.h"

extern char **environ;

#define RUN_MT "bmdb.exec_run"
#define DEFAULT_MAX_OUTPUT (16.0 * 1024 * 1024)
#define MAX_MAX_OUTPUT (1024.0 * 1024 * 1024) /* a Lua string must hold it */
#define DEFAULT_GRACE 2.0
#define CHUNK 65536
/* Without a pidfd (a kernel before 5.3) the leader's exit is polled. */
#define NO_PIDFD_POLL_MS 10
#define NO_FENCE_FD_POLL_MS 100

/* ---- options ----------------------------------------------------------- */

typedef struct {
    const char **argv, **envp; /* NULL-terminated, in userdata on the stack */
    const char *path;          /* the PATH the command gets, or NULL */
    const char *cwd;
    const char *in;            /* stdin's bytes, or NULL: /dev/null */
    size_t in_len;
    double timeout, grace;
    size_t max_output;
} exec_opts;

/* A bad option: worded as luaL_argerror words it, at the caller's line
 * (bmdb.exec tail-calls core.exec, so level 1 is the script's code). */
#define usage(L, fmt, ...) lerror_raise_where(L, BMDB_E_USAGE, "bad argument #1 to 'exec' (" fmt ")", ##__VA_ARGS__)

static const char *const OPTION_NAMES[] = {"argv", "stdin", "env", "cwd", "timeout", "max_output", "grace", NULL};

static void check_option_names(lua_State *L) {
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        lua_pop(L, 1);
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        int known = 0;
        for (int i = 0; k && OPTION_NAMES[i]; i++) known |= !strcmp(k, OPTION_NAMES[i]);
        if (!known)
            usage(L, "unknown option %s%s%s", k ? "'" : "(a ", k ? k : luaL_typename(L, -1), k ? "'" : " key)");
    }
}

/* A string field without NUL bytes (nul_ok: any bytes), or NULL when nil. */
static const char *opt_string(lua_State *L, const char *field, int nul_ok, size_t *len) {
    lua_getfield(L, 1, field); /* left on the stack: it keeps the string alive */
    if (lua_isnil(L, -1)) return NULL;
    if (lua_type(L, -1) != LUA_TSTRING) usage(L, "%s: string expected, got %s", field, luaL_typename(L, -1));
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    if (!nul_ok && strlen(s) != n) usage(L, "%s contains a NUL byte", field);
    if (len) *len = n;
    return s;
}

/* A number field > min (>= min unless strict) and <= max; dflt when nil. */
static double opt_number(lua_State *L, const char *field, double dflt, double min, int strict, double max) {
    lua_getfield(L, 1, field);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return dflt;
    }
    double v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : NAN;
    if (isnan(v) || v < min || (strict && v == min) || v > max) {
        char range[64];
        if (max < INFINITY) snprintf(range, sizeof range, "from %g to %g", min, max);
        else snprintf(range, sizeof range, "%s %g", strict ? ">" : ">=", min);
        usage(L, "%s: expected a number %s, got %s", field, range,
              lua_type(L, -1) == LUA_TNUMBER ? lua_tostring(L, -1) : luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return v;
}

static const char **new_list(lua_State *L, size_t n) {
    return lua_newuserdata(L, (n + 1) * sizeof(const char *)); /* anchored on the stack */
}

static void read_argv(lua_State *L, exec_opts *o) {
    lua_getfield(L, 1, "argv");
    if (!lua_istable(L, -1)) usage(L, "argv: a list of strings expected, got %s", luaL_typename(L, -1));
    int argv_idx = lua_gettop(L);
    size_t n = lua_objlen(L, argv_idx);
    if (n == 0) usage(L, "argv is empty (the command to run is argv[1])");
    o->argv = new_list(L, n);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, argv_idx, (int)i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            usage(L, "argv[%d]: string expected, got %s", (int)i + 1, luaL_typename(L, -1));
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        if (strlen(s) != len) usage(L, "argv[%d] contains a NUL byte", (int)i + 1);
        if (i == 0 && len == 0) usage(L, "argv[1] is empty");
        o->argv[i] = s; /* the argv table keeps it alive */
        lua_pop(L, 1);
    }
    o->argv[n] = NULL;
}

static int is_credential(const char *entry, size_t namelen) {
    return (namelen == 8 && !strncmp(entry, "BMDB_DSN", 8)) || (namelen == 10 && !strncmp(entry, "PGPASSWORD", 10));
}

/* The host's environment, minus its credentials, with opts.env merged
 * over it (a name set to false removed). */
static void read_env(lua_State *L, exec_opts *o) {
    lua_getfield(L, 1, "env");
    int env_idx = lua_gettop(L);
    size_t extra = 0;
    if (!lua_isnil(L, env_idx)) {
        if (!lua_istable(L, env_idx)) usage(L, "env: table expected, got %s", luaL_typename(L, env_idx));
        lua_pushnil(L);
        while (lua_next(L, env_idx)) {
            if (lua_type(L, -2) != LUA_TSTRING)
                usage(L, "env: names must be strings, got %s", luaL_typename(L, -2));
            size_t len;
            const char *k = lua_tolstring(L, -2, &len);
            if (len == 0 || strlen(k) != len || strchr(k, '='))
                usage(L, "env: invalid name '%s' (empty, or holds '=' or a NUL byte)", k);
            int t = lua_type(L, -1);
            if (t == LUA_TSTRING) {
                const char *v = lua_tolstring(L, -1, &len);
                if (strlen(v) != len) usage(L, "env.%s contains a NUL byte", k);
                extra++;
            } else if (!(t == LUA_TBOOLEAN && !lua_toboolean(L, -1))) {
                usage(L, "env.%s: string or false expected, got %s", k, luaL_typename(L, -1));
            }
            lua_pop(L, 1);
        }
    }
    size_t n = 0;
    for (char **e = environ; e && *e; e++) n++;
    o->envp = new_list(L, n + extra);
    lua_newtable(L); /* keeps the NAME=value strings made below alive */
    int made = lua_gettop(L);
    size_t k = 0;
    for (char **e = environ; e && *e; e++) {
        size_t namelen = strcspn(*e, "=");
        if (is_credential(*e, namelen)) continue;
        if (!lua_isnil(L, env_idx)) {
            lua_pushlstring(L, *e, namelen);
            lua_rawget(L, env_idx);
            int overridden = !lua_isnil(L, -1);
            lua_pop(L, 1);
            if (overridden) continue;
        }
        o->envp[k++] = *e;
    }
    if (!lua_isnil(L, env_idx)) {
        lua_pushnil(L);
        while (lua_next(L, env_idx)) {
            if (lua_type(L, -1) == LUA_TSTRING) {
                o->envp[k++] = lua_pushfstring(L, "%s=%s", lua_tostring(L, -2), lua_tostring(L, -1));
                lua_rawseti(L, made, (int)k);
            }
            lua_pop(L, 1);
        }
    }
    o->envp[k] = NULL;
    o->path = NULL;
    for (size_t i = 0; i < k; i++)
        if (!strncmp(o->envp[i], "PATH=", 5)) o->path = o->envp[i] + 5;
}

static void read_opts(lua_State *L, exec_opts *o) {
    if (!lua_istable(L, 1)) usage(L, "table expected, got %s", luaL_typename(L, 1));
    check_option_names(L);
    read_argv(L, o);
    read_env(L, o);
    o->cwd = opt_string(L, "cwd", 0, NULL);
    if (o->cwd && !*o->cwd) usage(L, "cwd is empty");
    o->in = opt_string(L, "stdin", 1, &o->in_len);
    o->timeout = opt_number(L, "timeout", 0, 0, 1, INFINITY);
    if (isinf(o->timeout)) o->timeout = 0; /* math.huge: none of its own */
    o->grace = opt_number(L, "grace", DEFAULT_GRACE, 0, 0, 86400);
    double max = opt_number(L, "max_output", DEFAULT_MAX_OUTPUT, 0, 0, MAX_MAX_OUTPUT);
    if (max != floor(max)) usage(L, "max_output: expected a whole number of bytes, got %g", max);
    o->max_output = (size_t)max;
}

/* argv[1] as posix_spawn wants it: as given when it has a slash, else the
 * first executable regular file of that name in the command's PATH (as
 * execvp: glibc's default when it has none). 0, or an errno. */
static int resolve(const char *name, const char *path, char *out, size_t len) {
    if (strchr(name, '/')) return (size_t)snprintf(out, len, "%s", name) < len ? 0 : ENAMETOOLONG;
    if (!path) path = "/bin:/usr/bin";
    int err = ENOENT;
    for (const char *p = path;; p++) {
        size_t dl = strcspn(p, ":");
        const char *dir = dl ? p : ".";
        int dirlen = dl ? (int)dl : 1;
        struct stat st;
        if ((size_t)snprintf(out, len, "%.*s/%s", dirlen, dir, name) < len && stat(out, &st) == 0 &&
            S_ISREG(st.st_mode)) {
            if (access(out, X_OK) == 0) return 0;
            err = EACCES; /* as execvp: remembered, the search goes on */
        }
        p += dl;
        if (!*p) break;
    }
    return err;
}

/* ---- the run: one child, its pipes, what it wrote ------------------------ */

typedef struct {
    char *data;
    size_t len, cap;
    int fd; /* the host's end, -1 once at EOF or closed */
} stream;

typedef struct {
    pid_t pid;     /* the leader until it is reaped, then 0 */
    int pidfd;     /* -1: none (old kernel), its exit is polled */
    int exited;    /* the leader exited (a zombie until reaped) */
    int reaped, status;
    int in_fd;     /* the host's end of the child's stdin, -1 when closed */
    const char *in;
    size_t in_len, in_off;
    int epipe;     /* a write met a closed pipe: one SIGPIPE is pending */
    stream out[2]; /* stdout, stderr */
    size_t max;
    int too_large; /* 1 + the stream that went past max, else 0 */
    int io_err;    /* an errno that ended the wait (poll, read, memory) */
} run;

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* Sends sig to the group; to the leader alone when it left the group. */
static void signal_group(run *r, int sig) {
    if (r->pid <= 0) return;
    if (kill(-r->pid, sig) < 0 && errno == ESRCH) kill(r->pid, sig);
}

/* Whether the leader exited, without reaping it (it stays a zombie, so
 * its pid and group id stay ours to signal). */
static int leader_exited(run *r) {
    if (r->exited || r->pid <= 0) return 1;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid(P_PID, (id_t)r->pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0) {
        if (si.si_pid == r->pid) r->exited = 1;
    } else if (errno == ECHILD) {
        /* reaped by someone else (SIGCHLD ignored): its pid is not ours */
        r->exited = r->reaped = 1;
        r->status = -1;
        r->pid = 0;
    }
    return r->exited;
}

/* SIGKILL to what is left of the group, then reap the leader: in that
 * order, so the group id is still the leader's when it is signalled. */
static void kill_and_reap(run *r) {
    if (r->pid <= 0) return;
    signal_group(r, SIGKILL);
    int st;
    pid_t w;
    while ((w = waitpid(r->pid, &st, 0)) < 0 && errno == EINTR) {
    }
    r->status = w == r->pid ? st : -1;
    r->reaped = r->exited = 1;
    r->pid = 0;
    close_fd(&r->pidfd);
}

/* Everything but the output buffers: the group killed, the leader
 * reaped, every descriptor closed. Idempotent. */
static void run_stop(run *r) {
    kill_and_reap(r);
    close_fd(&r->pidfd);
    close_fd(&r->in_fd);
    close_fd(&r->out[0].fd);
    close_fd(&r->out[1].fd);
}

static void run_free(run *r) {
    run_stop(r);
    for (int i = 0; i < 2; i++) {
        free(r->out[i].data);
        r->out[i].data = NULL;
    }
}

static int run_gc(lua_State *L) {
    run_free(luaL_checkudata(L, 1, RUN_MT));
    return 0;
}

static run *new_run(lua_State *L, size_t max) {
    run *r = lua_newuserdata(L, sizeof *r);
    memset(r, 0, sizeof *r);
    r->pidfd = r->in_fd = r->out[0].fd = r->out[1].fd = -1;
    r->max = max;
    luaL_getmetatable(L, RUN_MT);
    lua_setmetatable(L, -2);
    return r;
}

/* Writes as much of stdin as the pipe takes now; closes it when done or
 * when the command stopped reading (not an error: its exit says more). */
static void feed(run *r) {
    while (r->in_fd >= 0 && r->in_off < r->in_len) {
        ssize_t n = write(r->in_fd, r->in + r->in_off, r->in_len - r->in_off);
        if (n > 0) r->in_off += (size_t)n;
        else if (n < 0 && errno == EINTR) continue;
        else if (n < 0 && errno == EAGAIN) return;
        else {
            r->epipe |= n < 0 && errno == EPIPE;
            break;
        }
    }
    close_fd(&r->in_fd);
}

/* Reads what stream i holds now, keeping up to max bytes. A read past
 * them sets too_large, is dropped, and ends this turn: a command that
 * writes as fast as we read cannot keep the caller here (during a stop,
 * the rest is only drained, a chunk a turn). */
static void collect(run *r, int i) {
    stream *s = &r->out[i];
    char sink[4096];
    while (s->fd >= 0) {
        size_t room = r->max - s->len, want = room < CHUNK ? room : CHUNK;
        char *dst = sink;
        if (want == 0) {
            want = sizeof sink;
        } else {
            if (s->cap - s->len < want) {
                size_t cap = s->cap ? s->cap : CHUNK;
                while (cap - s->len < want) cap *= 2;
                if (cap > r->max) cap = r->max;
                char *p = realloc(s->data, cap);
                if (!p) {
                    r->io_err = ENOMEM;
                    return;
                }
                s->data = p;
                s->cap = cap;
            }
            dst = s->data + s->len;
        }
        ssize_t n = read(s->fd, dst, want);
        if (n > 0 && dst == sink) {
            if (!r->too_large) r->too_large = 1 + i;
            return;
        } else if (n > 0) {
            s->len += (size_t)n;
        } else if (n == 0) {
            close_fd(&s->fd);
        } else if (errno == EINTR) {
            continue;
        } else {
            if (errno != EAGAIN) {
                r->io_err = errno;
                close_fd(&s->fd);
            }
            return;
        }
    }
}

static void pump(run *r) {
    feed(r);
    collect(r, 0);
    collect(r, 1);
}

static int poll_ms(double seconds) {
    double ms = ceil(seconds * 1000.0);
    return ms < 0 ? 0 : ms > 86400000.0 ? 86400000 : (int)ms;
}

/* A descriptor of the host's kept clear of 0..2, which the child's
 * stdin, stdout and stderr are dup'ed onto (a host started with one of
 * them closed would hand it out). */
static int above_stdio(int fd) {
    if (fd < 0 || fd > 2) return fd;
    int hi = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    close(fd);
    return hi;
}

static int make_pipe(int *host_end, int *child_end, int host_reads) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return errno;
    p[0] = above_stdio(p[0]);
    p[1] = above_stdio(p[1]);
    *host_end = host_reads ? p[0] : p[1];
    *child_end = host_reads ? p[1] : p[0];
    if (p[0] < 0 || p[1] < 0) return EMFILE;
    /* Only the host's end: the command gets blocking stdio as usual. */
    return fcntl(*host_end, F_SETFL, O_NONBLOCK) < 0 ? errno : 0;
}

/* Starts the command. 0, or an errno (posix_spawn reports the child's
 * failures, exec and chdir included, through its return value). */
static int spawn(run *r, const exec_opts *o, const char *prog) {
    int child[3] = {-1, -1, -1}, err = 0;
    if (o->in) err = make_pipe(&r->in_fd, &child[0], 0);
    else if ((child[0] = above_stdio(open("/dev/null", O_RDONLY | O_CLOEXEC))) < 0) err = errno;
    r->in = o->in;
    r->in_len = o->in_len;
    for (int i = 0; i < 2 && !err; i++) err = make_pipe(&r->out[i].fd, &child[i + 1], 1);
    if (!err) {
        posix_spawn_file_actions_t fa;
        posix_spawnattr_t at;
        posix_spawn_file_actions_init(&fa);
        posix_spawnattr_init(&at);
        for (int i = 0; i < 3; i++) posix_spawn_file_actions_adddup2(&fa, child[i], i);
        /* Nothing else of the host's: database sockets, eventfds, the
         * signalfd, inotify, and files a script opened without O_CLOEXEC. */
        posix_spawn_file_actions_addclosefrom_np(&fa, 3);
        if (o->cwd) posix_spawn_file_actions_addchdir_np(&fa, o->cwd);
        sigset_t none, all;
        sigemptyset(&none);
        sigfillset(&all);
        posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
        posix_spawnattr_setpgroup(&at, 0);
        posix_spawnattr_setsigmask(&at, &none);
        posix_spawnattr_setsigdefault(&at, &all);
        pid_t pid;
        err = posix_spawn(&pid, prog, &fa, &at, (char *const *)o->argv, (char *const *)o->envp);
        posix_spawn_file_actions_destroy(&fa);
        posix_spawnattr_destroy(&at);
        if (!err) {
            r->pid = pid;
            r->pidfd = pidfd_open(pid, 0);
        }
    }
    for (int i = 0; i < 3; i++) close_fd(&child[i]);
    if (!err && r->in_len == 0) close_fd(&r->in_fd); /* EOF at once */
    return err;
}

/* Runs until the leader exited and both streams reached EOF, or a stop:
 * IOFENCE_GO with too_large or io_err set, or the fence's reason. */
static iofence_stop wait_run(run *r, iofence *f) {
    for (;;) {
        pump(r);
        if (r->too_large || r->io_err) return IOFENCE_GO;
        if (!r->reaped && leader_exited(r)) {
            close_fd(&r->in_fd);
            kill_and_reap(r); /* what it left in its group goes with it */
        }
        if (r->reaped && r->out[0].fd < 0 && r->out[1].fd < 0) return IOFENCE_GO;
        iofence_stop s = iofence_check(f);
        if (s != IOFENCE_GO) return s;
        struct pollfd p[5];
        int n = 0;
        if (f->fd >= 0) p[n++] = (struct pollfd){.fd = f->fd, .events = POLLIN};
        if (!r->reaped && r->pidfd >= 0) p[n++] = (struct pollfd){.fd = r->pidfd, .events = POLLIN};
        if (r->in_fd >= 0) p[n++] = (struct pollfd){.fd = r->in_fd, .events = POLLOUT};
        for (int i = 0; i < 2; i++)
            if (r->out[i].fd >= 0) p[n++] = (struct pollfd){.fd = r->out[i].fd, .events = POLLIN};
        /* Without its eventfd (out of descriptors) the fence is polled. */
        int cap = !r->reaped && r->pidfd < 0 ? NO_PIDFD_POLL_MS : f->fd < 0 ? NO_FENCE_FD_POLL_MS : -1;
        int ms = iofence_poll_ms(f, cap);
        if (poll(p, (nfds_t)n, ms) < 0 && errno != EINTR) {
            r->io_err = errno;
            return IOFENCE_GO;
        }
    }
}

/* The stop of a call that must end: SIGTERM to the group (and SIGCONT,
 * so a stopped process gets it), up to grace seconds for the leader, its
 * output drained meanwhile so a full pipe cannot keep it from exiting;
 * then SIGKILL to the group and the reap. */
static void stop_run(run *r, double grace) {
    if (!r->reaped && !leader_exited(r)) {
        signal_group(r, SIGTERM);
        signal_group(r, SIGCONT);
        close_fd(&r->in_fd);
        double end = mono_now() + grace;
        while (!leader_exited(r) && mono_now() < end) {
            struct pollfd p[3];
            int n = 0;
            if (r->pidfd >= 0) p[n++] = (struct pollfd){.fd = r->pidfd, .events = POLLIN};
            for (int i = 0; i < 2; i++)
                if (r->out[i].fd >= 0) p[n++] = (struct pollfd){.fd = r->out[i].fd, .events = POLLIN};
            int ms = poll_ms(end - mono_now());
            if (r->pidfd < 0 && ms > NO_PIDFD_POLL_MS) ms = NO_PIDFD_POLL_MS;
            if (poll(p, (nfds_t)n, ms) < 0 && errno != EINTR) break;
            collect(r, 0);
            collect(r, 1);
        }
    }
    run_stop(r);
}

/* ---- results and errors ------------------------------------------------ */

static void set_str(lua_State *L, const char *k, const char *v) {
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void set_output(lua_State *L, run *r) {
    static const char *const names[] = {"stdout", "stderr"};
    for (int i = 0; i < 2; i++) {
        lua_pushlstring(L, r->out[i].data ? r->out[i].data : "", r->out[i].len);
        lua_setfield(L, -2, names[i]);
    }
}

static const char *signal_name(int sig, char *buf, size_t len) {
    const char *abbrev = sigabbrev_np(sig);
    if (abbrev) return abbrev;
    snprintf(buf, len, "%d", sig);
    return buf;
}

/* An error of kind exec with reason and the command; output when some
 * was collected. Raised by the caller (lua_error). */
static void push_exec_error(lua_State *L, const char *reason, const char *command, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    lerror_push_kind(L, BMDB_E_EXEC, msg);
    set_str(L, "reason", reason);
    set_str(L, "command", command);
}

/* The metric's command label: the program's name, not its directory. */
static const char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash && slash[1] ? slash + 1 : path;
}

/* core.exec(opts, session_or_nil) -> {status=, signal=, stdout=, stderr=} */
static int l_exec(lua_State *L) {
    exec_opts o;
    read_opts(L, &o);
    struct session *sess = lcore_opt_session(L, 2);
    const char *command = o.argv[0], *label = base_name(command);
    char prog[PATH_MAX];
    int err = resolve(command, o.path, prog, sizeof prog);
    run *r = new_run(L, o.max_output);

    iofence f;
    iofence_stop stop = iofence_begin(&f, L, sess, o.timeout);
    char what[256];
    snprintf(what, sizeof what, "exec %s", command);
    if (stop == IOFENCE_TIMEOUT) {
        metrics_exec(label, "timeout", -1);
        push_exec_error(L, "timeout", command, "exec %s: timed out after %gs before it started", command, o.timeout);
        return lua_error(L);
    }
    if (stop != IOFENCE_GO) {
        metrics_exec(label, stop == IOFENCE_CANCELED ? "canceled" : "lost", -1);
        return iofence_raise(L, &f, stop, what);
    }

    /* SIGPIPE (a command that stops reading its stdin) must not kill a
     * process that does not block it, as busted's LuaJIT: blocked here,
     * and the one a write raised is taken back before the mask is. */
    sigset_t pipe_sig, old_mask;
    sigemptyset(&pipe_sig);
    sigaddset(&pipe_sig, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_sig, &old_mask);

    double started = mono_now();
    int exited_itself = 0;
    if (!err) err = spawn(r, &o, prog);
    if (!err) {
        stop = wait_run(r, &f);
        exited_itself = r->reaped;
        if (stop != IOFENCE_GO || r->too_large || r->io_err) stop_run(r, o.grace);
    }
    run_stop(r);
    iofence_end(&f);
    if (r->epipe) {
        struct timespec zero = {0, 0};
        sigtimedwait(&pipe_sig, NULL, &zero);
    }
    pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
    double seconds = mono_now() - started;

    if (err) {
        metrics_exec(label, "spawn_failed", -1);
        struct stat st;
        int bad_cwd = o.cwd && (stat(o.cwd, &st) < 0 || !S_ISDIR(st.st_mode) || access(o.cwd, X_OK) < 0);
        push_exec_error(L, "spawn", command, "exec %s: cannot start it%s%s%s: %s", command,
                        bad_cwd ? " in cwd '" : "", bad_cwd ? o.cwd : "", bad_cwd ? "'" : "", strerror(err));
        set_str(L, "error", strerror(err));
        return lua_error(L);
    }
    if (stop == IOFENCE_TIMEOUT) {
        metrics_exec(label, "timeout", seconds);
        push_exec_error(L, "timeout", command,
                        exited_itself
                            ? "exec %s: timed out after %gs (it exited, but something outside its process "
                              "group kept its output open)"
                            : "exec %s: timed out after %gs; its process group was terminated",
                        command, o.timeout);
        set_output(L, r);
        return lua_error(L);
    }
    if (stop != IOFENCE_GO) {
        metrics_exec(label, stop == IOFENCE_CANCELED ? "canceled" : "lost", seconds);
        return iofence_raise(L, &f, stop, what);
    }
    if (r->too_large) {
        metrics_exec(label, "too_large", seconds);
        const char *name = r->too_large == 1 ? "stdout" : "stderr";
        push_exec_error(L, "too_large", command, "exec %s: %s went past max_output (%zu bytes); its process "
                        "group was terminated", command, name, o.max_output);
        set_str(L, "stream", name);
        return lua_error(L);
    }
    if (r->io_err) {
        metrics_exec(label, "failed", seconds);
        push_exec_error(L, "io", command, "exec %s: %s; its process group was terminated", command,
                        strerror(r->io_err));
        return lua_error(L);
    }
    /* status -1: reaped by someone else (SIGCHLD ignored), unknown */
    int signaled = r->status != -1 && WIFSIGNALED(r->status);
    metrics_exec(label, signaled ? "signaled" : "exited", seconds);
    lua_createtable(L, 0, 4);
    if (r->status != -1 && WIFEXITED(r->status)) {
        lua_pushinteger(L, WEXITSTATUS(r->status));
        lua_setfield(L, -2, "status");
    } else if (signaled) {
        char buf[16];
        set_str(L, "signal", signal_name(WTERMSIG(r->status), buf, sizeof buf));
    }
    set_output(L, r);
    run_free(r);
    return 1;
}

static const luaL_Reg funcs[] = {{"exec", l_exec}, {NULL, NULL}};
static const luaL_Reg no_methods[] = {{NULL, NULL}};

void lexec_register(lua_State *L) {
    lcore_class(L, RUN_MT, no_methods, run_gc);
    luaL_register(L, NULL, funcs);
}

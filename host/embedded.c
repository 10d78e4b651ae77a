/* embedded.c -- the embedded default database.
 *
 * With no --dsn the host runs PostgreSQL itself, in a data dir laid out as:
 *     pgdata/        the cluster (owned by the server user, 0700)
 *     run/           the Unix socket; the server listens nowhere else
 *     postgres.log   output of the server and of initdb / pg_ctl
 *     control.lock   held exclusively while deciding to init, start or stop
 *     users.lock     held shared by every host using the server
 *
 * The last host out stops the server: on close it drops its shared lock on
 * users.lock and, under control.lock, tries to take it exclusively; that
 * only succeeds when no other host still holds it. flock() locks vanish
 * with their process, so a crashed host never keeps the server pinned: the
 * next host to leave stops it.
 *
 * PostgreSQL refuses to run as root, so as root the server programs run as
 * the owner of an existing cluster, else "postgres", else "nobody". */
#define _GNU_SOURCE /* close_range */

#include "embedded.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <glob.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "log.h"
#include "pool.h"
#include "pqerr.h"

#define PORT "5432"
#define SOCKET_NAME "/run/.s.PGSQL." PORT

/* The socket path limit bounds the data dir to under 108 bytes, so every
 * file name inside it fits in a small fixed buffer. */
#define DIRMAX sizeof(((struct sockaddr_un *)0)->sun_path)
#define EPATH 256

struct embedded {
    char dir[DIRMAX];       /* absolute, no symlinks */
    char bindir[PATH_MAX];  /* initdb, pg_ctl, postgres */
    int switch_user;        /* we are root: children become uid/gid */
    uid_t uid;
    gid_t gid;
    char user[64];          /* the server user's name, for messages */
    int users_fd;           /* our shared lock on users.lock, or -1 */
};

/* Errors are one line, prefixed, and never end in libpq's newline. */
static int fail(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return -1;
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(err, errlen, "embedded database: ");
    if (n >= 0 && (size_t)n < errlen) vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    va_end(ap);
    for (char *p = err; *p; p++)
        if (*p == '\n' || *p == '\r') *p = ' ';
    size_t len = strlen(err);
    while (len > 0 && err[len - 1] == ' ') err[--len] = '\0';
    return -1;
}

static void sub(char out[EPATH], const embedded *e, const char *name) {
    snprintf(out, EPATH, "%s/%s", e->dir, name);
}

/* ---- finding the server programs --------------------------------------- */

static int has_programs(const char *bindir) {
    static const char *const progs[] = {"initdb", "pg_ctl", "postgres"};
    char p[PATH_MAX + 16];
    for (size_t i = 0; i < sizeof progs / sizeof *progs; i++) {
        snprintf(p, sizeof p, "%s/%s", bindir, progs[i]);
        if (access(p, X_OK) != 0) return 0;
    }
    return 1;
}

/* $BMDB_PG_BINDIR, else pg_config, else Debian's versioned directories.
 * pg_config alone is not enough: libpq-dev ships it without the server. */
static int find_bindir(char out[PATH_MAX], char *err, size_t errlen) {
    const char *env = getenv("BMDB_PG_BINDIR");
    if (env && *env) {
        snprintf(out, PATH_MAX, "%s", env);
        if (has_programs(out)) return 0;
        return fail(err, errlen, "BMDB_PG_BINDIR=%s does not hold the PostgreSQL server binaries "
                    "(initdb, pg_ctl, postgres)", env);
    }
    /* A fixed command, so popen's shell sees nothing from outside. */
    FILE *p = popen("pg_config --bindir 2>/dev/null", "r");
    if (p) {
        if (!fgets(out, PATH_MAX, p)) out[0] = '\0';
        out[strcspn(out, "\n")] = '\0';
        pclose(p);
        if (out[0] && has_programs(out)) return 0;
    }
    /* glob sorts 9.6 after 15, so compare versions as numbers. */
    const char *root = "/usr/lib/postgresql/";
    glob_t g;
    double best = -1;
    out[0] = '\0';
    if (glob("/usr/lib/postgresql/*/bin", GLOB_ONLYDIR, NULL, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; i++) {
            double v = strtod(g.gl_pathv[i] + strlen(root), NULL);
            if (v > best && has_programs(g.gl_pathv[i])) {
                best = v;
                snprintf(out, PATH_MAX, "%s", g.gl_pathv[i]);
            }
        }
        globfree(&g);
    }
    if (out[0]) return 0;
    return fail(err, errlen, "PostgreSQL server binaries not found (install postgresql or set BMDB_PG_BINDIR)");
}

/* ---- the data dir -------------------------------------------------------- */

/* mkdir -p. New directories get 0755 whatever the umask: the server user
 * must be able to pass through them to reach pgdata and run. The first
 * directory created goes into made, so unmake() can take them back. */
static int mkdir_p(const char *dir, char made[PATH_MAX], char *err, size_t errlen) {
    char p[PATH_MAX];
    if (snprintf(p, sizeof p, "%s", dir) >= (int)sizeof p) return fail(err, errlen, "data dir path too long");
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s != '\0') continue;
        char c = *s;
        *s = '\0';
        if (mkdir(p, 0755) == 0) {
            if (!made[0]) memcpy(made, p, strlen(p) + 1);
            if (chmod(p, 0755) < 0) return fail(err, errlen, "cannot chmod %s: %s", p, strerror(errno));
        } else if (errno != EEXIST) {
            return fail(err, errlen, "cannot create %s: %s", p, strerror(errno));
        }
        *s = c;
        if (!c) return 0;
    }
}

/* Removes what mkdir_p made, deepest first, when we fail before using it:
 * a refused --data-dir should not leave empty directories behind. rmdir
 * only ever removes empty directories, so nobody's files are at risk. */
static void unmake(const char *dir, const char *made) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s", dir);
    size_t stop = strlen(made);
    for (;;) {
        size_t n = strlen(p);
        while (n > 1 && p[n - 1] == '/') p[--n] = '\0'; /* "a//b/" */
        if (n < stop) return;
        if (rmdir(p) < 0 && errno != EINVAL) return; /* EINVAL: a "." */
        char *slash = strrchr(p, '/');
        if (!slash || n == stop) return;
        *slash = '\0';
    }
}

/* The permission class that applies is the first that matches, exactly as
 * the kernel decides; supplementary groups are dropped before exec. */
static int can_enter(const struct stat *st, uid_t uid, gid_t gid) {
    if (st->st_uid == uid) return (st->st_mode & S_IXUSR) != 0;
    if (st->st_gid == gid) return (st->st_mode & S_IXGRP) != 0;
    return (st->st_mode & S_IXOTH) != 0;
}

/* As root the server runs as someone else, who must be able to walk from
 * / down to the data dir; otherwise initdb fails with a baffling message. */
static int check_reachable(const embedded *e, char *err, size_t errlen) {
    char p[DIRMAX];
    snprintf(p, sizeof p, "%s", e->dir);
    for (char *s = p;; s++) {
        if (*s != '/' && *s != '\0') continue;
        char c = *s;
        *s = '\0';
        const char *d = p[0] ? p : "/";
        struct stat st;
        if (stat(d, &st) < 0) return fail(err, errlen, "cannot stat %s: %s", d, strerror(errno));
        if (!can_enter(&st, e->uid, e->gid))
            return fail(err, errlen,
                        "the server runs as user %s, which cannot enter %s (mode %04o); "
                        "choose a --data-dir it can reach, e.g. under /var/tmp",
                        e->user, d, (unsigned)(st.st_mode & 07777));
        *s = c;
        if (!c) return 0;
    }
}

/* As root: postgres, else nobody; but an existing cluster keeps its owner,
 * since the server refuses a data directory owned by anyone else. */
static int pick_user(embedded *e, char *err, size_t errlen) {
    if (geteuid() != 0) return 0;
    e->switch_user = 1;
    char pgdata[EPATH];
    sub(pgdata, e, "pgdata");
    struct stat st;
    struct passwd *pw;
    if (stat(pgdata, &st) == 0 && st.st_uid != 0) {
        pw = getpwuid(st.st_uid);
        e->uid = st.st_uid;
        e->gid = pw ? pw->pw_gid : st.st_gid;
        if (pw) snprintf(e->user, sizeof e->user, "%s", pw->pw_name);
        else snprintf(e->user, sizeof e->user, "uid %u", (unsigned)st.st_uid);
        return 0;
    }
    pw = getpwnam("postgres");
    if (!pw) pw = getpwnam("nobody");
    if (!pw || pw->pw_uid == 0)
        return fail(err, errlen, "running as root, and there is no user postgres or nobody to run the server as");
    e->uid = pw->pw_uid;
    e->gid = pw->pw_gid;
    snprintf(e->user, sizeof e->user, "%s", pw->pw_name);
    return 0;
}

/* A directory the server user owns; chowned again each time so a dir left
 * by an earlier run as another user does not lock the server out. */
static int own_dir(const embedded *e, const char *d, mode_t mode, char *err, size_t errlen) {
    if (mkdir(d, mode) < 0 && errno != EEXIST) return fail(err, errlen, "cannot create %s: %s", d, strerror(errno));
    if (e->switch_user && chown(d, e->uid, e->gid) < 0)
        return fail(err, errlen, "cannot chown %s: %s", d, strerror(errno));
    return 0;
}

/* postgres.log, for appending; above stdio's fds so dup2 in the child can
 * never be a no-op that keeps FD_CLOEXEC. */
static int open_log(const embedded *e, char *err, size_t errlen) {
    char log[EPATH];
    sub(log, e, "postgres.log");
    int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return fail(err, errlen, "cannot open %s: %s", log, strerror(errno));
    /* pg_ctl -l opens it again as the server user */
    if (e->switch_user && fchown(fd, e->uid, e->gid) < 0) {
        close(fd);
        return fail(err, errlen, "cannot chown %s: %s", log, strerror(errno));
    }
    if (fd < 3) {
        int hi = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        close(fd);
        if (hi < 0) return fail(err, errlen, "cannot open %s: %s", log, strerror(errno));
        fd = hi;
    }
    return fd;
}

/* flock with a fresh open of a lock file. Read-only is enough for flock,
 * and 0644 lets hosts running as other users share the locks. */
static int take_lock(const embedded *e, const char *name, int op, char *err, size_t errlen) {
    char p[EPATH];
    sub(p, e, name);
    int fd = open(p, O_RDONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return fail(err, errlen, "cannot open %s: %s", p, strerror(errno));
    int rc;
    while ((rc = flock(fd, op)) < 0 && errno == EINTR) {}
    if (rc < 0) {
        int saved = errno; /* leave() tells EWOULDBLOCK from real trouble */
        close(fd);
        fail(err, errlen, "cannot lock %s: %s", p, strerror(saved));
        errno = saved;
        return -1;
    }
    return fd;
}

/* ---- running initdb and pg_ctl ----------------------------------------- */

/* Forks and execs argv as the server user, stdout and stderr into outfd.
 * The host blocks SIGTERM/SIGINT/SIGHUP/SIGPIPE for its signalfd; a child
 * must not inherit that mask. Returns the exit status, 128+signal, or -1. */
static int run_prog(const embedded *e, char *const argv[], int outfd) {
    int nullfd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (nullfd >= 0 && nullfd < 3) {
        int hi = fcntl(nullfd, F_DUPFD_CLOEXEC, 3);
        close(nullfd);
        nullfd = hi;
    }
    if (nullfd < 0) return -1;
    static const char oops[] = "bmdb-host: error: cannot become the server user or execute ";
    pid_t pid = fork();
    if (pid < 0) {
        close(nullfd);
        return -1;
    }
    if (pid == 0) {
        /* Only async-signal-safe calls from here to execv. */
        static const int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGQUIT, SIGCHLD, SIGUSR1, SIGUSR2};
        for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) signal(sigs[i], SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        dup2(nullfd, 0);
        dup2(outfd, 1);
        dup2(outfd, 2);
        /* Nothing else of the host's may leak into a long-lived server. */
        if (close_range(3, ~0U, 0) < 0)
            for (int fd = 3; fd < 1024; fd++) close(fd);
        if (!e->switch_user || (setgroups(0, NULL) == 0 && setgid(e->gid) == 0 && setuid(e->uid) == 0)) {
            /* The host's cwd may be one the server user cannot enter. */
            if (chdir(e->dir) < 0) {}
            execv(argv[0], argv);
        }
        if (write(2, oops, sizeof oops - 1) < 0 || write(2, argv[0], strlen(argv[0])) < 0 || write(2, "\n", 1) < 0) {}
        _exit(127);
    }
    close(nullfd);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return -1;
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -1;
}

/* Whether a line names the failure, as opposed to progress or advice. */
static int is_error_line(const char *l) {
    return strstr(l, "FATAL:") || strstr(l, "PANIC:") || strstr(l, "ERROR:") || strstr(l, "error:");
}

static int is_advice_line(const char *l) {
    return strncmp(l, "DETAIL:", 7) == 0 || strncmp(l, "HINT:", 5) == 0 || strstr(l, " hint:") != NULL;
}

/* pg_ctl's own closing words point at the log rather than explain. */
static int is_boilerplate(const char *l) {
    static const char *const prefixes[] = {"Examine the log output", "stopped waiting", "waiting for server",
                                           "initdb: removing", "pg_ctl: could not start server", "done",
                                           "server st"};
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
        if (strncmp(l, prefixes[i], strlen(prefixes[i])) == 0) return 1;
    return 0;
}

/* Drops the server's "2024-01-01 00:00:00.000 UTC [123] " prefix (and
 * pg_ctl's "waiting for server to start...." glued in front of the first
 * one), the newline, and runs of blanks ("FATAL:  could not ..."). */
static void tidy(char *line) {
    line[strcspn(line, "\r\n")] = '\0';
    char *from = line;
    char *dots = strstr(line, "....");
    if (strncmp(line, "waiting for server", 18) == 0 && dots) {
        dots += strspn(dots, ".");
        if (*dots) memmove(line, dots, strlen(dots) + 1);
    }
    char *bracket = strstr(line, "] ");
    if (line[0] >= '0' && line[0] <= '9' && bracket) from = bracket + 2;
    char *o = line;
    for (char *s = from; *s; s++) {
        if ((*s == ' ' || *s == '\t') && (o == line || o[-1] == ' ')) continue;
        *o++ = *s == '\t' ? ' ' : *s;
    }
    while (o > line && o[-1] == ' ') o--;
    *o = '\0';
}

/* strlcat, so that truncating a long log line is not worth a warning. */
static void append(char *dst, size_t cap, const char *src) {
    size_t n = strlen(dst), m = strlen(src);
    if (n + 1 >= cap) return;
    if (m > cap - n - 1) m = cap - n - 1;
    memcpy(dst + n, src, m);
    dst[n + m] = '\0';
}

/* The most telling part of what was appended to a log since offset `from`:
 * the last error line with the DETAIL/HINT lines right after it, else the
 * last line that is not boilerplate. Older runs' lines are never used. */
static void log_excerpt(const char *file, off_t from, char *out, size_t len) {
    out[0] = '\0';
    FILE *f = fopen(file, "re");
    if (!f) return;
    if (fseeko(f, from, SEEK_SET) < 0) {
        fclose(f);
        return;
    }
    char line[1024], error[1024] = "", last[1024] = "";
    int after_error = 0;
    while (fgets(line, sizeof line, f)) {
        tidy(line);
        if (!line[0]) continue;
        if (is_error_line(line)) {
            error[0] = '\0';
            append(error, sizeof error, line);
            after_error = 1;
        } else if (after_error && is_advice_line(line)) {
            append(error, sizeof error, " ");
            append(error, sizeof error, line);
        } else {
            after_error = 0;
            if (!is_boilerplate(line)) {
                last[0] = '\0';
                append(last, sizeof last, line);
            }
        }
    }
    fclose(f);
    append(out, len, error[0] ? error : last);
}

/* Runs a server program with its output appended to postgres.log; on
 * failure the error is `what` plus the telling line of that output. */
static int run_logged(const embedded *e, char *const argv[], const char *what, char *err, size_t errlen) {
    int fd = open_log(e, err, errlen);
    if (fd < 0) return -1;
    off_t from = lseek(fd, 0, SEEK_END);
    int rc = run_prog(e, argv, fd), saved = errno;
    close(fd);
    if (rc == 0) return 0;
    char log[EPATH], why[600];
    sub(log, e, "postgres.log");
    log_excerpt(log, from < 0 ? 0 : from, why, sizeof why);
    if (rc < 0) return fail(err, errlen, "%s: cannot run %s: %s", what, argv[0], strerror(saved));
    if (why[0]) return fail(err, errlen, "%s: %s (see %s)", what, why, log);
    return fail(err, errlen, "%s: %s exited with status %d (see %s)", what, argv[0], rc, log);
}

/* ---- the cluster -------------------------------------------------------- */

/* unix_socket_directories as a postgresql.conf line: the file's strings
 * double a '. (Characters that would need more are refused earlier.) */
static void socket_conf_line(const embedded *e, char *out, size_t len) {
    char run[EPATH], val[EPATH * 2];
    sub(run, e, "run");
    size_t o = 0;
    for (const char *s = run; *s; s++) {
        if (*s == '\'') val[o++] = '\'';
        val[o++] = *s;
    }
    val[o] = '\0';
    snprintf(out, len, "unix_socket_directories = '%s'", val);
}

/* Whether the last unix_socket_directories setting is ours: it goes stale
 * when the data dir is moved or renamed, and then nobody finds the socket. */
static int socket_conf_current(const char *conf, const char *want) {
    FILE *f = fopen(conf, "re");
    if (!f) return 0;
    char line[1024], last[1024] = "";
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        const char *s = line + strspn(line, " \t");
        if (strncmp(s, "unix_socket_directories", 23) == 0) snprintf(last, sizeof last, "%s", s);
    }
    fclose(f);
    return strcmp(last, want) == 0;
}

/* Appends our settings; later lines win in postgresql.conf, so appending
 * is enough both after initdb (full) and after a move (socket only). The
 * port is pinned because the server would otherwise take $PGPORT. */
static int write_conf(const embedded *e, const char *pgdata, int full, char *err, size_t errlen) {
    char conf[EPATH + 32], sock[EPATH * 4 + 64];
    snprintf(conf, sizeof conf, "%s/postgresql.conf", pgdata);
    socket_conf_line(e, sock, sizeof sock);
    if (!full && socket_conf_current(conf, sock)) return 0;
    FILE *f = fopen(conf, "ae");
    if (!f) return fail(err, errlen, "cannot open %s: %s", conf, strerror(errno));
    if (full)
        fprintf(f, "\n# bmdb-host: the embedded database listens on its Unix socket only\n"
                   "listen_addresses = ''\nport = " PORT "\n%s\nmax_connections = 200\n", sock);
    else
        fprintf(f, "\n# bmdb-host: the data dir moved\n%s\n", sock);
    if (fclose(f) != 0) return fail(err, errlen, "cannot write %s: %s", conf, strerror(errno));
    return 0;
}

static int remove_entry(const char *p, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(p) < 0 && errno != ENOENT ? -1 : 0;
}

/* initdb into pgdata.new, renamed to pgdata once complete: a host killed
 * halfway leaves only pgdata.new, which the next one discards, rather than
 * a pgdata that looks like a cluster but cannot start. Called holding
 * control.lock, so no pgdata.new can be another host's work in progress. */
static int init_cluster(embedded *e, char *err, size_t errlen) {
    char pgdata[EPATH], fresh[EPATH], version[EPATH + 16], initdb[PATH_MAX + 8];
    sub(pgdata, e, "pgdata");
    sub(fresh, e, "pgdata.new");
    snprintf(version, sizeof version, "%s/PG_VERSION", pgdata);
    if (access(version, F_OK) == 0) return 0;
    if (rmdir(pgdata) < 0 && errno != ENOENT)
        return fail(err, errlen, "%s exists but holds no database cluster (%s); move it away", pgdata,
                    strerror(errno));
    if (nftw(fresh, remove_entry, 16, FTW_DEPTH | FTW_PHYS) < 0 && errno != ENOENT)
        return fail(err, errlen, "cannot remove the leftover %s: %s", fresh, strerror(errno));
    if (mkdir(fresh, 0700) < 0) return fail(err, errlen, "cannot create %s: %s", fresh, strerror(errno));
    if (e->switch_user && chown(fresh, e->uid, e->gid) < 0)
        return fail(err, errlen, "cannot chown %s: %s", fresh, strerror(errno));

    snprintf(initdb, sizeof initdb, "%s/initdb", e->bindir);
    /* --locale=C: the cluster must not depend on which locales this
     * machine happens to have (initdb fails on an uninstalled $LANG). */
    char *argv[] = {initdb, "-D", fresh, "-U", "bmdb", "--auth=trust", "--encoding=UTF8", "--locale=C",
                    "--no-sync", NULL};
    if (run_logged(e, argv, "initdb failed", err, errlen) < 0) return -1;
    if (write_conf(e, fresh, 1, err, errlen) < 0) return -1;
    if (rename(fresh, pgdata) < 0)
        return fail(err, errlen, "cannot rename %s to %s: %s", fresh, pgdata, strerror(errno));
    log_kv(LOG_INFO, "embedded database created", "data_dir", e->dir, NULL);
    return 0;
}

/* libpq's conninfo value rules: quoted when it holds a blank, a quote or a
 * backslash, with ' and \ escaped by a backslash. */
static char *make_conninfo(const embedded *e, const char *db) {
    char run[EPATH], host[EPATH * 2 + 3];
    sub(run, e, "run");
    size_t o = 0;
    int quote = strpbrk(run, " \t'\\") != NULL;
    if (quote) host[o++] = '\'';
    for (const char *s = run; *s; s++) {
        if (quote && (*s == '\'' || *s == '\\')) host[o++] = '\\';
        host[o++] = *s;
    }
    if (quote) host[o++] = '\'';
    host[o] = '\0';
    char *ci = NULL;
    if (asprintf(&ci, "host=%s port=" PORT " dbname=%s user=bmdb", host, db) < 0) return NULL;
    return ci;
}

static PGconn *connect_db(const embedded *e, const char *db, char *err, size_t errlen) {
    char *ci = make_conninfo(e, db);
    if (!ci) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    PGconn *c = pool_connect(ci, err, errlen);
    free(ci);
    return c;
}

static int start_server(const embedded *e, char *err, size_t errlen) {
    char pgdata[EPATH], log[EPATH], ctl[PATH_MAX + 8];
    sub(pgdata, e, "pgdata");
    sub(log, e, "postgres.log");
    if (write_conf(e, pgdata, 0, err, errlen) < 0) return -1;
    snprintf(ctl, sizeof ctl, "%s/pg_ctl", e->bindir);
    /* No -o: pg_ctl pastes it into a shell command unquoted, so the socket
     * directory lives in postgresql.conf instead. A stale postmaster.pid
     * from a crash is the server's to detect and remove. */
    char *argv[] = {ctl, "-D", pgdata, "-l", log, "-w", "-t", "60", "start", NULL};
    if (run_logged(e, argv, "the server did not start", err, errlen) < 0) return -1;
    log_kv(LOG_INFO, "embedded database started", "data_dir", e->dir, NULL);
    return 0;
}

static void stop_server(const embedded *e) {
    char pgdata[EPATH], pid[EPATH + 16], ctl[PATH_MAX + 8], err[1024];
    sub(pgdata, e, "pgdata");
    snprintf(pid, sizeof pid, "%s/postmaster.pid", pgdata);
    if (access(pid, F_OK) < 0) return; /* already stopped, by hand or by a crash */
    snprintf(ctl, sizeof ctl, "%s/pg_ctl", e->bindir);
    char *argv[] = {ctl, "-D", pgdata, "-m", "fast", "-w", "-t", "60", "stop", NULL};
    if (run_logged(e, argv, "the server did not stop", err, sizeof err) == 0)
        log_kv(LOG_INFO, "embedded database stopped", "data_dir", e->dir, NULL);
    else
        log_kv(LOG_WARN, "embedded database did not stop", "data_dir", e->dir, "error", err, NULL);
}

/* Called holding control.lock: drop our mark, and stop the server if ours
 * was the last. */
static void leave(embedded *e) {
    char err[512];
    close(e->users_fd);
    e->users_fd = -1;
    int users = take_lock(e, "users.lock", LOCK_EX | LOCK_NB, err, sizeof err);
    if (users >= 0) {
        stop_server(e);
        close(users);
    } else if (errno == EWOULDBLOCK) {
        log_kv(LOG_DEBUG, "embedded database left running for other hosts", "data_dir", e->dir, NULL);
    } else {
        log_kv(LOG_WARN, "embedded database left running", "data_dir", e->dir, "error", err, NULL);
    }
}

/* The database "bmdb". Another host may create it between our check and
 * our CREATE; duplicate_database (42P04) then means it exists, as wanted. */
static int ensure_database(const embedded *e, char *err, size_t errlen) {
    char cerr[768];
    PGconn *c = connect_db(e, "postgres", cerr, sizeof cerr);
    if (!c) return fail(err, errlen, "%s", cerr);
    const char *params[] = {"bmdb"};
    PGresult *r = PQexecParams(c, "SELECT 1 FROM pg_database WHERE datname = $1", 1, NULL, params, NULL, NULL, 0);
    int rc = 0, exists = 0;
    char why[1024];
    if (PQresultStatus(r) == PGRES_TUPLES_OK) exists = PQntuples(r) > 0;
    else pq_error_text(c, r, why, sizeof why), rc = fail(err, errlen, "cannot look up database bmdb: %s", why);
    PQclear(r);
    if (rc == 0 && !exists) {
        r = PQexec(c, "CREATE DATABASE bmdb");
        const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
        if (PQresultStatus(r) != PGRES_COMMAND_OK && !(state && strcmp(state, "42P04") == 0))
            pq_error_text(c, r, why, sizeof why), rc = fail(err, errlen, "cannot create database bmdb: %s", why);
        PQclear(r);
    }
    PQfinish(c);
    return rc;
}

/* ---- the interface ------------------------------------------------------ */

/* The data dir, created if need be (the first directory made goes into
 * made), resolved and checked: a path the socket, libpq, pg_ctl and
 * postgresql.conf can all take, reachable by the server user. 0, or -1
 * with err. */
static int prepare_dir(embedded *e, const char *data_dir, char made[PATH_MAX], char *err, size_t errlen) {
    if (mkdir_p(data_dir, made, err, errlen) < 0) return -1;
    char real[PATH_MAX];
    if (!realpath(data_dir, real)) return fail(err, errlen, "cannot resolve %s: %s", data_dir, strerror(errno));
    struct stat st;
    if (stat(real, &st) < 0 || !S_ISDIR(st.st_mode)) return fail(err, errlen, "%s is not a directory", real);
    if (strlen(real) + strlen(SOCKET_NAME) >= DIRMAX)
        return fail(err, errlen, "the socket path %s" SOCKET_NAME " is longer than the %zu bytes a Unix socket "
                    "allows; choose a shorter --data-dir", real, DIRMAX - 1);
    /* libpq splits host= at commas and cannot escape them; pg_ctl pastes
     * paths into a shell command inside "..."; a newline would break
     * postgresql.conf. */
    for (const char *s = real; *s; s++)
        if (strchr(",\"$`\\", *s) || (unsigned char)*s < 0x20)
            return fail(err, errlen, "the data dir %s holds a character PostgreSQL's tools cannot take in a path "
                        "(one of , \" $ ` \\ or a control character); choose another --data-dir", real);
    memcpy(e->dir, real, strlen(real) + 1); /* fits: checked above */
    if (pick_user(e, err, errlen) < 0) return -1;
    if (e->switch_user && check_reachable(e, err, errlen) < 0) return -1;
    return 0;
}

/* Under control.lock: the cluster exists (initdb on first use) and its
 * server runs, started here unless another host already runs it. */
static int start_or_join(embedded *e, char *err, size_t errlen) {
    char run[EPATH];
    sub(run, e, "run");
    /* run/ is 0700: the cluster trusts every local connection, and a
     * superuser session can run programs as the server user. */
    if (own_dir(e, run, 0700, err, errlen) < 0) return -1;
    if (init_cluster(e, err, errlen) < 0) return -1;
    char cerr[768];
    PGconn *probe = connect_db(e, "postgres", cerr, sizeof cerr);
    if (!probe) return start_server(e, err, errlen);
    PQfinish(probe);
    log_kv(LOG_INFO, "joined running embedded database", "data_dir", e->dir, NULL);
    return 0;
}

embedded *embedded_open(const char *data_dir, char **conninfo, char *err, size_t errlen) {
    *conninfo = NULL;
    if (!data_dir || !*data_dir) return fail(err, errlen, "no data dir given"), NULL;
    embedded *e = calloc(1, sizeof *e);
    if (!e) return fail(err, errlen, "out of memory"), NULL;
    e->users_fd = -1;
    int control = -1;
    char made[PATH_MAX] = "";

    /* The binaries before creating anything, so a machine without
     * PostgreSQL is told so and left without an empty data dir. */
    if (find_bindir(e->bindir, err, errlen) < 0 || prepare_dir(e, data_dir, made, err, errlen) < 0) goto fail;
    control = take_lock(e, "control.lock", LOCK_EX, err, errlen);
    if (control < 0 || start_or_join(e, err, errlen) < 0) goto fail;
    /* Mark ourselves a user before letting go of control.lock, so a host
     * closing at this moment cannot stop the server under us. */
    e->users_fd = take_lock(e, "users.lock", LOCK_SH, err, errlen);
    if (e->users_fd < 0) goto fail;
    /* Still under control.lock, so that on failure leave() can decide. */
    if (ensure_database(e, err, errlen) < 0) goto fail;
    *conninfo = make_conninfo(e, "bmdb");
    if (!*conninfo) {
        fail(err, errlen, "out of memory");
        goto fail;
    }
    close(control);
    return e;

fail:
    if (e->users_fd >= 0) leave(e); /* stops a server nobody else uses */
    if (control >= 0) close(control);
    else if (made[0]) unmake(data_dir, made);
    free(e);
    return NULL;
}

void embedded_close(embedded *e) {
    if (!e) return;
    char err[512];
    int control = take_lock(e, "control.lock", LOCK_EX, err, sizeof err);
    if (control >= 0) {
        leave(e);
        close(control);
    } else {
        /* Without control.lock we must not stop anything; the next host
         * to leave will find nobody holding users.lock and stop it. */
        log_kv(LOG_WARN, "embedded database left running", "data_dir", e->dir, "error", err, NULL);
        close(e->users_fd);
    }
    free(e);
}

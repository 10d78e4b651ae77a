/* embedded.c -- the embedded default database.
 *
 * Layout of the data dir:
 *     pgdata/        the cluster (owned by the server user, 0700)
 *     run/           the Unix socket; the server listens nowhere else
 *     postgres.log   the server's log
 *     control.lock   held exclusively while deciding to init, start or stop
 *     users.lock     held shared by every host using the server
 *
 * The last host out stops the server: on close it drops its shared lock on
 * users.lock and, under control.lock, tries to take it exclusively; that
 * only succeeds when no other host still holds it. flock() locks vanish
 * with their process, so a crashed host never keeps the server pinned. */
#include "embedded.h"

#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
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

/* The data dir is bounded by the socket path limit (~107 bytes), so fixed
 * buffers of this size hold any file name inside it. */
#define EPATH 512

struct embedded {
    char dir[200];
    char bindir[PATH_MAX];
    int users_fd;
    uid_t uid;
    gid_t gid;
};

static int fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(err, errlen, "embedded database: ");
    vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

static void path(char *out, const embedded *e, const char *name) {
    snprintf(out, EPATH, "%s/%s", e->dir, name);
}

/* The PostgreSQL server binaries: $BMDB_PG_BINDIR, pg_config, or Debian's
 * versioned directories, newest first. */
static int find_bindir(char *out) {
    char probe[PATH_MAX + 16];
    const char *env = getenv("BMDB_PG_BINDIR");
    if (env && *env) {
        snprintf(out, PATH_MAX, "%s", env);
        snprintf(probe, sizeof probe, "%s/initdb", out);
        return access(probe, X_OK) == 0 ? 0 : -1;
    }
    FILE *p = popen("pg_config --bindir 2>/dev/null", "r");
    if (p) {
        if (fgets(out, PATH_MAX, p)) out[strcspn(out, "\n")] = '\0';
        else out[0] = '\0';
        pclose(p);
        snprintf(probe, sizeof probe, "%s/initdb", out);
        if (out[0] && access(probe, X_OK) == 0) return 0;
    }
    glob_t g;
    int found = -1;
    if (glob("/usr/lib/postgresql/*/bin/initdb", 0, NULL, &g) == 0) {
        /* glob sorts: the last is the newest for same-width versions */
        snprintf(out, PATH_MAX, "%s", g.gl_pathv[g.gl_pathc - 1]);
        *strrchr(out, '/') = '\0';
        found = 0;
    }
    globfree(&g);
    return found;
}

/* Runs argv (a server binary) as the server user, output appended to log.
 * Returns the exit status, or -1 if it could not run. */
static int run_as(const embedded *e, char *const argv[], const char *log) {
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0) dup2(null, 0);
        if (geteuid() == 0 && (setgroups(0, NULL) < 0 || setgid(e->gid) < 0 || setuid(e->uid) < 0))
            _exit(126);
        execv(argv[0], argv);
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* The last non-empty line of a log, for error messages. */
static void last_line(const char *file, char *out, size_t len) {
    out[0] = '\0';
    FILE *f = fopen(file, "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (line[0]) snprintf(out, len, "%s", line);
    }
    fclose(f);
}

static int bin(char *out, const embedded *e, const char *name) {
    return snprintf(out, PATH_MAX, "%s/%s", e->bindir, name) < PATH_MAX ? 0 : -1;
}

/* As root, every directory above the data dir must let the server user in. */
static int check_reachable(const embedded *e, const char *user, char *err, size_t errlen) {
    if (geteuid() != 0) return 0;
    char p[sizeof e->dir];
    snprintf(p, sizeof p, "%s", e->dir);
    for (char *slash = strrchr(p, '/'); slash; slash = strrchr(p, '/')) {
        *slash = '\0';
        const char *d = p[0] ? p : "/";
        struct stat st;
        if (stat(d, &st) < 0) continue;
        int ok = (st.st_mode & S_IXOTH) || (st.st_uid == e->uid && (st.st_mode & S_IXUSR)) ||
                 (st.st_gid == e->gid && (st.st_mode & S_IXGRP));
        if (!ok)
            return fail(err, errlen,
                        "the server runs as user %s, which cannot enter %s (mode %04o); "
                        "choose a --data-dir it can reach, e.g. under /var/tmp",
                        user, d, st.st_mode & 07777);
        if (!p[0]) break;
    }
    return 0;
}

static int make_dir(const char *d, const embedded *e, mode_t mode, char *err, size_t errlen) {
    if (mkdir(d, mode) < 0 && errno != EEXIST) return fail(err, errlen, "cannot create %s: %s", d, strerror(errno));
    if (geteuid() == 0 && chown(d, e->uid, e->gid) < 0)
        return fail(err, errlen, "cannot chown %s: %s", d, strerror(errno));
    return 0;
}

/* libpq keyword value, quoted when it needs to be. */
static void conninfo_value(char *out, size_t len, const char *v) {
    size_t o = 0;
    out[o++] = '\'';
    for (; *v && o + 3 < len; v++) {
        if (*v == '\'' || *v == '\\') out[o++] = '\\';
        out[o++] = *v;
    }
    out[o++] = '\'';
    out[o] = '\0';
}

static int init_cluster(embedded *e, char *err, size_t errlen) {
    char pgdata[EPATH], run[EPATH], log[EPATH], conf[EPATH + 32], initdb[PATH_MAX];
    path(pgdata, e, "pgdata");
    path(run, e, "run");
    path(log, e, "postgres.log");
    snprintf(conf, sizeof conf, "%s/PG_VERSION", pgdata);
    if (access(conf, F_OK) == 0) return 0;
    if (bin(initdb, e, "initdb") < 0 || make_dir(pgdata, e, 0700, err, errlen) < 0) return -1;
    char *argv[] = {initdb, "-D", pgdata, "-U", "bmdb", "--auth=trust", "--encoding=UTF8", "--no-sync", NULL};
    if (run_as(e, argv, log) != 0) {
        char why[512];
        last_line(log, why, sizeof why);
        return fail(err, errlen, "initdb failed: %s (see %s)", why, log);
    }
    snprintf(conf, sizeof conf, "%s/postgresql.conf", pgdata);
    FILE *f = fopen(conf, "a");
    if (!f) return fail(err, errlen, "cannot open %s: %s", conf, strerror(errno));
    char quoted[EPATH * 2];
    /* postgresql.conf quotes with '' inside '...' */
    size_t o = 0;
    for (const char *s = run; *s && o + 2 < sizeof quoted; s++) {
        if (*s == '\'') quoted[o++] = '\'';
        quoted[o++] = *s;
    }
    quoted[o] = '\0';
    fprintf(f, "\n# bmdb-host embedded defaults\nlisten_addresses = ''\n"
               "unix_socket_directories = '%s'\nmax_connections = 200\n", quoted);
    fclose(f);
    log_kv(LOG_INFO, "embedded database created", "data_dir", e->dir, NULL);
    return 0;
}

static PGconn *try_connect(const embedded *e, const char *db, char *err, size_t errlen) {
    char run[EPATH], host[EPATH * 2 + 4], ci[EPATH * 2 + 64];
    path(run, e, "run");
    conninfo_value(host, sizeof host, run);
    snprintf(ci, sizeof ci, "host=%s port=5432 dbname=%s user=bmdb", host, db);
    return pool_connect(ci, err, errlen);
}

static int start_server(embedded *e, char *err, size_t errlen) {
    char pgdata[EPATH], log[EPATH], ctl[PATH_MAX];
    path(pgdata, e, "pgdata");
    path(log, e, "postgres.log");
    if (bin(ctl, e, "pg_ctl") < 0) return -1;
    char *argv[] = {ctl, "-D", pgdata, "-l", log, "-w", "-t", "60", "start", NULL};
    if (run_as(e, argv, log) != 0) {
        char why[512];
        last_line(log, why, sizeof why);
        return fail(err, errlen, "the server did not start: %s (see %s)", why, log);
    }
    log_kv(LOG_INFO, "embedded database started", "data_dir", e->dir, NULL);
    return 0;
}

static void stop_server(embedded *e) {
    char pgdata[EPATH], log[EPATH], ctl[PATH_MAX];
    path(pgdata, e, "pgdata");
    path(log, e, "postgres.log");
    if (bin(ctl, e, "pg_ctl") < 0) return;
    char *argv[] = {ctl, "-D", pgdata, "-m", "fast", "-w", "-t", "60", "stop", NULL};
    if (run_as(e, argv, log) == 0) log_kv(LOG_INFO, "embedded database stopped", "data_dir", e->dir, NULL);
    else log_kv(LOG_WARN, "embedded database did not stop cleanly", "data_dir", e->dir, NULL);
}

static int open_lock(const embedded *e, const char *name) {
    char p[EPATH];
    path(p, e, name);
    return open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
}

static int ensure_database(const embedded *e, char *err, size_t errlen) {
    char cerr[512];
    PGconn *c = try_connect(e, "postgres", cerr, sizeof cerr);
    if (!c) return fail(err, errlen, "%s", cerr);
    const char *params[] = {"bmdb"};
    PGresult *r = PQexecParams(c, "SELECT 1 FROM pg_database WHERE datname = $1", 1, NULL, params, NULL, NULL, 0);
    int exists = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0;
    PQclear(r);
    int rc = 0;
    if (!exists) {
        r = PQexec(c, "CREATE DATABASE bmdb");
        const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
        /* 42P04: another host created it a moment ago */
        if (PQresultStatus(r) != PGRES_COMMAND_OK && !(state && !strcmp(state, "42P04")))
            rc = fail(err, errlen, "cannot create database bmdb: %s", PQresultErrorMessage(r));
        PQclear(r);
    }
    PQfinish(c);
    if (rc) err[strcspn(err, "\n")] = '\0';
    return rc;
}

embedded *embedded_open(const char *data_dir, char **conninfo, char *err, size_t errlen) {
    embedded *e = calloc(1, sizeof *e);
    e->users_fd = -1;
    int control = -1;
    const char *user = NULL;
    if (geteuid() == 0) {
        struct passwd *pw = getpwnam("postgres");
        if (!pw) pw = getpwnam("nobody");
        if (!pw) {
            fail(err, errlen, "running as root, and neither user postgres nor nobody exists to run the server");
            goto fail;
        }
        user = pw->pw_name;
        e->uid = pw->pw_uid;
        e->gid = pw->pw_gid;
    }
    if (find_bindir(e->bindir) < 0) {
        fail(err, errlen, "PostgreSQL server binaries not found (install postgresql or set BMDB_PG_BINDIR)");
        goto fail;
    }
    if (mkdir(data_dir, 0755) < 0 && errno != EEXIST) {
        fail(err, errlen, "cannot create %s: %s", data_dir, strerror(errno));
        goto fail;
    }
    char real[PATH_MAX];
    if (!realpath(data_dir, real)) {
        fail(err, errlen, "cannot resolve %s: %s", data_dir, strerror(errno));
        goto fail;
    }
    struct sockaddr_un sun;
    if (strlen(real) + strlen("/run/.s.PGSQL.5432") >= sizeof sun.sun_path) {
        fail(err, errlen, "the socket path %s/run/.s.PGSQL.5432 is longer than %zu bytes; choose a shorter --data-dir",
             real, sizeof sun.sun_path - 1);
        goto fail;
    }
    memcpy(e->dir, real, strlen(real) + 1); /* fits: checked above */
    if (user && check_reachable(e, user, err, errlen) < 0) goto fail;

    control = open_lock(e, "control.lock");
    if (control < 0 || flock(control, LOCK_EX) < 0) {
        fail(err, errlen, "cannot lock %s/control.lock: %s", e->dir, strerror(errno));
        goto fail;
    }
    char run[EPATH], log[EPATH];
    path(run, e, "run");
    path(log, e, "postgres.log");
    int logfd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (logfd >= 0) {
        if (geteuid() == 0 && fchown(logfd, e->uid, e->gid) < 0) { /* the server reports it */ }
        close(logfd);
    }
    if (make_dir(run, e, 0755, err, errlen) < 0 || init_cluster(e, err, errlen) < 0) goto fail;

    char cerr[512];
    PGconn *probe = try_connect(e, "postgres", cerr, sizeof cerr);
    if (probe) {
        PQfinish(probe);
        log_kv(LOG_INFO, "joined the running embedded database", "data_dir", e->dir, NULL);
    } else if (start_server(e, err, errlen) < 0) {
        goto fail;
    }
    /* Mark ourselves a user before letting go of control.lock, so a host
     * closing at this moment cannot stop the server under us. */
    e->users_fd = open_lock(e, "users.lock");
    if (e->users_fd < 0 || flock(e->users_fd, LOCK_SH) < 0) {
        fail(err, errlen, "cannot lock %s/users.lock: %s", e->dir, strerror(errno));
        goto fail;
    }
    if (ensure_database(e, err, errlen) < 0) goto fail;
    flock(control, LOCK_UN);
    close(control);

    char host[EPATH * 2 + 4];
    conninfo_value(host, sizeof host, run);
    size_t len = strlen(host) + 64;
    *conninfo = malloc(len);
    snprintf(*conninfo, len, "host=%s port=5432 dbname=bmdb user=bmdb", host);
    return e;

fail:
    if (control >= 0) close(control);
    if (e->users_fd >= 0) {
        close(e->users_fd);
        e->users_fd = -1;
    }
    free(e);
    return NULL;
}

void embedded_close(embedded *e) {
    if (!e) return;
    int control = open_lock(e, "control.lock");
    if (control >= 0) flock(control, LOCK_EX);
    close(e->users_fd);
    int users = open_lock(e, "users.lock");
    if (users >= 0 && flock(users, LOCK_EX | LOCK_NB) == 0) stop_server(e);
    if (users >= 0) close(users);
    if (control >= 0) close(control);
    free(e);
}

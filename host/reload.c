/* reload.c -- hot reload: watching the script's files and swapping code.
 *
 * Editors save in many ways: write in place (one or several writes), or
 * write a temp file and rename it over the original, or move the original
 * away first. So we watch the DIRECTORIES of the watched files, match
 * events by name, and wait for a short quiet period after the last one.
 * A content hash of every watched file then decides: a save that changed
 * nothing (or a second event for the same save) does not reload again. */
#include "reload.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "lbmdb.h"
#include "lifecycle.h"
#include "log.h"
#include "worker.h"

#define QUIET_S 0.05   /* after the last event of a save */
#define MAX_FILES 256
#define MAX_DIRS 16

struct reloader {
    const char *script;
    int argc;
    char **argv;
    int fd;                        /* inotify, or -1 */
    char *files[MAX_FILES];        /* watched files */
    int nfiles;
    struct { int wd; char path[PATH_MAX]; } dirs[MAX_DIRS];
    int ndirs;
    double due;                    /* monotonic time of the armed reload, 0: none */
    uint64_t loaded_hash;          /* content the running code came from */
    uint64_t refused_hash;         /* content last refused, not to be retried */
};

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* One hash over the names and contents of every watched file. */
static uint64_t content_hash(const reloader *r) {
    uint64_t h = 1469598103934665603ULL;
    unsigned char buf[8192];
    for (int i = 0; i < r->nfiles; i++) {
        h = fnv(h, (const unsigned char *)r->files[i], strlen(r->files[i]) + 1);
        FILE *f = fopen(r->files[i], "rb");
        if (!f) continue;
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) h = fnv(h, buf, n);
        fclose(f);
    }
    return h;
}

static void clear_files(reloader *r) {
    for (int i = 0; i < r->nfiles; i++) free(r->files[i]);
    r->nfiles = 0;
}

static void add_file(reloader *r, const char *path) {
    if (r->nfiles >= MAX_FILES) return;
    for (int i = 0; i < r->nfiles; i++)
        if (!strcmp(r->files[i], path)) return;
    r->files[r->nfiles++] = strdup(path);
    if (r->fd < 0) return;
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = '\0';
    else snprintf(dir, sizeof dir, ".");
    for (int i = 0; i < r->ndirs; i++)
        if (!strcmp(r->dirs[i].path, dir)) return;
    if (r->ndirs >= MAX_DIRS) return;
    int wd = inotify_add_watch(r->fd, dir, IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ATTRIB);
    if (wd < 0) {
        log_kv(LOG_WARN, "cannot watch directory", "dir", dir, "error", strerror(errno), NULL);
        return;
    }
    r->dirs[r->ndirs].wd = wd;
    snprintf(r->dirs[r->ndirs].path, sizeof r->dirs[r->ndirs].path, "%s", dir);
    r->ndirs++;
}

/* The script and the Lua files its state loaded from the script's dir. */
static void collect_files(reloader *r, lua_State *L) {
    clear_files(r);
    add_file(r, r->script);
    char **files = NULL;
    int n = lbmdb_script_files(L, r->script, &files);
    for (int i = 0; i < n; i++) {
        add_file(r, files[i]);
        free(files[i]);
    }
    free(files);
}

reloader *reload_create(const char *script, int argc, char **argv, int watch) {
    reloader *r = calloc(1, sizeof *r);
    r->script = script;
    r->argc = argc;
    r->argv = argv;
    r->fd = watch ? inotify_init1(IN_NONBLOCK | IN_CLOEXEC) : -1;
    if (watch && r->fd < 0) log_kv(LOG_WARN, "cannot watch files; reload with SIGHUP", "error", strerror(errno), NULL);
    /* What the slots are about to load: the baseline for "changed". */
    char err[4096];
    lua_State *L = lbmdb_script_state(script, argc, argv, err, sizeof err);
    if (L) {
        collect_files(r, L);
        lbmdb_close_state(L);
    } else {
        add_file(r, script);
    }
    r->loaded_hash = content_hash(r);
    return r;
}

void reload_destroy(reloader *r) {
    if (!r) return;
    clear_files(r);
    if (r->fd >= 0) close(r->fd);
    free(r);
}

int reload_fd(const reloader *r) { return r->fd; }

static int watched(const reloader *r, int wd, const char *name) {
    for (int d = 0; d < r->ndirs; d++) {
        if (r->dirs[d].wd != wd) continue;
        char path[PATH_MAX + 256];
        snprintf(path, sizeof path, "%s/%s", r->dirs[d].path, name);
        for (int i = 0; i < r->nfiles; i++) {
            const char *f = r->files[i];
            /* files are stored as given (relative or absolute): compare
             * the directory's own spelling of the path */
            if (!strcmp(f, path) || (!strcmp(r->dirs[d].path, ".") && !strcmp(f, name))) return 1;
        }
    }
    return 0;
}

void reload_read_events(reloader *r) {
    char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
    for (;;) {
        ssize_t n = read(r->fd, buf, sizeof buf);
        if (n <= 0) return;
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            if (ev->len && watched(r, ev->wd, ev->name)) r->due = mono_now() + QUIET_S;
            p += sizeof *ev + ev->len;
        }
    }
}

double reload_due_in(const reloader *r) {
    if (!r->due) return -1;
    double left = r->due - mono_now();
    return left > 0 ? left : 0;
}

int reload_run(reloader *r, pool *p, int forced) {
    r->due = 0;
    uint64_t hash = content_hash(r);
    if (!forced && (hash == r->loaded_hash || hash == r->refused_hash)) return 1;
    double t0 = mono_now();
    char err[8192];
    lua_State *L = lbmdb_script_state(r->script, r->argc, r->argv, err, sizeof err);
    worker_spec specs[64];
    int n = L ? lbmdb_worker_specs(L, specs, 64, err, sizeof err) : -1;
    if (n == 0) snprintf(err, sizeof err, "%s returns no worker definitions", r->script);
    if (n <= 0) {
        err[strcspn(err, "\n")] = '\0'; /* file:line: message, without the traceback */
        log_kv(LOG_ERROR, "reload refused; the old code keeps running", "error", err, NULL);
        if (L) {
            collect_files(r, L); /* a new require may have come with it */
            lbmdb_close_state(L);
        }
        r->refused_hash = content_hash(r);
        return -1;
    }
    collect_files(r, L);
    lbmdb_close_state(L);
    r->loaded_hash = content_hash(r);
    r->refused_hash = 0;

    int slots = 0;
    char list[512] = "";
    for (int i = 0; i < n; i++) {
        slots += specs[i].concurrency;
        size_t len = strlen(list);
        snprintf(list + len, sizeof list - len, "%s%.63s x%d", i ? ", " : "", specs[i].process, specs[i].concurrency);
    }
    pool_grow(p, slots + 4);
    workers_bump_generation();
    workers_start(p, r->script, r->argc, r->argv, specs, n);
    char gen[16], ms[32];
    snprintf(gen, sizeof gen, "%u", workers_generation());
    snprintf(ms, sizeof ms, "%.1fms", (mono_now() - t0) * 1000);
    log_kv(LOG_INFO, "reloaded", "generation", gen, "took", ms, "trigger", forced ? "SIGHUP" : "file change",
           "workers", list, NULL);
    return 0;
}

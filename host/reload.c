/* reload.c -- hot reload: watching the script's files and swapping code.
 *
 * Editors save in many ways: write in place (one or several writes), or
 * write a temp file and rename it over the original, or move the original
 * away first. So we watch the DIRECTORIES of the watched files, match
 * events by name, and wait for a short quiet period after the last one.
 * The files' bytes are then compared with the snapshot the slots run (and
 * the one last refused): a save that changed nothing (or a second event
 * for the same save) does not reload again.
 *
 * A reload reads the files ONCE, into a snapshot (snapshot.h): the state
 * that validates the new code records exactly what it loaded, and the
 * slots load that snapshot, never the files, so a save after validation
 * cannot reach a slot unvalidated. */
#include "reload.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "lstate.h"
#include "lifecycle.h"
#include "log.h"
#include "metrics.h"
#include "snapshot.h"
#include "worker.h"

#define QUIET_S 0.05   /* after the last event of a save */
#define MAX_FILES 256
#define MAX_DIRS 16

struct reloader {
    int argc;
    char **argv;
    int fd;                        /* inotify, or -1 */
    char *files[MAX_FILES];        /* watched files */
    int nfiles;
    struct { int wd; char path[PATH_MAX]; } dirs[MAX_DIRS];
    int ndirs;
    double due;                    /* monotonic time of the armed reload, 0: none */
    snapshot *loaded;              /* the code the slots run */
    snapshot *refused;             /* the code last refused, not to be retried */
};

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

/* Watch the files of the running code and of the code last refused: the
 * script and the modules each loaded from its directory (a refused edit
 * may have added a require). */
static void watch_files(reloader *r) {
    clear_files(r);
    for (int i = 0; i < snapshot_nfiles(r->loaded); i++) add_file(r, snapshot_file(r->loaded, i));
    for (int i = 0; r->refused && i < snapshot_nfiles(r->refused); i++) add_file(r, snapshot_file(r->refused, i));
}

reloader *reload_create(snapshot *loaded, int argc, char **argv, int watch) {
    reloader *r = calloc(1, sizeof *r);
    r->argc = argc;
    r->argv = argv;
    r->fd = watch ? inotify_init1(IN_NONBLOCK | IN_CLOEXEC) : -1;
    if (watch && r->fd < 0) log_kv(LOG_WARN, "cannot watch files; reload with SIGHUP", "error", strerror(errno), NULL);
    r->loaded = snapshot_ref(loaded);
    watch_files(r);
    return r;
}

void reload_destroy(reloader *r) {
    if (!r) return;
    clear_files(r);
    if (r->fd >= 0) close(r->fd);
    snapshot_unref(r->loaded);
    snapshot_unref(r->refused);
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

static void refuse(reloader *r, snapshot *snap, char *err) {
    err[strcspn(err, "\n")] = '\0'; /* file:line: message, without the traceback */
    log_kv(LOG_ERROR, "reload refused; the old code keeps running", "error", err, NULL);
    metrics_reload(1);
    if (!snap) return;
    snapshot_unref(r->refused);
    r->refused = snap;
    watch_files(r);
}

/* "Provision x4, Recover x2", cut short past a few hundred characters. */
static void describe(const worker_spec *specs, int n, char *list, size_t len) {
    list[0] = '\0';
    for (int i = 0; i < n; i++) {
        size_t used = strlen(list);
        if (used + 80 > len) {
            snprintf(list + used, len - used, ", ... (%d workers)", n);
            return;
        }
        char one[80];
        snprintf(list + used, len - used, "%s%s", i ? ", " : "", worker_spec_describe(&specs[i], one, sizeof one));
    }
}

int reload_run(reloader *r, pool *p, int forced) {
    r->due = 0;
    if (!forced && (snapshot_matches_disk(r->loaded) || (r->refused && snapshot_matches_disk(r->refused))))
        return 1;
    double t0 = mono_now();
    char err[8192];
    snapshot *snap = snapshot_open(snapshot_script(r->loaded), err, sizeof err);
    if (!snap) return refuse(r, NULL, err), -1;
    int kind;
    lua_State *L = lstate_new(snap, r->argc, r->argv, &kind, err, sizeof err);
    worker_spec *specs = NULL;
    int n = L ? lstate_worker_specs(L, &specs, err, sizeof err) : -1;
    if (L) lstate_close(L);
    snapshot_seal(snap); /* what was validated is what the slots load */
    if (n == 0) snprintf(err, sizeof err, "%s returns no worker definitions", snapshot_script(snap));
    if (n <= 0) {
        free(specs);
        return refuse(r, snap, err), -1;
    }
    snapshot_unref(r->loaded);
    r->loaded = snap;
    snapshot_unref(r->refused);
    r->refused = NULL;
    watch_files(r);

    int slots = 0;
    for (int i = 0; i < n; i++) slots += specs[i].concurrency;
    char list[512];
    describe(specs, n, list, sizeof list);
    pool_grow(p, slots + 4);
    workers_set_code(snap);
    workers_start(specs, n);
    free(specs);
    char gen[16], ms[32];
    snprintf(gen, sizeof gen, "%u", snapshot_generation());
    snprintf(ms, sizeof ms, "%.1fms", (mono_now() - t0) * 1000);
    metrics_reload(0);
    log_kv(LOG_INFO, "reloaded", "generation", gen, "took", ms, "trigger", forced ? "SIGHUP" : "file change",
           "workers", list, NULL);
    return 0;
}

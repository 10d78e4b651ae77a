/* reload.h -- hot reload: watching the script's files and swapping code.
 *
 * A reload loads the script into a fresh state on the main thread first.
 * Only if it loads and its worker definitions are valid does the code
 * generation move on; each slot then switches at its next item boundary
 * (worker.c), so an item in flight always finishes on the code that
 * started it, and a broken edit leaves the old code running. */
#ifndef BMDB_RELOAD_H
#define BMDB_RELOAD_H

#include "pool.h"

typedef struct reloader reloader;

struct snapshot;
/* loaded: the code the slots were started on. watch: follow its files
 * (the script and the Lua files it loaded from its directory) with
 * inotify. Without it only reload_run() (SIGHUP) reloads. */
reloader *reload_create(struct snapshot *loaded, int argc, char **argv, int watch);
void reload_destroy(reloader *r);

/* The inotify descriptor to poll, or -1. */
int reload_fd(const reloader *r);
/* Reads pending file events. A change to a watched file arms a short
 * quiet period, so an editor's several writes or write-and-rename make
 * one reload. */
void reload_read_events(reloader *r);
/* Seconds until an armed reload is due (0: now), or -1 when none is. */
double reload_due_in(const reloader *r);

/* Validates and swaps. forced (SIGHUP) reloads even when no watched file
 * changed. 0 on a reload, 1 when skipped (nothing changed), -1 when the
 * new code was refused (logged with file:line). */
int reload_run(reloader *r, pool *p, int forced);

#endif

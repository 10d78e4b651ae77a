/* limit.h -- the local side of bmdb.limit: waiters, releases, wake-ups.
 *
 * The limits are rows (migration 0007) that lua/bmdb/limit.lua takes in
 * fenced transactions. What is here must be C: the wait of a take (a rate
 * limit's reserved time, or a concurrency limit with no place free),
 * which sleeps until its time is up or a release of its limit is heard,
 * and the release of a place, which must run whatever became of the
 * item's lock or the body's Lua state.
 *
 * A release wakes the waiters of its limit in this host at once
 * (limit_released) and those of other hosts through NOTIFY bmdb_limit,
 * which each host's listener (worker.c) hands to limit_released. Names
 * are hashed into LIMIT_BUCKETS generations: a collision only wakes a
 * waiter that then finds nothing free and waits again. A waiter reads its
 * bucket's generation before it looks for a place, so a release between
 * that look and its wait ends the wait at once (limit_moved).
 *
 * Globals: the generations and the waiter list, under limit.c's `mu`,
 * taken with nothing else held and held only to write to eventfds. */
#ifndef BMDB_LIMIT_H
#define BMDB_LIMIT_H

#include <stddef.h>

#include "pool.h"
#include "session.h"
#include "tx.h"

#define LIMIT_BUCKETS 64

/* The generation of name's bucket now. */
unsigned long limit_gen(const char *name);
/* 1 when a release of name's bucket came after gen. */
int limit_moved(const char *name, unsigned long gen);
/* A place of name was given back, here or (a notification) elsewhere;
 * NULL or "": of any limit (the listener reconnected: it may have missed
 * some). Wakes every waiter of the bucket. */
void limit_released(const char *name);

/* A waiter: fd (an eventfd, the caller's iofence fd) is written to on
 * every release of name's bucket while it is watched. The caller owns
 * the struct (its stack) until limit_unwatch. */
typedef struct limit_waiter {
    int fd;
    unsigned bucket;
    struct limit_waiter *next;
} limit_waiter;
void limit_watch(limit_waiter *w, const char *name, int fd);
void limit_unwatch(limit_waiter *w);

/* Gives back the place of name held with token: one DELETE on a pooled
 * connection, outside any transaction of the caller and unfenced (a
 * place goes back even when its item's lock or session is gone), tried
 * again once on a fresh connection if the first broke. After it
 * committed, it wakes local waiters and sends NOTIFY bmdb_limit on the
 * same connection (best effort: a server without notifications refuses
 * once, and is not asked again). owner (may be NULL): the session the
 * connection is lent to, so losing it cuts a hung route (pool.h).
 * 1 given back, 0 not held (never taken, given back already, or freed
 * with its session), -1 with e set. */
int limit_release(pool *p, session *owner, const char *name, const char *token, tx_error *e);

#endif

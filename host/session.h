/* session.h -- the host's BMDB session and the heartbeat that keeps it.
 *
 * One session per host. A heartbeat thread pokes it every interval/2 over a
 * connection of its own and keeps a LOCAL deadline, measured on the
 * monotonic clock from the moment the last successful poke was sent, minus
 * a margin: since the database computes its deadline from a later now(),
 * the local one always passes first (host/README.md, guarantee 3). When the
 * local deadline passes or the database says the row is gone, the session
 * is lost for good; the heartbeat then starts a new one for new work.
 * Sessions are reference counted so a work item can keep the one it was
 * claimed under, and see it die, while the host moves on to the next. */
#ifndef BMDB_SESSION_H
#define BMDB_SESSION_H

#include <stddef.h>
#include <libpq-fe.h>
#include "pool.h"

typedef struct session session;

/* What happens to the work of a session that ends, in SQL that belongs to
 * the work module (work_housekeeping in work.h), so this module knows
 * sessions only. Each list runs in one SERIALIZABLE transaction. */
struct session_housekeeping {
    /* Collects every session past its deadline (no parameters); the rows
     * the last statement affected are the sessions collected. */
    const char *const *collect;
    int ncollect;
    /* Ends our own session at shutdown; $1 is its id. */
    const char *const *end;
    int nend;
    /* Every interval after collecting, on the same connection: what the
     * live session's own work needs (strays.h). May be NULL. */
    void (*sweep)(PGconn **cp, const char *session, double until);
    /* Every round after a good poke, before any collecting and sweep (and
     * at once after sessions_wake_heartbeat): what the session's work
     * asked to have done soon (strays.h: items given back). May be NULL. */
    void (*soon)(PGconn **cp, const char *session, double until);
    /* The collect statements for a server that lacks what the first ones
     * read, as many (work.h: WORK_LOST_TO_OUTAGE), used once plain_off()
     * is 0; a failed collection's error goes to plain_if(), which answers
     * whether it switched. May all be NULL. */
    const char *const *collect_plain;
    int (*plain_off)(void);
    int (*plain_if)(const char *error);
};

struct session_config {
    const char *component;     /* sessions.component_name */
    const char *runtime_info;  /* sessions.runtime_info, e.g. host:pid */
    int interval_s;            /* the database deadline is now() + this */
    const struct session_housekeeping *housekeeping;
};

/* Creates the first session synchronously (so a bad database is reported
 * at start) and starts the heartbeat thread. 0, or -1 with err filled. */
int sessions_start(pool *p, const struct session_config *cfg, char *err, size_t errlen);
/* Stops the heartbeat and ends the current session: work it still holds is
 * recorded as Canceled and the session row is deleted. */
void sessions_stop(void);
int sessions_started(void);
/* The current session for reports: 1 when it is live. id gets its id (""
 * between sessions), left the time to its local deadline, why one line
 * saying so. */
int sessions_describe(char *id, size_t idlen, double *left, char *why, size_t whylen);

/* The current session as a new reference, waiting up to timeout_s while
 * the host is between sessions. NULL when there is none. */
session *session_current(double timeout_s);
void session_ref(session *s);
void session_unref(session *s);

const char *session_id(const session *s);
const char *session_component(const session *s);
/* Not lost, and the local deadline is still ahead. */
int session_alive(session *s);
/* s's local deadline (monotonic) as of now: each good poke moves it on. */
double session_local_deadline(session *s);
/* Marks s lost (the database no longer has it); wakes every waiter.
 * 1 when this call lost it, 0 when it was lost already. */
int session_lose(session *s, const char *why);
/* Loses the current session if its local deadline has passed. The
 * heartbeat does this too, between its statements; the host's main loop
 * calls this every tick so the loss is declared on time even while the
 * heartbeat waits on a connect. */
void sessions_check_deadline(void);

/* Has the heartbeat run a round now rather than at its next: for work
 * that should not wait an interval (housekeeping's `soon`). */
void sessions_wake_heartbeat(void);

/* For specs: stop poking (the session then expires) or resume. */
void sessions_pause_heartbeat(int paused);

#endif

/* work.h -- locking one (machine, process) to a session, and letting go.
 *
 * Both run inside a caller's fenced transaction, so a lock is taken or
 * released only while the session is alive. A work row whose session is
 * past its deadline holds nothing: work_lock() takes it over in the same
 * transaction (recorded as Abandoned) instead of waiting for collection. */
#ifndef BMDB_WORK_H
#define BMDB_WORK_H

#include <stddef.h>
#include "tx.h"

typedef enum {
    WORK_LOCKED = 0,  /* the lock is ours; attempt and token are set */
    WORK_HELD,        /* a live session holds it */
    WORK_BACKOFF,     /* failed recently; until holds the end of backoff */
    WORK_PAUSED,      /* the process is paused fleet-wide; why: the reason */
    WORK_ON_HOLD,     /* the machine is on hold; why: the reason */
    WORK_ERROR = -1   /* e is set */
} work_lock_result;

/* What a claim stores in its work row, as text parameters (NULL: none):
 * the timeout in seconds, and the worker's backoff spec already normalized
 * (bmdb.backoff_next's rules), which whoever records the item's death
 * applies. */
typedef struct work_claim {
    const char *timeout;
    const char *backoff_initial, *backoff_maximum, *backoff_exponent;
} work_claim;

typedef struct work_locked {
    int attempt;      /* 1 + consecutive failures so far */
    char token[40];   /* the claim's token, for the item fence (tx.h) */
    char until[64];   /* WORK_BACKOFF: when it ends */
    char why[512];    /* WORK_PAUSED / WORK_ON_HOLD: the operator's reason */
} work_locked;

/* c may be NULL (no timeout, no backoff spec). A pause or a hold refuses
 * the claim; a holder past its session's deadline or its own timeout is
 * taken over, which counts as the item's failure. */
work_lock_result work_lock(tx *t, const char *machine, const char *process, const work_claim *c,
                           work_locked *out, tx_error *e);

/* The usual claim, as t's final statement (tx_set_final): up to count of
 * candidates (a UUID array literal, "{id,id,...}", shuffled by the
 * caller) that are free, locked when COMMIT lands. Only the common case:
 * anything that would need more (a takeover, a machine that does not
 * exist) locks nothing or fails, and the caller then claims with
 * work_lock. After a successful tx_commit, work_locked_any(t, i, ...)
 * says which machine it locked i-th (from 0): 1 with machine and out's
 * attempt and token set, or 0 past the last. */
int work_lock_any(tx *t, const char *candidates, int count, const char *process,
                  const work_claim *c, tx_error *e);
int work_locked_any(const tx *t, int i, char *machine, size_t machinelen, work_locked *out);
/* event is "Finished", "Failed" or "Canceled". Finished clears the backoff;
 * Failed stores backoff_seconds (>= 1) and counts the attempt. The release
 * is t's final statement: it goes out with COMMIT, in the same round trip
 * (tx_set_final), so call it last. A lock that is no longer this
 * session's (or, with a token, this claim's) fails that COMMIT with
 * TXE_LOST, and nothing of the transaction commits. */
int work_release(tx *t, const char *machine, const char *process, const char *token,
                 const char *event, const char *cause, long backoff_seconds, tx_error *e);

/* The release of a batch (sched.h): count items Finished at once, as t's
 * final statement. machines, processes and tokens are array literals
 * ("{a,b}"), the i-th entries naming one item. Only locks that are still
 * this session's and this claim's, within their timeout, are released;
 * if one is not, the statement raises (22012) and nothing commits. */
int work_release_finished(tx *t, const char *machines, const char *processes, const char *tokens,
                          int count, tx_error *e);

/* The cause of a takeover at timeout, as an SQL expression over work w. */
#define WORK_TIMEOUT_CAUSE "'timeout after ' || w.timeout_seconds::TEXT || 's'"

/* True for a session of sessions `s` lost because the database went away,
 * not its host: its last heartbeat (deadline - interval) came before the
 * server began serving: its start (a restart) or, for a promoted standby,
 * the last commit it replayed from the old primary (every heartbeat that
 * reached the old primary is at or before it). A host killed or frozen
 * while the server ran heartbeat after both, and still counts. The
 * functions are PostgreSQL's: where the server lacks them (CockroachDB)
 * the host falls back to WORK_LOST_NEVER (work_outage_rule_off). */
#define WORK_LOST_TO_OUTAGE(s)                                                                  \
    "(" s ".deadline - " s ".interval_seconds * INTERVAL '1 second' < "                         \
    "greatest(pg_postmaster_start_time(), pg_last_xact_replay_timestamp()))"
#define WORK_LOST_NEVER(s) "FALSE"
/* The Abandoned event's cause for an expired session (lost: its SQL test). */
#define WORK_EXPIRED_CAUSE(lost)                                                                \
    "CASE WHEN " lost " THEN 'session expired (database restarted or failed over: not counted)' " \
    "ELSE 'session expired' END"

/* Counts the death of the work rows of work w matching `where` as a
 * failure: their backoff grows by the spec stored at claim time (the
 * previous period, or 1 s, without one), with cause (an SQL expression).
 * One statement, in the subset PostgreSQL and CockroachDB share. */
#define WORK_PENALTY_SQL(cause, where)                                                           \
    "INSERT INTO work_backoff (machine_id, process, backoff_until, last_seconds, attempts, cause) " \
    "SELECT p.machine_id, p.process, now() + p.secs * INTERVAL '1 second', p.secs, 1, p.cause "  \
    "FROM (SELECT w.machine_id, w.process, " cause " AS cause, "                                 \
    " CASE WHEN w.backoff_initial IS NULL THEN coalesce(b.last_seconds, 1) "                      \
    "  WHEN w.backoff_exponent <= 1 OR b.last_seconds IS NULL THEN w.backoff_initial "            \
    "  ELSE least(w.backoff_maximum, ceil(b.last_seconds * w.backoff_exponent)::INT8) END AS secs " \
    " FROM work w LEFT JOIN work_backoff b "                                                      \
    "  ON b.machine_id = w.machine_id AND b.process = w.process WHERE " where ") AS p "           \
    "ON CONFLICT (machine_id, process) DO UPDATE SET backoff_until = excluded.backoff_until, "    \
    "last_seconds = excluded.last_seconds, attempts = work_backoff.attempts + 1, "                \
    "cause = excluded.cause"

/* The last backoff period stored for (machine, process), 0 when none. */
long work_backoff_last(tx *t, const char *machine, const char *process, tx_error *e);

/* What becomes of the work of a session that ends (session.h): an expired
 * session's locks are recorded Abandoned, ours at shutdown Canceled, and
 * deleting the session row cascades to its work rows. */
struct session_housekeeping;
extern const struct session_housekeeping work_housekeeping;

/* Whether the server lacks what WORK_LOST_TO_OUTAGE reads (the error
 * names it): then it is used no more, and every expired session counts
 * against its items (logged once). Safe from any thread. */
int work_outage_rule_off(const char *error);
/* 1 until work_outage_rule_off switched the rule off. */
int work_outage_rule_on(void);

/* Input checks, so bad values fail before any SQL: */
int work_valid_uuid(const char *s);
int work_valid_process(const char *s);

#endif

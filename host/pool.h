/* pool.h -- the bounded libpq connection pool every thread shares.
 *
 * Connections are opened on demand up to a maximum. A thread that finds the
 * pool exhausted waits, for a bounded time, for one to come back. A
 * connection returned broken, or still inside a transaction, is closed
 * rather than reused, and an idle one whose server went away (restart,
 * pg_terminate_backend) is noticed and dropped before it is lent. The pool
 * knows what it has lent, so shutdown can cancel statements that would
 * otherwise wait forever. */
#ifndef BMDB_POOL_H
#define BMDB_POOL_H

#include <stddef.h>
#include <libpq-fe.h>

typedef struct pool pool;

/* conninfo is a libpq keyword string or URI; it is kept but never logged. */
pool *pool_create(const char *conninfo, int max_conns);
void pool_destroy(pool *p);
/* Raises the maximum (never lowers it): a worker script needs a connection
 * per slot on top of the host's own. */
void pool_grow(pool *p, int max_conns);
/* Connections lent out and idle now, for the metrics. */
void pool_stats(pool *p, int *in_use, int *idle);

/* Borrow a connection, waiting up to wait_s seconds (monotonic) while
 * every one is lent out; POOL_WAIT_S is what the host's callers wait. On
 * failure returns NULL and writes a one-line reason into err naming the
 * server (never the password). */
#define POOL_WAIT_S 30.0
PGconn *pool_get(pool *p, double wait_s, char *err, size_t errlen);
void pool_put(pool *p, PGconn *conn);

/* Tags a connection lent out now with its owner (a transaction's
 * session, or NULL: none; the tag goes when it comes back, see
 * pool_cut_owned) and returns its prepared-statement cache (prepared.h):
 * NULL for a connection the pool did not lend. */
struct prepared;
struct prepared *pool_lend_to(pool *p, PGconn *conn, const void *owner);

/* A connection of its own, outside the bound and the accounting, on the
 * pool's conninfo (the heartbeat: busy slots must never starve it). */
PGconn *pool_connect_own(pool *p, char *err, size_t errlen);

/* One statement on a connection of the caller's own (the heartbeat's, the
 * HTTP server's), waiting until `until` (monotonic seconds) at most. The
 * result, whatever its status, while the connection stays usable; NULL
 * with why set when no answer came in time or the connection broke: then
 * the connection has been closed and *cp is NULL (the next call's caller
 * opens another). */
PGresult *pool_exec_bounded(PGconn **cp, const char *sql, int n, const char *const *params,
                            double until, char *why, size_t whylen);
/* After a result of pool_exec_bounded that failed: its message into why,
 * and the connection given up if the failure broke it (a terminated
 * backend, a server restart) or came from a read-only standby (pqerr.h:
 * a new connection may reach the primary). */
void pool_result_failed(PGconn **cp, const PGresult *r, char *why, size_t whylen);
/* sqls in one SERIALIZABLE transaction on *cp, a connection of the
 * caller's own, each statement with the same params (COMMIT with none)
 * and bounded by until. 0, or -1 with why set (the transaction rolled
 * back, or the connection given up); the caller decides whether to retry.
 * rows_of_last, if not NULL, gets the rows the last statement affected. */
int pool_exec_transaction_bounded(PGconn **cp, const char *const *sqls, int nsql, const char *const *params,
                                  int nparams, double until, long *rows_of_last, char *why, size_t whylen);

/* Shutdown: asks the server to cancel whatever statement each lent
 * connection is running (a slot blocked on a lock returns with an error).
 * Returns at once: the requests go out from threads of their own, since
 * on a route that hangs they hang too (and pool_exec_bounded's likewise). */
void pool_cancel_lent(pool *p);
/* Shuts down the sockets of every connection lent to owner
 * (pool_lend_to): the session is lost, and a thread waiting in libpq on
 * one (a statement on a route that hangs) returns with a broken
 * connection instead of waiting for ever. */
void pool_cut_owned(pool *p, const void *owner);
/* Backend pids of the connections lent out now; returns how many (<= max).
 * Where libpq's pid is not the server's (a pooler answers: see
 * pool_detect_pooler), each connection asks the server its pid once, at
 * connect; behind a transaction pooler a connection has no backend of its
 * own, and none is given. */
int pool_lent_pids(pool *p, int *pids, int max);

/* What sits between the host and PostgreSQL. A pooler in transaction or
 * statement mode (pgbouncer's pool_mode=transaction) hands one server
 * connection to many clients in turn, so a statement prepared by one
 * client is another's, LISTEN lands on a backend nobody listens on, and
 * PQbackendPID is the pooler's number. POOLER_REFUSE (the default):
 * pool_detect_pooler looks for one, and the host refuses to start if it
 * finds one. POOLER_SESSION: the operator says there is none; nothing is
 * probed but whether the backend pids are the server's.
 * POOLER_TRANSACTION: every statement runs unnamed (the pool makes no
 * prepared.h cache), the listener does not LISTEN (idle slots poll), and
 * pool_lent_pids reports none (no backend is ended by pid). Set before
 * any thread starts; read-only after. */
typedef enum { POOLER_REFUSE, POOLER_SESSION, POOLER_TRANSACTION } pool_pooler;
void pool_set_pooler(pool_pooler mode);
int pool_transaction_pooled(void); /* mode is POOLER_TRANSACTION */

/* Once at start, before any thread, on two connections of its own: is
 * one server connection kept per client? First pg_backend_pid() is
 * compared with PQbackendPID: equal means no pooler in between (or one
 * that passes the server's pid on), and nothing more is asked. Else (a
 * pooler or proxy: pool_lent_pids asks the server), unless the
 * mode is POOLER_SESSION, a second connection opens a transaction while
 * the first asks again: in session mode the first keeps its backend and
 * the second has its own; a transaction pooler gives the second the
 * first's (idle) backend, or the first another one. 1 with what was seen
 * in seen when one server connection is not kept per client, 0 when it
 * is (or nothing could tell), -1 with seen set when no connection could
 * be made. Does nothing under POOLER_TRANSACTION. */
int pool_detect_pooler(pool *p, char *seen, size_t seenlen);

/* Connect outside the pool (the listener, one-shot commands). */
PGconn *pool_connect(const char *conninfo, char *err, size_t errlen);

#endif

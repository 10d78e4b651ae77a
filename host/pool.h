/* pool.h -- the bounded libpq connection pool every thread shares.
 *
 * Connections are opened on demand up to a maximum. A thread that finds the
 * pool exhausted waits for one to come back. A connection returned broken,
 * or still inside a transaction, is closed rather than reused. */
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

/* Borrow a connection. On failure returns NULL and writes a one-line
 * reason into err naming the server (never the password). */
PGconn *pool_get(pool *p, char *err, size_t errlen);
void pool_put(pool *p, PGconn *conn);

/* Connect outside the pool (the listener, one-shot commands). */
PGconn *pool_connect(const char *conninfo, char *err, size_t errlen);

/* "host=... port=... dbname=... user=..." of a connection, for messages. */
void pool_describe_conn(PGconn *conn, char *buf, size_t len);

#endif

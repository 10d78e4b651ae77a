/* connroom.h -- whether the server has room for this host's connections
 * and an operator's.
 *
 * A host whose pool can grow past the server's free connections takes
 * every one left, and an operator's `status` or `cancel` then cannot
 * connect. At start the host compares its pool with the server's room and
 * warns once; while it runs, a connection the server refuses for want of
 * room (SQLSTATE 53300) is said plainly, at a bounded rate. */
#ifndef BMDB_CONNROOM_H
#define BMDB_CONNROOM_H

#include <libpq-fe.h>

/* Connections an operator should find free beside the host's. */
#define CONNROOM_SPARE 3
/* How often, at most, a line about refused connections is repeated. */
#define CONNROOM_REPEAT_S 10.0

/* On c (one of the pool's, which has `pool_open` open now, c included):
 * reads max_connections, the reserved connections and the connections in
 * use, and warns once when a pool of pool_size (slots + loops + slack)
 * would leave fewer than CONNROOM_SPARE for anyone else. A server without
 * those settings (CockroachDB), or any failed read, is passed over in
 * silence. Returns 1 when it warned, else 0. */
int connroom_check(PGconn *c, int slots, int pool_size, int pool_open);

/* A connection attempt failed with why (pool.c's one-line reason): when
 * the server said it has no room (too many clients, reserved slots,
 * per-role or per-database limits), says so once, then at most once every
 * CONNROOM_REPEAT_S with the count since. Safe from any thread. */
void connroom_refused(const char *why);

#endif

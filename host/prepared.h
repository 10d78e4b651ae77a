/* prepared.h -- statements prepared once per connection.
 *
 * Unnamed statements are parsed and planned on every execution; the host
 * sends the same few statements for every work item, and a worker's own
 * select and commit statements repeat as often. A connection's cache maps
 * a statement's text to the name it was prepared under, so each is parsed
 * once per connection. The pool owns one cache per connection (a fresh
 * connection starts empty, so a reconnect re-prepares; behind a
 * transaction pooler it gives none, and everything runs unnamed: pool.h).
 * Not thread-safe: a cache is used only by the thread that holds its
 * connection. */
#ifndef BMDB_PREPARED_H
#define BMDB_PREPARED_H

#include <libpq-fe.h>

typedef struct prepared prepared;

prepared *prepared_new(void);
void prepared_free(prepared *pc);

/* The name sql is prepared under on c, preparing it now if needed; NULL
 * when it cannot be (no cache, full, or the PREPARE failed). For sending a
 * statement inside a pipeline, where a PREPARE's own answer cannot be
 * waited for. Call it only outside a transaction block, or with SQL known
 * to parse: a failed PREPARE aborts an open transaction. */
const char *prepared_name(prepared *pc, PGconn *c, const char *sql, int nparams);

/* prepared_name for a caller's own SQL: *cached says whether it was
 * prepared before, and a PREPARE the server refused comes back in *failed
 * (the caller PQclear()s it). NULL with *failed NULL: run it unnamed. A
 * statement prepared earlier that fails with 26000 (the server dropped
 * it: DISCARD ALL) or 0A000 ("cached plan must not change result type":
 * a migration changed the schema) means the cache no longer matches the
 * server: the caller forgets it (prepared_forget), and the statement, in
 * a new transaction, is prepared afresh and runs (tx.c). */
const char *prepared_lookup(prepared *pc, PGconn *c, const char *sql, int nparams, int *cached,
                            PGresult **failed);

/* Forget every statement (the server dropped them, or a schema change
 * invalidated a cached plan's result type); later ones get new names. */
void prepared_forget(prepared *pc);

#endif

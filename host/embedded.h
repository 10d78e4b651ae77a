/* embedded.h -- the embedded default database.
 *
 * With no --dsn and no BMDB_DSN the host runs PostgreSQL itself: a cluster
 * in data_dir, created on first use, listening on a Unix socket inside it
 * only. As root the server runs as an unprivileged user, since PostgreSQL
 * refuses root. Several hosts may share one data dir: the first starts the
 * server, the others join it, and the last one to leave stops it. */
#ifndef BMDB_EMBEDDED_H
#define BMDB_EMBEDDED_H

#include <stddef.h>

typedef struct embedded embedded;

/* Creates the cluster if data_dir has none, starts the server unless one
 * already runs there, and makes sure the database exists. On success
 * returns a handle and a malloc'd libpq conninfo in *conninfo. On failure
 * returns NULL with a one-line reason in err. */
embedded *embedded_open(const char *data_dir, char **conninfo, char *err, size_t errlen);

/* Leaves the cluster: stops the server if no other host uses it. */
void embedded_close(embedded *e);

#endif

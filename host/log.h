/* log.h -- one line per event, logfmt or JSON, safe from any thread.
 *
 * Callers pass a message and key/value string pairs; the module owns the
 * format, the level filter and the timestamp. Nothing here ever prints a
 * connection string: pool.c names a server by host, port, dbname and user. */
#ifndef BMDB_LOG_H
#define BMDB_LOG_H

#include <stddef.h>

typedef enum { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR } log_level;

void log_configure(log_level min_level, int json);
/* Parses "debug", "info", "warn", "error"; returns 0 on success. */
int log_parse_level(const char *name, log_level *out);
int log_enabled(log_level lvl);

/* log_kv(LOG_INFO, "work finished", "machine", id, "process", p, NULL) */
void log_kv(log_level lvl, const char *msg, ...);
/* The same with the pairs in an array: kv[0]=key, kv[1]=value, ... */
void log_kvv(log_level lvl, const char *msg, const char *const *kv, size_t npairs);

#endif

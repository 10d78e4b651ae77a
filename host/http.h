/* http.h -- the --http server: /metrics, the status page, /healthz.
 *
 * libmicrohttpd on threads of its own; nothing here is ever waited on by a
 * slot or the heartbeat. What it reads from the database goes over one
 * connection of its own, every statement bounded, so a slow scrape can
 * neither take a pooled connection from the slots nor hang a page. */
#ifndef BMDB_HTTP_H
#define BMDB_HTTP_H

#include <stddef.h>
#include "pool.h"

/* Parses ADDR: "PORT", ":PORT" and "localhost:PORT" mean 127.0.0.1;
 * "A.B.C.D:PORT" and "[V6]:PORT" are taken as written. Port 0 picks a
 * free one (the log line "http listening" names it). Starts serving;
 * 0, or -1 with err filled. */
/* Whether ADDR is one of those forms: 0, or -1 with err filled. */
int http_check_addr(const char *addr, char *err, size_t errlen);
int http_start(const char *addr, pool *p, const char *component, char *err, size_t errlen);
/* Stops serving and closes the connection; a no-op if not started. */
void http_stop(void);

#endif

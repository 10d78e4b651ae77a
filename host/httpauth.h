/* httpauth.h -- who may read the --http server: --http-auth, --http-open.
 *
 * The secret is read once, at start, from a file: a line with a ':' is
 * "user:password" (HTTP Basic), any other line a bearer token. Requests
 * are then checked against it in time that does not depend on how much of
 * the presented value matched. The secret is never written anywhere: not
 * in an error, not in a log line. Set up before the server starts and only
 * read afterwards, so the server's threads read it without a lock. */
#ifndef BMDB_HTTPAUTH_H
#define BMDB_HTTPAUTH_H

#include <stddef.h>

/* Reads the secret from path: its first line, without the line end (more
 * non-empty lines, an empty or unreadable file are errors naming the
 * file, never its content). 0, or -1 with err filled. */
int httpauth_load(const char *path, char *err, size_t errlen);
/* The paths left open while auth is on: a comma list of "healthz" and
 * "metrics". 0, or -1 with err filled. */
int httpauth_set_open(const char *list, char *err, size_t errlen);
/* Whether a secret was loaded. */
int httpauth_enabled(void);
/* Whether a request for url carrying this Authorization header value
 * (NULL: none) may be answered: always without a secret; with one, when
 * the url is left open or the header holds the secret. */
int httpauth_allows(const char *url, const char *authorization);
/* The WWW-Authenticate value a refusal carries. */
const char *httpauth_challenge(void);
/* Forgets the secret (zeroed). */
void httpauth_clear(void);

#endif

/* httpauth.c -- who may read the --http server: the secret of --http-auth
 * and the paths --http-open leaves open.
 *
 * Globals: written by httpauth_load and httpauth_set_open on the main
 * thread before the server starts, only read by the server's threads
 * afterwards (http_start happens after them), cleared after it stopped. */
#include "httpauth.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#define SECRET_MAX 4096

static enum { AUTH_NONE, AUTH_BEARER, AUTH_BASIC } mode;
static unsigned char secret[SECRET_MAX + 1]; /* the token, or "user:password" */
static size_t secret_len;
static int open_healthz, open_metrics;

int httpauth_load(const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "--http-auth %s: cannot read it: %s", path, strerror(errno));
        return -1;
    }
    unsigned char buf[SECRET_MAX + 64]; /* the line, its end, and room to see more */
    size_t n = fread(buf, 1, sizeof buf, f);
    int failed = ferror(f);
    fclose(f);
    int rc = -1;
    if (failed) {
        snprintf(err, errlen, "--http-auth %s: cannot read it", path);
        goto out;
    }
    size_t len = 0;
    while (len < n && buf[len] != '\n') len++;
    size_t line = len > 0 && buf[len - 1] == '\r' ? len - 1 : len;
    if (line > SECRET_MAX || n == sizeof buf) {
        snprintf(err, errlen, "--http-auth %s: longer than %d bytes", path, SECRET_MAX);
        goto out;
    }
    for (size_t i = len; i < n; i++)
        if (buf[i] != '\n' && buf[i] != '\r' && buf[i] != ' ' && buf[i] != '\t') {
            snprintf(err, errlen, "--http-auth %s: expected one line (a token, or user:password), got more", path);
            goto out;
        }
    if (line == 0) {
        snprintf(err, errlen, "--http-auth %s: is empty (expected a token, or user:password, on one line)", path);
        goto out;
    }
    for (size_t i = 0; i < line; i++)
        if (buf[i] < 0x20 || buf[i] == 0x7f) {
            snprintf(err, errlen, "--http-auth %s: holds a control character", path);
            goto out;
        }
    int basic = memchr(buf, ':', line) != NULL;
    if (basic && buf[0] == ':') {
        snprintf(err, errlen, "--http-auth %s: user:password with an empty user", path);
        goto out;
    }
    if (!basic && (memchr(buf, ' ', line) || memchr(buf, '\t', line))) {
        snprintf(err, errlen, "--http-auth %s: a bearer token cannot hold a space", path);
        goto out;
    }
    memcpy(secret, buf, line);
    secret[line] = '\0';
    secret_len = line;
    mode = basic ? AUTH_BASIC : AUTH_BEARER;
    rc = 0;
out:
    memset(buf, 0, sizeof buf);
    return rc;
}

int httpauth_set_open(const char *list, char *err, size_t errlen) {
    int healthz = 0, metrics = 0;
    const char *p = list;
    for (;;) {
        size_t n = strcspn(p, ",");
        if (n == 7 && !strncmp(p, "healthz", 7)) healthz = 1;
        else if (n == 7 && !strncmp(p, "metrics", 7)) metrics = 1;
        else {
            snprintf(err, errlen, "--http-open: expected healthz, metrics or healthz,metrics, got '%.*s'",
                     (int)(strlen(list) > 200 ? 200 : strlen(list)), list);
            return -1;
        }
        if (!p[n]) break;
        p += n + 1;
    }
    open_healthz = healthz, open_metrics = metrics;
    return 0;
}

int httpauth_enabled(void) { return mode != AUTH_NONE; }

const char *httpauth_challenge(void) {
    return mode == AUTH_BASIC ? "Basic realm=\"bmdb-host\", charset=\"UTF-8\"" : "Bearer realm=\"bmdb-host\"";
}

/* Whether got (got_len bytes) is the secret: the time taken depends on the
 * secret's length only, never on where the two differ. */
static int secret_equal(const unsigned char *got, size_t got_len) {
    unsigned diff = got_len != secret_len;
    for (size_t i = 0; i < secret_len; i++) diff |= (unsigned)(secret[i] ^ (i < got_len ? got[i] : 0));
    return diff == 0;
}

static int b64_value(unsigned char ch) {
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+') return 62;
    if (ch == '/') return 63;
    return -1;
}

/* Standard base64 (padding optional) into out; its length, or -1 when
 * s is not base64 or decodes to more than max bytes. */
static long b64_decode(const char *s, unsigned char *out, size_t max) {
    size_t n = 0;
    unsigned acc = 0;
    int bits = 0;
    for (; *s && *s != '='; s++) {
        int v = b64_value((unsigned char)*s);
        if (v < 0) return -1;
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (n >= max) return -1;
            out[n++] = (unsigned char)(acc >> bits);
        }
    }
    while (*s == '=') s++;
    return *s ? -1 : (long)n;
}

int httpauth_allows(const char *url, const char *authorization) {
    if (mode == AUTH_NONE) return 1;
    if ((open_healthz && !strcmp(url, "/healthz")) || (open_metrics && !strcmp(url, "/metrics"))) return 1;
    if (!authorization) return 0;
    const char *scheme = mode == AUTH_BASIC ? "Basic" : "Bearer";
    size_t sl = strlen(scheme);
    if (strncasecmp(authorization, scheme, sl) != 0 || (authorization[sl] != ' ' && authorization[sl] != '\t'))
        return 0;
    const char *v = authorization + sl;
    while (*v == ' ' || *v == '\t') v++;
    if (mode == AUTH_BEARER) return secret_equal((const unsigned char *)v, strlen(v));
    unsigned char plain[SECRET_MAX + 1];
    long n = b64_decode(v, plain, sizeof plain);
    int ok = n >= 0 && secret_equal(plain, (size_t)n);
    memset(plain, 0, sizeof plain);
    return ok;
}

void httpauth_clear(void) {
    memset(secret, 0, sizeof secret);
    secret_len = 0;
    mode = AUTH_NONE;
    open_healthz = open_metrics = 0;
}

/* log.c -- one line per event on stderr, logfmt (default) or JSON.
 *
 * A single mutex keeps lines whole when several worker threads log at once;
 * the line is built in a local buffer first so the lock is held only for
 * the write. */
#include "log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

/* Set by log_configure before any thread starts (main.c, core.open): read
 * without a lock after. log_lock keeps lines whole; it is the innermost
 * lock of all, since any code may log under its own (host/README.md). */
static log_level min_level = LOG_INFO;
static int json_format = 0;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *level_names[] = {"debug", "info", "warn", "error"};

void log_configure(log_level lvl, int json) {
    min_level = lvl;
    json_format = json;
}

int log_parse_level(const char *name, log_level *out) {
    for (int i = 0; i < 4; i++) {
        if (strcmp(name, level_names[i]) == 0) {
            *out = (log_level)i;
            return 0;
        }
    }
    return -1;
}

int log_enabled(log_level lvl) { return lvl >= min_level; }

/* One line, built before it is written. A line that would not fit is cut
 * at a field or at a character, never inside an escape or a UTF-8
 * sequence, and ends with truncated=true: the room for that marker and the
 * line's end ("}\n" in JSON) is kept back, so the line is always whole. */
#define LINE_MAX_BYTES 8192
#define LINE_RESERVE 32 /* > strlen("\",\"truncated\":true}\n") */

typedef struct {
    char buf[LINE_MAX_BYTES];
    size_t len;
    int truncated;
} line;

static int fits(const line *l, size_t n) { return l->len + n <= sizeof l->buf - LINE_RESERVE; }

/* Appends s whole, or nothing and marks the line truncated. */
static int put(line *l, const char *s, size_t n) {
    if (l->truncated || !fits(l, n)) {
        l->truncated = 1;
        return -1;
    }
    memcpy(l->buf + l->len, s, n);
    l->len += n;
    return 0;
}
static int puts_(line *l, const char *s) { return put(l, s, strlen(s)); }

/* The bytes of one character starting at s: an ASCII byte, or a UTF-8 lead
 * byte and the continuation bytes that follow it (invalid input passes
 * byte by byte, as it came). */
static size_t char_len(const unsigned char *s) {
    size_t want = *s >= 0xF0 ? 4 : *s >= 0xE0 ? 3 : *s >= 0xC0 ? 2 : 1, n = 1;
    while (n < want && (s[n] & 0xC0) == 0x80) n++;
    return n;
}

/* A quoted, escaped string. When it does not fit it is cut at a character
 * and still closed: the caller made room for both quotes, and every
 * character is written only if the closing quote still fits after it. */
static void put_json_string(line *l, const char *s) {
    put(l, "\"", 1);
    while (*s) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        const char *out = esc;
        size_t n, used = 1; /* bytes written, bytes of s consumed */
        if (c == '"' || c == '\\') esc[0] = '\\', esc[1] = (char)c, n = 2;
        else if (c == '\n') out = "\\n", n = 2;
        else if (c == '\t') out = "\\t", n = 2;
        else if (c < 0x20) n = (size_t)snprintf(esc, sizeof esc, "\\u%04x", c);
        else out = s, n = used = char_len((const unsigned char *)s);
        if (!fits(l, n + 1)) {
            l->truncated = 1;
            break;
        }
        put(l, out, n);
        s += used;
    }
    l->buf[l->len++] = '"';
}

/* logfmt quotes a value when it is empty or holds a space, quote or '='. */
static void put_logfmt_value(line *l, const char *s) {
    int quote = (*s == '\0');
    for (const char *p = s; *p && !quote; p++)
        if (*p == ' ' || *p == '"' || *p == '=' || (unsigned char)*p < 0x20) quote = 1;
    if (quote) {
        put_json_string(l, s); /* same escaping rules */
        return;
    }
    while (*s) { /* cut at a character, as put_json_string does */
        size_t n = char_len((const unsigned char *)s);
        if (put(l, s, n) < 0) return;
        s += n;
    }
}

/* A field goes in only if its key, separators and the value's quotes fit
 * (a key escapes to at most 6 bytes a byte); its value may then be cut.
 * After a cut, later fields are dropped. */
static void put_field(line *l, const char *key, const char *value, int first) {
    if (l->truncated) return;
    if (!fits(l, 6 * strlen(key) + 6)) { /* ,"key":"" */
        l->truncated = 1;
        return;
    }
    if (!value) value = "";
    if (json_format) {
        if (!first) put(l, ",", 1);
        put_json_string(l, key);
        put(l, ":", 1);
        put_json_string(l, value);
    } else {
        if (!first) put(l, " ", 1);
        puts_(l, key);
        put(l, "=", 1);
        put_logfmt_value(l, value);
    }
}

/* The line's end, always within LINE_RESERVE. */
static void put_end(line *l) {
    const char *end = !l->truncated ? (json_format ? "}\n" : "\n")
                      : (json_format ? ",\"truncated\":true}\n" : " truncated=true\n");
    size_t n = strlen(end);
    memcpy(l->buf + l->len, end, n);
    l->len += n;
}

void log_kvv(log_level lvl, const char *msg, const char *const *kv, size_t npairs) {
    if (!log_enabled(lvl)) return;
    struct timeval tv;
    struct tm tm;
    char ts[40];
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + n, sizeof ts - n, ".%03dZ", (int)(tv.tv_usec / 1000));

    line l;
    l.len = 0;
    l.truncated = 0;
    if (json_format) put(&l, "{", 1);
    put_field(&l, "time", ts, 1);
    put_field(&l, "level", level_names[lvl], 0);
    put_field(&l, "msg", msg, 0);
    for (size_t i = 0; i < npairs; i++) put_field(&l, kv[2 * i], kv[2 * i + 1], 0);
    put_end(&l);

    pthread_mutex_lock(&log_lock);
    fwrite(l.buf, 1, l.len, stderr);
    fflush(stderr);
    pthread_mutex_unlock(&log_lock);
}

void log_kv(log_level lvl, const char *msg, ...) {
    const char *kv[64];
    size_t n = 0;
    va_list ap;
    va_start(ap, msg);
    for (;;) {
        const char *k = va_arg(ap, const char *);
        if (!k || n >= 62) break;
        kv[n++] = k;
        kv[n++] = va_arg(ap, const char *);
    }
    va_end(ap);
    log_kvv(lvl, msg, kv, n / 2);
}

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

/* A growing line buffer that truncates instead of failing. */
typedef struct { char buf[8192]; size_t len; } line;

static void put(line *l, const char *s, size_t n) {
    if (l->len + n >= sizeof l->buf - 2) n = sizeof l->buf - 2 - l->len;
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}
static void puts_(line *l, const char *s) { put(l, s, strlen(s)); }

static void put_json_string(line *l, const char *s) {
    put(l, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') { esc[0] = '\\'; esc[1] = (char)c; put(l, esc, 2); }
        else if (c == '\n') put(l, "\\n", 2);
        else if (c == '\t') put(l, "\\t", 2);
        else if (c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", c); put(l, esc, 6); }
        else put(l, (const char *)&c, 1);
    }
    put(l, "\"", 1);
}

/* logfmt quotes a value when it is empty or holds a space, quote or '='. */
static void put_logfmt_value(line *l, const char *s) {
    int quote = (*s == '\0');
    for (const char *p = s; *p && !quote; p++)
        if (*p == ' ' || *p == '"' || *p == '=' || (unsigned char)*p < 0x20) quote = 1;
    if (!quote) { puts_(l, s); return; }
    put_json_string(l, s); /* same escaping rules */
}

static void put_field(line *l, const char *key, const char *value, int first) {
    if (json_format) {
        if (!first) put(l, ",", 1);
        put_json_string(l, key);
        put(l, ":", 1);
        put_json_string(l, value ? value : "");
    } else {
        if (!first) put(l, " ", 1);
        puts_(l, key);
        put(l, "=", 1);
        put_logfmt_value(l, value ? value : "");
    }
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
    if (json_format) put(&l, "{", 1);
    put_field(&l, "time", ts, 1);
    put_field(&l, "level", level_names[lvl], 0);
    put_field(&l, "msg", msg, 0);
    for (size_t i = 0; i < npairs; i++) put_field(&l, kv[2 * i], kv[2 * i + 1], 0);
    if (json_format) put(&l, "}", 1);
    put(&l, "\n", 1);

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

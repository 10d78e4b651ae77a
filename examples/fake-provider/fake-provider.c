/* fake-provider.c -- a stand-in for a bare-metal provider's HTTP API, for the
 * examples, the specs and the benchmarks (README.md beside this file lists
 * the flags and endpoints).
 *
 * One thread, one poll() loop, non-blocking sockets, HTTP/1.1 keep-alive
 * and pipelining, request bodies framed by Content-Length only. Delays
 * (--latency, /_sleep) are deadlines the loop's poll timeout honours, never
 * sleeps, so a delayed answer holds up nothing else. Answers on one
 * connection go out in request order: while one is delayed, the next
 * request waits in the buffer. Plain libc (Linux: signalfd, prctl). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEAD    8192          /* request line and headers; more is a 400 */
#define MAX_HEADERS 100
#define MAX_BODY    (16u << 20)   /* Content-Length above this is a 413 */
#define IN_LIMIT    (MAX_HEAD + MAX_BODY + 65536)
#define OUT_HIGH    (1u << 20)    /* read no new request while this much is unsent */
#define MAX_CONNS   4096
#define MAX_PATHS   10000         /* distinct paths /_stats counts one by one */
#define MAX_FIELD   256           /* a machine, an Idempotency-Key */

static const char JSON[] = "application/json", TEXT[] = "text/plain";

static void die(const char *what)
{
    fprintf(stderr, "fake-provider: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ------------------------------------------------------------ buffers */

struct buf { char *p; size_t len, cap; };

static void buf_reserve(struct buf *b, size_t extra)
{
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) die("realloc");
    b->p = p;
    b->cap = cap;
}

static void buf_add(struct buf *b, const void *s, size_t n)
{
    if (n == 0) return; /* s may be an empty buffer's NULL */
    buf_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_fmt(struct buf *b, const char *fmt, ...)
{
    for (size_t want = 128;;) {
        buf_reserve(b, want);
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) return;
        if ((size_t)n < b->cap - b->len) { b->len += n; return; }
        want = (size_t)n + 1;
    }
}

static void buf_free(struct buf *b) { free(b->p); b->p = NULL; b->len = b->cap = 0; }

/* Length of the valid UTF-8 sequence at s (at most n bytes), or 0. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t k;
    unsigned cp, min;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) { k = 2; cp = c & 0x1f; min = 0x80; }
    else if (c >= 0xe0 && c <= 0xef) { k = 3; cp = c & 0x0f; min = 0x800; }
    else if (c >= 0xf0 && c <= 0xf4) { k = 4; cp = c & 0x07; min = 0x10000; }
    else return 0;
    if (n < k) return 0;
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return k;
}

/* s as a JSON string. Bytes that are not UTF-8 become \u00XX (their
 * Latin-1 reading), so any request yields valid JSON. */
static void buf_json(struct buf *b, const char *s, size_t n)
{
    buf_reserve(b, n + 2);
    b->p[b->len++] = '"';
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t k = c >= 0x80 ? utf8_len((const unsigned char *)s + i, n - i) : 1;
        if (c == '"' || c == '\\') { buf_reserve(b, 2); b->p[b->len++] = '\\'; b->p[b->len++] = c; }
        else if (c == '\n') buf_add(b, "\\n", 2);
        else if (c == '\r') buf_add(b, "\\r", 2);
        else if (c == '\t') buf_add(b, "\\t", 2);
        else if (c < 0x20 || k == 0) buf_fmt(b, "\\u%04x", c);
        else { buf_add(b, s + i, k); i += k; continue; }
        i++;
    }
    buf_add(b, "\"", 1);
}

/* ------------------------------------------------------- a string map */

/* Strings to numbers, in insertion order: request counts by path, device
 * indices by Idempotency-Key. Open addressing, grown at half load. */
struct entry { char *key; size_t len; long long val; };
struct smap { struct entry *e; size_t n, ecap; int32_t *slot; size_t nslots; };

static uint32_t hash(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static void smap_grow(struct smap *m)
{
    size_t ns = m->nslots ? m->nslots * 2 : 64;
    int32_t *slot = malloc(ns * sizeof *slot);
    if (!slot) die("malloc");
    memset(slot, 0xff, ns * sizeof *slot);
    for (size_t i = 0; i < m->n; i++) {
        size_t j = hash(m->e[i].key, m->e[i].len) & (ns - 1);
        while (slot[j] >= 0) j = (j + 1) & (ns - 1);
        slot[j] = (int32_t)i;
    }
    free(m->slot);
    m->slot = slot;
    m->nslots = ns;
}

/* The value of key, or NULL; with create, a new entry (value 0) when absent. */
static long long *smap_get(struct smap *m, const char *key, size_t len, int create)
{
    if (m->nslots) {
        size_t j = hash(key, len) & (m->nslots - 1);
        for (; m->slot[j] >= 0; j = (j + 1) & (m->nslots - 1)) {
            struct entry *e = &m->e[m->slot[j]];
            if (e->len == len && memcmp(e->key, key, len) == 0) return &e->val;
        }
    }
    if (!create) return NULL;
    if ((m->n + 1) * 2 > m->nslots) smap_grow(m);
    if (m->n == m->ecap) {
        m->ecap = m->ecap ? m->ecap * 2 : 32;
        m->e = realloc(m->e, m->ecap * sizeof *m->e);
        if (!m->e) die("realloc");
    }
    struct entry *e = &m->e[m->n];
    if (!(e->key = malloc(len ? len : 1))) die("malloc");
    memcpy(e->key, key, len);
    e->len = len;
    e->val = 0;
    size_t j = hash(key, len) & (m->nslots - 1);
    while (m->slot[j] >= 0) j = (j + 1) & (m->nslots - 1);
    m->slot[j] = (int32_t)m->n++;
    return &e->val;
}

/* ------------------------------------------------------------- state */

struct device { char *machine; const char *state; };

static struct {
    long long latency_ms, fail_every;   /* --latency, --fail-every, /_config */
    long long provider_requests;        /* towards fail_every */
    long long requests, responses, closed, hanging, accepted;
    struct smap by_path, keys;
    struct device *dev;
    size_t ndev, devcap;
    FILE *log;
    struct buf body;                    /* the answer being built */
} g;

enum phase { P_READ, P_WAIT, P_HANG };

struct span { int off, len; };          /* into the request, from its start */
struct req {
    int parsed, minor, keep, expect, continued, head_only;
    size_t head, body;                  /* lengths of head and body */
    struct span method, path, query;    /* query.off < 0: none */
    int nh;
    struct { struct span name, value; } h[MAX_HEADERS]; /* last: parse_head clears what precedes it */
};

struct conn {
    int fd, dead;
    enum phase phase;
    struct buf in, out;
    size_t start;                       /* where the current request starts in `in` */
    size_t out_off;                     /* sent part of `out` */
    size_t gen_x;                       /* 'x' bytes still to append (/_bytes) */
    int close_after;                    /* close once everything is sent */
    int64_t due;                        /* P_WAIT: when to answer (monotonic ns) */
    int pstatus;                        /* P_WAIT: the answer */
    const char *pctype;
    size_t pgen;
    struct buf pbody;
    struct req r;
};

static struct conn *conns[MAX_CONNS];
static size_t nconns, max_conns = MAX_CONNS, nwaiting;

static const char *req_at(struct conn *c, struct span s) { return c->in.p + c->start + s.off; }

/* ------------------------------------------------------------- log */

/* One line per event: time, event, method, path (no query), status or -. */
static void log_event(struct conn *c, const char *event, int status)
{
    if (!g.log) return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    const char *m = "-", *p = "-";
    int ml = 1, pl = 1;
    if (c && c->r.parsed) {
        m = req_at(c, c->r.method); ml = c->r.method.len;
        p = req_at(c, c->r.path); pl = c->r.path.len;
    }
    char st[16] = "-";
    if (status) snprintf(st, sizeof st, "%d", status);
    fprintf(g.log, "%lld.%06ld %s %.*s %.*s %s\n", (long long)ts.tv_sec, ts.tv_nsec / 1000,
            event, ml, m, pl, p, st);
}

/* ------------------------------------------------------- connections */

static void conn_flush(struct conn *c);
static void conn_advance(struct conn *c);

static void conn_kill(struct conn *c, int by_client)
{
    if (c->dead) return;
    if (c->phase != P_READ && by_client) {
        log_event(c, "closed", 0);
        g.closed++;
    }
    if (c->phase == P_HANG) g.hanging--;
    if (c->phase == P_WAIT) nwaiting--;
    close(c->fd);
    c->dead = 1;
}

static const char *reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Status";
    }
}

/* Queues the answer to the current request, logs it and moves past the
 * request; gen is a count of 'x' bytes that follow body. */
static void answer(struct conn *c, int status, const char *ctype, const char *body, size_t len, size_t gen)
{
    struct req *r = &c->r;
    int bodiless = status == 204 || status == 304;
    const char *conn_hdr = !r->keep ? "Connection: close\r\n"
                         : r->minor == 0 ? "Connection: keep-alive\r\n" : "";
    if (bodiless)
        buf_fmt(&c->out, "HTTP/1.1 %d %s\r\n%s\r\n", status, reason(status), conn_hdr);
    else
        buf_fmt(&c->out, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s\r\n",
                status, reason(status), ctype, len + gen, conn_hdr);
    if (!bodiless && !r->head_only) {
        buf_add(&c->out, body, len);
        c->gen_x = gen;
    }
    g.responses++;
    log_event(c, "response", status);
    if (!r->keep) c->close_after = 1;
    c->start += r->head + r->body;
    r->parsed = 0;
    c->phase = P_READ;
    conn_flush(c);
}

/* An answer to a request that cannot be read (bad head, unframed body):
 * the connection closes after it, as its next request cannot be found. */
static void refuse(struct conn *c, int status, const char *why)
{
    g.body.len = 0;
    buf_str(&g.body, "{\"error\":");
    buf_json(&g.body, why, strlen(why));
    buf_str(&g.body, "}");
    c->r.keep = 0;
    c->r.head_only = 0;
    c->r.head = c->in.len - c->start; /* discard whatever came */
    c->r.body = 0;
    answer(c, status, JSON, g.body.p, g.body.len, 0);
}

static void conn_flush(struct conn *c)
{
    for (;;) {
        if (c->out_off == c->out.len) {
            c->out.len = c->out_off = 0;
            if (c->gen_x == 0) break;
            size_t k = c->gen_x < 65536 ? c->gen_x : 65536;
            buf_reserve(&c->out, k);
            memset(c->out.p, 'x', k);
            c->out.len = k;
            c->gen_x -= k;
        }
        ssize_t n = send(c->fd, c->out.p + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) { c->out_off += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        conn_kill(c, 1);
        return;
    }
    if (c->close_after) conn_kill(c, 0);
}

/* Reads what the socket has. Returns 1 when the peer closed (or reset). */
static int conn_read(struct conn *c)
{
    for (;;) {
        size_t pending = c->in.len - c->start;
        if (pending == 0) c->in.len = c->start = 0;
        if (pending >= IN_LIMIT) return 0;
        if (c->start && c->in.cap - c->in.len < 4096) {
            memmove(c->in.p, c->in.p + c->start, pending);
            c->in.len = pending;
            c->start = 0;
        }
        buf_reserve(&c->in, 4096);
        size_t room = c->in.cap - c->in.len;
        if (room > IN_LIMIT - pending) room = IN_LIMIT - pending;
        ssize_t n = recv(c->fd, c->in.p + c->in.len, room, 0);
        if (n > 0) {
            c->in.len += (size_t)n;
            if ((size_t)n < room) return 0;
            continue;
        }
        if (n == 0) return 1;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        return 1;
    }
}

/* ---------------------------------------------------------- parsing */

static int is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static int span_is(struct conn *c, struct span s, const char *lit)
{
    size_t n = strlen(lit);
    return (size_t)s.len == n && memcmp(req_at(c, s), lit, n) == 0;
}

/* Does the comma-separated list in s hold token tok (case-insensitive)? */
static int has_token(const char *s, size_t n, const char *tok)
{
    size_t tl = strlen(tok);
    for (size_t i = 0; i < n;) {
        while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == ',')) i++;
        size_t j = i;
        while (j < n && s[j] != ',') j++;
        size_t e = j;
        while (e > i && (s[e - 1] == ' ' || s[e - 1] == '\t')) e--;
        if (e - i == tl && strncasecmp(s + i, tok, tl) == 0) return 1;
        i = j;
    }
    return 0;
}

/* Parses the head (head bytes, ending in CRLF CRLF) of the request at
 * c->start. Returns 0, or a status to refuse it with and sets *why. */
static int parse_head(struct conn *c, size_t head, const char **why)
{
    struct req *r = &c->r;
    char *R = c->in.p + c->start, *end = R + head - 2, *p = R;
    memset(r, 0, offsetof(struct req, h)); /* the header table is filled as far as nh says */
    r->head = head;
    r->query.off = -1;

    char *eol = memchr(p, '\n', end - p);
    char *le = eol > p && eol[-1] == '\r' ? eol - 1 : eol;
    char *sp1 = memchr(p, ' ', le - p);
    char *sp2 = sp1 ? memchr(sp1 + 1, ' ', le - sp1 - 1) : NULL;
    *why = "malformed request line";
    if (!sp1 || !sp2 || sp1 == p || sp1 - p > 32 || sp2 == sp1 + 1 || sp1[1] != '/') return 400;
    for (char *q = p; q < sp1; q++) if (!is_tchar(*q)) return 400;
    for (char *q = sp1 + 1; q < sp2; q++) if ((unsigned char)*q <= 0x20 || *q == 0x7f) return 400;
    r->method = (struct span){ 0, (int)(sp1 - p) };
    char *qm = memchr(sp1 + 1, '?', sp2 - sp1 - 1);
    char *pe = qm ? qm : sp2;
    r->path = (struct span){ (int)(sp1 + 1 - R), (int)(pe - sp1 - 1) };
    if (qm) r->query = (struct span){ (int)(qm + 1 - R), (int)(sp2 - qm - 1) };
    if (le - sp2 - 1 != 8 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0) return 400;
    if (sp2[8] != '0' && sp2[8] != '1') { *why = "only HTTP/1.0 and HTTP/1.1"; return 505; }
    r->minor = sp2[8] - '0';

    int close = 0, keepalive = 0, have_len = 0;
    for (p = eol + 1; p < end; p = eol + 1) {
        eol = memchr(p, '\n', end - p + 1);
        le = eol > p && eol[-1] == '\r' ? eol - 1 : eol;
        if (le == p) break;
        *why = "malformed header";
        if (*p == ' ' || *p == '\t') return 400; /* obsolete line folding */
        char *colon = memchr(p, ':', le - p);
        if (!colon || colon == p) return 400;
        for (char *q = p; q < colon; q++) {
            if (!is_tchar(*q)) return 400;
            if (*q >= 'A' && *q <= 'Z') *q += 'a' - 'A';
        }
        char *v = colon + 1, *ve = le;
        while (v < ve && (*v == ' ' || *v == '\t')) v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        if (r->nh == MAX_HEADERS) { *why = "too many headers"; return 400; }
        r->h[r->nh].name = (struct span){ (int)(p - R), (int)(colon - p) };
        r->h[r->nh].value = (struct span){ (int)(v - R), (int)(ve - v) };
        r->nh++;
        size_t nl = colon - p, vl = ve - v;
        if (nl == 14 && memcmp(p, "content-length", 14) == 0) {
            unsigned long long n = 0;
            if (vl == 0 || vl > 12) return 400;
            for (char *q = v; q < ve; q++) {
                if (*q < '0' || *q > '9') return 400;
                n = n * 10 + (*q - '0');
            }
            if (have_len && n != r->body) return 400;
            if (n > MAX_BODY) { *why = "body too large"; return 413; }
            r->body = n;
            have_len = 1;
        } else if (nl == 17 && memcmp(p, "transfer-encoding", 17) == 0) {
            *why = "chunked request bodies are not supported: send Content-Length";
            return 411;
        } else if (nl == 10 && memcmp(p, "connection", 10) == 0) {
            close |= has_token(v, vl, "close");
            keepalive |= has_token(v, vl, "keep-alive");
        } else if (nl == 6 && memcmp(p, "expect", 6) == 0) {
            if (vl != 12 || strncasecmp(v, "100-continue", 12) != 0) { *why = "unknown expectation"; return 417; }
            r->expect = 1;
        }
    }
    r->keep = r->minor == 1 ? !close : keepalive && !close;
    r->head_only = span_is(c, r->method, "HEAD");
    r->parsed = 1;
    return 0;
}

/* The integer value of name in the query string, or -1 when absent or
 * not a number (0 .. 10^15). */
static long long query_int(struct conn *c, const char *name)
{
    if (c->r.query.off < 0) return -1;
    const char *q = req_at(c, c->r.query), *e = q + c->r.query.len;
    size_t nl = strlen(name);
    while (q < e) {
        const char *amp = memchr(q, '&', e - q);
        if (!amp) amp = e;
        if ((size_t)(amp - q) > nl && memcmp(q, name, nl) == 0 && q[nl] == '=') {
            const char *v = q + nl + 1;
            if (v == amp || amp - v > 15) return -1;
            long long n = 0;
            for (; v < amp; v++) {
                if (*v < '0' || *v > '9') return -1;
                n = n * 10 + (*v - '0');
            }
            return n;
        }
        q = amp + 1;
    }
    return -1;
}

/* The value of the first header name (lower case), or NULL. */
static const char *header(struct conn *c, const char *name, int *len)
{
    for (int i = 0; i < c->r.nh; i++)
        if (span_is(c, c->r.h[i].name, name)) {
            *len = c->r.h[i].value.len;
            return req_at(c, c->r.h[i].value);
        }
    return NULL;
}

/* Finds "key" followed by a colon in a JSON text and returns what follows
 * the colon (spaces skipped), or NULL. A minimal scan, no parser: the
 * bodies it reads are the examples' and the specs' own. */
static const char *json_field(const char *s, size_t n, const char *key)
{
    size_t kl = strlen(key);
    const char *e = s + n;
    for (const char *p = s; (p = memmem(p, e - p, key, kl)) != NULL; p += kl) {
        if (p == s || p[-1] != '"' || p + kl >= e || p[kl] != '"') continue;
        const char *q = p + kl + 1;
        while (q < e && (*q == ' ' || *q == '\t' || *q == '\r' || *q == '\n')) q++;
        if (q == e || *q != ':') continue;
        q++;
        while (q < e && (*q == ' ' || *q == '\t' || *q == '\r' || *q == '\n')) q++;
        return q;
    }
    return NULL;
}

/* The JSON string value of key, still escaped (so it can be written back
 * as it is), in *out / *len; 0 when there is none or it holds raw control
 * characters. */
static int json_string(const char *s, size_t n, const char *key, const char **out, size_t *len)
{
    const char *e = s + n, *q = json_field(s, n, key);
    if (!q || q >= e || *q != '"') return 0;
    const char *v = ++q;
    for (; q < e && *q != '"'; q++) {
        if ((unsigned char)*q < 0x20) return 0;
        if (*q == '\\' && ++q == e) return 0;
    }
    if (q >= e) return 0;
    *out = v;
    *len = q - v;
    return 1;
}

/* The non-negative integer value of key: 1, 0 when absent, -1 when bad. */
static int json_int(const char *s, size_t n, const char *key, long long *out)
{
    const char *e = s + n, *q = json_field(s, n, key);
    if (!q) return 0;
    long long v = 0;
    const char *d = q;
    for (; q < e && *q >= '0' && *q <= '9' && q - d < 15; q++) v = v * 10 + (*q - '0');
    if (q == d || (q < e && *q >= '0' && *q <= '9')) return -1;
    *out = v;
    return 1;
}

/* ------------------------------------------------------------ routes */

struct reply {
    int status, hang;
    const char *ctype;
    long long delay_ms;
    size_t gen;
};

static void error_body(struct reply *rep, int status, const char *msg)
{
    rep->status = status;
    g.body.len = 0;
    buf_str(&g.body, "{\"error\":");
    buf_json(&g.body, msg, strlen(msg));
    buf_str(&g.body, "}");
}

static void device_json(size_t i)
{
    buf_fmt(&g.body, "{\"id\":\"dev-%zu\",\"machine\":\"%s\",\"state\":\"%s\"}",
            i + 1, g.dev[i].machine, g.dev[i].state);
}

/* "dev-<n>" naming an existing device: its index, or -1. */
static long device_index(const char *s, size_t n)
{
    if (n < 5 || n > 20 || memcmp(s, "dev-", 4) != 0 || s[4] == '0') return -1;
    size_t v = 0;
    for (size_t i = 4; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v >= 1 && v <= g.ndev ? (long)(v - 1) : -1;
}

static void create_device(struct conn *c, struct reply *rep)
{
    const char *body = c->in.p + c->start + c->r.head;
    int kl = 0;
    const char *key = header(c, "idempotency-key", &kl);
    long long *known = NULL;
    if (key) {
        if (kl == 0 || kl > MAX_FIELD) return error_body(rep, 400, "bad Idempotency-Key");
        if ((known = smap_get(&g.keys, key, kl, 0)) != NULL) {
            device_json((size_t)*known);
            return;
        }
    }
    const char *m;
    size_t ml;
    if (!json_string(body, c->r.body, "machine", &m, &ml) || ml == 0 || ml > MAX_FIELD)
        return error_body(rep, 400, "the body has no \"machine\" string");
    if (g.ndev == g.devcap) {
        g.devcap = g.devcap ? g.devcap * 2 : 64;
        if (!(g.dev = realloc(g.dev, g.devcap * sizeof *g.dev))) die("realloc");
    }
    struct device *d = &g.dev[g.ndev];
    if (!(d->machine = strndup(m, ml))) die("strndup");
    d->state = "provisioning";
    if (key) *smap_get(&g.keys, key, kl, 1) = (long long)g.ndev;
    g.ndev++;
    rep->status = 201;
    device_json(g.ndev - 1);
}

/* The provider's API: /devices and below. */
static void provider(struct conn *c, struct reply *rep)
{
    const char *p = req_at(c, c->r.path);
    size_t pl = c->r.path.len;
    int get = span_is(c, c->r.method, "GET") || c->r.head_only, post = span_is(c, c->r.method, "POST");
    rep->delay_ms = g.latency_ms;
    g.provider_requests++;
    if (g.fail_every > 0 && g.provider_requests % g.fail_every == 0)
        return error_body(rep, 503, "provider unavailable");
    if (pl == 8) {
        if (post) return create_device(c, rep);
        if (!get) return error_body(rep, 405, "method not allowed");
        buf_str(&g.body, "{\"devices\":[");
        for (size_t i = 0; i < g.ndev; i++) {
            if (i) buf_str(&g.body, ",");
            device_json(i);
        }
        buf_str(&g.body, "]}");
        return;
    }
    const char *id = p + 9, *slash = memchr(id, '/', p + pl - id);
    size_t idl = slash ? (size_t)(slash - id) : (size_t)(p + pl - id);
    long i = device_index(id, idl);
    if (!slash) {
        if (!get) return error_body(rep, 405, "method not allowed");
        if (i < 0) return error_body(rep, 404, "no such device");
        return device_json((size_t)i);
    }
    if ((size_t)(p + pl - slash) != 7 || memcmp(slash, "/reboot", 7) != 0)
        return error_body(rep, 404, "not found");
    if (!post) return error_body(rep, 405, "method not allowed");
    if (i < 0) return error_body(rep, 404, "no such device");
    g.dev[i].state = "rebooting";
    buf_fmt(&g.body, "{\"id\":\"dev-%ld\",\"state\":\"rebooting\"}", i + 1);
}

static void stats(void)
{
    buf_fmt(&g.body, "{\"requests\":%lld,\"responses\":%lld,\"closed\":%lld,\"hanging\":%lld,"
            "\"devices\":%zu,\"connections\":%zu,\"accepted\":%lld,\"latency_ms\":%lld,"
            "\"fail_every\":%lld,\"by_path\":{",
            g.requests, g.responses, g.closed, g.hanging, g.ndev, nconns, g.accepted,
            g.latency_ms, g.fail_every);
    for (size_t i = 0; i < g.by_path.n; i++) {
        if (i) buf_str(&g.body, ",");
        buf_json(&g.body, g.by_path.e[i].key, g.by_path.e[i].len);
        buf_fmt(&g.body, ":%lld", g.by_path.e[i].val);
    }
    buf_str(&g.body, "}}");
}

static void config(struct conn *c, struct reply *rep)
{
    if (!span_is(c, c->r.method, "GET") && !c->r.head_only) {
        const char *body = c->in.p + c->start + c->r.head;
        long long lat = g.latency_ms, fail = g.fail_every;
        int a = json_int(body, c->r.body, "latency_ms", &lat);
        int b = json_int(body, c->r.body, "fail_every", &fail);
        if (a < 0 || b < 0 || (a == 0 && b == 0) || lat > 3600000)
            return error_body(rep, 400, "expected {\"latency_ms\": N, \"fail_every\": N}, either or both");
        g.latency_ms = lat;
        if (b) { g.fail_every = fail; g.provider_requests = 0; }
    }
    buf_fmt(&g.body, "{\"latency_ms\":%lld,\"fail_every\":%lld}", g.latency_ms, g.fail_every);
}

static void echo(struct conn *c)
{
    struct req *r = &c->r;
    buf_str(&g.body, "{\"method\":");
    buf_json(&g.body, req_at(c, r->method), r->method.len);
    buf_str(&g.body, ",\"path\":");
    buf_json(&g.body, req_at(c, r->path), r->path.len);
    buf_str(&g.body, ",\"query\":");
    buf_json(&g.body, r->query.off < 0 ? "" : req_at(c, r->query), r->query.off < 0 ? 0 : r->query.len);
    buf_str(&g.body, ",\"headers\":{");
    /* a header sent more than once: its values joined by ", ", at its first place */
    int first = 1;
    for (int i = 0; i < r->nh; i++) {
        int seen = 0;
        for (int j = 0; j < i && !seen; j++)
            seen = r->h[j].name.len == r->h[i].name.len &&
                   memcmp(req_at(c, r->h[j].name), req_at(c, r->h[i].name), r->h[i].name.len) == 0;
        if (seen) continue;
        struct buf v = { 0 };
        for (int j = i; j < r->nh; j++) {
            if (r->h[j].name.len != r->h[i].name.len ||
                memcmp(req_at(c, r->h[j].name), req_at(c, r->h[i].name), r->h[i].name.len) != 0) continue;
            if (v.len) buf_add(&v, ", ", 2);
            buf_add(&v, req_at(c, r->h[j].value), r->h[j].value.len);
        }
        if (!first) buf_str(&g.body, ",");
        first = 0;
        buf_json(&g.body, req_at(c, r->h[i].name), r->h[i].name.len);
        buf_str(&g.body, ":");
        buf_json(&g.body, v.len ? v.p : "", v.len);
        buf_free(&v);
    }
    buf_str(&g.body, "},\"body\":");
    buf_json(&g.body, c->in.p + c->start + r->head, r->body);
    /* the client's port: a client that keeps its connection alive shows one */
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    int port = getpeername(c->fd, (struct sockaddr *)&peer, &plen) == 0 ? ntohs(peer.sin_port) : 0;
    buf_fmt(&g.body, ",\"peer_port\":%d}", port);
}

static void route(struct conn *c, struct reply *rep)
{
    struct span p = c->r.path;
    const char *s = req_at(c, p);
    if (p.len >= 8 && memcmp(s, "/devices", 8) == 0 && (p.len == 8 || (p.len > 9 && s[8] == '/')))
        return provider(c, rep);
    if (span_is(c, p, "/_ping")) {
        buf_str(&g.body, "{}");
    } else if (span_is(c, p, "/_stats")) {
        stats();
    } else if (span_is(c, p, "/_config")) {
        config(c, rep);
    } else if (span_is(c, p, "/_hang")) {
        rep->hang = 1;
    } else if (span_is(c, p, "/_sleep")) {
        long long ms = query_int(c, "ms");
        if (ms < 0 || ms > 3600000) return error_body(rep, 400, "expected ?ms=N (0 to 3600000)");
        rep->delay_ms = ms;
        buf_str(&g.body, "{}");
    } else if (span_is(c, p, "/_echo")) {
        echo(c);
    } else if (span_is(c, p, "/_bytes")) {
        long long n = query_int(c, "n");
        if (n < 0 || n > (1ll << 30)) return error_body(rep, 400, "expected ?n=N (0 to 2^30)");
        rep->ctype = TEXT;
        rep->gen = (size_t)n;
    } else if (span_is(c, p, "/_status")) {
        long long code = query_int(c, "code");
        if (code < 200 || code > 599) return error_body(rep, 400, "expected ?code=N (200 to 599)");
        rep->status = (int)code;
        buf_fmt(&g.body, "{\"status\":%lld}", code);
    } else if (span_is(c, p, "/_text")) {
        buf_str(&g.body, "not json");
    } else {
        error_body(rep, 404, "not found");
    }
}

/* A whole request is in: count it, log it, answer it now, later or never. */
static void dispatch(struct conn *c)
{
    g.requests++;
    long long *n = smap_get(&g.by_path, req_at(c, c->r.path), c->r.path.len, g.by_path.n < MAX_PATHS);
    if (!n) n = smap_get(&g.by_path, "(other)", 7, 1);
    (*n)++;
    log_event(c, "request", 0);
    struct reply rep = { .status = 200, .ctype = JSON };
    g.body.len = 0;
    route(c, &rep);
    if (rep.hang) {
        c->phase = P_HANG;
        g.hanging++;
        log_event(c, "hang", 0);
    } else if (rep.delay_ms > 0) {
        c->phase = P_WAIT;
        c->due = mono_ns() + rep.delay_ms * 1000000;
        c->pstatus = rep.status;
        c->pctype = rep.ctype;
        c->pgen = rep.gen;
        c->pbody.len = 0;
        buf_add(&c->pbody, g.body.p, g.body.len);
        nwaiting++;
    } else {
        answer(c, rep.status, rep.ctype, g.body.p, g.body.len, rep.gen);
    }
}

/* Reads and answers the requests buffered on c, as far as it may: not
 * past a delayed or hanging one, not while much output is unsent. */
static void conn_advance(struct conn *c)
{
    while (!c->dead && c->phase == P_READ && !c->close_after && c->gen_x == 0 &&
           c->out.len - c->out_off < OUT_HIGH) {
        if (!c->r.parsed) {
            while (c->in.len - c->start >= 2 && c->in.p[c->start] == '\r' && c->in.p[c->start + 1] == '\n')
                c->start += 2; /* empty lines before a request are allowed */
            size_t avail = c->in.len - c->start;
            if (avail == 0) return;
            char *end = memmem(c->in.p + c->start, avail < MAX_HEAD ? avail : MAX_HEAD, "\r\n\r\n", 4);
            if (!end) {
                if (avail >= MAX_HEAD) refuse(c, 400, "request head too large");
                return;
            }
            const char *why = NULL;
            int st = parse_head(c, end + 4 - (c->in.p + c->start), &why);
            if (st) {
                c->r.parsed = st != 400; /* method and path are known for the log */
                refuse(c, st, why);
                return;
            }
        }
        if (c->in.len - c->start < c->r.head + c->r.body) {
            if (c->r.expect && !c->r.continued) {
                c->r.continued = 1;
                buf_str(&c->out, "HTTP/1.1 100 Continue\r\n\r\n");
                conn_flush(c);
            }
            return;
        }
        dispatch(c);
    }
}

/* ------------------------------------------------------------- main */

static void usage(FILE *f)
{
    fputs("usage: fake-provider [--port N] [--host 127.0.0.1] [--latency MS] [--fail-every N]\n"
          "                     [--log FILE] [--die-with-parent]\n", f);
}

static long long number(const char *s, const char *flag, long long max)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < 0 || v > max) {
        fprintf(stderr, "fake-provider: %s wants a number from 0 to %lld, not \"%s\"\n", flag, max, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *logpath = NULL;
    int port = 0, die_with_parent = 0;
    pid_t parent = getppid();
    static const struct option opts[] = {
        { "port", required_argument, 0, 'p' }, { "host", required_argument, 0, 'H' },
        { "latency", required_argument, 0, 'l' }, { "fail-every", required_argument, 0, 'f' },
        { "log", required_argument, 0, 'L' }, { "die-with-parent", no_argument, 0, 'd' },
        { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    for (int o; (o = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (o) {
        case 'p': port = (int)number(optarg, "--port", 65535); break;
        case 'H': host = optarg; break;
        case 'l': g.latency_ms = number(optarg, "--latency", 3600000); break;
        case 'f': g.fail_every = number(optarg, "--fail-every", 1000000000); break;
        case 'L': logpath = optarg; break;
        case 'd': die_with_parent = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) { usage(stderr); return 2; }

    /* Signals arrive on a descriptor the loop polls; blocked before the
     * parent-death signal is asked for, so it cannot kill us unhandled. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    if (sigprocmask(SIG_BLOCK, &sigs, NULL) != 0) die("sigprocmask");
    int sfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) die("signalfd");
    signal(SIGPIPE, SIG_IGN);
    if (die_with_parent) {
        if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) die("prctl");
        if (getppid() != parent) return 0; /* it died before we asked */
    }

    struct in_addr addr;
    if (inet_pton(AF_INET, host, &addr) != 1 || (ntohl(addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "fake-provider: --host must be a loopback IPv4 address (127.x.x.x), not \"%s\"\n", host);
        return 2;
    }
    if (logpath) {
        if (!(g.log = fopen(logpath, "a"))) die(logpath);
        setvbuf(g.log, NULL, _IOLBF, 0);
    }

    /* Room for the connections: raise the descriptor limit to its hard
     * limit, and accept no more than it leaves. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        if (rl.rlim_cur < rl.rlim_max) {
            rl.rlim_cur = rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
            getrlimit(RLIMIT_NOFILE, &rl);
        }
        if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < MAX_CONNS + 16)
            max_conns = rl.rlim_cur > 32 ? rl.rlim_cur - 16 : 16;
    }

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port), .sin_addr = addr };
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) != 0) die("bind");
    if (listen(lfd, 1024) != 0) die("listen");
    socklen_t sl = sizeof sa;
    if (getsockname(lfd, (struct sockaddr *)&sa, &sl) != 0) die("getsockname");
    printf("listening on %s:%d\n", host, ntohs(sa.sin_port));
    fflush(stdout);

    static struct pollfd pfd[MAX_CONNS + 2];
    int64_t accept_pause = 0; /* out of descriptors: retry accept after this */
    for (;;) {
        int64_t now = mono_ns();
        pfd[0] = (struct pollfd){ .fd = sfd, .events = POLLIN };
        pfd[1] = (struct pollfd){ .fd = lfd, .events = nconns < max_conns && now >= accept_pause ? POLLIN : 0 };
        int timeout = -1;
        if (accept_pause > now) timeout = (int)((accept_pause - now + 999999) / 1000000);
        for (size_t i = 0; i < nconns; i++) {
            struct conn *c = conns[i];
            short ev = 0;
            if (c->out_off < c->out.len || c->gen_x) ev |= POLLOUT;
            if (!c->close_after && c->in.len - c->start < IN_LIMIT) ev |= POLLIN;
            if (c->phase != P_READ) ev |= POLLRDHUP;
            if (c->phase == P_WAIT) {
                int64_t left = c->due > now ? (c->due - now + 999999) / 1000000 : 0;
                if (timeout < 0 || left < timeout) timeout = (int)left;
            }
            pfd[i + 2] = (struct pollfd){ .fd = c->fd, .events = ev };
        }
        int n = poll(pfd, nconns + 2, timeout);
        if (n < 0 && errno != EINTR) die("poll");

        if (n > 0 && pfd[0].revents) break; /* SIGTERM, SIGINT */

        size_t polled = nconns;
        for (size_t i = 0; n > 0 && i < polled; i++) {
            struct conn *c = conns[i];
            short re = pfd[i + 2].revents;
            if (!re || c->dead) continue;
            if (re & POLLOUT) {
                conn_flush(c);
                if (!c->dead) conn_advance(c);
            }
            if (c->dead) continue;
            if (re & (POLLIN | POLLHUP | POLLERR | POLLRDHUP)) {
                int eof = (re & POLLIN) || !(re & POLLRDHUP) ? conn_read(c) : 1;
                if (c->phase == P_READ) conn_advance(c);
                /* The client is gone: an unanswered request was aborted;
                 * answers already queued are still sent if they can be. */
                if (eof && !c->dead) {
                    if (c->phase != P_READ) conn_kill(c, 1);
                    else if (c->out_off == c->out.len && !c->gen_x) conn_kill(c, 0);
                    else c->close_after = 1;
                }
            }
        }

        if (nwaiting) {
            now = mono_ns();
            for (size_t i = 0; i < nconns; i++) {
                struct conn *c = conns[i];
                if (c->dead || c->phase != P_WAIT || c->due > now) continue;
                nwaiting--;
                answer(c, c->pstatus, c->pctype, c->pbody.p, c->pbody.len, c->pgen);
                conn_advance(c);
            }
        }

        for (size_t i = 0; i < nconns;) {
            if (!conns[i]->dead) { i++; continue; }
            buf_free(&conns[i]->in);
            buf_free(&conns[i]->out);
            buf_free(&conns[i]->pbody);
            free(conns[i]);
            conns[i] = conns[--nconns];
        }

        if (n > 0 && pfd[1].revents) {
            while (nconns < max_conns) {
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) {
                    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                        accept_pause = mono_ns() + 100000000;
                    break;
                }
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                struct conn *c = calloc(1, sizeof *c);
                if (!c) die("calloc");
                c->fd = fd;
                conns[nconns++] = c;
                g.accepted++;
            }
        }
    }

    for (size_t i = 0; i < nconns; i++) close(conns[i]->fd);
    close(lfd);
    if (g.log) fclose(g.log);
    return 0;
}

/* lhttp.c -- bmdb.http's transport: one HTTP request of a slot, on
 * libcurl, that stops with the slot's lock.
 *
 * Each thread keeps one multi handle and one easy handle for its life, so
 * a slot's requests reuse their connections (keep-alive: the connection
 * cache lives in the multi handle) across items and reloads. A request
 * runs under an iofence (iofence.h): curl_multi_poll waits on the
 * transfer's sockets and on the fence's eventfd, with a timeout no later
 * than the call's nearest deadline. When the fence says stop, the handle
 * is removed from the multi handle at once, which closes an unfinished
 * transfer's connection: the server sees it closed within one wake-up,
 * not at the next poll of a loop. Nothing is sent unless iofence_begin
 * said go.
 *
 * Lua (lua/bmdb/http.lua) checks the options, encodes JSON and decodes
 * the answer; this file takes a normalized request table and returns
 * {status, headers, body} or raises an error object of kind "http" with
 * its reason. Messages name the method and the URL without its user
 * information; headers (Authorization) never appear in them. */
#include <curl/curl.h>
#include <lauxlib.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "iofence.h"
#include "lcore.h"
#include "lerror.h"
#include "lifecycle.h"
#include "metrics.h"

/* ---- the thread's handles ---------------------------------------------- */

typedef struct client {
    CURLM *multi;
    CURL *easy;
} client;

static pthread_key_t client_key;
static pthread_once_t client_once = PTHREAD_ONCE_INIT;

static void client_free(void *p) {
    client *c = p;
    if (c->easy) curl_easy_cleanup(c->easy);
    if (c->multi) curl_multi_cleanup(c->multi);
    free(c);
}

/* curl_global_init is not thread-safe on every build: the host calls this
 * from main() before any thread starts; busted's process on first use. */
static void global_init(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

void lhttp_global_init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, global_init);
}

static void make_key(void) { pthread_key_create(&client_key, client_free); }

static client *thread_client(void) {
    lhttp_global_init();
    pthread_once(&client_once, make_key);
    client *c = pthread_getspecific(client_key);
    if (c) return c;
    c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->multi = curl_multi_init();
    c->easy = curl_easy_init();
    if (!c->multi || !c->easy) {
        client_free(c);
        return NULL;
    }
    pthread_setspecific(client_key, c);
    return c;
}

/* ---- one request --------------------------------------------------------- */

typedef struct buf {
    char *data;
    size_t len, cap, max;
    int too_large;
} buf;

static int buf_add(buf *b, const char *p, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->len + n + 1) cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) return -1;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
    return 0;
}

static size_t on_body(char *p, size_t size, size_t n, void *ud) {
    buf *b = ud;
    size_t len = size * n;
    if (b->len + len > b->max) {
        b->too_large = 1;
        return 0; /* CURLE_WRITE_ERROR: the transfer stops */
    }
    return buf_add(b, p, len) < 0 ? 0 : len;
}

/* Headers of the last response only: a 100 Continue or an interim
 * response before it starts the list again. */
static size_t on_header(char *p, size_t size, size_t n, void *ud) {
    buf *b = ud;
    size_t len = size * n;
    if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) b->len = 0;
    if (b->len + len > 1 << 20) return 0; /* a megabyte of headers is an attack */
    return buf_add(b, p, len) < 0 ? 0 : len;
}

typedef struct request {
    const char *method, *url, *body, *ca_file;
    size_t body_len;
    double timeout, connect_timeout;
    size_t max_body;
    int tls_verify;
    struct curl_slist *headers;
    char what[600]; /* "GET http://host/path", user information removed */
    char host[128];
} request;

/* The URL as messages show it: no user or password. */
static void describe(request *r) {
    CURLU *u = curl_url();
    char *shown = NULL, *host = NULL;
    if (u && curl_url_set(u, CURLUPART_URL, r->url, 0) == CURLUE_OK) {
        curl_url_set(u, CURLUPART_USER, NULL, 0);
        curl_url_set(u, CURLUPART_PASSWORD, NULL, 0);
        curl_url_get(u, CURLUPART_URL, &shown, 0);
        curl_url_get(u, CURLUPART_HOST, &host, 0);
    }
    snprintf(r->what, sizeof r->what, "%s %s", r->method, shown ? shown : "(an invalid URL)");
    snprintf(r->host, sizeof r->host, "%s", host ? host : "invalid");
    curl_free(shown);
    curl_free(host);
    curl_url_cleanup(u);
}

static const char *reason_of(CURLcode rc, const buf *body) {
    if (body->too_large) return "too_large";
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT: return "timeout";
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY: return "resolve";
    case CURLE_COULDNT_CONNECT: return "connect";
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL: return "url";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_CRL_BADFILE: return "tls";
    case CURLE_OUT_OF_MEMORY: return "memory";
    default: return "transport";
    }
}

static void setup(CURL *e, request *r, buf *body, buf *head, char *errbuf) {
    curl_easy_reset(e); /* options only: the multi handle keeps the connections */
    curl_easy_setopt(e, CURLOPT_URL, r->url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, body);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, head);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
    if (!strcmp(r->method, "HEAD")) curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    else if (strcmp(r->method, "GET") != 0 || r->body) curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, r->method);
    if (r->body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
    }
    /* The whole call's deadline is the fence's; curl times the connect. */
    if (r->connect_timeout > 0) curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)(r->connect_timeout * 1000));
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, r->tls_verify ? 1L : 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, r->tls_verify ? 2L : 0L);
    if (r->ca_file) curl_easy_setopt(e, CURLOPT_CAINFO, r->ca_file);
}

/* Pushes {name = value} of the response's header block; repeated names
 * are joined with ", " (RFC 9110's list rule). */
static void push_headers(lua_State *L, const buf *head) {
    lua_newtable(L);
    const char *p = head->data ? head->data : "", *end = p + head->len;
    int status_line = 1;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        const char *stop = eol > p && eol[-1] == '\r' ? eol - 1 : eol;
        const char *colon = memchr(p, ':', (size_t)(stop - p));
        if (!status_line && colon) {
            luaL_Buffer name;
            luaL_buffinit(L, &name);
            for (const char *c = p; c < colon; c++) luaL_addchar(&name, (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c));
            luaL_pushresult(&name);
            const char *v = colon + 1;
            while (v < stop && (*v == ' ' || *v == '\t')) v++;
            const char *ve = stop;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            lua_pushvalue(L, -1);
            lua_rawget(L, -3);
            if (lua_isstring(L, -1)) {
                lua_pushliteral(L, ", ");
                lua_pushlstring(L, v, (size_t)(ve - v));
                lua_concat(L, 3);
            } else {
                lua_pop(L, 1);
                lua_pushlstring(L, v, (size_t)(ve - v));
            }
            lua_rawset(L, -3);
        }
        status_line = 0;
        p = eol + 1;
    }
}

static double opt_number(lua_State *L, int t, const char *k, double dflt) {
    lua_getfield(L, t, k);
    double v = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : dflt;
    lua_pop(L, 1);
    return v;
}

static const char *opt_string(lua_State *L, int t, const char *k, size_t *len) {
    lua_getfield(L, t, k);
    const char *v = lua_isstring(L, -1) ? lua_tolstring(L, -1, len) : NULL;
    lua_pop(L, 1); /* the string stays referenced by the request table */
    return v;
}

/* Raises kind "http" with reason, method and url set; after cleanup. */
static int raise_http(lua_State *L, const request *r, const char *reason, const char *detail) {
    char msg[1024];
    snprintf(msg, sizeof msg, "http: %s: %s (%s)", r->what, detail, reason);
    lerror_push_kind(L, BMDB_E_HTTP, msg);
    lua_pushstring(L, reason);
    lua_setfield(L, -2, "reason");
    lua_pushstring(L, r->what);
    lua_setfield(L, -2, "request");
    return lua_error(L);
}

/* core.http_request(req, session?) -> {status=, headers=, body=}
 * req: {method=, url=, headers = {"Name: value", ...}, body=, timeout=,
 * connect_timeout=, max_body=, tls_verify=, ca_file=}, checked by
 * lua/bmdb/http.lua. */
static int l_http_request(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    struct session *sess = lcore_opt_session(L, 2);
    request r = {0};
    r.method = opt_string(L, 1, "method", NULL);
    r.url = opt_string(L, 1, "url", NULL);
    if (!r.method || !r.url) return lerror_argerror(L, 1, "method and url expected");
    r.body = opt_string(L, 1, "body", &r.body_len);
    r.ca_file = opt_string(L, 1, "ca_file", NULL);
    r.timeout = opt_number(L, 1, "timeout", 0);
    r.connect_timeout = opt_number(L, 1, "connect_timeout", 0);
    r.max_body = (size_t)opt_number(L, 1, "max_body", 16 << 20);
    lua_getfield(L, 1, "tls_verify");
    r.tls_verify = lua_isnil(L, -1) || lua_toboolean(L, -1);
    lua_pop(L, 1);
    describe(&r);

    client *c = thread_client();
    if (!c) return raise_http(L, &r, "memory", "cannot set up libcurl");

    /* Invariant 2 of iofence.h: nothing is sent unless the fence says go. */
    iofence f;
    iofence_stop stop = iofence_begin(&f, L, sess, r.timeout);
    if (stop == IOFENCE_TIMEOUT) return raise_http(L, &r, "timeout", "timed out before it started");
    if (stop != IOFENCE_GO) return iofence_raise(L, &f, stop, r.what);

    /* From here on nothing may raise until everything is freed. */
    lua_getfield(L, 1, "headers");
    int nh = lua_istable(L, -1) ? (int)lua_objlen(L, -1) : 0;
    struct curl_slist *hl = curl_slist_append(NULL, "Expect:"); /* no 100-continue round trip */
    for (int i = 1; i <= nh && hl; i++) {
        lua_rawgeti(L, -1, i);
        if (lua_isstring(L, -1)) {
            struct curl_slist *n = curl_slist_append(hl, lua_tostring(L, -1));
            if (n) hl = n;
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    r.headers = hl;

    buf body = {.max = r.max_body}, head = {.max = (size_t)-1};
    char errbuf[CURL_ERROR_SIZE] = "";
    setup(c->easy, &r, &body, &head, errbuf);
    double t0 = mono_now();
    CURLcode rc = CURLE_OK;
    int done = 0;
    curl_multi_add_handle(c->multi, c->easy);
    while (!done && stop == IOFENCE_GO) {
        int running = 0, left = 0;
        if (curl_multi_perform(c->multi, &running) != CURLM_OK) {
            rc = CURLE_OUT_OF_MEMORY;
            break;
        }
        CURLMsg *m;
        while ((m = curl_multi_info_read(c->multi, &left)))
            if (m->msg == CURLMSG_DONE) {
                rc = m->data.result;
                done = 1;
            }
        if (done) break;
        struct curl_waitfd extra = {.fd = f.fd, .events = CURL_WAIT_POLLIN};
        int ms = iofence_poll_ms(&f, 1000);
        curl_multi_poll(c->multi, f.fd >= 0 ? &extra : NULL, f.fd >= 0 ? 1 : 0, ms < 0 ? 1000 : ms, NULL);
        stop = iofence_check(&f);
    }
    /* Removing an unfinished transfer closes its connection at once. */
    curl_multi_remove_handle(c->multi, c->easy);
    iofence_end(&f);
    curl_slist_free_all(hl);
    long status = 0;
    if (done && rc == CURLE_OK) curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &status);
    metrics_http(r.host, (int)status, mono_now() - t0);

    if (stop != IOFENCE_GO || !done || rc != CURLE_OK) {
        const char *reason = stop == IOFENCE_TIMEOUT ? "timeout" : reason_of(rc, &body);
        char detail[CURL_ERROR_SIZE + 64];
        if (stop == IOFENCE_TIMEOUT) snprintf(detail, sizeof detail, "no answer within %gs", r.timeout);
        else if (body.too_large) snprintf(detail, sizeof detail, "response body larger than max_body (%zu bytes)",
                                          r.max_body);
        else snprintf(detail, sizeof detail, "%s", *errbuf ? errbuf : curl_easy_strerror(rc));
        free(body.data);
        free(head.data);
        if (stop != IOFENCE_GO && stop != IOFENCE_TIMEOUT) return iofence_raise(L, &f, stop, r.what);
        return raise_http(L, &r, reason, detail);
    }

    lua_createtable(L, 0, 3);
    lua_pushinteger(L, (lua_Integer)status);
    lua_setfield(L, -2, "status");
    lua_pushlstring(L, body.data ? body.data : "", body.len);
    free(body.data);
    lua_setfield(L, -2, "body");
    /* parsed from a Lua copy, so nothing is left to free if it raises */
    lua_pushlstring(L, head.data ? head.data : "", head.len);
    free(head.data);
    size_t hlen;
    const char *htext = lua_tolstring(L, -1, &hlen);
    buf copy = {.data = (char *)htext, .len = hlen};
    push_headers(L, &copy);
    lua_setfield(L, -3, "headers");
    lua_pop(L, 1);
    return 1;
}

static const luaL_Reg funcs[] = {{"http_request", l_http_request}, {NULL, NULL}};

void lhttp_register(lua_State *L) { luaL_register(L, NULL, funcs); }

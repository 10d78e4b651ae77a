/* lbmdb.c -- the Lua binding: the C core as the module "bmdb.core".
 *
 * Like lauxlib.c, this file only translates: Lua values to libpq text
 * parameters, results to Lua tables, tx_error to error objects. Policy
 * (retries, work decisions, backoff) lives in lua/bmdb.lua. The binary and
 * busted load the same luaopen_bmdb_core(); the binary hands over its pool
 * with lbmdb_set_pool(), specs call core.open{dsn=...} instead.
 *
 * States that run scripts are registered so that a shutdown can interrupt
 * a body busy in pure Lua, the way lua.c stops a script on SIGINT: a hook
 * set from outside raises at the next instruction count. */
#include "lbmdb.h"

#include <errno.h>
#include <lauxlib.h>
#include <libgen.h>
#include <limits.h>
#include <lualib.h>
#include <math.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "embedded.h"
#include "lifecycle.h"
#include "log.h"
#include "migrate.h"
#include "pool.h"
#include "session.h"
#include "snapshot.h"
#include "tx.h"
#include "work.h"
#include "worker.h"

#define ERROR_MT "bmdb.error"
#define SESSION_MT "bmdb.session"
#define TX_MT "bmdb.tx"
#define CONN_MT "bmdb.conn"
#define EMBEDDED_MT "bmdb.embedded"

static pool *the_pool;
static int opened_here; /* core.open() made the pool and the sessions */

void lbmdb_set_pool(pool *p) { the_pool = p; }

/* ---- error objects ---------------------------------------------------- */

static const char *kind_name(tx_error_kind k) {
    switch (k) {
    case TXE_SQL: return "sql";
    case TXE_CONNECTION: return "connection";
    case TXE_SESSION_EXPIRED: return "session_expired";
    case TXE_CANCELLED: return "cancelled";
    case TXE_CLOSED: return "closed";
    case TXE_LOST: return "lost";
    default: return "error";
    }
}

static void set_field(lua_State *L, const char *k, const char *v) {
    if (v && *v) {
        lua_pushstring(L, v);
        lua_setfield(L, -2, k);
    }
}

void lbmdb_push_error(lua_State *L, const tx_error *e) {
    lua_createtable(L, 0, 5);
    set_field(L, "kind", kind_name(e->kind));
    set_field(L, "sqlstate", e->sqlstate);
    set_field(L, "message", e->message);
    set_field(L, "detail", e->detail);
    set_field(L, "hint", e->hint);
    if (e->outcome_unknown) set_field(L, "outcome", "unknown");
    luaL_getmetatable(L, ERROR_MT);
    lua_setmetatable(L, -2);
}

static int raise_error(lua_State *L, const tx_error *e) {
    lbmdb_push_error(L, e);
    return lua_error(L);
}

static int raise_kind(lua_State *L, tx_error_kind kind, const char *msg) {
    tx_error e;
    tx_error_set(&e, kind, "%s", msg);
    return raise_error(L, &e);
}

static int error_tostring(lua_State *L) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    lua_getfield(L, 1, "sqlstate");
    const char *state = lua_tostring(L, -1);
    lua_getfield(L, 1, "message");
    const char *msg = lua_tostring(L, -1);
    lua_getfield(L, 1, "detail");
    const char *detail = lua_tostring(L, -1);
    lua_getfield(L, 1, "hint");
    const char *hint = lua_tostring(L, -1);
    if (state) {
        luaL_addstring(&b, "SQL error ");
        luaL_addstring(&b, state);
        luaL_addstring(&b, ": ");
    }
    luaL_addstring(&b, msg ? msg : "unknown error");
    if (detail) {
        luaL_addstring(&b, " (");
        luaL_addstring(&b, detail);
        luaL_addstring(&b, ")");
    }
    if (hint) {
        luaL_addstring(&b, " hint: ");
        luaL_addstring(&b, hint);
    }
    luaL_pushresult(&b);
    return 1;
}

/* core.error(kind, message): error objects raised from Lua share the mt. */
static int l_error(lua_State *L) {
    const char *kind = luaL_checkstring(L, 1);
    const char *msg = luaL_checkstring(L, 2);
    lua_createtable(L, 0, 2);
    lua_pushstring(L, kind);
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, msg);
    lua_setfield(L, -2, "message");
    luaL_getmetatable(L, ERROR_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static int l_is_error(lua_State *L) {
    int is = 0;
    if (lua_getmetatable(L, 1)) {
        luaL_getmetatable(L, ERROR_MT);
        is = lua_rawequal(L, -1, -2);
    }
    lua_pushboolean(L, is);
    return 1;
}

int lbmdb_traceback(lua_State *L) {
    const char *msg = NULL;
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) msg = lua_tostring(L, -1);
    else msg = lua_tostring(L, 1);
    if (!msg) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    /* debug.traceback(msg, 2), as lua.c's msghandler */
    lua_getglobal(L, "debug");
    lua_getfield(L, -1, "traceback");
    lua_pushstring(L, msg);
    lua_pushinteger(L, 2);
    lua_call(L, 2, 1);
    return 1;
}

/* ---- cancellation of busy states ---------------------------------------- */

#define MAX_STATES 1024
static pthread_mutex_t states_mu = PTHREAD_MUTEX_INITIALIZER;
static lua_State *states[MAX_STATES];
static int nstates;

static void cancel_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    raise_kind(L, TXE_CANCELLED, "cancelled: the host is shutting down");
}

void lbmdb_register_state(lua_State *L) {
    pthread_mutex_lock(&states_mu);
    if (nstates < MAX_STATES) states[nstates++] = L;
    pthread_mutex_unlock(&states_mu);
}

void lbmdb_unregister_state(lua_State *L) {
    pthread_mutex_lock(&states_mu);
    for (int i = 0; i < nstates; i++)
        if (states[i] == L) states[i] = states[--nstates];
    pthread_mutex_unlock(&states_mu);
}

void lbmdb_interrupt_all(void) {
    /* lua_sethook is the one call lua.c makes from a signal handler: it
     * only stores the hook, which the running state picks up. */
    pthread_mutex_lock(&states_mu);
    for (int i = 0; i < nstates; i++)
        lua_sethook(states[i], cancel_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    pthread_mutex_unlock(&states_mu);
}

/* Every bmdb call starts here: a cancelled host raises before any SQL. */
static void check_running(lua_State *L) {
    if (lifecycle_state() >= HOST_CANCELLING)
        raise_kind(L, TXE_CANCELLED, "cancelled: the host is shutting down");
}

/* ---- parameters and results ------------------------------------------- */

/* Skips the quoted literal or identifier that starts at s (its opening
 * quote) and returns what follows. In an E'' string a backslash escapes
 * the next character, so E'it\'s $1' is one literal. */
static const char *skip_quoted(const char *s, int backslash_escapes) {
    char q = *s++;
    while (*s) {
        if (backslash_escapes && *s == '\\' && s[1]) s += 2;
        else if (*s == q && s[1] == q) s += 2;
        else if (*s == q) return s + 1;
        else s++;
    }
    return s;
}

/* An E'' string, with the lexer's continuation: 'a' then blanks holding a
 * newline then 'b' is one literal, still with backslash escapes. */
static const char *skip_escape_string(const char *s) {
    for (;;) {
        s = skip_quoted(s, 1);
        const char *t = s;
        int newline = 0;
        while (*t == ' ' || *t == '\t' || *t == '\n' || *t == '\r' || *t == '\f')
            newline |= *t++ == '\n';
        if (!newline || *t != '\'') return s;
        s = t;
    }
}

static int ident_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
static int ident_char(char c) { return ident_start(c) || (c >= '0' && c <= '9') || c == '$'; }

/* Highest $n in sql, skipping literals, quoted identifiers, comments and
 * dollar quotes, so "$1" inside a string is not mistaken for a parameter. */
static int max_param(const char *s) {
    int max = 0;
    while (*s) {
        if (*s == '\'' || *s == '"') {
            s = skip_quoted(s, 0); /* U&'' and N'' land here too: no escapes */
        } else if (s[0] == '-' && s[1] == '-') {
            while (*s && *s != '\n') s++;
        } else if (s[0] == '/' && s[1] == '*') {
            const char *end = strstr(s + 2, "*/");
            s = end ? end + 2 : s + strlen(s);
        } else if (*s == '$' && s[1] >= '0' && s[1] <= '9') {
            int n = atoi(s + 1);
            if (n > max) max = n;
            s++;
            while (*s >= '0' && *s <= '9') s++;
        } else if (*s == '$') {
            /* $tag$ ... $tag$ */
            const char *t = s + 1;
            while (*t == '_' || (*t >= 'a' && *t <= 'z') || (*t >= 'A' && *t <= 'Z') ||
                   (*t >= '0' && *t <= '9'))
                t++;
            if (*t == '$') {
                size_t taglen = (size_t)(t - s + 1);
                char tag[64];
                if (taglen < sizeof tag) {
                    memcpy(tag, s, taglen);
                    tag[taglen] = '\0';
                    const char *end = strstr(t + 1, tag);
                    s = end ? end + taglen : s + strlen(s);
                    continue;
                }
            }
            s++;
        } else if ((*s == 'E' || *s == 'e') && s[1] == '\'') {
            s = skip_escape_string(s + 1); /* only a lone E starts one */
        } else if (ident_start(*s)) {
            /* identifiers may contain $ (foo$1): not a parameter */
            while (ident_char(*s)) s++;
        } else {
            s++;
        }
    }
    return max;
}

/* The shortest text that reads back as d (%.1g up to %.17g): 0.1 is sent
 * as "0.1", not "0.10000000000000001", which a numeric would keep. */
static void format_double(double d, char *buf, size_t len) {
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, len, "%.*g", prec, d);
        if (strtod(buf, NULL) == d) return;
    }
}

/* A decimal text as sign, significant digits and exponent (value =
 * 0.digits x 10^exp), so "1.2500", "1.25" and "125e-2" compare equal. */
typedef struct {
    int neg;
    long exp;
    size_t n;
    char digits[40];
} decimal;

/* 0, or -1 when s is not a plain decimal or has more significant digits
 * than any double's shortest text (17). */
static int decimal_parse(const char *s, decimal *d) {
    memset(d, 0, sizeof *d);
    if (*s == '-' || *s == '+') d->neg = *s++ == '-';
    int point = 0, any = 0;
    long zeros = 0; /* zeros after a significant digit, kept only if one follows */
    for (; (*s >= '0' && *s <= '9') || (*s == '.' && !point); s++) {
        if (*s == '.') {
            point = 1;
            continue;
        }
        any = 1;
        if (d->n == 0 && *s == '0') { /* a leading zero */
            if (point) d->exp--;
            continue;
        }
        if (!point) d->exp++;
        if (*s == '0') {
            zeros++;
            continue;
        }
        if (d->n + (size_t)zeros + 1 > sizeof d->digits) return -1;
        memset(d->digits + d->n, '0', (size_t)zeros);
        d->n += (size_t)zeros;
        zeros = 0;
        d->digits[d->n++] = *s;
    }
    if (!any) return -1;
    if (*s == 'e' || *s == 'E') {
        char *end;
        d->exp += strtol(s + 1, &end, 10);
        s = end;
    }
    if (*s) return -1;
    if (d->n == 0) d->neg = 0, d->exp = 0; /* zero has one form */
    return 0;
}

/* Whether the double read from numeric text v holds exactly that value,
 * in the only sense a caller can use: its shortest text is v again
 * (modulo trailing zeros and exponent form). 0.1 fits; 0.10000000000000001
 * and 9007199254740993 do not. */
static int numeric_fits_double(const char *v, double d) {
    if (!strcmp(v, "NaN") || !strcmp(v, "Infinity") || !strcmp(v, "-Infinity")) return 1;
    if (!isfinite(d)) return 0;
    char buf[40];
    format_double(d, buf, sizeof buf);
    decimal a, b;
    return decimal_parse(v, &a) == 0 && decimal_parse(buf, &b) == 0 && a.neg == b.neg &&
           a.exp == b.exp && a.n == b.n && memcmp(a.digits, b.digits, a.n) == 0;
}

/* A statement's parameters as PQexecParams takes them. A string holding a
 * NUL byte goes in binary (format 1) with its length: text format would
 * cut it at the NUL. Binary is exactly what bytea receives; tx_conn_exec
 * refuses it for any other type, naming the parameter. */
typedef struct {
    int n;
    const char **values;
    int *lengths;
    int *formats;
} params;

static void format_number(double d, char *buf, size_t len) {
    if (isnan(d)) snprintf(buf, len, "NaN");
    else if (isinf(d)) snprintf(buf, len, "%s", d > 0 ? "Infinity" : "-Infinity");
    else if (d == 0 && signbit(d)) snprintf(buf, len, "-0"); /* float8 keeps the sign */
    else if (d == floor(d) && fabs(d) < 9.2e18)
        snprintf(buf, len, "%lld", (long long)d); /* exact integers as integers: "3", not "3.0" */
    else format_double(d, buf, len);
}

/* Converts arguments first..top into p; the arrays live in a userdata
 * pushed at first (the arguments move up by one) and the texts stay
 * referenced on the Lua stack while the statement runs. */
static void collect_params(lua_State *L, const char *fname, const char *sql, int first, params *p) {
    int n = lua_gettop(L) - first + 1;
    int want = max_param(sql);
    if (n < want)
        luaL_error(L, "%s: parameter $%d is missing (the query uses $1..$%d, got %d argument%s)",
                   fname, n + 1, want, n, n == 1 ? "" : "s");
    if (n > want)
        luaL_error(L, "%s: argument #%d has no parameter (the query uses %d parameter%s, got %d)",
                   fname, want + 1, want, want == 1 ? "" : "s", n);
    memset(p, 0, sizeof *p);
    p->n = n;
    if (n == 0) return;
    size_t each = sizeof(char *) + 2 * sizeof(int);
    char *mem = lua_newuserdata(L, each * (size_t)n);
    lua_insert(L, first++);
    p->values = (const char **)mem;
    p->lengths = (int *)(mem + sizeof(char *) * (size_t)n);
    p->formats = p->lengths + n;
    for (int i = 0; i < n; i++) {
        int idx = first + i;
        size_t len = 0;
        p->lengths[i] = p->formats[i] = 0;
        switch (lua_type(L, idx)) {
        case LUA_TNIL: p->values[i] = NULL; break;
        case LUA_TBOOLEAN: p->values[i] = lua_toboolean(L, idx) ? "true" : "false"; break;
        case LUA_TSTRING:
            p->values[i] = lua_tolstring(L, idx, &len);
            if (memchr(p->values[i], '\0', len)) {
                if (len > INT_MAX) luaL_error(L, "%s: parameter $%d is too long", fname, i + 1);
                p->lengths[i] = (int)len;
                p->formats[i] = 1;
            }
            break;
        case LUA_TNUMBER: {
            char buf[40];
            format_number(lua_tonumber(L, idx), buf, sizeof buf);
            lua_pushstring(L, buf);
            lua_replace(L, idx); /* keep the text alive on the stack */
            p->values[i] = lua_tostring(L, idx);
            break;
        }
        default:
            luaL_error(L, "%s: parameter $%d (argument #%d) has unsupported type %s "
                          "(expected string, number, boolean or nil)",
                       fname, i + 1, i + 1, luaL_typename(L, idx));
        }
    }
}

static void push_value(lua_State *L, const PGresult *r, int row, int col) {
    if (PQgetisnull(r, row, col)) {
        lua_pushnil(L);
        return;
    }
    const char *v = PQgetvalue(r, row, col);
    switch (PQftype(r, col)) {
    case 16: /* bool */
        lua_pushboolean(L, v[0] == 't');
        return;
    case 17: { /* bytea: the bytes themselves, NULs included, not "\x..." */
        size_t len;
        unsigned char *bytes = PQunescapeBytea((const unsigned char *)v, &len);
        if (!bytes) luaL_error(L, "out of memory decoding a bytea column");
        lua_pushlstring(L, (const char *)bytes, len);
        PQfreemem(bytes);
        return;
    }
    case 20: case 21: case 23: case 26: { /* int8, int2, int4, oid */
        long long n = strtoll(v, NULL, 10);
        /* a double holds integers exactly up to 2^53; beyond, keep the text */
        if (n > (1LL << 53) || n < -(1LL << 53)) lua_pushstring(L, v);
        else lua_pushnumber(L, (lua_Number)n);
        return;
    }
    case 700: case 701: /* float4, float8: the server sends round-trip text */
        lua_pushnumber(L, strtod(v, NULL));
        return;
    case 1700: { /* numeric: a number only when the double is that value */
        double d = strtod(v, NULL);
        if (numeric_fits_double(v, d)) lua_pushnumber(L, d);
        else lua_pushstring(L, v);
        return;
    }
    default:
        lua_pushstring(L, v);
    }
}

static void push_row(lua_State *L, const PGresult *r, int row) {
    int ncols = PQnfields(r);
    lua_createtable(L, 0, ncols);
    for (int c = 0; c < ncols; c++) {
        push_value(L, r, row, c);
        lua_setfield(L, -2, PQfname(r, c));
    }
}

/* Pushes what query / one / exec return for r. */
static int push_result(lua_State *L, const char *fname, PGresult *r) {
    int rows = PQntuples(r);
    if (fname[0] == 'q') { /* query */
        lua_createtable(L, rows, 0);
        for (int i = 0; i < rows; i++) {
            push_row(L, r, i);
            lua_rawseti(L, -2, i + 1);
        }
    } else if (fname[0] == 'o') { /* one */
        if (rows > 1) {
            PQclear(r);
            return luaL_error(L, "one: the query returned %d rows, expected at most one", rows);
        }
        if (rows == 1) push_row(L, r, 0);
        else lua_pushnil(L);
    } else { /* exec: rows affected (or returned) */
        const char *n = PQcmdTuples(r);
        lua_pushnumber(L, *n ? atof(n) : rows);
    }
    PQclear(r);
    return 1;
}

/* ---- sessions ---------------------------------------------------------- */

typedef struct { session *s; } lsession;

static session *check_session(lua_State *L, int idx) {
    lsession *u = luaL_checkudata(L, idx, SESSION_MT);
    return u->s;
}

/* core.session(): the host's current session, waiting briefly while the
 * heartbeat replaces a lost one. */
static int l_session(lua_State *L) {
    check_running(L);
    if (!sessions_started()) return luaL_error(L, "bmdb: not connected to a database (no session)");
    double wait = luaL_optnumber(L, 1, 10);
    session *s = session_current(wait);
    if (!s) return raise_kind(L, TXE_SESSION_EXPIRED, "session expired (no live session)");
    lsession *u = lua_newuserdata(L, sizeof *u);
    u->s = s;
    luaL_getmetatable(L, SESSION_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static int sess_gc(lua_State *L) {
    lsession *u = luaL_checkudata(L, 1, SESSION_MT);
    session_unref(u->s);
    u->s = NULL;
    return 0;
}

static int sess_id(lua_State *L) {
    lua_pushstring(L, session_id(check_session(L, 1)));
    return 1;
}

static int sess_component(lua_State *L) {
    lua_pushstring(L, session_component(check_session(L, 1)));
    return 1;
}

static int sess_alive(lua_State *L) {
    lua_pushboolean(L, session_alive(check_session(L, 1)));
    return 1;
}

/* ---- transactions ------------------------------------------------------ */

typedef struct { tx t; } ltx;

static int l_begin(lua_State *L) {
    check_running(L);
    session *s = check_session(L, 1);
    if (!the_pool) return luaL_error(L, "bmdb: not connected");
    ltx *u = lua_newuserdata(L, sizeof *u);
    memset(u, 0, sizeof *u);
    luaL_getmetatable(L, TX_MT);
    lua_setmetatable(L, -2);
    /* The tx keeps its session alive as long as it exists, and its __gc
     * lets go. tx_begin records the session even when it fails, so the
     * reference is taken first: one ref for the one unref, whatever happens. */
    session_ref(s);
    tx_error e;
    if (tx_begin(&u->t, the_pool, s, &e) < 0) return raise_error(L, &e);
    return 1;
}

static ltx *check_open_tx(lua_State *L, const char *fname) {
    ltx *u = luaL_checkudata(L, 1, TX_MT);
    if (!u->t.open)
        luaL_error(L, "%s: the transaction is over (tx is valid only inside its bmdb.transact function)", fname);
    check_running(L);
    if (u->t.sess && !session_alive(u->t.sess)) {
        tx_rollback(&u->t);
        raise_kind(L, TXE_SESSION_EXPIRED, "session expired");
    }
    return u;
}

/* The next word of sql after blanks, semicolons and comments (the server
 * skips all three before a statement), upper-cased into w; advances *s. */
static void next_word(const char **s, char *w, size_t len) {
    const char *p = *s;
    for (;;) {
        if (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == '\f' || *p == '\v' || *p == ';') {
            p++;
        } else if (p[0] == '-' && p[1] == '-') {
            while (*p && *p != '\n') p++;
        } else if (p[0] == '/' && p[1] == '*') { /* comments nest */
            int depth = 1;
            for (p += 2; *p && depth; p++) {
                if (p[0] == '/' && p[1] == '*') depth++, p++;
                else if (p[0] == '*' && p[1] == '/') depth--, p++;
            }
        } else {
            break;
        }
    }
    size_t n = 0;
    for (; ident_start(*p) || (*p >= '0' && *p <= '9'); p++)
        if (n + 1 < len) w[n++] = (char)(*p >= 'a' && *p <= 'z' ? *p - 32 : *p);
    w[n] = '\0';
    *s = p;
}

/* The statement's name when it would start, end or split the transaction
 * (COMMIT, ROLLBACK, BEGIN, SAVEPOINT, PREPARE TRANSACTION, ...), else
 * NULL. Inside bmdb.transact the transaction is the host's: ending it ends
 * the fence, and what ran after would autocommit outside it. */
static const char *transaction_control(const char *sql, char *name, size_t len) {
    static const char *const alone[] = {"BEGIN", "COMMIT", "END", "ROLLBACK", "ABORT",
                                        "SAVEPOINT", "RELEASE", NULL};
    char first[32], second[32];
    next_word(&sql, first, sizeof first);
    for (int i = 0; alone[i]; i++)
        if (!strcmp(first, alone[i])) return snprintf(name, len, "%s", first), name;
    if (!strcmp(first, "START")) return snprintf(name, len, "START TRANSACTION"), name;
    if (strcmp(first, "PREPARE") && strcmp(first, "SET")) return NULL; /* PREPARE name AS ... is fine */
    next_word(&sql, second, sizeof second);
    if (strcmp(second, "TRANSACTION")) return NULL;
    snprintf(name, len, "%s %s", first, second);
    return name;
}

/* An error object of kind "usage": the call itself is wrong. */
static int raise_usage(lua_State *L, const char *fmt, const char *arg, const char *arg2) {
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "usage");
    lua_setfield(L, -2, "kind");
    lua_pushfstring(L, fmt, arg, arg2);
    lua_setfield(L, -2, "message");
    luaL_getmetatable(L, ERROR_MT);
    lua_setmetatable(L, -2);
    return lua_error(L);
}

static int tx_statement(lua_State *L, const char *fname) {
    ltx *u = check_open_tx(L, fname);
    const char *sql = luaL_checkstring(L, 2);
    char name[64];
    if (transaction_control(sql, name, sizeof name))
        return raise_usage(L, "%s: %s is refused inside bmdb.transact: the transaction belongs to "
                              "the host (return from the function to commit, raise to roll back)",
                           fname, name);
    params p;
    collect_params(L, fname, sql, 3, &p);
    tx_error e;
    PGresult *r = tx_exec_params(&u->t, sql, p.n, p.values, p.lengths, p.formats, &e);
    if (!r) return raise_error(L, &e);
    return push_result(L, fname, r);
}

static int tx_query(lua_State *L) { return tx_statement(L, "query"); }
static int tx_one(lua_State *L) { return tx_statement(L, "one"); }
static int tx_execute(lua_State *L) { return tx_statement(L, "exec"); }

static int release_tx_session(ltx *u) {
    if (u->t.sess) {
        session_unref(u->t.sess);
        u->t.sess = NULL;
    }
    return 0;
}

static int tx_commit_l(lua_State *L) {
    ltx *u = luaL_checkudata(L, 1, TX_MT);
    if (!u->t.open) return luaL_error(L, "commit: the transaction is over");
    tx_error e;
    if (lifecycle_state() >= HOST_CANCELLING) {
        tx_rollback(&u->t);
        release_tx_session(u);
        return raise_kind(L, TXE_CANCELLED, "cancelled: the host is shutting down");
    }
    int rc = tx_commit(&u->t, &e);
    release_tx_session(u);
    if (rc < 0) return raise_error(L, &e);
    return 0;
}

static int tx_rollback_l(lua_State *L) {
    ltx *u = luaL_checkudata(L, 1, TX_MT);
    tx_rollback(&u->t);
    release_tx_session(u);
    return 0;
}

/* ---- work locks -------------------------------------------------------- */

static void check_ids(lua_State *L, int midx, int pidx) {
    const char *m = luaL_checkstring(L, midx), *p = luaL_checkstring(L, pidx);
    if (!work_valid_uuid(m)) luaL_error(L, "machine id is not a UUID: %s", m);
    if (!work_valid_process(p))
        luaL_error(L, "invalid process name '%s' (a letter, then letters, digits or _; at most 63)", p);
}

/* core.lock(tx, machine, process) -> "locked", attempt | "held" | "backoff", until */
static int l_lock(lua_State *L) {
    ltx *u = check_open_tx(L, "lock");
    check_ids(L, 2, 3);
    int attempt = 0;
    char until[64] = "";
    tx_error e;
    switch (work_lock(&u->t, lua_tostring(L, 2), lua_tostring(L, 3), &attempt, until, sizeof until, &e)) {
    case WORK_LOCKED:
        worker_note_item(lua_tostring(L, 2)); /* named if its slot will not stop */
        lua_pushliteral(L, "locked");
        lua_pushinteger(L, attempt);
        return 2;
    case WORK_HELD:
        lua_pushliteral(L, "held");
        return 1;
    case WORK_BACKOFF:
        lua_pushliteral(L, "backoff");
        lua_pushstring(L, until);
        return 2;
    default:
        return raise_error(L, &e);
    }
}

/* core.release(tx, machine, process, event, cause, seconds) */
static int l_release(lua_State *L) {
    ltx *u = check_open_tx(L, "release");
    check_ids(L, 2, 3);
    static const char *const events[] = {"Finished", "Failed", "Canceled", NULL};
    int ev = luaL_checkoption(L, 4, NULL, events);
    tx_error e;
    if (work_release(&u->t, lua_tostring(L, 2), lua_tostring(L, 3), events[ev],
                     luaL_optstring(L, 5, NULL), (long)luaL_optnumber(L, 6, 1), &e) < 0)
        return raise_error(L, &e);
    worker_note_item(NULL);
    return 0;
}

static int l_backoff_last(lua_State *L) {
    ltx *u = check_open_tx(L, "backoff_last");
    check_ids(L, 2, 3);
    tx_error e;
    long last = work_backoff_last(&u->t, lua_tostring(L, 2), lua_tostring(L, 3), &e);
    if (last < 0) return raise_error(L, &e);
    if (last == 0) lua_pushnil(L);
    else lua_pushnumber(L, (lua_Number)last);
    return 1;
}

/* ---- plain connections (specs, bmdb.testing) ---------------------------- */

typedef struct { PGconn *c; } lconn;

static int l_connect(lua_State *L) {
    const char *dsn = luaL_checkstring(L, 1);
    char err[512];
    PGconn *c = pool_connect(dsn, err, sizeof err);
    if (!c) return raise_kind(L, TXE_CONNECTION, err);
    lconn *u = lua_newuserdata(L, sizeof *u);
    u->c = c;
    luaL_getmetatable(L, CONN_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static int conn_statement(lua_State *L, const char *fname) {
    lconn *u = luaL_checkudata(L, 1, CONN_MT);
    if (!u->c) return luaL_error(L, "%s: the connection is closed", fname);
    const char *sql = luaL_checkstring(L, 2);
    params p;
    collect_params(L, fname, sql, 3, &p);
    tx_error e;
    PGresult *r = tx_conn_exec(u->c, sql, p.n, p.values, p.lengths, p.formats, &e);
    if (!r) return raise_error(L, &e);
    return push_result(L, fname, r);
}

static int conn_query(lua_State *L) { return conn_statement(L, "query"); }
static int conn_one(lua_State *L) { return conn_statement(L, "one"); }
static int conn_exec(lua_State *L) { return conn_statement(L, "exec"); }

static int conn_close(lua_State *L) {
    lconn *u = luaL_checkudata(L, 1, CONN_MT);
    if (u->c) PQfinish(u->c);
    u->c = NULL;
    return 0;
}

/* ---- host services ----------------------------------------------------- */

/* core.sleep(seconds, session?) -> true after the full time, false when cut
 * short by cancellation or by the loss of session. Draining does not cut
 * it: items in flight keep their grace period. */
static int l_sleep(lua_State *L) {
    double seconds = luaL_checknumber(L, 1);
    session *s = lua_isnoneornil(L, 2) ? NULL : check_session(L, 2);
    double end = mono_now() + seconds;
    unsigned gen = lifecycle_kick_gen();
    double left;
    while ((left = end - mono_now()) > 0) {
        lifecycle_wait(left, HOST_CANCELLING, &gen);
        if (lifecycle_state() >= HOST_CANCELLING || (s && !session_alive(s))) {
            lua_pushboolean(L, 0);
            return 1;
        }
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_retry_delay(lua_State *L) {
    lua_pushnumber(L, tx_retry_delay((int)luaL_checknumber(L, 1)));
    return 1;
}

static int l_log(lua_State *L) {
    static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
    log_level lvl = (log_level)luaL_checkoption(L, 1, NULL, levels);
    const char *msg = luaL_checkstring(L, 2);
    if (!log_enabled(lvl)) return 0;
    const char *kv[64];
    size_t n = 0;
    if (lua_istable(L, 3)) {
        /* fields is a flat list {k1, v1, k2, v2, ...} (order kept) or a
         * map; either way the texts go into a scratch table so they stay
         * referenced while log_kvv reads them. */
        lua_newtable(L);
        int texts = lua_gettop(L);
        if (lua_objlen(L, 3) > 0) {
            size_t len = lua_objlen(L, 3);
            for (size_t i = 1; i <= len && n < 32 * 2; i++) {
                lua_getglobal(L, "tostring");
                lua_rawgeti(L, 3, (int)i);
                lua_call(L, 1, 1);
                lua_rawseti(L, texts, (int)++n);
            }
            n /= 2;
        } else {
            lua_pushnil(L);
            while (n < 32 && lua_next(L, 3)) {
                for (int i = 0; i < 2; i++) {
                    lua_getglobal(L, "tostring");
                    lua_pushvalue(L, i == 0 ? -3 : -2); /* key, then value */
                    lua_call(L, 1, 1);
                    lua_rawseti(L, texts, (int)(2 * n + (size_t)i + 1));
                }
                lua_pop(L, 1);
                n++;
            }
        }
        for (size_t i = 0; i < 2 * n; i++) {
            lua_rawgeti(L, texts, (int)i + 1);
            kv[i] = lua_tostring(L, -1);
            lua_pop(L, 1);
        }
    }
    log_kvv(lvl, msg, kv, n);
    return 0;
}

static int l_state(lua_State *L) {
    static const char *const names[] = {"running", "draining", "cancelling"};
    lua_pushstring(L, names[lifecycle_state()]);
    return 1;
}

static int l_valid_uuid(lua_State *L) {
    lua_pushboolean(L, lua_type(L, 1) == LUA_TSTRING && work_valid_uuid(lua_tostring(L, 1)));
    return 1;
}

static int l_valid_process(lua_State *L) {
    lua_pushboolean(L, lua_type(L, 1) == LUA_TSTRING && work_valid_process(lua_tostring(L, 1)));
    return 1;
}

static int l_pause_heartbeat(lua_State *L) {
    sessions_pause_heartbeat(lua_toboolean(L, 1));
    return 0;
}

static int l_idle_wait(lua_State *L) {
    lua_pushboolean(L, worker_idle_wait(luaL_checkstring(L, 1), luaL_checknumber(L, 2)));
    return 1;
}

static int l_wake_local(lua_State *L) {
    worker_wake(luaL_optstring(L, 1, NULL));
    return 0;
}

/* core.count("claim" | "retry") */
static int l_count(lua_State *L) {
    static const char *const what[] = {"claim", "retry", NULL};
    if (luaL_checkoption(L, 1, NULL, what) == 0) worker_count_claim();
    else worker_count_retry();
    return 0;
}

static int l_generation(lua_State *L) {
    lua_pushnumber(L, workers_generation());
    return 1;
}

static int l_notify_enabled(lua_State *L) {
    lua_pushboolean(L, worker_notify_enabled());
    return 1;
}

/* A seed for math.randomseed that differs between slots and hosts. */
static int l_seed(lua_State *L) {
    double t = mono_now();
    lua_pushnumber(L, (double)(((unsigned long)(t * 1e9) ^ ((unsigned long)getpid() << 16) ^
                                (unsigned long)(uintptr_t)L) % 2147483647UL));
    return 1;
}

static int l_now(lua_State *L) {
    lua_pushnumber(L, mono_now());
    return 1;
}

/* core.open{dsn=, component=, interval=, pool=, migrate=, log_level=}: what
 * main.c does for the binary, for specs and bmdb.testing. */
static int l_open(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    if (the_pool) return luaL_error(L, "bmdb.core.open: already open");
    lua_getfield(L, 1, "dsn");
    const char *dsn = luaL_checkstring(L, -1);
    lua_getfield(L, 1, "component");
    const char *component = luaL_optstring(L, -1, "spec");
    lua_getfield(L, 1, "interval");
    int interval = (int)luaL_optnumber(L, -1, 5);
    lua_getfield(L, 1, "pool");
    int size = (int)luaL_optnumber(L, -1, 16);
    lua_getfield(L, 1, "migrate");
    int migrate = lua_isnil(L, -1) || lua_toboolean(L, -1);
    lua_getfield(L, 1, "log_level"); /* specs want quiet: warn by default */
    log_level lvl;
    if (log_parse_level(luaL_optstring(L, -1, "warn"), &lvl) < 0)
        return luaL_error(L, "bmdb.core.open: log_level must be debug, info, warn or error");
    log_configure(lvl, 0);
    char err[1024], runtime[300], host[256] = "";
    gethostname(host, sizeof host - 1);
    snprintf(runtime, sizeof runtime, "%s:%d", host, (int)getpid());

    pool *p = pool_create(dsn, size);
    PGconn *c = pool_get(p, err, sizeof err);
    if (!c) {
        pool_destroy(p);
        return raise_kind(L, TXE_CONNECTION, err);
    }
    if (migrate && migrate_up(c, NULL, err, sizeof err) < 0) {
        pool_put(p, c);
        pool_destroy(p);
        return luaL_error(L, "%s", err);
    }
    pool_put(p, c);
    struct session_config cfg = {component, runtime, interval};
    if (sessions_start(p, &cfg, err, sizeof err) < 0) {
        pool_destroy(p);
        return luaL_error(L, "%s", err);
    }
    the_pool = p;
    opened_here = 1;
    return 0;
}

static int l_close(lua_State *L) {
    (void)L;
    if (!opened_here) return 0;
    sessions_stop();
    pool_destroy(the_pool);
    the_pool = NULL;
    opened_here = 0;
    return 0;
}

/* core.tmpdir(prefix): a fresh directory under $TMPDIR or /tmp that an
 * unprivileged server user can enter (bmdb.testing). */
static int l_tmpdir(lua_State *L) {
    const char *base = getenv("TMPDIR");
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s-XXXXXX", base && *base ? base : "/tmp", luaL_optstring(L, 1, "bmdb"));
    if (!mkdtemp(path)) return luaL_error(L, "tmpdir: %s: %s", path, strerror(errno));
    chmod(path, 0755);
    lua_pushstring(L, path);
    return 1;
}

typedef struct { embedded *e; } lembedded;

/* core.embedded(data_dir) -> handle, conninfo: the embedded database, as
 * the binary runs it without --dsn. */
static int l_embedded(lua_State *L) {
    const char *dir = luaL_checkstring(L, 1);
    char err[1024], *conninfo = NULL;
    lembedded *u = lua_newuserdata(L, sizeof *u);
    u->e = NULL;
    luaL_getmetatable(L, EMBEDDED_MT);
    lua_setmetatable(L, -2);
    u->e = embedded_open(dir, &conninfo, err, sizeof err);
    if (!u->e) return luaL_error(L, "%s", err);
    lua_pushstring(L, conninfo);
    free(conninfo);
    return 2;
}

static int embedded_close_l(lua_State *L) {
    lembedded *u = luaL_checkudata(L, 1, EMBEDDED_MT);
    if (u->e) embedded_close(u->e);
    u->e = NULL;
    return 0;
}

static const luaL_Reg core_funcs[] = {
    {"open", l_open},           {"close", l_close},
    {"session", l_session},     {"begin", l_begin},
    {"lock", l_lock},           {"release", l_release},
    {"backoff_last", l_backoff_last},
    {"connect", l_connect},     {"sleep", l_sleep},
    {"retry_delay", l_retry_delay},
    {"log", l_log},             {"state", l_state},
    {"valid_uuid", l_valid_uuid}, {"valid_process", l_valid_process},
    {"error", l_error},         {"is_error", l_is_error},
    {"pause_heartbeat", l_pause_heartbeat},
    {"idle_wait", l_idle_wait}, {"wake_local", l_wake_local},
    {"generation", l_generation}, {"notify_enabled", l_notify_enabled},
    {"seed", l_seed},           {"tmpdir", l_tmpdir},
    {"count", l_count},
    {"embedded", l_embedded},
    {"now", l_now},             {NULL, NULL}};

static const luaL_Reg session_methods[] = {
    {"id", sess_id}, {"component", sess_component}, {"alive", sess_alive}, {NULL, NULL}};

static const luaL_Reg tx_methods[] = {{"query", tx_query},   {"one", tx_one},
                                      {"exec", tx_execute},  {"commit", tx_commit_l},
                                      {"rollback", tx_rollback_l}, {NULL, NULL}};

static const luaL_Reg embedded_methods[] = {{"close", embedded_close_l}, {NULL, NULL}};

static const luaL_Reg conn_methods[] = {
    {"query", conn_query}, {"one", conn_one}, {"exec", conn_exec}, {"close", conn_close}, {NULL, NULL}};

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc) {
    luaL_newmetatable(L, name);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
}

int luaopen_bmdb_core(lua_State *L) {
    luaL_newmetatable(L, ERROR_MT);
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
    new_class(L, SESSION_MT, session_methods, sess_gc);
    new_class(L, TX_MT, tx_methods, tx_rollback_l);
    new_class(L, CONN_MT, conn_methods, conn_close);
    new_class(L, EMBEDDED_MT, embedded_methods, embedded_close_l);
    lua_newtable(L);
    luaL_register(L, NULL, core_funcs);
    return 1;
}

/* ---- the binary's states ------------------------------------------------ */

static int load_embedded(lua_State *L) {
    const embedded_lua_module *m = lua_touserdata(L, lua_upvalueindex(1));
    if (luaL_loadbuffer(L, m->source, m->len, m->chunkname) != 0) return lua_error(L);
    lua_pushstring(L, m->name);
    lua_call(L, 1, 1);
    return 1;
}

void lbmdb_openlibs(lua_State *L) {
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_bmdb_core);
    lua_setfield(L, -2, "bmdb.core");
    for (int i = 0; i < bmdb_lua_modules_count; i++) {
        lua_pushlightuserdata(L, (void *)&bmdb_lua_modules[i]);
        lua_pushcclosure(L, load_embedded, 1);
        lua_setfield(L, -2, bmdb_lua_modules[i].name);
    }
    lua_pop(L, 2);
}

/* package.path: the script's own directory first, so its require()s find
 * the modules beside it wherever the host was started. */
static void set_script_path(lua_State *L, const char *script) {
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", script);
    const char *dir = dirname(buf);
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", dir, dir);
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
}

/* arg as lua.c builds it: arg[0] the script, arg[1..] what follows. */
static void set_arg(lua_State *L, int argc, char **argv) {
    lua_createtable(L, argc, 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i);
    }
    lua_setglobal(L, "arg");
}

static int exit_status = -1; /* what os.exit asked for; -1: nothing */

int lbmdb_exit_requested(int *status) {
    int s = __atomic_load_n(&exit_status, __ATOMIC_ACQUIRE);
    if (s < 0) return 0;
    *status = s;
    return 1;
}

/* os.exit in a script state: exit() from a slot or the script's thread
 * would skip ending the session (its row would stay until it expires and
 * held work would go unrecorded). So it records the status (the first
 * call wins), moves the host to cancelling, and unwinds the caller with a
 * cancelled error; the host then stops in order and exits with it. */
static int l_os_exit(lua_State *L) {
    int status = lua_isboolean(L, 1) ? (lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE)
                                     : (int)luaL_optinteger(L, 1, EXIT_SUCCESS);
    status &= 0xff; /* what the exit status can hold */
    int none = -1;
    if (__atomic_compare_exchange_n(&exit_status, &none, status, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        char buf[16];
        snprintf(buf, sizeof buf, "%d", status);
        log_kv(LOG_INFO, "os.exit called: stopping the host", "status", buf, NULL);
    }
    lifecycle_advance(HOST_CANCELLING);
    worker_wake_everyone();
    return raise_kind(L, TXE_CANCELLED, "cancelled: os.exit ends the host");
}

/* Message handler of a script's top level: notes what kind of error it
 * was (bmdb.worker raises kind "definition") before the object becomes a
 * message with a traceback. */
static int script_msgh(lua_State *L) {
    int kind = SCRIPT_RUNTIME_ERROR;
    lua_pushcfunction(L, l_is_error);
    lua_pushvalue(L, 1);
    lua_call(L, 1, 1);
    if (lua_toboolean(L, -1)) {
        lua_getfield(L, 1, "kind");
        const char *k = lua_tostring(L, -1);
        if (k && !strcmp(k, "definition")) kind = SCRIPT_DEFINITION_ERROR;
        else if (k && !strcmp(k, "cancelled")) kind = SCRIPT_CANCELLED;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_pushinteger(L, kind);
    lua_setfield(L, LUA_REGISTRYINDEX, "bmdb.error_kind");
    return lbmdb_traceback(L);
}

lua_State *lbmdb_script_state(snapshot *snap, int argc, char **argv, int *kind, char *err, size_t errlen) {
    *kind = SCRIPT_OK;
    lua_State *L = luaL_newstate();
    if (!L) {
        snprintf(err, errlen, "out of memory");
        *kind = SCRIPT_RUNTIME_ERROR;
        return NULL;
    }
    lbmdb_openlibs(L);
    /* bmdb.core now: its error objects (os.exit raises one) get their
     * metatable even in a script that never requires bmdb */
    lua_getglobal(L, "require");
    lua_pushliteral(L, "bmdb.core");
    lua_call(L, 1, 0);
    set_script_path(L, snapshot_script(snap));
    snapshot_install(L, snap);
    set_arg(L, argc, argv);
    lua_getglobal(L, "os");
    lua_pushcfunction(L, l_os_exit);
    lua_setfield(L, -2, "exit");
    lua_pop(L, 1);
    lbmdb_register_state(L);
    lua_pushcfunction(L, script_msgh);
    int rc = snapshot_load_script(L, snap);
    if (rc != 0) {
        *kind = SCRIPT_SYNTAX_ERROR;
    } else {
        for (int i = 1; i < argc; i++) lua_pushstring(L, argv[i]);
        rc = lua_pcall(L, argc - 1, 1, 1);
        if (rc != 0) {
            lua_getfield(L, LUA_REGISTRYINDEX, "bmdb.error_kind");
            *kind = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : SCRIPT_RUNTIME_ERROR;
            lua_pop(L, 1);
        }
    }
    if (rc != 0) {
        const char *msg = lua_tostring(L, -1);
        snprintf(err, errlen, "%s", msg ? msg : "(error object is not a string)");
        lbmdb_close_state(L);
        return NULL;
    }
    lua_remove(L, 1); /* the message handler; the script's result stays */
    return L;
}

void lbmdb_close_state(lua_State *L) {
    lbmdb_unregister_state(L);
    lua_close(L);
}

/* Calls require("bmdb")[fname] with nargs arguments already on the stack,
 * under the traceback handler. 0, or -1 with the message in err. */
static int call_bmdb(lua_State *L, const char *fname, int nargs, int nresults, char *err, size_t errlen) {
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, lbmdb_traceback);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "bmdb");
    if (lua_pcall(L, 1, 1, 0) != 0) {
        snprintf(err, errlen, "%s", lua_tostring(L, -1));
        lua_settop(L, base);
        return -1;
    }
    lua_getfield(L, -1, fname);
    lua_remove(L, -2);
    lua_insert(L, base + 1);        /* function below the arguments */
    lua_insert(L, base + 1);        /* handler below the function */
    if (lua_pcall(L, nargs, nresults, base + 1) != 0) {
        const char *msg = lua_tostring(L, -1);
        snprintf(err, errlen, "%s", msg ? msg : "(error object is not a string)");
        lua_settop(L, base);
        return -1;
    }
    lua_remove(L, base + 1);        /* the handler */
    return 0;
}

int lbmdb_worker_specs(lua_State *L, worker_spec **specs, char *err, size_t errlen) {
    *specs = NULL;
    lua_pushvalue(L, -1); /* the script's result */
    if (call_bmdb(L, "_specs", 1, 1, err, errlen) < 0) return -1;
    int n = lua_istable(L, -1) ? (int)lua_objlen(L, -1) : 0;
    if (n > 0) *specs = calloc((size_t)n, sizeof **specs);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, -1, i + 1);
        lua_getfield(L, -1, "process");
        snprintf((*specs)[i].process, sizeof (*specs)[i].process, "%s", lua_tostring(L, -1));
        lua_getfield(L, -2, "concurrency");
        (*specs)[i].concurrency = (int)lua_tonumber(L, -1);
        lua_pop(L, 3);
    }
    lua_pop(L, 1);
    return n;
}

/* core.generation for a slot that failed to load generation `deferred`:
 * the generation it runs until `until` (monotonic), so bmdb._serve does
 * not ask for that reload again at every boundary before then. A newer
 * generation is reported at once. Upvalues: have, deferred, until. */
static int deferred_generation(lua_State *L) {
    unsigned now = workers_generation();
    unsigned deferred = (unsigned)lua_tonumber(L, lua_upvalueindex(2));
    int defer = now == deferred && mono_now() < lua_tonumber(L, lua_upvalueindex(3));
    lua_pushnumber(L, defer ? lua_tonumber(L, lua_upvalueindex(1)) : now);
    return 1;
}

static void set_generation_fn(lua_State *L, unsigned have, unsigned deferred, double until) {
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_getfield(L, -1, "bmdb.core");
    if (lua_istable(L, -1)) {
        if (until > 0) {
            lua_pushnumber(L, have);
            lua_pushnumber(L, deferred);
            lua_pushnumber(L, until);
            lua_pushcclosure(L, deferred_generation, 3);
        } else {
            lua_pushcfunction(L, l_generation);
        }
        lua_setfield(L, -2, "generation");
    }
    lua_pop(L, 3);
}

int lbmdb_serve(lua_State *L, const char *process, int index, unsigned generation, unsigned deferred,
                double defer_until, char *err, size_t errlen) {
    set_generation_fn(L, generation, deferred, defer_until);
    lua_pushvalue(L, -1); /* the script's result */
    lua_pushstring(L, process);
    lua_pushinteger(L, index);
    lua_pushnumber(L, generation);
    if (call_bmdb(L, "_serve", 4, 1, err, errlen) < 0) return SERVE_ERROR;
    const char *r = lua_tostring(L, -1);
    int out = !r ? SERVE_ERROR : !strcmp(r, "reload") ? SERVE_RELOAD : !strcmp(r, "removed") ? SERVE_REMOVED : SERVE_STOP;
    if (out == SERVE_ERROR) snprintf(err, errlen, "bmdb._serve returned %s", r ? r : "nothing");
    lua_pop(L, 1);
    return out;
}

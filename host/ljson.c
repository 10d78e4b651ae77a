/* ljson.c -- bmdb.json's codec: core.json_encode, core.json_decode,
 * core.json_null and core.json_array (the metatable that marks arrays).
 *
 * Why not Debian's lua-cjson or dkjson: both print numbers with 14
 * significant digits (2^53 comes out as 9.007199254741e+15, 0.1 + 0.2 as
 * 0.3), and cjson writes an empty array as {}. Bodies pass machine ids,
 * byte counts and request bodies through JSON, and idempotency keys are
 * built from encoded text, so the codec must keep every number, keep []
 * apart from {}, and write the same value the same way every time (object
 * keys sorted). docs/talking-to-the-world.md, "JSON: bmdb.json", is the contract.
 *
 * Errors longjmp (lua_error), so nothing here is malloc'ed: the encoder's
 * output and its sorted keys live in userdata on the Lua stack (a buffer
 * grows by replacing its userdata), the decoder builds strings in a
 * luaL_Buffer; whatever is abandoned is garbage the collector takes. The
 * encoder reads tables raw and runs no Lua code, so nothing it traverses
 * can change under it. */
#include <lauxlib.h>
#include <langinfo.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lcore.h"
#include "lerror.h"

#define ARRAY_MT "bmdb.json.array"
#define MAX_DEPTH 1000

/* printf and strtod follow LC_NUMERIC: the host never sets it, but a
 * script's os.setlocale could, and "0,1" must not pass for a number.
 * (nl_langinfo, not localeconv: that one writes a static, a race between
 * slots.) */
static void check_locale(lua_State *L) {
    const char *point = nl_langinfo(RADIXCHAR);
    if (point[0] != '.' || point[1])
        lerror_raise_kind(L, BMDB_E_JSON, "json: the locale's decimal point is not '.' (os.setlocale changed LC_NUMERIC)");
}

static int is_array_mt(lua_State *L, int idx, int mt) {
    if (!lua_getmetatable(L, idx)) return 0;
    int same = lua_rawequal(L, -1, mt);
    lua_pop(L, 1);
    return same;
}

/* ---- numbers ----------------------------------------------------------- */

/* x as JSON into out (at least 32 bytes): its length, or 0 for NaN and
 * infinities. Integral values below 1e17 print whole ("%.0f" is exact for
 * them); others as the shortest of 15, 16 or 17 digits that reads back as
 * the same double. */
static int fmt_number(double x, char *out) {
    if (isnan(x) || isinf(x)) return 0;
    if (x == floor(x) && fabs(x) < 1e17) return snprintf(out, 32, "%.0f", x);
    int n = 0;
    for (int prec = 15; prec <= 17; prec++) {
        n = snprintf(out, 32, "%.*g", prec, x);
        if (strtod(out, NULL) == x) break;
    }
    return n;
}

/* ---- the encoder's output ---------------------------------------------- */

/* Bytes in a userdata at stack index idx; growing makes a bigger one and
 * puts it in the same slot. */
typedef struct {
    lua_State *L;
    char *p;
    size_t len, cap;
    int idx;
} jbuf;

static void jbuf_grow(jbuf *b, size_t need) {
    size_t cap = b->cap;
    while (cap - b->len < need) cap *= 2;
    char *p = lua_newuserdata(b->L, cap);
    memcpy(p, b->p, b->len);
    lua_replace(b->L, b->idx);
    b->p = p;
    b->cap = cap;
}

static inline void jbuf_add(jbuf *b, const char *s, size_t n) {
    if (b->cap - b->len < n) jbuf_grow(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static inline void jbuf_addc(jbuf *b, char c) {
    if (b->len == b->cap) jbuf_grow(b, 1);
    b->p[b->len++] = c;
}

/* s as a JSON string: `"`, `\` and control characters escaped, every
 * other byte (UTF-8 included) as it is. */
static void add_string(jbuf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    jbuf_addc(b, '"');
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        jbuf_add(b, s + run, i - run);
        run = i + 1;
        char e[6] = {'\\', 0};
        size_t el = 2;
        switch (c) {
        case '"': e[1] = '"'; break;
        case '\\': e[1] = '\\'; break;
        case '\n': e[1] = 'n'; break;
        case '\t': e[1] = 't'; break;
        case '\r': e[1] = 'r'; break;
        case '\b': e[1] = 'b'; break;
        case '\f': e[1] = 'f'; break;
        default: memcpy(e + 1, "u00", 3), e[4] = hex[c >> 4], e[5] = hex[c & 15], el = 6;
        }
        jbuf_add(b, e, el);
    }
    jbuf_add(b, s + run, n - run);
    jbuf_addc(b, '"');
}

/* ---- encoding ---------------------------------------------------------- */

/* One table being written: which table (cycles) and the key of the
 * element being written (the error's path). kind 0: no element yet. */
typedef struct {
    const void *tbl;
    char kind; /* 'i' array index, 'n' number key, 's' string key */
    double num;
    const char *key; /* anchored by the table */
    size_t klen;
} frame;

typedef struct {
    lua_State *L;
    jbuf b;
    int mt; /* stack index of the array metatable */
    int depth;
    frame f[MAX_DEPTH];
} encoder;

static void add_segment(luaL_Buffer *m, const frame *f) {
    char num[32];
    if (f->kind == 's') {
        int ident = f->klen > 0 && !(f->key[0] >= '0' && f->key[0] <= '9');
        for (size_t i = 0; ident && i < f->klen; i++) {
            unsigned char c = (unsigned char)f->key[i];
            ident = c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        }
        if (ident) {
            luaL_addchar(m, '.');
            luaL_addlstring(m, f->key, f->klen);
        } else {
            luaL_addstring(m, "[\"");
            for (size_t i = 0; i < f->klen; i++) {
                unsigned char c = (unsigned char)f->key[i];
                if (c == '"' || c == '\\') luaL_addchar(m, '\\');
                if (c < 0x20) luaL_addchar(m, '?');
                else luaL_addchar(m, c);
            }
            luaL_addstring(m, "\"]");
        }
        return;
    }
    luaL_addchar(m, '[');
    if (!fmt_number(f->num, num)) strcpy(num, "?");
    luaL_addstring(m, num);
    luaL_addchar(m, ']');
}

/* Raises {kind="json", message="json: <what> at <path>", path=}. The
 * path is JSONPath-like, indices as Lua counts them: $.devices[2].cb. A
 * very deep one keeps its first and last 10 steps. */
static int encode_fail(encoder *e, const char *what) {
    lua_State *L = e->L;
    int n = 0, keyed[MAX_DEPTH];
    for (int i = 0; i < e->depth; i++)
        if (e->f[i].kind) keyed[n++] = i;
    luaL_Buffer m;
    luaL_buffinit(L, &m);
    luaL_addchar(&m, '$');
    for (int j = 0; j < n; j++) {
        if (n > 24 && j == 10) {
            lua_pushfstring(L, "...(%d more)...", n - 20);
            luaL_addvalue(&m);
            j = n - 10;
        }
        add_segment(&m, &e->f[keyed[j]]);
    }
    luaL_pushresult(&m);
    const char *path = lua_tostring(L, -1);
    lua_pushfstring(L, "json: %s at %s", what, path);
    lerror_push_kind(L, BMDB_E_JSON, lua_tostring(L, -1));
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "path");
    return lua_error(L);
}

typedef struct {
    const char *s;
    size_t len;
    double num;
    int isnum;
} entry;

static int entry_cmp(const void *a, const void *b) {
    const entry *x = a, *y = b;
    int c = memcmp(x->s, y->s, x->len < y->len ? x->len : y->len);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

static void encode_value(encoder *e, int idx);

static void encode_object(encoder *e, int idx, size_t n) {
    lua_State *L = e->L;
    frame *f = &e->f[e->depth - 1];
    entry *es = lua_newuserdata(L, n * sizeof *es);
    lua_newtable(L); /* anchors the text of number keys */
    int anchor = lua_gettop(L);
    size_t i = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        entry *x = &es[i++];
        if (lua_type(L, -2) == LUA_TNUMBER) {
            char num[32];
            x->num = lua_tonumber(L, -2);
            x->isnum = 1;
            int len = fmt_number(x->num, num);
            if (!len) encode_fail(e, "cannot encode an infinite number as a table key");
            lua_pushlstring(L, num, len);
            x->s = lua_tolstring(L, -1, &x->len);
            lua_rawseti(L, anchor, (int)i);
        } else {
            x->s = lua_tolstring(L, -2, &x->len);
            x->isnum = 0;
        }
        lua_pop(L, 1);
    }
    qsort(es, n, sizeof *es, entry_cmp);
    jbuf_addc(&e->b, '{');
    for (i = 0; i < n; i++) {
        entry *x = &es[i];
        f->kind = x->isnum ? 'n' : 's', f->num = x->num, f->key = x->s, f->klen = x->len;
        if (i > 0 && entry_cmp(x, x - 1) == 0) {
            f->kind = 0;
            lua_pushfstring(L, "two keys of one table are both written as \"%s\"", x->s);
            encode_fail(e, lua_tostring(L, -1));
        }
        if (i > 0) jbuf_addc(&e->b, ',');
        add_string(&e->b, x->s, x->len);
        jbuf_addc(&e->b, ':');
        if (x->isnum) lua_pushnumber(L, x->num);
        else lua_pushlstring(L, x->s, x->len);
        lua_rawget(L, idx);
        encode_value(e, lua_gettop(L));
        lua_pop(L, 1);
    }
    jbuf_addc(&e->b, '}');
    lua_pop(L, 2);
}

static void encode_table(encoder *e, int idx) {
    lua_State *L = e->L;
    const void *t = lua_topointer(L, idx);
    for (int i = 0; i < e->depth; i++)
        if (e->f[i].tbl == t) encode_fail(e, "cannot encode a table that contains itself");
    if (e->depth == MAX_DEPTH) encode_fail(e, "cannot encode tables nested deeper than 1000");
    if (!lua_checkstack(L, 8)) encode_fail(e, "out of Lua stack");
    frame *f = &e->f[e->depth++];
    f->tbl = t;
    f->kind = 0;
    /* What the keys are: exactly 1..n makes an array. */
    size_t n = 0;
    double max = 0;
    int positive = 1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        n++;
        int kt = lua_type(L, -1);
        if (kt == LUA_TNUMBER) {
            double k = lua_tonumber(L, -1);
            if (k >= 1 && k == floor(k) && !isinf(k)) {
                if (k > max) max = k;
                continue;
            }
        } else if (kt != LUA_TSTRING) {
            lua_pushfstring(L, "cannot encode a table key of type %s", luaL_typename(L, -1));
            encode_fail(e, lua_tostring(L, -1));
        }
        positive = 0;
    }
    int marked = is_array_mt(L, idx, e->mt);
    if (marked || (n > 0 && positive)) {
        if (!positive) encode_fail(e, "an array (bmdb.json.array) has a key that is not an index");
        if (max != (double)n) {
            lua_pushfstring(L, "cannot encode a sparse array (%d elements, largest index %f)", (int)n, max);
            encode_fail(e, lua_tostring(L, -1));
        }
        jbuf_addc(&e->b, '[');
        for (size_t i = 1; i <= n; i++) {
            if (i > 1) jbuf_addc(&e->b, ',');
            f->kind = 'i', f->num = (double)i;
            lua_rawgeti(L, idx, (int)i);
            encode_value(e, lua_gettop(L));
            lua_pop(L, 1);
        }
        jbuf_addc(&e->b, ']');
    } else if (n == 0) {
        jbuf_add(&e->b, "{}", 2);
    } else {
        encode_object(e, idx, n);
    }
    e->depth--;
}

static void encode_value(encoder *e, int idx) {
    lua_State *L = e->L;
    char num[32];
    int len;
    switch (lua_type(L, idx)) {
    case LUA_TNIL: jbuf_add(&e->b, "null", 4); return;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx)) jbuf_add(&e->b, "true", 4);
        else jbuf_add(&e->b, "false", 5);
        return;
    case LUA_TNUMBER:
        if (!(len = fmt_number(lua_tonumber(L, idx), num)))
            encode_fail(e, isnan(lua_tonumber(L, idx)) ? "cannot encode NaN" : "cannot encode an infinite number");
        jbuf_add(&e->b, num, len);
        return;
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        add_string(&e->b, s, n);
        return;
    }
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) {
            jbuf_add(&e->b, "null", 4);
            return;
        }
        break;
    case LUA_TTABLE: encode_table(e, idx); return;
    }
    lua_pushfstring(L, "cannot encode a %s", luaL_typename(L, idx));
    encode_fail(e, lua_tostring(L, -1));
}

/* core.json_encode(v) -> string */
static int l_encode(lua_State *L) {
    if (lua_gettop(L) == 0) return lerror_argerror(L, 1, "value expected");
    check_locale(L);
    lua_settop(L, 1);
    encoder e; /* 40 KB: the host's threads have the default stack (8 MB) */
    e.L = L;
    e.depth = 0;
    e.b.L = L;
    e.b.cap = 256;
    e.b.len = 0;
    e.b.p = lua_newuserdata(L, e.b.cap);
    e.b.idx = lua_gettop(L);
    luaL_getmetatable(L, ARRAY_MT);
    e.mt = lua_gettop(L);
    encode_value(&e, 1);
    lua_pushlstring(L, e.b.p, e.b.len);
    return 1;
}

/* ---- decoding ---------------------------------------------------------- */

typedef struct {
    lua_State *L;
    const char *s, *p, *end;
    int depth;
    int mt; /* stack index of the array metatable */
} decoder;

/* Raises {kind="json", message="json: <what> at line L, column C (byte
 * B)", line=, column=, byte=} for the byte at `at` (columns count bytes,
 * from 1). */
static int decode_fail(decoder *d, const char *at, const char *what) {
    int line = 1;
    const char *bol = d->s;
    for (const char *q = d->s; q < at; q++)
        if (*q == '\n') line++, bol = q + 1;
    int column = (int)(at - bol) + 1, byte = (int)(at - d->s) + 1;
    char msg[512];
    snprintf(msg, sizeof msg, "json: %s at line %d, column %d (byte %d)", what, line, column, byte);
    lerror_push_kind(d->L, BMDB_E_JSON, msg);
    lua_pushinteger(d->L, line);
    lua_setfield(d->L, -2, "line");
    lua_pushinteger(d->L, column);
    lua_setfield(d->L, -2, "column");
    lua_pushinteger(d->L, byte);
    lua_setfield(d->L, -2, "byte");
    return lua_error(d->L);
}

static int unexpected(decoder *d, const char *at) {
    if (at >= d->end) return decode_fail(d, at, "unexpected end of input");
    char what[64];
    unsigned char c = (unsigned char)*at;
    if (c > 0x20 && c < 0x7f) snprintf(what, sizeof what, "unexpected character '%c'", c);
    else snprintf(what, sizeof what, "unexpected byte 0x%02x", c);
    return decode_fail(d, at, what);
}

static void skip_ws(decoder *d) {
    while (d->p < d->end && (*d->p == ' ' || *d->p == '\t' || *d->p == '\n' || *d->p == '\r')) d->p++;
}

static void expect(decoder *d, char c) {
    skip_ws(d);
    if (d->p >= d->end || *d->p != c) unexpected(d, d->p);
    d->p++;
}

static int hex4(decoder *d, const char *q) {
    int v = 0;
    for (int i = 0; i < 4; i++, q++) {
        if (q >= d->end) unexpected(d, q);
        int c = (unsigned char)*q;
        int h = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (h < 0) unexpected(d, q);
        v = v * 16 + h;
    }
    return v;
}

static void add_utf8(luaL_Buffer *b, unsigned cp) {
    if (cp < 0x80) {
        luaL_addchar(b, (char)cp);
    } else if (cp < 0x800) {
        luaL_addchar(b, (char)(0xc0 | cp >> 6));
        luaL_addchar(b, (char)(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
        luaL_addchar(b, (char)(0xe0 | cp >> 12));
        luaL_addchar(b, (char)(0x80 | ((cp >> 6) & 0x3f)));
        luaL_addchar(b, (char)(0x80 | (cp & 0x3f)));
    } else {
        luaL_addchar(b, (char)(0xf0 | cp >> 18));
        luaL_addchar(b, (char)(0x80 | ((cp >> 12) & 0x3f)));
        luaL_addchar(b, (char)(0x80 | ((cp >> 6) & 0x3f)));
        luaL_addchar(b, (char)(0x80 | (cp & 0x3f)));
    }
}

/* At the opening quote; pushes the string. Bytes >= 0x80 are kept as
 * they are (not checked as UTF-8); control characters must be escaped. */
static void decode_string(decoder *d) {
    const char *start = ++d->p, *q = start;
    while (q < d->end && *q != '"' && *q != '\\' && (unsigned char)*q >= 0x20) q++;
    if (q < d->end && *q == '"') { /* no escapes: the common case */
        lua_pushlstring(d->L, start, (size_t)(q - start));
        d->p = q + 1;
        return;
    }
    luaL_Buffer b;
    luaL_buffinit(d->L, &b);
    luaL_addlstring(&b, start, (size_t)(q - start));
    for (;;) {
        if (q >= d->end) decode_fail(d, q, "unexpected end of input in a string");
        unsigned char c = (unsigned char)*q;
        if (c == '"') break;
        if (c < 0x20) {
            char what[64];
            snprintf(what, sizeof what, "unescaped control character 0x%02x in a string", c);
            decode_fail(d, q, what);
        }
        if (c != '\\') {
            const char *run = q;
            while (q < d->end && *q != '"' && *q != '\\' && (unsigned char)*q >= 0x20) q++;
            luaL_addlstring(&b, run, (size_t)(q - run));
            continue;
        }
        const char *esc = q++;
        if (q >= d->end) unexpected(d, q);
        switch (*q++) {
        case '"': luaL_addchar(&b, '"'); break;
        case '\\': luaL_addchar(&b, '\\'); break;
        case '/': luaL_addchar(&b, '/'); break;
        case 'b': luaL_addchar(&b, '\b'); break;
        case 'f': luaL_addchar(&b, '\f'); break;
        case 'n': luaL_addchar(&b, '\n'); break;
        case 'r': luaL_addchar(&b, '\r'); break;
        case 't': luaL_addchar(&b, '\t'); break;
        case 'u': {
            unsigned cp = (unsigned)hex4(d, q);
            q += 4;
            if (cp >= 0xdc00 && cp <= 0xdfff) decode_fail(d, esc, "lone low surrogate in a \\u escape");
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (q + 1 >= d->end || q[0] != '\\' || q[1] != 'u')
                    decode_fail(d, esc, "lone high surrogate in a \\u escape");
                unsigned lo = (unsigned)hex4(d, q + 2);
                if (lo < 0xdc00 || lo > 0xdfff) decode_fail(d, esc, "lone high surrogate in a \\u escape");
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                q += 6;
            }
            add_utf8(&b, cp);
            break;
        }
        default: {
            char what[64];
            unsigned char c = (unsigned char)q[-1];
            if (c > 0x20 && c < 0x7f) snprintf(what, sizeof what, "invalid escape '\\%c' in a string", c);
            else snprintf(what, sizeof what, "invalid escape (\\ and byte 0x%02x) in a string", c);
            decode_fail(d, esc, what);
        }
        }
    }
    luaL_pushresult(&b);
    d->p = q + 1;
}

/* RFC 8259's number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?,
 * checked here, converted by strtod (correctly rounded). */
static void decode_number(decoder *d) {
    const char *start = d->p, *q = d->p;
#define DIGITS()                                                            \
    do {                                                                    \
        if (q >= d->end || *q < '0' || *q > '9') unexpected(d, q);          \
        while (q < d->end && *q >= '0' && *q <= '9') q++;                   \
    } while (0)
    if (*q == '-') q++;
    if (q < d->end && *q == '0') q++;
    else DIGITS();
    if (q < d->end && *q == '.') {
        q++;
        DIGITS();
    }
    if (q < d->end && (*q == 'e' || *q == 'E')) {
        q++;
        if (q < d->end && (*q == '+' || *q == '-')) q++;
        DIGITS();
    }
#undef DIGITS
    /* strtod reads a terminated copy: it must see the token alone. */
    size_t n = (size_t)(q - start);
    char small[64];
    const char *text = small;
    if (n < sizeof small) {
        memcpy(small, start, n);
        small[n] = 0;
    } else {
        lua_pushlstring(d->L, start, n);
        text = lua_tostring(d->L, -1);
    }
    double x = strtod(text, NULL);
    if (text != small) lua_pop(d->L, 1);
    if (isinf(x)) {
        char what[96];
        snprintf(what, sizeof what, "number out of range (%.*s%s)", n > 40 ? 40 : (int)n, start, n > 40 ? "..." : "");
        decode_fail(d, start, what);
    }
    lua_pushnumber(d->L, x);
    d->p = q;
}

static void literal(decoder *d, const char *word, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (d->p + i >= d->end || d->p[i] != word[i]) unexpected(d, d->p + i);
    d->p += n;
}

static void decode_value(decoder *d);

static void enter(decoder *d) {
    if (d->depth == MAX_DEPTH) decode_fail(d, d->p, "nesting deeper than 1000");
    if (!lua_checkstack(d->L, 6)) decode_fail(d, d->p, "out of Lua stack");
    d->depth++;
    d->p++;
}

static void decode_array(decoder *d) {
    enter(d);
    lua_newtable(d->L);
    lua_pushvalue(d->L, d->mt);
    lua_setmetatable(d->L, -2);
    skip_ws(d);
    if (d->p < d->end && *d->p == ']') {
        d->p++;
    } else {
        for (int i = 1;; i++) {
            decode_value(d);
            lua_rawseti(d->L, -2, i);
            skip_ws(d);
            if (d->p < d->end && *d->p == ']') {
                d->p++;
                break;
            }
            expect(d, ',');
        }
    }
    d->depth--;
}

static void decode_object(decoder *d) {
    enter(d);
    lua_newtable(d->L);
    skip_ws(d);
    if (d->p < d->end && *d->p == '}') {
        d->p++;
    } else {
        for (;;) {
            skip_ws(d);
            if (d->p >= d->end || *d->p != '"') unexpected(d, d->p);
            const char *at = d->p;
            decode_string(d);
            lua_pushvalue(d->L, -1);
            lua_rawget(d->L, -3);
            if (!lua_isnil(d->L, -1)) {
                size_t kl;
                const char *k = lua_tolstring(d->L, -2, &kl);
                char what[128];
                snprintf(what, sizeof what, "duplicate key \"%.*s%s\"", kl > 60 ? 60 : (int)kl, k, kl > 60 ? "..." : "");
                decode_fail(d, at, what);
            }
            lua_pop(d->L, 1);
            expect(d, ':');
            decode_value(d);
            lua_rawset(d->L, -3);
            skip_ws(d);
            if (d->p < d->end && *d->p == '}') {
                d->p++;
                break;
            }
            expect(d, ',');
        }
    }
    d->depth--;
}

static void decode_value(decoder *d) {
    skip_ws(d);
    if (d->p >= d->end) unexpected(d, d->p);
    switch (*d->p) {
    case '{': decode_object(d); return;
    case '[': decode_array(d); return;
    case '"': decode_string(d); return;
    case 't': literal(d, "true", 4), lua_pushboolean(d->L, 1); return;
    case 'f': literal(d, "false", 5), lua_pushboolean(d->L, 0); return;
    case 'n': literal(d, "null", 4), lua_pushlightuserdata(d->L, NULL); return;
    default:
        if (*d->p == '-' || (*d->p >= '0' && *d->p <= '9')) decode_number(d);
        else unexpected(d, d->p);
    }
}

/* core.json_decode(s) -> value */
static int l_decode(lua_State *L) {
    if (lua_type(L, 1) != LUA_TSTRING)
        return lerror_argerror(L, 1, "string expected, got %s", luaL_typename(L, 1));
    check_locale(L);
    lua_settop(L, 1);
    size_t n;
    decoder d = {.L = L, .depth = 0};
    d.s = d.p = lua_tolstring(L, 1, &n);
    d.end = d.s + n;
    luaL_getmetatable(L, ARRAY_MT);
    d.mt = lua_gettop(L);
    decode_value(&d);
    skip_ws(&d);
    if (d.p < d.end) unexpected(&d, d.p);
    return 1;
}

static const luaL_Reg funcs[] = {{"json_encode", l_encode}, {"json_decode", l_decode}, {NULL, NULL}};

void ljson_register(lua_State *L) {
    luaL_register(L, NULL, funcs);
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "json_null");
    luaL_newmetatable(L, ARRAY_MT);
    lua_setfield(L, -2, "json_array");
}

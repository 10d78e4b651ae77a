/* lvalue.c -- Lua values to statement parameters, results to Lua values.
 *
 * Like lauxlib.c, this file only translates: the rules are docs/api.md's
 * "Parameters" and "Results". Nothing here runs SQL; lcore.c and lboot.c
 * hand it a statement's arguments and its result. */
#include "lvalue.h"

#include <lauxlib.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lerror.h"


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

void lvalue_format_number(double d, char *buf, size_t len) {
    if (isnan(d)) snprintf(buf, len, "NaN");
    else if (isinf(d)) snprintf(buf, len, "%s", d > 0 ? "Infinity" : "-Infinity");
    else if (d == 0 && signbit(d)) snprintf(buf, len, "-0"); /* float8 keeps the sign */
    else if (d == floor(d) && fabs(d) < 9.2e18)
        snprintf(buf, len, "%lld", (long long)d); /* exact integers as integers: "3", not "3.0" */
    else format_double(d, buf, len);
}

/* The type of every argument, checked before anything moves on the
 * stack, so an argument error names the argument the caller wrote. */
static void check_types(lua_State *L, const char *fname, int first, int n) {
    for (int i = 0; i < n; i++) {
        int t = lua_type(L, first + i);
        if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TSTRING && t != LUA_TNUMBER)
            lerror_argerror_method(L, first + i, fname, "parameter $%d: unsupported type %s (expected string, number, "
                            "boolean or nil)", i + 1, luaL_typename(L, first + i));
        if (t == LUA_TSTRING && lua_objlen(L, first + i) > INT_MAX)
            lerror_argerror_method(L, first + i, fname, "parameter $%d is too long", i + 1);
    }
}

void lvalue_params(lua_State *L, const char *fname, const char *sql, int first, lvalue_params_t *p) {
    int n = lua_gettop(L) - first + 1;
    int want = max_param(sql);
    if (n < want)
        lerror_argerror_method(L, first + n, fname, "parameter $%d is missing: the query uses $1..$%d, got %d "
                        "parameter%s", n + 1, want, n, n == 1 ? "" : "s");
    if (n > want)
        lerror_argerror_method(L, first + want, fname, "no parameter $%d: the query uses %d parameter%s, got %d",
                        want + 1, want, want == 1 ? "" : "s", n);
    check_types(L, fname, first, n);
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
        case LUA_TBOOLEAN: p->values[i] = lua_toboolean(L, idx) ? "true" : "false"; break;
        case LUA_TSTRING:
            p->values[i] = lua_tolstring(L, idx, &len);
            if (memchr(p->values[i], '\0', len)) {
                p->lengths[i] = (int)len;
                p->formats[i] = 1;
            }
            break;
        case LUA_TNUMBER: {
            char buf[40];
            lvalue_format_number(lua_tonumber(L, idx), buf, sizeof buf);
            lua_pushstring(L, buf);
            lua_replace(L, idx); /* keep the text alive on the stack */
            p->values[i] = lua_tostring(L, idx);
            break;
        }
        default: p->values[i] = NULL; break; /* nil: SQL NULL */
        }
    }
}

void lvalue_push_value(lua_State *L, const PGresult *r, int row, int col) {
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
        if (!bytes) lerror_raise_kind(L, BMDB_E_MEMORY, "out of memory decoding a bytea column");
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
        lvalue_push_value(L, r, row, c);
        lua_setfield(L, -2, PQfname(r, c));
    }
}

int lvalue_push_result(lua_State *L, const char *fname, PGresult *r) {
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
            return lerror_raise_kind(L, BMDB_E_USAGE, "one: the query returned %d rows, expected at most one", rows);
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

const char *lvalue_transaction_control(const char *sql, char *name, size_t len) {
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


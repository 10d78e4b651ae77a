/* lerror.c -- bmdb error objects: every failure a bmdb call reports.
 *
 * See lerror.h. The wording of argument errors is luaL_argerror's, so a
 * bmdb call reads like any Lua library's; only the value raised differs
 * (an object of kind usage instead of a string). The kinds' constants,
 * and core.kinds made from the same list. */
#include "lerror.h"

#include <lauxlib.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define BMDB_E_DEFINE(id, name, meaning) const char BMDB_E_##id[] = name;
BMDB_ERROR_KINDS(BMDB_E_DEFINE)
#undef BMDB_E_DEFINE

static const char *kind_name(tx_error_kind k) {
    switch (k) {
    case TXE_SQL: return BMDB_E_SQL;
    case TXE_CONNECTION: return BMDB_E_CONNECTION;
    case TXE_SESSION_EXPIRED: return BMDB_E_SESSION_EXPIRED;
    case TXE_CANCELED: return BMDB_E_CANCELED;
    case TXE_CLOSED: return BMDB_E_CLOSED;
    case TXE_LOST: return BMDB_E_LOST;
    case TXE_MEMORY: return BMDB_E_MEMORY;
    case TXE_NONE: break;
    }
    return "error"; /* not a kind: every tx_error that is raised sets one */
}

static void set_field(lua_State *L, const char *k, const char *v) {
    if (v && *v) {
        lua_pushstring(L, v);
        lua_setfield(L, -2, k);
    }
}

void lerror_push(lua_State *L, const tx_error *e) {
    lua_createtable(L, 0, 6);
    set_field(L, "kind", kind_name(e->kind));
    set_field(L, "sqlstate", e->sqlstate);
    set_field(L, "message", e->message);
    set_field(L, "detail", e->detail);
    set_field(L, "hint", e->hint);
    if (e->outcome_unknown) set_field(L, "outcome", "unknown");
    if (e->stale_statement) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "stale_statement");
    }
    if (e->deferred) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "deferred");
    }
    luaL_getmetatable(L, LERROR_MT);
    lua_setmetatable(L, -2);
}

void lerror_push_kind(lua_State *L, const char *kind, const char *msg) {
    lua_createtable(L, 0, 3);
    set_field(L, "kind", kind);
    set_field(L, "message", msg);
    luaL_getmetatable(L, LERROR_MT);
    lua_setmetatable(L, -2);
}

int lerror_raise(lua_State *L, const tx_error *e) {
    lerror_push(L, e);
    return lua_error(L);
}

int lerror_raise_kind(lua_State *L, const char *kind, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    lerror_push_kind(L, kind, msg);
    return lua_error(L);
}

int lerror_raise_where(lua_State *L, const char *kind, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    luaL_where(L, 1);
    return lerror_raise_kind(L, kind, "%s%s", lua_tostring(L, -1), msg);
}

/* luaL_argerror, word for word, raising an object of kind usage. When
 * Lua cannot name the function (a tail call), fname and method say what
 * the caller called, so the message still names it. */
static int argerror(lua_State *L, int narg, const char *fname, int method, const char *extra) {
    lua_Debug ar;
    const char *name = NULL;
    if (lua_getstack(L, 0, &ar)) {
        lua_getinfo(L, "n", &ar);
        name = ar.name;
        if (name) method = ar.namewhat && strcmp(ar.namewhat, "method") == 0;
    }
    if (!name) name = fname ? fname : "?";
    if (method) narg--;
    luaL_where(L, 1);
    if (narg == 0) lua_pushfstring(L, "calling '%s' on bad self (%s)", name, extra);
    else lua_pushfstring(L, "bad argument #%d to '%s' (%s)", narg, name, extra);
    lua_concat(L, 2);
    lerror_push_kind(L, BMDB_E_USAGE, lua_tostring(L, -1));
    return lua_error(L);
}

int lerror_argerror(lua_State *L, int narg, const char *fmt, ...) {
    char extra[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(extra, sizeof extra, fmt, ap);
    va_end(ap);
    return argerror(L, narg, NULL, 0, extra);
}

int lerror_argerror_method(lua_State *L, int narg, const char *fname, const char *fmt, ...) {
    char extra[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(extra, sizeof extra, fmt, ap);
    va_end(ap);
    return argerror(L, narg, fname, 1, extra);
}

static int type_error(lua_State *L, int narg, const char *expected) {
    return lerror_argerror(L, narg, "%s expected, got %s", expected, luaL_typename(L, narg));
}

const char *lerror_checkstring(lua_State *L, int narg) {
    const char *s = lua_type(L, narg) == LUA_TSTRING || lua_type(L, narg) == LUA_TNUMBER ? lua_tostring(L, narg)
                                                                                        : NULL;
    if (!s) type_error(L, narg, "string");
    return s;
}

double lerror_checknumber(lua_State *L, int narg) {
    if (lua_type(L, narg) != LUA_TNUMBER) type_error(L, narg, "number");
    return lua_tonumber(L, narg);
}

void *lerror_checkudata(lua_State *L, int narg, const char *mt, const char *what) {
    void *p = lua_touserdata(L, narg);
    if (p && lua_getmetatable(L, narg)) {
        luaL_getmetatable(L, mt);
        int same = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
        if (same) return p;
    }
    type_error(L, narg, what);
    return NULL;
}

static int lerror_is(lua_State *L, int idx) {
    int is = 0;
    if (lua_istable(L, idx) && lua_getmetatable(L, idx)) {
        luaL_getmetatable(L, LERROR_MT);
        is = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
    }
    return is;
}

const char *lerror_kind(lua_State *L, int idx) {
    if (!lerror_is(L, idx)) return NULL;
    lua_getfield(L, idx, "kind");
    const char *k = lua_tostring(L, -1); /* the object keeps the string alive */
    lua_pop(L, 1);
    return k;
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

void lerror_open(lua_State *L) {
    luaL_newmetatable(L, LERROR_MT);
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
}

/* core.kinds' __index: a name that is no kind is a mistake, said at once
 * rather than raising an error of kind nil later. */
static int kinds_unknown(lua_State *L) {
    return lerror_raise_kind(L, BMDB_E_USAGE, "bmdb.core.kinds: %s is not an error kind",
                             lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : luaL_typename(L, 2));
}

/* core.error(kind, message): an error object, for bmdb.lua to raise. */
static int l_error(lua_State *L) {
    lerror_push_kind(L, luaL_checkstring(L, 1), luaL_checkstring(L, 2));
    return 1;
}

static int l_is_error(lua_State *L) {
    lua_pushboolean(L, lerror_is(L, 1));
    return 1;
}

void lerror_register(lua_State *L) {
    static const luaL_Reg funcs[] = {{"error", l_error}, {"is_error", l_is_error}, {NULL, NULL}};
    luaL_register(L, NULL, funcs);
    static const char *const names[] = {
#define BMDB_E_NAME(id, name, meaning) BMDB_E_##id,
        BMDB_ERROR_KINDS(BMDB_E_NAME)
#undef BMDB_E_NAME
    };
    lua_createtable(L, 0, (int)(sizeof names / sizeof *names));
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        lua_pushstring(L, names[i]);
        lua_setfield(L, -2, names[i]);
    }
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, kinds_unknown);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
    lua_setfield(L, -2, "kinds");
}


/* debug.traceback(msg, level) pushed, as lua.c's message handler calls it. */
static void push_traceback(lua_State *L, const char *msg, int level) {
    lua_getglobal(L, "debug");
    lua_getfield(L, -1, "traceback");
    lua_remove(L, -2);
    lua_pushstring(L, msg);
    lua_pushinteger(L, level);
    lua_call(L, 2, 1);
}

int lerror_traceback(lua_State *L) {
    if (!lerror_is(L, 1)) {
        const char *msg = NULL;
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) msg = lua_tostring(L, -1);
        else msg = lua_tostring(L, 1);
        if (!msg) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        lerror_push_kind(L, BMDB_E_RUNTIME, msg);
        lua_replace(L, 1);
    }
    lua_getfield(L, 1, "traceback");
    int has = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (!has) {
        push_traceback(L, "", 2);
        const char *tb = lua_tostring(L, -1);
        if (tb && *tb == '\n') tb++; /* debug.traceback("") starts with one */
        lua_pushstring(L, tb);
        lua_setfield(L, 1, "traceback");
        lua_pop(L, 1);
    }
    lua_settop(L, 1);
    return 1;
}

void lerror_text(lua_State *L, int idx, char *buf, size_t len) {
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    const char *msg = NULL, *tb = NULL;
    if (luaL_callmeta(L, idx, "__tostring")) msg = lua_tostring(L, -1);
    else lua_pushnil(L);
    if (!msg) msg = lua_tostring(L, idx);
    if (lua_istable(L, idx)) lua_getfield(L, idx, "traceback");
    else lua_pushnil(L);
    tb = lua_tostring(L, -1);
    snprintf(buf, len, "%s%s%s", msg ? msg : "(error object is not a string)", tb ? "\n" : "", tb ? tb : "");
    lua_pop(L, 2);
}

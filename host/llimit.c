/* llimit.c -- bmdb.limit as bmdb.core sees it (limit.h): the fenced wait
 * of a take, the guard that gives a place back whatever happens, the
 * release, and the wait metrics. Policy (the SQL of takes, specs, when to
 * wait how long) is lua/bmdb/limit.lua's.
 *
 * Why the guard is C: a body whose lock is taken away gets a hook that
 * raises "lost" at its next Lua call or instruction (lstate.c). After a
 * bmdb call raised in C, that is whatever Lua runs next, such as the line
 * of a Lua cleanup that would have given the place back, or a message
 * handler (whose error then replaces the one it handles: "error in error
 * handling"). Here no Lua runs between the end of the protected call and
 * the release, and the calls have no message handler: fn's error comes
 * back exactly as raised (its traceback is the one its catcher takes). */
#include <lauxlib.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <uuid/uuid.h>

#include "iofence.h"
#include "lcore.h"
#include "lerror.h"
#include "lifecycle.h"
#include "limit.h"
#include "log.h"
#include "metrics.h"

/* core.limit_gen(name) -> the generation a later wait compares */
static int l_limit_gen(lua_State *L) {
    lua_pushnumber(L, (lua_Number)limit_gen(lerror_checkstring(L, 1)));
    return 1;
}

/* core.limit_wait(name, seconds, session|nil, gen|nil, started|nil) ->
 * "time" once seconds passed, "released" when a release of name's bucket
 * came after gen (gen nil: releases do not end it: a rate limit's wait).
 * Raises lost, session_expired or canceled when its fence stops it
 * (iofence.h); with started (monotonic), the take is counted in the wait
 * metrics first, as its caller cannot do that any more. */
static int l_limit_wait(lua_State *L) {
    const char *name = lerror_checkstring(L, 1);
    double seconds = lerror_checknumber(L, 2);
    if (!(seconds >= 0) || isinf(seconds))
        return lerror_argerror(L, 2, "expected a finite number of seconds >= 0, got %g", seconds);
    session *s = lcore_opt_session(L, 3);
    int wake = !lua_isnoneornil(L, 4);
    unsigned long gen = wake ? (unsigned long)lerror_checknumber(L, 4) : 0;
    double started = luaL_optnumber(L, 5, 0);

    iofence f;
    /* A zero wait still checks the fence; its own deadline must not be 0
     * (that would be none). */
    iofence_stop why = iofence_begin(&f, L, s, seconds > 0 ? seconds : 1e-9);
    int up = why == IOFENCE_GO;
    limit_waiter w;
    if (up && wake) limit_watch(&w, name, f.fd);
    const char *result = "time";
    while (why == IOFENCE_GO) {
        if (wake && limit_moved(name, gen)) {
            result = "released";
            break;
        }
        if (f.fd >= 0) {
            struct pollfd pfd = {.fd = f.fd, .events = POLLIN};
            poll(&pfd, 1, iofence_poll_ms(&f, -1));
        } else {
            poll(NULL, 0, iofence_poll_ms(&f, 250)); /* no eventfd: look again soon */
        }
        why = iofence_check(&f);
    }
    if (up && wake) limit_unwatch(&w);
    if (up) iofence_end(&f);
    if (why != IOFENCE_GO && why != IOFENCE_TIMEOUT) {
        if (started > 0) metrics_limit_wait(name, mono_now() - started);
        char what[128];
        snprintf(what, sizeof what, "waiting for limit %s", name);
        return iofence_raise(L, &f, why, what);
    }
    lua_pushstring(L, result);
    return 1;
}

/* Gives the place back and logs what went wrong: the guard's caller
 * already has an outcome (fn's results or error) that this must not
 * replace. */
static void give_back(const char *name, const char *token, session *owner) {
    pool *p = lcore_pool();
    if (!p) return;
    tx_error e;
    if (limit_release(p, owner, name, token, &e) < 0)
        log_kv(LOG_WARN, "could not give a place back; it is freed when its session ends", "limit", name,
               "error", e.message, NULL);
}

/* core.limit_guard(name|false, session|nil, take, fn|nil, ...):
 * take(token) takes a place of name with a token made here, so that a
 * take that raised after its commit (a hook) is undone by that token; a
 * take that raised usage or limit took nothing. Without fn, take's
 * result (the place handle) is returned. With fn: fn(...) runs, the
 * place goes back however fn ends (the handle gets released = true), and
 * fn's results are returned or its error raised as it was. name false:
 * a rate limit, nothing to give back. */
static int l_limit_guard(lua_State *L) {
    const char *name = lua_type(L, 1) == LUA_TSTRING ? lua_tostring(L, 1) : NULL;
    session *s = lcore_opt_session(L, 2);
    luaL_checktype(L, 3, LUA_TFUNCTION);
    int with_fn = !lua_isnoneornil(L, 4);
    if (with_fn) luaL_checktype(L, 4, LUA_TFUNCTION);
    int top = lua_gettop(L);
    uuid_t u;
    char token[37];
    uuid_generate_random(u);
    uuid_unparse_lower(u, token);

    lua_pushvalue(L, 3);
    lua_pushstring(L, token);
    if (lua_pcall(L, 1, 1, 0) != 0) {
        const char *kind = lerror_kind(L, -1);
        if (name && !(kind && (!strcmp(kind, BMDB_E_USAGE) || !strcmp(kind, BMDB_E_LIMIT)))) give_back(name, token, s);
        return lua_error(L);
    }
    if (!with_fn) return 1;
    int handle = lua_gettop(L);
    lua_pushvalue(L, 4);
    for (int i = 5; i <= top; i++) lua_pushvalue(L, i);
    int st = lua_pcall(L, top - 4, LUA_MULTRET, 0);
    if (name) {
        give_back(name, token, s);
        if (lua_istable(L, handle)) {
            lua_pushliteral(L, "released");
            lua_pushboolean(L, 1);
            lua_rawset(L, handle);
        }
    }
    if (st != 0) return lua_error(L);
    return lua_gettop(L) - handle;
}

/* core.limit_release(session|nil, name, token) -> true when it gave the
 * place back, false when it was not held; raises connection or sql. */
static int l_limit_release(lua_State *L) {
    session *s = lcore_opt_session(L, 1);
    const char *name = lerror_checkstring(L, 2), *token = lerror_checkstring(L, 3);
    pool *p = lcore_pool();
    if (!p) return lerror_raise_kind(L, BMDB_E_NOT_CONNECTED, "bmdb: not connected to a database (no pool)");
    tx_error e;
    int rc = limit_release(p, s, name, token, &e);
    if (rc < 0) return lerror_raise(L, &e);
    lua_pushboolean(L, rc);
    return 1;
}

/* core.limit_observe(name, seconds): a take that waited, however long */
static int l_limit_observe(lua_State *L) {
    metrics_limit_wait(lerror_checkstring(L, 1), lerror_checknumber(L, 2));
    return 0;
}

static const luaL_Reg funcs[] = {{"limit_gen", l_limit_gen},         {"limit_wait", l_limit_wait},
                                 {"limit_guard", l_limit_guard},     {"limit_release", l_limit_release},
                                 {"limit_observe", l_limit_observe}, {NULL, NULL}};

void llimit_register(lua_State *L) { luaL_register(L, NULL, funcs); }

/* lwork.c -- work locks as Lua sees them (bmdb.core).
 *
 * core.lock, core.release and core.backoff_last run work.c's statements in
 * an open transaction (ltx.h) and hand back their outcome as Lua values;
 * what to do with an outcome (wait, back off, decide) is
 * lua/bmdb/work.lua's and claim.lua's. A lock's item is the scheduler's
 * item table (lsched_push_item). The claim options' reading is shared with the
 * claims of several items (core.lock_any). */
#include <lauxlib.h>
#include <stdio.h>

#include "lcore.h"
#include "lerror.h"
#include "ltx.h"
#include "lvalue.h"
#include "sched.h"
#include "work.h"

/* An optional numeric field of table idx as parameter text, into buf. */
static const char *opt_number_text(lua_State *L, int idx, const char *k, char *buf, size_t len) {
    if (!lua_istable(L, idx)) return NULL;
    lua_getfield(L, idx, k);
    const char *v = NULL;
    if (lua_type(L, -1) == LUA_TNUMBER) {
        lvalue_format_number(lua_tonumber(L, -1), buf, len);
        v = buf;
    }
    lua_pop(L, 1);
    return v;
}

void lwork_claim_options(lua_State *L, int idx, work_claim *c, char b[4][40]) {
    *c = (work_claim){opt_number_text(L, idx, "timeout", b[0], 40), opt_number_text(L, idx, "initial", b[1], 40),
                      opt_number_text(L, idx, "maximum", b[2], 40), opt_number_text(L, idx, "exponent", b[3], 40)};
}

/* core.lock(tx, machine, process, {timeout=, initial=, maximum=, exponent=})
 * -> "locked", item (its machine, process, token, session_id, attempt) |
 * "held" | "backoff", until | "paused", reason | "onhold", reason */
static int l_lock(lua_State *L) {
    ltx *u = ltx_check_open(L, "lock");
    lcore_check_ids(L, 2, 3);
    char b[4][40];
    work_claim c;
    lwork_claim_options(L, 4, &c, b);
    work_locked out;
    tx_error e;
    work_lock_result res = work_lock(u->t, lua_tostring(L, 2), lua_tostring(L, 3), &c, &out, &e);
    switch (res) {
    case WORK_LOCKED: {
        sched_note_item(lua_tostring(L, 2)); /* named if its slot will not stop */
        sched_item it = {.attempt = out.attempt};
        snprintf(it.machine, sizeof it.machine, "%s", lua_tostring(L, 2));
        snprintf(it.process, sizeof it.process, "%s", lua_tostring(L, 3));
        snprintf(it.token, sizeof it.token, "%s", out.token);
        if (u->t->sess) snprintf(it.session_id, sizeof it.session_id, "%s", session_id(u->t->sess));
        lua_pushliteral(L, "locked");
        lsched_push_item(L, &it);
        return 2;
    }
    case WORK_HELD:
        lua_pushliteral(L, "held");
        return 1;
    case WORK_BACKOFF:
        lua_pushliteral(L, "backoff");
        lua_pushstring(L, out.until);
        return 2;
    case WORK_PAUSED:
    case WORK_ON_HOLD:
        lua_pushstring(L, res == WORK_PAUSED ? "paused" : "onhold");
        lua_pushstring(L, out.why);
        return 2;
    default:
        return lerror_raise(L, &e);
    }
}

/* core.release(tx, machine, process, event, cause, seconds, token) */
static int l_release(lua_State *L) {
    ltx *u = ltx_check_open(L, "release");
    lcore_check_ids(L, 2, 3);
    static const char *const events[] = {"Finished", "Failed", "Canceled", NULL};
    int ev = luaL_checkoption(L, 4, NULL, events);
    tx_error e;
    if (work_release(u->t, lua_tostring(L, 2), lua_tostring(L, 3), luaL_optstring(L, 7, NULL), events[ev],
                     luaL_optstring(L, 5, NULL), (long)luaL_optnumber(L, 6, 1), &e) < 0)
        return lerror_raise(L, &e);
    sched_note_item(NULL);
    return 0;
}

static int l_backoff_last(lua_State *L) {
    ltx *u = ltx_check_open(L, "backoff_last");
    lcore_check_ids(L, 2, 3);
    tx_error e;
    long last = work_backoff_last(u->t, lua_tostring(L, 2), lua_tostring(L, 3), &e);
    if (last < 0) return lerror_raise(L, &e);
    if (last == 0) lua_pushnil(L);
    else lua_pushnumber(L, (lua_Number)last);
    return 1;
}

void lwork_register(lua_State *L) {
    static const luaL_Reg funcs[] = {
        {"lock", l_lock}, {"release", l_release}, {"backoff_last", l_backoff_last}, {NULL, NULL}};
    luaL_register(L, NULL, funcs);
}

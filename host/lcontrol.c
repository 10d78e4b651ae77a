/* lcontrol.c -- work control as bmdb.core sees it: cancel, pause, resume,
 * hold and unhold inside a script's transaction (control.c), retry
 * (retry.c), history retention's batches (prune.c), and the
 * registry of items whose bodies run here (items.c: core.track,
 * core.item_lost). */
#include <lauxlib.h>
#include <stdio.h>

#include "control.h"
#include "items.h"
#include "lcore.h"
#include "lerror.h"
#include "lifecycle.h"
#include "lstate.h"
#include "prune.h"
#include "retry.h"
#include "strays.h"
#include "tx.h"
#include "work.h"

static void check_ids(lua_State *L) {
    const char *m = lerror_checkstring(L, 2), *p = lerror_checkstring(L, 3);
    if (!work_valid_uuid(m)) lerror_argerror(L, 2, "machine id is not a UUID: %s", m);
    if (!work_valid_process(p))
        lerror_argerror(L, 3, "invalid process name '%s' (a letter, then letters, digits or _; at most 63)", p);
}

/* core.cancel(tx, machine, process, reason) -> token or nil */
static int l_cancel(lua_State *L) {
    tx *t = lcore_check_tx(L, "cancel");
    check_ids(L);
    char token[40] = "";
    tx_error e;
    int rc = control_cancel(t, lua_tostring(L, 2), lua_tostring(L, 3), luaL_optstring(L, 4, NULL),
                            token, sizeof token, &e);
    if (rc < 0) return lerror_raise(L, &e);
    if (rc == 0) lua_pushnil(L);
    else lua_pushstring(L, token);
    return 1;
}

/* core.control(tx, "pause" | "resume" | "hold" | "unhold", name, reason) -> bool */
static int l_control(lua_State *L) {
    tx *t = lcore_check_tx(L, "control");
    static const char *const ops[] = {"pause", "resume", "hold", "unhold", NULL};
    int op = luaL_checkoption(L, 2, NULL, ops);
    const char *name = luaL_checkstring(L, 3), *reason = luaL_optstring(L, 4, NULL);
    if (op < 2 && !work_valid_process(name))
        return lerror_raise_kind(L, BMDB_E_USAGE, "invalid process name '%s' (a letter, then letters, digits or _; at most 63)", name);
    if (op >= 2 && !work_valid_uuid(name)) return lerror_raise_kind(L, BMDB_E_USAGE, "machine id is not a UUID: %s", name);
    tx_error e;
    int rc = op == 0 ? control_pause(t, name, reason, &e)
           : op == 1 ? control_resume(t, name, &e)
           : op == 2 ? control_hold(t, name, reason, &e)
                     : control_unhold(t, name, reason, &e);
    if (rc < 0) return lerror_raise(L, &e);
    lua_pushboolean(L, rc);
    return 1;
}

/* core.retry(tx, machine, process, reason) -> whether the pair was in backoff */
static int l_retry(lua_State *L) {
    tx *t = lcore_check_tx(L, "retry");
    check_ids(L);
    tx_error e;
    int rc = retry_one(t, lua_tostring(L, 2), lua_tostring(L, 3), luaL_optstring(L, 4, NULL), &e);
    if (rc < 0) return lerror_raise(L, &e);
    lua_pushboolean(L, rc);
    return 1;
}

/* core.retry_batch(tx, process, cause, since, reason, dry_run) -> count:
 * up to RETRY_BATCH pairs cleared (dry_run: how many match, all of them).
 * A since the server refuses is a usage error naming it. */
static int l_retry_batch(lua_State *L) {
    tx *t = lcore_check_tx(L, "retry_batch");
    retry_filter f = {lerror_checkstring(L, 2), luaL_optstring(L, 3, NULL), luaL_optstring(L, 4, NULL)};
    if (!work_valid_process(f.process))
        return lerror_raise_kind(L, BMDB_E_USAGE, "invalid process name '%s' (a letter, then letters, digits or _; at most 63)", f.process);
    tx_error e;
    long n = lua_toboolean(L, 6) ? retry_count(t, &f, &e) : retry_batch(t, &f, RETRY_BATCH, luaL_optstring(L, 5, NULL), &e);
    if (n < 0 && retry_bad_since(&f, &e)) return lerror_raise_kind(L, BMDB_E_USAGE, "%s", e.message);
    if (n < 0) return lerror_raise(L, &e);
    lua_pushnumber(L, (lua_Number)n);
    return 1;
}

/* core.keep_history() -> days: the host's --keep-history (0: keep all) */
static int l_keep_history(lua_State *L) {
    lua_pushnumber(L, prune_keep_history());
    return 1;
}

/* core.prune_cutoff(days) -> the cutoff, now() - days as the server
 * writes a TIMESTAMPTZ */
static int l_prune_cutoff(lua_State *L) {
    lua_Number d = luaL_checknumber(L, 1);
    if (!(d >= 1 && d <= PRUNE_KEEP_MAX) || d != (int)d)
        return lerror_argerror(L, 1, "days: expected a whole number from 1 to %d, got %g", PRUNE_KEEP_MAX, d);
    char cutoff[64], err[1024];
    if (!lcore_pool()) return lerror_raise_kind(L, BMDB_E_NOT_CONNECTED, "prune_cutoff: no database");
    if (prune_cutoff(lcore_pool(), NULL, (int)d, cutoff, sizeof cutoff, err, sizeof err) < 0)
        return lerror_raise_kind(L, BMDB_E_CONNECTION, "%s", err);
    lua_pushstring(L, cutoff);
    return 1;
}

/* core.prune_batch(cutoff, limit, cursor) -> removed, more, cursor: one
 * batch of prune.h's (its own short READ COMMITTED transaction, on a
 * pooled connection, fenced by nothing: deleting old history is the same
 * whoever does it). cursor: nil at the start, then what the last call
 * returned ({table=, at=, id=}). */
static int l_prune_batch(lua_State *L) {
    const char *cutoff = lerror_checkstring(L, 1);
    lua_Number limit = luaL_checknumber(L, 2);
    if (!(limit >= 1 && limit <= 100000) || limit != (int)limit)
        return lerror_argerror(L, 2, "limit: expected a whole number from 1 to 100000, got %g", limit);
    prune_cursor cur = {0};
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_getfield(L, 3, "table");
        lua_getfield(L, 3, "at");
        lua_getfield(L, 3, "id");
        cur.table = (int)luaL_optnumber(L, -3, 0);
        snprintf(cur.at, sizeof cur.at, "%s", luaL_optstring(L, -2, ""));
        snprintf(cur.id, sizeof cur.id, "%s", luaL_optstring(L, -1, ""));
        lua_pop(L, 3);
    }
    long removed;
    int more;
    char err[1024];
    if (!lcore_pool()) return lerror_raise_kind(L, BMDB_E_NOT_CONNECTED, "prune_batch: no database");
    if (prune_batch(lcore_pool(), cutoff, (int)limit, 0, &cur, &removed, &more, err, sizeof err) < 0)
        return lerror_raise_kind(L, BMDB_E_CONNECTION, "%s", err);
    lua_pushnumber(L, (lua_Number)removed);
    lua_pushboolean(L, more);
    lua_createtable(L, 0, 3);
    lua_pushnumber(L, cur.table);
    lua_setfield(L, -2, "table");
    lua_pushstring(L, cur.at);
    lua_setfield(L, -2, "at");
    lua_pushstring(L, cur.id);
    lua_setfield(L, -2, "id");
    return 3;
}

/* core.paused(tx, process) -> reason or nil, and notes it for the log */
static int l_paused(lua_State *L) {
    tx *t = lcore_check_tx(L, "paused");
    const char *process = luaL_checkstring(L, 2);
    char why[512] = "";
    tx_error e;
    int rc = control_paused(t, process, why, sizeof why, &e);
    if (rc < 0) return lerror_raise(L, &e);
    if (rc) lua_pushstring(L, why);
    else lua_pushnil(L);
    return 1;
}

/* core.note_pause(process, paused, reason): logged once per change */
static int l_note_pause(lua_State *L) {
    control_note_pause(luaL_checkstring(L, 1), lua_toboolean(L, 2), luaL_optstring(L, 3, NULL));
    return 0;
}

/* core.seen_paused(process) -> whether the host last saw process paused */
static int l_seen_paused(lua_State *L) {
    lua_pushboolean(L, control_seen_paused(luaL_checkstring(L, 1)));
    return 1;
}

/* core.track(token, machine, process, slot, timeout, started) / core.untrack(token) */
static int l_track(lua_State *L) {
    items_track(L, luaL_checkstring(L, 1), luaL_checkstring(L, 2), luaL_checkstring(L, 3),
                (int)luaL_optnumber(L, 4, 0), luaL_optnumber(L, 5, 0), luaL_optnumber(L, 6, mono_now()));
    return 0;
}

static int l_untrack(lua_State *L) {
    const char *token = luaL_checkstring(L, 1);
    items_untrack(token);
    strays_disown(token); /* the item is done: its row, if left, is a stray */
    return 0;
}

/* core.item_lost(token) -> why or nil */
static int l_item_lost(lua_State *L) {
    char why[256];
    if (items_token_lost(luaL_checkstring(L, 1), why, sizeof why)) lua_pushstring(L, why);
    else lua_pushnil(L);
    return 1;
}

/* core.is_os_exit(f): f is the host's os.exit (a script state's) */
static int l_is_os_exit(lua_State *L) {
    lua_pushboolean(L, lua_tocfunction(L, 1) == NULL ? 0 : lstate_is_os_exit(lua_tocfunction(L, 1)));
    return 1;
}

static const luaL_Reg funcs[] = {{"cancel", l_cancel},       {"control", l_control},
                                 {"paused", l_paused},       {"retry", l_retry},
                                 {"retry_batch", l_retry_batch},       {"note_pause", l_note_pause},
                                 {"keep_history", l_keep_history},     {"prune_cutoff", l_prune_cutoff},
                                 {"prune_batch", l_prune_batch},
                                 {"seen_paused", l_seen_paused},
                                 {"track", l_track},         {"untrack", l_untrack},
                                 {"item_lost", l_item_lost}, {"is_os_exit", l_is_os_exit},
                                 {NULL, NULL}};

void lcontrol_register(lua_State *L) { luaL_register(L, NULL, funcs); }

/* lslot.c -- the services the worker loop (Lua) calls on its slot thread.
 *
 * core.idle_wait, core.wake_local, the claim and finish turns
 * (core.claim_*, core.finish_*), core.count, core.generation and
 * core.notify_enabled: thin wrappers over slots.h. Outside the binary
 * (busted) they work the same, with nobody else waiting. */
#include <lauxlib.h>
#include <stdio.h>

#include "lcore.h"
#include "lerror.h"
#include "metrics.h"
#include "slots.h"

static int l_idle_wait(lua_State *L) {
    lua_pushboolean(L, slot_idle_wait(lerror_checkstring(L, 1), lerror_checknumber(L, 2)));
    return 1;
}

static int push_handed(lua_State *L, const slot_handed *h) {
    lua_pushstring(L, h->machine);
    lua_pushinteger(L, h->attempt);
    lua_pushstring(L, h->token);
    lua_pushstring(L, h->session);
    lua_pushnumber(L, h->started);
    return 5;
}

/* core.claim_enter(process, seconds) -> "turn" | "handed", machine,
 * attempt, token, session_id, started | nil */
static int l_claim_enter(lua_State *L) {
    slot_handed h;
    switch (slot_claim_enter(lerror_checkstring(L, 1), lerror_checknumber(L, 2), &h)) {
    case SLOT_CLAIM_TURN: lua_pushliteral(L, "turn"); return 1;
    case SLOT_CLAIM_HANDED: lua_pushliteral(L, "handed"); return 1 + push_handed(L, &h);
    default: return 0;
    }
}

static int l_claim_leave(lua_State *L) {
    (void)L;
    slot_claim_leave();
    return 0;
}

static int l_claim_waiters(lua_State *L) {
    lua_pushinteger(L, slot_claim_waiters(lerror_checkstring(L, 1)));
    return 1;
}

static int l_claim_queued(lua_State *L) {
    lua_pushinteger(L, slot_claim_queued(lerror_checkstring(L, 1)));
    return 1;
}

/* core.claim_give_back(process, on) */
static int l_claim_give_back(lua_State *L) {
    slot_claim_give_back(lerror_checkstring(L, 1), lua_toboolean(L, 2));
    return 0;
}

/* core.claim_hand(process, machine, attempt, token, session_id, started) -> bool */
static int l_claim_hand(lua_State *L) {
    slot_handed h;
    snprintf(h.machine, sizeof h.machine, "%s", lerror_checkstring(L, 2));
    h.attempt = (int)lerror_checknumber(L, 3);
    snprintf(h.token, sizeof h.token, "%s", lerror_checkstring(L, 4));
    snprintf(h.session, sizeof h.session, "%s", lerror_checkstring(L, 5));
    h.started = lerror_checknumber(L, 6);
    lua_pushboolean(L, slot_claim_hand(lerror_checkstring(L, 1), &h));
    return 1;
}

/* core.claim_take(process) -> machine, attempt, token, session_id, started | nil */
static int l_claim_take(lua_State *L) {
    slot_handed h;
    if (!slot_claim_take(lerror_checkstring(L, 1), &h)) return 0;
    slot_note_item(h.machine);
    return push_handed(L, &h);
}

static int l_finish_enter(lua_State *L) {
    (void)L;
    slot_finish_enter();
    return 0;
}

static int l_finish_leave(lua_State *L) {
    (void)L;
    slot_finish_leave();
    return 0;
}

static int l_wake_local(lua_State *L) {
    slot_wake(luaL_optstring(L, 1, NULL));
    return 0;
}

/* core.count("claim") | ("retry", sqlstate?) | ("empty", process) |
 * ("tx_failed"): the stop line's counters and the metrics. */
static int l_count(lua_State *L) {
    static const char *const what[] = {"claim", "retry", "empty", "tx_failed", NULL};
    switch (luaL_checkoption(L, 1, NULL, what)) {
    case 0: slot_count_claim(); break;
    case 1:
        slot_count_retry();
        metrics_tx_retried(luaL_optstring(L, 2, NULL));
        break;
    case 2: metrics_claim_empty(lerror_checkstring(L, 2)); break;
    default: metrics_tx_failed(); break;
    }
    return 0;
}

/* core.observe_work(process, event, machine, seconds): a work item started
 * or ended ("finished", "failed", "canceled", "lost"), for the metrics and
 * the calling slot's line on the status page. */
static int l_observe_work(lua_State *L) {
    metrics_work(lerror_checkstring(L, 1), lerror_checkstring(L, 2), luaL_optstring(L, 3, NULL),
                 luaL_optnumber(L, 4, 0));
    return 0;
}

/* lstate.c replaces it in a slot that runs an older generation on purpose
 * (its load of the newer one failed). */
static int l_generation(lua_State *L) {
    lua_pushnumber(L, slot_generation());
    return 1;
}

/* core.wake_fleet(): after a commit that may have made work eligible. */
static int l_wake_fleet(lua_State *L) {
    (void)L;
    slot_fleet_wake_request();
    return 0;
}

static int l_notify_enabled(lua_State *L) {
    lua_pushboolean(L, slot_notify_enabled());
    return 1;
}

static const luaL_Reg funcs[] = {{"idle_wait", l_idle_wait},
                                 {"wake_local", l_wake_local},
                                 {"claim_enter", l_claim_enter},
                                 {"claim_leave", l_claim_leave},
                                 {"claim_waiters", l_claim_waiters},
                                 {"claim_queued", l_claim_queued},
                                 {"claim_give_back", l_claim_give_back},
                                 {"claim_hand", l_claim_hand},
                                 {"claim_take", l_claim_take},
                                 {"finish_enter", l_finish_enter},
                                 {"finish_leave", l_finish_leave},
                                 {"count", l_count},
                                 {"observe_work", l_observe_work},
                                 {"generation", l_generation},
                                 {"notify_enabled", l_notify_enabled},
                                 {"wake_fleet", l_wake_fleet},
                                 {NULL, NULL}};

void lslot_register(lua_State *L) { luaL_register(L, NULL, funcs); }

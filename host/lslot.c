/* lslot.c -- the services the worker loop (Lua) calls on its slot thread,
 * beside the scheduler's (lsched.c).
 *
 * core.idle_wait, core.wake_local, core.wake_fleet, core.count,
 * core.observe_work, core.loop_run, core.loop_held, core.generation and
 * core.notify_enabled: thin
 * wrappers over slots.h, snapshot.h and metrics.h. Outside the binary (busted) they
 * work the same, with nobody else waiting. */
#include <lauxlib.h>

#include "lcore.h"
#include "lerror.h"
#include "metrics.h"
#include "slots.h"
#include "snapshot.h"

static int l_idle_wait(lua_State *L) {
    lua_pushboolean(L, slot_idle_wait(lerror_checkstring(L, 1), lerror_checknumber(L, 2)));
    return 1;
}

static int l_wake_local(lua_State *L) {
    slot_wake(luaL_optstring(L, 1, NULL));
    return 0;
}

/* core.count("claim") | ("retry", sqlstate?) | ("empty", process) |
 * ("tx_failed"): the stop line's counters and the metrics. */
/* core.loop_run(name, outcome, seconds), core.loop_held(name, held) */
static int l_loop_run(lua_State *L) {
    metrics_loop_run(lerror_checkstring(L, 1), lerror_checkstring(L, 2), lerror_checknumber(L, 3));
    return 0;
}

static int l_loop_held(lua_State *L) {
    metrics_loop_held(lerror_checkstring(L, 1), lua_toboolean(L, 2));
    return 0;
}

static int l_count(lua_State *L) {
    static const char *const what[] = {"claim", "retry", "empty", "tx_failed", NULL};
    switch (luaL_checkoption(L, 1, NULL, what)) {
    case 0: metrics_count_claim(); break;
    case 1:
        metrics_count_retry();
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
    lua_pushnumber(L, snapshot_generation());
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
                                 {"count", l_count},
                                 {"loop_run", l_loop_run},
                                 {"loop_held", l_loop_held},
                                 {"observe_work", l_observe_work},
                                 {"generation", l_generation},
                                 {"notify_enabled", l_notify_enabled},
                                 {"wake_fleet", l_wake_fleet},
                                 {NULL, NULL}};

void lslot_register(lua_State *L) { luaL_register(L, NULL, funcs); }

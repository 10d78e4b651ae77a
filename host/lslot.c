/* lslot.c -- the services the worker loop (Lua) calls on its slot thread.
 *
 * core.idle_wait, core.wake_local, core.count, core.generation and
 * core.notify_enabled: thin wrappers over slots.h. Outside the binary
 * (busted) they work the same, with nobody else waiting. */
#include <lauxlib.h>

#include "lcore.h"
#include "lerror.h"
#include "slots.h"

static int l_idle_wait(lua_State *L) {
    lua_pushboolean(L, slot_idle_wait(lerror_checkstring(L, 1), lerror_checknumber(L, 2)));
    return 1;
}

static int l_wake_local(lua_State *L) {
    slot_wake(luaL_optstring(L, 1, NULL));
    return 0;
}

/* core.count("claim" | "retry") */
static int l_count(lua_State *L) {
    static const char *const what[] = {"claim", "retry", NULL};
    if (luaL_checkoption(L, 1, NULL, what) == 0) slot_count_claim();
    else slot_count_retry();
    return 0;
}

/* lstate.c replaces it in a slot that runs an older generation on purpose
 * (its load of the newer one failed). */
static int l_generation(lua_State *L) {
    lua_pushnumber(L, slot_generation());
    return 1;
}

static int l_notify_enabled(lua_State *L) {
    lua_pushboolean(L, slot_notify_enabled());
    return 1;
}

static const luaL_Reg funcs[] = {{"idle_wait", l_idle_wait},
                                 {"wake_local", l_wake_local},
                                 {"count", l_count},
                                 {"generation", l_generation},
                                 {"notify_enabled", l_notify_enabled},
                                 {NULL, NULL}};

void lslot_register(lua_State *L) { luaL_register(L, NULL, funcs); }

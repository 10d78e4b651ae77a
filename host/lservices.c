/* lservices.c -- the host's services as Lua sees them (bmdb.core).
 *
 * Sleeping that the fence cuts short, the retry delay, logging, clocks,
 * a seed, the run state, the checks of ids, whether a database outage is
 * under way, and the heartbeat's pause (for specs). Each reads or waits on
 * what the host already keeps (lifecycle, log, session, outage); none runs
 * SQL. */
#include <lauxlib.h>
#include <stdint.h>
#include <unistd.h>

#include "items.h"
#include "lcore.h"
#include "lerror.h"
#include "lifecycle.h"
#include "log.h"
#include "outage.h"
#include "session.h"
#include "tx.h"
#include "work.h"

/* core.sleep(seconds, session?) -> true after the full time, false when cut
 * short by cancellation or by the loss of session. Draining does not cut
 * it: items in flight keep their grace period. */
static int l_sleep(lua_State *L) {
    double seconds = lerror_checknumber(L, 1);
    session *s = lcore_opt_session(L, 2);
    double end = mono_now() + seconds;
    unsigned gen = lifecycle_kick_gen();
    double left;
    while ((left = end - mono_now()) > 0) {
        lifecycle_wait(left, HOST_CANCELLING, &gen);
        if (lifecycle_state() >= HOST_CANCELLING || (s && !session_alive(s)) ||
            items_state_lost(L, NULL, 0)) {
            lua_pushboolean(L, 0);
            return 1;
        }
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_retry_delay(lua_State *L) {
    lua_pushnumber(L, tx_retry_delay((int)lerror_checknumber(L, 1)));
    return 1;
}

static int l_log(lua_State *L) {
    static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
    log_level lvl = (log_level)luaL_checkoption(L, 1, NULL, levels);
    const char *msg = luaL_checkstring(L, 2);
    if (!log_enabled(lvl)) return 0;
    const char *kv[64];
    size_t n = 0;
    if (lua_istable(L, 3) && lua_objlen(L, 3) > 0) {
        /* A flat list {k1, v1, k2, v2, ...} (order kept), as the host's
         * own lines are (two per work item): each text stays on the stack
         * while log_kvv reads it; strings and numbers are taken as they
         * are, anything else through tostring. */
        size_t len = lua_objlen(L, 3);
        luaL_checkstack(L, 64, "log fields");
        for (size_t i = 1; i <= len && n < 32 * 2; i++) {
            lua_rawgeti(L, 3, (int)i);
            int t = lua_type(L, -1);
            if (t != LUA_TSTRING && t != LUA_TNUMBER) {
                lua_getglobal(L, "tostring");
                lua_insert(L, -2);
                lua_call(L, 1, 1);
            }
            kv[n++] = lua_tostring(L, -1);
        }
        n /= 2;
    } else if (lua_istable(L, 3)) {
        /* a map: its texts go into a scratch table, so they stay
         * referenced while log_kvv reads them */
        lua_newtable(L);
        int texts = lua_gettop(L);
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
        for (size_t i = 0; i < 2 * n; i++) {
            lua_rawgeti(L, texts, (int)i + 1);
            kv[i] = lua_tostring(L, -1);
            lua_pop(L, 1);
        }
    }
    log_kvv(lvl, msg, kv, n);
    return 0;
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

/* core.outage_counted() -> true when a database outage is under way (the
 * failure is counted in it, and logged by it: outage.h), false otherwise. */
static int l_outage_counted(lua_State *L) {
    lua_pushboolean(L, outage_counted());
    return 1;
}

/* core.outage_failed(what, why): a failure to reach the database, for
 * outage.h's account (it logs, at its rate). */
static int l_outage_failed(lua_State *L) {
    outage_failed(lerror_checkstring(L, 1), lerror_checkstring(L, 2));
    return 0;
}

static int l_pause_heartbeat(lua_State *L) {
    sessions_pause_heartbeat(lua_toboolean(L, 1));
    return 0;
}

void lservices_register(lua_State *L) {
    static const luaL_Reg funcs[] = {
        {"sleep", l_sleep},           {"retry_delay", l_retry_delay},
        {"log", l_log},               {"state", l_state},
        {"valid_uuid", l_valid_uuid}, {"valid_process", l_valid_process},
        {"pause_heartbeat", l_pause_heartbeat}, {"outage_counted", l_outage_counted},
        {"outage_failed", l_outage_failed},
        {"seed", l_seed},             {"now", l_now},
        {NULL, NULL}};
    luaL_register(L, NULL, funcs);
}

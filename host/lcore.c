/* lcore.c -- the module "bmdb.core": its table, and what its bindings share.
 *
 * luaopen_bmdb_core() builds the table from each area's register function
 * (lcore.h): sessions and transactions (ltx.c), work locks (lwork.c), the
 * host's services (lservices.c), error objects and kinds (lerror.c), the
 * slots' services (lslot.c), the scheduler's (lsched.c), the test
 * bootstrap (lboot.c), and the rest. Here too: the pool every binding
 * uses, the userdata class helper and the checks of ids. The bindings
 * translate: values through lvalue.c, failures into error objects through
 * lerror.c; policy (retries, work decisions, backoff, how much to claim)
 * lives in the Lua modules of lua/bmdb/. The binary and
 * busted load the same luaopen_bmdb_core(): the binary hands over its
 * pool with lcore_set_pool(), specs call core.open{dsn=...} (lboot.c)
 * instead. */
#include "lcore.h"

#include <lauxlib.h>

#include "lerror.h"
#include "pool.h"
#include "session.h"
#include "tx.h"
#include "work.h"

/* The pool every bmdb call uses. Set before any slot or script thread
 * starts and cleared after they all ended (main.c, core.open/close), so
 * it is read without a lock. */
static pool *the_pool;

void lcore_set_pool(pool *p) { the_pool = p; }
pool *lcore_pool(void) { return the_pool; }

void lcore_check_ids(lua_State *L, int midx, int pidx) {
    const char *m = lerror_checkstring(L, midx), *p = lerror_checkstring(L, pidx);
    if (!work_valid_uuid(m)) lerror_argerror(L, midx, "machine id is not a UUID: %s", m);
    if (!work_valid_process(p))
        lerror_argerror(L, pidx, "invalid process name '%s' (a letter, then letters, digits or _; at most 63)", p);
}

void lcore_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc) {
    luaL_newmetatable(L, name);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    if (gc) {
        lua_pushcfunction(L, gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
}

int luaopen_bmdb_core(lua_State *L) {
    lerror_open(L);
    lua_newtable(L);
    lerror_register(L);
    ltx_register(L);
    lwork_register(L);
    lservices_register(L);
    lslot_register(L);
    lsched_register(L);
    lboot_register(L);
    lcontrol_register(L);
    lhttp_register(L);
    ljson_register(L);
    lexec_register(L);
    llimit_register(L);
    lmetrics_register(L);
    return 1;
}

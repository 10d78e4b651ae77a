/* lcore.h -- the module "bmdb.core": the C core as Lua sees it.
 *
 * One luaopen_bmdb_core() for the binary's states and for busted (build/
 * bmdb/core.so). Its table holds the functions of lcore.c (sessions,
 * transactions, locks, host services), of lslot.c (what the slots' loop
 * uses), of lboot.c (open, close, embedded, connect: the bootstrap for
 * specs and bmdb.testing), of lcontrol.c (work control), of lexec.c (exec:
 * a command as a body's I/O) and of llimit.c (the waits and releases of
 * bmdb.limit). */
#ifndef BMDB_LCORE_H
#define BMDB_LCORE_H

#include <lua.h>
#include <lauxlib.h>

struct pool;
/* The pool every bmdb call uses (NULL: none). Set before any state runs a
 * bmdb call, cleared after they are all gone. */
void lcore_set_pool(struct pool *p);
struct pool *lcore_pool(void);

int luaopen_bmdb_core(lua_State *L);

/* A userdata class: metatable name with methods as __index and gc. */
void lcore_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc);

/* Add their functions to the core table on top of the stack. */
void lslot_register(lua_State *L);
void lboot_register(lua_State *L);
void lcontrol_register(lua_State *L);
void lhttp_register(lua_State *L);
/* libcurl's global set-up: main() calls it before any thread starts. */
void lhttp_global_init(void);
/* core.json_encode, core.json_decode, core.json_null, core.json_array (ljson.c) */
void ljson_register(lua_State *L);
void lexec_register(lua_State *L); /* core.exec: lexec.c */
void llimit_register(lua_State *L);

/* The open transaction at stack index 1 (raises when it is over, the host
 * canceled or the session expired), for lcontrol.c. */
struct tx;
struct tx *lcore_check_tx(lua_State *L, const char *fname);
/* The session handle at idx, or NULL when it is none or nil: what a
 * host-owned I/O call is fenced by (iofence.h). */
struct session;
struct session *lcore_opt_session(lua_State *L, int idx);

#endif

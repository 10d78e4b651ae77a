/* lbmdb.h -- the Lua binding: the C core as the module "bmdb.core".
 *
 * The binary and the busted specs load the same luaopen_bmdb_core(). The
 * pure-Lua half of the bmdb module (lua/) is embedded in the binary and
 * registered in package.preload by lbmdb_openlibs(). */
#ifndef BMDB_LBMDB_H
#define BMDB_LBMDB_H

#include <stddef.h>
#include <lua.h>

typedef struct embedded_lua_module {
    const char *name;       /* "bmdb", "bmdb.worker" */
    const char *chunkname;  /* "@lua/bmdb.lua", for tracebacks */
    const char *source;
    size_t len;
} embedded_lua_module;

extern const embedded_lua_module bmdb_lua_modules[];
extern const int bmdb_lua_modules_count;

int luaopen_bmdb_core(lua_State *L);

struct pool;
/* The binary's pool: bmdb calls in every state use it. */
void lbmdb_set_pool(struct pool *p);

/* States running scripts; lbmdb_interrupt_all() makes each raise
 * "cancelled" at its next instruction count (shutdown). */
void lbmdb_register_state(lua_State *L);
void lbmdb_unregister_state(lua_State *L);
void lbmdb_interrupt_all(void);

/* Standard libraries, bmdb.core, and the embedded modules as preloads. */
void lbmdb_openlibs(lua_State *L);

/* Error objects: pushes a bmdb error (with tostring) for a tx_error. */
struct tx_error;
void lbmdb_push_error(lua_State *L, const struct tx_error *e);
/* Message handler for lua_pcall: error objects and strings to a message
 * with a traceback, as lua.c does. */
int lbmdb_traceback(lua_State *L);

#endif

/* lbmdb.h -- the Lua binding: the C core as the module "bmdb.core".
 *
 * The binary and the busted specs load the same luaopen_bmdb_core(). The
 * pure-Lua half of the bmdb module (lua/) is embedded in the binary and
 * registered in package.preload by lbmdb_openlibs(). */
#ifndef BMDB_LBMDB_H
#define BMDB_LBMDB_H

#include <stddef.h>
#include <lua.h>

#include "worker.h"

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

struct snapshot;
/* How loading a script failed. A definition error (an invalid
 * bmdb.worker{}, raised as an error object of kind "definition") and a
 * syntax error make the script invalid (exit 2); anything else raised by
 * the top level is a runtime error (exit 1); cancelled: the host is
 * stopping (a signal, or os.exit). */
enum { SCRIPT_OK, SCRIPT_RUNTIME_ERROR, SCRIPT_DEFINITION_ERROR, SCRIPT_SYNTAX_ERROR, SCRIPT_CANCELLED };

/* A state for a script: libraries, arg, package.path with the script's
 * directory, the script and its modules loaded from snap (which records
 * the modules while not sealed), os.exit replaced, registered for
 * interruption; the script has run, and its first result is on top of the
 * stack. NULL with *kind and err (message and traceback) when loading or
 * running failed. */
lua_State *lbmdb_script_state(struct snapshot *snap, int argc, char **argv, int *kind, char *err,
                              size_t errlen);
void lbmdb_close_state(lua_State *L);

/* os.exit(status) in a script state does not exit: it records status
 * (the first call wins), moves the host to cancelling and raises a
 * cancelled error, so the host ends its session before it exits with it.
 * 1 with *status once os.exit was called. */
int lbmdb_exit_requested(int *status);

/* The worker definitions a script returned (result on top of L): a
 * malloc'd list in *specs and its length, 0 for a one-off, -1 with err
 * when the definitions are invalid. */
int lbmdb_worker_specs(lua_State *L, worker_spec **specs, char *err, size_t errlen);

/* Runs one slot's loop (bmdb._serve) on code of `generation` until it must
 * stop or reload. A slot that failed to load generation `deferred` keeps
 * serving its code and is not sent back for that reload before the
 * monotonic time defer_until (0: no deferral). */
enum { SERVE_STOP, SERVE_RELOAD, SERVE_REMOVED, SERVE_ERROR };
int lbmdb_serve(lua_State *L, const char *process, int index, unsigned generation, unsigned deferred,
                double defer_until, char *err, size_t errlen);

/* Error objects: pushes a bmdb error (with tostring) for a tx_error. */
struct tx_error;
void lbmdb_push_error(lua_State *L, const struct tx_error *e);
/* Message handler for lua_pcall: error objects and strings to a message
 * with a traceback, as lua.c does. */
int lbmdb_traceback(lua_State *L);

#endif

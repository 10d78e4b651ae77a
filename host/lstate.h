/* lstate.h -- Lua states that run scripts: the binary's side of Lua.
 *
 * Creating a state (standard libraries, bmdb.core and the embedded Lua
 * modules as preloads, package.path, arg, os.exit), inside a protected
 * call as luajit.c does; the registry of running states, so a shutdown (or
 * the loss of an item's lock, items.h) can interrupt them; and the calls
 * into bmdb.internal that read a script's worker definitions and run a
 * slot's loop. Every failure comes back as
 * a kind (what the host does about it) and a text (what it prints). */
#ifndef BMDB_LSTATE_H
#define BMDB_LSTATE_H

#include <stddef.h>
#include <lua.h>

/* The pure-Lua half of the bmdb module (lua/), embedded in the binary by
 * host/embed.lua (build/bundle.c) and registered in package.preload. */
typedef struct embedded_lua_module {
    const char *name;       /* "bmdb", "bmdb.internal" */
    const char *chunkname;  /* "@lua/bmdb.lua", for tracebacks */
    const char *source;
    size_t len;
} embedded_lua_module;

extern const embedded_lua_module bmdb_lua_modules[];
extern const int bmdb_lua_modules_count;

/* What a script's definitions ask for: a worker's slots, or a singleton
 * loop (bmdb.loop: one thread, process is the loop's name). */
typedef struct worker_spec {
    char process[64];
    int concurrency;
    int loop;
} worker_spec;
/* "Provision x4", or "loop reconcile": how reports and logs name a spec. */
const char *worker_spec_describe(const worker_spec *s, char *buf, size_t len);

/* How loading a script failed, from the kind of the error object raised
 * (lerror.h): a syntax error and a definition error (an invalid
 * bmdb.worker{}) make the script invalid (exit 2); "canceled": the host is
 * stopping (a signal, or os.exit); "not_connected": the top level used the
 * database where there is none (check); anything else raised by the top
 * level is a runtime error (exit 1). */
enum { SCRIPT_OK, SCRIPT_RUNTIME_ERROR, SCRIPT_DEFINITION_ERROR, SCRIPT_SYNTAX_ERROR, SCRIPT_CANCELED,
       SCRIPT_NOT_CONNECTED };

struct snapshot;
/* A state for a script: built in a protected call, the script and its
 * modules loaded from snap (which records the modules while not sealed),
 * registered for interruption; the script has run with argv[1..] as its
 * arguments, and its first result is on top of the stack. NULL with *kind
 * and err (message and traceback) when building, loading or running
 * failed. */
lua_State *lstate_new(struct snapshot *snap, int argc, char **argv, int *kind, char *err, size_t errlen);
void lstate_close(lua_State *L);

/* Every registered state raises "canceled" at its next instruction count
 * (shutdown). */
void lstate_interrupt_all(void);
/* A bmdb call on L raises lost or canceled itself (iofence.h): the hook
 * that lstate_interrupt_all or a lost item (items.h) set on L is spent, so
 * the body can catch that error and clean up. Another hook (debug.sethook)
 * is kept. */
void lstate_interrupt_taken(lua_State *L);
/* f is the host's os.exit of script states. */
int lstate_is_os_exit(lua_CFunction f);

/* os.exit(status) in a script state does not exit: it records status
 * (the first call wins), moves the host to cancelling and raises a
 * canceled error, so the host ends its session before it exits with it.
 * 1 with *status once os.exit was called. */
int lstate_exit_requested(int *status);

/* The worker definitions a script returned (result on top of L): a
 * malloc'd list in *specs and its length, 0 for a one-off, -1 with err
 * when the definitions are invalid. */
int lstate_worker_specs(lua_State *L, worker_spec **specs, char *err, size_t errlen);

/* Runs one slot's loop (bmdb.internal.serve; a loop's thread:
 * bmdb.internal.serve_loop, with process its name) on code of
 * `generation` until it must stop or reload. A slot that failed to load generation `deferred`
 * keeps serving its code and is not sent back for that reload before the
 * monotonic time defer_until (0: no deferral). */
enum { SERVE_STOP, SERVE_RELOAD, SERVE_REMOVED, SERVE_ERROR };
int lstate_serve(lua_State *L, const worker_spec *spec, int index, unsigned generation, unsigned deferred,
                 double defer_until, char *err, size_t errlen);

#endif

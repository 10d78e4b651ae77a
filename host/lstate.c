/* lstate.c -- Lua states that run scripts: the binary's side of Lua.
 *
 * States that run scripts are registered so that a shutdown can interrupt
 * a body busy in pure Lua, the way lua.c stops a script on SIGINT: a hook
 * set from outside raises at the next instruction count. A body whose lock
 * was taken away is interrupted the same way, when items.c asks (the
 * callback registered with items_on_lost).
 *
 * Globals and their guards (lock order: host/README.md):
 *   states, nstates   states_mu
 *   exit_status       atomic (the first os.exit wins) */
#include "lstate.h"

#include <lauxlib.h>
#include <libgen.h>
#include <limits.h>
#include <lualib.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lcore.h"
#include "lerror.h"
#include "items.h"
#include "lifecycle.h"
#include "log.h"
#include "snapshot.h"

#define INTERNAL "bmdb.internal"

/* ---- interruption of busy states ------------------------------------------ */

#define MAX_STATES 1024
static pthread_mutex_t states_mu = PTHREAD_MUTEX_INITIALIZER;
static lua_State *states[MAX_STATES];
static int nstates;

static void cancel_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    lerror_raise_kind(L, BMDB_E_CANCELED, "canceled: the host is shutting down");
}

/* Raises "lost" in a body whose lock was taken away (items.c), at the
 * next instruction count, unless its item is over by then or the body was
 * told already (items_take_interrupt). */
static void lost_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    char why[512];
    if (items_take_interrupt(L, why, sizeof why)) lerror_raise_kind(L, BMDB_E_LOST, "%s", why);
}

/* items.c's interrupt (items_on_lost), called with none of its locks held:
 * L may have been closed since its item was marked, so only a state still
 * registered gets the hook. */
static void interrupt_lost(void *state) {
    pthread_mutex_lock(&states_mu);
    for (int i = 0; i < nstates; i++)
        if (states[i] == state) lua_sethook(states[i], lost_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    pthread_mutex_unlock(&states_mu);
}

static void on_lost_once(void) { items_on_lost(interrupt_lost); }

void lstate_interrupt_taken(lua_State *L) {
    lua_Hook h = lua_gethook(L);
    if (h == lost_hook || h == cancel_hook) lua_sethook(L, NULL, 0, 0);
    /* A lost hook set after this point, for an item already lost, must
     * not raise it a second time. */
    items_interrupt_seen(L);
}

static void register_state(lua_State *L) {
    pthread_mutex_lock(&states_mu);
    if (nstates < MAX_STATES) states[nstates++] = L;
    pthread_mutex_unlock(&states_mu);
}

static void unregister_state(lua_State *L) {
    pthread_mutex_lock(&states_mu);
    for (int i = 0; i < nstates; i++)
        if (states[i] == L) states[i] = states[--nstates];
    pthread_mutex_unlock(&states_mu);
}

void lstate_interrupt_all(void) {
    /* lua_sethook is the one call lua.c makes from a signal handler: it
     * only stores the hook, which the running state picks up. */
    pthread_mutex_lock(&states_mu);
    for (int i = 0; i < nstates; i++)
        lua_sethook(states[i], cancel_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    pthread_mutex_unlock(&states_mu);
}

/* ---- os.exit ------------------------------------------------------------------ */

static int exit_status = -1; /* what os.exit asked for; -1: nothing */

int lstate_exit_requested(int *status) {
    int s = __atomic_load_n(&exit_status, __ATOMIC_ACQUIRE);
    if (s < 0) return 0;
    *status = s;
    return 1;
}

/* os.exit in a script state: exit() from a slot or the script's thread
 * would skip ending the session (its row would stay until it expires and
 * held work would go unrecorded). So it records the status (the first
 * call wins), moves the host to cancelling, and unwinds the caller with a
 * canceled error; main.c sees the state within its poll and stops the
 * host in order (waking idle slots, interrupting busy ones), then exits
 * with the status. */
static int l_os_exit(lua_State *L) {
    int status = lua_isboolean(L, 1) ? (lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE)
                                     : (int)luaL_optinteger(L, 1, EXIT_SUCCESS);
    status &= 0xff; /* what the exit status can hold */
    int none = -1;
    if (__atomic_compare_exchange_n(&exit_status, &none, status, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        char buf[16];
        snprintf(buf, sizeof buf, "%d", status);
        log_kv(LOG_INFO, "os.exit called: stopping the host", "status", buf, NULL);
    }
    lifecycle_advance(HOST_CANCELLING);
    return lerror_raise_kind(L, BMDB_E_CANCELED, "canceled: os.exit ends the host");
}

int lstate_is_os_exit(lua_CFunction f) { return f == l_os_exit; }

/* ---- building a state ------------------------------------------------------- */

static int load_embedded(lua_State *L) {
    const embedded_lua_module *m = lua_touserdata(L, lua_upvalueindex(1));
    if (luaL_loadbuffer(L, m->source, m->len, m->chunkname) != 0) return lua_error(L);
    lua_pushstring(L, m->name);
    lua_call(L, 1, 1);
    return 1;
}

/* Standard libraries, and bmdb.core and the embedded modules as preloads. */
static void openlibs(lua_State *L) {
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_bmdb_core);
    lua_setfield(L, -2, "bmdb.core");
    for (int i = 0; i < bmdb_lua_modules_count; i++) {
        lua_pushlightuserdata(L, (void *)&bmdb_lua_modules[i]);
        lua_pushcclosure(L, load_embedded, 1);
        lua_setfield(L, -2, bmdb_lua_modules[i].name);
    }
    lua_pop(L, 2);
}

/* package.path: the script's own directory first, so its require()s find
 * the modules beside it wherever the host was started. */
static void set_script_path(lua_State *L, const char *script) {
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", script);
    const char *dir = dirname(buf);
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", dir, dir);
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
}

/* arg as lua.c builds it: arg[0] the script, arg[1..] what follows. */
static void set_arg(lua_State *L, int argc, char **argv) {
    luaL_checkstack(L, 3, "too many arguments to the script");
    lua_createtable(L, argc, 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i);
    }
    lua_setglobal(L, "arg");
}

struct setup {
    snapshot *snap;
    int argc;
    char **argv;
};

/* Everything a script state needs before the script runs, under
 * lua_cpcall: an allocation failure or an error in an embedded module is
 * reported, not a panic. bmdb.core is loaded now, so its error objects
 * (os.exit raises one) get their metatable even in a script that never
 * requires bmdb. */
static int setup_state(lua_State *L) {
    struct setup *s = lua_touserdata(L, 1);
    lua_gc(L, LUA_GCSTOP, 0); /* as luajit.c: no collection while libraries open */
    openlibs(L);
    lua_gc(L, LUA_GCRESTART, -1);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "bmdb.core");
    lua_call(L, 1, 0);
    set_script_path(L, snapshot_script(s->snap));
    snapshot_install(L, s->snap);
    set_arg(L, s->argc, s->argv);
    lua_getglobal(L, "os");
    lua_pushcfunction(L, l_os_exit);
    lua_setfield(L, -2, "exit");
    return 0;
}

/* The script kind for the error object on top of L. */
static int kind_of(lua_State *L) {
    const char *k = lerror_kind(L, -1);
    if (!k) return SCRIPT_RUNTIME_ERROR;
    if (!strcmp(k, BMDB_E_DEFINITION)) return SCRIPT_DEFINITION_ERROR;
    if (!strcmp(k, BMDB_E_CANCELED)) return SCRIPT_CANCELED;
    if (!strcmp(k, BMDB_E_NOT_CONNECTED)) return SCRIPT_NOT_CONNECTED;
    return SCRIPT_RUNTIME_ERROR;
}

lua_State *lstate_new(snapshot *snap, int argc, char **argv, int *kind, char *err, size_t errlen) {
    /* Before the first state can run an item, items.c learns how to
     * interrupt one. */
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, on_lost_once);
    *kind = SCRIPT_OK;
    lua_State *L = luaL_newstate();
    if (!L) {
        snprintf(err, errlen, "out of memory");
        *kind = SCRIPT_RUNTIME_ERROR;
        return NULL;
    }
    struct setup s = {snap, argc, argv};
    if (lua_cpcall(L, setup_state, &s) != 0) {
        snprintf(err, errlen, "cannot set up a Lua state: %s", lua_tostring(L, -1));
        *kind = SCRIPT_RUNTIME_ERROR;
        lua_close(L);
        return NULL;
    }
    register_state(L);
    lua_settop(L, 0);
    lua_pushcfunction(L, lerror_traceback);
    int rc = snapshot_load_script(L, snap);
    if (rc != 0) {
        *kind = SCRIPT_SYNTAX_ERROR;
    } else {
        luaL_checkstack(L, argc, "too many arguments to the script");
        for (int i = 1; i < argc; i++) lua_pushstring(L, argv[i]);
        rc = lua_pcall(L, argc - 1, 1, 1);
        if (rc != 0) *kind = kind_of(L);
    }
    if (rc != 0) {
        lerror_text(L, -1, err, errlen);
        lstate_close(L);
        return NULL;
    }
    lua_remove(L, 1); /* the message handler; the script's result stays */
    return L;
}

void lstate_close(lua_State *L) {
    unregister_state(L);
    lua_close(L);
}

/* ---- calls into bmdb.internal ------------------------------------------------ */

/* Calls require("bmdb.internal")[fname] with nargs arguments already on
 * the stack, under the traceback handler. 0, or -1 with the error's text
 * in err. */
static int call_internal(lua_State *L, const char *fname, int nargs, int nresults, char *err, size_t errlen) {
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, lerror_traceback);
    lua_getglobal(L, "require");
    lua_pushliteral(L, INTERNAL);
    if (lua_pcall(L, 1, 1, base + nargs + 1) != 0) {
        lerror_text(L, -1, err, errlen);
        lua_settop(L, base);
        return -1;
    }
    lua_getfield(L, -1, fname);
    lua_remove(L, -2);
    lua_insert(L, base + 1); /* function below the arguments */
    lua_insert(L, base + 1); /* handler below the function */
    if (lua_pcall(L, nargs, nresults, base + 1) != 0) {
        lerror_text(L, -1, err, errlen);
        lua_settop(L, base);
        return -1;
    }
    lua_remove(L, base + 1); /* the handler */
    return 0;
}

const char *worker_spec_describe(const worker_spec *s, char *buf, size_t len) {
    if (s->loop) snprintf(buf, len, "loop %.63s", s->process);
    else snprintf(buf, len, "%.63s x%d", s->process, s->concurrency);
    return buf;
}

int lstate_worker_specs(lua_State *L, worker_spec **specs, char *err, size_t errlen) {
    *specs = NULL;
    lua_pushvalue(L, -1); /* the script's result */
    if (call_internal(L, "specs", 1, 1, err, errlen) < 0) return -1;
    int n = lua_istable(L, -1) ? (int)lua_objlen(L, -1) : 0;
    if (n > 0) *specs = calloc((size_t)n, sizeof **specs);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, -1, i + 1);
        lua_getfield(L, -1, "process");
        snprintf((*specs)[i].process, sizeof (*specs)[i].process, "%s", lua_tostring(L, -1));
        lua_getfield(L, -2, "concurrency");
        (*specs)[i].concurrency = (int)lua_tonumber(L, -1);
        lua_getfield(L, -3, "loop");
        (*specs)[i].loop = lua_toboolean(L, -1);
        lua_pop(L, 4);
    }
    lua_pop(L, 1);
    return n;
}

/* core.generation for a slot that failed to load generation `deferred`:
 * the generation it runs until `until` (monotonic), so serve does not ask
 * for that reload again at every boundary before then. A newer generation
 * is reported at once. Upvalues: have, deferred, until. */
static int deferred_generation(lua_State *L) {
    unsigned now = snapshot_generation();
    unsigned deferred = (unsigned)lua_tonumber(L, lua_upvalueindex(2));
    int defer = now == deferred && mono_now() < lua_tonumber(L, lua_upvalueindex(3));
    lua_pushnumber(L, defer ? lua_tonumber(L, lua_upvalueindex(1)) : now);
    return 1;
}

static int current_generation(lua_State *L) {
    lua_pushnumber(L, snapshot_generation());
    return 1;
}

static void set_generation_fn(lua_State *L, unsigned have, unsigned deferred, double until) {
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_getfield(L, -1, "bmdb.core");
    if (lua_istable(L, -1)) {
        if (until > 0) {
            lua_pushnumber(L, have);
            lua_pushnumber(L, deferred);
            lua_pushnumber(L, until);
            lua_pushcclosure(L, deferred_generation, 3);
        } else {
            lua_pushcfunction(L, current_generation);
        }
        lua_setfield(L, -2, "generation");
    }
    lua_pop(L, 3);
}

int lstate_serve(lua_State *L, const worker_spec *spec, int index, unsigned generation, unsigned deferred,
                 double defer_until, char *err, size_t errlen) {
    set_generation_fn(L, generation, deferred, defer_until);
    const char *entry = spec->loop ? "serve_loop" : "serve";
    lua_pushvalue(L, -1); /* the script's result */
    lua_pushstring(L, spec->process);
    lua_pushinteger(L, index);
    lua_pushnumber(L, generation);
    if (call_internal(L, entry, 4, 1, err, errlen) < 0) return SERVE_ERROR;
    const char *r = lua_tostring(L, -1);
    int out = !r ? SERVE_ERROR : !strcmp(r, "reload") ? SERVE_RELOAD : !strcmp(r, "removed") ? SERVE_REMOVED : SERVE_STOP;
    if (out == SERVE_ERROR) snprintf(err, errlen, "bmdb.internal.%s returned %s", entry, r ? r : "nothing");
    lua_pop(L, 1);
    return out;
}

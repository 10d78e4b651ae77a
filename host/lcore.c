/* lcore.c -- the module "bmdb.core": the C core as Lua sees it.
 *
 * Sessions, fenced transactions and work locks as userdata, and the host's
 * services (sleep, log, state, clocks). It only translates: values through
 * lvalue.c, failures into error objects through lerror.c; policy (retries,
 * work decisions, backoff) lives in lua/bmdb/internal.lua. The binary and
 * busted load the same luaopen_bmdb_core(): the binary hands over its pool
 * with lcore_set_pool(), specs call core.open{dsn=...} (lboot.c) instead.
 * The slots' services (lslot.c), the scheduler's (lsched.c) and the test
 * bootstrap (lboot.c) register their functions into the same table. */
#include "lcore.h"

#include "items.h"

#include <lauxlib.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "lerror.h"
#include "lifecycle.h"
#include "log.h"
#include "lvalue.h"
#include "pool.h"
#include "session.h"
#include "slots.h"
#include "tx.h"
#include "work.h"

#define SESSION_MT "bmdb.session"
#define TX_MT "bmdb.tx"

/* The pool every bmdb call uses. Set before any slot or script thread
 * starts and cleared after they all ended (main.c, core.open/close), so
 * it is read without a lock. */
static pool *the_pool;

void lcore_set_pool(pool *p) { the_pool = p; }
pool *lcore_pool(void) { return the_pool; }

/* Every bmdb call starts here: a canceled host raises before any SQL. */
static void check_running(lua_State *L) {
    if (lifecycle_state() >= HOST_CANCELLING) lerror_raise_kind(L, "canceled", "canceled: the host is shutting down");
}

/* ---- sessions ---------------------------------------------------------- */

typedef struct { session *s; } lsession;

static session *check_session(lua_State *L, int idx) {
    lsession *u = lerror_checkudata(L, idx, SESSION_MT, "bmdb session");
    return u->s;
}

session *lcore_opt_session(lua_State *L, int idx) {
    return lua_isnoneornil(L, idx) ? NULL : check_session(L, idx);
}

/* core.session(): the host's current session, waiting briefly while the
 * heartbeat replaces a lost one. */
static int l_session(lua_State *L) {
    check_running(L);
    if (!sessions_started())
        return lerror_raise_kind(L, "not_connected", "bmdb: not connected to a database (no session)");
    double wait = luaL_optnumber(L, 1, 10);
    session *s = session_current(wait);
    if (!s) return lerror_raise_kind(L, "session_expired", "session expired (no live session)");
    lsession *u = lua_newuserdata(L, sizeof *u);
    u->s = s;
    luaL_getmetatable(L, SESSION_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static int sess_gc(lua_State *L) {
    lsession *u = lerror_checkudata(L, 1, SESSION_MT, "bmdb session");
    session_unref(u->s);
    u->s = NULL;
    return 0;
}

static int sess_id(lua_State *L) {
    lua_pushstring(L, session_id(check_session(L, 1)));
    return 1;
}

static int sess_component(lua_State *L) {
    lua_pushstring(L, session_component(check_session(L, 1)));
    return 1;
}

static int sess_alive(lua_State *L) {
    lua_pushboolean(L, session_alive(check_session(L, 1)));
    return 1;
}

/* ---- transactions ------------------------------------------------------ */

/* t is own, or the batch's transaction during a batch member's turn
 * (borrowed: NULL once the turn is over). */
typedef struct { tx own; tx *t; } ltx;

static int ltx_borrowed(const ltx *u) { return u->t != &u->own; }

/* A new tx userdata on the stack, not yet begun (so __gc has nothing to
 * roll back), for a transaction of the session at argument 1. */
static ltx *push_tx(lua_State *L, session **s) {
    check_running(L);
    *s = check_session(L, 1);
    if (!the_pool) lerror_raise_kind(L, "not_connected", "bmdb: not connected to a database (no pool)");
    ltx *u = lua_newuserdata(L, sizeof *u);
    memset(u, 0, sizeof *u);
    u->t = &u->own;
    luaL_getmetatable(L, TX_MT);
    lua_setmetatable(L, -2);
    return u;
}

tx **lcore_push_tx(lua_State *L, session **s) { return &push_tx(L, s)->t; }

tx *lcore_tx_at(lua_State *L, int idx) { return ((ltx *)lerror_checkudata(L, idx, TX_MT, "bmdb tx"))->t; }

static int l_begin(lua_State *L) {
    session *s;
    ltx *u = push_tx(L, &s);
    /* The tx keeps its session alive as long as it exists, and its __gc
     * lets go. tx_begin records the session even when it fails, so the
     * reference is taken first: one ref for the one unref, whatever happens. */
    session_ref(s);
    tx_error e;
    /* core.begin(sess, machine, process, token): a body's transaction,
     * fenced by its item too */
    tx_item item = {lua_tostring(L, 2), lua_tostring(L, 3), lua_tostring(L, 4)};
    int fenced = item.machine && item.process && item.token;
    if (tx_begin_item(u->t, the_pool, s, fenced ? &item : NULL, &e) < 0) return lerror_raise(L, &e);
    return 1;
}

/* u, at argument 1, open; with queue_only, a batch member's tx may stay
 * its own (tx:defer), else it becomes the batch's. */
static ltx *check_open_tx_for(lua_State *L, const char *fname, int queue_only) {
    ltx *u = lerror_checkudata(L, 1, TX_MT, "bmdb tx");
    if (!u->t)
        lerror_raise_kind(L, "closed", "%s: the transaction is over (tx is valid only inside its commit "
                          "function)", fname);
    if (!queue_only) lsched_use_batch(L, &u->t);
    if (u->t->doomed) {
        /* The fence failed earlier in this transaction: say so again,
         * however the body handled the first answer. */
        tx_error e = u->t->doom;
        lerror_raise(L, &e);
    }
    if (!u->t->open)
        lerror_raise_kind(L, "closed", "%s: the transaction is over (tx is valid only inside its bmdb.transact "
                          "function)", fname);
    check_running(L);
    if (u->t->sess && !session_alive(u->t->sess)) {
        if (!ltx_borrowed(u)) tx_rollback(u->t); /* a batch's ends with the batch */
        lerror_raise_kind(L, "session_expired", "session expired");
    }
    return u;
}

static ltx *check_open_tx(lua_State *L, const char *fname) { return check_open_tx_for(L, fname, 0); }

tx *lcore_check_tx(lua_State *L, const char *fname) { return check_open_tx(L, fname)->t; }

/* A statement method's tx, its SQL (refused when it would start, end or
 * split the transaction) and its parameters, into p. */
static ltx *check_statement(lua_State *L, const char *fname, const char **sql, lvalue_params_t *p,
                            int queue_only) {
    ltx *u = check_open_tx_for(L, fname, queue_only);
    *sql = lerror_checkstring(L, 2);
    char name[64];
    if (lvalue_transaction_control(*sql, name, sizeof name))
        lerror_raise_kind(L, "usage", "%s: %s is refused inside bmdb.transact: the transaction "
                          "belongs to the host (return from the function to commit, raise to "
                          "roll back)", fname, name);
    lvalue_params(L, fname, *sql, 3, p);
    return u;
}

static int tx_statement(lua_State *L, const char *fname) {
    const char *sql;
    lvalue_params_t p;
    ltx *u = check_statement(L, fname, &sql, &p, 0);
    tx_error e;
    PGresult *r = tx_exec_params(u->t, sql, p.n, p.values, p.lengths, p.formats, &e);
    if (!r) return lerror_raise(L, &e);
    return lvalue_push_result(L, fname, r);
}

/* tx:defer(sql, ...): queued to ride with the next statement or COMMIT,
 * its answer never waited for (tx.h, tx_defer). */
static int tx_defer_l(lua_State *L) {
    const char *sql;
    lvalue_params_t p;
    ltx *u = check_statement(L, "defer", &sql, &p, 1);
    tx_error e;
    int rc = tx_defer(u->t, sql, p.n, p.values, p.lengths, p.formats, &e);
    if (rc == 1) { /* a batch member's, which needs the batch's connection for this one */
        lsched_use_batch(L, &u->t);
        rc = tx_defer(u->t, sql, p.n, p.values, p.lengths, p.formats, &e);
    }
    if (rc < 0) return lerror_raise(L, &e);
    return 0;
}

static int tx_query(lua_State *L) { return tx_statement(L, "query"); }
static int tx_one(lua_State *L) { return tx_statement(L, "one"); }
static int tx_execute(lua_State *L) { return tx_statement(L, "exec"); }

static int release_tx_session(ltx *u) {
    if (u->t->sess) {
        session_unref(u->t->sess);
        u->t->sess = NULL;
    }
    return 0;
}

/* A batch member's tx is the batch's: it commits or rolls back with the
 * batch (sched.h), never by one member's call. */
static ltx *check_own_tx(lua_State *L, const char *fname) {
    ltx *u = lerror_checkudata(L, 1, TX_MT, "bmdb tx");
    if (ltx_borrowed(u))
        lerror_raise_kind(L, "usage", "%s: this transaction is a batch's, and ends with it", fname);
    return u;
}

static int tx_commit_l(lua_State *L) {
    ltx *u = check_own_tx(L, "commit");
    tx_error e;
    if (u->t->doomed) {
        e = u->t->doom;
        release_tx_session(u);
        return lerror_raise(L, &e);
    }
    if (!u->t->open) return lerror_raise_kind(L, "closed", "commit: the transaction is over");
    if (lifecycle_state() >= HOST_CANCELLING) {
        tx_rollback(u->t);
        release_tx_session(u);
        return lerror_raise_kind(L, "canceled", "canceled: the host is shutting down");
    }
    int rc = tx_commit(u->t, &e);
    release_tx_session(u);
    if (rc < 0) return lerror_raise(L, &e);
    return 0;
}

static int tx_rollback_l(lua_State *L) {
    ltx *u = check_own_tx(L, "rollback");
    tx_rollback(u->t);
    release_tx_session(u);
    return 0;
}

static int tx_gc(lua_State *L) {
    ltx *u = lerror_checkudata(L, 1, TX_MT, "bmdb tx");
    if (ltx_borrowed(u)) return 0;
    tx_rollback(u->t);
    release_tx_session(u);
    return 0;
}

/* ---- work locks -------------------------------------------------------- */

void lcore_check_ids(lua_State *L, int midx, int pidx) {
    const char *m = lerror_checkstring(L, midx), *p = lerror_checkstring(L, pidx);
    if (!work_valid_uuid(m)) lerror_argerror(L, midx, "machine id is not a UUID: %s", m);
    if (!work_valid_process(p))
        lerror_argerror(L, pidx, "invalid process name '%s' (a letter, then letters, digits or _; at most 63)", p);
}

/* An optional numeric field of table idx as parameter text, into buf. */
static const char *opt_number_text(lua_State *L, int idx, const char *k, char *buf, size_t len) {
    if (!lua_istable(L, idx)) return NULL;
    lua_getfield(L, idx, k);
    const char *v = NULL;
    if (lua_type(L, -1) == LUA_TNUMBER) {
        lvalue_format_number(lua_tonumber(L, -1), buf, len);
        v = buf;
    }
    lua_pop(L, 1);
    return v;
}

/* The claim options table (lcore.h), for core.lock and core.lock_any. */
void lcore_claim_options(lua_State *L, int idx, work_claim *c, char b[4][40]) {
    *c = (work_claim){opt_number_text(L, idx, "timeout", b[0], 40), opt_number_text(L, idx, "initial", b[1], 40),
                      opt_number_text(L, idx, "maximum", b[2], 40), opt_number_text(L, idx, "exponent", b[3], 40)};
}

/* core.lock(tx, machine, process, {timeout=, initial=, maximum=, exponent=})
 * -> "locked", attempt, token | "held" | "backoff", until
 *  | "paused", reason | "onhold", reason */
static int l_lock(lua_State *L) {
    ltx *u = check_open_tx(L, "lock");
    lcore_check_ids(L, 2, 3);
    char b[4][40];
    work_claim c;
    lcore_claim_options(L, 4, &c, b);
    work_locked out;
    tx_error e;
    work_lock_result res = work_lock(u->t, lua_tostring(L, 2), lua_tostring(L, 3), &c, &out, &e);
    switch (res) {
    case WORK_LOCKED:
        slot_note_item(lua_tostring(L, 2)); /* named if its slot will not stop */
        lua_pushliteral(L, "locked");
        lua_pushinteger(L, out.attempt);
        lua_pushstring(L, out.token);
        return 3;
    case WORK_HELD:
        lua_pushliteral(L, "held");
        return 1;
    case WORK_BACKOFF:
        lua_pushliteral(L, "backoff");
        lua_pushstring(L, out.until);
        return 2;
    case WORK_PAUSED:
    case WORK_ON_HOLD:
        lua_pushstring(L, res == WORK_PAUSED ? "paused" : "onhold");
        lua_pushstring(L, out.why);
        return 2;
    default:
        return lerror_raise(L, &e);
    }
}

/* core.release(tx, machine, process, event, cause, seconds, token) */
static int l_release(lua_State *L) {
    ltx *u = check_open_tx(L, "release");
    lcore_check_ids(L, 2, 3);
    static const char *const events[] = {"Finished", "Failed", "Canceled", NULL};
    int ev = luaL_checkoption(L, 4, NULL, events);
    tx_error e;
    if (work_release(u->t, lua_tostring(L, 2), lua_tostring(L, 3), luaL_optstring(L, 7, NULL), events[ev],
                     luaL_optstring(L, 5, NULL), (long)luaL_optnumber(L, 6, 1), &e) < 0)
        return lerror_raise(L, &e);
    slot_note_item(NULL);
    return 0;
}

static int l_backoff_last(lua_State *L) {
    ltx *u = check_open_tx(L, "backoff_last");
    lcore_check_ids(L, 2, 3);
    tx_error e;
    long last = work_backoff_last(u->t, lua_tostring(L, 2), lua_tostring(L, 3), &e);
    if (last < 0) return lerror_raise(L, &e);
    if (last == 0) lua_pushnil(L);
    else lua_pushnumber(L, (lua_Number)last);
    return 1;
}

/* ---- host services ----------------------------------------------------- */

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

static int l_pause_heartbeat(lua_State *L) {
    sessions_pause_heartbeat(lua_toboolean(L, 1));
    return 0;
}

static const luaL_Reg core_funcs[] = {
    {"session", l_session},       {"begin", l_begin},
    {"lock", l_lock},             {"release", l_release},
    {"backoff_last", l_backoff_last},
    {"sleep", l_sleep},           {"retry_delay", l_retry_delay},
    {"log", l_log},               {"state", l_state},
    {"valid_uuid", l_valid_uuid}, {"valid_process", l_valid_process},
    {"error", lerror_l_error},    {"is_error", lerror_l_is_error},
    {"pause_heartbeat", l_pause_heartbeat},
    {"seed", l_seed},             {"now", l_now},
    {NULL, NULL}};

static const luaL_Reg session_methods[] = {
    {"id", sess_id}, {"component", sess_component}, {"alive", sess_alive}, {NULL, NULL}};

static const luaL_Reg tx_methods[] = {{"query", tx_query},   {"one", tx_one},
                                      {"exec", tx_execute},  {"defer", tx_defer_l},
                                      {"commit", tx_commit_l},
                                      {"rollback", tx_rollback_l}, {NULL, NULL}};

void lcore_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc) {
    luaL_newmetatable(L, name);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
}

int luaopen_bmdb_core(lua_State *L) {
    lerror_open(L);
    lcore_class(L, SESSION_MT, session_methods, sess_gc);
    lcore_class(L, TX_MT, tx_methods, tx_gc);
    lua_newtable(L);
    luaL_register(L, NULL, core_funcs);
    lslot_register(L);
    lsched_register(L);
    lboot_register(L);
    lcontrol_register(L);
    lhttp_register(L);
    ljson_register(L);
    lexec_register(L);
    llimit_register(L);
    return 1;
}

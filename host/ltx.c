/* ltx.c -- sessions and transactions as Lua sees them (bmdb.core).
 *
 * core.session() hands out a handle on the host's current session;
 * core.begin() a fenced transaction of one (tx.h), whose methods run
 * statements (query, one, exec), queue them (defer), commit and roll
 * back. A batch member's transaction only queues until it sends a
 * statement, and then becomes the batch's (sched.h): it commits or rolls
 * back with the batch, never by one member's call. Values go through
 * lvalue.c, failures become error objects through lerror.c. */
#include "ltx.h"

#include <lauxlib.h>
#include <string.h>

#include "lcore.h"
#include "lerror.h"
#include "lifecycle.h"
#include "lvalue.h"

/* Every call of a session or transaction starts here: a canceled host
 * raises before any SQL. */
static void check_running(lua_State *L) {
    if (lifecycle_state() >= HOST_CANCELLING)
        lerror_raise_kind(L, BMDB_E_CANCELED, "canceled: the host is shutting down");
}

/* ---- sessions ---------------------------------------------------------- */

typedef struct { session *s; } lsession;

session *ltx_check_session(lua_State *L, int idx) {
    lsession *u = lerror_checkudata(L, idx, LSESSION_MT, "bmdb session");
    return u->s;
}

/* core.session(): the host's current session, waiting briefly while the
 * heartbeat replaces a lost one. */
static int l_session(lua_State *L) {
    check_running(L);
    if (!sessions_started())
        return lerror_raise_kind(L, BMDB_E_NOT_CONNECTED, "bmdb: not connected to a database (no session)");
    double wait = luaL_optnumber(L, 1, 10);
    session *s = session_current(wait);
    if (!s) return lerror_raise_kind(L, BMDB_E_SESSION_EXPIRED, "session expired (no live session)");
    lsession *u = lua_newuserdata(L, sizeof *u);
    u->s = s;
    luaL_getmetatable(L, LSESSION_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static int sess_gc(lua_State *L) {
    lsession *u = lerror_checkudata(L, 1, LSESSION_MT, "bmdb session");
    session_unref(u->s);
    u->s = NULL;
    return 0;
}

static int sess_id(lua_State *L) {
    lua_pushstring(L, session_id(ltx_check_session(L, 1)));
    return 1;
}

static int sess_component(lua_State *L) {
    lua_pushstring(L, session_component(ltx_check_session(L, 1)));
    return 1;
}

static int sess_alive(lua_State *L) {
    lua_pushboolean(L, session_alive(ltx_check_session(L, 1)));
    return 1;
}

/* ---- transactions ------------------------------------------------------ */

static int ltx_borrowed(const ltx *u) { return u->t != &u->own; }

ltx *ltx_push(lua_State *L, session **s) {
    check_running(L);
    *s = ltx_check_session(L, 1);
    if (!lcore_pool())
        lerror_raise_kind(L, BMDB_E_NOT_CONNECTED, "bmdb: not connected to a database (no pool)");
    ltx *u = lua_newuserdata(L, sizeof *u);
    memset(u, 0, sizeof *u);
    u->t = &u->own;
    luaL_getmetatable(L, LTX_MT);
    lua_setmetatable(L, -2);
    return u;
}

static int l_begin(lua_State *L) {
    session *s;
    ltx *u = ltx_push(L, &s);
    /* The tx keeps its session alive as long as it exists, and its __gc
     * lets go. tx_begin records the session even when it fails, so the
     * reference is taken first: one ref for the one unref, whatever happens. */
    session_ref(s);
    tx_error e;
    /* core.begin(sess, machine, process, token): a body's transaction,
     * fenced by its item too; core.begin(sess, nil, loop, token): a loop
     * run's, fenced by its hold */
    tx_item item = {lua_tostring(L, 2), lua_tostring(L, 3), lua_tostring(L, 4), lua_isnil(L, 2)};
    int fenced = (item.machine || item.loop) && item.process && item.token;
    if (tx_begin_item(u->t, lcore_pool(), s, fenced ? &item : NULL, &e) < 0) return lerror_raise(L, &e);
    return 1;
}

/* u, at argument 1, open; with queue_only, a batch member's tx may stay
 * its own (tx:defer), else it becomes the batch's: a member's tx only
 * queues deferred statements until it sends one (lsched_use_batch). */
/* lcore.h's, for the bindings that take a session or a transaction but
 * not ltx.h's handles. */
session *lcore_opt_session(lua_State *L, int idx) {
    return lua_isnoneornil(L, idx) ? NULL : ltx_check_session(L, idx);
}

tx *lcore_check_tx(lua_State *L, const char *fname) { return ltx_check_open(L, fname)->t; }

tx *ltx_at(lua_State *L, int idx) { return ((ltx *)lerror_checkudata(L, idx, LTX_MT, "bmdb tx"))->t; }

static ltx *check_open_tx_for(lua_State *L, const char *fname, int queue_only) {
    ltx *u = lerror_checkudata(L, 1, LTX_MT, "bmdb tx");
    if (!u->t)
        lerror_raise_kind(L, BMDB_E_CLOSED, "%s: the transaction is over (tx is valid only inside its commit "
                          "function)", fname);
    if (!queue_only) lsched_use_batch(L, &u->t);
    if (tx_doomed(u->t)) {
        /* The fence failed earlier in this transaction: say so again,
         * however the body handled the first answer. */
        tx_error e = *tx_doom(u->t);
        lerror_raise(L, &e);
    }
    if (!tx_is_open(u->t))
        lerror_raise_kind(L, BMDB_E_CLOSED, "%s: the transaction is over (tx is valid only inside its "
                          "bmdb.transact function)", fname);
    check_running(L);
    if (u->t->sess && !session_alive(u->t->sess)) {
        if (!ltx_borrowed(u)) tx_rollback(u->t); /* a batch's ends with the batch */
        lerror_raise_kind(L, BMDB_E_SESSION_EXPIRED, "session expired");
    }
    return u;
}

ltx *ltx_check_open(lua_State *L, const char *fname) { return check_open_tx_for(L, fname, 0); }

/* A statement method's tx, its SQL (refused when it would start, end or
 * split the transaction) and its parameters, into p. */
static ltx *check_statement(lua_State *L, const char *fname, const char **sql, lvalue_params_t *p,
                            int queue_only) {
    ltx *u = check_open_tx_for(L, fname, queue_only);
    *sql = lerror_checkstring(L, 2);
    char name[64];
    if (lvalue_transaction_control(*sql, name, sizeof name))
        lerror_raise_kind(L, BMDB_E_USAGE, "%s: %s is refused inside bmdb.transact: the transaction "
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
    ltx *u = lerror_checkudata(L, 1, LTX_MT, "bmdb tx");
    if (ltx_borrowed(u))
        lerror_raise_kind(L, BMDB_E_USAGE, "%s: this transaction is a batch's, and ends with it", fname);
    return u;
}

static int tx_commit_l(lua_State *L) {
    ltx *u = check_own_tx(L, "commit");
    tx_error e;
    if (tx_doomed(u->t)) {
        e = *tx_doom(u->t);
        release_tx_session(u);
        return lerror_raise(L, &e);
    }
    if (!tx_is_open(u->t)) return lerror_raise_kind(L, BMDB_E_CLOSED, "commit: the transaction is over");
    if (lifecycle_state() >= HOST_CANCELLING) {
        tx_rollback(u->t);
        release_tx_session(u);
        return lerror_raise_kind(L, BMDB_E_CANCELED, "canceled: the host is shutting down");
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
    ltx *u = lerror_checkudata(L, 1, LTX_MT, "bmdb tx");
    if (ltx_borrowed(u)) return 0;
    tx_rollback(u->t);
    release_tx_session(u);
    return 0;
}

void ltx_register(lua_State *L) {
    static const luaL_Reg session_methods[] = {
        {"id", sess_id}, {"component", sess_component}, {"alive", sess_alive}, {NULL, NULL}};
    static const luaL_Reg tx_methods[] = {{"query", tx_query},   {"one", tx_one},
                                          {"exec", tx_execute},  {"defer", tx_defer_l},
                                          {"commit", tx_commit_l},
                                          {"rollback", tx_rollback_l}, {NULL, NULL}};
    static const luaL_Reg funcs[] = {{"session", l_session}, {"begin", l_begin}, {NULL, NULL}};
    lcore_class(L, LSESSION_MT, session_methods, sess_gc);
    lcore_class(L, LTX_MT, tx_methods, tx_gc);
    luaL_register(L, NULL, funcs);
}

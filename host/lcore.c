/* lcore.c -- the module "bmdb.core": the C core as Lua sees it.
 *
 * Sessions, fenced transactions and work locks as userdata, and the host's
 * services (sleep, log, state, clocks). It only translates: values through
 * lvalue.c, failures into error objects through lerror.c; policy (retries,
 * work decisions, backoff) lives in lua/bmdb/internal.lua. The binary and
 * busted load the same luaopen_bmdb_core(): the binary hands over its pool
 * with lcore_set_pool(), specs call core.open{dsn=...} (lboot.c) instead.
 * The slots' services (lslot.c) and the test bootstrap (lboot.c) register
 * their functions into the same table. */
#include "lcore.h"

#include "control.h"

#include <lauxlib.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "batch.h"
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

/* The batch this slot thread is a member of (one at most), and the tx
 * its commit function was given. */
typedef struct { batch_member m; ltx *tx; } lbatch;
static __thread lbatch in_batch;

/* A batch member's tx only queues deferred statements (batch.h) until
 * the member sends a statement: then it waits to use the batch's. */
static void use_batch(lua_State *L, ltx *u) {
    if (u != in_batch.tx || u->t != &in_batch.m.own) return;
    tx *t;
    tx_error e;
    if (batch_use(&in_batch.m, &t, &e) < 0) lerror_raise(L, &e);
    u->t = t;
}

/* u, at argument 1, open; with queue_only, a batch member's tx may stay
 * its own (tx:defer), else it becomes the batch's. */
static ltx *check_open_tx_for(lua_State *L, const char *fname, int queue_only) {
    ltx *u = lerror_checkudata(L, 1, TX_MT, "bmdb tx");
    if (!u->t)
        lerror_raise_kind(L, "closed", "%s: the transaction is over (tx is valid only inside its commit "
                          "function)", fname);
    if (!queue_only) use_batch(L, u);
    if (tx_doomed(u->t)) {
        /* The fence failed earlier in this transaction: say so again,
         * however the body handled the first answer. */
        tx_error e = *tx_doom(u->t);
        lerror_raise(L, &e);
    }
    if (!tx_is_open(u->t))
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
        use_batch(L, u);
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
 * batch (batch.h), never by one member's call. */
static ltx *check_own_tx(lua_State *L, const char *fname) {
    ltx *u = lerror_checkudata(L, 1, TX_MT, "bmdb tx");
    if (ltx_borrowed(u))
        lerror_raise_kind(L, "usage", "%s: this transaction is a batch's, and ends with it", fname);
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
    if (!tx_is_open(u->t)) return lerror_raise_kind(L, "closed", "commit: the transaction is over");
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

static void check_ids(lua_State *L, int midx, int pidx);

/* ---- batches of finishes (batch.h) --------------------------------------
 *
 * core.batch_join(sess) -> tx, or nil (finish alone) and, when the open
 * batch has failed, its error. The tx is this member's part of the batch
 * (in_batch above) until core.batch_leave. */

static int l_batch_join(lua_State *L) {
    session *s;
    ltx *u = push_tx(L, &s);
    tx *t;
    int got = batch_join(the_pool, s, &in_batch.m, &t);
    if (got == BATCH_JOINED) {
        u->t = t;
        in_batch.tx = u;
        return 1;
    }
    lua_pushnil(L);
    if (got == BATCH_ALONE) return 1;
    lerror_push(L, &in_batch.m.err);
    return 2;
}

/* {machine, attempt, token} on top, with room for more fields. */
static void push_item(lua_State *L, const char *machine, int attempt, const char *token, int fields) {
    lua_createtable(L, fields, 0);
    lua_pushstring(L, machine);
    lua_rawseti(L, -2, 1);
    lua_pushinteger(L, attempt);
    lua_rawseti(L, -2, 2);
    lua_pushstring(L, token);
    lua_rawseti(L, -2, 3);
}

/* {machine, attempt, token, session_id, started}: an item a claim in a
 * batch handed this slot, as its serve loop adopts it next. */
static void push_next(lua_State *L, const slot_handed *h) {
    push_item(L, h->machine, h->attempt, h->token, 5);
    lua_pushstring(L, h->session);
    lua_rawseti(L, -2, 4);
    lua_pushnumber(L, h->started);
    lua_rawseti(L, -2, 5);
}

/* core.batch_leave(ok, fatal, machine, process, token, takes_next,
 * may_claim) -> true (the batch committed this slot's release; then,
 * fourth, the next item the closer's claim handed it, if any); false
 * (without ok: its own failure, undone); false, the batch's error and
 * true (the batch failed: finish alone); or "claim" and peers (batch.h:
 * the tx becomes the batch's, to claim in; then core.batch_close). */
static int l_batch_leave(lua_State *L) {
    int ok = lua_toboolean(L, 1), fatal = lua_toboolean(L, 2);
    const char *machine = NULL, *process = NULL, *token = NULL;
    if (ok) {
        check_ids(L, 3, 4);
        machine = lua_tostring(L, 3);
        process = lua_tostring(L, 4);
        token = lerror_checkstring(L, 5);
        if (!work_valid_uuid(token)) lerror_argerror(L, 5, "token is not a UUID: %s", token);
    }
    if (!in_batch.tx) return lerror_raise_kind(L, "usage", "batch_leave: not in a batch");
    int peers = 0;
    int got = batch_leave(&in_batch.m, ok, fatal, machine, process, token, lua_toboolean(L, 6),
                          lua_toboolean(L, 7), &peers);
    if (got == BATCH_CLAIM) {
        tx_error e;
        batch_use(&in_batch.m, &in_batch.tx->t, &e); /* the closer holds it: cannot fail */
        lua_pushliteral(L, "claim");
        lua_pushinteger(L, peers);
        return 2;
    }
    in_batch.tx->t = NULL;
    in_batch.tx = NULL;
    if (got == 1) {
        const slot_handed *h = &in_batch.m.next;
        slot_note_item(in_batch.m.has_next ? h->machine : NULL);
        if (in_batch.m.has_next) slot_note_handed(-1); /* taken */
        lua_pushboolean(L, 1);
        if (!in_batch.m.has_next) return 1;
        lua_pushnil(L);
        lua_pushnil(L);
        push_next(L, h);
        return 4;
    }
    lua_pushboolean(L, 0);
    if (got == 0) return 1;
    lerror_push(L, &in_batch.m.err);
    lua_pushboolean(L, 1);
    return 3;
}

/* {machine, attempt, token} as entry i (from 0) of the list on top. */
static void push_claimed(lua_State *L, int i, const char *machine, int attempt, const char *token) {
    push_item(L, machine, attempt, token, 3);
    lua_rawseti(L, -2, i + 1);
}

/* core.batch_close(claim_sent, started) -> true, nil, { {machine,
 * attempt, token}, ... } (the closer's item first, then what the claim
 * locked and could hand to nobody: the caller lets it go), and how many
 * it handed to other slots; or false and the batch's error: the end of a
 * batch whose closer claimed in it (core.batch_leave's "claim"). The
 * claim turn is let go either way. */
static int l_batch_close(lua_State *L) {
    if (!in_batch.tx) return lerror_raise_kind(L, "usage", "batch_close: not closing a batch");
    in_batch.tx->t = NULL;
    in_batch.tx = NULL;
    slot_handed claimed[BATCH_MAX];
    int n = 0;
    int handed = 0;
    if (!batch_close(&in_batch.m, lua_toboolean(L, 1), luaL_optnumber(L, 2, 0), claimed, BATCH_MAX, &n,
                     &handed)) {
        lua_pushboolean(L, 0);
        lerror_push(L, &in_batch.m.err);
        return 2;
    }
    slot_note_item(n > 0 ? claimed[0].machine : NULL);
    lua_pushboolean(L, 1);
    lua_pushnil(L);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) push_claimed(L, i, claimed[i].machine, claimed[i].attempt, claimed[i].token);
    lua_pushinteger(L, handed);
    return 4;
}

/* core.batch_members() -> members of the open batch, those not yet left */
static int l_batch_members(lua_State *L) {
    int active;
    lua_pushinteger(L, batch_members(&active));
    lua_pushinteger(L, active);
    return 2;
}

/* ---- work locks -------------------------------------------------------- */

static void check_ids(lua_State *L, int midx, int pidx) {
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

/* Reads the claim options table at idx into c, with its texts in b. */
static void claim_options(lua_State *L, int idx, work_claim *c, char b[4][40]) {
    *c = (work_claim){opt_number_text(L, idx, "timeout", b[0], 40), opt_number_text(L, idx, "initial", b[1], 40),
                      opt_number_text(L, idx, "maximum", b[2], 40), opt_number_text(L, idx, "exponent", b[3], 40)};
}

/* core.lock(tx, machine, process, {timeout=, initial=, maximum=, exponent=})
 * -> "locked", attempt, token | "held" | "backoff", until
 *  | "paused", reason | "onhold", reason */
static int l_lock(lua_State *L) {
    ltx *u = check_open_tx(L, "lock");
    check_ids(L, 2, 3);
    char b[4][40];
    work_claim c;
    claim_options(L, 4, &c, b);
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

/* core.lock_any(tx, {id, ...}, process, opts, count): the usual claim of
 * up to count free ids (all valid UUIDs), sent with COMMIT;
 * core.claimed(tx) tells the outcome once committed. */
static int l_lock_any(lua_State *L) {
    ltx *u = check_open_tx(L, "lock_any");
    luaL_checktype(L, 2, LUA_TTABLE);
    const char *process = lerror_checkstring(L, 3);
    if (!work_valid_process(process)) lerror_argerror(L, 3, "invalid process name '%s'", process);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addchar(&b, '{');
    size_t n = lua_objlen(L, 2);
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, 2, (int)i);
        const char *id = lua_tostring(L, -1);
        if (!work_valid_uuid(id)) lerror_argerror(L, 2, "candidate %d is not a machine id", (int)i);
        lua_pop(L, 1);
        if (i > 1) luaL_addchar(&b, ',');
        luaL_addstring(&b, id);
    }
    luaL_addchar(&b, '}');
    luaL_pushresult(&b);
    char nb[4][40];
    work_claim c;
    claim_options(L, 4, &c, nb);
    tx_error e;
    int count = (int)luaL_optinteger(L, 5, 1);
    if (work_lock_any(u->t, lua_tostring(L, -1), count, process, &c, &e) < 0) return lerror_raise(L, &e);
    return 0;
}

/* core.claimed(tx) -> { {machine, attempt, token}, ... }: what the
 * committed core.lock_any locked (empty when nothing); the caller keeps
 * the first. */
static int l_claimed(lua_State *L) {
    ltx *u = lerror_checkudata(L, 1, TX_MT, "bmdb tx");
    char machine[40];
    work_locked out;
    lua_newtable(L);
    for (int i = 0; u->t && work_locked_any(u->t, i, machine, sizeof machine, &out); i++) {
        /* The first is the claimer's own; the others' slots note theirs
         * when they are handed them (slots.h). */
        if (i == 0) slot_note_item(machine); /* named if its slot will not stop */
        push_claimed(L, i, machine, out.attempt, out.token);
    }
    return 1;
}

/* core.release(tx, machine, process, event, cause, seconds, token) */
static int l_release(lua_State *L) {
    ltx *u = check_open_tx(L, "release");
    check_ids(L, 2, 3);
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
    check_ids(L, 2, 3);
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
            control_state_lost(L, NULL, 0)) {
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
    {"lock_any", l_lock_any},     {"claimed", l_claimed},
    {"backoff_last", l_backoff_last},
    {"batch_join", l_batch_join}, {"batch_leave", l_batch_leave}, {"batch_close", l_batch_close},
    {"batch_members", l_batch_members},
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
    lua_pushinteger(L, BATCH_MAX); /* the most items one claim hands out */
    lua_setfield(L, -2, "claim_max");
    lslot_register(L);
    lboot_register(L);
    lcontrol_register(L);
    lhttp_register(L);
    ljson_register(L);
    lexec_register(L);
    llimit_register(L);
    return 1;
}

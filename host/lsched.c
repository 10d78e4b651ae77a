/* lsched.c -- the scheduler (sched.h) as the slots' loop (Lua) calls it.
 *
 * The claim and finish turns and the queue of handed items (core.claim_*,
 * core.finish_*), the usual claim's lock and what it locked
 * (core.lock_any, core.claimed), and a finish's part in the host's batch
 * (core.batch_join, batch_leave, batch_close, batch_members;
 * core.claim_max). It only translates: every item is a sched_item here
 * and one table in Lua, made by lsched_push_item and read back by
 * lsched_check_item alone; what each call returns follows lcore.h's rule.
 * Outside the binary (busted) it works the same, with nobody else
 * waiting. */
#include <lauxlib.h>
#include <stdio.h>
#include <string.h>

#include "lcore.h"
#include "lerror.h"
#include "ltx.h"
#include "sched.h"
#include "work.h"

/* ---- items ----------------------------------------------------------------
 *
 * A work item crosses into Lua as one table whose fields mirror
 * sched_item: machine, process, token, session_id, attempt, started. A
 * field its source does not know (an empty text, attempt or started 0) is
 * left out: core.claimed's and core.lock's items have no started, which
 * Lua sets before it hands one on. */

static void set_text(lua_State *L, const char *k, const char *v) {
    if (!*v) return;
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

void lsched_push_item(lua_State *L, const sched_item *it) {
    lua_createtable(L, 0, 6);
    set_text(L, "machine", it->machine);
    set_text(L, "process", it->process);
    set_text(L, "token", it->token);
    set_text(L, "session_id", it->session_id);
    if (it->attempt > 0) {
        lua_pushinteger(L, it->attempt);
        lua_setfield(L, -2, "attempt");
    }
    if (it->started > 0) {
        lua_pushnumber(L, it->started);
        lua_setfield(L, -2, "started");
    }
}

/* The items as a list of item tables. */
static void push_items(lua_State *L, const sched_item *its, int n) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lsched_push_item(L, &its[i]);
        lua_rawseti(L, -2, i + 1);
    }
}

static void copy(char *dst, size_t len, const char *src) { snprintf(dst, len, "%s", src ? src : ""); }

/* Field k of the item at idx as text into dst (empty when absent; one
 * too long for dst is refused, not cut, so a check of dst sees it all). */
static void get_text(lua_State *L, int idx, const char *k, char *dst, size_t len) {
    lua_getfield(L, idx, k);
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
        lerror_argerror(L, idx, "item.%s: string expected, got %s", k, luaL_typename(L, -1));
    size_t n = 0;
    const char *v = lua_tolstring(L, -1, &n);
    if (n >= len) lerror_argerror(L, idx, "item.%s is too long (%d bytes)", k, (int)n);
    copy(dst, len, v);
    lua_pop(L, 1);
}

static double get_number(lua_State *L, int idx, const char *k) {
    lua_getfield(L, idx, k);
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TNUMBER)
        lerror_argerror(L, idx, "item.%s: number expected, got %s", k, luaL_typename(L, -1));
    double v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

void lsched_check_item(lua_State *L, int idx, sched_item *out) {
    if (!lua_istable(L, idx)) lerror_argerror(L, idx, "item expected, got %s", luaL_typename(L, idx));
    get_text(L, idx, "machine", out->machine, sizeof out->machine);
    get_text(L, idx, "process", out->process, sizeof out->process);
    get_text(L, idx, "token", out->token, sizeof out->token);
    get_text(L, idx, "session_id", out->session_id, sizeof out->session_id);
    out->attempt = (int)get_number(L, idx, "attempt");
    out->started = get_number(L, idx, "started");
    if (!work_valid_uuid(out->machine)) lerror_argerror(L, idx, "item.machine is not a UUID: %s", out->machine);
    if (!work_valid_process(out->process))
        lerror_argerror(L, idx, "item.process is not a process name: '%s'", out->process);
    if (!work_valid_uuid(out->token)) lerror_argerror(L, idx, "item.token is not a UUID: %s", out->token);
}

/* ---- claims and finishes take turns --------------------------------------- */

/* core.claim_enter(process, seconds) -> "turn" | "handed", item | "timeout" */
static int l_claim_enter(lua_State *L) {
    sched_item it;
    switch (sched_claim_enter(lerror_checkstring(L, 1), lerror_checknumber(L, 2), &it)) {
    case SCHED_CLAIM_TURN: lua_pushliteral(L, "turn"); return 1;
    case SCHED_CLAIM_HANDED:
        lua_pushliteral(L, "handed");
        lsched_push_item(L, &it);
        return 2;
    default: lua_pushliteral(L, "timeout"); return 1;
    }
}

static int l_claim_leave(lua_State *L) {
    (void)L;
    sched_claim_leave();
    return 0;
}

static int l_claim_waiters(lua_State *L) {
    lua_pushinteger(L, sched_claim_waiters(lerror_checkstring(L, 1)));
    return 1;
}

static int l_claim_queued(lua_State *L) {
    lua_pushinteger(L, sched_claim_queued(lerror_checkstring(L, 1)));
    return 1;
}

/* core.claim_give_back(process, on) */
static int l_claim_give_back(lua_State *L) {
    sched_claim_give_back(lerror_checkstring(L, 1), lua_toboolean(L, 2));
    return 0;
}

/* core.claim_hand(item) -> whether it was queued (false: the queue is
 * full, the caller keeps it). The item names its session and when its
 * claim began, as adopting it needs. */
static int l_claim_hand(lua_State *L) {
    sched_item it;
    lsched_check_item(L, 1, &it);
    if (!work_valid_uuid(it.session_id) || !(it.started > 0))
        return lerror_argerror(L, 1, "claim_hand: the item needs its session_id and started");
    lua_pushboolean(L, sched_claim_hand(&it));
    return 1;
}

/* core.claim_take(process) -> item | nil (none queued) */
static int l_claim_take(lua_State *L) {
    sched_item it;
    if (!sched_claim_take(lerror_checkstring(L, 1), &it)) return 0;
    lsched_push_item(L, &it);
    return 1;
}

static int l_finish_enter(lua_State *L) {
    (void)L;
    sched_finish_enter();
    return 0;
}

static int l_finish_leave(lua_State *L) {
    (void)L;
    sched_finish_leave();
    return 0;
}

/* ---- the usual claim's lock ----------------------------------------------- */

/* core.lock_any(tx, {id, ...}, process, opts, count): the usual claim of
 * up to count free ids (all valid UUIDs), sent with COMMIT;
 * core.claimed(tx) tells the outcome once committed. */
static int l_lock_any(lua_State *L) {
    tx *t = lcore_check_tx(L, "lock_any");
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
    lwork_claim_options(L, 4, &c, nb);
    tx_error e;
    int count = (int)luaL_optinteger(L, 5, 1);
    if (work_lock_any(t, lua_tostring(L, -1), count, process, &c, &e) < 0) return lerror_raise(L, &e);
    return 0;
}

/* core.claimed(tx) -> { item, ... }: what the committed core.lock_any
 * locked (empty when nothing), each item's machine, attempt and token;
 * the caller keeps the first. */
static int l_claimed(lua_State *L) {
    tx *t = ltx_at(L, 1);
    sched_item it;
    memset(&it, 0, sizeof it);
    work_locked out;
    lua_newtable(L);
    for (int i = 0; t && work_locked_any(t, i, it.machine, sizeof it.machine, &out); i++) {
        /* The first is the claimer's own; the others' slots note theirs
         * when they are handed them (sched.h). */
        if (i == 0) sched_note_item(it.machine); /* named if its slot will not stop */
        it.attempt = out.attempt;
        copy(it.token, sizeof it.token, out.token);
        lsched_push_item(L, &it);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* ---- a finish in the host's batch ------------------------------------------
 *
 * The batch this slot thread is a member of (one at most), and the handle
 * of the bmdb.tx its commit function was given (ltx_push): it points
 * at the member's own tx, which only queues deferred statements, until
 * the member sends a statement (lsched_use_batch), then at the batch's
 * transaction, and at nothing once the member's part is over. */
typedef struct { sched_member m; tx **tx; } lbatch;
static __thread lbatch in_batch;

void lsched_use_batch(lua_State *L, tx **t) {
    if (t != in_batch.tx || *t != &in_batch.m.own) return;
    tx *bt;
    tx_error e;
    if (sched_batch_use(&in_batch.m, &bt, &e) < 0) lerror_raise(L, &e);
    *t = bt;
}

/* core.batch_join(sess) -> "joined", tx | "alone" (no batch for it) |
 * nil, err (the open batch failed): alone or failed, the finish runs
 * alone. The tx is this member's part of the batch (in_batch) until
 * core.batch_leave. */
static int l_batch_join(lua_State *L) {
    session *s;
    tx **handle = &ltx_push(L, &s)->t;
    tx *t;
    sched_outcome got = sched_batch_join(lcore_pool(), s, &in_batch.m, &t);
    if (got == SCHED_JOINED) {
        *handle = t;
        in_batch.tx = handle;
        lua_pushliteral(L, "joined");
        lua_insert(L, -2);
        return 2;
    }
    if (got == SCHED_ALONE) {
        lua_pushliteral(L, "alone");
        return 1;
    }
    lua_pushnil(L);
    lerror_push(L, &in_batch.m.err);
    return 2;
}

/* core.batch_leave(ok, fatal, item, takes_next, may_claim), item the one
 * finished (read with ok only) -> "committed" (the batch committed this
 * slot's release), with the next item the closer's claim handed it, if
 * any | "undone" (without ok: its own failure, undone) | "claim", peers
 * (sched.h's CLAIMING: the tx becomes the batch's, to claim in; then
 * core.batch_close) | nil, err (the batch failed: finish alone). */
static int l_batch_leave(lua_State *L) {
    int ok = lua_toboolean(L, 1), fatal = lua_toboolean(L, 2);
    sched_item done;
    memset(&done, 0, sizeof done);
    if (ok) lsched_check_item(L, 3, &done);
    if (!in_batch.tx) return lerror_raise_kind(L, BMDB_E_USAGE, "batch_leave: not in a batch");
    sched_leave leave = {
        .how = fatal ? SCHED_LEAVE_FATAL : ok ? SCHED_LEAVE_FINISHED : SCHED_LEAVE_UNDONE,
        .done = &done,
        .takes_next = lua_toboolean(L, 4),
        .may_claim = lua_toboolean(L, 5),
    };
    int peers = 0;
    sched_outcome got = sched_batch_leave(&in_batch.m, &leave, &peers);
    if (got == SCHED_CLAIMING) {
        tx_error e;
        sched_batch_use(&in_batch.m, in_batch.tx, &e); /* the closer holds it: cannot fail */
        lua_pushliteral(L, "claim");
        lua_pushinteger(L, peers);
        return 2;
    }
    *in_batch.tx = NULL;
    in_batch.tx = NULL;
    if (got == SCHED_COMMITTED) {
        lua_pushliteral(L, "committed");
        if (!in_batch.m.has_next) return 1;
        lsched_push_item(L, &in_batch.m.next);
        return 2;
    }
    if (got == SCHED_UNDONE) {
        lua_pushliteral(L, "undone");
        return 1;
    }
    lua_pushnil(L);
    lerror_push(L, &in_batch.m.err);
    return 2;
}

/* core.batch_close(claim_sent, started) -> "committed", { item, ... }
 * (the closer's item first, then what the claim locked and could hand to
 * nobody: the caller lets it go), and how many it handed to other slots |
 * nil, err (the batch failed): the end of a batch whose closer claimed in
 * it (core.batch_leave's "claim"). The claim turn is let go either way. */
static int l_batch_close(lua_State *L) {
    if (!in_batch.tx) return lerror_raise_kind(L, BMDB_E_USAGE, "batch_close: not closing a batch");
    *in_batch.tx = NULL;
    in_batch.tx = NULL;
    sched_claim c; /* (its items are filled as claimed, not cleared first) */
    c.sent = lua_toboolean(L, 1);
    c.started = luaL_optnumber(L, 2, 0);
    if (sched_batch_close(&in_batch.m, &c) != SCHED_COMMITTED) {
        lua_pushnil(L);
        lerror_push(L, &in_batch.m.err);
        return 2;
    }
    lua_pushliteral(L, "committed");
    push_items(L, c.item, c.n);
    lua_pushinteger(L, c.handed);
    return 3;
}

/* core.batch_members() -> members of the open batch, those not yet left */
static int l_batch_members(lua_State *L) {
    int active;
    lua_pushinteger(L, sched_batch_members(&active));
    lua_pushinteger(L, active);
    return 2;
}

static const luaL_Reg funcs[] = {{"claim_enter", l_claim_enter},
                                 {"claim_leave", l_claim_leave},
                                 {"claim_waiters", l_claim_waiters},
                                 {"claim_queued", l_claim_queued},
                                 {"claim_give_back", l_claim_give_back},
                                 {"claim_hand", l_claim_hand},
                                 {"claim_take", l_claim_take},
                                 {"finish_enter", l_finish_enter},
                                 {"finish_leave", l_finish_leave},
                                 {"lock_any", l_lock_any},
                                 {"claimed", l_claimed},
                                 {"batch_join", l_batch_join},
                                 {"batch_leave", l_batch_leave},
                                 {"batch_close", l_batch_close},
                                 {"batch_members", l_batch_members},
                                 {NULL, NULL}};

void lsched_register(lua_State *L) {
    luaL_register(L, NULL, funcs);
    lua_pushinteger(L, SCHED_BATCH_MAX); /* the most items one claim hands out */
    lua_setfield(L, -2, "claim_max");
}

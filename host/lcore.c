/* lcore.c -- the module "bmdb.core": its table, and what its bindings share.
 *
 * luaopen_bmdb_core() builds the table from each area's register function
 * (lcore.h): sessions and transactions (ltx.c), work locks (lwork.c), the
 * host's services (lservices.c), error objects and kinds (lerror.c), the
 * slots' services (lslot.c), the test bootstrap (lboot.c), and the rest.
 * Here too: the pool every binding uses, the userdata class helper and the
 * checks of ids, and the scheduler's bindings (batches of finishes, claims
 * of several items) with what they keep per slot thread: its membership of
 * a batch (in_batch). The bindings translate: values through lvalue.c,
 * failures into error objects through lerror.c; policy (retries, work
 * decisions, backoff) lives in lua/bmdb/internal.lua. The binary and
 * busted load the same luaopen_bmdb_core(): the binary hands over its
 * pool with lcore_set_pool(), specs call core.open{dsn=...} (lboot.c)
 * instead. */
#include "lcore.h"

#include <lauxlib.h>

#include "batch.h"
#include "lerror.h"
#include "ltx.h"
#include "pool.h"
#include "session.h"
#include "slots.h"
#include "tx.h"
#include "work.h"

/* The pool every bmdb call uses. Set before any slot or script thread
 * starts and cleared after they all ended (main.c, core.open/close), so
 * it is read without a lock. */
static pool *the_pool;

void lcore_set_pool(pool *p) { the_pool = p; }
pool *lcore_pool(void) { return the_pool; }

session *lcore_opt_session(lua_State *L, int idx) {
    return lua_isnoneornil(L, idx) ? NULL : ltx_check_session(L, idx);
}

tx *lcore_check_tx(lua_State *L, const char *fname) { return ltx_check_open(L, fname)->t; }

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
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
}

/* The batch this slot thread is a member of (one at most), and the tx
 * its commit function was given. */
typedef struct { batch_member m; ltx *tx; } lbatch;
static __thread lbatch in_batch;

batch_member *lcore_batch_of(const ltx *u) {
    return u == in_batch.tx && u->t == &in_batch.m.own ? &in_batch.m : NULL;
}

/* ---- batches of finishes (batch.h) --------------------------------------
 *
 * core.batch_join(sess) -> tx, or nil (finish alone) and, when the open
 * batch has failed, its error. The tx is this member's part of the batch
 * (in_batch above) until core.batch_leave. */

static int l_batch_join(lua_State *L) {
    session *s;
    ltx *u = ltx_push(L, &s);
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
        lcore_check_ids(L, 3, 4);
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

/* ---- claims of several items ------------------------------------------ */

/* core.lock_any(tx, {id, ...}, process, opts, count): the usual claim of
 * up to count free ids (all valid UUIDs), sent with COMMIT;
 * core.claimed(tx) tells the outcome once committed. */
static int l_lock_any(lua_State *L) {
    ltx *u = ltx_check_open(L, "lock_any");
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
    if (work_lock_any(u->t, lua_tostring(L, -1), count, process, &c, &e) < 0) return lerror_raise(L, &e);
    return 0;
}

/* core.claimed(tx) -> { {machine, attempt, token}, ... }: what the
 * committed core.lock_any locked (empty when nothing); the caller keeps
 * the first. */
static int l_claimed(lua_State *L) {
    ltx *u = lerror_checkudata(L, 1, LTX_MT, "bmdb tx");
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

static const luaL_Reg core_funcs[] = {
    {"lock_any", l_lock_any},     {"claimed", l_claimed},
    {"batch_join", l_batch_join}, {"batch_leave", l_batch_leave}, {"batch_close", l_batch_close},
    {"batch_members", l_batch_members},
    {NULL, NULL}};

int luaopen_bmdb_core(lua_State *L) {
    lerror_open(L);
    lua_newtable(L);
    luaL_register(L, NULL, core_funcs);
    lua_pushinteger(L, BATCH_MAX); /* the most items one claim hands out */
    lua_setfield(L, -2, "claim_max");
    lerror_register(L);
    ltx_register(L);
    lwork_register(L);
    lservices_register(L);
    lslot_register(L);
    lboot_register(L);
    lcontrol_register(L);
    lhttp_register(L);
    ljson_register(L);
    lexec_register(L);
    llimit_register(L);
    return 1;
}

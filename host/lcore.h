/* lcore.h -- the module "bmdb.core": the C core as Lua sees it.
 *
 * One luaopen_bmdb_core() for the binary's states and for busted (build/
 * bmdb/core.so). Its table holds the functions of each area, one file
 * each, added by its register function below: sessions and transactions
 * (ltx.c), work locks (lwork.c), host services (lservices.c), error
 * objects and kinds (lerror.c), what the slots' loop uses beside the
 * scheduler (lslot.c), the scheduler: claim and finish turns, the usual
 * claim's lock, the batch of finishes (lsched.c), open, close, embedded,
 * connect: the bootstrap for specs and bmdb.testing (lboot.c), work
 * control (lcontrol.c), bmdb.http (lhttp.c), JSON (ljson.c), exec: a
 * command as a body's I/O (lexec.c), the waits and releases of
 * bmdb.limit (llimit.c), operators' own metrics (lmetrics.c).
 *
 * What a bmdb.core function returns, in every one of those files: the C
 * side of docs/api.md's "Raise or return".
 *
 *   - An answer comes back as it is: a value, a boolean for a yes or no
 *     (core.claim_hand, core.sleep, core.limit_release), nil for none
 *     (core.claim_take, core.cancel, core.paused, core.backoff_last).
 *   - A call with several outcomes that are not errors answers the
 *     outcome's word first, then that outcome's values: the states of a
 *     claim turn (core.claim_enter: "turn", "handed", "timeout"), of a
 *     lock (core.lock: "locked", "held", "backoff", "paused", "onhold"),
 *     of a finish in the batch (core.batch_join: "joined", "alone";
 *     core.batch_leave: "committed", "undone", "claim"; core.batch_close:
 *     "committed") and of a limit's wait (core.limit_wait).
 *   - A failure the caller must expect as an outcome returns nil and the
 *     error object: a batch that failed (core.batch_join, batch_leave,
 *     batch_close), after which each member finishes alone.
 *   - Every other failure raises an error object (lerror.h): a bad
 *     argument, a lost fence, what SQL or the connection reported.
 *
 * A work item crosses as one table whose fields mirror sched_item
 * (sched.h): machine, process, token, session_id, attempt, started, with
 * only those its source knows (lsched.c says which). */
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

/* A userdata class: metatable name with methods as __index and gc (when
 * not NULL) as __gc. */
void lcore_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc);

/* Add their functions to the core table on top of the stack. */
void ltx_register(lua_State *L);
void lwork_register(lua_State *L);
void lservices_register(lua_State *L);
void lslot_register(lua_State *L);
void lsched_register(lua_State *L); /* also core.claim_max */
void lboot_register(lua_State *L);
void lcontrol_register(lua_State *L);
void lhttp_register(lua_State *L);
/* libcurl's global set-up: main() calls it before any thread starts. */
void lhttp_global_init(void);
/* core.json_encode, core.json_decode, core.json_null, core.json_array (ljson.c) */
void ljson_register(lua_State *L);
void lexec_register(lua_State *L); /* core.exec: lexec.c */
void llimit_register(lua_State *L);
void lmetrics_register(lua_State *L); /* core.metric_counter, _gauge, _histogram, _check, _remove, _rows, _text: lmetrics.c */

/* The open transaction at stack index 1 (raises when it is over, the host
 * canceled or the session expired), for lcontrol.c. */
struct tx;
struct tx *lcore_check_tx(lua_State *L, const char *fname);
/* The session handle at idx, or NULL when it is none or nil: what a
 * host-owned I/O call is fenced by (iofence.h). */
struct session;
struct session *lcore_opt_session(lua_State *L, int idx);
/* Raises a usage error naming the argument unless midx is a machine id
 * (a UUID) and pidx a process name. */
void lcore_check_ids(lua_State *L, int midx, int pidx);
/* Reads the claim options table at idx ({timeout=, initial=, maximum=,
 * exponent=}) into c, with its texts in b (lwork.c). */
struct work_claim;
void lwork_claim_options(lua_State *L, int idx, struct work_claim *c, char b[4][40]);
/* A batch member's tx handle becomes the batch's transaction once the
 * member sends a statement: the tx binding calls it before every
 * statement; any other handle is left as it is (lsched.c). */
void lsched_use_batch(lua_State *L, struct tx **t);
/* A work item as Lua sees it (the rule above): lsched_push_item pushes
 * its table; lsched_check_item reads the table at idx into out, raising
 * usage unless it names a machine, a process and a token (lsched.c). */
struct sched_item;
void lsched_push_item(lua_State *L, const struct sched_item *it);
void lsched_check_item(lua_State *L, int idx, struct sched_item *out);

#endif

/* ltx.h -- the Lua handles of a session and of a transaction (ltx.c), for
 * the bindings that take one: work locks (lwork.c) and the scheduler's
 * batches (lsched.c). */
#ifndef BMDB_LTX_H
#define BMDB_LTX_H

#include <lua.h>

#include "session.h"
#include "tx.h"

#define LSESSION_MT "bmdb.session"
#define LTX_MT "bmdb.tx"

/* t is own, or the batch's transaction during a batch member's turn
 * (borrowed: NULL once the turn is over). */
typedef struct ltx {
    tx own;
    tx *t;
} ltx;

/* The session handle at idx; raises when it is not one. */
session *ltx_check_session(lua_State *L, int idx);
/* A new tx userdata on the stack, not yet begun (so __gc has nothing to
 * roll back), for a transaction of the session at argument 1 (*s). */
ltx *ltx_push(lua_State *L, session **s);
/* The tx at argument 1, open: raises when it is over, doomed, the host
 * canceled or its session expired. A batch member's tx becomes the
 * batch's first (batch_use). */
ltx *ltx_check_open(lua_State *L, const char *fname);
/* The tx of the bmdb.tx at idx, open or not (NULL: over); raises when
 * idx is not one. */
tx *ltx_at(lua_State *L, int idx);

#endif

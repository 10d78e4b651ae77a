/* lerror.h -- bmdb error objects: every failure a bmdb call reports.
 *
 * An error object is a table {kind=, message=, ...} with the metatable
 * "bmdb.error" (tostring gives a readable line). kind says what happened
 * and so what the caller can do: docs/api.md's "Errors" lists the kinds. C code
 * decides by kind (an exit status, a retry), never by searching the text.
 * Objects stay objects through lerror_traceback, which attaches the
 * traceback as the field `traceback` instead of flattening the error to a
 * string, as lua.c's message handler would. */
#ifndef BMDB_LERROR_H
#define BMDB_LERROR_H

#include <stddef.h>
#include <lua.h>

#include "tx.h"

#define LERROR_MT "bmdb.error"

/* Creates the metatable (luaopen_bmdb_core does, once per state). */
void lerror_open(lua_State *L);

/* Raise an error object for e (kind, sqlstate, message, detail, hint,
 * outcome = "unknown" for a COMMIT without answer), or {kind=, message=}. */
int lerror_raise(lua_State *L, const tx_error *e);
/* The same error object, pushed instead of raised. */
void lerror_push(lua_State *L, const tx_error *e);
int lerror_raise_kind(lua_State *L, const char *kind, const char *fmt, ...);
/* Pushes {kind=, message=} with the metatable, for a caller that adds
 * fields of its own (an http error's reason) before lua_error. */
void lerror_push_kind(lua_State *L, const char *kind, const char *msg);
/* A "usage" error worded as luaL_argerror words it, with the caller's
 * position: "x.lua:3: bad argument #2 to 'query' (string expected, got nil)". */
int lerror_argerror(lua_State *L, int narg, const char *fmt, ...);
/* The same for a method (self is argument 1, so narg counts from 0) named
 * fname when Lua cannot name it (a tail call). */
int lerror_argerror_method(lua_State *L, int narg, const char *fname, const char *fmt, ...);
/* luaL_check* that raise error objects: a bmdb call reports every failure
 * as one. */
const char *lerror_checkstring(lua_State *L, int narg);
double lerror_checknumber(lua_State *L, int narg);
void *lerror_checkudata(lua_State *L, int narg, const char *mt, const char *what);

/* The kind of the error object at idx, or NULL for any other value. */
const char *lerror_kind(lua_State *L, int idx);

/* Message handler for lua_pcall: an error object gets the field
 * traceback (if it has none yet) and stays itself; any other value
 * becomes an error object of kind "runtime" (the script's own error)
 * with message and traceback. */
int lerror_traceback(lua_State *L);
/* The error at idx as text: tostring, then the traceback on the next
 * lines when there is one. */
void lerror_text(lua_State *L, int idx, char *buf, size_t len);

/* core.error(kind, message) and core.is_error(v), for bmdb.lua. */
int lerror_l_error(lua_State *L);
int lerror_l_is_error(lua_State *L);

#endif

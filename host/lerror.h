/* lerror.h -- bmdb error objects: every failure a bmdb call reports.
 *
 * An error object is a table {kind=, message=, ...} with the metatable
 * "bmdb.error" (tostring gives a readable line). kind says what happened
 * and so what the caller can do: BMDB_ERROR_KINDS below lists every kind,
 * once, and Lua reads the same list as core.kinds. C code decides by kind
 * (an exit status, a retry), never by searching the text. Objects stay
 * objects through lerror_traceback, which attaches the traceback as the
 * field `traceback` instead of flattening the error to a string, as
 * lua.c's message handler would. */
#ifndef BMDB_LERROR_H
#define BMDB_LERROR_H

#include <stddef.h>
#include <lua.h>

#include "tx.h"

#define LERROR_MT "bmdb.error"

/* Every kind of error, once: its constant (BMDB_E_<ID>, the kind's name as
 * a string), its name and what it means. */
#define BMDB_ERROR_KINDS(X)                                                                         \
    X(SQL, "sql", "the server raised an error: sqlstate, detail and hint say which")                \
    X(CONNECTION, "connection", "no database connection, or it broke (outcome = \"unknown\": "      \
      "a COMMIT got no answer)")                                                                    \
    X(SESSION_EXPIRED, "session_expired", "the session is dead: nothing of it commits")             \
    X(LOST, "lost", "the work lock is no longer this session's (a timeout, a cancel, a takeover)")  \
    X(CANCELED, "canceled", "the host is shutting down")                                            \
    X(DRAINING, "draining", "the host is draining: no new claims")                                  \
    X(CLOSED, "closed", "the transaction or connection is over")                                    \
    X(USAGE, "usage", "the call is wrong: a bad argument, a refused statement, deciding twice")     \
    X(NESTED, "nested", "a transaction is already open in this Lua state")                          \
    X(DEFINITION, "definition", "an invalid bmdb.worker{} definition")                              \
    X(NOT_CONNECTED, "not_connected", "no database to talk to (check, or before core.open)")        \
    X(HELD, "held", "the pair is someone else's, or paused, or its machine on hold (reason)")       \
    X(BACKOFF, "backoff", "the pair failed recently: backoff_until says until when")                \
    X(HTTP, "http", "a bmdb.http request failed outside the database (reason)")                     \
    X(EXEC, "exec", "a bmdb.exec command could not run or finish (reason)")                         \
    X(JSON, "json", "a value JSON cannot encode, or text that is not JSON, naming where")           \
    X(CLAIM, "claim", "a worker's claim gave up: too many of its candidates vanished as it locked") \
    X(LIMIT, "limit", "a limit's take would wait longer than its max_wait (reason)")                \
    X(MEMORY, "memory", "the host could not allocate what the call needed")                         \
    X(RUNTIME, "runtime", "the script's own error, as the host reports it")

#define BMDB_E_DECLARE(id, name, meaning) extern const char BMDB_E_##id[];
BMDB_ERROR_KINDS(BMDB_E_DECLARE)
#undef BMDB_E_DECLARE

/* Adds core.error(kind, message), core.is_error(v) (for bmdb.lua) and
 * core.kinds to the core table on top of the stack: each kind's
 * name as its own key and value (core.kinds.usage == "usage"); reading
 * a name that is not a kind raises, so a misspelt one is caught where it
 * is used (rawget asks without raising). */
void lerror_register(lua_State *L);

/* Creates the metatable (luaopen_bmdb_core does, once per state). */
void lerror_open(lua_State *L);

/* Raise an error object for e (kind, sqlstate, message, detail, hint,
 * outcome = "unknown" for a COMMIT without answer), or {kind=, message=}. */
int lerror_raise(lua_State *L, const tx_error *e);
/* The same error object, pushed instead of raised. */
void lerror_push(lua_State *L, const tx_error *e);
int lerror_raise_kind(lua_State *L, const char *kind, const char *fmt, ...);
/* The same, the message prefixed with the position of the Lua code that
 * called the C function (luaL_where(L, 1)): for the C functions Lua calls
 * directly, whose errors should point at the script's line. */
int lerror_raise_where(lua_State *L, const char *kind, const char *fmt, ...);
/* Pushes {kind=, message=} with the metatable, for a caller that adds
 * fields of its own (an http error's reason) before lua_error. */
void lerror_push_kind(lua_State *L, const char *kind, const char *msg);
/* A usage error worded as luaL_argerror words it, with the caller's
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
 * becomes an error object of kind runtime (the script's own error)
 * with message and traceback. */
int lerror_traceback(lua_State *L);
/* The error at idx as text: tostring, then the traceback on the next
 * lines when there is one. */
void lerror_text(lua_State *L, int idx, char *buf, size_t len);

#endif

/* lvalue.h -- Lua values to statement parameters, results to Lua values.
 *
 * The conversion rules are docs/api.md's "Parameters" and "Results". Errors
 * are bmdb error objects: an argument the statement cannot take is a
 * "usage" error worded as luaL_argerror words it. */
#ifndef BMDB_LVALUE_H
#define BMDB_LVALUE_H

#include <stddef.h>
#include <lua.h>
#include <libpq-fe.h>

/* A statement's parameters as PQexecParams takes them. A string holding a
 * NUL byte goes in binary (format 1) with its length: text format would
 * cut it at the NUL. Binary is exactly what bytea receives; tx_conn_exec
 * refuses it for any other type, naming the parameter. */
typedef struct lvalue_params_t {
    int n;
    const char **values;
    int *lengths;
    int *formats;
} lvalue_params_t;

/* Converts arguments first..top (the $1..$n of sql, for the method fname)
 * into p. The arrays
 * live in a userdata pushed at first (the arguments move up by one), and
 * the texts stay referenced on the stack while the statement runs. */
void lvalue_params(lua_State *L, const char *fname, const char *sql, int first, lvalue_params_t *p);
/* Pushes what query ("q..."), one ("o...") or exec returns for r, and
 * clears r. */
int lvalue_push_result(lua_State *L, const char *fname, PGresult *r);
/* Pushes one cell of r as a row's field would be (the same rules), for a
 * caller that wants the columns in order (a fleet gauge's rows). */
void lvalue_push_value(lua_State *L, const PGresult *r, int row, int col);
/* The statement's name when it would start, end or split the transaction
 * (COMMIT, ROLLBACK, BEGIN, SAVEPOINT, PREPARE TRANSACTION, ...), else
 * NULL. Inside bmdb.transact the transaction is the host's: ending it ends
 * the fence, and what ran after would autocommit outside it. */
/* A number as the text a parameter sends: exact integers as integers,
 * other values as the shortest text that reads back as the same double. */
void lvalue_format_number(double d, char *buf, size_t len);
const char *lvalue_transaction_control(const char *sql, char *name, size_t len);

#endif

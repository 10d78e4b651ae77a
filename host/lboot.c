/* lboot.c -- the test bootstrap: core.open, core.close, core.embedded,
 * core.connect, core.tmpdir.
 *
 * What main.c does for the binary, for busted specs and bmdb.testing: the
 * same start-up sequence (bootstrap.h), so a spec meets the database and
 * the session in the state a script would. Plain connections (core.connect)
 * run statements outside any session, as an operator's psql would. */
#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bootstrap.h"
#include "lcore.h"
#include "lerror.h"
#include "log.h"
#include "lvalue.h"
#include "session.h"
#include "tx.h"

#define CONN_MT "bmdb.conn"
#define EMBEDDED_MT "bmdb.embedded"

/* core.open() made the pool and the session; only Lua's thread reads it. */
static int opened_here;

/* core.open{dsn=, component=, interval=, pool=, migrate=, migrations=,
 * log_level=} */
static int l_open(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    if (lcore_pool()) return lerror_raise_kind(L, BMDB_E_USAGE, "bmdb.core.open: already open");
    lua_getfield(L, 1, "dsn");
    const char *dsn = lerror_checkstring(L, -1);
    lua_getfield(L, 1, "component");
    const char *component = luaL_optstring(L, -1, "spec");
    lua_getfield(L, 1, "interval");
    int interval = (int)luaL_optnumber(L, -1, 5);
    lua_getfield(L, 1, "pool");
    int size = (int)luaL_optnumber(L, -1, 16);
    lua_getfield(L, 1, "migrate");
    int migrate = lua_isnil(L, -1) || lua_toboolean(L, -1);
    lua_getfield(L, 1, "migrations");
    const char *migrations = luaL_optstring(L, -1, NULL);
    lua_getfield(L, 1, "log_level"); /* specs want quiet: warn by default */
    log_level lvl;
    if (log_parse_level(luaL_optstring(L, -1, "warn"), &lvl) < 0)
        return lerror_raise_kind(L, BMDB_E_USAGE, "bmdb.core.open: log_level must be debug, info, warn or error");
    log_configure(lvl, 0);

    char err[1024];
    host_db db;
    if (bootstrap_database(dsn, NULL, size, &db, err, sizeof err) < 0) {
        bootstrap_close(&db);
        return lerror_raise_kind(L, BMDB_E_CONNECTION, "%s", err);
    }
    if ((migrate && bootstrap_schema(db.pool, SCHEMA_MIGRATE, migrations, err, sizeof err) < 0) ||
        bootstrap_session(db.pool, component, interval, err, sizeof err) < 0) {
        bootstrap_close(&db);
        return lerror_raise_kind(L, BMDB_E_RUNTIME, "%s", err);
    }
    free(db.conninfo);
    lcore_set_pool(db.pool);
    opened_here = 1;
    return 0;
}

static int l_close(lua_State *L) {
    (void)L;
    if (!opened_here) return 0;
    sessions_stop();
    pool_destroy(lcore_pool());
    lcore_set_pool(NULL);
    opened_here = 0;
    return 0;
}

/* core.tmpdir(prefix): a fresh directory under $TMPDIR or /tmp that an
 * unprivileged server user can enter (bmdb.testing). */
static int l_tmpdir(lua_State *L) {
    const char *base = getenv("TMPDIR");
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s-XXXXXX", base && *base ? base : "/tmp", luaL_optstring(L, 1, "bmdb"));
    if (!mkdtemp(path)) return lerror_raise_kind(L, BMDB_E_RUNTIME, "tmpdir: %s: %s", path, strerror(errno));
    chmod(path, 0755);
    lua_pushstring(L, path);
    return 1;
}

/* ---- the embedded database ------------------------------------------------ */

typedef struct { embedded *e; } lembedded;

/* core.embedded(data_dir) -> handle, conninfo: the embedded database, as
 * the binary runs it without --dsn. */
static int l_embedded(lua_State *L) {
    const char *dir = lerror_checkstring(L, 1);
    char err[1024], *conninfo = NULL;
    lembedded *u = lua_newuserdata(L, sizeof *u);
    u->e = NULL;
    luaL_getmetatable(L, EMBEDDED_MT);
    lua_setmetatable(L, -2);
    u->e = embedded_open(dir, &conninfo, err, sizeof err);
    if (!u->e) return lerror_raise_kind(L, BMDB_E_RUNTIME, "%s", err);
    lua_pushstring(L, conninfo);
    free(conninfo);
    return 2;
}

static int embedded_close_l(lua_State *L) {
    lembedded *u = lerror_checkudata(L, 1, EMBEDDED_MT, "bmdb embedded database");
    if (u->e) embedded_close(u->e);
    u->e = NULL;
    return 0;
}

/* ---- plain connections ------------------------------------------------------ */

typedef struct { PGconn *c; } lconn;

static int l_connect(lua_State *L) {
    const char *dsn = lerror_checkstring(L, 1);
    char err[512];
    PGconn *c = pool_connect(dsn, err, sizeof err);
    if (!c) return lerror_raise_kind(L, BMDB_E_CONNECTION, "%s", err);
    lconn *u = lua_newuserdata(L, sizeof *u);
    u->c = c;
    luaL_getmetatable(L, CONN_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static int conn_statement(lua_State *L, const char *fname) {
    lconn *u = lerror_checkudata(L, 1, CONN_MT, "bmdb connection");
    if (!u->c) return lerror_raise_kind(L, BMDB_E_CLOSED, "%s: the connection is closed", fname);
    const char *sql = lerror_checkstring(L, 2);
    lvalue_params_t p;
    lvalue_params(L, fname, sql, 3, &p);
    tx_error e;
    PGresult *r = tx_conn_exec(u->c, sql, p.n, p.values, p.lengths, p.formats, &e);
    if (!r) return lerror_raise(L, &e);
    return lvalue_push_result(L, fname, r);
}

static int conn_query(lua_State *L) { return conn_statement(L, "query"); }
static int conn_one(lua_State *L) { return conn_statement(L, "one"); }
static int conn_exec(lua_State *L) { return conn_statement(L, "exec"); }

static int conn_close(lua_State *L) {
    lconn *u = lerror_checkudata(L, 1, CONN_MT, "bmdb connection");
    if (u->c) PQfinish(u->c);
    u->c = NULL;
    return 0;
}

static const luaL_Reg funcs[] = {{"open", l_open},         {"close", l_close},     {"tmpdir", l_tmpdir},
                                 {"embedded", l_embedded}, {"connect", l_connect}, {NULL, NULL}};

static const luaL_Reg embedded_methods[] = {{"close", embedded_close_l}, {NULL, NULL}};

static const luaL_Reg conn_methods[] = {
    {"query", conn_query}, {"one", conn_one}, {"exec", conn_exec}, {"close", conn_close}, {NULL, NULL}};

void lboot_register(lua_State *L) {
    lcore_class(L, CONN_MT, conn_methods, conn_close);
    lcore_class(L, EMBEDDED_MT, embedded_methods, embedded_close_l);
    luaL_register(L, NULL, funcs);
}

/* lmetrics.c -- bmdb.metrics: operators' own counters, gauges and
 * histograms (core.metric_counter, core.metric_gauge, core.metric_histogram);
 * what a fleet gauge (bmdb.gauge, lua/bmdb/gauge.lua) needs besides: its
 * name checked before its family exists, its query's rows in column
 * order, its series removed.
 *
 * The registry is metrics.c's (metrics_own_*): one family per name for
 * the whole process, so every slot's state, the script's and a reloaded
 * one's share the series. A metric object is a userdata holding the
 * family, which is never freed. Errors are usage errors at the caller's
 * position: the definitions and the methods are called straight from Lua
 * (lua/bmdb/metrics.lua hands out these functions), so level 1 is the
 * caller. */
#include "lcore.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lerror.h"
#include "lvalue.h"
#include "metrics.h"
#include "tx.h"

#define COUNTER_MT "bmdb.metrics.counter"
#define GAUGE_MT "bmdb.metrics.gauge"
#define HISTOGRAM_MT "bmdb.metrics.histogram"
/* A label value longer than this is refused: the cap bounds the series,
 * this the bytes of each. */
#define VALUE_MAX 1024

/* Default buckets, for latencies in seconds as the host's own. */
static const double default_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};

#define usage(L, ...) lerror_raise_where(L, BMDB_E_USAGE, __VA_ARGS__)

static int define(lua_State *L, const char *kind, const char *mt) {
    if (lua_type(L, 1) != LUA_TSTRING)
        return usage(L, "bmdb.metrics.%s: the name must be a string, got %s", kind, luaL_typename(L, 1));
    const char *name = lua_tostring(L, 1);
    if (!lua_isnoneornil(L, 2) && lua_type(L, 2) != LUA_TSTRING)
        return usage(L, "metric '%s': the help must be a string, got %s", name, luaL_typename(L, 2));
    const char *help = lua_isnoneornil(L, 2) ? "" : lua_tostring(L, 2);
    if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3))
        return usage(L, "metric '%s': labels must be a list of names, got %s", name, luaL_typename(L, 3));
    const char *labels[METRICS_OWN_LABELS_MAX];
    int nlabels = lua_istable(L, 3) ? (int)lua_objlen(L, 3) : 0;
    if (nlabels > METRICS_OWN_LABELS_MAX)
        return usage(L, "metric '%s': %d labels, at most %d", name, nlabels, METRICS_OWN_LABELS_MAX);
    for (int i = 0; i < nlabels; i++) {
        lua_rawgeti(L, 3, i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            return usage(L, "metric '%s': label %d must be a string, got %s", name, i + 1, luaL_typename(L, -1));
        labels[i] = lua_tostring(L, -1); /* kept alive by the table */
        lua_pop(L, 1);
    }
    double bounds[METRICS_OWN_BUCKETS_MAX];
    int nbounds = 0;
    if (!strcmp(kind, "histogram")) {
        if (lua_isnoneornil(L, 4)) {
            nbounds = (int)(sizeof default_bounds / sizeof *default_bounds);
            memcpy(bounds, default_bounds, sizeof default_bounds);
        } else if (!lua_istable(L, 4)) {
            return usage(L, "metric '%s': buckets must be a list of numbers, got %s", name, luaL_typename(L, 4));
        } else {
            nbounds = (int)lua_objlen(L, 4);
            if (nbounds < 1 || nbounds > METRICS_OWN_BUCKETS_MAX)
                return usage(L, "metric '%s': %d buckets, want 1 to %d", name, nbounds, METRICS_OWN_BUCKETS_MAX);
            for (int i = 0; i < nbounds; i++) {
                lua_rawgeti(L, 4, i + 1);
                if (lua_type(L, -1) != LUA_TNUMBER)
                    return usage(L, "metric '%s': bucket %d must be a number, got %s", name, i + 1,
                                 luaL_typename(L, -1));
                bounds[i] = lua_tonumber(L, -1);
                lua_pop(L, 1);
            }
        }
    }
    char err[768];
    metrics_own *f = metrics_own_define(kind, name, help, labels, nlabels, bounds, nbounds, err, sizeof err);
    if (!f) return usage(L, "%s", err);
    metrics_own **u = lua_newuserdata(L, sizeof *u);
    *u = f;
    luaL_getmetatable(L, mt);
    lua_setmetatable(L, -2);
    return 1;
}

static int l_counter(lua_State *L) { return define(L, "counter", COUNTER_MT); }
static int l_gauge(lua_State *L) { return define(L, "gauge", GAUGE_MT); }
static int l_histogram(lua_State *L) { return define(L, "histogram", HISTOGRAM_MT); }

/* One sample. value: the argument after self is the number (n or v);
 * with optional, it may be left out (then 1) when the arguments are just
 * the label values. sign: -1 for dec. */
static int sample(lua_State *L, const char *mt, const char *method, metrics_own_op op, int optional, double sign) {
    metrics_own *f = *(metrics_own **)lerror_checkudata(L, 1, mt, "a metric");
    const char *name = metrics_own_name(f);
    int nl = metrics_own_nlabels(f), nargs = lua_gettop(L) - 1, first = 3;
    double v = 1;
    if (optional && nargs == nl) first = 2;
    else if (nargs != nl + 1) {
        return usage(L, "metric '%s': %s wants %s%d label value%s, got %d argument%s", name, method,
                     optional ? "[n,] " : "a number and ", nl, nl == 1 ? "" : "s", nargs, nargs == 1 ? "" : "s");
    } else if (lua_type(L, 2) != LUA_TNUMBER) {
        return usage(L, "metric '%s': %s wants a number first, got %s", name, method, luaL_typename(L, 2));
    } else {
        v = lua_tonumber(L, 2);
    }
    if (isnan(v)) return usage(L, "metric '%s': %s got NaN", name, method);
    if (!strcmp(mt, COUNTER_MT) && !(v >= 0 && isfinite(v)))
        return usage(L, "metric '%s': a counter goes up only, by a finite n >= 0 (got %g)", name, v);
    const char *values[METRICS_OWN_LABELS_MAX];
    for (int i = 0; i < nl; i++) {
        int t = lua_type(L, first + i);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            return usage(L, "metric '%s': the value of label '%s' must be a string or a number, got %s", name,
                         metrics_own_label(f, i), luaL_typename(L, first + i));
        size_t len;
        values[i] = lua_tolstring(L, first + i, &len);
        if (len > VALUE_MAX)
            return usage(L, "metric '%s': the value of label '%s' is %zu bytes, at most %d", name,
                         metrics_own_label(f, i), len, VALUE_MAX);
        if (strlen(values[i]) != len)
            return usage(L, "metric '%s': the value of label '%s' holds a NUL byte", name, metrics_own_label(f, i));
    }
    metrics_own_sample(f, op, sign * v, values);
    return 0;
}

static int c_inc(lua_State *L) { return sample(L, COUNTER_MT, "inc", METRICS_OWN_ADD, 1, 1); }
static int g_set(lua_State *L) { return sample(L, GAUGE_MT, "set", METRICS_OWN_SET, 0, 1); }
static int g_inc(lua_State *L) { return sample(L, GAUGE_MT, "inc", METRICS_OWN_ADD, 1, 1); }
static int g_dec(lua_State *L) { return sample(L, GAUGE_MT, "dec", METRICS_OWN_ADD, 1, -1); }
static int h_observe(lua_State *L) { return sample(L, HISTOGRAM_MT, "observe", METRICS_OWN_OBSERVE, 0, 1); }

/* core.metric_check(kind, name) -> why name is refused, or nil: the rules
 * of a definition, for a definition that defines its family later (a
 * fleet gauge: its labels are its query's columns). */
static int l_check(lua_State *L) {
    const char *kind = lerror_checkstring(L, 1);
    if (lua_type(L, 2) != LUA_TSTRING) {
        lua_pushfstring(L, "the name must be a string, got %s", luaL_typename(L, 2));
        return 1;
    }
    char err[512];
    if (metrics_own_check(kind, lua_tostring(L, 2), err, sizeof err)) lua_pushstring(L, err);
    else lua_pushnil(L);
    return 1;
}

/* core.metric_remove(gauge[, values]) -> how many series went: the one
 * with these label values (a list, in the family's order), or all of
 * them without values. gauge: a gauge, or the name of one (none of that
 * name: 0), for a state that never defined it (a reload that removed a
 * fleet gauge). */
static int l_remove(lua_State *L) {
    if (lua_type(L, 1) == LUA_TSTRING) {
        metrics_own *f = metrics_own_find(lua_tostring(L, 1), "gauge");
        lua_pushnumber(L, f && lua_isnoneornil(L, 2) ? metrics_own_remove(f, NULL) : 0);
        return 1;
    }
    metrics_own *f = *(metrics_own **)lerror_checkudata(L, 1, GAUGE_MT, "a gauge");
    if (lua_isnoneornil(L, 2)) {
        lua_pushnumber(L, metrics_own_remove(f, NULL));
        return 1;
    }
    luaL_checktype(L, 2, LUA_TTABLE);
    int nl = metrics_own_nlabels(f);
    if ((int)lua_objlen(L, 2) != nl)
        return usage(L, "metric '%s': remove wants %d label value%s, got %d", metrics_own_name(f), nl,
                     nl == 1 ? "" : "s", (int)lua_objlen(L, 2));
    const char *values[METRICS_OWN_LABELS_MAX];
    luaL_checkstack(L, nl + 1, "metric_remove");
    for (int i = 0; i < nl; i++) {
        lua_rawgeti(L, 2, i + 1);
        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
            return usage(L, "metric '%s': label value %d must be a string or a number, got %s",
                         metrics_own_name(f), i + 1, luaL_typename(L, -1));
        values[i] = lua_tostring(L, -1); /* kept on the stack: a number's text is only there */
    }
    lua_pushnumber(L, metrics_own_remove(f, values));
    return 1;
}

/* core.metric_rows(tx, sql) -> names, rows: a fleet gauge's query, its
 * column names in order and each row as a list in that order (a row
 * keyed by name, as tx:query gives it, loses the order that says which
 * column is the value; NULL is nil, a hole). */
static int l_rows(lua_State *L) {
    tx *t = lcore_check_tx(L, "metric_rows");
    const char *sql = lerror_checkstring(L, 2);
    char name[64];
    if (lvalue_transaction_control(sql, name, sizeof name))
        return lerror_raise_kind(L, BMDB_E_USAGE, "metric_rows: %s is refused inside bmdb.transact", name);
    tx_error e;
    PGresult *r = tx_exec_params(t, sql, 0, NULL, NULL, NULL, &e);
    if (!r) return lerror_raise(L, &e);
    int rows = PQntuples(r), cols = PQnfields(r);
    lua_createtable(L, cols, 0);
    for (int c = 0; c < cols; c++) {
        lua_pushstring(L, PQfname(r, c));
        lua_rawseti(L, -2, c + 1);
    }
    lua_createtable(L, rows, 0);
    for (int i = 0; i < rows; i++) {
        lua_createtable(L, cols, 0);
        for (int c = 0; c < cols; c++) {
            lvalue_push_value(L, r, i, c);
            lua_rawseti(L, -2, c + 1);
        }
        lua_rawseti(L, -2, i + 1);
    }
    PQclear(r);
    return 2;
}

/* core.metric_text() -> the operators' families as /metrics writes them
 * (bmdb.testing and the specs read a host's registry in-process). */
static int l_text(lua_State *L) {
    char *text = NULL;
    size_t n = 0;
    FILE *m = open_memstream(&text, &n);
    if (!m) return lerror_raise_kind(L, BMDB_E_MEMORY, "metric_text: out of memory");
    metrics_render_own(m);
    if (fclose(m) || !text) {
        free(text);
        return lerror_raise_kind(L, BMDB_E_MEMORY, "metric_text: out of memory");
    }
    lua_pushlstring(L, text, n);
    free(text);
    return 1;
}

static int m_tostring(lua_State *L) {
    lua_pushfstring(L, "metric %s", metrics_own_name(*(metrics_own **)lua_touserdata(L, 1)));
    return 1;
}

/* A metric's class: lcore_class's, with a __tostring naming the metric. */
static void class(lua_State *L, const char *mt, const luaL_Reg *methods) {
    lcore_class(L, mt, methods, NULL);
    luaL_getmetatable(L, mt);
    lua_pushcfunction(L, m_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
}

void lmetrics_register(lua_State *L) {
    static const luaL_Reg counter[] = {{"inc", c_inc}, {NULL, NULL}};
    static const luaL_Reg gauge[] = {{"set", g_set}, {"inc", g_inc}, {"dec", g_dec}, {NULL, NULL}};
    static const luaL_Reg histogram[] = {{"observe", h_observe}, {NULL, NULL}};
    class(L, COUNTER_MT, counter);
    class(L, GAUGE_MT, gauge);
    class(L, HISTOGRAM_MT, histogram);
    static const luaL_Reg fns[] = {
        {"metric_counter", l_counter}, {"metric_gauge", l_gauge},   {"metric_histogram", l_histogram},
        {"metric_check", l_check},     {"metric_remove", l_remove}, {"metric_rows", l_rows},
        {"metric_text", l_text},       {NULL, NULL}};
    luaL_register(L, NULL, fns);
}

/* snapshot.c -- the bytes of a script and its modules, read once.
 *
 * A snapshot is filled by exactly one state (the one that validates the
 * code) on one thread, then sealed; after that nothing in it changes, so
 * slot threads read it without a lock. Only modules of the script's own
 * directory are held, as --watch follows only those: the package.loaders
 * entry sits before Lua's file searcher, serves what the snapshot holds,
 * and lets a module it does not hold (one first required inside a body,
 * after validation) go on to the ordinary searchers. */
#include "snapshot.h"

#include <errno.h>
#include <lauxlib.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SNAPSHOT_MT "bmdb.snapshot"

typedef struct snapfile {
    char *module; /* NULL for the script */
    char *path;   /* as the chunkname shows it: "dir/mod.lua" */
    char *bytes;
    size_t len;
} snapfile;

struct snapshot {
    int refs;       /* atomic */
    int sealed;
    char *dir;      /* the script's directory, as package.path spells it */
    snapfile *files;
    int nfiles, cap;
};

/* The whole file, or NULL with errno set. */
static char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 8192, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n == cap) buf = realloc(buf, cap *= 2);
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        free(buf);
        errno = EIO;
        return NULL;
    }
    *len = n;
    return buf;
}

static snapfile *add(snapshot *s, const char *module, const char *path, char *bytes, size_t len) {
    if (s->nfiles == s->cap) s->files = realloc(s->files, sizeof *s->files * (size_t)(s->cap = s->cap ? 2 * s->cap : 8));
    snapfile *f = &s->files[s->nfiles++];
    f->module = module ? strdup(module) : NULL;
    f->path = strdup(path);
    f->bytes = bytes;
    f->len = len;
    return f;
}

snapshot *snapshot_open(const char *script, char *err, size_t errlen) {
    size_t len;
    char *bytes = read_all(script, &len);
    if (!bytes) {
        snprintf(err, errlen, "cannot read script %s: %s", script, strerror(errno));
        return NULL;
    }
    snapshot *s = calloc(1, sizeof *s);
    s->refs = 1;
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", script);
    s->dir = strdup(dirname(buf));
    add(s, NULL, script, bytes, len);
    return s;
}

void snapshot_seal(snapshot *s) { __atomic_store_n(&s->sealed, 1, __ATOMIC_RELEASE); }

snapshot *snapshot_ref(snapshot *s) {
    if (s) __atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED);
    return s;
}

void snapshot_unref(snapshot *s) {
    if (!s || __atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) > 0) return;
    for (int i = 0; i < s->nfiles; i++) {
        free(s->files[i].module);
        free(s->files[i].path);
        free(s->files[i].bytes);
    }
    free(s->files);
    free(s->dir);
    free(s);
}

const char *snapshot_script(const snapshot *s) { return s->files[0].path; }
int snapshot_nfiles(const snapshot *s) { return s->nfiles; }
const char *snapshot_file(const snapshot *s, int i) { return s->files[i].path; }

int snapshot_matches_disk(const snapshot *s) {
    for (int i = 0; i < s->nfiles; i++) {
        size_t len;
        char *now = read_all(s->files[i].path, &len);
        int same = now && len == s->files[i].len && memcmp(now, s->files[i].bytes, len) == 0;
        free(now);
        if (!same) return 0;
    }
    return 1;
}

/* ---- in a Lua state ------------------------------------------------------ */

static snapshot *check_box(lua_State *L, int idx) { return *(snapshot **)luaL_checkudata(L, idx, SNAPSHOT_MT); }

static int box_gc(lua_State *L) {
    snapshot **box = luaL_checkudata(L, 1, SNAPSHOT_MT);
    snapshot_unref(*box);
    *box = NULL;
    return 0;
}

static const snapfile *find_module(const snapshot *s, const char *module) {
    for (int i = 1; i < s->nfiles; i++)
        if (!strcmp(s->files[i].module, module)) return &s->files[i];
    return NULL;
}

/* The module as the script directory's package.path entries would find
 * it ("dir/a/b.lua", then "dir/a/b/init.lua"), read into the snapshot. */
static const snapfile *record_module(snapshot *s, const char *module) {
    char rel[PATH_MAX];
    snprintf(rel, sizeof rel, "%s", module);
    for (char *p = rel; *p; p++)
        if (*p == '.') *p = '/';
    static const char *const templates[] = {"%s/%s.lua", "%s/%s/init.lua"};
    for (int t = 0; t < 2; t++) {
        char path[PATH_MAX + 16];
        int n = snprintf(path, sizeof path, templates[t], s->dir, rel);
        if (n < 0 || (size_t)n >= sizeof path) continue;
        size_t len;
        char *bytes = read_all(path, &len);
        if (bytes) return add(s, module, path, bytes, len);
    }
    return NULL;
}

/* package.loaders entry: the module's bytes from the snapshot. */
static int searcher(lua_State *L) {
    const char *module = luaL_checkstring(L, 1);
    snapshot *s = check_box(L, lua_upvalueindex(1));
    const snapfile *f = find_module(s, module);
    if (!f && !__atomic_load_n(&s->sealed, __ATOMIC_ACQUIRE)) f = record_module(s, module);
    if (!f) return 0; /* not ours: the next searcher tries */
    lua_pushfstring(L, "@%s", f->path);
    if (luaL_loadbuffer(L, f->bytes, f->len, lua_tostring(L, -1)) != 0)
        return luaL_error(L, "error loading module '%s' from file '%s':\n\t%s", module, f->path,
                          lua_tostring(L, -1));
    return 1;
}

void snapshot_install(lua_State *L, snapshot *s) {
    snapshot **box = lua_newuserdata(L, sizeof *box);
    *box = snapshot_ref(s);
    if (luaL_newmetatable(L, SNAPSHOT_MT)) {
        lua_pushcfunction(L, box_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    /* The box lives as long as the state: in the registry, and as the
     * searcher's upvalue. */
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, "bmdb.snapshot.box");
    lua_pushcclosure(L, searcher, 1);
    /* table.insert(package.loaders, 2, searcher): after preload, before
     * the file searchers */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaders");
    int n = (int)lua_objlen(L, -1);
    for (int i = n; i >= 2; i--) {
        lua_rawgeti(L, -1, i);
        lua_rawseti(L, -2, i + 1);
    }
    lua_pushvalue(L, -3);
    lua_rawseti(L, -2, 2);
    lua_pop(L, 3);
}

int snapshot_load_script(lua_State *L, snapshot *s) {
    const snapfile *f = &s->files[0];
    lua_pushfstring(L, "@%s", f->path);
    int rc = luaL_loadbuffer(L, f->bytes, f->len, lua_tostring(L, -1));
    lua_remove(L, -2);
    return rc;
}

static unsigned generation = 1;

unsigned snapshot_generation(void) { return __atomic_load_n(&generation, __ATOMIC_ACQUIRE); }
void snapshot_generation_advance(void) { __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE); }

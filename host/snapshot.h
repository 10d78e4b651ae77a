/* snapshot.h -- the bytes of a script and its modules, read once.
 *
 * Validating code and running it must not read the files twice: a save in
 * between would have slots run code nobody validated, or different code in
 * different slots. So the code is read once into a snapshot. The state that
 * validates it records every module it requires from the script's
 * directory; the snapshot is then sealed (immutable) and every slot state
 * loads exactly those bytes, through a package.loaders entry. Snapshots are
 * reference counted: slots still on an older generation keep theirs until
 * they switch, and every state holds a reference while it lives. */
#ifndef BMDB_SNAPSHOT_H
#define BMDB_SNAPSHOT_H

#include <stddef.h>
#include <lua.h>

typedef struct snapshot snapshot;

/* Reads the script's bytes: a snapshot that still records modules (one
 * reference). NULL with err when the script cannot be read. */
snapshot *snapshot_open(const char *script, char *err, size_t errlen);
/* Stops recording: from now on the snapshot is only read, by any thread. */
void snapshot_seal(snapshot *s);
snapshot *snapshot_ref(snapshot *s);
void snapshot_unref(snapshot *s);

const char *snapshot_script(const snapshot *s);
/* The files it holds: 0 is the script, then the modules, in load order. */
int snapshot_nfiles(const snapshot *s);
const char *snapshot_file(const snapshot *s, int i);
/* 1 when every file it holds still has the same bytes on disk. */
int snapshot_matches_disk(const snapshot *s);

/* Makes L load the snapshot's modules from it (recording new ones from
 * the script's directory while not sealed); L keeps a reference. */
void snapshot_install(lua_State *L, snapshot *s);
/* Compiles the script's bytes (chunkname "@path", as luaL_loadfile) and
 * pushes the chunk; a non-zero lua_load status with the message pushed. */
int snapshot_load_script(lua_State *L, snapshot *s);

/* The code generation: 1 until the first reload; slots compare it at every
 * item boundary. Only worker.c moves it on, when it swaps the code. */
unsigned snapshot_generation(void);
void snapshot_generation_advance(void);

#endif

/* prepared.c -- statements prepared once per connection (prepared.h).
 *
 * The cache is a small array searched by a hash of the text: a host sends
 * a few dozen distinct statements, so a linear probe over hashes is as
 * fast as anything and keeps no pointers into Lua strings (texts are
 * copied). Past PREPARED_MAX statements, the rest run unnamed: a script
 * that builds SQL text from values (which it should not) cannot grow the
 * server's memory without bound. */
#include "prepared.h"
#include "hash.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PREPARED_MAX 128

struct prepared {
    int n;
    unsigned seq; /* names are never reused: a forgotten one may live on in the server */
    struct entry {
        uint64_t hash;
        char *sql;
        char name[16];
    } e[PREPARED_MAX];
};

prepared *prepared_new(void) { return calloc(1, sizeof(prepared)); }

void prepared_free(prepared *pc) {
    if (!pc) return;
    for (int i = 0; i < pc->n; i++) free(pc->e[i].sql);
    free(pc);
}

static struct entry *lookup(prepared *pc, const char *sql, uint64_t h) {
    for (int i = 0; i < pc->n; i++)
        if (pc->e[i].hash == h && !strcmp(pc->e[i].sql, sql)) return &pc->e[i];
    return NULL;
}

/* Prepares sql as the next entry. The entry, or NULL with *failed set to
 * the PREPARE's error result when the server refused it. */
static struct entry *add(prepared *pc, PGconn *c, const char *sql, uint64_t h, int nparams,
                         PGresult **failed) {
    *failed = NULL;
    if (pc->n == PREPARED_MAX) return NULL;
    struct entry *e = &pc->e[pc->n];
    snprintf(e->name, sizeof e->name, "bmdb_%u", pc->seq++);
    PGresult *r = PQprepare(c, e->name, sql, nparams, NULL);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        *failed = r;
        return NULL;
    }
    PQclear(r);
    if (!(e->sql = strdup(sql))) return NULL; /* out of memory: run it unnamed */
    e->hash = h;
    pc->n++;
    return e;
}

const char *prepared_lookup(prepared *pc, PGconn *c, const char *sql, int nparams, int *cached,
                            PGresult **failed) {
    *cached = 0;
    *failed = NULL;
    if (!pc) return NULL;
    uint64_t h = fnv1a64(sql);
    struct entry *e = lookup(pc, sql, h);
    if (e) *cached = 1;
    else e = add(pc, c, sql, h, nparams, failed);
    return e ? e->name : NULL;
}

const char *prepared_name(prepared *pc, PGconn *c, const char *sql, int nparams) {
    int cached;
    PGresult *failed;
    const char *name = prepared_lookup(pc, c, sql, nparams, &cached, &failed);
    PQclear(failed);
    return name;
}

void prepared_forget(prepared *pc) {
    if (!pc) return;
    for (int i = 0; i < pc->n; i++) free(pc->e[i].sql);
    pc->n = 0;
}

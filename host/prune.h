/* prune.h -- history retention: deleting old work_history rows in short
 * batches, and the command line that does it (bmdb-host prune).
 *
 * What is never deleted, whatever its age: the latest event of each
 * (machine, process) that has a work row (in flight) or a work_backoff row
 * (in backoff). A batch is one short READ COMMITTED statement over one
 * range of the history's age index: it holds no lock once it returns and
 * reads nothing that makes a SERIALIZABLE claim or finish fail (prune.c
 * says why). */
#ifndef BMDB_PRUNE_H
#define BMDB_PRUNE_H

#include <stdio.h>
#include "pool.h"

/* Where the next batch starts: after the last row the previous one looked
 * at. Zeroed: from the oldest row. Keeping it across batches spares each
 * batch rereading the protected rows at the head of the range. */
typedef struct prune_cursor {
    char at[64];  /* occurred_at of the last row looked at, as the server wrote it; "" at the start */
    char id[40];  /* its history_id */
} prune_cursor;

/* The cutoff as the server writes a TIMESTAMPTZ: before (ISO 8601, read by
 * the server) if given, else now() - keep_days days. 0; -2 when before is
 * not a timestamp or lies in the future (err names it); -1 otherwise. */
int prune_cutoff(pool *p, const char *before, int keep_days, char *cutoff, size_t len, char *err, size_t errlen);

/* One batch: looks at up to limit rows older than cutoff after *cur,
 * deletes those not protected (with dry_run, only counts them), and moves
 * *cur past them. *removed gets the rows deleted (or that would be), *more
 * 1 when rows older than cutoff may remain after *cur. Retries a
 * serialization failure itself. 0, or -1 with err. A caller that loops
 * (the command line, a retention loop) pauses between calls. */
int prune_batch(pool *p, const char *cutoff, int limit, int dry_run, prune_cursor *cur, long *removed, int *more,
                char *err, size_t errlen);

/* bmdb-host prune [--before TIME] [--keep-days DAYS] [--dry-run] [--batch N] */
#define PRUNE_KEEP_DAYS 30
#define PRUNE_BATCH 1000
typedef struct prune_args {
    const char *before;  /* NULL: keep_days */
    int keep_days, batch, dry_run;
} prune_args;
/* Checks the arguments before any database work. 0, or -1 with err. */
int prune_parse(int argc, char **argv, prune_args *a, char *err, size_t errlen);
/* Prunes in batches and prints how many rows went (or would) on out. 0;
 * -2 for a --before the server refuses; -1 with err. */
int prune_run(pool *p, const prune_args *a, FILE *out, char *err, size_t errlen);

#endif

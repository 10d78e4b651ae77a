/* prune.h -- history retention: deleting old work_history and
 * loop_history rows in short batches, the command line that does it
 * (bmdb-host prune), and the host's --keep-history for the retention loop.
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

/* The tables pruned, in the order the batches walk them. */
enum { PRUNE_WORK_HISTORY, PRUNE_LOOP_HISTORY, PRUNE_TABLES };
extern const char *const prune_table_names[PRUNE_TABLES];

/* Where the next batch starts: in which table, after the last row the
 * previous one looked at. Zeroed: from the oldest row of work_history.
 * Keeping it across batches spares each batch rereading the protected
 * rows at the head of the range. */
typedef struct prune_cursor {
    int table;    /* PRUNE_WORK_HISTORY, ...; PRUNE_TABLES once all are done */
    char at[64];  /* occurred_at of the last row looked at, as the server wrote it; "" at the start */
    char id[40];  /* its history_id */
} prune_cursor;

/* The cutoff as the server writes a TIMESTAMPTZ: before (ISO 8601, read by
 * the server) if given, else now() - keep_days days. 0; -2 when before is
 * not a timestamp or lies in the future (err names it); -1 otherwise. */
int prune_cutoff(pool *p, const char *before, int keep_days, char *cutoff, size_t len, char *err, size_t errlen);

/* One batch: looks at up to limit rows of cur->table older than cutoff
 * after *cur, deletes those not protected (with dry_run, only counts
 * them), and moves *cur past them, to the next table when this one has
 * none left. *removed gets the rows deleted (or that would be), *more 1
 * when rows older than cutoff may remain after *cur (in any table). Retries a
 * serialization failure itself. 0, or -1 with err. A caller that loops
 * (the command line, a retention loop) pauses between calls. */
int prune_batch(pool *p, const char *cutoff, int limit, int dry_run, prune_cursor *cur, long *removed, int *more,
                char *err, size_t errlen);

/* bmdb-host prune [--before TIME] [--keep-days DAYS] [--dry-run] [--batch N] */
#define PRUNE_KEEP_DAYS 30
#define PRUNE_BATCH 1000
#define PRUNE_KEEP_MAX 36500  /* days: --keep-days and --keep-history at most */

/* The host's --keep-history DAYS (0: keep everything), what the retention
 * loop prunes to; PRUNE_KEEP_DAYS until main() sets it, before any thread
 * starts. */
void prune_set_keep_history(int days);
int prune_keep_history(void);
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

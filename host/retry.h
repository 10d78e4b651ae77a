/* retry.h -- an operator's "try now": ends the backoff of one (machine,
 * process) pair, or of every pair of a process that a filter selects,
 * from a script or the command line (bmdb-host retry).
 *
 * A retried pair keeps its work_backoff row, attempts and last_seconds:
 * only backoff_until moves to now, so it is claimable at once and a pair
 * that fails again backs off from the period it had reached. Each pair
 * cleared is recorded Retried in its history. */
#ifndef BMDB_RETRY_H
#define BMDB_RETRY_H

#include <stdio.h>
#include "pool.h"
#include "tx.h"

/* Pairs cleared per transaction in bulk: claims of those rows wait for
 * one batch at most, not for the whole selection. */
#define RETRY_BATCH 1000

/* Which pairs a bulk retry clears: process's pairs in backoff, and when
 * set, whose cause contains cause and whose last failure was at or after
 * since (a timestamp the server parses). */
typedef struct retry_filter {
    const char *process, *cause, *since;
} retry_filter;

/* Inside a caller's transaction (its session, if any, is recorded on the
 * events). 1 cleared, 0 the pair was not in backoff, -1 with e set. */
int retry_one(tx *t, const char *machine, const char *process, const char *reason, tx_error *e);
/* Clears up to limit pairs of f; how many, or -1 with e set. */
long retry_batch(tx *t, const retry_filter *f, long limit, const char *reason, tx_error *e);
/* How many pairs f selects now, changing nothing; -1 with e set. */
long retry_count(tx *t, const retry_filter *f, tx_error *e);
/* 1 when e is the server refusing f->since as a timestamp (e then names
 * it): the caller's bad input, not a database failure. */
int retry_bad_since(const retry_filter *f, tx_error *e);

/* bmdb-host retry MACHINE PROCESS | --process P [--cause] [--since] [--dry-run] */
typedef struct retry_args {
    const char *machine, *reason;
    retry_filter f;
    int dry_run;
} retry_args;
/* Checks the arguments before any database work. 0, or -1 with err. */
int retry_parse(int argc, char **argv, retry_args *a, char *err, size_t errlen);
/* Runs it and prints the outcome on out: 1 cleared (bulk: always, with
 * the count), 0 the pair was not in backoff, -2 a --since the server
 * refuses, -1 with err. */
int retry_run(pool *p, const retry_args *a, FILE *out, char *err, size_t errlen);

#endif

/* work.h -- locking one (machine, process) to a session, and letting go.
 *
 * Both run inside a caller's fenced transaction, so a lock is taken or
 * released only while the session is alive. A work row whose session is
 * past its deadline holds nothing: work_lock() takes it over in the same
 * transaction (recorded as Abandoned) instead of waiting for collection. */
#ifndef BMDB_WORK_H
#define BMDB_WORK_H

#include <stddef.h>
#include "tx.h"

typedef enum {
    WORK_LOCKED = 0,  /* the lock is ours; *attempt is set */
    WORK_HELD,        /* a live session holds it */
    WORK_BACKOFF,     /* failed recently; until holds the end of backoff */
    WORK_ERROR = -1   /* e is set */
} work_lock_result;

/* attempt: 1 + consecutive failures so far. */
work_lock_result work_lock(tx *t, const char *machine, const char *process,
                           int *attempt, char *until, size_t untillen, tx_error *e);

/* event is "Finished", "Failed" or "Canceled". Finished clears the backoff;
 * Failed stores backoff_seconds (>= 1) and counts the attempt. A lock that
 * is no longer this session's is reported as TXE_LOST. */
int work_release(tx *t, const char *machine, const char *process, const char *event,
                 const char *cause, long backoff_seconds, tx_error *e);

/* The last backoff period stored for (machine, process), 0 when none. */
long work_backoff_last(tx *t, const char *machine, const char *process, tx_error *e);

/* Input checks, so bad values fail before any SQL: */
int work_valid_uuid(const char *s);
int work_valid_process(const char *s);

#endif

/* batch.h -- several slots' finishes in one transaction.
 *
 * A slot that finishes an item joins the host's open batch, or opens one.
 * Members take turns on the batch's one transaction: in its turn a member
 * runs its commit function inside a savepoint of its own, then queues its
 * release. A commit function that only defers its statements (tx_defer)
 * sends nothing in its turn: its statements ride with the batch's next
 * flight, and its savepoint, never sent, is taken back. The member whose
 * turn ends with nobody left waiting closes the batch: every queued
 * release goes out as one statement, with COMMIT.
 * So k finishes cost one BEGIN, one fence, one release and one COMMIT,
 * and a commit function that fails undoes only its own savepoint.
 *
 * A failure that is not one member's own (the fence, a lost connection, a
 * serialization failure, a lock that is gone, a deferred statement that
 * failed in a later member's flight) ends the batch for all: no
 * member's work commits, and each then finishes alone, as it would have
 * without the batch (commit functions must be safe to run again). */
#ifndef BMDB_BATCH_H
#define BMDB_BATCH_H

#include <pthread.h>

#include "pool.h"
#include "session.h"
#include "slots.h"
#include "tx.h"

typedef struct batch_member {
    int ticket;      /* the turn it takes, from 0 */
    int done;        /* the batch has ended for it */
    int committed;   /* its release committed */
    tx_error err;    /* else why not */
    tx_mark savepoint; /* its savepoint, queued at its turn */
    pthread_cond_t cv; /* its turn came, or the batch ended: only this
                        * member is woken, never every member */
} batch_member;

/* At most this many members, and only members of one session, share a
 * batch: a slot that finds it full (or another session's) finishes alone. */
#define BATCH_MAX 64

enum { BATCH_ALONE = 0, BATCH_TURN = 1, BATCH_FAILED = -1, BATCH_CLAIM = 2 };

/* Joins the open batch of sess, or opens one, and waits for m's turn.
 * BATCH_TURN: *out is the batch's transaction until batch_leave (the next
 * statement sent on it opens m's savepoint). BATCH_ALONE: no batch for
 * m; finish alone. BATCH_FAILED: the batch ended before m's turn, m->err
 * says why; finish alone. */
int batch_join(pool *p, session *sess, batch_member *m, tx **out);

/* Ends m's turn. With ok, m's release (a Finished item's machine, process
 * and token) is queued and m waits for the batch to end: returns 1 when
 * it committed, else 0 with m->err set (outcome_unknown when COMMIT was
 * sent and no answer came back). Without ok, m's savepoint is rolled back
 * and 0 returned at once; with fatal too (a failure that may have doomed
 * the transaction: a serialization failure, a lost connection), the whole
 * batch fails.
 *
 * With may_claim (m's slot claims next), m may get BATCH_CLAIM instead:
 * it is the last member, the batch's members are the host's only
 * finishes in flight, and it holds the claim turn (slots.h). The
 * transaction is still m's, the releases its final statement; m claims
 * in it (the select's statement carries the releases; the lock becomes
 * the final), then calls batch_close, then slot_claim_leave. *peers:
 * how many members ended an item of m's process, m included. This is the
 * steady state DESIGN asks for: items ended and the next claimed in one
 * transaction, k at a time. */
int batch_leave(batch_member *m, int ok, int fatal, const char *machine, const char *process,
                const char *token, int may_claim, int *peers);
/* Commits the batch that m closes after BATCH_CLAIM; with claim_sent,
 * what the lock claimed goes to claimed (up to max, *nclaimed of them).
 * 1 when it committed, else 0 with m->err set. */
int batch_close(batch_member *m, int claim_sent, slot_handed *claimed, int max, int *nclaimed);

/* Members of the open batch (0 when none): for the specs. */
int batch_members(void);
/* Batches committed, and the finishes they committed, since start (the
 * stop line: their ratio is the mean batch size). */
void batch_counts(unsigned long *batches, unsigned long *finishes);

#endif

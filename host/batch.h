/* batch.h -- several slots' finishes in one transaction.
 *
 * A slot that finishes an item joins the host's open batch, or opens one,
 * and runs its commit function at once, on its own thread, with a tx of
 * its own that only queues what it defers (tx_init_detached). Only a
 * member that sends a statement (exec, query, one) waits to use the
 * batch's transaction (batch_use): one member at a time, each in a
 * savepoint of its own, its deferred statements moved in behind it. When
 * a member leaves, its deferred statements join the batch's queue and its
 * release is noted. The last member to leave closes the batch, after
 * waiting briefly for slots that are about to finish: every release goes
 * out as one statement, with COMMIT, and the deferred statements ride in
 * front of it. So k finishes cost one BEGIN, one fence, one release and
 * one COMMIT, members that only defer never wait for one another, and a
 * commit function that fails undoes only its own statements.
 *
 * A failure that is not one member's own (the fence, a lost connection, a
 * serialization failure, a lock that is gone, a deferred statement that
 * failed) ends the batch for all: no member's work commits, and each then
 * finishes alone, as it would have without the batch (commit functions
 * must be safe to run again). */
#ifndef BMDB_BATCH_H
#define BMDB_BATCH_H

#include <pthread.h>

#include "pool.h"
#include "session.h"
#include "slots.h"
#include "tx.h"

typedef struct batch_member {
    int ticket;        /* its place among the members, from 0 */
    int holds;         /* it uses the batch's transaction (batch_use) */
    int saw_failed;    /* batch_use found the batch failed */
    int takes_next;    /* its slot runs an item handed to it next */
    int queued_at;     /* where its release stands among the batch's */
    int done;          /* the batch has ended for it (under wake_mu) */
    int committed;     /* its release committed */
    int has_next;      /* the closer's claim handed it next */
    slot_handed next;
    tx_error err;      /* else why not */
    tx_mark savepoint; /* its savepoint, queued by batch_use */
    tx own;            /* its deferred statements, until they join the batch's */
    /* Last, and kept from one batch to the next (batch_join clears only
     * what is above): the member's own wake-up, set up once. The closer
     * wakes each member under its own lock after letting go of the
     * batch's, so a woken member never waits again for that one. */
    int wake_ready;
    pthread_mutex_t wake_mu;
    pthread_cond_t wake_cv;
} batch_member;

/* At most this many members, and only members of one session, share a
 * batch: a slot that finds it full (or another session's) finishes alone. */
#define BATCH_MAX 64

enum { BATCH_ALONE = 0, BATCH_JOINED = 1, BATCH_FAILED = -1, BATCH_CLAIM = 2 };

/* Joins the open batch of sess, or opens one. BATCH_JOINED: *out is m's
 * own tx, which queues deferred statements only, until batch_leave.
 * BATCH_ALONE: no batch for m; finish alone. BATCH_FAILED: the open batch
 * has failed, m->err says why; finish alone. */
int batch_join(pool *p, session *sess, batch_member *m, tx **out);

/* The batch's transaction for m's statements: waits while another member
 * uses it, then opens m's savepoint and moves m's deferred statements in
 * behind it; m keeps it until batch_leave. 0 with *out set, or -1 with e
 * set (m->saw_failed when the batch had failed). */
int batch_use(batch_member *m, tx **out, tx_error *e);

/* Ends m's part. With ok, m's deferred statements and its release (a
 * Finished item's machine, process and token) join the batch, and m waits
 * for the batch to end: 1 when it committed (and, when takes_next and
 * the closer claimed in the batch, m->has_next and m->next may hold m's
 * next item), else BATCH_FAILED with m->err set (outcome_unknown when
 * COMMIT was sent and no answer came back).
 * Without ok, m's own statements are undone (its savepoint rolled back)
 * and m does not wait: 0, or BATCH_FAILED when the batch failed under it
 * (its error may not be its own: it finishes alone). With fatal too (a
 * failure that may have doomed the transaction: a serialization failure,
 * a lost connection), the whole batch fails.
 *
 * With may_claim (m's slot claims next), m may get BATCH_CLAIM instead:
 * it is the last member, the batch's members are the host's only
 * finishes in flight, and it holds the claim turn (slots.h). m then uses
 * the batch's transaction (batch_use answers it), the releases its final
 * statement; m claims in it (the select's statement carries the
 * releases; the lock becomes the final), then calls batch_close, which
 * lets the claim turn go. *peers: how many members of m's process take a
 * next item, m included. This is the steady state DESIGN asks for: items
 * ended and the next claimed in one transaction, k at a time. */
int batch_leave(batch_member *m, int ok, int fatal, const char *machine, const char *process,
                const char *token, int takes_next, int may_claim, int *peers);
/* Commits the batch that m closes after BATCH_CLAIM, and lets the claim
 * turn go. With claim_sent, what the lock claimed (a claim begun at
 * started, mono_now()) goes first to m, then to the members that take a
 * next item of m's process, which learn it as they wake (no claim turn,
 * no second wake-up), then to the slots that wait (slot_claim_hand);
 * claimed gets m's and what did not fit (up to max, *nclaimed of them;
 * *handed: how many went to others). 1 when it committed, else 0 with
 * m->err set. */
int batch_close(batch_member *m, int claim_sent, double started, slot_handed *claimed, int max,
                int *nclaimed, int *handed);

/* Members of the open batch (0 when none), and how many of them have not
 * yet left it (*active, if not NULL): for the specs. */
int batch_members(int *active);
/* Batches committed, and the finishes they committed, since start (the
 * stop line: their ratio is the mean batch size). */
void batch_counts(unsigned long *batches, unsigned long *finishes);

#endif

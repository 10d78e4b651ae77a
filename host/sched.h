/* sched.h -- the scheduler: which slot claims, which finishes share a
 * transaction, and what each slot runs next.
 *
 * Within a host, claims and finishes take turns: a claim runs alone, and
 * finishes run together. The slot whose turn it is claims for every slot
 * of its process that waits, and hands them their items through the
 * process's queue; items claimed ahead of any slot's need wait there too,
 * and those that wait too long are given back. Several slots' finishes
 * commit in one transaction, the batch, whose last member may claim the
 * next items in it. sched.c keeps the turns and the queues, sched_batch.c
 * the batch; the invariants they keep are numbered in docs/internals.md.
 * How much to claim, and when to claim in a batch, is Lua's
 * (lua/bmdb/policy.lua).
 *
 * Every item crosses this interface as one sched_item. */
#ifndef BMDB_SCHED_H
#define BMDB_SCHED_H

#include <pthread.h>

#include "pool.h"
#include "session.h"
#include "tx.h"

/* A work item: claimed (its lock taken under session_id, at attempt, with
 * token), queued, handed, run next, released by a batch, given back. A
 * release needs only machine, process and token. */
typedef struct sched_item {
    char machine[40], process[64], token[40], session_id[40];
    int attempt;
    double started; /* mono_now() before the claim that locked it was sent */
} sched_item;

/* ---- claims and finishes take turns (sched.c) ---------------------------
 *
 * A finish (a work decision's transaction) runs between sched_finish_enter
 * and sched_finish_leave, alongside other finishes but never a claim.
 *
 * sched_claim_enter waits up to seconds for either the turn to claim
 * (SCHED_CLAIM_TURN: claim, hand out what others wait for, then
 * sched_claim_leave), or an item a claimer handed us (SCHED_CLAIM_HANDED,
 * *out filled), or gives up (SCHED_CLAIM_TIMEOUT; also at once when the
 * host leaves running). sched_claim_waiters says how many slots of
 * process wait for an item that nobody handed them yet; sched_claim_hand
 * queues one in its process's queue (0 when the queue is full: the caller
 * keeps it), to be taken oldest first; sched_claim_queued says how many
 * are queued, those claimed ahead of any slot's need among them (the
 * worker's `ahead`). sched_claim_take takes a queued item without
 * waiting, for a slot that stops claiming (reload, drain) and must not
 * strand one. An item the calling slot gets from here is noted as the one
 * it holds (sched_note_item). */
#define SCHED_QUEUE_MAX 64
typedef enum { SCHED_CLAIM_TIMEOUT, SCHED_CLAIM_TURN, SCHED_CLAIM_HANDED } sched_claim_got;
void sched_finish_enter(void);
void sched_finish_leave(void);
sched_claim_got sched_claim_enter(const char *process, double seconds, sched_item *out);
/* The turn to claim at once, or 0 without waiting, for the transaction
 * of a batch whose members are every finish in flight (finishes: how many
 * are still inside theirs, the caller included): it then claims the next
 * items in the batch's transaction (then sched_claim_leave). Another
 * finish in flight beside it would conflict with the claim under
 * SERIALIZABLE, as any finish and claim do. */
int sched_claim_alongside(int finishes);
void sched_claim_leave(void);
int sched_claim_waiters(const char *process);
int sched_claim_queued(const char *process);
int sched_claim_hand(const sched_item *item);
int sched_claim_take(const char *process, sched_item *out);
/* Items claimed ahead waiting in any queue (no slot waits for them). */
int sched_items_ahead(void);
/* How many slots hold an item now, or were handed one they have not yet
 * taken (read without a lock: a hint, for a batch deciding whether a
 * finish may be about to join it). */
int sched_items_held(void);
/* Items handed to slots other than through a queue (a batch's closer to
 * its members, sched_batch.c): +n when handed, -1 as each is taken. */
void sched_note_handed(int delta);

/* Items claimed ahead by a worker that claims ahead by default (it did
 * not set `ahead`: sched_claim_give_back(process, 1)) and that have waited
 * in its queue SCHED_GIVE_BACK_S or longer (its slots are busy with
 * longer items than when they were claimed) are given back: taken out of
 * the queue and handed to strays_give_back, which releases them, so a
 * later claim runs them, here or on another host, rather than this host
 * after a long wait with their timeouts running. A worker that sets
 * `ahead` keeps its items waiting, as it asked. The host's main loop calls
 * sched_give_back_waiting, which returns how many it gave back. */
#define SCHED_GIVE_BACK_S 1.0
void sched_claim_give_back(const char *process, int on);
int sched_give_back_waiting(void);

/* ---- the batch: several slots' finishes in one transaction (sched_batch.c)
 *
 * A slot that finishes an item joins the host's open batch, or opens one,
 * and runs its commit function at once, on its own thread, with a tx of
 * its own that only queues what it defers (tx_init_detached). Only a
 * member that sends a statement (exec, query, one) waits to use the
 * batch's transaction (sched_batch_use): one member at a time, each in a
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

/* At most this many members, and only members of one session, share a
 * batch: a slot that finds it full (or another session's) finishes alone.
 * Also the most items any claim locks (core.claim_max), since a batch's
 * closer reads back and hands out no more. */
#define SCHED_BATCH_MAX 64

/* Where a finish stands with the batch: what sched_batch_join, _leave and
 * _close answer, and m->state once m has joined. Transitions:
 *
 *   join:                      -> JOINED     a member: run the commit function
 *                              -> ALONE      no batch for it: finish alone
 *                              -> FAILED     the open batch failed: finish alone
 *   JOINED --leave FINISHED--> COMMITTED | FAILED   (waits for the batch's end)
 *                          --> CLAIMING     the last member, holding the claim
 *                                           turn: claims in the batch, then close
 *   JOINED --leave UNDONE---> UNDONE | FAILED       (does not wait)
 *   JOINED --leave FATAL----> FAILED                (fails the whole batch)
 *   CLAIMING --close--------> COMMITTED | FAILED
 *
 * FAILED, after a join: m->err says why, and the finish runs alone
 * (outcome_unknown when COMMIT was sent and no answer came back). UNDONE:
 * only the member's own statements were rolled back, the batch goes on. */
typedef enum {
    SCHED_ALONE,
    SCHED_JOINED,
    SCHED_COMMITTED,
    SCHED_UNDONE,
    SCHED_FAILED,
    SCHED_CLAIMING,
} sched_outcome;

/* How a member leaves: its commit function succeeded (its release joins
 * the batch's), failed (only its own statements are undone), or failed in
 * a way the transaction may not survive (a serialization failure, a lost
 * connection, a dead session: the whole batch fails). */
typedef enum { SCHED_LEAVE_FINISHED, SCHED_LEAVE_UNDONE, SCHED_LEAVE_FATAL } sched_leaving;

typedef struct sched_leave {
    sched_leaving how;
    const sched_item *done; /* FINISHED: the item released (machine, process, token) */
    int takes_next;         /* its slot runs an item handed to it next */
    int may_claim;          /* its slot claims next: it may close CLAIMING */
} sched_leave;

/* A claim in the batch's transaction, as its closer ends the batch:
 * whether the claim's lock was sent (else nothing was claimed) and when the
 * claim began; then what the lock claimed, handed to nobody: the closer's
 * own item first, then what fitted nowhere (the closer lets it go), and
 * how many went to other slots. */
typedef struct sched_claim {
    int sent;
    double started; /* mono_now() */
    sched_item item[SCHED_BATCH_MAX];
    int n, handed;
} sched_claim;

typedef struct sched_member {
    int ticket;            /* its place among the members, from 0 */
    sched_outcome state;   /* from JOINED on (sched_outcome's transitions) */
    int holds;             /* it uses the batch's transaction (sched_batch_use) */
    int saw_failed;        /* sched_batch_use found the batch failed */
    int takes_next;        /* its slot runs an item handed to it next */
    int queued_at;         /* where its release stands among the batch's */
    int done;              /* the batch has ended for it (under wake_mu) */
    int has_next;          /* the closer's claim handed it next */
    sched_item next;
    tx_error err;          /* when FAILED, why */
    tx_mark savepoint;     /* its savepoint, queued by sched_batch_use */
    tx own;                /* its deferred statements, until they join the batch's */
    /* Last, and kept from one batch to the next (sched_batch_join clears
     * only what is above): the member's own wake-up, set up once. The
     * closer wakes each member under its own lock after letting go of the
     * batch's, so a woken member never waits again for that one. */
    int wake_ready;
    pthread_mutex_t wake_mu;
    pthread_cond_t wake_cv;
} sched_member;

/* Joins the open batch of sess, or opens one: SCHED_JOINED with *out m's
 * own tx, which queues deferred statements only, until sched_batch_leave;
 * else SCHED_ALONE or SCHED_FAILED (above). */
sched_outcome sched_batch_join(pool *p, session *sess, sched_member *m, tx **out);

/* The batch's transaction for m's statements: waits while another member
 * uses it, then opens m's savepoint and moves m's deferred statements in
 * behind it; m keeps it until sched_batch_leave. 0 with *out set, or -1
 * with e set (m->saw_failed when the batch had failed). */
int sched_batch_use(sched_member *m, tx **out, tx_error *e);

/* Ends m's part (the transitions above). FINISHED: m's deferred
 * statements and its release join the batch, and m waits for the batch
 * to end; when COMMITTED and leave->takes_next, m->has_next and m->next
 * may hold the item the closer's claim handed it, noted as the one the
 * calling slot holds. UNDONE and FATAL do not wait.
 *
 * With leave->may_claim, a FINISHED m may get SCHED_CLAIMING instead: it
 * is the last member, the batch's members are the host's only finishes
 * in flight, and it holds the claim turn. m then uses the batch's
 * transaction (sched_batch_use answers it), the releases its final
 * statement; m claims in it (the select's statement carries the
 * releases; the lock becomes the final), then calls sched_batch_close.
 * *peers: how many members of m's process take a next item, m included. */
sched_outcome sched_batch_leave(sched_member *m, const sched_leave *leave, int *peers);

/* Commits the batch that m closes after SCHED_CLAIMING, and lets the
 * claim turn go. With c->sent, what the lock claimed goes first to m, then
 * to the members that take a next item of m's process, which learn it as
 * they wake (no claim turn, no second wake-up), then to the slots that
 * wait (sched_claim_hand); c gets the rest (sched_claim), its first noted
 * as the calling slot's item. COMMITTED or FAILED (m->err). */
sched_outcome sched_batch_close(sched_member *m, sched_claim *c);

/* Members of the open batch (0 when none), and how many of them have not
 * yet left it (*active, if not NULL): for the specs. */
int sched_batch_members(int *active);
/* Batches committed, and the finishes they committed, since start (the
 * stop line: their ratio is the mean batch size). */
void sched_batch_counts(unsigned long *batches, unsigned long *finishes);

/* The item each slot holds, for the report on slots that will not stop
 * and for sched_items_held. A slot thread binds its record
 * (char[SCHED_ITEM_LEN]) once; the lock calls note what they claim (NULL:
 * released), a no-op on threads that bound nothing; sched_item_read
 * copies a record under the same lock. */
#define SCHED_ITEM_LEN 40
void sched_bind_item(char *record);
void sched_note_item(const char *machine);
void sched_item_read(const char *record, char *out, size_t len);

#endif

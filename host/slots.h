/* slots.h -- what the slot threads share with the Lua they run.
 *
 * The worker loop is Lua (bmdb.internal's serve) on threads that worker.c
 * owns. The services that loop calls live here, below both, so neither
 * the threads nor the Lua binding need the other: idle waits and wake-ups,
 * the code generation slots compare at each item boundary, the counters,
 * whether the listener took LISTEN, and the item each slot holds.
 *
 * Idle slots wait per process. A wake-up is a token handed to ONE waiter;
 * a slot that then claims something passes a token on, so a burst of new
 * machines ramps every slot up while a single NOTIFY costs a single query.
 * A token left when nobody waits is kept (one), closing the race between
 * "found nothing" and going to sleep. */
#ifndef BMDB_SLOTS_H
#define BMDB_SLOTS_H

#include <stddef.h>

/* Sleeps until woken, for up to seconds when no other idle slot of
 * process keeps the poll interval (the idle slots of a process take
 * turns at polling; slots.c), else for 60 times as long; 1 when woken for
 * work, 0 otherwise (time up, a wake-everyone, or the host left running). */
int slot_idle_wait(const char *process, double seconds);
/* One idle slot of process (every process if NULL or "") gets a wake-up. */
void slot_wake(const char *process);
/* Every idle slot wakes (shutdown, reload). */
void slot_wake_everyone(void);

/* Claims and finishes take turns within a host, and a claim claims for
 * every slot of its process that waits to (slots.c says why). A finish
 * (a work decision's transaction) runs between slot_finish_enter and
 * slot_finish_leave, alongside other finishes but never a claim.
 *
 * slot_claim_enter waits up to seconds for either the turn to claim
 * (SLOT_CLAIM_TURN: claim, hand out what others wait for, then
 * slot_claim_leave), or an item a claimer handed us (SLOT_CLAIM_HANDED,
 * *out filled; its lock was taken under out->session), or gives up
 * (SLOT_CLAIM_TIMEOUT; also at once when the host leaves running).
 * slot_claim_waiters says how many slots of process wait for an item that
 * nobody handed them yet; slot_claim_hand queues one (0 when the queue is
 * full: the caller keeps it), to be taken oldest first; slot_claim_queued
 * says how many are queued, those claimed ahead of any slot's need among
 * them (the worker's `ahead`). slot_claim_take takes a queued item without
 * waiting, for a slot that stops claiming (reload, drain) and must not
 * strand one. */
#define SLOT_HAND_MAX 64
typedef struct slot_handed {
    char machine[40], token[40], session[40];
    int attempt;
    double started; /* mono_now() before the claim was sent */
} slot_handed;
enum { SLOT_CLAIM_TIMEOUT = 0, SLOT_CLAIM_TURN = 1, SLOT_CLAIM_HANDED = 2 };
void slot_finish_enter(void);
void slot_finish_leave(void);
int slot_claim_enter(const char *process, double seconds, slot_handed *out);
/* The turn to claim at once, or 0 without waiting, for the transaction
 * of a batch of finishes (batch.h) whose members are every finish in
 * flight (finishes: how many are still inside theirs, the caller
 * included): it then claims the next items in the batch's transaction
 * (then slot_claim_leave). Another finish in flight beside it would
 * conflict with the claim under SERIALIZABLE, as any finish and claim do. */
int slot_claim_alongside(int finishes);
void slot_claim_leave(void);
int slot_claim_waiters(const char *process);
int slot_claim_queued(const char *process);
/* Items claimed ahead waiting in any queue (no slot waits for them). */
int slot_items_ahead(void);
int slot_claim_hand(const char *process, const slot_handed *item);
int slot_claim_take(const char *process, slot_handed *out);
/* Items claimed ahead by a worker that claims ahead by default (it did
 * not set `ahead`: slot_claim_give_back(process, 1)) and that have waited
 * in its queue SLOT_GIVE_BACK_S or longer (its slots are busy with longer
 * items than when they were claimed) are given back: taken out of the
 * queue and handed to strays_give_back, which releases them, so a later
 * claim runs them, here or on another host, rather than this host after
 * a long wait with their timeouts running. A worker that sets `ahead`
 * keeps its items waiting, as it asked. The host's main loop calls
 * slot_give_back_waiting, which returns how many it gave back. */
#define SLOT_GIVE_BACK_S 1.0
void slot_claim_give_back(const char *process, int on);
int slot_give_back_waiting(void);

/* The code generation: 1 until the first reload; slots compare it at every
 * item boundary. Only worker.c moves it on, when it swaps the code. */
unsigned slot_generation(void);
void slot_generation_advance(void);

/* Counters for the log line at stop: items claimed, and transactions the
 * slots had to retry (40001/40P01), the price of SERIALIZABLE claims. */
void slot_count_claim(void);
void slot_count_retry(void);
void slot_counts(unsigned long *claims, unsigned long *retries);

/* True once the listener has LISTEN running: a release may NOTIFY. */
int slot_notify_enabled(void);
void slot_set_notify_enabled(void);

/* Fleet wake-ups, coalesced per host. A release asks for one after its
 * commit; the listener sends a single NOTIFY for every request that
 * arrived since its last one (at most one per SLOT_FLEET_WAKE_S), on its
 * own connection. Releases then neither pay a statement for it nor meet
 * on PostgreSQL's global notify lock at commit, and a burst of releases
 * wakes the other hosts a few times, not once per item. */
#define SLOT_FLEET_WAKE_S 0.01
void slot_fleet_wake_request(void);
/* The listener: an fd that turns readable when a request is pending, and
 * taking the pending request (1 if there was one). */
int slot_fleet_wake_fd(void);
int slot_fleet_wake_take(void);

/* The item the calling slot holds, for the report on slots that will not
 * stop. A slot thread binds its record (char[SLOT_ITEM_LEN]) once; the
 * lock calls note what they claim (NULL: released), a no-op on threads
 * that bound nothing; slot_item_read copies a record under the same lock. */
#define SLOT_ITEM_LEN 40
void slot_bind_item(char *record);
void slot_note_item(const char *machine);
void slot_item_read(const char *record, char *out, size_t len);
/* How many slots hold an item now, or were handed one they have not yet
 * taken (read without a lock: a hint, for a
 * batch deciding whether a finish may be about to join it). */
int slot_items_held(void);
/* Items handed to slots other than through the claim queue (a batch's
 * closer to its members, batch.c): +n when handed, -1 as each is taken. */
void slot_note_handed(int delta);

#endif

/* slots.h -- what the slot threads share with the Lua they run.
 *
 * The worker loop is Lua (bmdb.internal's serve) on threads that worker.c
 * owns. The services that loop calls live here, below both, so neither
 * the threads nor the Lua binding need the other: idle waits and wake-ups,
 * the code generation slots compare at each item boundary, the counters,
 * whether the listener took LISTEN, and the item each slot holds. Who
 * claims and what a slot runs next is the scheduler's (sched.h).
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
/* How many records name an item now (read without a lock: a hint;
 * sched_items_held adds the items handed and not yet taken). */
int slot_items_noted(void);

#endif

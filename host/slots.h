/* slots.h -- what the slot threads share with the Lua they run.
 *
 * The worker loop is Lua (bmdb.internal's serve) on threads that worker.c
 * owns. The services that loop calls live here, below both, so neither
 * the threads nor the Lua binding need the other: idle waits and wake-ups
 * (local, and the fleet's through the listener, once it took LISTEN). Who
 * claims and what a slot runs next is the scheduler's (sched.h); the code
 * generation slots compare at each item boundary is snapshot.h's.
 *
 * Idle slots wait per process. A wake-up is a token handed to ONE waiter;
 * a slot that then claims something passes a token on, so a burst of new
 * machines ramps every slot up while a single NOTIFY costs a single query.
 * A token left when nobody waits is kept (one), closing the race between
 * "found nothing" and going to sleep. */
#ifndef BMDB_SLOTS_H
#define BMDB_SLOTS_H

/* Sleeps until woken, for up to seconds when no other idle slot of
 * process keeps the poll interval (the idle slots of a process take
 * turns at polling; slots.c), else for 60 times as long; 1 when woken for
 * work, 0 otherwise (time up, a wake-everyone, or the host left running). */
int slot_idle_wait(const char *process, double seconds);
/* One idle slot of process (every process if NULL or "") gets a wake-up. */
void slot_wake(const char *process);
/* Every idle slot wakes (shutdown, reload). */
void slot_wake_everyone(void);

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

#endif

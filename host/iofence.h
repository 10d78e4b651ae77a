/* iofence.h -- when a host-owned I/O call must stop, and a descriptor that
 * says so the moment it may have to.
 *
 * bmdb.http and bmdb.exec run outside the
 * database, so the fence of a transaction cannot reach them. This one
 * does: a call stops when its own timeout passes, when an item of its
 * Lua state has its lock taken away (timeout, operator cancel, takeover:
 * items.h), when the session it runs under is lost (locally: the
 * heartbeat missed its deadline), or when the host cancels (the grace of
 * a drain is over, a second signal, os.exit). A drain alone stops
 * nothing: items in flight keep their grace period.
 *
 * Each thread has one eventfd. While a fence is up it is watched by
 * lifecycle.c, whose every kick and state change writes to it; losing a
 * lock or a session kicks (items.c, session.c). So a call polls its own
 * descriptors and this one, with a timeout no later than its nearest
 * deadline, and never polls in a loop to find out. Invariants:
 *
 *   1. iofence_begin watches the fd before it checks, so a loss between
 *      the check and the poll still wakes the poll.
 *   2. A call starts nothing (no connect, no spawn) unless iofence_begin
 *      returned IOFENCE_GO, and checks again (iofence_check) after every
 *      wake-up before it goes on.
 */
#ifndef BMDB_IOFENCE_H
#define BMDB_IOFENCE_H

#include <stddef.h>
#include <lua.h>

struct session;

typedef enum {
    IOFENCE_GO = 0,   /* the call may go on */
    IOFENCE_TIMEOUT,  /* its own timeout passed: the caller raises its own kind */
    IOFENCE_LOST,     /* a lock of the calling state was taken away */
    IOFENCE_SESSION,  /* the session it runs under is lost */
    IOFENCE_CANCELED, /* the host is cancelling */
} iofence_stop;

typedef struct iofence {
    lua_State *L;
    struct session *sess; /* may be NULL (a one-off script's call) */
    double own_deadline;  /* monotonic; 0: no timeout of its own */
    int fd;               /* the thread's eventfd, watched while up */
    char why[512];        /* after a stop: what stopped it, for the error */
} iofence;

/* Raises the fence for a call of L under sess (NULL: none) with its own
 * timeout in seconds (0 or less: none). Anything but IOFENCE_GO means the
 * call must not start; the fence is down again then. */
iofence_stop iofence_begin(iofence *f, lua_State *L, struct session *sess, double timeout);
/* After a wake-up (or at any time): whether the call may go on. */
iofence_stop iofence_check(iofence *f);
/* Milliseconds to the nearest deadline (own, item's, session's local),
 * for poll(), at most cap_ms (cap_ms < 0: no cap; -1 returned: none). */
int iofence_poll_ms(iofence *f, int cap_ms);
/* The earliest deadline now (monotonic; 0 when none). */
double iofence_deadline(iofence *f);
void iofence_end(iofence *f);
/* Raises the error of a stop other than IOFENCE_TIMEOUT as every bmdb
 * call does (kind lost, session_expired or canceled), the fence already
 * down; what names the call ("GET https://x/y"). */
int iofence_raise(lua_State *L, iofence *f, iofence_stop why, const char *what);

#endif

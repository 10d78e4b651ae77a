/* iofence.c -- when host-owned I/O must stop (iofence.h says what). */
#include "iofence.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "items.h"
#include "lerror.h"
#include "lifecycle.h"
#include "lstate.h"
#include "session.h"

/* One eventfd per thread, made at its first call and closed with it. */
static pthread_key_t fd_key;
static pthread_once_t fd_once = PTHREAD_ONCE_INIT;

static void close_fd(void *p) { close((int)(intptr_t)p - 1); }
static void make_key(void) { pthread_key_create(&fd_key, close_fd); }

static int thread_fd(void) {
    pthread_once(&fd_once, make_key);
    intptr_t v = (intptr_t)pthread_getspecific(fd_key);
    if (v) return (int)v - 1;
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd >= 0) pthread_setspecific(fd_key, (void *)(intptr_t)(fd + 1));
    return fd;
}

iofence_stop iofence_check(iofence *f) {
    uint64_t n;
    while (f->fd >= 0 && read(f->fd, &n, sizeof n) > 0) {
    }
    if (lifecycle_state() >= HOST_CANCELLING) {
        snprintf(f->why, sizeof f->why, "canceled: the host is shutting down");
        return IOFENCE_CANCELED;
    }
    if (items_state_lost(f->L, f->why, sizeof f->why)) return IOFENCE_LOST;
    if (f->sess && !session_alive(f->sess)) {
        snprintf(f->why, sizeof f->why, "session expired");
        return IOFENCE_SESSION;
    }
    if (f->own_deadline > 0 && mono_now() >= f->own_deadline) {
        snprintf(f->why, sizeof f->why, "timed out");
        return IOFENCE_TIMEOUT;
    }
    /* An item's deadline passed: the main loop's tick would mark it lost
     * a moment later; marked now, the call raises what the body would
     * see then, and the body's interrupt is spent with it. */
    double item = items_state_deadline(f->L);
    if (item > 0 && mono_now() >= item) {
        items_check_timeouts();
        if (items_state_lost(f->L, f->why, sizeof f->why)) return IOFENCE_LOST;
        snprintf(f->why, sizeof f->why, "lost: the item's timeout passed");
        return IOFENCE_LOST;
    }
    return IOFENCE_GO;
}

iofence_stop iofence_begin(iofence *f, lua_State *L, struct session *sess, double timeout) {
    f->L = L;
    f->sess = sess;
    f->own_deadline = timeout > 0 ? mono_now() + timeout : 0;
    f->why[0] = 0;
    f->fd = thread_fd();
    /* Invariant 1: watched before the check. Without an fd (out of
     * descriptors) the caller still polls up to its deadlines. */
    if (f->fd >= 0 && lifecycle_watch(f->fd) < 0) f->fd = -1;
    iofence_stop s = iofence_check(f);
    if (s != IOFENCE_GO) iofence_end(f);
    return s;
}

double iofence_deadline(iofence *f) {
    double d = f->own_deadline;
    double item = items_state_deadline(f->L);
    if (item > 0 && (d == 0 || item < d)) d = item;
    if (f->sess) {
        double s = session_local_deadline(f->sess);
        if (d == 0 || s < d) d = s;
    }
    return d;
}

int iofence_poll_ms(iofence *f, int cap_ms) {
    double d = iofence_deadline(f);
    if (d == 0) return cap_ms;
    double ms = ceil((d - mono_now()) * 1000.0);
    if (ms < 0) ms = 0;
    if (cap_ms >= 0 && ms > cap_ms) ms = cap_ms;
    return ms > 86400000.0 ? 86400000 : (int)ms;
}

void iofence_end(iofence *f) {
    if (f->fd >= 0) lifecycle_unwatch(f->fd);
}

int iofence_raise(lua_State *L, iofence *f, iofence_stop why, const char *what) {
    lstate_interrupt_taken(L);
    const char *kind = why == IOFENCE_LOST ? BMDB_E_LOST : why == IOFENCE_SESSION ? BMDB_E_SESSION_EXPIRED : BMDB_E_CANCELED;
    return lerror_raise_kind(L, kind, "%s (%s)", f->why, what);
}

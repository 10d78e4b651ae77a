/* lockcheck.h -- "lock must be held at entry", said and checked.
 *
 * A function that needs a mutex held by its caller says so in one line
 * and opens with LOCK_HELD(&mu); one that takes a lock that must not be
 * held yet (the lock order in host/README.md) may open with
 * LOCK_NOT_HELD(&mu). The sanitized builds (make check-asan, check-all,
 * check-tsan) define BMDB_LOCKCHECK and the checks are assert()s there;
 * the ordinary build compiles them away.
 *
 * No wrapper type is needed: glibc records the owning thread's kernel id
 * in every mutex it locks, default (normal) ones included, and restores
 * it when pthread_cond_wait takes the mutex back. That field is glibc's,
 * which is what Debian runs; elsewhere the checks are off. */
#ifndef BMDB_LOCKCHECK_H
#define BMDB_LOCKCHECK_H

#include <pthread.h>

#if defined(BMDB_LOCKCHECK) && defined(__GLIBC__)
#include <assert.h>
#include <sys/syscall.h>
#include <unistd.h>

static inline int lockcheck_tid(void) {
    static __thread int tid;
    if (!tid) tid = (int)syscall(SYS_gettid);
    return tid;
}
#define LOCK_HELD(m) assert((m)->__data.__owner == lockcheck_tid())
#define LOCK_NOT_HELD(m) assert((m)->__data.__owner != lockcheck_tid())
#else
#define LOCK_HELD(m) ((void)(m))
#define LOCK_NOT_HELD(m) ((void)(m))
#endif

#endif

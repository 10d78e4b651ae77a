/* items.c -- the items in flight in this host: how it learns that a lock
 * of its own was taken away (a timeout, an operator's cancel) while its
 * body still runs.
 *
 * Every work item whose body runs here is tracked with its state, token
 * and local deadline. The host's main loop checks the deadlines
 * (items_check_timeouts) and the listener reports cancels
 * (items_lost_token); either marks the item lost, has its state
 * interrupted (the callback the owner of states registered: lstate.c sets
 * a hook that raises "lost", as a shutdown interrupts a busy body) and
 * kicks sleepers. A body stuck outside Lua ignores the hook: its lock is
 * free anyway (the database deadline passed or the row is gone), and the
 * log names its slot.
 *
 * Globals and their guards (lock order: host/README.md):
 *   items       items_mu (nothing is taken under it but log.c's lock)
 *   interrupt   atomic, set once */
#include "items.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "lockcheck.h"
#include "log.h"

/* After the interrupt, how long a body may take to stop before its slot is
 * reported stuck. */
#define STUCK_AFTER_S 5.0

typedef struct item {
    void *state;
    char token[40], machine[40], process[64];
    int slot;
    double timeout;  /* seconds, 0: none */
    double deadline; /* monotonic, 0: none */
    char lost[256];  /* why the lock was taken away, "" while held */
    double lost_at;
    int told;        /* its body was told it is lost (the interrupt is spent) */
    int stuck_logged;
    struct item *next;
} item;

static pthread_mutex_t items_mu = PTHREAD_MUTEX_INITIALIZER;
static item *items;
static items_interrupt_fn *interrupt;

void items_on_lost(items_interrupt_fn *fn) { __atomic_store_n(&interrupt, fn, __ATOMIC_RELEASE); }

void items_track(void *state, const char *token, const char *machine, const char *process, int slot,
                 double timeout, double started) {
    item *it = calloc(1, sizeof *it);
    it->state = state;
    snprintf(it->token, sizeof it->token, "%s", token);
    snprintf(it->machine, sizeof it->machine, "%s", machine);
    snprintf(it->process, sizeof it->process, "%s", process);
    it->slot = slot;
    it->timeout = timeout;
    /* started is taken before the claim was sent: the database set its
     * deadline later, so this one passes first. */
    it->deadline = timeout > 0 ? started + timeout : 0;
    pthread_mutex_lock(&items_mu);
    it->next = items;
    items = it;
    pthread_mutex_unlock(&items_mu);
}

void items_untrack(const char *token) {
    pthread_mutex_lock(&items_mu);
    for (item **pp = &items; *pp; pp = &(*pp)->next) {
        if (strcmp((*pp)->token, token) == 0) {
            item *it = *pp;
            *pp = it->next;
            free(it);
            break;
        }
    }
    pthread_mutex_unlock(&items_mu);
}

/* ---- losing an item ---------------------------------------------------- */

/* The states whose items one pass marked lost, to interrupt once items_mu
 * is let go. A pass that fills it is followed by another (the items it
 * marked are skipped then). */
#define LOSE_BATCH 16
typedef struct losses {
    void *states[LOSE_BATCH];
    int n;
} losses;

/* Marks it lost and notes its state in ls, unless it already was lost
 * (or ls is full: 0 then, and the caller runs another pass). Caller holds
 * items_mu. */
static int lose(item *it, const char *why, losses *ls) {
    LOCK_HELD(&items_mu);
    if (*it->lost || ls->n == LOSE_BATCH) return 0;
    snprintf(it->lost, sizeof it->lost, "%s", why);
    it->lost_at = mono_now();
    ls->states[ls->n++] = it->state;
    char slot[16];
    snprintf(slot, sizeof slot, "%d", it->slot);
    if (*it->machine)
        log_kv(LOG_WARN, "work lock taken away; interrupting the body", "machine", it->machine, "process",
               it->process, "slot", slot, "reason", why, NULL);
    else
        log_kv(LOG_WARN, "loop run taken away; interrupting it", "loop", it->process, "reason", why, NULL);
    return 1;
}

/* The interrupts and the kick of one pass, after items_mu was let go.
 *
 * They are not made under items_mu so that the registry takes no other
 * lock while it holds its own: the interrupt takes the owner's lock of
 * its states (lstate.c's states_mu), the kick lifecycle.c's. Two things
 * can happen between the unlock and the interrupt, and neither does
 * harm:
 *
 * - The item is untracked, and its state runs another item or is closed
 *   (and its memory perhaps reused by a new state). The callee checks
 *   that the state is still one of its own; a hook set on a state whose
 *   items are not lost raises nothing (items_take_interrupt).
 *
 * - The body sees the loss first, through a bmdb call that raises lost
 *   itself (iofence.c), and clears the hook it would have met
 *   (lstate_interrupt_taken) before the hook is set. Under one lock that
 *   could not happen; here the body's clearing marks the item told
 *   (items_interrupt_seen), so the late hook raises nothing and the body
 *   still sees the error once, as it would have.
 *
 * The kick comes last: a sleeper it wakes finds the item marked, and a
 * body woken in poll() finds its hook already set, which its own raise
 * then clears. */
static void interrupt_all(const losses *ls) {
    LOCK_NOT_HELD(&items_mu);
    if (ls->n == 0) return;
    items_interrupt_fn *fn = __atomic_load_n(&interrupt, __ATOMIC_ACQUIRE);
    for (int i = 0; fn && i < ls->n; i++) fn(ls->states[i]);
    lifecycle_kick(); /* a body in bmdb.sleep wakes and raises */
}

void items_lost_token(const char *token, const char *why) {
    losses ls;
    do {
        ls.n = 0;
        pthread_mutex_lock(&items_mu);
        for (item *it = items; it; it = it->next)
            if (strcmp(it->token, token) == 0) lose(it, why, &ls);
        pthread_mutex_unlock(&items_mu);
        interrupt_all(&ls);
    } while (ls.n == LOSE_BATCH);
}

void items_check_timeouts(void) {
    losses ls;
    do {
        ls.n = 0;
        double now = mono_now();
        pthread_mutex_lock(&items_mu);
        for (item *it = items; it; it = it->next) {
            if (it->deadline > 0 && now >= it->deadline && !*it->lost) {
                char why[64];
                snprintf(why, sizeof why, "timeout after %gs", it->timeout);
                lose(it, why, &ls);
            }
            if (*it->lost && !it->stuck_logged && now - it->lost_at >= STUCK_AFTER_S) {
                /* Not in Lua (a hung io.popen, a C call): the hook cannot
                 * reach it. Its lock is free; the slot stays busy until it
                 * returns. */
                it->stuck_logged = 1;
                char slot[16];
                snprintf(slot, sizeof slot, "%d", it->slot);
                log_kv(LOG_ERROR, "slot stuck: its body does not stop after its lock was taken away "
                                  "(outside Lua?); the lock is free, the slot stays busy",
                       "process", it->process, "slot", slot, "machine", it->machine, "reason", it->lost,
                       NULL);
            }
        }
        pthread_mutex_unlock(&items_mu);
        interrupt_all(&ls);
    } while (ls.n == LOSE_BATCH);
}

/* ---- what a body asks --------------------------------------------------- */

int items_token_lost(const char *token, char *why, size_t whylen) {
    int lost = 0;
    pthread_mutex_lock(&items_mu);
    for (item *it = items; it; it = it->next) {
        if (strcmp(it->token, token) == 0 && *it->lost) {
            lost = 1;
            if (why) snprintf(why, whylen, "%s", it->lost);
        }
    }
    pthread_mutex_unlock(&items_mu);
    return lost;
}

/* The items of state that are lost (those not told yet, when untold_only),
 * why naming the last found; each found is marked told when mark_told.
 * Caller holds items_mu. */
static int state_lost(const void *state, int untold_only, int mark_told, char *why, size_t whylen) {
    LOCK_HELD(&items_mu);
    int lost = 0;
    for (item *it = items; it; it = it->next) {
        if (it->state != state || !*it->lost || (untold_only && it->told)) continue;
        lost = 1;
        if (mark_told) it->told = 1;
        if (why && *it->machine)
            snprintf(why, whylen, "lost: the lock on %s %s was taken away: %s", it->machine, it->process, it->lost);
        else if (why)
            snprintf(why, whylen, "lost: the hold on loop %s was taken away: %s", it->process, it->lost);
    }
    return lost;
}

int items_state_lost(const void *state, char *why, size_t whylen) {
    pthread_mutex_lock(&items_mu);
    int lost = state_lost(state, 0, 0, why, whylen);
    pthread_mutex_unlock(&items_mu);
    return lost;
}

int items_take_interrupt(const void *state, char *why, size_t whylen) {
    pthread_mutex_lock(&items_mu);
    int lost = state_lost(state, 1, 1, why, whylen);
    pthread_mutex_unlock(&items_mu);
    return lost;
}

void items_interrupt_seen(const void *state) {
    pthread_mutex_lock(&items_mu);
    state_lost(state, 0, 1, NULL, 0);
    pthread_mutex_unlock(&items_mu);
}

double items_state_deadline(const void *state) {
    double d = 0;
    pthread_mutex_lock(&items_mu);
    for (item *it = items; it; it = it->next)
        if (it->state == state && it->deadline > 0 && (d == 0 || it->deadline < d)) d = it->deadline;
    pthread_mutex_unlock(&items_mu);
    return d;
}

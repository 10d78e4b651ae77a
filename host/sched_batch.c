/* sched_batch.c -- the scheduler's batch: several slots' finishes in one
 * transaction (sched.h). It keeps the scheduler's invariants 6 to 10
 * (docs/internals.md, "The scheduler's invariants").
 *
 * Why: a finish alone is a transaction of its own: BEGIN, the fence, the
 * commit function's statements, the release and COMMIT. With several
 * slots busy, most of that work is per transaction, not per item. Slots
 * that finish at the same moment (a claim hands several of them an item
 * at once, so they do) share one transaction instead.
 *
 * Concurrency: one batch is open at a time. Its members run their commit
 * functions at the same time, each on its own thread; what they defer
 * waits in their own detached tx, so members that only defer never wait
 * for one another (each wait would be a thread wake-up per member in a
 * row). The batch's transaction is used by one thread at a time (B.user,
 * under mu): the opener while it borrows the connection, a member that
 * sends a statement (from sched_batch_use to its leave), a member moving
 * its deferred statements in, and at the end the closer. The last member
 * to leave closes the batch (no new member joins from then on) and
 * commits it, after waiting for late joiners (linger), so a batch never
 * waits long for a member that may not come. A closer that claims in the
 * batch hands out what it locked and lets the claim turn go before it
 * wakes anyone (hand_out, close_batch), so each member wakes once, under
 * its own lock, with its next item. Every member is a finish between
 * sched_finish_enter and sched_finish_leave, so a claim of this host
 * never overlaps the batch (sched.c says why). */
#include "sched.h"

#include <errno.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "lifecycle.h"
#include "lockcheck.h"
#include "work.h"

/* One savepoint name serves every member: each releases (or rolls back
 * to) its own before the next member opens one. */
static const char savepoint_sql[] = "SAVEPOINT bmdb_item";
static const char release_sql[] = "RELEASE SAVEPOINT bmdb_item";
static const char rollback_sql[] = "ROLLBACK TO SAVEPOINT bmdb_item";

/* How long the last member to leave waits, at most, for a finish that may
 * be about to join (linger). A commit function that only defers its
 * statements takes a few microseconds, less than a slot handed an item by
 * the same claim needs to run its body and join, so without the wait
 * such batches would close with one or two members. */
#define BATCH_LINGER_S 0.001
/* The wait, per slot still to come, while items claimed ahead wait in the
 * host: the batch then most likely only commits releases, its members'
 * next items are already claimed, and a late joiner saves a COMMIT, not
 * a claim. Per slot, since the slots still to come run their bodies on
 * the same cores: a flat wait closes big batches before most members
 * came, and those finish alone. */
#define BATCH_LINGER_AHEAD_S 0.0002

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t grew;    /* the last member left: a lingering closer looks again */
static pthread_cond_t free_cv; /* nobody uses B.t: a member waiting for it goes on */
static pthread_once_t conds_once = PTHREAD_ONCE_INIT;
static void conds_init(void) {
    mono_cond_init(&grew);
    pthread_cond_init(&free_cv, NULL);
}
static unsigned long committed_batches, committed_finishes; /* under mu */

static struct {
    /* Under mu. Once the batch is closing (linger_locked has returned: it
     * takes no new member and every member has left it), the closer reads
     * them without mu: every write before was made under mu, which the
     * closer has taken since, and nobody but the closer writes them any
     * more; its own writes still take mu, since sched_batch_join and
     * sched_batch_members read open, accepting and the counts under it. */
    int open, accepting;
    session *sess;
    int members;         /* joined */
    int active;          /* joined and not yet left */
    int lingering;       /* the last to leave waits for late joiners; it closes */
    sched_member *user;  /* the one thread that may use t, or NULL */
    int failed;          /* the batch commits nothing; err says why */
    tx_error err;
    sched_member *member[SCHED_BATCH_MAX];
    int queued;          /* releases queued, members' tickets in released[] */
    int released[SCHED_BATCH_MAX];
    sched_item done[SCHED_BATCH_MAX]; /* the items released (machine, process, token) */
    /* only the user of t: */
    tx t;
    int release_set;     /* the releases are the transaction's final statement */
    char machines[SCHED_BATCH_MAX * 38 + 3], processes[SCHED_BATCH_MAX * 65 + 3],
        tokens[SCHED_BATCH_MAX * 38 + 3];
} B;

/* Caller holds mu. Invariant 9. */
static void fail_locked(const tx_error *e) {
    LOCK_HELD(&mu);
    if (B.failed) return;
    B.failed = 1;
    B.err = *e;
    pthread_cond_broadcast(&free_cv); /* whoever waits to use t learns it */
}

static void fail(const tx_error *e) {
    pthread_mutex_lock(&mu);
    fail_locked(e);
    pthread_mutex_unlock(&mu);
}

/* Invariant 6 (docs/internals.md). */
sched_outcome sched_batch_join(pool *p, session *sess, sched_member *m, tx **out) {
    int opener = 0;
    pthread_once(&conds_once, conds_init);
    pthread_mutex_lock(&mu);
    if (B.open && (!B.accepting || B.sess != sess || B.members == SCHED_BATCH_MAX)) {
        pthread_mutex_unlock(&mu);
        return SCHED_ALONE;
    }
    memset(m, 0, offsetof(sched_member, wake_ready));
    if (!m->wake_ready) {
        pthread_mutex_init(&m->wake_mu, NULL);
        pthread_cond_init(&m->wake_cv, NULL);
        m->wake_ready = 1;
    }
    if (B.open && B.failed) {
        m->err = B.err;
        pthread_mutex_unlock(&mu);
        return SCHED_FAILED;
    }
    if (!B.open) {
        opener = 1;
        B.open = B.accepting = 1;
        B.sess = sess;
        B.members = B.active = B.lingering = B.failed = B.queued = B.release_set = 0;
        B.user = m; /* while it borrows the connection */
    }
    m->ticket = B.members++;
    m->state = SCHED_JOINED;
    B.active++;
    B.member[m->ticket] = m;
    pthread_mutex_unlock(&mu);

    if (opener) {
        /* The batch's reference to its session, taken outside mu (session.c
         * takes its own lock): the batch cannot end before the opener has
         * left it, so nobody lets it go before this. */
        session_ref(sess);
        /* BEGIN and the fence ride with the first statement, or with
         * COMMIT: this only borrows a connection. */
        tx_error e;
        int rc = tx_begin(&B.t, p, sess, &e);
        pthread_mutex_lock(&mu);
        if (rc < 0) fail_locked(&e);
        B.user = NULL;
        pthread_cond_broadcast(&free_cv);
        pthread_mutex_unlock(&mu);
    }
    tx_init_detached(&m->own, sess);
    *out = &m->own;
    return SCHED_JOINED;
}

/* Waits until nobody uses B.t, and makes m its user: 0, or -1 when the
 * batch failed (m->err says why). Invariant 7. */
static int take_t(sched_member *m) {
    pthread_mutex_lock(&mu);
    while (B.user && !B.failed) pthread_cond_wait(&free_cv, &mu);
    int failed = B.failed;
    if (failed) m->err = B.err;
    else B.user = m;
    pthread_mutex_unlock(&mu);
    if (failed) return -1;
    m->holds = 1;
    return 0;
}

/* Invariant 7 (docs/internals.md). */
int sched_batch_use(sched_member *m, tx **out, tx_error *e) {
    if (!m->holds) {
        if (take_t(m) < 0) {
            m->saw_failed = 1;
            *e = m->err;
            return -1;
        }
        /* The savepoint rides in front of m's first statement; what m
         * deferred so far goes in behind it, so m's failure undoes it too. */
        m->savepoint = tx_pend(&B.t, savepoint_sql);
        if (tx_adopt(&B.t, &m->own, e) < 0) return -1;
    }
    *out = &B.t;
    return 0;
}

/* A text array literal of one field of the queued releases, at offset in
 * each sched_item (ids and process names, which need no quoting). */
static const char *array_of(char *buf, size_t len, size_t offset) {
    size_t at = 0;
    buf[at++] = '{';
    for (int i = 0; i < B.queued; i++)
        at += (size_t)snprintf(buf + at, len - at, "%s%s", i ? "," : "", (const char *)&B.done[i] + offset);
    snprintf(buf + at, len - at, "}");
    return buf;
}

/* Every queued release as one statement, the transaction's final: it
 * rides with COMMIT, or in front of a claim's select (close_claiming). */
static int set_release(tx_error *e) {
    if (B.release_set) return 0;
    B.release_set = 1;
    /* One item: the single release, whose plan is the cheaper. */
    if (B.queued == 1)
        return work_release(&B.t, B.done[0].machine, B.done[0].process, B.done[0].token, "Finished", NULL, 1, e);
    return work_release_finished(&B.t, array_of(B.machines, sizeof B.machines, offsetof(sched_item, machine)),
                                 array_of(B.processes, sizeof B.processes, offsetof(sched_item, process)),
                                 array_of(B.tokens, sizeof B.tokens, offsetof(sched_item, token)), B.queued, e);
}

/* What the closer's claim locked, past the closer's own first item, goes
 * to the members of its process that take a next item, before they wake
 * (each then runs it at once, where it would have woken to find the claim
 * turn still taken, waited again, and taken it from the claim queue), and
 * then to the slots that wait to claim (sched_claim_hand). What did not
 * fit there stays in c, after the closer's (the closer lets it go).
 * Returns how many it handed. Invariant 10. */
static int hand_out(const sched_member *closer, sched_claim *c) {
    if (c->n <= 1) return 0;
    const char *process = B.done[closer->queued_at].process;
    int next = 1, kept = 1;
    for (int i = 0; i < B.queued && next < c->n; i++) {
        sched_member *mm = B.member[B.released[i]];
        if (mm == closer || !mm->takes_next || strcmp(B.done[i].process, process)) continue;
        mm->next = c->item[next++];
        mm->has_next = 1;
    }
    int handed = next - 1;
    sched_note_handed(handed);
    for (; next < c->n; next++) {
        if (sched_claim_hand(&c->item[next])) handed++;
        else c->item[kept++] = c->item[next];
    }
    c->n = kept;
    return handed;
}

/* The closer's part: the releases and COMMIT in one flight (or, with
 * claim, the claim's lock and COMMIT: then what it locked is handed out,
 * and what is left stays in claim), or a rollback when there is nothing
 * to commit; then the claim turn, if the closer holds it (claim), is let
 * go, and every member waiting learns the outcome. Invariants 9, 10. */
static void close_batch(sched_member *closer, sched_claim *claim) {
    tx_error e;
    int rc = -1;
    int claimed = claim && claim->sent;
    if (claim) claim->n = claim->handed = 0;
    if (B.failed) {
        tx_rollback(&B.t);
    } else if (B.queued == 0) {
        tx_rollback(&B.t);
        rc = 0;
    } else if (lifecycle_state() >= HOST_CANCELLING) {
        tx_rollback(&B.t);
        tx_error_set(&e, TXE_CANCELED, "canceled: the host is shutting down");
    } else if (set_release(&e) < 0) {
        tx_rollback(&B.t);
    } else {
        rc = tx_commit(&B.t, &e);
        work_locked out;
        for (int i = 0; rc == 0 && claimed && i < SCHED_BATCH_MAX; i++) {
            sched_item *it = &claim->item[i];
            if (!work_locked_any(&B.t, i, it->machine, sizeof it->machine, &out)) break;
            it->attempt = out.attempt;
            it->started = claim->started;
            snprintf(it->token, sizeof it->token, "%s", out.token);
            snprintf(it->process, sizeof it->process, "%s", B.done[closer->queued_at].process);
            snprintf(it->session_id, sizeof it->session_id, "%s", session_id(B.sess));
            claim->n++;
        }
        tx_rollback(&B.t); /* frees what tx_commit kept (the final's answer) */
        if (rc == 0 && claimed) claim->handed = hand_out(closer, claim);
    }
    /* The claim's transaction is over: finishes may start (the members
     * about to wake, among them) before the closer's Lua is done. */
    if (claim) sched_claim_leave();
    pthread_mutex_lock(&mu);
    if (rc < 0) fail_locked(&e);
    if (!B.failed && B.queued > 0) {
        committed_batches++;
        committed_finishes += (unsigned long)B.queued;
    }
    for (int i = 0; i < B.queued; i++) B.member[B.released[i]]->state = B.failed ? SCHED_FAILED : SCHED_COMMITTED;
    sched_member *waiting[SCHED_BATCH_MAX];
    int nwaiting = 0;
    for (int i = 0; i < B.members; i++) {
        sched_member *mm = B.member[i];
        if (!mm) continue; /* left without waiting */
        if (B.failed) mm->err = B.err; /* the closer's too: it answers FAILED with it */
        if (mm != closer) waiting[nwaiting++] = mm;
    }
    session *sess = B.sess;
    B.sess = NULL;
    B.user = NULL;
    B.open = 0;
    pthread_mutex_unlock(&mu);
    session_unref(sess); /* outside mu: session.c takes its own lock */
    /* Each waits on its own lock (its record lives as long as its slot
     * thread): woken after mu is let go, it does not wake only to wait
     * for mu again, one context switch more per member. */
    for (int i = 0; i < nwaiting; i++) {
        pthread_mutex_lock(&waiting[i]->wake_mu);
        waiting[i]->done = 1;
        pthread_cond_signal(&waiting[i]->wake_cv);
        pthread_mutex_unlock(&waiting[i]->wake_mu);
    }
}

/* Caller holds mu; the last member to leave: waits for members that join
 * meanwhile to leave too, and, while more slots hold an item than the
 * batch has members (one of them may be about to finish and join), for
 * BATCH_LINGER_S at most (BATCH_LINGER_AHEAD_S per slot still to come,
 * when items claimed ahead wait). Then the batch takes no new member. */
/* Invariants 6, 8 (docs/internals.md). */
static void linger_locked(void) {
    LOCK_HELD(&mu);
    int missing = sched_items_held() - B.members;
    double linger = BATCH_LINGER_S;
    if (sched_items_ahead() > 0 && missing > 0 && missing * BATCH_LINGER_AHEAD_S < linger)
        linger = missing * BATCH_LINGER_AHEAD_S;
    struct timespec until = time_after(CLOCK_MONOTONIC, linger);
    B.lingering = 1;
    for (int late = 0;;) {
        if (B.active > 0) {
            pthread_cond_wait(&grew, &mu);
            continue;
        }
        if (late || B.failed || B.members == SCHED_BATCH_MAX || sched_items_held() <= B.members) break;
        if (pthread_cond_timedwait(&grew, &mu, &until) == ETIMEDOUT) {
            late = 1;
            B.accepting = 0;
        }
    }
    B.accepting = 0;
    B.lingering = 0;
}

/* Whether the closer (ending an item of process) claims in the batch's
 * transaction: nothing failed, and the batch's members (inside of them
 * wait for its outcome) are the host's only finishes in flight
 * (sched_claim_alongside, which then gives it the claim turn). Its
 * releases become the final statement, to ride in front of the claim's
 * select. peers: the closer and the members of its process that take a
 * next item (the claim is for them, and hands them theirs). Invariant 10. */
static int close_claiming(const sched_member *closer, const char *process, int inside, int *peers) {
    if (!sched_claim_alongside(inside)) return 0;
    *peers = 1; /* the closer, then the members that take a next item */
    for (int i = 0; i < B.queued; i++) {
        const sched_member *mm = B.member[B.released[i]];
        *peers += mm != closer && mm->takes_next && !strcmp(B.done[i].process, process);
    }
    tx_error e;
    if (set_release(&e) == 0) return 1;
    sched_claim_leave();
    fail(&e);
    return 0;
}

/* What m, whose release was queued and which waited for the batch's end
 * (or closed it), learns: COMMITTED, noting as the calling slot's item
 * the next one the closer's claim handed it (none: its item is released),
 * or FAILED. */
static sched_outcome ended(sched_member *m) {
    if (m->state != SCHED_COMMITTED) return SCHED_FAILED;
    sched_note_item(m->has_next ? m->next.machine : NULL);
    if (m->has_next) sched_note_handed(-1); /* taken */
    return SCHED_COMMITTED;
}

/* Invariant 7 (docs/internals.md). */
sched_outcome sched_batch_leave(sched_member *m, const sched_leave *leave, int *peers) {
    tx_error e;
    int ok = leave->how == SCHED_LEAVE_FINISHED;
    int whole = m->saw_failed; /* the batch failed under m: not m's own failure */
    int doomed = m->holds && tx_doomed(&B.t); /* (only a holder may look at B.t) */
    if (doomed || leave->how == SCHED_LEAVE_FATAL) {
        /* the fence failed, or a failure the transaction may not survive:
         * a doom may be another member's deferred statement */
        pthread_mutex_lock(&mu);
        if (doomed) fail_locked(tx_doom(&B.t));
        tx_error_set(&e, TXE_SQL, "a finish in the same batch failed");
        fail_locked(&e);
        pthread_mutex_unlock(&mu);
        whole = 1;
    } else if (m->holds) {
        /* Settle m's savepoint. It went out with m's first statement; when
         * none was sent it is still queued, and taken back: nothing of m's
         * reached the server. What m deferred rides after it; kept when ok
         * (if it fails, it fails the batch), dropped when not. */
        if (ok) {
            if (!tx_unpend(&B.t, m->savepoint, 0)) tx_pend(&B.t, release_sql);
        } else if (!tx_unpend(&B.t, m->savepoint, 1)) {
            /* Only m's own statements are undone: what it deferred since
             * its last flight is dropped, and the server leaves the aborted
             * state a failed one put it in. */
            tx_unpend_all(&B.t);
            tx_pend(&B.t, rollback_sql);
            tx_pend(&B.t, release_sql);
            tx_failure_undone(&B.t);
        }
    } else if (ok && m->own.npending > 0) {
        /* m's deferred statements join the batch's queue (moved; run
         * only when the queue is full, and then, outside any savepoint, a
         * failure is the batch's). */
        if (take_t(m) < 0) {
            whole = 1;
        } else if (tx_adopt(&B.t, &m->own, &e) < 0) {
            fail(tx_doomed(&B.t) ? tx_doom(&B.t) : &e);
            whole = 1;
        }
    }
    tx_rollback(&m->own); /* what it still queues: nothing, or dropped */

    pthread_mutex_lock(&mu);
    if (m->holds) {
        m->holds = 0;
        B.user = NULL;
        pthread_cond_broadcast(&free_cv);
    }
    m->takes_next = leave->takes_next;
    if (ok && !B.failed) {
        int i = m->queued_at = B.queued++;
        B.released[i] = m->ticket;
        B.done[i] = *leave->done;
    }
    if (!ok) {
        /* m does not wait for the outcome: its record may be gone before
         * the batch ends. */
        B.member[m->ticket] = NULL;
        if (B.failed && whole) m->err = B.err;
        m->state = whole ? SCHED_FAILED : SCHED_UNDONE;
    }
    if (--B.active > 0 || B.lingering) {
        /* a member still in it, or the lingering one, closes the batch;
         * the lingering one waits for the last member to leave */
        int last = B.active == 0;
        pthread_mutex_unlock(&mu);
        if (last) pthread_cond_signal(&grew);
        if (!ok) return m->state;
        pthread_mutex_lock(&m->wake_mu);
        while (!m->done) pthread_cond_wait(&m->wake_cv, &m->wake_mu);
        pthread_mutex_unlock(&m->wake_mu);
        return ended(m);
    }
    linger_locked();
    int inside = 0, failed = B.failed;
    for (int i = 0; i < B.members; i++) inside += B.member[i] != NULL;
    B.user = m;
    pthread_mutex_unlock(&mu);
    if (ok && leave->may_claim && !failed && close_claiming(m, leave->done->process, inside, peers)) {
        m->holds = 1;
        return m->state = SCHED_CLAIMING;
    }
    close_batch(m, NULL);
    if (!ok) return m->state;
    return ended(m);
}

sched_outcome sched_batch_close(sched_member *m, sched_claim *c) {
    close_batch(m, c);
    if (m->state != SCHED_COMMITTED) return SCHED_FAILED;
    sched_note_item(c->n > 0 ? c->item[0].machine : NULL);
    return SCHED_COMMITTED;
}

int sched_batch_members(int *active) {
    pthread_mutex_lock(&mu);
    int n = B.open ? B.members : 0;
    if (active) *active = B.open ? B.active : 0;
    pthread_mutex_unlock(&mu);
    return n;
}

void sched_batch_counts(unsigned long *batches, unsigned long *finishes) {
    pthread_mutex_lock(&mu);
    *batches = committed_batches;
    *finishes = committed_finishes;
    pthread_mutex_unlock(&mu);
}

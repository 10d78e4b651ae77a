/* batch.c -- several slots' finishes in one transaction (batch.h).
 *
 * Why: a finish alone is a transaction of its own: BEGIN, the fence, the
 * commit function's statements, the release and COMMIT. At 4 or 16 slots
 * both cores are busy, and most of that work is per transaction, not per
 * item. Slots that finish at the same moment (a claim hands several of
 * them an item at once, so they do) share one transaction instead.
 *
 * Concurrency: one batch is open at a time. Its members run their commit
 * functions at the same time, each on its own thread; what they defer
 * waits in their own detached tx. The batch's transaction is used by one
 * thread at a time (B.user, under mu): the opener while it borrows the
 * connection, a member that sends a statement (from batch_use to its
 * leave), a member moving its deferred statements in, and at the end the
 * closer. A member that waited its turn for every commit function (as
 * the first version here did) cost a thread wake-up per member in a row,
 * a third of a batch's time at 16 slots when they only defer. The last
 * member to leave closes the batch (no new member joins from then on)
 * and commits it, after waiting for late joiners (linger), so a batch
 * never waits long for a member that may not come. A closer that claims
 * in the batch hands out what it locked and lets the claim turn go
 * before it wakes anyone (hand_out, close_batch), so each member wakes
 * once, under its own lock, with its next item. Every member is a
 * finish between slot_finish_enter and slot_finish_leave, so a claim of
 * this host never overlaps the batch (slots.c says why). */
#include "batch.h"

#include <errno.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "lifecycle.h"
#include "slots.h"
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
 * such batches closed with one or two members. */
#define BATCH_LINGER_S 0.001
/* The wait, per slot still to come, while items claimed ahead wait in the
 * host: the batch then most likely only commits releases, its members'
 * next items are already claimed, and a late joiner saves a COMMIT, not
 * a claim. Per slot, since the slots still to come run their bodies on
 * the same two cores: a flat 0.2 ms gained 4-7% at 4 slots, but at 16
 * closed batches before most members came, and those finished alone
 * (67% of finishes batched against 98%, and fewer items a second). */
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
    /* under mu: */
    int open, accepting;
    session *sess;
    int members;         /* joined */
    int active;          /* joined and not yet left */
    int lingering;       /* the last to leave waits for late joiners; it closes */
    batch_member *user;  /* the one thread that may use t, or NULL */
    int failed;          /* the batch commits nothing; err says why */
    tx_error err;
    batch_member *member[BATCH_MAX];
    int queued;          /* releases queued, members' tickets in released[] */
    int released[BATCH_MAX];
    char machine[BATCH_MAX][40], process[BATCH_MAX][64], token[BATCH_MAX][40];
    /* only the user of t: */
    tx t;
    int release_set;     /* the releases are the transaction's final statement */
    char machines[BATCH_MAX * 38 + 3], processes[BATCH_MAX * 65 + 3], tokens[BATCH_MAX * 38 + 3];
} B;

static void fail_locked(const tx_error *e) {
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

int batch_join(pool *p, session *sess, batch_member *m, tx **out) {
    int opener = 0;
    pthread_once(&conds_once, conds_init);
    pthread_mutex_lock(&mu);
    if (B.open && (!B.accepting || B.sess != sess || B.members == BATCH_MAX)) {
        pthread_mutex_unlock(&mu);
        return BATCH_ALONE;
    }
    memset(m, 0, offsetof(batch_member, wake_ready));
    if (!m->wake_ready) {
        pthread_mutex_init(&m->wake_mu, NULL);
        pthread_cond_init(&m->wake_cv, NULL);
        m->wake_ready = 1;
    }
    if (B.open && B.failed) {
        m->err = B.err;
        pthread_mutex_unlock(&mu);
        return BATCH_FAILED;
    }
    if (!B.open) {
        opener = 1;
        B.open = B.accepting = 1;
        B.sess = sess;
        session_ref(sess);
        B.members = B.active = B.lingering = B.failed = B.queued = B.release_set = 0;
        B.user = m; /* while it borrows the connection */
    }
    m->ticket = B.members++;
    B.active++;
    B.member[m->ticket] = m;
    pthread_mutex_unlock(&mu);

    if (opener) {
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
    return BATCH_JOINED;
}

/* Waits until nobody uses B.t, and makes m its user: 0, or -1 when the
 * batch failed (m->err says why). */
static int take_t(batch_member *m) {
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

int batch_use(batch_member *m, tx **out, tx_error *e) {
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

/* A text array literal of one field of the queued releases: first is
 * the field of the first, each next stride bytes further (ids and process
 * names, which need no quoting). */
static const char *array_of(char *buf, size_t len, const char *first, size_t stride) {
    size_t at = 0;
    buf[at++] = '{';
    for (int i = 0; i < B.queued; i++)
        at += (size_t)snprintf(buf + at, len - at, "%s%s", i ? "," : "", first + (size_t)i * stride);
    snprintf(buf + at, len - at, "}");
    return buf;
}

/* Every queued release as one statement, the transaction's final: it
 * rides with COMMIT, or in front of a claim's select (batch_leave). */
static int set_release(tx_error *e) {
    if (B.release_set) return 0;
    B.release_set = 1;
    /* One item: the single release, whose plan is the cheaper (about 60
     * against 110 µs a call, pg_stat_statements at one slot). */
    if (B.queued == 1)
        return work_release(&B.t, B.machine[0], B.process[0], B.token[0], "Finished", NULL, 1, e);
    return work_release_finished(
        &B.t, array_of(B.machines, sizeof B.machines, B.machine[0], sizeof B.machine[0]),
        array_of(B.processes, sizeof B.processes, B.process[0], sizeof B.process[0]),
        array_of(B.tokens, sizeof B.tokens, B.token[0], sizeof B.token[0]), B.queued, e);
}

/* The closer's part: the releases and COMMIT in one flight (or the claim's
 * lock and COMMIT, when claim_sent: then what it locked is handed out, and
 * what is left goes to claimed), or a rollback when there is nothing to
 * commit; then the claim turn, if the closer holds it, is let go, and
 * every member waiting learns the outcome. */
static int hand_out(const batch_member *closer, slot_handed *claimed, int *nclaimed);
static void close_batch(const batch_member *closer, int claim_turn, int claim_sent, double started,
                        slot_handed *claimed, int max, int *nclaimed, int *handed) {
    tx_error e;
    int rc = -1;
    if (nclaimed) *nclaimed = 0;
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
        for (int i = 0; rc == 0 && claim_sent && i < max; i++) {
            if (!work_locked_any(&B.t, i, claimed[i].machine, sizeof claimed[i].machine, &out)) break;
            claimed[i].attempt = out.attempt;
            claimed[i].started = started;
            snprintf(claimed[i].token, sizeof claimed[i].token, "%s", out.token);
            snprintf(claimed[i].session, sizeof claimed[i].session, "%s", session_id(B.sess));
            ++*nclaimed;
        }
        tx_rollback(&B.t); /* frees what tx_commit kept (the final's answer) */
        if (rc == 0 && claim_sent) *handed = hand_out(closer, claimed, nclaimed);
    }
    /* The claim's transaction is over: finishes may start (the members
     * about to wake, among them) before the closer's Lua is done. */
    if (claim_turn) slot_claim_leave();
    pthread_mutex_lock(&mu);
    if (rc < 0) fail_locked(&e);
    if (!B.failed && B.queued > 0) {
        committed_batches++;
        committed_finishes += (unsigned long)B.queued;
    }
    for (int i = 0; i < B.queued; i++) B.member[B.released[i]]->committed = !B.failed;
    batch_member *waiting[BATCH_MAX];
    int nwaiting = 0;
    for (int i = 0; i < B.members; i++) {
        batch_member *mm = B.member[i];
        if (!mm || mm == closer) continue; /* left without waiting, or closing */
        if (B.failed) mm->err = B.err;
        waiting[nwaiting++] = mm;
    }
    session_unref(B.sess);
    B.sess = NULL;
    B.user = NULL;
    B.open = 0;
    pthread_mutex_unlock(&mu);
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

static int close_claiming(const batch_member *closer, const char *process, int inside, int *peers);

/* Under mu, by the last member to leave: waits for members that join
 * meanwhile to leave too, and, while more slots hold an item than the
 * batch has members (one of them may be about to finish and join), for
 * BATCH_LINGER_S at most (BATCH_LINGER_AHEAD_S per slot still to come,
 * when items claimed ahead wait). Then the batch takes no new member. */
static void linger_locked(void) {
    int missing = slot_items_held() - B.members;
    double linger = BATCH_LINGER_S;
    if (slot_items_ahead() > 0 && missing > 0 && missing * BATCH_LINGER_AHEAD_S < linger)
        linger = missing * BATCH_LINGER_AHEAD_S;
    struct timespec until = time_after(CLOCK_MONOTONIC, linger);
    B.lingering = 1;
    for (int late = 0;;) {
        if (B.active > 0) {
            pthread_cond_wait(&grew, &mu);
            continue;
        }
        if (late || B.failed || B.members == BATCH_MAX || slot_items_held() <= B.members) break;
        if (pthread_cond_timedwait(&grew, &mu, &until) == ETIMEDOUT) {
            late = 1;
            B.accepting = 0;
        }
    }
    B.accepting = 0;
    B.lingering = 0;
}

int batch_leave(batch_member *m, int ok, int fatal, const char *machine, const char *process,
                const char *token, int takes_next, int may_claim, int *peers) {
    tx_error e;
    int whole = m->saw_failed; /* the batch failed under m: not m's own failure */
    int doomed = m->holds && tx_doomed(&B.t); /* (only a holder may look at B.t) */
    if (doomed || fatal) {
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
    m->takes_next = takes_next;
    if (ok && !B.failed) {
        int i = m->queued_at = B.queued++;
        B.released[i] = m->ticket;
        snprintf(B.machine[i], sizeof B.machine[i], "%s", machine);
        snprintf(B.process[i], sizeof B.process[i], "%s", process);
        snprintf(B.token[i], sizeof B.token[i], "%s", token);
    }
    if (!ok) {
        /* m does not wait for the outcome: its record may be gone before
         * the batch ends. */
        B.member[m->ticket] = NULL;
        if (B.failed && whole) m->err = B.err;
    }
    if (--B.active > 0 || B.lingering) {
        /* a member still in it, or the lingering one, closes the batch;
         * the lingering one waits for the last member to leave */
        int last = B.active == 0;
        pthread_mutex_unlock(&mu);
        if (last) pthread_cond_signal(&grew);
        if (ok) {
            pthread_mutex_lock(&m->wake_mu);
            while (!m->done) pthread_cond_wait(&m->wake_cv, &m->wake_mu);
            pthread_mutex_unlock(&m->wake_mu);
        }
        return ok ? (m->committed ? 1 : BATCH_FAILED) : (whole ? BATCH_FAILED : 0);
    }
    linger_locked();
    int inside = 0, failed = B.failed;
    for (int i = 0; i < B.members; i++) inside += B.member[i] != NULL;
    B.user = m;
    pthread_mutex_unlock(&mu);
    if (ok && may_claim && !failed && close_claiming(m, process, inside, peers)) {
        m->holds = 1;
        return BATCH_CLAIM;
    }
    close_batch(m, 0, 0, 0, NULL, 0, NULL, NULL);
    if (!ok) return whole ? BATCH_FAILED : 0;
    return m->committed ? 1 : BATCH_FAILED;
}

/* What the closer's claim locked, past the closer's own first item, goes
 * to the members of its process that take a next item, before they wake
 * (each then runs it at once, where it would have woken to find the claim
 * turn still taken, waited again, and taken it from the claim queue), and
 * then to the slots that wait to claim (slot_claim_hand). What did not
 * fit there stays in claimed, after the closer's (the closer lets it go).
 * Returns how many it handed. */
static int hand_out(const batch_member *closer, slot_handed *claimed, int *nclaimed) {
    if (*nclaimed <= 1) return 0;
    const char *process = B.process[closer->queued_at];
    int next = 1, kept = 1;
    for (int i = 0; i < B.queued && next < *nclaimed; i++) {
        batch_member *mm = B.member[B.released[i]];
        if (mm == closer || !mm->takes_next || strcmp(B.process[i], process)) continue;
        mm->next = claimed[next++];
        mm->has_next = 1;
    }
    int handed = next - 1;
    slot_note_handed(handed);
    for (; next < *nclaimed; next++) {
        if (slot_claim_hand(process, &claimed[next])) handed++;
        else claimed[kept++] = claimed[next];
    }
    *nclaimed = kept;
    return handed;
}

/* Whether the closer (ending an item of process) claims in the batch's
 * transaction: nothing failed, and the batch's members (inside of them
 * wait for its outcome) are the host's only finishes in flight
 * (slot_claim_alongside, which then gives it the claim turn). Its
 * releases become the final statement, to ride in front of the claim's
 * select. peers: the closer and the members of its process that take a
 * next item (the claim is for them, and hands them theirs). */
static int close_claiming(const batch_member *closer, const char *process, int inside, int *peers) {
    if (!slot_claim_alongside(inside)) return 0;
    *peers = 1; /* the closer, then the members that take a next item */
    for (int i = 0; i < B.queued; i++) {
        const batch_member *mm = B.member[B.released[i]];
        *peers += mm != closer && mm->takes_next && !strcmp(B.process[i], process);
    }
    tx_error e;
    if (set_release(&e) == 0) return 1;
    slot_claim_leave();
    fail(&e);
    return 0;
}

int batch_close(batch_member *m, int claim_sent, double started, slot_handed *claimed, int max,
                int *nclaimed, int *handed) {
    *handed = 0;
    close_batch(m, 1, claim_sent, started, claimed, max, nclaimed, handed);
    return m->committed;
}

int batch_members(int *active) {
    pthread_mutex_lock(&mu);
    int n = B.open ? B.members : 0;
    if (active) *active = B.open ? B.active : 0;
    pthread_mutex_unlock(&mu);
    return n;
}

void batch_counts(unsigned long *batches, unsigned long *finishes) {
    pthread_mutex_lock(&mu);
    *batches = committed_batches;
    *finishes = committed_finishes;
    pthread_mutex_unlock(&mu);
}

/* batch.c -- several slots' finishes in one transaction (batch.h).
 *
 * Why: a finish alone is a transaction of its own: BEGIN, the fence, the
 * commit function's statements, the release and COMMIT. At 4 or 16 slots
 * both cores are busy, and most of that work is per transaction, not per
 * item. Slots that finish at the same moment (a claim hands several of
 * them an item at once, so they do) share one transaction instead.
 *
 * Concurrency: one batch is open at a time, and its transaction is used
 * by one thread at a time, the member whose turn it is. Turns go by
 * ticket, in the order members joined, under mu. A member whose turn ends
 * with nobody waiting closes the batch (no new member joins from then on)
 * and commits it, so a batch never waits long for a member that may not
 * come: it grows while the members already in it take their turns, and
 * for at most BATCH_LINGER_S more while other slots hold items. Every
 * member is a finish between slot_finish_enter and slot_finish_leave, so
 * a claim of this host never overlaps the batch (slots.c says why). */
#include "batch.h"

#include <errno.h>
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

/* How long the last member's turn waits, at most, for a finish that may
 * be about to join (batch_leave). A batch grows while its members take
 * turns; a member whose commit function only defers its statements takes
 * a few microseconds, less than a slot handed an item by the same claim
 * needs to run its body and join, so without the wait such batches closed
 * with one or two members. */
#define BATCH_LINGER_S 0.001

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t grew;    /* a member joined: a lingering last turn goes on */
static pthread_once_t grew_once = PTHREAD_ONCE_INIT;
static void grew_init(void) { mono_cond_init(&grew); }
static unsigned long committed_batches, committed_finishes; /* under mu */

static struct {
    /* under mu: */
    int open, accepting;
    session *sess;
    int members, turn;
    int failed;        /* the batch commits nothing; err says why */
    tx_error err;
    batch_member *member[BATCH_MAX];
    /* only the member whose turn it is: */
    tx t;
    int queued;        /* releases queued, members' tickets in released[] */
    int release_set;   /* they are the transaction's final statement */
    int released[BATCH_MAX];
    char machine[BATCH_MAX][40], process[BATCH_MAX][64], token[BATCH_MAX][40];
    char machines[BATCH_MAX * 38 + 3], processes[BATCH_MAX * 65 + 3], tokens[BATCH_MAX * 38 + 3];
} B;

static void fail_locked(const tx_error *e) {
    if (B.failed) return;
    B.failed = 1;
    B.err = *e;
}

static void pass_turn(batch_member *m, int stays);
static int set_release(tx_error *e);

int batch_join(pool *p, session *sess, batch_member *m, tx **out) {
    int opener = 0;
    pthread_once(&grew_once, grew_init);
    pthread_mutex_lock(&mu);
    if (B.open && (!B.accepting || B.sess != sess || B.members == BATCH_MAX)) {
        pthread_mutex_unlock(&mu);
        return BATCH_ALONE;
    }
    if (!B.open) {
        opener = 1;
        B.open = B.accepting = 1;
        B.sess = sess;
        session_ref(sess);
        B.members = B.turn = B.failed = B.queued = B.release_set = 0;
    }
    memset(m, 0, sizeof *m);
    pthread_cond_init(&m->cv, NULL);
    m->ticket = B.members++;
    B.member[m->ticket] = m;
    pthread_cond_signal(&grew);
    pthread_mutex_unlock(&mu);

    if (opener) {
        /* Turn 0 is ours, so nobody else touches B.t meanwhile. BEGIN and
         * the fence ride with the first statement, or with COMMIT. */
        tx_error e;
        if (tx_begin(&B.t, p, sess, &e) < 0) {
            pthread_mutex_lock(&mu);
            fail_locked(&e);
            pthread_mutex_unlock(&mu);
        }
    }
    pthread_mutex_lock(&mu);
    while (B.turn != m->ticket) pthread_cond_wait(&m->cv, &mu);
    int failed = B.failed;
    pthread_mutex_unlock(&mu);
    if (failed) {
        pass_turn(m, 0);
        pthread_cond_destroy(&m->cv);
        return BATCH_FAILED;
    }
    m->savepoint = tx_pend(&B.t, savepoint_sql);
    *out = &B.t;
    return BATCH_TURN;
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
 * lock and COMMIT, when claim_sent: then what it locked goes to claimed),
 * or a rollback when there is nothing to commit; then every member waiting
 * learns the outcome. */
static void close_batch(int claim_sent, slot_handed *claimed, int max, int *nclaimed) {
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
            snprintf(claimed[i].token, sizeof claimed[i].token, "%s", out.token);
            snprintf(claimed[i].session, sizeof claimed[i].session, "%s", session_id(B.sess));
            ++*nclaimed;
        }
        tx_rollback(&B.t); /* frees what tx_commit kept (the final's answer) */
    }
    pthread_mutex_lock(&mu);
    if (rc < 0) fail_locked(&e);
    if (!B.failed && B.queued > 0) {
        committed_batches++;
        committed_finishes += (unsigned long)B.queued;
    }
    for (int i = 0; i < B.queued; i++) B.member[B.released[i]]->committed = !B.failed;
    for (int i = 0; i < B.members; i++) {
        if (!B.member[i]) continue; /* left without waiting */
        B.member[i]->done = 1;
        if (B.failed) B.member[i]->err = B.err;
        pthread_cond_signal(&B.member[i]->cv);
    }
    session_unref(B.sess);
    B.sess = NULL;
    B.open = 0;
    pthread_mutex_unlock(&mu);
}

/* Passes the turn on; the member whose turn was the last closes the
 * batch. A member that does not wait for the outcome (stays) leaves the
 * list first: its record may be gone before the batch ends. */
static void pass_turn(batch_member *m, int stays) {
    pthread_mutex_lock(&mu);
    if (!stays) {
        B.member[m->ticket] = NULL;
        if (B.failed) m->err = B.err;
    }
    int closer = ++B.turn == B.members;
    if (closer) B.accepting = 0;
    else pthread_cond_signal(&B.member[B.turn]->cv);
    pthread_mutex_unlock(&mu);
    if (closer) close_batch(0, NULL, 0, NULL);
}

/* Whether the member ending its turn (one of process) closes the batch
 * and claims in its transaction: it is the last, nothing failed, and the
 * batch's members are the host's only finishes in flight
 * (slot_claim_alongside, which then gives it the claim turn). Its
 * releases become the final statement, to ride in front of the claim's
 * select. peers: how many members ended an item of process, it included
 * (they will claim next). */
static int close_claiming(const char *process, int *peers) {
    pthread_mutex_lock(&mu);
    int last = B.turn + 1 == B.members && !B.failed, inside = 0;
    if (last) {
        B.accepting = 0; /* from here on, a finish goes alone */
        for (int i = 0; i < B.members; i++) inside += B.member[i] != NULL;
    }
    pthread_mutex_unlock(&mu);
    if (!last || !slot_claim_alongside(inside)) return 0;
    *peers = 0;
    for (int i = 0; i < B.queued; i++) *peers += !strcmp(B.process[i], process);
    tx_error e;
    if (set_release(&e) == 0) return 1;
    slot_claim_leave();
    pthread_mutex_lock(&mu);
    fail_locked(&e);
    pthread_mutex_unlock(&mu);
    return 0;
}

/* At the end of the last member's turn (so far): while more slots hold
 * an item than the batch has members, one of them may be about to finish
 * and join; wait for that, BATCH_LINGER_S at most. A joiner takes the
 * next turn, and the batch's end is then its to decide. */
static void linger(void) {
    pthread_mutex_lock(&mu);
    if (!B.failed && B.turn + 1 == B.members && B.members < BATCH_MAX &&
        slot_items_held() > B.members) {
        struct timespec until = time_after(CLOCK_MONOTONIC, BATCH_LINGER_S);
        while (B.turn + 1 == B.members && slot_items_held() > B.members)
            if (pthread_cond_timedwait(&grew, &mu, &until) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&mu);
}

int batch_leave(batch_member *m, int ok, int fatal, const char *machine, const char *process,
                const char *token, int may_claim, int *peers) {
    /* Still our turn: settle our savepoint. It went out with our first
     * statement; when none was sent it is still queued, and taken back:
     * nothing of ours reached the server. What we deferred rides after
     * it; kept when ok (if it fails, it fails the batch), dropped when
     * not. */
    tx_error e;
    if (B.t.doomed || fatal) {
        /* the fence failed, or a failure the transaction may not survive */
        pthread_mutex_lock(&mu);
        if (B.t.doomed) fail_locked(&B.t.doom);
        tx_error_set(&e, TXE_SQL, "a finish in the same batch failed");
        fail_locked(&e);
        pthread_mutex_unlock(&mu);
    } else if (ok) {
        int i = B.queued++;
        B.released[i] = m->ticket;
        snprintf(B.machine[i], sizeof B.machine[i], "%s", machine);
        snprintf(B.process[i], sizeof B.process[i], "%s", process);
        snprintf(B.token[i], sizeof B.token[i], "%s", token);
        if (!tx_unpend(&B.t, m->savepoint, 0)) tx_pend(&B.t, release_sql);
    } else if (!tx_unpend(&B.t, m->savepoint, 1)) {
        /* Only our own statements are undone: what we deferred since our
         * last flight is dropped, and the server leaves the aborted state
         * a failed one put it in. */
        tx_unpend_all(&B.t);
        tx_pend(&B.t, rollback_sql);
        tx_pend(&B.t, release_sql);
        B.t.failed = 0;
    }
    linger();
    if (ok && may_claim && close_claiming(process, peers)) return BATCH_CLAIM;
    pass_turn(m, ok);
    if (ok) {
        pthread_mutex_lock(&mu);
        while (!m->done) pthread_cond_wait(&m->cv, &mu);
        pthread_mutex_unlock(&mu);
    }
    /* Nobody signals m->cv any more: its member has left the list, or
     * the batch ended (under mu, before we woke). */
    pthread_cond_destroy(&m->cv);
    return ok && m->committed;
}

int batch_close(batch_member *m, int claim_sent, slot_handed *claimed, int max, int *nclaimed) {
    close_batch(claim_sent, claimed, max, nclaimed);
    pthread_cond_destroy(&m->cv);
    return m->committed;
}

int batch_members(void) {
    pthread_mutex_lock(&mu);
    int n = B.open ? B.members : 0;
    pthread_mutex_unlock(&mu);
    return n;
}

void batch_counts(unsigned long *batches, unsigned long *finishes) {
    pthread_mutex_lock(&mu);
    *batches = committed_batches;
    *finishes = committed_finishes;
    pthread_mutex_unlock(&mu);
}

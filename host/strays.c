/* strays.c -- finding and releasing work rows of our session that no part
 * of the host holds (strays.h says when that happens, and why only this
 * host can tell).
 *
 * The owned tokens are a small array under a mutex: slots add one per
 * lock they read back and drop it when the item is done, the heartbeat
 * thread compares the array with the database once an interval. Live
 * items number in the tens, so a linear scan is the whole index. A token
 * added for a lock whose transaction then rolled back (or whose item was
 * released without running) never shows up in the database; it is dropped
 * after STALE_PASSES passes without a row, so the array holds live items
 * and a few recent leftovers. If it ever fills up, the host can no longer
 * tell its items from strays and stops looking, which is the old behaviour
 * (a stray then waits for the host's exit), never a wrong release. */
#include "strays.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#define OWNED_MAX 4096
#define SUSPECTS_MAX 64
#define STALE_PASSES 3

typedef struct {
    char token[40];
    int absent; /* passes in a row without a work row */
} owned_token;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static owned_token owned[OWNED_MAX]; /* under mu, as are the two below */
static int nowned, enabled, full;

/* Tokens given back (strays_give_back), under mu: released by the
 * heartbeat's next round (strays_release_given). */
static char given[SUSPECTS_MAX][40];
static int ngiven;

/* Tokens without an owner in the last pass: the heartbeat thread's own. */
static char suspects[SUSPECTS_MAX][40];
static int nsuspects;

void strays_enable(void) {
    pthread_mutex_lock(&mu);
    enabled = 1;
    pthread_mutex_unlock(&mu);
}

/* Invariant 11 (docs/internals.md). */
void strays_own(const char *token) {
    pthread_mutex_lock(&mu);
    if (enabled && !full) {
        if (nowned < OWNED_MAX) {
            snprintf(owned[nowned].token, sizeof owned[nowned].token, "%s", token);
            owned[nowned++].absent = 0;
        } else {
            full = 1;
            log_kv(LOG_WARN, "too many items to track: work rows no slot holds are no longer released "
                             "until the host restarts", NULL);
        }
    }
    pthread_mutex_unlock(&mu);
}

static int find_owned(const char *token) {
    for (int i = 0; i < nowned; i++)
        if (strcmp(owned[i].token, token) == 0) return i;
    return -1;
}

static void drop_owned(int i) {
    owned[i] = owned[--nowned];
}

/* Invariant 11 (docs/internals.md). */
void strays_disown(const char *token) {
    pthread_mutex_lock(&mu);
    int i = find_owned(token);
    if (i >= 0) drop_owned(i);
    pthread_mutex_unlock(&mu);
}

void strays_give_back(const char *token) {
    pthread_mutex_lock(&mu);
    int i = find_owned(token);
    if (i >= 0) drop_owned(i);
    /* no room: it is released as a stray, two passes later */
    if (enabled && ngiven < SUSPECTS_MAX) snprintf(given[ngiven++], sizeof given[0], "%s", token);
    pthread_mutex_unlock(&mu);
}

static int suspected(const char *token) {
    for (int i = 0; i < nsuspects; i++)
        if (strcmp(suspects[i], token) == 0) return 1;
    return 0;
}

#define STRAY_CAUSE "no slot of its session held it (left by a COMMIT that got no answer)"
#define GIVEN_BACK_CAUSE "claimed ahead and given back: it waited in the host too long"

/* Releases the rows of session with the n tokens (n <= SUSPECTS_MAX),
 * each recorded Canceled with its cause, in one SERIALIZABLE transaction
 * as every BMDB transaction; a row that went meanwhile (a collector, a
 * takeover) is simply not there. Strays count in the metrics, items
 * given back do not. */
static void release(PGconn **cp, const char *session, const char *const *token, int n, int strays,
                    double until) {
    char tokens[SUSPECTS_MAX * 38 + 3] = "{";
    size_t len = 1;
    for (int k = 0; k < n; k++)
        len += (size_t)snprintf(tokens + len, sizeof tokens - len, "%s%s", k ? "," : "", token[k]);
    snprintf(tokens + len, sizeof tokens - len, "}");
    static const char *const sql[] = {
        "WITH gone AS (DELETE FROM work WHERE session_id = $1 AND token = ANY($2::UUID[]) "
        " RETURNING machine_id, process, session_id, token) "
        "INSERT INTO work_history (machine_id, process, session_id, event, cause, token) "
        "SELECT machine_id, process, session_id, 'Canceled', $3::TEXT, token FROM gone",
    };
    const char *params[] = {session, tokens, strays ? STRAY_CAUSE : GIVEN_BACK_CAUSE};
    char why[600];
    long released = 0;
    if (pool_exec_transaction_bounded(cp, sql, 1, params, 3, until, &released, why, sizeof why) < 0)
        log_kv(LOG_WARN, "cannot release work rows no slot holds; the next pass retries", "error", why, NULL);
    else if (strays)
        metrics_strays_released(released);
}

/* The tokens given back since the last call. The heartbeat calls this
 * every round before any sweep (session.h, `soon`), so the sweep never
 * sees them as strays; should their release fail, they are no one's, and
 * the sweep takes them for strays two passes later. Invariant 11. */
void strays_release_given(PGconn **cp, const char *session, double until) {
    char copy[SUSPECTS_MAX][40];
    const char *token[SUSPECTS_MAX];
    pthread_mutex_lock(&mu);
    int n = ngiven;
    memcpy(copy, given, sizeof given[0] * (size_t)n);
    ngiven = 0;
    pthread_mutex_unlock(&mu);
    for (int k = 0; k < n; k++) token[k] = copy[k];
    if (n > 0) release(cp, session, token, n, 0, until);
}

/* Invariant 11 (docs/internals.md). */
void strays_sweep(PGconn **cp, const char *session, double until) {
    pthread_mutex_lock(&mu);
    int on = enabled && !full;
    pthread_mutex_unlock(&mu);
    if (!on || !*cp) return;
    const char *params[] = {session};
    char why[600];
    PGresult *r = pool_exec_bounded(
        cp, "SELECT token::TEXT, machine_id::TEXT, process FROM work WHERE session_id = $1", 1, params,
        until, why, sizeof why);
    if (!r || PQresultStatus(r) != PGRES_TUPLES_OK) {
        if (r) pool_result_failed(cp, r, why, sizeof why);
        PQclear(r);
        log_kv(LOG_DEBUG, "reading our work rows failed; the next pass retries", "error", why, NULL);
        return;
    }

    /* Which rows have no owner, and which owned tokens have no row. The
     * tokens are only compared under mu; logging and the release wait. */
    int rows = PQntuples(r), stray[SUSPECTS_MAX], nstray = 0, nnext = 0;
    char next[SUSPECTS_MAX][40];
    pthread_mutex_lock(&mu);
    for (int i = 0; i < nowned; i++) owned[i].absent++;
    for (int row = 0; row < rows; row++) {
        const char *token = PQgetvalue(r, row, 0);
        int i = find_owned(token);
        if (i >= 0)
            owned[i].absent = 0;
        else if (suspected(token)) { /* no owner an interval ago, none now */
            if (nstray < SUSPECTS_MAX) stray[nstray++] = row;
        } else if (nnext < SUSPECTS_MAX)
            snprintf(next[nnext++], sizeof next[0], "%s", token);
    }
    for (int i = nowned - 1; i >= 0; i--)
        if (owned[i].absent >= STALE_PASSES) drop_owned(i);
    pthread_mutex_unlock(&mu);
    memcpy(suspects, next, sizeof next[0] * (size_t)nnext);
    nsuspects = nnext;

    if (nstray > 0) {
        const char *token[SUSPECTS_MAX];
        for (int k = 0; k < nstray; k++) {
            token[k] = PQgetvalue(r, stray[k], 0);
            log_kv(LOG_WARN, "releasing a work row no slot of this host holds (left by a COMMIT that got no answer)",
                   "machine", PQgetvalue(r, stray[k], 1), "process", PQgetvalue(r, stray[k], 2), "token",
                   token[k], NULL);
        }
        release(cp, session, token, nstray, 1, until);
    }
    PQclear(r);
}

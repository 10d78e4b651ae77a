/* control.c -- what operators do to work: cancel a lock, pause a process,
 * hold a machine; the command line that does it; and what this host last
 * saw of each pause, so it is logged once per change.
 *
 * The operations are plain SQL inside a caller's transaction, shared by
 * the command line (bmdb-host cancel/pause/resume/hold/unhold, no session)
 * and the Lua API (bmdb.cancel ..., fenced by the script's session). What
 * they change is row data the claim reads anyway (work.c), so a pause or a
 * hold costs a claim no extra round trip. How a body whose lock was taken
 * away learns it is items.c's.
 *
 * Globals and their guards (lock order: host/README.md):
 *   pauses   pause_mu (taken alone; nothing under it) */
#include "control.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "lockcheck.h"
#include "log.h"
#include "work.h"

/* How long an operator's cancel waits for the holder's transaction in
 * flight (its fence holds a KEY SHARE lock on the work row). */
#define CANCEL_LOCK_TIMEOUT "5s"

/* ---- operations, inside a caller's transaction ---------------------------- */

int control_cancel(tx *t, const char *machine, const char *process, const char *reason, char *token,
                   size_t tokenlen, tx_error *e) {
    const char *lt[] = {CANCEL_LOCK_TIMEOUT};
    const char *p[] = {machine, process, reason};
    PGresult *r;
    if (tx_run(t, "SELECT set_config('lock_timeout', $1, true)", 1, lt, NULL, e) < 0) return -1;
    /* Only a lock that holds something: a live session's, within its
     * timeout. The rest is left to the claim that takes it over. */
    long n = tx_run(t,
                 "WITH gone AS (DELETE FROM work w WHERE machine_id = $1 AND process = $2 "
                 " AND (deadline IS NULL OR deadline > now()) AND EXISTS (SELECT 1 FROM sessions s "
                 "  WHERE s.session_id = w.session_id AND s.deadline > now()) "
                 " RETURNING machine_id, process, session_id, token) "
                 "INSERT INTO work_history (machine_id, process, session_id, event, cause, token) "
                 "SELECT machine_id, process, session_id, 'Canceled', "
                 "'canceled by an operator' || coalesce(': ' || $3::TEXT, ''), token FROM gone "
                 "RETURNING token",
                 3, p, &r, e);
    if (n < 0) return -1;
    if (n == 1 && token) snprintf(token, tokenlen, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    return n > 0;
}

int control_pause(tx *t, const char *process, const char *reason, tx_error *e) {
    const char *p[] = {process, reason};
    /* A second pause keeps the first one's time and takes the new reason. */
    return tx_run(t,
               "INSERT INTO processes (process, paused_at, pause_reason) VALUES ($1, now(), $2) "
               "ON CONFLICT (process) DO UPDATE SET "
               "paused_at = coalesce(processes.paused_at, excluded.paused_at), "
               "pause_reason = excluded.pause_reason",
               2, p, NULL, e) < 0 ? -1 : 1;
}

int control_resume(tx *t, const char *process, tx_error *e) {
    const char *p[] = {process};
    long n = tx_run(t,
                 "UPDATE processes SET paused_at = NULL, pause_reason = NULL "
                 "WHERE process = $1 AND paused_at IS NOT NULL",
                 1, p, NULL, e);
    return n < 0 ? -1 : n > 0;
}

static int machine_missing(tx_error *e, const char *machine) {
    if (e->kind == TXE_SQL && strcmp(e->sqlstate, "23503") == 0)
        snprintf(e->message, sizeof e->message, "machine %s does not exist", machine);
    return -1;
}

int control_hold(tx *t, const char *machine, const char *reason, tx_error *e) {
    const char *p[] = {machine, reason, t->sess ? session_id(t->sess) : NULL};
    if (tx_run(t,
            "INSERT INTO machine_holds (machine_id, reason) VALUES ($1, $2) "
            "ON CONFLICT (machine_id) DO UPDATE SET reason = excluded.reason",
            2, p, NULL, e) < 0)
        return machine_missing(e, machine);
    return tx_run(t,
               "INSERT INTO work_history (machine_id, process, session_id, event, cause) "
               "VALUES ($1, '*', $3::UUID, 'Held', $2)",
               3, p, NULL, e) < 0 ? -1 : 1;
}

int control_unhold(tx *t, const char *machine, const char *reason, tx_error *e) {
    const char *p[] = {machine, reason, t->sess ? session_id(t->sess) : NULL};
    long n = tx_run(t,
                 "WITH gone AS (DELETE FROM machine_holds WHERE machine_id = $1 RETURNING machine_id) "
                 "INSERT INTO work_history (machine_id, process, session_id, event, cause) "
                 "SELECT machine_id, '*', $3::UUID, 'Unheld', $2::TEXT FROM gone",
                 3, p, NULL, e);
    return n < 0 ? -1 : n > 0;
}

int control_paused(tx *t, const char *process, char *why, size_t whylen, tx_error *e) {
    const char *p[] = {process};
    PGresult *r;
    long n = tx_run(t,
                 "SELECT coalesce(pause_reason, '') FROM processes "
                 "WHERE process = $1 AND paused_at IS NOT NULL",
                 1, p, &r, e);
    if (n < 0) return -1;
    if (n == 1 && why) snprintf(why, whylen, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    return n == 1;
}

void control_register(pool *p, const char *const *processes, int n) {
    char err[512];
    PGconn *c = pool_get(p, POOL_WAIT_S, err, sizeof err);
    if (!c) return; /* the claim refuses pauses and holds all the same */
    for (int i = 0; i < n; i++) {
        const char *params[] = {processes[i]};
        tx_error e;
        PGresult *r = tx_conn_exec(c,
                                   "INSERT INTO processes (process) VALUES ($1) "
                                   "ON CONFLICT (process) DO NOTHING",
                                   1, params, NULL, NULL, &e);
        if (r) PQclear(r);
        else log_kv(LOG_WARN, "cannot register the process (holds may not show in work_blocked)",
                    "process", processes[i], "error", e.message, NULL);
    }
    pool_put(p, c);
}

/* ---- the pause, as this host saw it last --------------------------------- */

typedef struct seen_pause {
    char process[64];
    struct seen_pause *next;
} seen_pause;

static pthread_mutex_t pause_mu = PTHREAD_MUTEX_INITIALIZER;
static seen_pause *pauses; /* under pause_mu */

/* Where process's entry is (or would be linked). Caller holds pause_mu. */
static seen_pause **find_pause(const char *process) {
    LOCK_HELD(&pause_mu);
    seen_pause **pp = &pauses;
    while (*pp && strcmp((*pp)->process, process) != 0) pp = &(*pp)->next;
    return pp;
}

void control_note_pause(const char *process, int paused, const char *why) {
    pthread_mutex_lock(&pause_mu);
    seen_pause **pp = find_pause(process);
    int was = *pp != NULL;
    if (paused && !was) {
        seen_pause *s = calloc(1, sizeof *s);
        snprintf(s->process, sizeof s->process, "%s", process);
        s->next = pauses;
        pauses = s;
    } else if (!paused && was) {
        seen_pause *s = *pp;
        *pp = s->next;
        free(s);
    }
    pthread_mutex_unlock(&pause_mu);
    /* Once per change, however many slots notice it. */
    if (paused && !was)
        log_kv(LOG_WARN, "process paused: no claims until it is resumed", "process", process, "reason",
               why && *why ? why : "none given", NULL);
    else if (!paused && was)
        log_kv(LOG_INFO, "process resumed", "process", process, NULL);
}

int control_seen_paused(const char *process) {
    pthread_mutex_lock(&pause_mu);
    int seen = *find_pause(process) != NULL;
    pthread_mutex_unlock(&pause_mu);
    return seen;
}

/* ---- the command line ------------------------------------------------------ */

int control_parse(const char *cmd, int argc, char **argv, control_args *a, char *err, size_t errlen) {
    memset(a, 0, sizeof *a);
    a->cmd = cmd;
    const char *pos[2];
    int npos = 0, want = strcmp(cmd, "cancel") == 0 ? 2 : 1;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--reason") == 0) {
            if (i + 1 >= argc) return snprintf(err, errlen, "%s: option --reason needs a value", cmd), -1;
            a->reason = argv[++i];
        } else if (strncmp(argv[i], "--reason=", 9) == 0) {
            a->reason = argv[i] + 9;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            return snprintf(err, errlen, "%s: unknown option '%s'", cmd, argv[i]), -1;
        } else if (npos < 2) {
            pos[npos++] = argv[i];
        } else {
            npos++;
        }
    }
    int machine_first = strcmp(cmd, "pause") != 0 && strcmp(cmd, "resume") != 0;
    const char *shape = want == 2 ? "MACHINE PROCESS" : machine_first ? "MACHINE" : "PROCESS";
    if (npos != want) return snprintf(err, errlen, "%s: expected %s [--reason TEXT]", cmd, shape), -1;
    if (machine_first) {
        a->machine = pos[0];
        if (!work_valid_uuid(a->machine))
            return snprintf(err, errlen, "%s: machine id is not a UUID: %s", cmd, a->machine), -1;
    }
    if (want == 2 || !machine_first) {
        a->process = pos[want - 1];
        if (!work_valid_process(a->process))
            return snprintf(err, errlen, "%s: invalid process name '%s' (a letter, then letters, digits "
                            "or _; at most 63)", cmd, a->process), -1;
    }
    return 0;
}

/* After the commit, on the same connection; a server without
 * notifications (CockroachDB) refuses, and the holder learns at its next
 * bmdb call anyway. */
static void notify(PGconn *c, const char *channel, const char *payload) {
    const char *p[] = {channel, payload};
    PQclear(PQexecParams(c, "SELECT pg_notify($1, $2)", 2, NULL, p, NULL, NULL, 0));
}

int control_run(pool *p, const control_args *a, FILE *out, char *err, size_t errlen) {
    for (int attempt = 1;; attempt++) {
        tx t;
        tx_error e;
        char token[40] = "";
        int rc = -1;
        if (tx_begin(&t, p, NULL, &e) == 0) {
            if (!strcmp(a->cmd, "cancel"))
                rc = control_cancel(&t, a->machine, a->process, a->reason, token, sizeof token, &e);
            else if (!strcmp(a->cmd, "pause")) rc = control_pause(&t, a->process, a->reason, &e);
            else if (!strcmp(a->cmd, "resume")) rc = control_resume(&t, a->process, &e);
            else if (!strcmp(a->cmd, "hold")) rc = control_hold(&t, a->machine, a->reason, &e);
            else rc = control_unhold(&t, a->machine, a->reason, &e);
            if (rc >= 0 && tx_commit(&t, &e) < 0) rc = -1;
            if (rc < 0) tx_rollback(&t);
            int wake = rc > 0 && (*token || !strcmp(a->cmd, "resume") || !strcmp(a->cmd, "unhold"));
            PGconn *c = wake ? pool_get(p, POOL_WAIT_S, err, errlen) : NULL;
            if (c) {
                if (*token) notify(c, "bmdb_cancel", token);
                notify(c, "bmdb_wake", a->process ? a->process : "");
                pool_put(p, c);
            }
        }
        if (rc >= 0) {
            const char *what = a->machine && a->process ? "lock" : a->machine ? "machine" : "process";
            fprintf(out, "%s %s%s%s: %s\n", what, a->machine ? a->machine : "",
                    a->machine && a->process ? " " : "", a->process ? a->process : "",
                    !strcmp(a->cmd, "cancel") ? (rc ? "canceled" : "not held, nothing canceled")
                    : !strcmp(a->cmd, "pause") ? "paused"
                    : !strcmp(a->cmd, "resume") ? (rc ? "resumed" : "was not paused")
                    : !strcmp(a->cmd, "hold") ? "on hold"
                    : (rc ? "released from hold" : "was not on hold"));
            return rc;
        }
        /* 40001/40P01: another claim or collector touched the same rows */
        int retry = e.kind == TXE_SQL && (!strcmp(e.sqlstate, "40001") || !strcmp(e.sqlstate, "40P01"));
        double delay = retry ? tx_retry_delay(attempt) : -1;
        if (delay < 0) {
            snprintf(err, errlen, "%s: %s%s%s", a->cmd, e.sqlstate, *e.sqlstate ? " " : "", e.message);
            return -1;
        }
        mono_sleep(delay);
    }
}

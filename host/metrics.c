/* metrics.c -- the registry behind /metrics, and the slot table.
 *
 * Globals and their guard: every series and the slot table are under `mu`,
 * held only to add or copy numbers (innermost but for log.c's lock: no
 * other lock is taken under it, none is held while taking it except by
 * callers that hold nothing -- the heartbeat calls in without its `mu`).
 * Series are created on first use and never freed: their number is
 * bounded by processes x results x sqlstates seen, which a host keeps few
 * of. */
#include "metrics.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "lockcheck.h"

enum kind { COUNTER, GAUGE, HISTOGRAM };

typedef struct series {
    char labels[128]; /* rendered: process="x",result="y" */
    double value;     /* a counter's count, a gauge's value */
    unsigned long long *buckets, count;
    double sum;
    struct series *next;
} series;

typedef struct family {
    const char *name, *help;
    enum kind kind;
    const double *bounds; /* histograms: upper bounds, ascending */
    int nbounds;
    series *series;
} family;

static const double heartbeat_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5};
static const double http_bounds[] = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
static const double work_bounds[] = {0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600};
static const double limit_bounds[] = {0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300};
#define NB(a) (int)(sizeof a / sizeof *a)

enum {
    F_SESSIONS_STARTED, F_SESSIONS_LOST, F_HEARTBEATS, F_HEARTBEAT_SECONDS, F_TX_COMMITTED, F_TX_RETRIED,
    F_TX_FAILED, F_WORK_STARTED, F_WORK_ENDED, F_WORK_SECONDS, F_CLAIMS_EMPTY, F_RELOADS, F_RELOADS_REFUSED,
    F_STRAYS_RELEASED, F_ITEMS_WAITING, F_ITEMS_GIVEN_BACK, F_HTTP_REQUESTS, F_HTTP_SECONDS, F_EXEC_TOTAL,
    F_EXEC_SECONDS, F_LIMIT_WAITS, F_LIMIT_WAIT_SECONDS, F_COUNT
};

static family families[F_COUNT] = {
    [F_SESSIONS_STARTED] = {"bmdb_sessions_started_total", "Sessions this host started.", COUNTER, NULL, 0, NULL},
    [F_SESSIONS_LOST] = {"bmdb_sessions_lost_total", "Sessions this host lost before it ended them.", COUNTER,
                         NULL, 0, NULL},
    [F_HEARTBEATS] = {"bmdb_heartbeats_total", "Heartbeat pokes, by result (ok, failed).", COUNTER, NULL, 0, NULL},
    [F_HEARTBEAT_SECONDS] = {"bmdb_heartbeat_duration_seconds", "Time a successful heartbeat poke took.",
                             HISTOGRAM, heartbeat_bounds, NB(heartbeat_bounds), NULL},
    [F_TX_COMMITTED] = {"bmdb_transactions_committed_total", "Fenced transactions committed.", COUNTER, NULL, 0,
                        NULL},
    [F_TX_RETRIED] = {"bmdb_transactions_retried_total",
                      "Fenced transactions retried, by the SQLSTATE that made them retry (or connection).",
                      COUNTER, NULL, 0, NULL},
    [F_TX_FAILED] = {"bmdb_transactions_failed_total", "Fenced transactions given up with an error.", COUNTER,
                     NULL, 0, NULL},
    [F_WORK_STARTED] = {"bmdb_work_started_total", "Work items started, by process.", COUNTER, NULL, 0, NULL},
    [F_WORK_ENDED] = {"bmdb_work_ended_total",
                      "Work items ended, by process and result (finished, failed, canceled, lost).", COUNTER, NULL,
                      0, NULL},
    [F_WORK_SECONDS] = {"bmdb_work_duration_seconds", "Time from a work item's start to its end, by process.",
                        HISTOGRAM, work_bounds, NB(work_bounds), NULL},
    [F_CLAIMS_EMPTY] = {"bmdb_claims_empty_total", "Claims that found nothing to do, by process.", COUNTER, NULL,
                        0, NULL},
    [F_RELOADS] = {"bmdb_reloads_total", "Code reloads applied.", COUNTER, NULL, 0, NULL},
    [F_RELOADS_REFUSED] = {"bmdb_reloads_refused_total", "Code reloads refused (the old code kept running).",
                           COUNTER, NULL, 0, NULL},
    [F_STRAYS_RELEASED] = {"bmdb_stray_locks_released_total",
                           "Work rows of this host's live session that no slot held, released (strays.c).",
                           COUNTER, NULL, 0, NULL},
    [F_ITEMS_WAITING] = {"bmdb_items_waiting",
                         "Items claimed ahead of this host's slots and waiting for one, by process.", GAUGE,
                         NULL, 0, NULL},
    [F_ITEMS_GIVEN_BACK] = {"bmdb_items_given_back_total",
                            "Items claimed ahead by default that waited too long and were given back, by "
                            "process (sched.h).",
                            COUNTER, NULL, 0, NULL},
    [F_HTTP_REQUESTS] = {"bmdb_http_requests_total",
                         "Requests of bmdb.http, by host and status class (2xx ... 5xx, or error: no response).",
                         COUNTER, NULL, 0, NULL},
    [F_HTTP_SECONDS] = {"bmdb_http_request_duration_seconds",
                        "Time from a bmdb.http request's start to its response or error, by host.", HISTOGRAM,
                        http_bounds, NB(http_bounds), NULL},
    [F_EXEC_TOTAL] = {"bmdb_exec_total",
                      "bmdb.exec calls, by command (the program's base name) and outcome (exited, signaled, "
                      "timeout, too_large, lost, canceled, spawn_failed, failed).",
                      COUNTER, NULL, 0, NULL},
    [F_EXEC_SECONDS] = {"bmdb_exec_seconds", "Time from a bmdb.exec command's start to its end, by command.",
                        HISTOGRAM, work_bounds, NB(work_bounds), NULL},
    [F_LIMIT_WAITS] = {"bmdb_limit_waits_total",
                       "Takes of a fleet-wide limit (bmdb.limit) that had to wait, by limit.", COUNTER, NULL, 0,
                       NULL},
    [F_LIMIT_WAIT_SECONDS] = {"bmdb_limit_wait_seconds",
                              "How long a take of a limit that had to wait waited in all, by limit.", HISTOGRAM,
                              limit_bounds, NB(limit_bounds), NULL},
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

/* Under mu. The series of f with these labels, created on first use; NULL
 * only when out of memory (the sample is then dropped, never the host). */
static series *find(family *f, const char *labels) {
    LOCK_HELD(&mu);
    for (series *s = f->series; s; s = s->next)
        if (!strcmp(s->labels, labels)) return s;
    series *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    if (f->kind == HISTOGRAM && !(s->buckets = calloc((size_t)f->nbounds, sizeof *s->buckets))) {
        free(s);
        return NULL;
    }
    snprintf(s->labels, sizeof s->labels, "%s", labels);
    /* appended, so the exposition keeps the order series first appeared */
    series **tail = &f->series;
    while (*tail) tail = &(*tail)->next;
    *tail = s;
    return s;
}

static void add(int fam, const char *labels, double n) {
    pthread_mutex_lock(&mu);
    series *s = find(&families[fam], labels);
    if (s) s->value += n;
    pthread_mutex_unlock(&mu);
}

static void observe(int fam, const char *labels, double v) {
    family *f = &families[fam];
    pthread_mutex_lock(&mu);
    series *s = find(f, labels);
    if (s) {
        for (int i = 0; i < f->nbounds; i++)
            if (v <= f->bounds[i]) s->buckets[i]++;
        s->count++;
        s->sum += v;
    }
    pthread_mutex_unlock(&mu);
}

/* Escapes a label value as the text format wants: \\, \" and \n. */
void metrics_label_value(FILE *out, const char *v) {
    for (; *v; v++) {
        if (*v == '\\') fputs("\\\\", out);
        else if (*v == '"') fputs("\\\"", out);
        else if (*v == '\n') fputs("\\n", out);
        else fputc(*v, out);
    }
}

/* k1="v1",k2="v2" into buf (NULL keys end the list), values escaped. */
static void labels(char *buf, size_t len, const char *k1, const char *v1, const char *k2, const char *v2) {
    char *text = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&text, &n);
    if (!f) {
        buf[0] = '\0';
        return;
    }
    fprintf(f, "%s=\"", k1);
    metrics_label_value(f, v1);
    fputc('"', f);
    if (k2) {
        fprintf(f, ",%s=\"", k2);
        metrics_label_value(f, v2);
        fputc('"', f);
    }
    fclose(f);
    snprintf(buf, len, "%s", text ? text : "");
    free(text);
}

void metrics_session_started(void) { add(F_SESSIONS_STARTED, "", 1); }
void metrics_session_lost(void) { add(F_SESSIONS_LOST, "", 1); }

void metrics_heartbeat(int ok, double seconds) {
    add(F_HEARTBEATS, ok ? "result=\"ok\"" : "result=\"failed\"", 1);
    if (ok) observe(F_HEARTBEAT_SECONDS, "", seconds);
}

void metrics_tx_committed(void) { add(F_TX_COMMITTED, "", 1); }
void metrics_tx_failed(void) { add(F_TX_FAILED, "", 1); }

void metrics_tx_retried(const char *why) {
    char l[128];
    labels(l, sizeof l, "sqlstate", why && *why ? why : "connection", NULL, NULL);
    add(F_TX_RETRIED, l, 1);
}

void metrics_claim_empty(const char *process) {
    char l[128];
    labels(l, sizeof l, "process", process, NULL, NULL);
    add(F_CLAIMS_EMPTY, l, 1);
}

void metrics_items_waiting(const char *process, int n) {
    char l[128];
    labels(l, sizeof l, "process", process, NULL, NULL);
    pthread_mutex_lock(&mu);
    series *s = find(&families[F_ITEMS_WAITING], l);
    if (s) s->value = n;
    pthread_mutex_unlock(&mu);
}

void metrics_item_given_back(const char *process) {
    char l[128];
    labels(l, sizeof l, "process", process, NULL, NULL);
    add(F_ITEMS_GIVEN_BACK, l, 1);
}

void metrics_http(const char *host, int status, double seconds) {
    char l[128], cls[8] = "error";
    if (status >= 100 && status < 600) snprintf(cls, sizeof cls, "%dxx", status / 100);
    labels(l, sizeof l, "host", host, "class", cls);
    add(F_HTTP_REQUESTS, l, 1);
    labels(l, sizeof l, "host", host, NULL, NULL);
    observe(F_HTTP_SECONDS, l, seconds);
}

/* The commands that have series of their own; under mu. */
static char exec_commands[EXEC_COMMANDS_MAX][48];
static int exec_ncommands;

void metrics_exec(const char *command, const char *outcome, double seconds) {
    char name[48], l[128];
    snprintf(name, sizeof name, "%s", command);
    pthread_mutex_lock(&mu);
    int known = 0;
    for (int i = 0; i < exec_ncommands && !known; i++) known = !strcmp(exec_commands[i], name);
    if (!known && exec_ncommands < EXEC_COMMANDS_MAX) memcpy(exec_commands[exec_ncommands++], name, sizeof name);
    else if (!known) snprintf(name, sizeof name, "other");
    pthread_mutex_unlock(&mu);
    labels(l, sizeof l, "command", name, "outcome", outcome);
    add(F_EXEC_TOTAL, l, 1);
    if (seconds < 0) return;
    labels(l, sizeof l, "command", name, NULL, NULL);
    observe(F_EXEC_SECONDS, l, seconds);
}

void metrics_limit_wait(const char *limit, double seconds) {
    char l[128];
    labels(l, sizeof l, "limit", limit, NULL, NULL);
    add(F_LIMIT_WAITS, l, 1);
    observe(F_LIMIT_WAIT_SECONDS, l, seconds);
}

void metrics_reload(int refused) { add(refused ? F_RELOADS_REFUSED : F_RELOADS, "", 1); }
void metrics_strays_released(long n) { add(F_STRAYS_RELEASED, "", (double)n); }

/* ---- the slot table ------------------------------------------------------ */

typedef struct slot_rec {
    char process[64];
    int index, busy;
    char machine[40];
    double since; /* monotonic */
    struct slot_rec *next;
} slot_rec;

static slot_rec *slot_list;        /* under mu */
static __thread slot_rec *my_slot; /* the calling slot's record, or NULL */

void metrics_slot_bind(const char *process, int index) {
    slot_rec *r = calloc(1, sizeof *r);
    if (!r) return;
    snprintf(r->process, sizeof r->process, "%s", process);
    r->index = index;
    pthread_mutex_lock(&mu);
    r->next = slot_list;
    slot_list = r;
    pthread_mutex_unlock(&mu);
    my_slot = r;
}

void metrics_slot_unbind(void) {
    if (!my_slot) return;
    pthread_mutex_lock(&mu);
    for (slot_rec **p = &slot_list; *p; p = &(*p)->next)
        if (*p == my_slot) {
            *p = my_slot->next;
            break;
        }
    pthread_mutex_unlock(&mu);
    free(my_slot);
    my_slot = NULL;
}

void metrics_work(const char *process, const char *event, const char *machine, double seconds) {
    char l[128];
    int started = !strcmp(event, "started");
    if (started) {
        labels(l, sizeof l, "process", process, NULL, NULL);
        add(F_WORK_STARTED, l, 1);
    } else {
        labels(l, sizeof l, "process", process, "result", event);
        add(F_WORK_ENDED, l, 1);
        labels(l, sizeof l, "process", process, NULL, NULL);
        observe(F_WORK_SECONDS, l, seconds);
    }
    if (!my_slot) return;
    pthread_mutex_lock(&mu);
    my_slot->busy = started;
    snprintf(my_slot->machine, sizeof my_slot->machine, "%s", started && machine ? machine : "");
    my_slot->since = mono_now();
    pthread_mutex_unlock(&mu);
}

static int slot_cmp(const void *a, const void *b) {
    const metrics_slot_view *x = a, *y = b;
    int c = strcmp(x->process, y->process);
    return c ? c : x->index - y->index;
}

int metrics_slots_read(metrics_slot_view *out, int max) {
    int n = 0;
    double now = mono_now();
    pthread_mutex_lock(&mu);
    for (slot_rec *r = slot_list; r; r = r->next, n++) {
        if (n >= max) continue;
        metrics_slot_view *v = &out[n];
        memcpy(v->process, r->process, sizeof v->process);
        memcpy(v->machine, r->machine, sizeof v->machine);
        v->index = r->index;
        v->busy = r->busy;
        v->busy_for = r->busy ? now - r->since : 0;
    }
    pthread_mutex_unlock(&mu);
    qsort(out, (size_t)(n < max ? n : max), sizeof *out, slot_cmp);
    return n;
}

/* ---- exposition ---------------------------------------------------------- */

/* A histogram series: cumulative buckets, +Inf, sum and count. */
static void render_histogram(FILE *out, const family *f, const series *s) {
    const char *sep = s->labels[0] ? "," : "";
    for (int i = 0; i < f->nbounds; i++)
        fprintf(out, "%s_bucket{%s%sle=\"%g\"} %llu\n", f->name, s->labels, sep, f->bounds[i], s->buckets[i]);
    fprintf(out, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", f->name, s->labels, sep, s->count);
    fprintf(out, "%s_sum%s%s%s %.9g\n", f->name, s->labels[0] ? "{" : "", s->labels, s->labels[0] ? "}" : "",
            s->sum);
    fprintf(out, "%s_count%s%s%s %llu\n", f->name, s->labels[0] ? "{" : "", s->labels, s->labels[0] ? "}" : "",
            s->count);
}

/* The slots gauge: every registered slot counted by process and state. */
static void render_slots(FILE *out) {
    fputs("# HELP bmdb_slots Slots of this host, by process and state (idle, busy).\n"
          "# TYPE bmdb_slots gauge\n",
          out);
    enum { MAX = 1024 };
    metrics_slot_view *v = malloc(MAX * sizeof *v);
    if (!v) return;
    int n = metrics_slots_read(v, MAX);
    if (n > MAX) n = MAX;
    for (int i = 0; i < n;) {
        int busy = 0, j = i;
        for (; j < n && !strcmp(v[j].process, v[i].process); j++) busy += v[j].busy;
        for (int st = 0; st < 2; st++) {
            fputs("bmdb_slots{process=\"", out);
            metrics_label_value(out, v[i].process);
            fprintf(out, "\",state=\"%s\"} %d\n", st ? "busy" : "idle", st ? busy : j - i - busy);
        }
        i = j;
    }
    free(v);
}

void metrics_render(FILE *out) {
    pthread_mutex_lock(&mu);
    for (int i = 0; i < F_COUNT; i++) {
        const family *f = &families[i];
        fprintf(out, "# HELP %s %s\n# TYPE %s %s\n", f->name, f->help, f->name,
                f->kind == HISTOGRAM ? "histogram" : f->kind == GAUGE ? "gauge" : "counter");
        /* An unlabelled counter is 0 before its first event: present, so a
         * rate() over it starts at the host's start. */
        if (!f->series && f->kind == COUNTER && i != F_TX_RETRIED && i != F_HEARTBEATS &&
            i != F_WORK_STARTED && i != F_WORK_ENDED && i != F_CLAIMS_EMPTY && i != F_EXEC_TOTAL &&
            i != F_LIMIT_WAITS)
            fprintf(out, "%s 0\n", f->name);
        for (const series *s = f->series; s; s = s->next) {
            if (f->kind == HISTOGRAM) render_histogram(out, f, s);
            else if (s->labels[0]) fprintf(out, "%s{%s} %.17g\n", f->name, s->labels, s->value);
            else fprintf(out, "%s %.17g\n", f->name, s->value);
        }
    }
    pthread_mutex_unlock(&mu);
    render_slots(out);
}

/* ---- the stop line's counts (atomics, no registry) ------------------------- */

static unsigned long claims_total, retries_total;

void metrics_count_claim(void) { __atomic_add_fetch(&claims_total, 1, __ATOMIC_RELAXED); }
void metrics_count_retry(void) { __atomic_add_fetch(&retries_total, 1, __ATOMIC_RELAXED); }

void metrics_claim_counts(unsigned long *claims, unsigned long *retries) {
    *claims = __atomic_load_n(&claims_total, __ATOMIC_RELAXED);
    *retries = __atomic_load_n(&retries_total, __ATOMIC_RELAXED);
}

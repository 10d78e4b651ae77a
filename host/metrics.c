/* metrics.c -- the registry behind /metrics, and the slot table.
 *
 * Globals and their guard: every series and the slot table are under `mu`,
 * held only to add or copy numbers (innermost but for log.c's lock: no
 * other lock is taken under it, none is held while taking it except by
 * callers that hold nothing -- the heartbeat calls in without its `mu`).
 * Series are created on first use and never freed: their number is
 * bounded by processes x results x sqlstates seen, which a host keeps few
 * of. The operators' families (bmdb.metrics) live in the same registry,
 * after the host's, and are never freed either (their series are freed
 * only when removed: metrics_own_remove); theirs are bounded by a
 * cap per family (METRICS_OWN_SERIES_MAX): a sample that would make one
 * more is dropped, with one warning per family (logging is allowed under
 * mu: log.c's lock is innermost). */
#include "metrics.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "lockcheck.h"
#include "log.h"

enum kind { COUNTER, GAUGE, HISTOGRAM };

typedef struct series {
    char *labels; /* rendered: process="x",result="y" */
    double value;     /* a counter's count, a gauge's value */
    unsigned long long *buckets, count;
    double sum;
    struct series *next;
} series;

typedef struct metrics_family {
    const char *name, *help;
    enum kind kind;
    const double *bounds; /* histograms: upper bounds, ascending */
    int nbounds;
    series *series;
    /* An operator's family (metrics_own_define) only; the host's are 0. */
    int cap, nseries, warned; /* cap: series at most (0: no cap) */
    char **label_names;
    int nlabels;
    struct metrics_family *next;
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
    F_EXEC_SECONDS, F_LIMIT_WAITS, F_LIMIT_WAIT_SECONDS, F_LOOP_RUNS, F_LOOP_SECONDS, F_LOOP_HELD, F_COUNT
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
    [F_LOOP_RUNS] = {"bmdb_loop_runs_total",
                     "Runs of a singleton loop (bmdb.loop) in this host, by loop and outcome (finished, failed, "
                     "lost).",
                     COUNTER, NULL, 0, NULL},
    [F_LOOP_SECONDS] = {"bmdb_loop_run_seconds", "How long a singleton loop's runs took in this host, by loop.",
                        HISTOGRAM, work_bounds, NB(work_bounds), NULL},
    [F_LOOP_HELD] = {"bmdb_loop_held", "1 while this host holds the singleton loop, 0 while it stands by.", GAUGE,
                     NULL, 0, NULL},
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

/* Under mu. The series of f with these labels, created on first use; NULL
 * only when out of memory (the sample is then dropped, never the host). */
static series *find(family *f, const char *labels) {
    LOCK_HELD(&mu);
    for (series *s = f->series; s; s = s->next)
        if (!strcmp(s->labels, labels)) return s;
    if (f->cap && f->nseries >= f->cap) {
        if (!f->warned) {
            f->warned = 1;
            char max[16];
            snprintf(max, sizeof max, "%d", f->cap);
            log_kv(LOG_WARN, "metrics: too many series, samples of new ones dropped", "metric", f->name, "max",
                   max, NULL);
        }
        return NULL;
    }
    series *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    if ((f->kind == HISTOGRAM && !(s->buckets = calloc((size_t)f->nbounds, sizeof *s->buckets))) ||
        !(s->labels = strdup(labels))) {
        free(s->buckets);
        free(s);
        return NULL;
    }
    f->nseries++;
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

/* Under mu. */
static void observe_in(family *f, series *s, double v) {
    LOCK_HELD(&mu);
    for (int i = 0; i < f->nbounds; i++)
        if (v <= f->bounds[i]) s->buckets[i]++;
    s->count++;
    s->sum += v;
}

static void observe(int fam, const char *labels, double v) {
    family *f = &families[fam];
    pthread_mutex_lock(&mu);
    series *s = find(f, labels);
    if (s) observe_in(f, s, v);
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

/* Sets a gauge of the host's. */
static void set(int fam, const char *labels, double v) {
    pthread_mutex_lock(&mu);
    series *s = find(&families[fam], labels);
    if (s) s->value = v;
    pthread_mutex_unlock(&mu);
}

void metrics_items_waiting(const char *process, int n) {
    char l[128];
    labels(l, sizeof l, "process", process, NULL, NULL);
    set(F_ITEMS_WAITING, l, n);
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

void metrics_loop_run(const char *loop, const char *outcome, double seconds) {
    char l[192];
    labels(l, sizeof l, "loop", loop, "outcome", outcome);
    add(F_LOOP_RUNS, l, 1);
    labels(l, sizeof l, "loop", loop, NULL, NULL);
    observe(F_LOOP_SECONDS, l, seconds);
}

void metrics_loop_held(const char *loop, int held) {
    char l[128];
    labels(l, sizeof l, "loop", loop, NULL, NULL);
    set(F_LOOP_HELD, l, held);
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

/* HELP text escaped as the text format wants: \\ and \n. */
static void help_text(FILE *out, const char *v) {
    for (; *v; v++) {
        if (*v == '\\') fputs("\\\\", out);
        else if (*v == '\n') fputs("\\n", out);
        else fputc(*v, out);
    }
}

/* Under mu: one family, its HELP, TYPE and every series. */
static void render_family(FILE *out, const family *f) {
    LOCK_HELD(&mu);
    fprintf(out, "# HELP %s ", f->name);
    help_text(out, f->help);
    fprintf(out, "\n# TYPE %s %s\n", f->name,
            f->kind == HISTOGRAM ? "histogram" : f->kind == GAUGE ? "gauge" : "counter");
    for (const series *s = f->series; s; s = s->next) {
        if (f->kind == HISTOGRAM) render_histogram(out, f, s);
        else if (s->labels[0]) fprintf(out, "%s{%s} %.17g\n", f->name, s->labels, s->value);
        else fprintf(out, "%s %.17g\n", f->name, s->value);
    }
}

static family *own_families, **own_tail = &own_families; /* under mu, in the order defined */
static int own_count;                                    /* under mu */

void metrics_render(FILE *out) {
    pthread_mutex_lock(&mu);
    for (int i = 0; i < F_COUNT; i++) {
        const family *f = &families[i];
        /* An unlabelled counter is 0 before its first event: present, so a
         * rate() over it starts at the host's start. */
        if (!f->series && f->kind == COUNTER && i != F_TX_RETRIED && i != F_HEARTBEATS &&
            i != F_WORK_STARTED && i != F_WORK_ENDED && i != F_CLAIMS_EMPTY && i != F_EXEC_TOTAL &&
            i != F_LIMIT_WAITS) {
            fprintf(out, "# HELP %s %s\n# TYPE %s counter\n%s 0\n", f->name, f->help, f->name, f->name);
            continue;
        }
        render_family(out, f);
    }
    pthread_mutex_unlock(&mu);
    render_slots(out);
}

void metrics_render_own(FILE *out) {
    pthread_mutex_lock(&mu);
    for (const family *f = own_families; f; f = f->next) render_family(out, f);
    pthread_mutex_unlock(&mu);
}

/* ---- the stop line's counts (atomics, no registry) ------------------------- */

static unsigned long claims_total, retries_total;

void metrics_count_claim(void) { __atomic_add_fetch(&claims_total, 1, __ATOMIC_RELAXED); }
void metrics_count_retry(void) { __atomic_add_fetch(&retries_total, 1, __ATOMIC_RELAXED); }

void metrics_claim_counts(unsigned long *claims, unsigned long *retries) {
    *claims = __atomic_load_n(&claims_total, __ATOMIC_RELAXED);
    *retries = __atomic_load_n(&retries_total, __ATOMIC_RELAXED);
}

/* ---- operators' own families (bmdb.metrics) ---------------------------------- */

static int valid_name(const char *s, int colon) {
    if (!*s || strlen(s) > METRICS_OWN_NAME_MAX) return 0;
    for (const char *p = s; *p; p++) {
        int c = (unsigned char)*p;
        int letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':');
        if (!letter && !(p > s && c >= '0' && c <= '9')) return 0;
    }
    return 1;
}

static const char *kind_name(enum kind k) {
    return k == HISTOGRAM ? "histogram" : k == GAUGE ? "gauge" : "counter";
}

/* What makes a definition invalid in itself, into err; 0 when nothing. */
static int check_definition(enum kind k, const char *name, const char *const *labels, int nlabels,
                            const double *bounds, int nbounds, char *err, size_t errlen) {
    if (!valid_name(name, 1)) {
        snprintf(err, errlen,
                 "invalid metric name '%s' (a letter, _ or :, then letters, digits, _ or :; at most %d)", name,
                 METRICS_OWN_NAME_MAX);
        return 1;
    }
    if (!strncmp(name, "bmdb_", 5)) {
        snprintf(err, errlen, "metric name '%s': the prefix bmdb_ is the host's own", name);
        return 1;
    }
    if (nlabels > METRICS_OWN_LABELS_MAX) {
        snprintf(err, errlen, "metric '%s': %d labels, at most %d", name, nlabels, METRICS_OWN_LABELS_MAX);
        return 1;
    }
    for (int i = 0; i < nlabels; i++) {
        if (!valid_name(labels[i], 0)) {
            snprintf(err, errlen,
                     "metric '%s': invalid label name '%s' (a letter or _, then letters, digits or _; at most %d)",
                     name, labels[i], METRICS_OWN_NAME_MAX);
            return 1;
        }
        if (!strncmp(labels[i], "__", 2)) {
            snprintf(err, errlen, "metric '%s': label name '%s' starts with __ (reserved to Prometheus)", name,
                     labels[i]);
            return 1;
        }
        if (k == HISTOGRAM && !strcmp(labels[i], "le")) {
            snprintf(err, errlen, "metric '%s': a histogram cannot have the label 'le' (its buckets' own)", name);
            return 1;
        }
        for (int j = 0; j < i; j++)
            if (!strcmp(labels[i], labels[j])) {
                snprintf(err, errlen, "metric '%s': label '%s' is listed twice", name, labels[i]);
                return 1;
            }
    }
    if (k != HISTOGRAM) return 0;
    if (nbounds < 1 || nbounds > METRICS_OWN_BUCKETS_MAX) {
        snprintf(err, errlen, "metric '%s': %d buckets, want 1 to %d", name, nbounds, METRICS_OWN_BUCKETS_MAX);
        return 1;
    }
    for (int i = 0; i < nbounds; i++) {
        if (!(bounds[i] > -1e308 && bounds[i] < 1e308)) {
            snprintf(err, errlen, "metric '%s': bucket %d is not a finite number (+Inf is always added)", name,
                     i + 1);
            return 1;
        }
        if (i > 0 && bounds[i] <= bounds[i - 1]) {
            snprintf(err, errlen, "metric '%s': buckets must be increasing (bucket %d is %g after %g)", name,
                     i + 1, bounds[i], bounds[i - 1]);
            return 1;
        }
    }
    return 0;
}

/* Under mu: how an existing family differs from this definition, into
 * err; 0 when it is the same. */
static int differs(const family *f, enum kind k, const char *help, const char *const *labels, int nlabels,
                   const double *bounds, int nbounds, char *err, size_t errlen) {
    LOCK_HELD(&mu);
    if (f->kind != k) {
        snprintf(err, errlen, "metric '%s' is already defined as a %s, not a %s", f->name, kind_name(f->kind),
                 kind_name(k));
        return 1;
    }
    if (strcmp(f->help, help)) {
        snprintf(err, errlen, "metric '%s' is already defined with another help text ('%s', not '%s')", f->name,
                 f->help, help);
        return 1;
    }
    int same = f->nlabels == nlabels;
    for (int i = 0; same && i < nlabels; i++) same = !strcmp(f->label_names[i], labels[i]);
    if (!same) {
        char had[512] = "", want[512] = "";
        for (int i = 0; i < f->nlabels; i++)
            snprintf(had + strlen(had), sizeof had - strlen(had), "%s%s", i ? ", " : "", f->label_names[i]);
        for (int i = 0; i < nlabels; i++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%s", i ? ", " : "", labels[i]);
        snprintf(err, errlen, "metric '%s' is already defined with other labels ((%s), not (%s))", f->name, had,
                 want);
        return 1;
    }
    same = k != HISTOGRAM || f->nbounds == nbounds;
    for (int i = 0; same && k == HISTOGRAM && i < nbounds; i++) same = f->bounds[i] == bounds[i];
    if (!same) {
        snprintf(err, errlen, "metric '%s' is already defined with other buckets", f->name);
        return 1;
    }
    return 0;
}

static family *own_new(enum kind k, const char *name, const char *help, const char *const *labels, int nlabels,
                       const double *bounds, int nbounds) {
    family *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->kind = k;
    f->cap = METRICS_OWN_SERIES_MAX;
    f->nlabels = nlabels;
    f->name = strdup(name);
    f->help = strdup(help);
    f->label_names = calloc((size_t)nlabels + 1, sizeof *f->label_names);
    int ok = f->name && f->help && f->label_names;
    for (int i = 0; ok && i < nlabels; i++) ok = (f->label_names[i] = strdup(labels[i])) != NULL;
    if (ok && k == HISTOGRAM) {
        double *b = malloc((size_t)nbounds * sizeof *b);
        if ((ok = b != NULL)) memcpy(b, bounds, (size_t)nbounds * sizeof *b);
        f->bounds = b;
        f->nbounds = nbounds;
    }
    if (ok) return f;
    for (int i = 0; f->label_names && i < nlabels; i++) free(f->label_names[i]);
    free(f->label_names);
    free((void *)f->name);
    free((void *)f->help);
    free((void *)f->bounds);
    free(f);
    return NULL;
}

metrics_own *metrics_own_define(const char *kind, const char *name, const char *help, const char *const *labels,
                                int nlabels, const double *bounds, int nbounds, char *err, size_t errlen) {
    enum kind k = !strcmp(kind, "histogram") ? HISTOGRAM : !strcmp(kind, "gauge") ? GAUGE : COUNTER;
    if (!help) help = "";
    if (check_definition(k, name, labels, nlabels, bounds, nbounds, err, errlen)) return NULL;
    family *f = NULL;
    pthread_mutex_lock(&mu);
    for (f = own_families; f && strcmp(f->name, name); f = f->next) {}
    if (f) {
        if (differs(f, k, help, labels, nlabels, bounds, nbounds, err, errlen)) f = NULL;
    } else if (own_count >= METRICS_OWN_FAMILIES_MAX) {
        snprintf(err, errlen, "metric '%s': %d metrics are defined already, the most a host keeps", name,
                 METRICS_OWN_FAMILIES_MAX);
    } else if (!(f = own_new(k, name, help, labels, nlabels, bounds, nbounds))) {
        snprintf(err, errlen, "metric '%s': out of memory", name);
    } else {
        *own_tail = f;
        own_tail = &f->next;
        own_count++;
        /* an unlabelled family has its one series from the start, so it
         * shows as 0 before its first sample */
        if (!nlabels) find(f, "");
    }
    pthread_mutex_unlock(&mu);
    return f;
}

const char *metrics_own_name(const metrics_own *f) { return f->name; }
int metrics_own_nlabels(const metrics_own *f) { return f->nlabels; }
const char *metrics_own_label(const metrics_own *f, int i) { return f->label_names[i]; }

int metrics_own_check(const char *kind, const char *name, char *err, size_t errlen) {
    enum kind k = !strcmp(kind, "histogram") ? HISTOGRAM : !strcmp(kind, "gauge") ? GAUGE : COUNTER;
    static const double one_bound[] = {1};
    return check_definition(k, name, NULL, 0, one_bound, 1, err, errlen);
}

/* The rendered label set of these values (escaped), malloc'd; "" (also
 * malloc'd) for an unlabelled family; NULL when out of memory. */
static char *label_text(const family *f, const char *const *values) {
    if (!f->nlabels) return strdup("");
    char *text = NULL;
    size_t n = 0;
    FILE *m = open_memstream(&text, &n);
    if (!m) return NULL;
    for (int i = 0; i < f->nlabels; i++) {
        fprintf(m, "%s%s=\"", i ? "," : "", f->label_names[i]);
        metrics_label_value(m, values[i]);
        fputc('"', m);
    }
    if (fclose(m) || !text) {
        free(text);
        return NULL;
    }
    return text;
}

metrics_own *metrics_own_find(const char *name, const char *kind) {
    enum kind k = !strcmp(kind, "histogram") ? HISTOGRAM : !strcmp(kind, "gauge") ? GAUGE : COUNTER;
    pthread_mutex_lock(&mu);
    family *f = own_families;
    while (f && strcmp(f->name, name)) f = f->next;
    pthread_mutex_unlock(&mu);
    return f && f->kind == k ? f : NULL;
}

int metrics_own_remove(metrics_own *f, const char *const *values) {
    char *text = values ? label_text(f, values) : NULL;
    if (values && !text) return 0;
    int n = 0;
    pthread_mutex_lock(&mu);
    for (series **p = &f->series; *p;) {
        series *s = *p;
        if (text && strcmp(s->labels, text)) {
            p = &s->next;
            continue;
        }
        *p = s->next;
        free(s->labels);
        free(s->buckets);
        free(s);
        f->nseries--;
        n++;
    }
    /* under the cap again: a new series past it is worth a warning again */
    if (f->nseries < f->cap) f->warned = 0;
    pthread_mutex_unlock(&mu);
    free(text);
    return n;
}

void metrics_own_sample(metrics_own *f, metrics_own_op op, double v, const char *const *values) {
    char *text = label_text(f, values);
    if (!text) return;
    pthread_mutex_lock(&mu);
    series *s = find(f, text);
    if (s && op == METRICS_OWN_OBSERVE) observe_in(f, s, v);
    else if (s && op == METRICS_OWN_SET) s->value = v;
    else if (s) s->value += v;
    pthread_mutex_unlock(&mu);
    free(text);
}

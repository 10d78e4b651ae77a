/* metrics.h -- the host's counters, gauges and histograms, and its slots.
 *
 * One registry per process, under one mutex held only to add to a number
 * or copy it out: instrumenting a slot or the heartbeat costs a lock and a
 * few adds, never I/O. The HTTP server (http.c) renders it in the
 * Prometheus text format and adds what is read at scrape time (the
 * session's time left, the pool, the fleet from the database).
 *
 * The slot table: each slot thread registers itself once; work start and
 * end on that thread mark it busy with its machine, or idle. The status
 * page and the slots gauge read it. Threads that registered nothing (a
 * one-off script) only count. */
#ifndef BMDB_METRICS_H
#define BMDB_METRICS_H

#include <stddef.h>
#include <stdio.h>

void metrics_session_started(void);
void metrics_session_lost(void);
/* One heartbeat poke: ok, and how long it took (seconds). */
void metrics_heartbeat(int ok, double seconds);

void metrics_tx_committed(void);
/* A transaction retried; why is its SQLSTATE ("40001") or "connection". */
void metrics_tx_retried(const char *why);
void metrics_tx_failed(void);
/* The stop line's counts: items claimed, and the slots' transactions
 * retried (40001/40P01), the price of SERIALIZABLE claims. */
void metrics_count_claim(void);
void metrics_count_retry(void);
void metrics_claim_counts(unsigned long *claims, unsigned long *retries);

/* event: "started", or how it ended ("finished", "failed", "canceled",
 * "lost"); machine is noted for the calling slot, seconds is the duration
 * of an ended item. */
void metrics_work(const char *process, const char *event, const char *machine, double seconds);
void metrics_claim_empty(const char *process);

/* How many items claimed ahead of process's slots wait in the host now
 * (sched.h's queue of handed items). */
void metrics_items_waiting(const char *process, int n);
/* An item claimed ahead was given back (sched.h, SCHED_GIVE_BACK_S). */
void metrics_item_given_back(const char *process);

/* A bmdb.http request to host ended: status 0 when it got no response. */
void metrics_http(const char *host, int status, double seconds);
/* A bmdb.exec call ended (lexec.c): command is the program's base name,
 * outcome one of exited, signaled, timeout, too_large, lost, canceled,
 * spawn_failed, failed; seconds < 0: it never ran (no duration). The
 * first EXEC_COMMANDS_MAX names get series of their own, the rest count
 * as command="other", so a script cannot grow the registry unbounded. */
#define EXEC_COMMANDS_MAX 32
void metrics_exec(const char *command, const char *outcome, double seconds);
/* A take of limit (bmdb.limit) that had to wait, and for how long in all
 * (its wait however it ended: a token or place, max_wait, a fence stop). */
void metrics_limit_wait(const char *limit, double seconds);
/* A singleton loop's run ended here (outcome: finished, failed, lost);
 * whether this host holds the loop (1) or stands by (0). */
void metrics_loop_run(const char *loop, const char *outcome, double seconds);
void metrics_loop_held(const char *loop, int held);

void metrics_reload(int refused);
/* Work rows no slot held, released by the stray sweep (strays.h). */
void metrics_strays_released(long n);

/* The calling thread is slot `index` of process until metrics_slot_unbind. */
void metrics_slot_bind(const char *process, int index);
void metrics_slot_unbind(void);

typedef struct metrics_slot_view {
    char process[64];
    int index;
    int busy;
    char machine[40];
    double busy_for; /* seconds, when busy */
} metrics_slot_view;
/* Copies up to max slots, sorted by process then index; returns how many
 * there are (may exceed max). */
int metrics_slots_read(metrics_slot_view *out, int max);

/* Operators' own families (bmdb.metrics, lmetrics.c), in the same
 * registry under the same mutex, rendered after the host's. One family per
 * name for the whole process: every Lua state that defines a name gets the
 * same one, and a definition that differs is refused. Families are never
 * freed (a handle stays valid in any state, across reloads). */
#define METRICS_OWN_NAME_MAX 128     /* a metric's or a label's name, bytes */
#define METRICS_OWN_LABELS_MAX 16    /* label names of one family */
#define METRICS_OWN_BUCKETS_MAX 64   /* a histogram's bounds, +Inf aside */
#define METRICS_OWN_SERIES_MAX 1000  /* series of one family: samples of more are dropped, logged once */
#define METRICS_OWN_FAMILIES_MAX 1000
typedef struct metrics_family metrics_own;
/* kind: "counter", "gauge" or "histogram"; labels: nlabels names; bounds:
 * a histogram's upper bounds, ascending (+Inf is added). Returns the
 * family, or NULL with why in err: a rule broken (Prometheus' names, the
 * host's bmdb_ prefix, a histogram's le) or how a definition of the same
 * name differs. */
metrics_own *metrics_own_define(const char *kind, const char *name, const char *help, const char *const *labels,
                                int nlabels, const double *bounds, int nbounds, char *err, size_t errlen);
const char *metrics_own_name(const metrics_own *f);
int metrics_own_nlabels(const metrics_own *f);
const char *metrics_own_label(const metrics_own *f, int i);
typedef enum { METRICS_OWN_ADD, METRICS_OWN_SET, METRICS_OWN_OBSERVE } metrics_own_op;
/* One sample: values are the label values, in the order of the family's
 * names (escaped here). A new series beyond the family's cap is dropped. */
void metrics_own_sample(metrics_own *f, metrics_own_op op, double v, const char *const *values);

/* Writes every family of the registry, with HELP and TYPE, to out: the
 * host's, the slots gauge, then the operators'. */
void metrics_render(FILE *out);
/* The operators' own families (bmdb.metrics), written after every series
 * of the host's (http.c). */
void metrics_render_own(FILE *out);

/* Writes `value` as a Prometheus label value (quotes not included). */
void metrics_label_value(FILE *out, const char *value);

#endif

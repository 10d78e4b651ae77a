/* http.c -- the --http server: /metrics, the status page, /healthz.
 *
 *   /metrics          Prometheus text format: the registry (metrics.c), the
 *                     session's time left, the pool, and the fleet read
 *                     from the database (cached a second)
 *   /                 this host, then the fleet (sessions, processes, latest
 *                     failures, work, backoffs, loops), as plain HTML and CSS
 *   /machine/<id>     one machine: its work, backoffs and history (capped)
 *   /healthz          200 while the session is live, else 503; one line
 *
 * With --http-auth every request but those --http-open leaves open must
 * carry the secret (httpauth.c), or is answered 401 and nothing else.
 *
 * libmicrohttpd parses HTTP and runs the requests on a small pool of its
 * own threads. Hostile clients are its limits' business: a total and a
 * per-address connection cap, an idle timeout (slowloris), a per-connection
 * memory pool that a request line or header cannot outgrow (a 10 MB
 * request line is answered 414/431 and closed). Every response is built
 * before it is queued, and nothing here takes a lock a slot or the
 * heartbeat waits on for long: the registry's is held to copy numbers, the
 * pool's to read two counts.
 *
 * Globals and their guards:
 *   daemon, the_pool, component       set by http_start before the daemon
 *                                     runs, cleared by http_stop after it
 *                                     stopped: read without a lock between
 *   conn, fleet cache                 db_mu (a timed lock: a request that
 *                                     cannot get it in time answers
 *                                     without the database)
 * db_mu is taken with no other lock held; metrics.c's and the pool's locks
 * are taken under it, never the other way round. */
#define _GNU_SOURCE /* pthread_mutex_clocklock */
#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "httpauth.h"
#include "lifecycle.h"
#include "lockcheck.h"
#include "log.h"
#include "metrics.h"
#include "pqerr.h"
#include "report.h"
#include "session.h"
#include "snapshot.h"
#include "work.h"

#define DB_WAIT_S 2.0        /* for db_mu, and for each statement */
#define FLEET_CACHE_S 1.0    /* the fleet gauges are read at most this often */
#define ROWS_MAX "200"       /* rows per table on a page */
#define CELL_MAX 160         /* bytes of a value in a table cell */
#define CAUSE_MAX 2000       /* bytes of a cause on a machine's page */
#define HISTORY_MAX "1000"   /* events on a machine's page */

static struct MHD_Daemon *daemon_;
static pool *the_pool;
static char component[256];

static pthread_mutex_t db_mu = PTHREAD_MUTEX_INITIALIZER;
static PGconn *conn; /* under db_mu */

typedef struct fleet_row {
    char process[64];
    double in_flight, backoff;
} fleet_row;
static struct {
    double at; /* monotonic; 0: never read */
    int ok, n;
    fleet_row rows[64];
} fleet; /* under db_mu */

/* ---- the database, bounded --------------------------------------------------- */

/* Under db_mu: our connection, opened if needed. It is outside the pool's
 * bound, so a page never waits for a slot to give one back. */
static PGconn *db_conn(char *err, size_t errlen) {
    if (conn && PQstatus(conn) == CONNECTION_OK) return conn;
    if (conn) PQfinish(conn);
    conn = pool_connect_own(the_pool, err, errlen);
    return conn;
}

/* Under db_mu: runs one read-only statement, waiting DB_WAIT_S at most; on
 * a timeout the statement is cancelled and the connection given up (the
 * next request opens another). NULL with err set on failure. */
static PGresult *db_query(const char *sql, int n, const char *const *params, char *err, size_t errlen) {
    if (!db_conn(err, errlen)) return NULL;
    PGresult *r = pool_exec_bounded(&conn, sql, n, params, mono_now() + DB_WAIT_S, err, errlen);
    if (PQresultStatus(r) == PGRES_TUPLES_OK) return r;
    if (r) {
        pq_error_text(conn, r, err, errlen);
        PQclear(r);
        PQfinish(conn); /* a failed read: start clean next time */
        conn = NULL;
    }
    return NULL;
}

static int db_lock(void) {
    /* Monotonic, like every timed wait of the host: a clock step must not
     * turn this bound into none. */
    struct timespec ts = time_after(CLOCK_MONOTONIC, DB_WAIT_S);
    return pthread_mutex_clocklock(&db_mu, CLOCK_MONOTONIC, &ts) == 0;
}

/* ---- /metrics ---------------------------------------------------------------- */

/* Under db_mu: the fleet's work in flight and backoffs by process, read at
 * most once a second whatever the number of scrapers. */
static void fleet_refresh(void) {
    LOCK_HELD(&db_mu);
    if (fleet.at && mono_now() - fleet.at < FLEET_CACHE_S) return;
    char err[512];
    PGresult *r = db_query("SELECT process, sum(w) AS in_flight, sum(b) AS backoff FROM ("
                           " SELECT process, 1 AS w, 0 AS b FROM work"
                           " UNION ALL SELECT process, 0, 1 FROM work_backoff WHERE backoff_until > now()"
                           ") AS t GROUP BY process ORDER BY process LIMIT 64",
                           0, NULL, err, sizeof err);
    fleet.at = mono_now();
    fleet.ok = r != NULL;
    if (!r) {
        log_kv(LOG_DEBUG, "http: reading the fleet failed", "error", err, NULL);
        return;
    }
    fleet.n = PQntuples(r);
    for (int i = 0; i < fleet.n; i++) {
        snprintf(fleet.rows[i].process, sizeof fleet.rows[i].process, "%s", PQgetvalue(r, i, 0));
        fleet.rows[i].in_flight = atof(PQgetvalue(r, i, 1));
        fleet.rows[i].backoff = atof(PQgetvalue(r, i, 2));
    }
    PQclear(r);
}

static void render_fleet(FILE *out) {
    fputs("# HELP bmdb_fleet_up Whether the last read of the fleet from the database succeeded.\n"
          "# TYPE bmdb_fleet_up gauge\n",
          out);
    int locked = db_lock(); /* else: the last values, as they were */
    if (locked) fleet_refresh();
    fprintf(out, "bmdb_fleet_up %d\n", fleet.ok);
    static const char *const names[2][2] = {
        {"bmdb_fleet_work_in_flight", "Work items held across the fleet, by process."},
        {"bmdb_fleet_machines_in_backoff", "Machines in backoff across the fleet, by process."}};
    for (int k = 0; k < 2; k++) {
        fprintf(out, "# HELP %s %s\n# TYPE %s gauge\n", names[k][0], names[k][1], names[k][0]);
        for (int i = 0; fleet.ok && i < fleet.n; i++) {
            fprintf(out, "%s{process=\"", names[k][0]);
            metrics_label_value(out, fleet.rows[i].process);
            fprintf(out, "\"} %g\n", k ? fleet.rows[i].backoff : fleet.rows[i].in_flight);
        }
    }
    if (locked) pthread_mutex_unlock(&db_mu);
}

static void render_metrics(FILE *out) {
    metrics_render(out);
    char id[64], why[256];
    double left;
    int live = sessions_describe(id, sizeof id, &left, why, sizeof why);
    fprintf(out,
            "# HELP bmdb_session_live Whether this host has a live session.\n# TYPE bmdb_session_live gauge\n"
            "bmdb_session_live %d\n"
            "# HELP bmdb_session_deadline_seconds Time left before this host's local deadline passes.\n"
            "# TYPE bmdb_session_deadline_seconds gauge\nbmdb_session_deadline_seconds %.3f\n",
            live, live ? left : 0.0);
    int in_use, idle;
    pool_stats(the_pool, &in_use, &idle);
    fprintf(out,
            "# HELP bmdb_pool_connections Pooled database connections, by state (in_use, idle).\n"
            "# TYPE bmdb_pool_connections gauge\n"
            "bmdb_pool_connections{state=\"in_use\"} %d\nbmdb_pool_connections{state=\"idle\"} %d\n",
            in_use, idle);
    render_fleet(out);
    metrics_render_own(out);
}

/* ---- HTML -------------------------------------------------------------------- */

/* Writes s escaped for HTML text and attributes, cut after max bytes (at a
 * character boundary) with the size of what was left out; control
 * characters become a visible mark, so a newline cannot hide a line. */
static void html_cut(FILE *out, const char *s, size_t max, size_t total) {
    size_t len = strlen(s), n = len;
    if (n > max) {
        n = max;
        while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80) n--; /* not inside a UTF-8 sequence */
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        switch (ch) {
        case '&': fputs("&amp;", out); break;
        case '<': fputs("&lt;", out); break;
        case '>': fputs("&gt;", out); break;
        case '"': fputs("&quot;", out); break;
        case '\'': fputs("&#39;", out); break;
        case '\n': fputs(" &#9166; ", out); break;
        default:
            if (ch < 0x20 || ch == 0x7f) fputc(' ', out);
            else fputc(ch, out);
        }
    }
    if (total < len) total = len;
    if (n < total) fprintf(out, "<span class=cut>&hellip; (%zu more bytes)</span>", total - n);
}

static void html(FILE *out, const char *s, size_t max) { html_cut(out, s, max, 0); }

/* "3d 4h", "2h 05m", "4m 07s", "12s", "0.4s"; negative as "-". */
static void duration(FILE *out, double s) {
    if (s < 0) fputs("&minus;", out), s = -s;
    long t = (long)s;
    if (s < 10) fprintf(out, "%.1fs", s);
    else if (t < 60) fprintf(out, "%lds", t);
    else if (t < 3600) fprintf(out, "%ldm %02lds", t / 60, t % 60);
    else if (t < 86400) fprintf(out, "%ldh %02ldm", t / 3600, t % 3600 / 60);
    else fprintf(out, "%ldd %ldh", t / 86400, t % 86400 / 3600);
}

static void machine_link(FILE *out, const char *id) {
    fputs("<a class=id href=\"/machine/", out);
    html(out, id, 64);
    fputs("\">", out);
    html(out, id, 64);
    fputs("</a>", out);
}

static const char css[] =
    "body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;padding:.5em;max-width:70em;color:#222;background:#fff}"
    "h1{font-size:1.3em;margin:.3em 0}h2{font-size:1.1em;margin:1.2em 0 .3em;border-bottom:1px solid #ccc}"
    ".scroll{overflow-x:auto}table{border-collapse:collapse;width:100%}"
    "th,td{text-align:left;padding:.2em .5em;border-bottom:1px solid #eee;vertical-align:top}"
    "td{overflow-wrap:anywhere}th{background:#f4f4f4;font-weight:600}"
    ".id{font-family:ui-monospace,monospace;font-size:.9em}.cut{color:#888}"
    ".ok{color:#060;font-weight:600}.bad{color:#b00;font-weight:600}.muted{color:#777}"
    "dl{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;margin:0}dt{color:#555}dd{margin:0}"
    "@media (max-width:40em){body{font-size:14px}th,td{padding:.2em .3em}}";

static void page_head(FILE *out, const char *title) {
    fputs("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
          "<meta name=viewport content=\"width=device-width,initial-scale=1\"><title>",
          out);
    html(out, title, 200);
    fprintf(out, "</title><style>%s</style></head><body>\n", css);
}

static void table_open(FILE *out, const char *const *cols) {
    fputs("<div class=scroll><table><thead><tr>", out);
    for (; *cols; cols++) fprintf(out, "<th>%s</th>", *cols);
    fputs("</tr></thead><tbody>\n", out);
}

/* cap: the statement's LIMIT, said when reached; 0 when the caller says it. */
static void table_close(FILE *out, int rows, int ncols, const char *empty, int cap) {
    if (!rows) fprintf(out, "<tr><td colspan=%d class=muted>%s</td></tr>", ncols, empty);
    fputs("</tbody></table></div>\n", out);
    if (cap && rows >= cap) fprintf(out, "<p class=muted>The first %d rows only.</p>\n", cap);
}

static const char *state_name(void) {
    switch (lifecycle_state()) {
    case HOST_RUNNING: return "running";
    case HOST_DRAINING: return "draining";
    default: return "cancelling";
    }
}

/* This host: what needs no database. */
static void host_section(FILE *out) {
    char id[64], why[256];
    double left;
    int live = sessions_describe(id, sizeof id, &left, why, sizeof why);
    fputs("<h1>bmdb-host: ", out);
    html(out, component, 100);
    fputs("</h1>\n<dl><dt>session</dt><dd>", out);
    if (live) {
        fputs("<span class=ok>live</span> <span class=id>", out);
        html(out, id, 64);
        fputs("</span></dd><dt>deadline in</dt><dd>", out);
        duration(out, left);
    } else {
        fputs("<span class=bad>none</span> ", out);
        html(out, why, 200);
    }
    fprintf(out, "</dd><dt>state</dt><dd>%s</dd><dt>code generation</dt><dd>%u</dd></dl>\n", state_name(),
            snapshot_generation());

    enum { MAX = 256 };
    metrics_slot_view *v = malloc(MAX * sizeof *v);
    int n = v ? metrics_slots_read(v, MAX) : 0;
    fprintf(out, "<h2>slots (%d)</h2>\n", n);
    static const char *const cols[] = {"process", "slot", "state", "machine", "for", NULL};
    table_open(out, cols);
    for (int i = 0; i < n && i < MAX; i++) {
        fputs("<tr><td>", out);
        html(out, v[i].process, 64);
        fprintf(out, "</td><td>%d</td><td>%s</td><td>", v[i].index, v[i].busy ? "busy" : "idle");
        if (v[i].busy && v[i].machine[0]) machine_link(out, v[i].machine);
        fputs("</td><td>", out);
        if (v[i].busy) duration(out, v[i].busy_for);
        fputs("</td></tr>\n", out);
    }
    table_close(out, n, 5, "no slots (a one-off script, or not started yet)", MAX);
    free(v);
}

/* Runs sql and writes its rows with row(out, result, i). Under db_mu. */
static int db_table_cap(FILE *out, int cap, const char *title, const char *const *cols, const char *sql, int nparams,
                    const char *const *params, void (*row)(FILE *, PGresult *, int), const char *empty) {
    char err[512];
    PGresult *r = db_query(sql, nparams, params, err, sizeof err);
    fputs("<h2>", out);
    html(out, title, 100);
    if (!r) {
        fputs("</h2><p class=bad>cannot read: ", out);
        html(out, err, 300);
        fputs("</p>\n", out);
        return -1;
    }
    fprintf(out, " (%d)</h2>\n", PQntuples(r));
    table_open(out, cols);
    int ncols = 0;
    while (cols[ncols]) ncols++;
    for (int i = 0; i < PQntuples(r); i++) {
        fputs("<tr>", out);
        row(out, r, i);
        fputs("</tr>\n", out);
    }
    table_close(out, PQntuples(r), ncols, empty, cap);
    PQclear(r);
    return 0;
}

static int db_table(FILE *out, const char *title, const char *const *cols, const char *sql, int nparams,
                    const char *const *params, void (*row)(FILE *, PGresult *, int), const char *empty) {
    return db_table_cap(out, atoi(ROWS_MAX), title, cols, sql, nparams, params, row, empty);
}

static void cell(FILE *out, PGresult *r, int i, int j, size_t max) {
    fputs("<td>", out);
    html(out, PQgetvalue(r, i, j), max);
    fputs("</td>", out);
}

static void cell_duration(FILE *out, PGresult *r, int i, int j) {
    fputs("<td>", out);
    duration(out, atof(PQgetvalue(r, i, j)));
    fputs("</td>", out);
}

static void cell_machine(FILE *out, PGresult *r, int i, int j) {
    fputs("<td>", out);
    machine_link(out, PQgetvalue(r, i, j));
    fputs("</td>", out);
}

enum { AGO, AHEAD, SPAN };
/* An age ("4m 07s ago"), a time to come ("in 12s") or a span; "never"
 * for NULL. */
static void cell_when(FILE *out, PGresult *r, int i, int j, int how) {
    fputs("<td>", out);
    if (PQgetisnull(r, i, j)) fputs("<span class=muted>never</span>", out);
    else {
        double v = atof(PQgetvalue(r, i, j));
        if (how == AHEAD && v <= 0) how = AGO, v = -v, fputs("due ", out); /* and not taken yet */
        fputs(how == AHEAD ? "in " : "", out);
        duration(out, v);
        fputs(how == AGO ? " ago" : "", out);
    }
    fputs("</td>", out);
}

static void session_row(FILE *out, PGresult *r, int i) {
    cell(out, r, i, 0, 64);
    cell(out, r, i, 1, CELL_MAX);
    cell(out, r, i, 2, CELL_MAX);
    int live = PQgetvalue(r, i, 3)[0] == 't';
    fprintf(out, "<td class=%s>%s</td>", live ? "ok" : "bad", live ? "live" : "expired");
    cell_duration(out, r, i, 4);
}

static void work_row(FILE *out, PGresult *r, int i) {
    cell_machine(out, r, i, 0);
    cell(out, r, i, 1, 64);
    cell(out, r, i, 2, 64);
    cell_duration(out, r, i, 3);
}

/* A cause the server cut (substr), with its whole length in column j+1. */
static void cell_cause(FILE *out, PGresult *r, int i, int j, size_t max) {
    fputs("<td>", out);
    html_cut(out, PQgetvalue(r, i, j), max, (size_t)atol(PQgetvalue(r, i, j + 1)));
    fputs("</td>", out);
}

static void backoff_row(FILE *out, PGresult *r, int i) {
    cell_machine(out, r, i, 0);
    cell(out, r, i, 1, 64);
    cell(out, r, i, 2, 32);
    cell_duration(out, r, i, 3);
    cell_cause(out, r, i, 4, CELL_MAX);
}

static void process_row(FILE *out, PGresult *r, int i) {
    for (int j = 0; j < 5; j++) cell(out, r, i, j, 64);
}

static void failure_row(FILE *out, PGresult *r, int i) {
    cell(out, r, i, 0, 64);
    cell_machine(out, r, i, 1);
    cell_when(out, r, i, 2, AGO);
    cell_cause(out, r, i, 3, CELL_MAX);
}

/* The holder: its live session (id, component, runtime), else none. */
static void loop_row(FILE *out, PGresult *r, int i) {
    cell(out, r, i, 0, 64);
    if (PQgetisnull(r, i, 1)) {
        fputs("<td class=muted>none</td><td></td>", out);
    } else {
        fputs("<td><span class=id>", out);
        html(out, PQgetvalue(r, i, 1), 64);
        fputs("</span><br>", out);
        html(out, PQgetvalue(r, i, 2), CELL_MAX);
        fputs(" ", out);
        html(out, PQgetvalue(r, i, 3), CELL_MAX);
        fputs("</td>", out);
        cell_when(out, r, i, 4, SPAN);
    }
    cell_when(out, r, i, 5, AGO);
    cell_when(out, r, i, 6, AGO);
    cell_when(out, r, i, 7, AHEAD);
    cell(out, r, i, 8, 32);
    cell_cause(out, r, i, 9, CELL_MAX);
}

static void loop_event_row(FILE *out, PGresult *r, int i) {
    cell(out, r, i, 0, 64);
    cell_when(out, r, i, 1, AGO);
    cell(out, r, i, 2, 32);
    cell(out, r, i, 3, 64);
    cell_cause(out, r, i, 4, CELL_MAX);
}

static void history_row(FILE *out, PGresult *r, int i) {
    cell(out, r, i, 0, 64);
    cell(out, r, i, 1, 64);
    cell(out, r, i, 2, 32);
    cell(out, r, i, 3, 64);
    cell_cause(out, r, i, 4, CAUSE_MAX);
}

/* Values that may be long are cut by the server too (substr), so a 100 kB
 * cause is never fetched whole. */
static const char SQL_SESSIONS[] =
    "SELECT session_id, component_name, runtime_info, deadline > now() AS live, "
    "EXTRACT(EPOCH FROM (deadline - now()))::FLOAT8 AS left_s "
    "FROM sessions ORDER BY created_at LIMIT " ROWS_MAX;
static const char SQL_WORK[] =
    "SELECT machine_id, process, session_id, EXTRACT(EPOCH FROM (now() - started_at))::FLOAT8 AS age "
    "FROM work ORDER BY started_at LIMIT " ROWS_MAX;
static const char SQL_BACKOFFS[] =
    "SELECT machine_id, process, attempts, EXTRACT(EPOCH FROM (backoff_until - now()))::FLOAT8 AS left_s, "
    "substr(cause, 1, 4000) AS cause, octet_length(cause) FROM work_backoff WHERE backoff_until > now() "
    "ORDER BY backoff_until LIMIT " ROWS_MAX;

static const char SQL_PROCESSES[] = REPORT_PROCESS_COUNTS_SQL " LIMIT " ROWS_MAX;
static const char SQL_FAILURES[] =
    "SELECT process, machine_id, EXTRACT(EPOCH FROM (now() - occurred_at))::FLOAT8, "
    "substr(split_part(COALESCE(cause, ''), chr(10), 1), 1, 4000), COALESCE(octet_length(cause), 0) "
    "FROM (" REPORT_LATEST_FAILURES_SQL ") AS f WHERE n <= 5 "
    "ORDER BY process, occurred_at DESC, history_id DESC LIMIT " ROWS_MAX;
static const char SQL_LOOPS[] =
    "SELECT l.name, s.session_id, s.component_name, s.runtime_info, "
    "EXTRACT(EPOCH FROM (now() - l.held_since))::FLOAT8, EXTRACT(EPOCH FROM (now() - l.last_started_at))::FLOAT8, "
    "EXTRACT(EPOCH FROM (now() - l.last_finished_at))::FLOAT8, EXTRACT(EPOCH FROM (l.next_run_at - now()))::FLOAT8, "
    "l.failures, substr(split_part(COALESCE(l.last_cause, ''), chr(10), 1), 1, 4000), "
    "COALESCE(octet_length(l.last_cause), 0) " REPORT_LOOPS_FROM_SQL " LIMIT " ROWS_MAX;
static const char SQL_LOOP_HISTORY[] =
    "SELECT l.name, EXTRACT(EPOCH FROM (now() - h.occurred_at))::FLOAT8, h.event, h.session_id, "
    "substr(COALESCE(h.cause, ''), 1, 4000), COALESCE(octet_length(h.cause), 0) " REPORT_LOOP_HISTORY_FROM_SQL
    " LIMIT " ROWS_MAX;

static void status_page(FILE *out) {
    page_head(out, "bmdb-host status");
    host_section(out);
    fputs("<h1>fleet</h1>\n", out);
    if (!db_lock()) {
        fputs("<p class=bad>the database is busy with another request; reload in a moment</p>", out);
    } else {
        static const char *const scols[] = {"session", "component", "runtime", "state", "deadline in", NULL};
        static const char *const wcols[] = {"machine", "process", "session", "age", NULL};
        static const char *const bcols[] = {"machine", "process", "attempts", "time left", "cause", NULL};
        static const char *const pcols[] = {"process", "in flight", "in backoff", "machines failed (1 h)",
                                            "failures (1 h)", NULL};
        static const char *const fcols[] = {"process", "machine", "when", "cause (first line)", NULL};
        static const char *const lcols[] = {"loop", "holder", "held for", "last started", "last finished",
                                            "next run", "failures", "last cause", NULL};
        static const char *const ecols[] = {"loop", "when", "event", "session", "cause", NULL};
        if (db_table(out, "sessions", scols, SQL_SESSIONS, 0, NULL, session_row, "none") == 0 &&
            db_table(out, "processes", pcols, SQL_PROCESSES, 0, NULL, process_row, "none") == 0 &&
            db_table(out, "latest failures (5 per process, last 24 h)", fcols, SQL_FAILURES, 0, NULL,
                     failure_row, "none") == 0 &&
            db_table(out, "work in flight", wcols, SQL_WORK, 0, NULL, work_row, "none") == 0 &&
            db_table(out, "backoffs", bcols, SQL_BACKOFFS, 0, NULL, backoff_row, "none") == 0 &&
            db_table(out, "loops", lcols, SQL_LOOPS, 0, NULL, loop_row, "none") == 0)
            db_table(out, "loop history (newest 10 per loop)", ecols, SQL_LOOP_HISTORY, 0, NULL, loop_event_row,
                     "none");
        pthread_mutex_unlock(&db_mu);
    }
    fputs("</body></html>\n", out);
}

/* One machine: 404 when neither the machines table nor the history knows
 * it, else 200 (a database error said on the page). Its history is capped at HISTORY_MAX events, newest first, and the
 * page says how many there are in all. */
static unsigned machine_page(FILE *out, const char *id) {
    page_head(out, "bmdb-host: machine");
    fputs("<p><a href=\"/\">&larr; status</a></p><h1>machine <span class=id>", out);
    html(out, id, 64);
    fputs("</span></h1>\n", out);
    unsigned status = MHD_HTTP_OK;
    if (!db_lock()) {
        fputs("<p class=bad>the database is busy with another request; reload in a moment</p>", out);
        fputs("</body></html>\n", out);
        return MHD_HTTP_OK; /* as the status page: the page says why */
    }
    const char *params[] = {id};
    char err[512];
    PGresult *r = db_query("SELECT (SELECT created_at::TEXT FROM machines WHERE machine_id = $1), "
                           "(SELECT count(*) FROM work_history WHERE machine_id = $1)",
                           1, params, err, sizeof err);
    if (!r) {
        fputs("<p class=bad>cannot read: ", out);
        html(out, err, 300);
        fputs("</p>\n", out);
    } else if (PQgetisnull(r, 0, 0) && atol(PQgetvalue(r, 0, 1)) == 0) {
        fputs("<p class=bad>no such machine: it is not in the machines table and has no history</p>\n", out);
        status = MHD_HTTP_NOT_FOUND;
    } else {
        long events = atol(PQgetvalue(r, 0, 1));
        fputs("<dl><dt>created</dt><dd>", out);
        if (PQgetisnull(r, 0, 0)) fputs("<span class=bad>not in the machines table (deleted)</span>", out);
        else html(out, PQgetvalue(r, 0, 0), 64);
        fprintf(out, "</dd><dt>events</dt><dd>%ld</dd></dl>\n", events);
        static const char *const wcols[] = {"machine", "process", "session", "age", NULL};
        static const char *const bcols[] = {"machine", "process", "attempts", "time left", "cause", NULL};
        static const char *const hcols[] = {"when", "process", "event", "session", "cause", NULL};
        if (db_table(out, "work in flight", wcols,
                     "SELECT machine_id, process, session_id, EXTRACT(EPOCH FROM (now() - started_at))::FLOAT8 "
                     "FROM work WHERE machine_id = $1 ORDER BY started_at LIMIT " ROWS_MAX,
                     1, params, work_row, "none") == 0 &&
            db_table(out, "backoffs", bcols,
                     "SELECT machine_id, process, attempts, EXTRACT(EPOCH FROM (backoff_until - now()))::FLOAT8, "
                     "substr(cause, 1, 4000), octet_length(cause) FROM work_backoff "
                     "WHERE machine_id = $1 AND backoff_until > now() "
                     "ORDER BY backoff_until LIMIT " ROWS_MAX,
                     1, params, backoff_row, "none") == 0 &&
            db_table_cap(out, 0, "history, newest first", hcols,
                     "SELECT date_trunc('second', occurred_at)::TEXT, process, event, session_id, "
                     "COALESCE(substr(cause, 1, 2000), ''), COALESCE(octet_length(cause), 0) "
                     "FROM work_history WHERE machine_id = $1 "
                     "ORDER BY occurred_at DESC, history_id DESC LIMIT " HISTORY_MAX,
                     1, params, history_row, "no events recorded") == 0 &&
            events > atol(HISTORY_MAX))
            fprintf(out, "<p class=muted>The newest " HISTORY_MAX " of %ld events only: "
                         "<code>bmdb-host history</code> lists them all.</p>\n", events);
    }
    PQclear(r);
    pthread_mutex_unlock(&db_mu);
    fputs("</body></html>\n", out);
    return status;
}

/* ---- requests ------------------------------------------------------------------ */

/* challenge: a WWW-Authenticate value, or NULL. */
static enum MHD_Result respond(struct MHD_Connection *c, unsigned status, const char *type, char *body,
                               size_t len, const char *challenge) {
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    if (challenge) MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, challenge);
    /* The page needs its own inline style and nothing else. */
    MHD_add_response_header(r, "Content-Security-Policy",
                            "default-src 'none'; style-src 'unsafe-inline'; form-action 'none'; "
                            "frame-ancestors 'none'");
    enum MHD_Result ok = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result respond_text(struct MHD_Connection *c, unsigned status, const char *text,
                                    const char *challenge) {
    char *body = strdup(text);
    return body ? respond(c, status, "text/plain; charset=utf-8", body, strlen(body), challenge) : MHD_NO;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                              const char *version, const char *upload, size_t *upload_size, void **state) {
    (void)cls, (void)version, (void)upload, (void)upload_size, (void)state;
    /* Nothing, not even a 405 or a 404, for a request without the secret. */
    if (!httpauth_allows(url, MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION))) {
        log_kv(LOG_DEBUG, "http: unauthorized request refused", "path", url, NULL);
        return respond_text(c, MHD_HTTP_UNAUTHORIZED,
                            "unauthorized: this server wants the credentials of --http-auth\n", httpauth_challenge());
    }
    /* Answered on the first call, before any body is read: no request here
     * has a body worth reading, and one that sends a body is not waited for. */
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return respond_text(c, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD\n", NULL);
    if (!strcmp(url, "/healthz")) {
        char id[64], why[256], line[300];
        double left;
        int live = sessions_describe(id, sizeof id, &left, why, sizeof why);
        snprintf(line, sizeof line, "%s: %s\n", live ? "ok" : "unavailable", why);
        return respond_text(c, live ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, line, NULL);
    }
    char *body = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&body, &len);
    if (!out) return MHD_NO;
    const char *type = "text/html; charset=utf-8";
    unsigned status = MHD_HTTP_OK;
    if (!strcmp(url, "/metrics")) {
        type = "text/plain; version=0.0.4; charset=utf-8";
        render_metrics(out);
    } else if (!strcmp(url, "/")) {
        status_page(out);
    } else if (!strncmp(url, "/machine/", 9) && work_valid_uuid(url + 9)) {
        status = machine_page(out, url + 9);
    } else if (!strncmp(url, "/machine/", 9)) {
        type = "text/plain; charset=utf-8";
        status = MHD_HTTP_BAD_REQUEST;
        fputs("bad request: /machine/<id> takes a machine id, a UUID (8-4-4-4-12 hex digits)\n", out);
    } else {
        type = "text/plain; charset=utf-8";
        status = MHD_HTTP_NOT_FOUND;
        fputs("not found: try /, /metrics, /healthz or /machine/<id>\n", out);
    }
    if (fclose(out) != 0) {
        free(body);
        return MHD_NO;
    }
    return respond(c, status, type, body, len, NULL);
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    line[strcspn(line, "\n")] = '\0';
    log_kv(LOG_DEBUG, "http", "detail", line, NULL);
}

/* ---- start and stop ---------------------------------------------------------- */

static int parse_port(const char *s, unsigned short *port) {
    char *end;
    errno = 0;
    long n = strtol(s, &end, 10);
    if (errno || *end || end == s || n < 0 || n > 65535) return -1;
    *port = (unsigned short)n;
    return 0;
}

/* ADDR into a socket address; see http.h for the forms. */
static int parse_addr(const char *addr, struct sockaddr_storage *ss, int *v6, char *err, size_t errlen) {
    char host[128] = "127.0.0.1";
    const char *port_s = addr;
    const char *colon = strrchr(addr, ':');
    if (addr[0] == '[') {
        const char *close = strchr(addr, ']');
        if (!close || close[1] != ':' || (size_t)(close - addr - 1) >= sizeof host) goto bad;
        memcpy(host, addr + 1, (size_t)(close - addr - 1));
        host[close - addr - 1] = '\0';
        port_s = close + 2;
    } else if (colon) {
        size_t n = (size_t)(colon - addr);
        if (n >= sizeof host) goto bad;
        if (n > 0) {
            memcpy(host, addr, n);
            host[n] = '\0';
        }
        port_s = colon + 1;
    }
    if (!strcmp(host, "localhost")) snprintf(host, sizeof host, "127.0.0.1");
    unsigned short port;
    if (parse_port(port_s, &port) < 0) goto bad;
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons(port);
        *v6 = 0;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(port);
        *v6 = 1;
        return 0;
    }
bad:
    snprintf(err, errlen,
             "--http: expected PORT, 127.0.0.1:PORT, [::1]:PORT or another numeric ADDRESS:PORT, got '%s'", addr);
    return -1;
}

int http_check_addr(const char *addr, char *err, size_t errlen) {
    struct sockaddr_storage ss;
    int v6;
    return parse_addr(addr, &ss, &v6, err, errlen);
}

int http_start(const char *addr, pool *p, const char *comp, char *err, size_t errlen) {
    struct sockaddr_storage ss;
    int v6;
    if (parse_addr(addr, &ss, &v6, err, errlen) < 0) return -1;
    the_pool = p;
    snprintf(component, sizeof component, "%s", comp);
    unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_USE_ERROR_LOG | (v6 ? MHD_USE_IPv6 : 0);
    daemon_ = MHD_start_daemon(
        flags, 0, NULL, NULL, handle, NULL,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned)2,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)64,     /* in all */
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)16,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,   /* idle seconds: slowloris */
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)32768, /* request line and headers */
        MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned)64,
        MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
        MHD_OPTION_END);
    if (!daemon_) {
        snprintf(err, errlen, "--http %s: cannot listen there (%s)", addr, strerror(errno ? errno : EINVAL));
        return -1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(daemon_, MHD_DAEMON_INFO_BIND_PORT);
    char host[INET6_ADDRSTRLEN] = "?", where[INET6_ADDRSTRLEN + 16];
    if (v6) inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof host);
    else inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof host);
    snprintf(where, sizeof where, v6 ? "[%s]:%u" : "%s:%u", host, info ? (unsigned)info->port : 0);
    log_kv(LOG_INFO, "http listening", "address", where, "auth", httpauth_enabled() ? "on" : "off", NULL);
    return 0;
}

void http_stop(void) {
    if (!daemon_) return;
    MHD_stop_daemon(daemon_);
    daemon_ = NULL;
    pthread_mutex_lock(&db_mu);
    if (conn) PQfinish(conn);
    conn = NULL;
    fleet.at = 0;
    pthread_mutex_unlock(&db_mu);
    the_pool = NULL;
    httpauth_clear();
}

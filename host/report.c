/* report.c -- the read-only operator commands: status and history.
 *
 * Text: aligned columns, each row at most WIDTH columns: every column is
 * capped, the last one takes what is left, and a cut value ends in "...".
 * JSON: {"sessions": [...], "work": [...], ..., "loop_history": [...]} for status,
 * {"machine_id": ..., "events": [...]} for history; each row an object
 * keyed by the column names below, integers as numbers, NULL as null,
 * timestamps as the server writes them (ISO 8601 with a UTC offset). */
#include "report.h"

#include <string.h>

#include "pqerr.h"
#include "work.h"

#define WIDTH 100
#define COL_MAX 36 /* a UUID: every column but the last fits one whole */
#define INT8OID 20
#define INT4OID 23

static PGresult *query(PGconn *c, const char *sql, int nparams, const char *const *params, char *err,
                       size_t errlen) {
    PGresult *r = PQexecParams(c, sql, nparams, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) == PGRES_TUPLES_OK) return r;
    pq_error_text(c, r, err, errlen);
    PQclear(r);
    return NULL;
}

/* Display width of a cell: bytes that do not continue a UTF-8 sequence. */
static int text_width(const char *s) {
    int w = 0;
    for (; *s; s++) w += ((unsigned char)*s & 0xC0) != 0x80;
    return w;
}

/* Writes s padded or cut to exactly w columns, control characters as
 * spaces, so one row stays one line. */
static void put_cell(FILE *out, const char *s, int w, int pad) {
    int len = text_width(s), cut = len > w, room = cut ? w - 3 : w, used = 0;
    for (; *s && used < room; s++) {
        unsigned char ch = (unsigned char)*s;
        if ((ch & 0xC0) != 0x80) {
            if (used + 1 > room) break;
            used++;
        }
        fputc(ch < 0x20 || ch == 0x7f ? ' ' : ch, out);
    }
    while (((unsigned char)*s & 0xC0) == 0x80) fputc(*s++, out); /* finish a character */
    if (cut) fputs("..." + (w < 3 ? 3 - w : 0), out), used += w < 3 ? w : 3;
    if (pad)
        for (; used < w; used++) fputc(' ', out);
}

static void print_text(PGresult *r, FILE *out, const char *title) {
    int rows = PQntuples(r), cols = PQnfields(r);
    int width[16] = {0};
    if (cols > 16) cols = 16;
    for (int j = 0; j < cols; j++) width[j] = text_width(PQfname(r, j));
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            int w = text_width(PQgetvalue(r, i, j));
            if (w > width[j]) width[j] = w;
        }
    int used = 0;
    for (int j = 0; j < cols; j++) {
        int room = WIDTH - used - 2;
        if (j < cols - 1 && width[j] > COL_MAX) width[j] = COL_MAX;
        if (width[j] > room) width[j] = room > 1 ? room : 1;
        used += 2 + width[j];
    }
    if (title) fprintf(out, "%s (%d)\n", title, rows);
    for (int j = 0; j < cols; j++) {
        fputs("  ", out);
        put_cell(out, PQfname(r, j), width[j], j < cols - 1);
    }
    fputc('\n', out);
    for (int i = 0; i < rows; i++) {
        for (int j = 0; j < cols; j++) {
            fputs("  ", out);
            put_cell(out, PQgetisnull(r, i, j) ? "" : PQgetvalue(r, i, j), width[j], j < cols - 1);
        }
        fputc('\n', out);
    }
}

static void json_string(FILE *out, const char *s) {
    fputc('"', out);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(out, "\\%c", ch);
        else if (ch == '\n') fputs("\\n", out);
        else if (ch == '\t') fputs("\\t", out);
        else if (ch == '\r') fputs("\\r", out);
        else if (ch < 0x20 || ch == 0x7f) fprintf(out, "\\u%04x", ch);
        else fputc(ch, out);
    }
    fputc('"', out);
}

/* "key": [ {row}, ... ] */
static void print_json(PGresult *r, FILE *out, const char *key) {
    json_string(out, key);
    fputs(": [", out);
    for (int i = 0; i < PQntuples(r); i++) {
        fputs(i ? ",\n  {" : "\n  {", out);
        for (int j = 0; j < PQnfields(r); j++) {
            if (j) fputs(", ", out);
            json_string(out, PQfname(r, j));
            fputs(": ", out);
            Oid t = PQftype(r, j);
            if (PQgetisnull(r, i, j)) fputs("null", out);
            else if (t == INT8OID || t == INT4OID) fputs(PQgetvalue(r, i, j), out);
            else json_string(out, PQgetvalue(r, i, j));
        }
        fputc('}', out);
    }
    fputs(PQntuples(r) ? "\n]" : "]", out);
}

/* What a work row is doing: its session may have died, or its own timeout
 * passed (then a claim takes it over; its slot is stuck or stopping). */
#define WORK_STATE_SQL                                                  \
    "CASE WHEN s.deadline <= now() THEN 'session expired' "            \
    "WHEN w.deadline <= now() THEN 'timed out; its slot is stuck or stopping' " \
    "ELSE 'running' END"

/* Text: ages and time left in whole seconds (the width a timestamp would
 * take does not fit); JSON: timestamps too, in ISO 8601. */
static const struct { const char *key, *title, *text_sql, *json_sql; } status_tables[] = {
    {"sessions", "sessions",
     "SELECT session_id, component_name AS component, runtime_info AS runtime, "
     "CASE WHEN deadline > now() THEN 'live' ELSE 'expired' END AS state, "
     "ceil(EXTRACT(EPOCH FROM (deadline - now())))::INT8 AS deadline_in_s "
     "FROM sessions ORDER BY created_at",
     "SELECT session_id, component_name AS component, runtime_info AS runtime, "
     "CASE WHEN deadline > now() THEN 'live' ELSE 'expired' END AS state, "
     "deadline::TEXT AS deadline "
     "FROM sessions ORDER BY created_at"},
    {"work", "work in flight",
     "SELECT w.machine_id, w.process, "
     "floor(EXTRACT(EPOCH FROM (now() - w.started_at)))::INT8 AS age_s, " WORK_STATE_SQL " AS state "
     "FROM work w JOIN sessions s ON s.session_id = w.session_id ORDER BY w.started_at",
     "SELECT w.machine_id, w.process, w.session_id, w.started_at::TEXT AS started_at, "
     "w.deadline::TEXT AS deadline, " WORK_STATE_SQL " AS state "
     "FROM work w JOIN sessions s ON s.session_id = w.session_id ORDER BY w.started_at"},
    {"paused", "paused processes",
     "SELECT process, floor(EXTRACT(EPOCH FROM (now() - paused_at)))::INT8 AS paused_s, "
     "pause_reason AS reason FROM processes WHERE paused_at IS NOT NULL ORDER BY paused_at",
     "SELECT process, paused_at::TEXT AS paused_at, pause_reason AS reason "
     "FROM processes WHERE paused_at IS NOT NULL ORDER BY paused_at"},
    {"holds", "machines on hold",
     "SELECT machine_id, floor(EXTRACT(EPOCH FROM (now() - held_at)))::INT8 AS held_s, reason "
     "FROM machine_holds ORDER BY held_at",
     "SELECT machine_id, held_at::TEXT AS held_at, reason FROM machine_holds ORDER BY held_at"},
    {"backoffs", "backoffs",
     "SELECT machine_id, process, attempts, "
     "ceil(EXTRACT(EPOCH FROM (backoff_until - now())))::INT8 AS left_s, cause "
     "FROM work_backoff WHERE backoff_until > now() ORDER BY backoff_until",
     "SELECT machine_id, process, attempts, last_seconds, "
     "b.backoff_until::TEXT AS until, cause "
     "FROM work_backoff b WHERE b.backoff_until > now() ORDER BY b.backoff_until"},
    {"processes", "processes (failed: in the last hour)", REPORT_PROCESS_COUNTS_SQL, REPORT_PROCESS_COUNTS_SQL},
    {"failures", "latest failures (5 per process, last 24 h)",
     "SELECT process, machine_id, floor(EXTRACT(EPOCH FROM (now() - occurred_at)))::INT8 AS ago_s, "
     "split_part(COALESCE(cause, ''), chr(10), 1) AS cause FROM (" REPORT_LATEST_FAILURES_SQL ") AS f "
     "WHERE n <= 5 ORDER BY process, occurred_at DESC, history_id DESC",
     "SELECT process, machine_id, occurred_at::TEXT AS occurred_at, session_id, "
     "split_part(COALESCE(cause, ''), chr(10), 1) AS cause_line, cause FROM (" REPORT_LATEST_FAILURES_SQL ") AS f "
     "WHERE n <= 5 ORDER BY process, occurred_at DESC, history_id DESC"},
    {"loops", "loops (holder: its runtime; seconds since held, ran, done; next run in)",
     "SELECT l.name, COALESCE(s.runtime_info, 'none') AS holder, "
     "CASE WHEN s.session_id IS NOT NULL THEN floor(EXTRACT(EPOCH FROM (now() - l.held_since)))::INT8 END AS held_s, "
     "floor(EXTRACT(EPOCH FROM (now() - l.last_started_at)))::INT8 AS ran_s, "
     "floor(EXTRACT(EPOCH FROM (now() - l.last_finished_at)))::INT8 AS done_s, "
     "ceil(EXTRACT(EPOCH FROM (l.next_run_at - now())))::INT8 AS next_s, l.failures AS fails, "
     "split_part(COALESCE(l.last_cause, ''), chr(10), 1) AS cause " REPORT_LOOPS_FROM_SQL,
     "SELECT l.name, s.session_id AS holder, s.component_name AS holder_component, "
     "s.runtime_info AS holder_runtime, CASE WHEN s.session_id IS NOT NULL THEN l.held_since::TEXT END AS held_since, "
     "l.last_started_at::TEXT AS last_started_at, l.last_finished_at::TEXT AS last_finished_at, "
     "l.next_run_at::TEXT AS next_run_at, l.failures, l.last_seconds, l.last_cause " REPORT_LOOPS_FROM_SQL},
    {"loop_history", "loop history (newest 10 per loop)",
     "SELECT l.name, floor(EXTRACT(EPOCH FROM (now() - h.occurred_at)))::INT8 AS ago_s, h.event, "
     "h.session_id, split_part(COALESCE(h.cause, ''), chr(10), 1) AS cause " REPORT_LOOP_HISTORY_FROM_SQL,
     "SELECT l.name, h.occurred_at::TEXT AS occurred_at, h.event, h.session_id, h.cause " REPORT_LOOP_HISTORY_FROM_SQL},
};

int report_status(PGconn *c, FILE *out, int json, char *err, size_t errlen) {
    size_t n = sizeof status_tables / sizeof *status_tables;
    PGresult *r[sizeof status_tables / sizeof *status_tables] = {0};
    int rc = 0;
    /* Read everything first: a failure prints nothing rather than half. */
    for (size_t i = 0; i < n && rc == 0; i++)
        if (!(r[i] = query(c, json ? status_tables[i].json_sql : status_tables[i].text_sql, 0, NULL, err, errlen)))
            rc = -1;
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (json) {
            fputs(i ? ",\n" : "{", out);
            print_json(r[i], out, status_tables[i].key);
        } else {
            if (i) fputc('\n', out);
            print_text(r[i], out, status_tables[i].title);
        }
    }
    if (rc == 0 && json) fputs("}\n", out);
    for (size_t i = 0; i < n; i++) PQclear(r[i]);
    return rc;
}

int report_history(PGconn *c, const char *machine, FILE *out, int json, char *err, size_t errlen) {
    if (!work_valid_uuid(machine)) {
        snprintf(err, errlen, "history: machine id is not a UUID: %s", machine);
        return -2;
    }
    const char *params[] = {machine};
    PGresult *r = query(c,
                        json ? "SELECT occurred_at::TEXT AS occurred_at, process, event, session_id, "
                               "cause FROM work_history h WHERE machine_id = $1 ORDER BY h.occurred_at, h.history_id"
                             : "SELECT date_trunc('second', occurred_at)::TEXT AS occurred_at, "
                               "process, event, session_id, cause FROM work_history h "
                               "WHERE machine_id = $1 ORDER BY h.occurred_at, h.history_id",
                        1, params, err, errlen);
    if (!r) return -1;
    if (json) {
        fputs("{\"machine_id\": ", out);
        json_string(out, machine);
        fputs(",\n", out);
        print_json(r, out, "events");
        fputs("}\n", out);
    } else {
        print_text(r, out, NULL);
    }
    PQclear(r);
    return 0;
}

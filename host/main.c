/* main.c -- the bmdb-host command line and the order of start and stop.
 *
 *   start: parse -> compile the script (bad input fails before any
 *          database work) -> database (--dsn, BMDB_DSN or embedded) ->
 *          migrate -> session -> run the script on its own thread
 *   stop:  script done, or SIGTERM/SIGINT -> script ends -> session ends
 *          (held work recorded Canceled, row deleted) -> embedded stops
 *
 * The main thread only waits: every signal is blocked in every thread and
 * read here through a signalfd, so no handler ever runs inside libpq or
 * LuaJIT. The threads, who owns which connection and the order of locks
 * are in host/README.md. */
#include <errno.h>
#include <getopt.h>
#include <lauxlib.h>
#include <libgen.h>
#include <limits.h>
#include <lualib.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "bootstrap.h"
#include "control.h"
#include "http.h"
#include "httpauth.h"
#include "items.h"
#include "lcore.h"
#include "lifecycle.h"
#include "log.h"
#include "lstate.h"
#include "metrics.h"
#include "migrate.h"
#include "notify.h"
#include "pool.h"
#include "prune.h"
#include "reload.h"
#include "retry.h"
#include "report.h"
#include "sched.h"
#include "session.h"
#include "slots.h"
#include "snapshot.h"
#include "work.h"
#include "worker.h"

#define EXIT_FAILED 1 /* the script or the database failed at run time */
#define EXIT_USAGE 2  /* the command line or the script is invalid */
#define EXIT_STUCK 4  /* code that ignores cancellation kept running; left behind */

/* After cancelling, how long slots (or a one-off) get to stop. Lua code is
 * interrupted at once; this bounds a statement in flight. A loop compiled
 * by the JIT never sees the interrupt: it is left behind after this. */
#define STOP_WAIT_S 10

static const char usage_text[] =
    "usage: bmdb-host [options] SCRIPT.lua [ARGS...]   run a script (workers or one-off)\n"
    "       bmdb-host check SCRIPT.lua                 compile and validate, no database\n"
    "       bmdb-host migrate [up | down N | status]   manage the schema\n"
    "       bmdb-host status [--json]                  sessions, work in flight, pauses, holds, backoffs,\n"
    "                      per process (in flight, in backoff, failed in the last hour), the\n"
    "                      latest failures, loops (holder, runs, failures) and their events\n"
    "       bmdb-host history MACHINE [--json]         audit trail of one machine\n"
    "       bmdb-host cancel MACHINE PROCESS [--reason TEXT]  end that lock now (exit 1: none held)\n"
    "       bmdb-host pause PROCESS [--reason TEXT]    no claims of PROCESS on any host\n"
    "       bmdb-host resume PROCESS                   claims of PROCESS start again\n"
    "       bmdb-host hold MACHINE [--reason TEXT]     no process claims MACHINE\n"
    "       bmdb-host unhold MACHINE [--reason TEXT]   MACHINE can be claimed again\n"
    "       bmdb-host prune [--before TIME | --keep-days DAYS] [--dry-run] [--batch N]\n"
    "                      delete work_history and loop_history older than TIME\n"
    "                      (ISO 8601) or DAYS days (default 30; 0 prunes nothing),\n"
    "                      N rows a batch (default 1000);\n"
    "                      the latest event of a pair in flight or in backoff is kept\n"
    "       bmdb-host retry MACHINE PROCESS [--reason TEXT]  end that backoff now (exit 1: none)\n"
    "       bmdb-host retry --process P [--cause TEXT] [--since TIME] [--dry-run] [--reason TEXT]\n"
    "                                                  end the backoffs of P's pairs that match\n"
    "\n"
    "options:\n"
    "  --dsn DSN          libpq conninfo or URI (default: $BMDB_DSN, else embedded)\n"
    "  --data-dir DIR     embedded database directory (default: .bmdb)\n"
    "  --no-migrate       do not apply pending migrations; refuse to run if any\n"
    "  --migrations DIR   the operator's own migrations, applied after the core's\n"
    "  --component NAME   session component name (default: the script's name)\n"
    "  --interval SECS    session heartbeat interval (default: 5)\n"
    "  --grace SECS       drain time for items in flight on SIGTERM (default: 30)\n"
    "  --watch            reload the script when its files change\n"
    "  --keep-history DAYS a worker script's retention loop prunes history older than\n"
    "                     DAYS days, as prune does (default: 30; 0 keeps it all)\n"
    "  --http ADDR        serve /metrics, a status page and /healthz on ADDR: PORT or\n"
    "                     127.0.0.1:PORT, [::1]:PORT; other addresses only as written\n"
    "  --http-auth FILE   every --http request must carry the secret FILE holds, read\n"
    "                     once at start: its one line is user:password (Basic) if it\n"
    "                     has a ':', else a bearer token (Authorization: Bearer ...)\n"
    "  --http-open LIST   with --http-auth, leave these open: healthz, metrics or\n"
    "                     healthz,metrics\n"
    "  --pooler MODE      refuse (default): refuse to start behind a pooler in transaction or\n"
    "                     statement mode (detected at connect); session: there is none, do\n"
    "                     not probe; transaction: run behind one, with no prepared statements,\n"
    "                     no LISTEN (idle slots poll) and no backend ended by pid\n"
    "  --log-level LEVEL  debug, info, warn or error (default: info)\n"
    "  --log-format FMT   logfmt or json (default: logfmt)\n"
    "  -h, --help         show this help\n";

struct options {
    const char *dsn, *data_dir, *component, *migrations, *http, *http_auth, *http_open;
    int interval, grace, watch, migrate, keep_history;
};

/* Prints "bmdb-host: <message>" on stderr and returns code, so a command
 * can `return print_error(EXIT_USAGE, ...)`. */
static int print_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int print_error(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("bmdb-host: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return code;
}

static int parse_int(const char *flag, const char *v, int min, int max, int *out) {
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || *end || end == v || n < min || n > max) {
        print_error(EXIT_USAGE, "%s: expected a whole number from %d to %d, got '%s'", flag, min, max, v);
        return -1;
    }
    *out = (int)n;
    return 0;
}

/* --http-auth and --http-open need what they qualify; the secret is read
 * here, once, before any database work. */
static int http_auth_options(const struct options *o) {
    if (o->http_auth && !o->http) return print_error(EXIT_USAGE, "--http-auth needs --http"), -1;
    if (o->http_open && !o->http_auth) return print_error(EXIT_USAGE, "--http-open needs --http-auth"), -1;
    char err[1024];
    if (o->http_auth && httpauth_load(o->http_auth, err, sizeof err) < 0)
        return print_error(EXIT_USAGE, "%s", err), -1;
    return 0;
}

/* Parses options up to the first operand (the script or subcommand); what
 * follows belongs to the script as its arg table. */
static int parse_options(int argc, char **argv, struct options *o) {
    enum { O_DSN = 256, O_DATA_DIR, O_NO_MIGRATE, O_MIGRATIONS, O_COMPONENT, O_INTERVAL, O_GRACE, O_WATCH,
           O_LOG_LEVEL, O_LOG_FORMAT, O_HTTP, O_HTTP_AUTH, O_HTTP_OPEN, O_KEEP_HISTORY, O_POOLER };
    static const struct option longopts[] = {
        {"dsn", required_argument, NULL, O_DSN},
        {"data-dir", required_argument, NULL, O_DATA_DIR},
        {"no-migrate", no_argument, NULL, O_NO_MIGRATE},
        {"migrations", required_argument, NULL, O_MIGRATIONS},
        {"component", required_argument, NULL, O_COMPONENT},
        {"interval", required_argument, NULL, O_INTERVAL},
        {"grace", required_argument, NULL, O_GRACE},
        {"watch", no_argument, NULL, O_WATCH},
        {"http", required_argument, NULL, O_HTTP},
        {"http-auth", required_argument, NULL, O_HTTP_AUTH},
        {"http-open", required_argument, NULL, O_HTTP_OPEN},
        {"keep-history", required_argument, NULL, O_KEEP_HISTORY},
        {"pooler", required_argument, NULL, O_POOLER},
        {"log-level", required_argument, NULL, O_LOG_LEVEL},
        {"log-format", required_argument, NULL, O_LOG_FORMAT},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    log_level lvl = LOG_INFO;
    int json = 0, c;
    opterr = 0;
    /* '+': options end at the script; ':': a missing value is reported as
     * such (':'), not as an unknown option ('?'). */
    while ((c = getopt_long(argc, argv, "+:h", longopts, NULL)) != -1) {
        switch (c) {
        case O_DSN: o->dsn = optarg; break;
        case O_DATA_DIR: o->data_dir = optarg; break;
        case O_NO_MIGRATE: o->migrate = 0; break;
        case O_MIGRATIONS: o->migrations = optarg; break;
        case O_COMPONENT: o->component = optarg; break;
        case O_INTERVAL:
            if (parse_int("--interval", optarg, 1, 3600, &o->interval) < 0) return -1;
            break;
        case O_GRACE:
            if (parse_int("--grace", optarg, 0, 86400, &o->grace) < 0) return -1;
            break;
        case O_WATCH: o->watch = 1; break;
        case O_KEEP_HISTORY:
            if (parse_int("--keep-history", optarg, 0, PRUNE_KEEP_MAX, &o->keep_history) < 0) return -1;
            break;
        case O_HTTP: {
            char err[256];
            if (http_check_addr(optarg, err, sizeof err) < 0) {
                print_error(EXIT_USAGE, "%s", err);
                return -1;
            }
            o->http = optarg;
            break;
        }
        case O_HTTP_AUTH: o->http_auth = optarg; break;
        case O_POOLER: /* before any thread: the pool, the listener and shutdown read it (pool.h) */
            if (!strcmp(optarg, "refuse")) pool_set_pooler(POOLER_REFUSE);
            else if (!strcmp(optarg, "session")) pool_set_pooler(POOLER_SESSION);
            else if (!strcmp(optarg, "transaction")) pool_set_pooler(POOLER_TRANSACTION);
            else {
                print_error(EXIT_USAGE, "--pooler: expected refuse, session or transaction, got '%s'", optarg);
                return -1;
            }
            break;
        case O_HTTP_OPEN: {
            char err[256];
            if (httpauth_set_open(optarg, err, sizeof err) < 0) {
                print_error(EXIT_USAGE, "%s", err);
                return -1;
            }
            o->http_open = optarg;
            break;
        }
        case O_LOG_LEVEL:
            if (log_parse_level(optarg, &lvl) < 0) {
                print_error(EXIT_USAGE, "--log-level: expected debug, info, warn or error, got '%s'", optarg);
                return -1;
            }
            break;
        case O_LOG_FORMAT:
            if (strcmp(optarg, "json") == 0) json = 1;
            else if (strcmp(optarg, "logfmt") == 0) json = 0;
            else {
                print_error(EXIT_USAGE, "--log-format: expected logfmt or json, got '%s'", optarg);
                return -1;
            }
            break;
        case 'h':
            fputs(usage_text, stdout);
            exit(0);
        case ':':
            print_error(EXIT_USAGE, "option %s needs a value", argv[optind - 1]);
            fputs(usage_text, stderr);
            return -1;
        default:
            print_error(EXIT_USAGE, "unknown option '%s'", argv[optind - 1]);
            fputs(usage_text, stderr);
            return -1;
        }
    }
    log_configure(lvl, json);
    return http_auth_options(o);
}

/* ---- the database ---------------------------------------------------------- */

/* --dsn, else BMDB_DSN, else the embedded default (bootstrap.h). */
static int database_open(const struct options *o, int pool_size, host_db *db) {
    char err[1024];
    const char *dsn = o->dsn ? o->dsn : getenv("BMDB_DSN");
    if (bootstrap_database(dsn, o->data_dir, pool_size, db, err, sizeof err) < 0)
        return print_error(EXIT_FAILED, "%s", err), -1;
    /* Before anything prepares a statement: behind a transaction pooler
     * one could run with another client's parameters. */
    int found = pool_detect_pooler(db->pool, err, sizeof err);
    if (found < 0) return print_error(EXIT_FAILED, "%s", err), -1;
    if (found)
        return print_error(EXIT_FAILED, "refusing to start: %s; this host needs one server connection per client "
                           "for its prepared statements, LISTEN and backend pids: use session pooling "
                           "(pool_mode=session), connect to PostgreSQL directly, or pass --pooler transaction "
                           "to run without them", err), -1;
    return 0;
}

/* ---- subcommands ---------------------------------------------------------- */

static int cmd_migrate(const struct options *o, int argc, char **argv) {
    const char *what = argc > 0 ? argv[0] : "up";
    int n = 0;
    if (strcmp(what, "down") == 0) {
        if (argc != 2) return print_error(EXIT_USAGE, "migrate down: expected a count, e.g. 'migrate down 1'");
        if (parse_int("migrate down", argv[1], 1, 9999, &n) < 0) return EXIT_USAGE;
    } else if ((strcmp(what, "up") != 0 && strcmp(what, "status") != 0) || argc > 1) {
        return print_error(EXIT_USAGE, "migrate: expected 'up', 'down N' or 'status'");
    }
    host_db db;
    if (database_open(o, 1, &db) < 0) return bootstrap_close(&db), EXIT_FAILED;
    char err[1024];
    PGconn *c = pool_get(db.pool, POOL_WAIT_S, err, sizeof err);
    int rc = -1, applied = 0;
    if (c) {
        if (what[0] == 'u') rc = migrate_up(c, o->migrations, &applied, err, sizeof err);
        else if (what[0] == 'd') rc = migrate_down(c, o->migrations, n, err, sizeof err);
        else rc = migrate_status(c, o->migrations, stdout, err, sizeof err);
        pool_put(db.pool, c);
    }
    if (rc == 0 && what[0] == 'u') printf("%d migration%s applied\n", applied, applied == 1 ? "" : "s");
    if (rc == 0 && what[0] == 'd') printf("%d migration%s rolled back\n", n, n == 1 ? "" : "s");
    bootstrap_close(&db);
    if (rc < 0) return print_error(EXIT_FAILED, "%s", err);
    return 0;
}

static int cmd_report(const struct options *o, const char *what, int argc, char **argv) {
    int json = 0;
    for (int i = 0; i < argc; i++) /* --json anywhere after the subcommand */
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
            memmove(argv + i, argv + i + 1, (size_t)(argc - i - 1) * sizeof *argv);
            argc--, i--;
        }
    if (strcmp(what, "history") == 0 && argc != 1)
        return print_error(EXIT_USAGE, "history: expected one machine id (and --json)");
    if (strcmp(what, "status") == 0 && argc != 0)
        return print_error(EXIT_USAGE, "status: takes no arguments but --json");
    if (what[0] == 'h' && !work_valid_uuid(argv[0]))
        return print_error(EXIT_USAGE, "history: machine id is not a UUID: %s", argv[0]);
    host_db db;
    if (database_open(o, 1, &db) < 0) return bootstrap_close(&db), EXIT_FAILED;
    char err[1024];
    int rc = -1;
    PGconn *c = pool_get(db.pool, POOL_WAIT_S, err, sizeof err);
    if (c) {
        rc = what[0] == 's' ? report_status(c, stdout, json, err, sizeof err)
                            : report_history(c, argv[0], stdout, json, err, sizeof err);
        pool_put(db.pool, c);
    }
    bootstrap_close(&db);
    if (rc < 0) return print_error(rc == -2 ? EXIT_USAGE : EXIT_FAILED, "%s", err);
    return 0;
}

/* cancel, pause, resume, hold, unhold (control.c). Exit 0 when done, 1
 * when there was nothing to do (cancel: no lock held) or the database
 * failed, 2 for bad arguments. */
static int cmd_control(const struct options *o, const char *cmd, int argc, char **argv) {
    control_args a;
    char err[1024];
    if (control_parse(cmd, argc, argv, &a, err, sizeof err) < 0) return print_error(EXIT_USAGE, "%s", err);
    host_db db;
    if (database_open(o, 1, &db) < 0) return bootstrap_close(&db), EXIT_FAILED;
    int rc = bootstrap_schema(db.pool, o->migrate ? SCHEMA_MIGRATE : SCHEMA_VERIFY, o->migrations, err, sizeof err);
    if (rc == 0) rc = control_run(db.pool, &a, stdout, err, sizeof err);
    bootstrap_close(&db);
    if (rc < 0) return print_error(EXIT_FAILED, "%s", err);
    return rc == 0 && !strcmp(cmd, "cancel") ? EXIT_FAILED : 0;
}

/* prune (prune.c). Exit 0 when done (or nothing to do), 1 when the
 * database failed, 2 for bad arguments or a --before the server refuses. */
static int cmd_prune(const struct options *o, int argc, char **argv) {
    prune_args a;
    char err[1024];
    if (prune_parse(argc, argv, &a, err, sizeof err) < 0) return print_error(EXIT_USAGE, "%s", err);
    host_db db;
    if (database_open(o, 1, &db) < 0) return bootstrap_close(&db), EXIT_FAILED;
    int rc = bootstrap_schema(db.pool, o->migrate ? SCHEMA_MIGRATE : SCHEMA_VERIFY, o->migrations, err, sizeof err);
    if (rc == 0) rc = prune_run(db.pool, &a, stdout, err, sizeof err);
    bootstrap_close(&db);
    if (rc < 0) return print_error(rc == -2 ? EXIT_USAGE : EXIT_FAILED, "%s", err);
    return 0;
}

/* retry (retry.c). Exit 0 when it cleared the pair (bulk: always, with
 * the count), 1 when the pair had no backoff or the database failed, 2
 * for bad arguments, a --since the server refuses among them. */
static int cmd_retry(const struct options *o, int argc, char **argv) {
    retry_args a;
    char err[1024];
    if (retry_parse(argc, argv, &a, err, sizeof err) < 0) return print_error(EXIT_USAGE, "%s", err);
    host_db db;
    if (database_open(o, 1, &db) < 0) return bootstrap_close(&db), EXIT_FAILED;
    int rc = bootstrap_schema(db.pool, o->migrate ? SCHEMA_MIGRATE : SCHEMA_VERIFY, o->migrations, err, sizeof err);
    if (rc == 0) rc = retry_run(db.pool, &a, stdout, err, sizeof err);
    bootstrap_close(&db);
    if (rc < 0) return print_error(rc == -2 ? EXIT_USAGE : EXIT_FAILED, "%s", err);
    return rc == 0 ? EXIT_FAILED : 0;
}

/* ---- running a script ------------------------------------------------------ */

struct script_run {
    const char *path;
    int argc;
    char **argv;       /* argv[0] is the script */
    int status;        /* 0 ok, else an exit code */
    snapshot *code;    /* what the top level ran: the slots load the same */
    worker_spec *specs;
    int nspecs;        /* > 0: a worker script */
    int done_fd;       /* written when the script's top level is done */
};

/* Exit status for a script that failed to load: an invalid script (syntax
 * error, invalid bmdb.worker{}) is 2, a runtime error 1. */
static int load_status(int kind) {
    return kind == SCRIPT_DEFINITION_ERROR || kind == SCRIPT_SYNTAX_ERROR ? EXIT_USAGE : EXIT_FAILED;
}

/* Runs the script's top level. A one-off does its work right here; a
 * worker script only returns definitions, which the slots then serve. */
static void *script_thread(void *arg) {
    struct script_run *r = arg;
    char err[8192];
    int kind = SCRIPT_OK;
    lua_State *L = NULL;
    r->code = snapshot_open(r->path, err, sizeof err);
    if (r->code) L = lstate_new(r->code, r->argc, r->argv, &kind, err, sizeof err);
    else kind = SCRIPT_SYNTAX_ERROR; /* unreadable: invalid, as at start */
    if (!L) {
        if (kind == SCRIPT_CANCELED || lifecycle_state() >= HOST_CANCELLING) {
            log_kv(LOG_INFO, "script stopped", "script", r->path, NULL);
        } else {
            r->status = load_status(kind);
            print_error(r->status, "%s", err);
        }
    } else {
        r->nspecs = lstate_worker_specs(L, &r->specs, err, sizeof err);
        if (r->nspecs < 0) {
            print_error(EXIT_USAGE, "%s", err);
            r->status = EXIT_USAGE;
            r->nspecs = 0;
        }
        lstate_close(L);
    }
    if (r->code) snapshot_seal(r->code);
    char one = 1;
    if (write(r->done_fd, &one, 1) < 0) { /* main times out instead */ }
    return NULL;
}

/* Waits for a signal or for fd (the script's end, file events) to be
 * readable. Returns the signal seen, 0 for fd, -1 on timeout. */
static int wait_for(int sigfd, int donefd, double timeout_s) {
    struct pollfd fds[2] = {{.fd = sigfd, .events = POLLIN}, {.fd = donefd, .events = POLLIN}};
    int ms = timeout_s < 0 ? -1 : (int)(timeout_s * 1000);
    for (;;) {
        int n = poll(fds, 2, ms);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        if (fds[1].revents) return 0;
        struct signalfd_siginfo si;
        if (read(sigfd, &si, sizeof si) == sizeof si) return (int)si.ssi_signo;
    }
}

/* Runs the slots until a signal drains them. First SIGTERM/SIGINT: no new
 * claims, items in flight get --grace seconds. Second signal, or grace
 * over: cancel what is left (the session end records it Canceled). os.exit
 * in a script state cancels too. Slots that still run STOP_WAIT_S after
 * the cancel are named in the log and left behind: EXIT_STUCK. */
static int serve_workers(const struct options *o, host_db *db, struct script_run *run, int sigfd) {
    int slots = 0, loops = 0;
    for (int i = 0; i < run->nspecs; i++) {
        if (run->specs[i].loop) loops++;
        else slots += run->specs[i].concurrency;
    }
    /* a loop's thread borrows like a slot; + slack (heartbeat and
     * listener connect on their own) */
    pool_grow(db->pool, slots + loops + 4);
    bootstrap_room(db->pool, slots, slots + loops + 4); /* before the slots take what is left */
    workers_set_code(run->code);    /* the bytes the top level was validated on */
    reloader *rl = reload_create(run->code, run->argc, run->argv, o->watch);
    workers_init(db->pool, run->argc, run->argv);
    workers_start(run->specs, run->nspecs);
    char n[16], nl[16];
    snprintf(n, sizeof n, "%d", slots);
    snprintf(nl, sizeof nl, "%d", loops);
    log_kv(LOG_INFO, "workers started", "slots", n, "loops", nl, NULL);
    char summary[64];
    snprintf(summary, sizeof summary, "serving: %d slot%s", slots, slots == 1 ? "" : "s");
    notify_ready(summary);

    double grace_end = 0;
    int status = 0, canceled = 0;
    while (workers_live() > 0) {
        double due = reload_due_in(rl), timeout = due >= 0 && due < 0.2 ? due : 0.2;
        int sig = wait_for(sigfd, reload_fd(rl), timeout);
        items_check_timeouts(); /* bodies past their item's timeout */
        /* items claimed ahead that wait too long: released at once */
        if (sched_give_back_waiting() > 0) sessions_wake_heartbeat();
        sessions_check_deadline();
        host_state st = lifecycle_state();
        if (sig == 0) reload_read_events(rl);
        if (st == HOST_RUNNING && reload_due_in(rl) == 0) reload_run(rl, db->pool, 0);
        if (sig == SIGHUP) {
            if (st == HOST_RUNNING) reload_run(rl, db->pool, 1);
        } else if (sig > 0 && st == HOST_RUNNING) {
            log_kv(LOG_INFO, "draining: no new claims", "signal", strsignal(sig), NULL);
            notify_stopping("draining: no new claims");
            lifecycle_advance(HOST_DRAINING);
            slot_wake_everyone();
            grace_end = mono_now() + o->grace;
        } else if ((sig > 0 && st == HOST_DRAINING) || (st == HOST_DRAINING && mono_now() >= grace_end)) {
            log_kv(LOG_INFO, sig > 0 ? "second signal: cancelling items in flight"
                                     : "grace period over: cancelling items in flight", NULL);
            lifecycle_advance(HOST_CANCELLING);
        }
        if (!canceled && lifecycle_state() == HOST_CANCELLING) {
            canceled = 1;
            slot_wake_everyone();
            lstate_interrupt_all();
            /* A slot waiting in libpq (on a lock, a slow statement) sees
             * neither hook nor kick: ask the server to cancel its statement. */
            pool_cancel_lent(db->pool);
            if (workers_wait(STOP_WAIT_S) > 0) {
                workers_report_stuck();
                log_kv(LOG_ERROR, "slots did not stop after the cancel; ending the session without them", NULL);
                db->pool = NULL; /* still in their hands: leave it to exit() */
                reload_destroy(rl);
                return EXIT_STUCK;
            }
        }
    }
    if (lifecycle_state() == HOST_RUNNING) {
        log_kv(LOG_ERROR, "every slot stopped; exiting", NULL);
        status = EXIT_FAILED;
    }
    lifecycle_advance(HOST_DRAINING); /* stops the listener */
    workers_stop();
    reload_destroy(rl);
    unsigned long claims, retries, batches, batched;
    metrics_claim_counts(&claims, &retries);
    sched_batch_counts(&batches, &batched);
    char c[32], r[32], b[32], f[32];
    snprintf(c, sizeof c, "%lu", claims);
    snprintf(r, sizeof r, "%lu", retries);
    snprintf(b, sizeof b, "%lu", batches);
    snprintf(f, sizeof f, "%lu", batched);
    log_kv(LOG_INFO, "workers stopped", "claims", c, "retries", r, "batched", f, "batches", b, NULL);
    return status;
}

static int check_script_file(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return print_error(EXIT_USAGE, "cannot read script %s: %s", path, strerror(errno));
    fclose(f);
    /* Compile once here: a syntax error (file:line) ends the run before any
     * database is touched. */
    lua_State *L = luaL_newstate();
    int rc = luaL_loadfile(L, path);
    if (rc != 0) print_error(EXIT_USAGE, "%s", lua_tostring(L, -1));
    lua_close(L);
    return rc ? EXIT_USAGE : 0;
}

static int list_problems(const char *script, char *err) {
    err[strcspn(err, "\n")] = '\0'; /* the problem, not the traceback */
    fprintf(stderr, "%s: problems:\n", script);
    for (char *p = strtok(err, ";"); p; p = strtok(NULL, ";")) fprintf(stderr, "  %s\n", p + (*p == ' '));
    return EXIT_USAGE;
}

/* check SCRIPT: compile, run the top level without a database, validate
 * the worker definitions. 0 when fine, 2 with the problems listed when
 * the script is invalid, 1 when its top level fails at run time (the
 * same statuses a run would give). */
static int cmd_check(int argc, char **argv) {
    if (argc != 1) return print_error(EXIT_USAGE, "check: expected one script");
    const char *script = argv[0];
    int rc = check_script_file(script);
    if (rc) return rc;
    char err[8192];
    snapshot *code = snapshot_open(script, err, sizeof err);
    if (!code) return print_error(EXIT_USAGE, "%s", err);
    int kind;
    lua_State *L = lstate_new(code, 1, argv, &kind, err, sizeof err);
    snapshot_unref(code);
    if (!L) {
        if (kind == SCRIPT_NOT_CONNECTED) {
            printf("%s: compiles; a one-off that uses the database at load time (not run)\n", script);
            return 0;
        }
        if (load_status(kind) == EXIT_USAGE) return list_problems(script, err);
        fprintf(stderr, "%s: its top level fails at run time:\n%s\n", script, err);
        return EXIT_FAILED;
    }
    worker_spec *specs = NULL;
    int n = lstate_worker_specs(L, &specs, err, sizeof err);
    lstate_close(L);
    if (n < 0) return list_problems(script, err);
    if (n == 0) {
        printf("%s: ok, a one-off script (returns no workers)\n", script);
        return 0;
    }
    printf("%s: ok,", script);
    char one[80];
    for (int i = 0; i < n; i++) printf("%s %s", i ? "," : "", worker_spec_describe(&specs[i], one, sizeof one));
    printf("\n");
    free(specs);
    return 0;
}

/* The component name: --component, else the script's file name without
 * ".lua". */
static void component_name(const struct options *o, const char *script, char *out, size_t len) {
    if (o->component) {
        snprintf(out, len, "%s", o->component);
        return;
    }
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", script);
    snprintf(out, len, "%s", basename(buf));
    char *dot = strrchr(out, '.');
    if (dot && strcmp(dot, ".lua") == 0) *dot = '\0';
}

/* Start: database, schema, session (bootstrap.h); the pool is then the one
 * every bmdb call uses. 0, or an exit status with the error printed. */
static int start_host(const struct options *o, const char *script, host_db *db) {
    char component[256], err[1024];
    if (database_open(o, 8, db) < 0) return bootstrap_close(db), EXIT_FAILED;
    component_name(o, script, component, sizeof component);
    if (pool_transaction_pooled())
        log_kv(LOG_INFO, "behind a transaction pooler (--pooler transaction): statements run unprepared, no LISTEN "
               "(idle slots poll), no database backend ended by pid at shutdown", NULL);
    if (bootstrap_schema(db->pool, o->migrate ? SCHEMA_MIGRATE : SCHEMA_VERIFY, o->migrations, err, sizeof err) < 0 ||
        bootstrap_session(db->pool, component, o->interval, err, sizeof err) < 0) {
        bootstrap_close(db);
        return print_error(EXIT_FAILED, "%s", err);
    }
    lcore_set_pool(db->pool);
    if (o->http && http_start(o->http, db->pool, component, err, sizeof err) < 0) {
        sessions_stop();
        lcore_set_pool(NULL);
        bootstrap_close(db);
        return print_error(EXIT_USAGE, "%s", err);
    }
    return 0;
}

/* Runs the script's top level on its own thread and waits for it, or for a
 * signal or os.exit, which cancel it. 1 when it ended (the thread is
 * joined), 0 when it would not stop within STOP_WAIT_S of the cancel. */
static int run_top_level(struct script_run *run, int donefd, int sigfd, pool *p) {
    pthread_t th;
    if (pthread_create(&th, NULL, script_thread, run) != 0) {
        run->status = print_error(EXIT_FAILED, "cannot start the script's thread");
        return 1;
    }
    int finished = 0;
    for (;;) {
        /* short polls: os.exit caught by a pcall leaves the top level
         * running in a canceled host, to be interrupted like on a signal */
        int sig = wait_for(sigfd, donefd, 0.2);
        items_check_timeouts();
        sessions_check_deadline();
        if (sig == 0) {
            finished = 1;
            break;
        }
        if (sig == SIGHUP) {
            log_kv(LOG_INFO, "SIGHUP ignored while the script's top level runs", NULL);
            continue;
        }
        if (sig < 0 && lifecycle_state() < HOST_CANCELLING) continue;
        /* SIGTERM / SIGINT (or os.exit) during the top level: nothing to drain. */
        if (sig > 0) log_kv(LOG_INFO, "signal received, stopping", "signal", strsignal(sig), NULL);
        lifecycle_advance(HOST_CANCELLING);
        lstate_interrupt_all();
        pool_cancel_lent(p);
        finished = wait_for(-1, donefd, STOP_WAIT_S) == 0;
        break;
    }
    if (finished) pthread_join(th, NULL);
    return finished;
}

/* Stop: the session ends (held work recorded Canceled), then the database.
 * A script thread that would not stop may still use the pool: it is left
 * to exit() then, and only the embedded server is stopped. */
static void stop_host(host_db *db, int finished) {
    notify_stopping("stopping");
    http_stop();
    sessions_stop();
    lcore_set_pool(NULL);
    if (finished) {
        bootstrap_close(db);
    } else if (db->emb) {
        embedded_close(db->emb);
        db->emb = NULL;
    }
}

static int cmd_run(const struct options *o, int argc, char **argv, int sigfd) {
    const char *script = argv[0];
    int rc = check_script_file(script);
    if (rc) return rc;
    host_db db;
    if ((rc = start_host(o, script, &db))) return rc;

    int pipefd[2];
    if (pipe(pipefd) < 0) return print_error(EXIT_FAILED, "pipe: %s", strerror(errno));
    struct script_run run = {.path = script, .argc = argc, .argv = argv, .done_fd = pipefd[1]};
    int finished = run_top_level(&run, pipefd[0], sigfd, db.pool);
    int status = run.status;
    if (!finished) {
        log_kv(LOG_ERROR, "script did not stop after the cancel; ending the session without it", "script", script,
               NULL);
        status = EXIT_STUCK;
    } else if (run.nspecs > 0 && lifecycle_state() == HOST_RUNNING) {
        status = serve_workers(o, &db, &run, sigfd);
    }

    stop_host(&db, finished && status != EXIT_STUCK);
    close(pipefd[0]);
    close(pipefd[1]);
    int requested;
    if (status != EXIT_STUCK && lstate_exit_requested(&requested)) status = requested;
    if (finished) {
        free(run.specs);
        snapshot_unref(run.code);
    }
    return status;
}

int main(int argc, char **argv) {
    struct options o = {.data_dir = ".bmdb", .interval = 5, .grace = 30, .migrate = 1,
                        .keep_history = PRUNE_KEEP_DAYS};
    if (parse_options(argc, argv, &o) < 0) return EXIT_USAGE;
    prune_set_keep_history(o.keep_history); /* before any thread: the retention loop reads it */
    int nargs = argc - optind;
    char **args = argv + optind;
    if (nargs == 0) {
        fputs(usage_text, stderr);
        return print_error(EXIT_USAGE, "no script given");
    }

    lhttp_global_init(); /* libcurl's, before any thread (bmdb.http) */

    /* Block the signals we wait for before any thread exists, so every
     * thread inherits the mask and only the signalfd sees them. */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigaddset(&mask, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &mask, NULL);
    int sigfd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sigfd < 0) return print_error(EXIT_FAILED, "signalfd: %s", strerror(errno));

    const char *cmd = args[0];
    if (strcmp(cmd, "check") == 0) return cmd_check(nargs - 1, args + 1);
    if (strcmp(cmd, "migrate") == 0) return cmd_migrate(&o, nargs - 1, args + 1);
    if (strcmp(cmd, "status") == 0 || strcmp(cmd, "history") == 0)
        return cmd_report(&o, cmd, nargs - 1, args + 1);
    if (!strcmp(cmd, "cancel") || !strcmp(cmd, "pause") || !strcmp(cmd, "resume") || !strcmp(cmd, "hold") ||
        !strcmp(cmd, "unhold"))
        return cmd_control(&o, cmd, nargs - 1, args + 1);
    if (strcmp(cmd, "prune") == 0) return cmd_prune(&o, nargs - 1, args + 1);
    if (!strcmp(cmd, "retry")) return cmd_retry(&o, nargs - 1, args + 1);
    int status = cmd_run(&o, nargs, args, sigfd);
    if (status == EXIT_STUCK) {
        /* A thread still runs Lua in our memory: exit without the atexit
         * handlers and destructors exit() would run under it. */
        fflush(NULL);
        _exit(status);
    }
    return status;
}

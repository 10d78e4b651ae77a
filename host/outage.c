/* outage.c -- one account of a database outage, for the log.
 *
 * See outage.h. The state is a few fields under one lock; lines are
 * written under it (log.c's lock is innermost), so two threads that fail
 * at once never both start an outage. */
#include "outage.h"
#include "lifecycle.h"
#include "log.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int on;              /* under mu, like every field below */
static double since, last_line;
static long failures, unlogged; /* since the start; since the last line */
static char last_why[1024];     /* the reason the last line gave */

void outage_failed(const char *what, const char *why) {
    double now = mono_now();
    char n[32], age[32];
    pthread_mutex_lock(&mu);
    if (!on) {
        on = 1;
        since = last_line = now;
        failures = 1;
        unlogged = 0;
        snprintf(last_why, sizeof last_why, "%s", why);
        log_kv(LOG_WARN, "database outage started", "during", what, "error", why, NULL);
    } else {
        failures++;
        unlogged++;
        if (now - last_line >= OUTAGE_REPEAT_S) {
            snprintf(n, sizeof n, "%ld", unlogged);
            snprintf(age, sizeof age, "%.1f s", now - since);
            int same = strcmp(last_why, why) == 0;
            log_kv(LOG_WARN, "database outage goes on", "for", age, "failures", n, same ? NULL : "error", why,
                   NULL);
            snprintf(last_why, sizeof last_why, "%s", why);
            last_line = now;
            unlogged = 0;
        }
    }
    pthread_mutex_unlock(&mu);
}

int outage_counted(void) {
    pthread_mutex_lock(&mu);
    int was = on;
    if (on) {
        failures++;
        unlogged++;
    }
    pthread_mutex_unlock(&mu);
    return was;
}

void outage_ended(void) {
    char msg[96], n[32];
    pthread_mutex_lock(&mu);
    if (on) {
        on = 0;
        snprintf(msg, sizeof msg, "database reachable again after %.1f s", mono_now() - since);
        snprintf(n, sizeof n, "%ld", failures);
        log_kv(LOG_INFO, msg, "failures", n, NULL);
    }
    pthread_mutex_unlock(&mu);
}

/* notify.c -- sd_notify through libsystemd; see notify.h.
 *
 * No state of its own: libsystemd reads NOTIFY_SOCKET at every call and
 * sends one datagram, so any thread may call in, under any lock. */
#include "notify.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <systemd/sd-daemon.h>

static int wanted(void) { return getenv("NOTIFY_SOCKET") != NULL; }

void notify_ready(const char *status) {
    if (!wanted()) return;
    sd_notifyf(0, "READY=1\nSTATUS=%s", status);
}

void notify_watchdog(void) {
    if (wanted()) sd_notify(0, "WATCHDOG=1");
}

void notify_stopping(const char *status) {
    if (!wanted()) return;
    sd_notifyf(0, "STOPPING=1\nSTATUS=%s", status);
}

void notify_status(const char *fmt, ...) {
    if (!wanted()) return;
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    for (char *p = line; *p; p++)
        if (*p == '\n') *p = ' ';
    sd_notifyf(0, "STATUS=%s", line);
}

/* notify.h -- telling systemd how the host is doing (sd_notify).
 *
 * Every call is a no-op unless systemd (or anything else) set
 * NOTIFY_SOCKET: READY=1 once the session is live and the workers run,
 * WATCHDOG=1 after each successful heartbeat poke (so a host whose
 * heartbeat wedges is restarted when WatchdogSec passes), STOPPING=1 when
 * it drains, and STATUS= with one short line. */
#ifndef BMDB_NOTIFY_H
#define BMDB_NOTIFY_H

void notify_ready(const char *status);
void notify_watchdog(void);
void notify_stopping(const char *status);
/* STATUS=<printf>, one line. */
void notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif

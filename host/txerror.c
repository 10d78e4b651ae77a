/* txerror.c -- filling in a tx_error (txerror.h). */
#include "txerror.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void tx_error_set(tx_error *e, tx_error_kind kind, const char *fmt, ...) {
    memset(e, 0, sizeof *e);
    e->kind = kind;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

void tx_error_commit_failed(tx_error *e) {
    if (e->kind == TXE_SQL && !strcmp(e->sqlstate, "40003")) {
        /* The sqlstate and the server's words stay: they say why. */
        e->kind = TXE_CONNECTION;
        size_t at = strlen(e->message);
        snprintf(e->message + at, sizeof e->message - at,
                 " (the server cannot tell whether COMMIT took effect: outcome unknown)");
    }
    e->outcome_unknown = e->kind == TXE_CONNECTION;
}

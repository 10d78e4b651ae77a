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

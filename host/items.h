/* items.h -- the work items whose bodies run in this host, so that a lock
 * taken away while its body runs (a timeout, an operator's cancel)
 * interrupts that body.
 *
 * An item is tracked from the start of its body to the end of its
 * settlement, with the state that runs it: an opaque pointer here (a Lua
 * state; the registry only compares it and hands it back). Whoever owns
 * the states registers, once, how to interrupt one (items_on_lost);
 * without it an item is marked lost and its sleepers are woken, nothing
 * more. Callable from any thread. */
#ifndef BMDB_ITEMS_H
#define BMDB_ITEMS_H

#include <stddef.h>

/* Asks the body running on state to stop: called, with no lock of the
 * registry held, after one of state's items was marked lost. state may
 * have been closed (or that item untracked) meanwhile, so the callee
 * checks that state is still one of its own, and a body interrupted this
 * way raises only if items_take_interrupt says so. */
typedef void items_interrupt_fn(void *state);
void items_on_lost(items_interrupt_fn *fn);

/* started: monotonic time before the claim was sent; timeout 0: none.
 * A singleton loop's run is tracked the same way, with machine "" and
 * its loop's name as process. */
void items_track(void *state, const char *token, const char *machine, const char *process, int slot,
                 double timeout, double started);
void items_untrack(const char *token);
/* The lock of token was taken away (a cancel's notification). */
void items_lost_token(const char *token, const char *why);
/* Called every fraction of a second by the host's main loop: interrupts
 * bodies past their timeout and reports slots stuck outside Lua. */
void items_check_timeouts(void);

/* 1 when the item of token (or some item of state) was taken away, with
 * why. Sticky: true until the item is untracked. */
int items_token_lost(const char *token, char *why, size_t whylen);
int items_state_lost(const void *state, char *why, size_t whylen);
/* For the interrupt itself: 1, with why, when some item of state was
 * taken away and its body has not been told yet; that item counts as told
 * from now on. */
int items_take_interrupt(const void *state, char *why, size_t whylen);
/* The body of state was told (it raised lost or canceled itself): an
 * interrupt for an item already lost, arriving late, raises nothing. */
void items_interrupt_seen(const void *state);
/* The earliest local deadline (monotonic) of state's items, 0 when none
 * has a timeout: host-owned I/O does not wait past it (iofence.h). */
double items_state_deadline(const void *state);

#endif

/* hash.h -- the one string hash of the host: 64-bit FNV-1a.
 *
 * Used where a short, stable fingerprint of a text is wanted (migration
 * checksums, the prepared-statement cache); never for anything an attacker
 * could exploit by collisions, so its simplicity is the point. */
#ifndef BMDB_HASH_H
#define BMDB_HASH_H

#include <stdint.h>

static inline uint64_t fnv1a64(const char *s) {
    uint64_t h = 1469598103934665603ULL;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) h = (h ^ *p) * 1099511628211ULL;
    return h;
}

#endif

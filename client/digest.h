/* qcbt: the guest digest of a backup (manifest "guest-digest").
 *
 * A canonical fingerprint of a disk's guest view, independent of how it
 * is stored (data, zero clusters, holes, layers): the disk is cut into
 * 512-byte sectors; every sector that is not all zeros contributes
 * XXH3-128 of the sector seeded with its offset, summed mod 2^128; the
 * digest is
 * XXH3-128(sum || be64 size) in hex.  Being a sum, sectors may be added in
 * any order (so it follows out-of-order I/O as data streams in), removed
 * again (an incremental backup subtracts the old contents of what changed
 * and adds the new), and an all-zero sector costs nothing.  XXH3 detects
 * accidental corruption; it is not a defence against a forger with write
 * access to the backups.
 */
#ifndef QCBT_CLIENT_DIGEST_H
#define QCBT_CLIENT_DIGEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chain.h"

#define DIGEST_BLOCK     512u
#define DIGEST_HEX_LEN   32
#define DIGEST_ALGORITHM "xxh3-128-sum-512"

struct gdigest {
    unsigned __int128 sum;
    uint64_t size;
};

void gdigest_init(struct gdigest *d, uint64_t size);

/* Add (or, with gdigest_sub, remove) guest bytes BUF[0..len) at OFFSET;
 * OFFSET must be sector aligned and LEN a multiple of 512 except at the
 * end of the disk.
 */
void
gdigest_add(struct gdigest *d, uint64_t offset, const void *buf, size_t len);
void
gdigest_sub(struct gdigest *d, uint64_t offset, const void *buf, size_t len);

/* What guest bytes BUF[0..len) at OFFSET add to the sum (as gdigest_add,
 * alone): a granule's contribution, for the digest index.
 */
unsigned __int128 gdigest_contrib(uint64_t offset, const void *buf, size_t len);

/* The running sum as 32 hex digits, and back (false if malformed). */
void gdigest_sum_hex(const struct gdigest *d, char hex[DIGEST_HEX_LEN + 1]);
bool gdigest_sum_parse(struct gdigest *d, const char *hex);

/* Subtract the contents of chain C over [offset, offset+len) (sector
 * aligned), reading through SCRATCH: what a range held before, where no
 * digest index can say it (qcbt import builds on a chain without one).
 * Returns 0 or -errno.
 */
int gdigest_sub_chain(struct gdigest *d,
                      struct chain *c,
                      uint64_t offset,
                      uint64_t len,
                      void *scratch,
                      size_t scratch_len);

void gdigest_final(const struct gdigest *d, char hex[DIGEST_HEX_LEN + 1]);

/* The digest of a chain's guest view (and, if D is not NULL, its running
 * sum).  Returns 0 or -errno.
 */
int chain_guest_digest(struct chain *c,
                       struct gdigest *d,
                       char hex[DIGEST_HEX_LEN + 1]);

#endif /* QCBT_CLIENT_DIGEST_H */

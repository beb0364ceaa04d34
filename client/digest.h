/* qcbt: the guest digest of a backup (manifest "guest-digest").
 *
 * A canonical fingerprint of a disk's guest view, independent of how it
 * is stored (data, zero clusters, holes, layers): the disk is cut into 64
 * KiB blocks; every block that is not all zeros contributes
 * XXH3-128(be64 offset || block), summed mod 2^128; the digest is
 * XXH3-128(sum || be64 size) in hex.  Being a sum, blocks may be added in
 * any order (so it can follow out-of-order I/O), and an all-zero block
 * costs nothing to skip.  XXH3 detects accidental corruption; it is not a
 * defence against a forger with write access to the backups.
 */
#ifndef QCBT_CLIENT_DIGEST_H
#define QCBT_CLIENT_DIGEST_H

#include <stddef.h>
#include <stdint.h>

#include "chain.h"

#define DIGEST_BLOCK   (64u * 1024)
#define DIGEST_HEX_LEN 32

struct gdigest {
    unsigned __int128 sum;
    uint64_t size;
};

void gdigest_init(struct gdigest *d, uint64_t size);

/* Add guest bytes BUF[0..len) at OFFSET; OFFSET must be block aligned and
 * LEN a multiple of the block size except at the end of the disk.
 */
void
gdigest_add(struct gdigest *d, uint64_t offset, const void *buf, size_t len);

void gdigest_final(const struct gdigest *d, char hex[DIGEST_HEX_LEN + 1]);

/* The digest of a chain's guest view.  Returns 0 or -errno. */
int chain_guest_digest(struct chain *c, char hex[DIGEST_HEX_LEN + 1]);

#endif /* QCBT_CLIENT_DIGEST_H */

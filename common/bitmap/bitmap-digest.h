/* qcbt: QEMU-compatible SHA-256 digest of a dirty bitmap. */
#ifndef QCBT_BITMAP_DIGEST_H
#define QCBT_BITMAP_DIGEST_H

#include "bitmap.h"

#define BITMAP_SHA256_HEX_LEN 64

/* The digest QEMU's x-debug-block-dirty-bitmap-sha256 reports: SHA-256 of
 * the in-memory word buffer (bitmap_raw_size() bytes, little-endian 64-bit
 * words, including the raw tail bits a BITMAP_RAW import kept), as 64
 * lowercase hex digits + NUL in HEX.  BM NULL hashes an all-clean bitmap
 * of NWORDS8 bytes (QEMU's answer for an in-use bitmap, whose data it
 * never loads).  Returns 0 or -errno.
 */
int bitmap_sha256(const struct bitmap *bm, char hex[BITMAP_SHA256_HEX_LEN + 1]);
int bitmap_sha256_zero(uint64_t size,
                       uint64_t granularity,
                       char hex[BITMAP_SHA256_HEX_LEN + 1]);

#endif /* QCBT_BITMAP_DIGEST_H */

/* qcbt: dense dirty bitmaps (DESIGN.md "Bitmaps", "The merge engine").
 *
 * One bit per GRANULARITY bytes of a virtual disk of SIZE bytes: bit j set
 * means guest bytes [j*g, (j+1)*g) may have changed.  nbits =
 * ceil(size / g); the last bit may cover bytes past the end of the disk.
 *
 * Memory holds nwords = max(1, ceil(nbits / 64)) 64-bit words, bit j in
 * word j/64 at position j%64.  Every operation works a word at a time.
 *
 * Serialized form (qcow2-format.md section 14.4, qcow2.txt "Bitmaps
 * extension"): a byte stream, bit j in byte j/8 at position j%8, LSB
 * first; equivalently little-endian 64-bit words.  The on-disk data is the
 * first bitmap_serialized_size() = ceil(nbits/8) bytes of the stream; the
 * in-memory ("raw") stream is bitmap_raw_size() = nwords*8 bytes.
 *
 * Tail bits.  Bits at index >= nbits are always zero for every query and
 * every operation here.  The one exception is kept on the side: QEMU's
 * loader copies data clusters (and all-ones table entries) into memory a
 * whole word at a time without masking, and its debug digest
 * x-debug-block-dirty-bitmap-sha256 hashes those garbage tail bits verbatim
 * (qcow2-format.md section 14.9).  To reproduce that digest,
 * bitmap_import()/bitmap_import_fill() with BITMAP_RAW keep the bits past
 * nbits of the last word in bm->tail, and bitmap_export() with BITMAP_RAW
 * writes them back; nothing else reads or changes bm->tail.  Without
 * BITMAP_RAW, import drops (and clears) the tail bits in the bytes it
 * writes, and export writes them as zero.
 *
 * Errors: functions that can fail return 0 or -errno and record a message
 * with qcbt_error(); nothing aborts on bad arguments.  Queries clip to the
 * bitmap and cannot fail.
 *
 * Threads: a bitmap has no lock.  Any number of threads may query a bitmap
 * that nobody modifies (merged bitmaps are built at open and immutable
 * after); a modification needs exclusive access.
 */
#ifndef QCBT_BITMAP_H
#define QCBT_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Granularity limits: QEMU's (qcow2 granularity_bits 9..31). */
#define BITMAP_MIN_GRANULARITY_BITS 9
#define BITMAP_MAX_GRANULARITY_BITS 31
/* At most 2^32 bits = 512 MiB of data, QEMU's BME_MAX_PHYS_SIZE: a 16 TiB
 * disk at 64 KiB granularity needs 2^28 bits (32 MiB).
 */
#define BITMAP_MAX_BITS (UINT64_C(1) << 32)

/* Flag for bitmap_import(), bitmap_import_fill(), bitmap_export(). */
#define BITMAP_RAW 1u

/* All fields are read-only for users; change them only through the
 * functions below.
 */
struct bitmap {
    uint64_t size;        /* virtual disk size, bytes */
    uint64_t granularity; /* bytes per bit, 1 << gran_bits */
    unsigned gran_bits;
    uint64_t nbits;  /* ceil(size / granularity); may be 0 */
    size_t nwords;   /* max(1, ceil(nbits / 64)) */
    uint64_t *words; /* nwords words, bits >= nbits are zero */
    uint64_t tail;   /* raw bits >= nbits of the last word (see top) */
};

/* A run of equal bits, in guest bytes. */
struct bitmap_extent {
    uint64_t offset;
    uint64_t len; /* > 0 */
    bool dirty;
};

/* Create an all-clean bitmap for a disk of SIZE bytes (0 is allowed and
 * gives 0 bits) at GRANULARITY bytes per bit (a power of two, 512 B ..
 * 2 GiB).  Returns 0 and *out (free with bitmap_free()), or -EINVAL (bad
 * granularity), -EFBIG (more than BITMAP_MAX_BITS bits), -ENOMEM.
 */
int bitmap_new(uint64_t size, uint64_t granularity, struct bitmap **out);

/* Free BM and its words.  NULL is a no-op. */
void bitmap_free(struct bitmap *bm);

/* Set / clear bits [bit, bit+n).  n == 0 is a no-op.  -EINVAL if the
 * range does not lie within [0, nbits).
 */
int bitmap_set(struct bitmap *bm, uint64_t bit, uint64_t n);
int bitmap_clear(struct bitmap *bm, uint64_t bit, uint64_t n);

/* Byte ranges [offset, offset+len) of the disk, which must lie within
 * [0, size); len == 0 is a no-op.  bitmap_set_bytes() sets every bit that
 * overlaps the range (a write there dirties them).  bitmap_clear_bytes()
 * clears only the bits wholly covered, where the disk ends at SIZE (so a
 * range reaching SIZE covers the partial last bit).
 */
int bitmap_set_bytes(struct bitmap *bm, uint64_t offset, uint64_t len);
int bitmap_clear_bytes(struct bitmap *bm, uint64_t offset, uint64_t len);

/* Bit BIT; false for bit >= nbits. */
bool bitmap_test(const struct bitmap *bm, uint64_t bit);

/* First set (dirty) / clear (clean) bit at index >= BIT, or nbits if there
 * is none (also when bit >= nbits).
 */
uint64_t bitmap_next_dirty(const struct bitmap *bm, uint64_t bit);
uint64_t bitmap_next_clean(const struct bitmap *bm, uint64_t bit);

/* Number of set bits: in the whole bitmap / in [bit, bit+n) clipped to
 * [0, nbits).
 */
uint64_t bitmap_count(const struct bitmap *bm);
uint64_t bitmap_count_range(const struct bitmap *bm, uint64_t bit, uint64_t n);

/* Guest bytes BM marks dirty: set bits times the granularity, the last
 * bit clipped to the disk (bm->size).
 */
uint64_t bitmap_dirty_bytes(const struct bitmap *bm);

/* dst |= src and dst &= ~src, for bitmaps of equal size and granularity
 * (else -EINVAL; src == dst is fine).
 */
int bitmap_or(struct bitmap *dst, const struct bitmap *src);
int bitmap_andnot(struct bitmap *dst, const struct bitmap *src);

/* OR SRC into DST conservatively, whatever the two granularities and
 * sizes (DESIGN.md "Granularity of the result": any overlap marks the
 * output bit dirty).  Source bit k covers guest bytes [k*gs, (k+1)*gs)
 * and destination bit j bytes [j*gd, (j+1)*gd), both cut at
 * min(src->size, dst->size): DST bit j is set when any set SRC bit covers
 * one of its bytes.  So a coarse bit sets every finer bit it covers and a
 * fine bit sets the coarser bit covering it; bytes that exist in only one
 * of the disks mark nothing.  Equal shapes reduce to bitmap_or().  Cost:
 * one pass over the words of both.  Returns 0 (it cannot fail).
 */
int bitmap_merge_into(struct bitmap *dst, const struct bitmap *src);

/* Sizes of the serialized stream: the on-disk data ceil(nbits/8), and the
 * in-memory word buffer nwords*8 (>= 8: what QEMU's digest hashes).
 */
uint64_t bitmap_serialized_size(const struct bitmap *bm);
uint64_t bitmap_raw_size(const struct bitmap *bm);

/* Overwrite bytes [offset, offset+len) of the serialized stream from BUF.
 * Bytes past bitmap_raw_size() are ignored, so a loader can pass each
 * whole data cluster (table entry i = bytes [i*cluster, (i+1)*cluster)).
 * FLAGS: 0 drops the bits past nbits, BITMAP_RAW keeps them in bm->tail
 * (see top).  -EINVAL if offset > raw size, offset+len overflows, BUF is
 * NULL with len > 0 or FLAGS has an unknown bit.
 */
int bitmap_import(struct bitmap *bm,
                  uint64_t offset,
                  const void *buf,
                  uint64_t len,
                  unsigned flags);

/* As bitmap_import() from LEN bytes all 0xff (ONES) or all 0x00: an
 * all-ones or unallocated table entry, done a word at a time.
 */
int bitmap_import_fill(struct bitmap *bm,
                       uint64_t offset,
                       uint64_t len,
                       bool ones,
                       unsigned flags);

/* Copy bytes [offset, offset+len) of the serialized stream into BUF.
 * Bytes past the stream read as zero, so the last data cluster comes out
 * zero-padded as QEMU writes it.  FLAGS: 0 writes bits past nbits as zero
 * (what goes to disk), BITMAP_RAW writes bm->tail (for the digest: hash
 * bitmap_raw_size() bytes from offset 0).  -EINVAL if offset+len
 * overflows, BUF is NULL with len > 0 or FLAGS has an unknown bit.
 */
int bitmap_export(const struct bitmap *bm,
                  uint64_t offset,
                  void *buf,
                  uint64_t len,
                  unsigned flags);

/* The maximal run of equal bits containing guest byte OFFSET, from OFFSET
 * on, cut at min(size, offset + max_len): returns 0 and *ext with
 * ext->offset == offset, or -EINVAL if offset >= size or max_len == 0.
 * Walk a whole disk with
 *
 *   for (uint64_t o = 0; o < bm->size; o += e.len)
 *       bitmap_extent(bm, o, UINT64_MAX, &e);
 *
 * The scan stops at the cut, so a bounded request costs no more than the
 * words it covers.
 */
int bitmap_extent(const struct bitmap *bm,
                  uint64_t offset,
                  uint64_t max_len,
                  struct bitmap_extent *ext);

#endif /* QCBT_BITMAP_H */

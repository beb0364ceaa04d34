/* qcbt unit tests: a tiny in-memory qcow2 image builder.
 *
 * Builds well-formed v2/v3 images (qcow2.txt; ../shared/docs/qcow2-format.md
 * sections 1-9) whose every field can then be made hostile: the header
 * fields are a plain struct written verbatim, header extensions are raw
 * (type, claimed length, bytes), L1/L2 entries are raw 64-bit values, and
 * compressed clusters are produced with raw deflate (windowBits -12, as
 * QEMU) or one zstd frame.  The result is a malloc'ed buffer to open with
 * qcbt_io_open_mem() or to write to a file.
 *
 * Layout of a fresh image (cluster units): 0 header, 1 refcount table,
 * 2 refcount block, 3.. active L1 table, then L2 tables and data clusters
 * in allocation order; compressed data is packed at byte granularity at
 * the end of the file.  Refcounts (16-bit, one refcount block) are
 * computed at qb_finish() so that good images pass `qemu-img check`.
 *
 * Builder misuse (not image content) aborts: this is test code.
 */
#ifndef QCBT_QCOW2_BUILDER_H
#define QCBT_QCOW2_BUILDER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Byte offsets of the header fields (qcow2.txt "Header"). */
#define QB_OFF_MAGIC             0
#define QB_OFF_VERSION           4
#define QB_OFF_BACKING_OFFSET    8
#define QB_OFF_BACKING_SIZE      16
#define QB_OFF_CLUSTER_BITS      20
#define QB_OFF_SIZE              24
#define QB_OFF_CRYPT_METHOD      32
#define QB_OFF_L1_SIZE           36
#define QB_OFF_L1_OFFSET         40
#define QB_OFF_REFTABLE_OFFSET   48
#define QB_OFF_REFTABLE_CLUSTERS 56
#define QB_OFF_NB_SNAPSHOTS      60
#define QB_OFF_SNAPSHOTS_OFFSET  64
#define QB_OFF_INCOMPAT          72
#define QB_OFF_COMPAT            80
#define QB_OFF_AUTOCLEAR         88
#define QB_OFF_REFCOUNT_ORDER    96
#define QB_OFF_HEADER_LENGTH     100
#define QB_OFF_COMPRESSION_TYPE  104

/* Every field of the fixed header, written verbatim by qb_finish(). */
struct qb_header {
    uint32_t magic;
    uint32_t version;
    uint64_t backing_file_offset; /* 0: computed if a backing name is set */
    uint32_t backing_file_size;   /* 0: computed if a backing name is set */
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    /* v3 only (not written for version < 3) */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type; /* written if header_length > 104 */
};

enum qb_compression { QB_DEFLATE = 0, QB_ZSTD = 1 };

/* One entry of the feature name table extension. */
struct qb_feature {
    uint8_t type; /* 0 incompatible, 1 compatible, 2 autoclear */
    uint8_t bit;
    const char *name; /* at most 46 bytes are stored */
};

struct qb;

/* A fresh image: VERSION 2 or 3, clusters of 2^CLUSTER_BITS (9..21) bytes,
 * SIZE guest bytes.  EXTL2 sets the extended L2 incompatible bit (v3,
 * cluster_bits >= 14).  ZSTD selects zstd compression (v3).  Never NULL.
 */
struct qb *qb_new(unsigned version,
                  unsigned cluster_bits,
                  uint64_t size,
                  bool extl2,
                  bool zstd);
void qb_free(struct qb *b);

/* The header fields, to be changed freely before qb_finish(). */
struct qb_header *qb_hdr(struct qb *b);
uint64_t qb_cluster_size(const struct qb *b);

/* Header extensions are written in call order after the header, then the
 * end marker (unless qb_omit_end_marker()), then the backing file name.
 * qb_add_ext_len() stores CLAIMED_LEN in the length field but LEN bytes of
 * data (padded to 8), to build lying extensions.
 */
void qb_add_ext(struct qb *b, uint32_t type, const void *data, size_t len);
void qb_add_ext_len(struct qb *b,
                    uint32_t type,
                    uint32_t claimed_len,
                    const void *data,
                    size_t len);
void qb_add_feature_table(struct qb *b, const struct qb_feature *f, size_t n);
void qb_omit_end_marker(struct qb *b);
/* Backing file NAME (stored after the end marker) and, if FMT is not NULL,
 * a backing format extension (added now, in call order).
 */
void qb_set_backing(struct qb *b, const char *name, const char *fmt);

/* Raw L1 entry IDX (host order).  idx must be < the L1 size at qb_new. */
void qb_set_l1(struct qb *b, uint64_t idx, uint64_t entry);
uint64_t qb_get_l1(const struct qb *b, uint64_t idx);
/* Raw L2 entry for guest cluster GC (and its subcluster bitmap with
 * extended L2; ignored otherwise).  Allocates the L2 table on first use and
 * points the L1 entry at it with the copied bit.
 */
void qb_set_l2(struct qb *b, uint64_t gc, uint64_t entry, uint64_t bitmap);
/* Host offset of the L2 table covering guest cluster GC (allocated). */
uint64_t qb_l2_table(struct qb *b, uint64_t gc);

/* Allocate one cluster at the end of the file (cluster aligned) and copy
 * LEN (<= cluster) bytes of DATA into it (NULL: zeros).  Returns its host
 * offset.
 */
uint64_t qb_alloc_cluster(struct qb *b, const void *data, size_t len);
/* Allocate a data cluster holding DATA and map guest cluster GC to it
 * (entry = offset | copied; extended L2: all subclusters allocated).
 */
uint64_t qb_write_cluster(struct qb *b, uint64_t gc, const void *data);

/* Append LEN raw bytes at the current end of the file, not aligned (for
 * compressed data).  Returns their host offset.
 */
uint64_t qb_append(struct qb *b, const void *data, size_t len);
/* Overwrite bytes at host offset OFF (the file grows if needed). */
void qb_poke(struct qb *b, uint64_t off, const void *data, size_t len);
uint64_t qb_file_len(const struct qb *b);

/* Compressed descriptor for data at host byte offset COFF spanning LEN
 * bytes, counted like QEMU (additional sectors past the first one).
 */
uint64_t qb_compressed_entry(const struct qb *b, uint64_t coff, size_t len);
/* Compressed descriptor with an explicit count of additional sectors. */
uint64_t qb_compressed_entry_raw(const struct qb *b,
                                 uint64_t coff,
                                 uint64_t extra_sectors);

/* Compress IN (inlen bytes) with METHOD into a malloc'ed *OUT.  deflate:
 * raw stream, windowBits -12, memLevel 9 (QEMU's parameters); zstd: one
 * frame, default parameters.  Returns the compressed length.
 */
size_t qb_compress(enum qb_compression method,
                   const void *in,
                   size_t inlen,
                   void **out);
/* Compress one cluster of DATA with the image's method, append it and map
 * guest cluster GC to it.  Returns the descriptor; *coff and *clen (may be
 * NULL) receive the position and length of the compressed bytes.
 */
uint64_t qb_write_compressed(struct qb *b,
                             uint64_t gc,
                             const void *data,
                             uint64_t *coff,
                             size_t *clen);

/* Final file length (default: the end of the last thing written).  May cut
 * into or extend past the written data.
 */
void qb_set_file_len(struct qb *b, uint64_t len);

/* Serialise: header, extensions, backing name, L1, refcounts.  Returns a
 * malloc'ed buffer (owned by the caller) of *len bytes.  The builder stays
 * usable (qb_finish may be called again after more changes).
 */
unsigned char *qb_finish(struct qb *b, size_t *len);

/* Poke big-endian fields into a finished image. */
void qb_put_be32(unsigned char *img, uint64_t off, uint32_t v);
void qb_put_be64(unsigned char *img, uint64_t off, uint64_t v);

/* ------------------------------------------------------------------ */
/* Persistent bitmaps (qcow2.txt "Bitmaps extension"; qcow2-format.md
 * section 14).  Bitmaps are added one at a time (their data clusters and
 * table are written at once, as QEMU stores them), then qb_store_bitmaps()
 * writes the directory and the extension and sets autoclear bit 0, which
 * is what a cleanly closed image looks like.  Every field of a directory
 * entry stays changeable until qb_store_bitmaps(), and the finished buffer
 * can be poked at the positions the getters report.  Clusters written for
 * bitmaps count as referenced in the refcounts qb_finish() computes, so
 * good images pass `qemu-img check`.
 */
#define QB_EXT_BITMAPS       0x23852875U
#define QB_AUTOCLEAR_BITMAPS (1ULL << 0)
#define QB_BME_IN_USE        (1u << 0)
#define QB_BME_AUTO          (1u << 1)
#define QB_BME_ALL_ONES      1ULL /* table entry: offset 0, all ones */

/* One directory entry, every field written verbatim (section 14.2):
 * name_size and extra_data_size are the claimed lengths, NAME_LEN and
 * EXTRA_LEN the bytes actually stored (extra data first, then the name,
 * padded to 8).  qb_add_bitmap_entry() copies the bytes.
 */
struct qb_bitmap_entry {
    uint64_t table_offset;
    uint32_t table_size;
    uint32_t flags;
    uint8_t type;
    uint8_t granularity_bits;
    uint16_t name_size;
    uint32_t extra_data_size;
    const void *extra;
    size_t extra_len;
    const void *name;
    size_t name_len;
};

/* Serialise E at the end of the growable buffer *DIR of *LEN bytes (both
 * may start as NULL / 0).  Returns the entry's offset in the buffer.
 */
size_t qb_bitmap_entry_append(unsigned char **dir,
                              size_t *len,
                              const struct qb_bitmap_entry *e);

/* Allocate contiguous clusters for LEN bytes (at least one cluster) at the
 * end of the file and copy DATA (NULL: zeros) into them.  They count as
 * referenced (refcount 1).  Returns the host offset of the first.
 */
uint64_t qb_alloc_clusters(struct qb *b, const void *data, size_t len);

/* The exact table size QEMU requires for granularity 2^GBITS:
 * ceil(ceil(ceil(size / g) / 8) / cluster_size) (section 14.4).
 */
uint64_t qb_bitmap_table_size(const struct qb *b, unsigned gbits);

/* Add bitmap NAME (NUL-terminated) of granularity 2^GBITS with FLAGS.
 * STREAM holds the serialised bits (bit k in byte k/8 at position k%8),
 * STREAM_LEN bytes; missing bytes are clear, NULL means all clear.  A data
 * cluster is written for every table entry whose slice has a set bit, the
 * others are 0; then the table (exact size).  Returns the bitmap's index.
 */
size_t qb_add_bitmap(struct qb *b,
                     const char *name,
                     unsigned gbits,
                     uint32_t flags,
                     const void *stream,
                     size_t stream_len);
/* As qb_add_bitmap() with raw table entries (TABLE, N entries, host
 * order) written as the bitmap table; the directory entry says N entries.
 */
size_t qb_add_bitmap_table(struct qb *b,
                           const char *name,
                           unsigned gbits,
                           uint32_t flags,
                           const uint64_t *table,
                           size_t n);
/* Add a directory entry exactly as E says (nothing else is written). */
size_t qb_add_bitmap_entry(struct qb *b, const struct qb_bitmap_entry *e);
/* Entry IDX, changeable until qb_store_bitmaps() (its name and extra
 * pointers are the builder's copies: replace, do not free them).
 */
struct qb_bitmap_entry *qb_bitmap(struct qb *b, size_t idx);
size_t qb_nr_bitmaps(const struct qb *b);

/* Write the directory (all entries in index order) to new clusters and
 * add the bitmaps extension (nb_bitmaps = entries, reserved 0, size,
 * offset) after the extensions added so far.  Sets autoclear bit 0 on a v3
 * image.  Call once, after the last bitmap.
 */
void qb_store_bitmaps(struct qb *b);
/* After qb_store_bitmaps(): the directory's host offset and size, the
 * file offset of the extension's header (type, length; its data follows at
 * +8), and the file offset of entry IDX.  Assume the header_length of the
 * time of the store.
 */
uint64_t qb_bitmap_dir_offset(const struct qb *b);
uint64_t qb_bitmap_dir_size(const struct qb *b);
uint64_t qb_bitmaps_ext_pos(const struct qb *b);
uint64_t qb_bitmap_entry_pos(const struct qb *b, size_t idx);

#endif /* QCBT_QCOW2_BUILDER_H */

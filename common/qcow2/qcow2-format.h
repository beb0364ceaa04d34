/* qcbt: the qcow2 on-disk format, written down once.
 *
 * Every qcow2 structure qcbt reads or writes (QEMU docs/interop/qcow2.txt;
 * ../shared/docs/qcow2-format.md) has here a host struct named after the
 * spec and three functions:
 *
 *   decode    big-endian bytes -> struct.  Converts every field as found
 *             and judges nothing, except that the bytes must hold the
 *             structure (and what the struct cannot represent).
 *   encode    struct -> big-endian bytes, exactly as QEMU writes them.
 *   check     the validator: every rule of the structure, in one place,
 *             called by the reader after decode and by the writer before
 *             encode (QEMU's check_dir_entry()/check_table_entry()
 *             pattern), so that what qcbt writes is what it accepts.
 *             Returns 0 or -errno with a one-line message naming the field
 *             (qcbt_error()); what a structure cannot know by itself
 *             (cluster size, virtual size, file size) is passed in.
 *
 * Checks that need the rest of the image (where metadata lies, whether a
 * table runs past the end of the file, duplicate bitmap names) belong to
 * the code that has the image: qcow2.c, qcow2-bitmaps.c.
 *
 * Nothing outside qcow2-format.c converts the byte order of a qcow2 field.
 * Arrays of 64-bit entries (L1, L2, refcount and bitmap tables) and
 * refcount blocks are read and written with qcow2_table_get()/_set() and
 * qcow2_refblock_get()/_set(); the meaning of a table entry is given by
 * the masks below.
 */
#ifndef QCBT_QCOW2_FORMAT_H
#define QCBT_QCOW2_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QCOW2_MAGIC 0x514649fbU /* "QFI\xfb" */

/* Limits (QEMU's, qcow2-format.md section 4). */
#define QCOW2_MIN_CLUSTER_BITS    9
#define QCOW2_MAX_CLUSTER_BITS    21
#define QCOW2_MAX_L1_BYTES        (32u * 1024 * 1024)
#define QCOW2_MAX_REFTABLE_BYTES  (8u * 1024 * 1024)
#define QCOW2_MAX_HOST_OFFSET     ((1ULL << 56) - 1)
#define QCOW2_MAX_SNAPSHOTS       65536
#define QCOW2_MAX_BACKING_NAME    1023
#define QCOW2_MAX_BACKING_FMT     15
#define QCOW2_MAX_BITMAPS         65535
#define QCOW2_MAX_UNKNOWN_EXTS    64 /* recorded; more are skipped */
#define QCOW2_MAX_BITMAP_DIR_SIZE (1024ULL * 65535)
#define QCOW2_MAX_REFCOUNT_ORDER  6

/* incompatible_features */
#define QCOW2_INCOMPAT_DIRTY       (1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT     (1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE   (1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2       (1ULL << 4)
#define QCOW2_INCOMPAT_KNOWN       0x1fULL
/* compatible_features */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ULL << 0)
/* autoclear_features */
#define QCOW2_AUTOCLEAR_BITMAPS  (1ULL << 0)
#define QCOW2_AUTOCLEAR_DATA_RAW (1ULL << 1)

enum qcow2_compression {
    QCOW2_COMPRESSION_DEFLATE = 0,
    QCOW2_COMPRESSION_ZSTD = 1
};

/* ------------------------------------------------------------------ */
/* Header (qcow2.txt "Header") */

#define QCOW2_HEADER_V2_LENGTH 72  /* version 2: the whole header */
#define QCOW2_HEADER_V3_LENGTH 104 /* version 3: fixed part, minimum */
#define QCOW2_HEADER_LENGTH                    \
    112 /* v3 with compression_type + padding: \
           what QEMU writes, what we encode */

struct qcow2_header {
    uint32_t magic;
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    /* Version 3; a version-2 header implies 0, refcount_order 4 and
     * header_length 72. */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    /* Additional field at byte 104, present when header_length > 104
     * (absent = 0). */
    uint8_t compression_type;
};

/* Does BUF (LEN bytes) start with the qcow2 magic? */
bool qcow2_probe(const void *buf, size_t len);

/* Decode the header at the start of BUF (LEN bytes).  Fails (-EINVAL)
 * only when BUF is shorter than the header it holds: 72 bytes, 104 for
 * version 3 and later, 105 when header_length announces the compression
 * type.  Without the magic only the first 72 bytes are decoded.  Bytes
 * past offset 104 other than compression_type are not decoded (padding,
 * or additional fields qcbt does not know).
 */
int qcow2_header_decode(const void *buf, size_t len, struct qcow2_header *h);

/* Encode H into BUF, which must hold QCOW2_HEADER_LENGTH bytes: 72 bytes
 * for version 2, else the 104 fixed bytes and, when header_length > 104,
 * compression_type and zero padding up to byte 112.  Bytes from 112 to
 * header_length are left alone (the caller keeps unknown additional
 * fields there).  Returns the number of bytes written.
 */
size_t qcow2_header_encode(const struct qcow2_header *h, void *buf);

/* Every rule of the header (what QEMU's qcow2_do_open() enforces, plus
 * overflow checks), for an image file of FILE_SIZE bytes.  Encryption is
 * refused (ENOTSUP): qcbt reads and writes no encrypted image.
 */
int qcow2_header_check(const struct qcow2_header *h, uint64_t file_size);

/* ------------------------------------------------------------------ */
/* Header extensions (qcow2.txt "Header extensions") */

#define QCOW2_EXT_END         0x00000000U
#define QCOW2_EXT_BACKING_FMT 0xe2792acaU
#define QCOW2_EXT_FEATURES    0x6803f857U
#define QCOW2_EXT_BITMAPS     0x23852875U
#define QCOW2_EXT_CRYPTO      0x0537be77U
#define QCOW2_EXT_DATA_FILE   0x44415441U

#define QCOW2_HEADER_EXT_SIZE 8 /* type, length; the data follows */

struct qcow2_header_ext {
    uint32_t type;
    uint32_t len; /* of the data, without the padding to 8 bytes */
};

void qcow2_header_ext_decode(const void *buf, struct qcow2_header_ext *e);
void qcow2_header_ext_encode(const struct qcow2_header_ext *e, void *buf);

/* The extension whose 8-byte header is at byte OFF of cluster 0, in an
 * extension area ending at END (the backing file name, or the end of the
 * cluster): its data must end by END (QEMU's rule; the padding may not).
 */
int qcow2_header_ext_check(const struct qcow2_header_ext *e,
                           uint64_t off,
                           uint64_t end);

/* Bytes an extension of LEN data bytes takes: header, data, padding. */
uint64_t qcow2_header_ext_size(uint32_t len);

/* ------------------------------------------------------------------ */
/* Feature name table (qcow2.txt "Feature name table"): 48-byte entries */

#define QCOW2_FEATURE_NAME_SIZE      48
#define QCOW2_FEATURE_NAME_LEN       46
#define QCOW2_FEATURE_TYPE_INCOMPAT  0
#define QCOW2_FEATURE_TYPE_COMPAT    1
#define QCOW2_FEATURE_TYPE_AUTOCLEAR 2

struct qcow2_feature_name {
    uint8_t type;                          /* QCOW2_FEATURE_TYPE_* */
    uint8_t bit;                           /* 0..63 */
    char name[QCOW2_FEATURE_NAME_LEN + 1]; /* NUL-terminated copy of the
                                              46-byte field */
};

/* The features QEMU 7.2 names in its table, in the order it writes them
 * (qcbt's writer writes exactly this table). */
extern const struct qcow2_feature_name qcow2_known_features[];
extern const size_t qcow2_nr_known_features;

void qcow2_feature_name_decode(const void *buf, struct qcow2_feature_name *f);
/* Writes the name up to its first NUL, zero padded (as QEMU does). */
void qcow2_feature_name_encode(const struct qcow2_feature_name *f, void *buf);
int qcow2_feature_name_check(const struct qcow2_feature_name *f);

/* ------------------------------------------------------------------ */
/* Bitmaps extension (qcow2.txt "Bitmaps extension") */

#define QCOW2_BITMAPS_EXT_SIZE 24

struct qcow2_bitmaps_ext {
    uint32_t nb_bitmaps;
    uint32_t reserved32;
    uint64_t bitmap_directory_size;
    uint64_t bitmap_directory_offset;
};

void qcow2_bitmaps_ext_decode(const void *buf, struct qcow2_bitmaps_ext *e);
void qcow2_bitmaps_ext_encode(const struct qcow2_bitmaps_ext *e, void *buf);

/* QEMU's qcow2_read_extensions() rules, and the directory must lie in an
 * image file of FILE_SIZE bytes.
 */
int qcow2_bitmaps_ext_check(const struct qcow2_bitmaps_ext *e,
                            uint64_t cluster_size,
                            uint64_t file_size);

/* ------------------------------------------------------------------ */
/* Bitmap directory entry (qcow2.txt "Bitmap directory") */

#define QCOW2_BME_FLAG_IN_USE                (1u << 0)
#define QCOW2_BME_FLAG_AUTO                  (1u << 1)
#define QCOW2_BME_FLAG_EXTRA_DATA_COMPATIBLE (1u << 2)
#define QCOW2_BME_MAX_TABLE_SIZE             0x8000000u
#define QCOW2_BME_MAX_PHYS_SIZE              0x20000000ULL
#define QCOW2_BME_MAX_NAME_SIZE              1023
#define QCOW2_BME_MIN_GRANULARITY_BITS       9
#define QCOW2_BME_MAX_GRANULARITY_BITS       31
#define QCOW2_BME_TYPE_DIRTY_TRACKING        1
#define QCOW2_BITMAP_DIR_ENTRY_FIXED         24 /* before extra data, name */

/* One entry.  extra_data_size is not represented: QEMU refuses extra data
 * (bitmap_list_load: "Bitmap extra data is not supported"), so decode
 * refuses it and encode writes 0.
 */
struct qcow2_bitmap_dir_entry {
    uint64_t bitmap_table_offset;
    uint32_t bitmap_table_size; /* entries */
    uint32_t flags;             /* QCOW2_BME_FLAG_* */
    uint8_t type;
    uint8_t granularity_bits;
    uint16_t name_size;
    const char *name; /* name_size bytes, not NUL-terminated; decode
                         points into its buffer */
};

/* Bytes the entry takes in the directory, padding included. */
uint64_t qcow2_bitmap_dir_entry_size(const struct qcow2_bitmap_dir_entry *e);

/* Decode the entry at the start of BUF, the LEN bytes left in the
 * directory.  Fails (-EINVAL) if the fixed part or the whole entry does
 * not fit, or if it has extra data.
 */
int qcow2_bitmap_dir_entry_decode(const void *buf,
                                  size_t len,
                                  struct qcow2_bitmap_dir_entry *e);

/* Encode E into BUF (LEN bytes): fixed part, name, zero padding.  Returns
 * the number of bytes written (qcow2_bitmap_dir_entry_size()), or -ENOSPC
 * if LEN is too small.
 */
int64_t qcow2_bitmap_dir_entry_encode(const struct qcow2_bitmap_dir_entry *e,
                                      void *buf,
                                      size_t len);

/* The rules of a bitmap name (name_size 1..1023; no NUL byte and valid
 * UTF-8, because names become NBD context names).  The entry validator
 * applies them; a directory walk uses them to know whether it can still
 * trust the names of the entries.
 */
int qcow2_bitmap_name_check(const char *name, size_t len);

/* QEMU's check_dir_entry() for an image with clusters of CLUSTER_SIZE
 * bytes and VIRTUAL_SIZE guest bytes, with its size rule made exact (as
 * QEMU's load_bitmap_data() demands): the name, type 1, known flags
 * (extra_data_compatible included, QEMU refuses it), granularity_bits
 * 9..31, table size 1..0x8000000 and at most 512 MiB of bitmap data, a
 * non-zero cluster-aligned table offset, and, unless in_use, exactly the
 * table size the virtual size needs.
 */
int qcow2_bitmap_dir_entry_check(const struct qcow2_bitmap_dir_entry *e,
                                 uint64_t cluster_size,
                                 uint64_t virtual_size);

/* Bitmap table entries a bitmap of granularity 2^GBITS needs
 * (qcow2-format.md section 14.4). */
uint64_t qcow2_bitmap_table_size_needed(uint64_t virtual_size,
                                        uint64_t cluster_size,
                                        unsigned gbits);

/* ------------------------------------------------------------------ */
/* Bitmap table entry (qcow2.txt "Bitmap table"), 64 bits */

#define QCOW2_BME_TABLE_RESERVED_MASK 0xff000000000001feULL
#define QCOW2_BME_TABLE_OFFSET_MASK   0x00fffffffffffe00ULL
#define QCOW2_BME_TABLE_ALL_ONES      1ULL

struct qcow2_bitmap_table_entry {
    uint64_t offset;   /* bits 9-55: data cluster, 0 = none */
    bool all_ones;     /* bit 0: without a data cluster, reads as ones */
    uint64_t reserved; /* bits 1-8 and 56-63 as found; must be 0 */
};

void qcow2_bitmap_table_entry_decode(const void *buf,
                                     struct qcow2_bitmap_table_entry *e);
void qcow2_bitmap_table_entry_encode(const struct qcow2_bitmap_table_entry *e,
                                     void *buf);
/* QEMU's check_table_entry(). */
int qcow2_bitmap_table_entry_check(const struct qcow2_bitmap_table_entry *e,
                                   uint64_t cluster_size);

/* ------------------------------------------------------------------ */
/* L1, L2 and refcount table entries (qcow2.txt "Cluster mapping",
 * "Reference count"): masks, QEMU block/qcow2.h names and values.
 */

#define QCOW2_L1E_OFFSET_MASK   0x00fffffffffffe00ULL
#define QCOW2_L1E_RESERVED_MASK 0x7f000000000001ffULL
#define QCOW2_L2E_OFFSET_MASK   0x00fffffffffffe00ULL
#define QCOW2_L2E_STD_RESERVED  0x3f000000000001feULL
#define QCOW2_OFLAG_COPIED      (1ULL << 63)
#define QCOW2_OFLAG_COMPRESSED  (1ULL << 62)
#define QCOW2_OFLAG_ZERO        (1ULL << 0)
#define QCOW2_REFT_OFFSET_MASK  0xfffffffffffffe00ULL

/* Every rule of one L2 entry ENTRY and, for extended L2 entries, its
 * subcluster BITMAP (0 otherwise), in an image with header H (qcow2.txt
 * "Standard Cluster Descriptor", "Compressed Clusters Descriptor",
 * "Extended L2 Entries"; what QEMU's qcow2_get_cluster_type() and
 * qcow2_get_subcluster_type() refuse):
 *   - a compressed cluster: not with an external data file, and its
 *     subcluster bitmap is 0;
 *   - a standard cluster: reserved bits 1-8 and 56-61 clear; bit 0 (the
 *     zero flag) only from version 3 on (QEMU: "Zero cluster entry found
 *     in pre-v3 image"); a cluster-aligned host offset;
 *   - extended L2: no subcluster both allocated and zero in an allocated
 *     cluster, no allocated subcluster in an unallocated one.
 * Returns 0 or -EIO with a message saying what is wrong; the caller
 * prefixes the file, the entry and the guest offset.  Used by the reader
 * on every entry it maps and by the writer on every entry it stores.
 */
int qcow2_l2_entry_check(uint64_t entry,
                         uint64_t bitmap,
                         const struct qcow2_header *h);

/* Entry IDX of a table of big-endian 64-bit entries. */
uint64_t qcow2_table_get(const void *table, uint64_t idx);
void qcow2_table_set(void *table, uint64_t idx, uint64_t entry);

/* Entry IDX of a refcount block of 2^REFCOUNT_ORDER-bit entries
 * (big-endian from 8 bits up, LSB-first within a byte below). */
uint64_t
qcow2_refblock_get(const void *block, unsigned refcount_order, uint64_t idx);
void qcow2_refblock_set(void *block,
                        unsigned refcount_order,
                        uint64_t idx,
                        uint64_t refcount);

/* ------------------------------------------------------------------ */
/* Compressed cluster descriptor (qcow2.txt "Compressed Clusters
 * Descriptor"): bits 0..61 of the L2 entry of a compressed cluster, laid
 * out by cluster_bits.
 */

struct qcow2_compressed_desc {
    uint64_t host_offset; /* byte offset of the compressed data */
    uint64_t nb_sectors;  /* additional 512-byte sectors after the one
                             holding host_offset */
};

void qcow2_compressed_desc_decode(uint64_t l2_entry,
                                  unsigned cluster_bits,
                                  struct qcow2_compressed_desc *d);
/* The L2 entry: the descriptor with QCOW2_OFLAG_COMPRESSED. */
uint64_t qcow2_compressed_desc_encode(const struct qcow2_compressed_desc *d,
                                      unsigned cluster_bits);
/* Both fields fit their bits, the offset below 2^56. */
int qcow2_compressed_desc_check(const struct qcow2_compressed_desc *d,
                                unsigned cluster_bits);

/* Bytes from host_offset that may hold the compressed data, and the most
 * a descriptor can give for CLUSTER_BITS. */
uint64_t qcow2_compressed_desc_len(const struct qcow2_compressed_desc *d);
uint64_t qcow2_compressed_max_len(unsigned cluster_bits);

#endif /* QCBT_QCOW2_FORMAT_H */

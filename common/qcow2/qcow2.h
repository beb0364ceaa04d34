/* qcbt: qcow2 reader (read-only open, mapping, compressed clusters).
 *
 * Format facts: QEMU docs/interop/qcow2.txt; ../shared/docs/qcow2-format.md.
 * Every field read from the image is decoded and validated at the boundary
 * by the format layer (qcow2-format.h), the same rules the writer obeys.
 *
 * Threads.  An image is two parts:
 *   - the immutable part, built by qcow2_open() and never changed after
 *     (hdr as read at open, sizes, l1, names, extensions): read it from any
 *     thread without a lock.  qcow2_map() and the data path use only this
 *     and the L2 cache, a read cache with its own mutex (taken last, never
 *     held while taking another lock);
 *   - the mutable part, img->st (struct qcow2_image_state): what changes
 *     after open (the header fields a bitmap store switches, the refcount
 *     table an allocator moves when it grows it, the bitmaps
 *     extension, the metadata map the bitmap loader rebuilds) and,
 *     through a qcow2_alloc, the cluster allocation and refcounts.  It is
 *     guarded by ONE lock, img->st.lock (qcow2_lock()/qcow2_unlock()):
 *     every reader and writer of st takes it.  qcow2_bitmaps_load(),
 *     qcow2_bitmaps_parse_dir(), qcow2_bitmap_load_data(), the bitmap
 *     store (qcow2-store.h) and an allocator from qcow2_alloc_new() to
 *     qcow2_alloc_free() take it themselves.
 * One exception: img->io->size grows as the store writes past the end of
 * the file, and qcow2_map() reads it unlocked.  No process maps an image
 * while it changes its metadata today; one that writes guest data while
 * serving reads must first move the size under the lock.
 */
#ifndef QCBT_QCOW2_H
#define QCBT_QCOW2_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io.h"
#include "qcow2-format.h"

struct qcow2_unknown_ext {
    uint32_t type;
    uint32_t len;
};

/* The bitmaps extension as found (qcow2.txt "Bitmaps extension"),
 * validated by qcow2_bitmaps_load(): a bad one makes the layer's bitmaps
 * unusable, not the image unreadable.  The directory itself is parsed by
 * qcow2-bitmaps.c.
 */
struct qcow2_bitmaps_found {
    bool present;
    uint32_t ext_len;             /* must be 24 */
    struct qcow2_bitmaps_ext ext; /* decoded if ext_len >= 24, else 0 */
};

struct qcow2_l2_cache;
struct qcow2_metamap;

/* The part of an image that changes after open (see the top of this
 * file).  Every field is read and written under LOCK only; use the
 * accessors below outside common/qcow2.
 *
 * LOCK is recursive: the bitmap store holds it across a whole change and
 * calls the loaders, which take it again, and a writer holding an
 * allocator may load bitmaps.  Hold it on one thread at a time, never
 * across a wait for another thread that takes it.
 */
struct qcow2_image_state {
    pthread_mutex_t lock;
    uint64_t autoclear_features;  /* as on disk now (hdr: as at open) */
    uint64_t backing_file_offset; /* the same */
    /* Where the refcount table is now: an allocator moves it when it
     * grows it (qcow2-store.h). */
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    struct qcow2_bitmaps_found bitmaps;
    /* Metadata placement for bitmap checks (qcow2-metamap.h), built by
     * qcow2_bitmaps_load(); NULL before. */
    struct qcow2_metamap *bm_map;
};

struct qcow2_image {
    struct qcbt_io *io;      /* the qcow2 file; owned */
    struct qcbt_io *data_io; /* external data file, or == io; owned if != io */
    struct qcow2_header hdr; /* as read at open, never changed: the fields
                                a store changes are in st */

    uint64_t cluster_size;
    uint64_t size;    /* guest bytes: hdr.size rounded down to 512 */
    unsigned l2_bits; /* log2(entries per L2 table) */
    uint64_t l2_entries;
    bool extended_l2;
    unsigned subcluster_bits; /* log2(subcluster size) */

    uint64_t *l1; /* host byte order, l1_size entries */

    char *backing_name;   /* as stored, NUL-terminated, or NULL */
    char *backing_fmt;    /* from the extension, or NULL */
    char *data_file_name; /* from the extension, or NULL */
    struct qcow2_feature_name *features;
    size_t nr_features;
    struct qcow2_unknown_ext *unknown_exts;
    size_t nr_unknown_exts;
    bool has_crypto_ext;

    struct qcow2_l2_cache *l2_cache;

    /* QEMU's metadata-preallocation heuristic, computed on first use. */
    pthread_once_t prealloc_once;
    bool metadata_prealloc;

    struct qcow2_image_state st; /* mutable: under st.lock */
};

/* Take and release the lock of IMG's mutable part (recursive). */
void qcow2_lock(struct qcow2_image *img);
void qcow2_unlock(struct qcow2_image *img);

/* The bitmaps extension as it is now (it changes when a bitmap store
 * switches the header), copied under the lock. */
void qcow2_get_bitmaps_found(struct qcow2_image *img,
                             struct qcow2_bitmaps_found *out);

/* The autoclear feature bits as they are now (hdr.autoclear_features is
 * their value at open). */
uint64_t qcow2_autoclear_features(struct qcow2_image *img);

/* Parse and validate the header, every header extension and the L1 table
 * of the qcow2 image read through IO.  Takes ownership of io (freed on
 * error too).  The external data file, if any, is attached separately with
 * qcow2_set_data_file() before the first read.  Returns 0 or -errno with a
 * message.
 */
int qcow2_open(struct qcbt_io *io, struct qcow2_image **out);

/* Attach the external data file (ownership passes to img). */
void qcow2_set_data_file(struct qcow2_image *img, struct qcbt_io *data_io);

void qcow2_close(struct qcow2_image *img);

/* Kinds of guest range, QEMU's QCOW2_SUBCLUSTER_* collapsed. */
enum qcow2_kind {
    QCOW2_UNALLOCATED, /* read through to the backing file (or zeros) */
    QCOW2_ZERO,        /* reads as zeros, hides the backing file */
    QCOW2_DATA,        /* host_offset valid, in img->data_io */
    QCOW2_COMPRESSED,  /* one compressed cluster; descriptor in l2_entry */
};

struct qcow2_extent {
    enum qcow2_kind kind;
    uint64_t len;         /* bytes from the queried offset */
    uint64_t host_offset; /* QCOW2_DATA: host offset of the queried byte */
    uint64_t l2_entry;    /* QCOW2_COMPRESSED: the descriptor */
    bool offset_valid;    /* qemu's BDRV_BLOCK_OFFSET_VALID: a host cluster
                             is behind the range (data or zero-alloc) */
};

/* Map guest range [offset, offset+len) (len > 0, within img->size): the
 * kind of the first byte and how many bytes share it, contiguously in the
 * host for QCOW2_DATA, one cluster at most for QCOW2_COMPRESSED.  Returns 0
 * or -errno (bad L1/L2 entry, I/O error) with a message.
 */
int qcow2_map(struct qcow2_image *img,
              uint64_t offset,
              uint64_t len,
              struct qcow2_extent *ext);

/* Decompress the cluster described by the compressed descriptor ENTRY
 * into OUT (cluster_size bytes).  SCRATCH must hold at least
 * qcow2_compressed_scratch_size(img) bytes.  Returns 0 or -errno.
 */
int qcow2_read_compressed(struct qcow2_image *img,
                          uint64_t entry,
                          void *out,
                          void *scratch);
size_t qcow2_compressed_scratch_size(const struct qcow2_image *img);

/* Does QEMU's block layer treat IMG as metadata-preallocated
 * (qcow2_detect_metadata_preallocation: many more clusters in use by
 * refcount than the file occupies on disk)?  If so, QEMU's block status
 * asks the file system whether data clusters are holes, and `qemu-img
 * map` reports such clusters as zero.  Computed once; false on any doubt
 * (unknown allocation, unreadable refcounts).
 */
bool qcow2_metadata_preallocated(struct qcow2_image *img);

/* The refcount of host cluster CLUSTER.  Returns 0 or -errno. */
int qcow2_get_refcount(struct qcow2_image *img,
                       uint64_t cluster,
                       uint64_t *refcount);

/* Low-level helpers, exposed for the unit tests. */

/* Decode the fixed header in BUF (LEN bytes, at least 72) and validate it
 * against a file of FILE_SIZE bytes (qcow2_header_decode(),
 * qcow2_header_check()); fill *hdr.  Returns 0 or -errno with a message.
 */
int qcow2_parse_header(const void *buf,
                       size_t len,
                       uint64_t file_size,
                       struct qcow2_header *hdr);

/* Decode a compressed descriptor: host byte offset and the number of bytes
 * that may hold the data.  Returns 0 or -EIO if the descriptor is invalid.
 */
int qcow2_decode_compressed(const struct qcow2_image *img,
                            uint64_t entry,
                            uint64_t *coffset,
                            uint64_t *csize);

/* Decompress IN (inlen bytes) into exactly OUTLEN bytes with the image's
 * method.  Returns 0 or -EIO ("truncated", "corrupt", "too large").
 */
int qcow2_decompress(enum qcow2_compression type,
                     const void *in,
                     size_t inlen,
                     void *out,
                     size_t outlen);

/* Name of an incompatible/compatible/autoclear bit from the image's feature
 * table or the built-in names; NULL if unknown.
 */
const char *
qcow2_feature_name(const struct qcow2_image *img, uint8_t type, uint8_t bit);

#endif /* QCBT_QCOW2_H */

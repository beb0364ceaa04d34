/* qcbt: writing qcow2 metadata in place (DESIGN.md "Loading and storing
 * (crash safety)").
 *
 * Two layers:
 *
 *   qcow2-alloc.c         cluster allocation and refcount updates in an
 *                         existing image.  New clusters come from the end
 *                         of the file (free clusters inside the file are
 *                         not reused); the refcount blocks missing for
 *                         them are created just before them.  A block
 *                         past what the refcount table counts makes the
 *                         commit grow the table (as QEMU does: a new one
 *                         at the end of the file, the header switched,
 *                         the old one freed); only QEMU's 8 MiB limit is
 *                         refused (ENOSPC).
 *   qcow2-bitmap-store.c  the bitmap directory: add, remove, clear,
 *                         enable, disable, as `qemu-img bitmap` does them.
 *
 * The order of every store is QEMU's (block/qcow2-bitmap.c
 * update_ext_header_and_dir()): new clusters (bitmap tables, directory,
 * their refcounts) written and flushed; the header's bitmaps extension
 * switched by one write of the bytes that change; flushed; only then are
 * the old clusters' refcounts decremented.  A failure or crash at any
 * point leaves every bitmap exactly old or exactly new and the image
 * `qemu-img check` clean but for leaked clusters.
 *
 * The image must be opened on a writable io holding the WRITE image lock
 * (qcbt_io_lock(): other processes).  Inside the process, everything here
 * changes the image's mutable part and holds its lock (qcow2.h,
 * qcow2_lock()): a bitmap change from start to end, an allocator from
 * qcow2_alloc_new() to qcow2_alloc_free() (on the thread that created
 * it), so bitmap loads of the same image object from other threads wait
 * and see the image before or after.  qcow2_map() and guest reads do not
 * take it: a writer of guest data (L1/L2) would have to.
 */
#ifndef QCBT_QCOW2_STORE_H
#define QCBT_QCOW2_STORE_H

#include <stdbool.h>
#include <stdint.h>

#include "qcow2.h"

/* ------------------------------------------------------------------ */
/* Cluster allocation (qcow2-alloc.c) */

struct qcow2_alloc;

/* Start allocating in IMG: load the refcount table.  Refuses images whose
 * refcounts cannot be trusted (dirty with lazy refcounts, marked
 * corrupt).  Returns 0 and *out or -errno with a message.
 */
int qcow2_alloc_new(struct qcow2_image *img, struct qcow2_alloc **out);
void qcow2_alloc_free(struct qcow2_alloc *a);

/* Reserve N contiguous clusters at the end of the file; *offset is the
 * byte offset of the first.  Nothing is written until
 * qcow2_alloc_commit().  The caller writes the clusters' contents.
 */
int qcow2_alloc_clusters(struct qcow2_alloc *a, uint64_t n, uint64_t *offset);

/* Make the reserved clusters' refcounts 1 on disk: new refcount blocks
 * and the increments in existing blocks written and flushed, then the
 * refcount table entries of the new blocks written and flushed.  Call
 * after writing the clusters' contents and before anything points to
 * them.
 *
 * When a new block lies past the table, the table grows instead of
 * being written in place: a new table half as large again (or more) is
 * reserved after every cluster reserved so far, with the blocks that
 * count it and themselves; blocks and table written and flushed; the
 * header's refcount_table_offset and refcount_table_clusters switched
 * by one write and flushed; the allocator and img->st follow the new
 * table; the old table's clusters are freed (counted in the new table)
 * and flushed.  A failure before the switch leaves the old table in
 * use (the new clusters leak); after it, at worst the old table leaks.
 */
int qcow2_alloc_commit(struct qcow2_alloc *a);

/* Could N more clusters, and the refcount blocks and the grown table
 * they need, be counted by a refcount table within QEMU's 8 MiB limit?
 * A bound, computed before anything is written, for an operation that
 * allocates as it goes.  Returns 0 or -ENOSPC ("largest refcount
 * table").
 */
int qcow2_alloc_check_room(struct qcow2_alloc *a, uint64_t n);

/* Decrement the refcount of the cluster at byte OFFSET (written at once;
 * the caller flushes).  A refcount already 0 is an error (the image is
 * corrupt).
 */
int qcow2_free_cluster(struct qcow2_alloc *a, uint64_t offset);

/* ------------------------------------------------------------------ */
/* Bitmap directory changes (qcow2-bitmap-store.c) */

enum qcow2_bitmap_op {
    QCOW2_BITMAP_ADD,
    QCOW2_BITMAP_REMOVE,
    QCOW2_BITMAP_CLEAR,
    QCOW2_BITMAP_ENABLE,
    QCOW2_BITMAP_DISABLE,
    QCOW2_BITMAP_MERGE, /* qcow2_bitmap_merge() */
};

/* The granularity QEMU gives a new bitmap when none is asked for
 * (bdrv_get_default_bitmap_granularity(): `qemu-img bitmap --add`
 * without -g, and libvirt's checkpoints), as log2: the cluster size
 * clamped to 4 KiB..64 KiB.  512 B clusters give 4 KiB, 2 MiB clusters
 * 64 KiB.
 */
static inline unsigned
qcow2_bitmap_default_gbits(uint64_t cluster_size)
{
    unsigned b = cluster_size ? (unsigned)__builtin_ctzll(cluster_size) : 16;

    return b < 12 ? 12 : b > 16 ? 16 : b;
}

/* Apply OP to the persistent bitmap NAME of IMG (opened read-write).
 * ADD creates an empty bitmap of granularity 2^GBITS (GBITS 0: QEMU's
 * default, qcow2_bitmap_default_gbits()), enabled (flag "auto") unless
 * DISABLED; the others need NAME to exist, and CLEAR,
 * ENABLE and DISABLE refuse a bitmap in use (as QEMU refuses an
 * inconsistent bitmap).  Refused as QEMU refuses: version 2 images, bad
 * names, granularity outside 512 B..2 GiB, more than 65535 bitmaps, a
 * directory over 64 MiB, an invalid bitmap directory.  Returns 0 or
 * -errno with a one-line message; on failure the image holds exactly the
 * old bitmaps (plus, at worst, leaked clusters).
 */
int qcow2_bitmap_modify(struct qcow2_image *img,
                        enum qcow2_bitmap_op op,
                        const char *name,
                        unsigned gbits,
                        bool disabled);

struct bitmap;

/* `qemu-img bitmap --merge`: OR SRC into the persistent bitmap NAME of
 * IMG (which must exist and not be in use; its flags stay).  SRC must
 * cover the same virtual size (QEMU's rule); granularities may differ
 * (a target bit is set when a set source bit overlaps it).  NAME gets a
 * new table and data clusters (zero clusters stored as entry 0, as QEMU
 * does); its old ones are freed after the switch.
 */
int qcow2_bitmap_merge(struct qcow2_image *img,
                       const char *name,
                       const struct bitmap *src);

/* ADD and merge in one switch: a new persistent bitmap NAME of
 * granularity 2^GBITS (enabled unless DISABLED) holding the bits of SRC
 * (same virtual size, granularities may differ).  A crash leaves the
 * image without NAME or with NAME complete, never with it empty.
 */
int qcow2_bitmap_add_merged(struct qcow2_image *img,
                            const char *name,
                            unsigned gbits,
                            bool disabled,
                            const struct bitmap *src);

/* The same with the source the bitmap SRC_NAME of IMG itself (refused
 * as qcow2_bitmap_load_named() refuses it, before anything else): IMG's
 * bitmaps are loaded and checked once for both.
 */
int qcow2_bitmap_merge_named(struct qcow2_image *img,
                             const char *name,
                             const char *src_name);

/* Load the consistent persistent bitmap NAME of IMG (not found, in use
 * and invalid are errors).  Returns 0 and *out (bitmap_free()) or -errno
 * with a message.
 */
int qcow2_bitmap_load_named(struct qcow2_image *img,
                            const char *name,
                            struct bitmap **out);

/* ------------------------------------------------------------------ */
/* Guest data writes (qcow2-data-write.c) */

struct qcow2_data_writer;

/* Start writing guest data into IMG (opened read-write, holding the
 * WRITE image lock).  Refused (ENOTSUP, one line): version 2 images,
 * extended L2 entries (subclusters), an external data file, encryption,
 * internal snapshots; and, as by qcow2_alloc_new(), images marked dirty
 * or corrupt.  Returns 0 and *out or -errno with a message.
 */
int qcow2_data_writer_new(struct qcow2_image *img,
                          struct qcow2_data_writer **out);

/* Stage guest cluster GUEST (cluster-aligned, inside the image, strictly
 * after the cluster staged before): BUF (cluster_size bytes; past the end
 * of the image they are stored but never read) becomes its data, or with
 * BUF NULL it becomes a zero cluster (the L2 zero flag; no data).  A
 * data cluster with refcount 1 is overwritten in place; otherwise a new
 * cluster is written and the entry switched by qcow2_data_writer_sync(),
 * which runs by itself when GUEST leaves the L2 table being staged.
 * Data may wait in the writer (up to 1 MiB of host-contiguous clusters)
 * until the next put or sync.
 *
 * The order, per L2 table: data written (in place or to new clusters),
 * a new L2 table written, refcounts of the new clusters made 1 and
 * everything flushed; then the changed L2 entries written (or, for a new
 * table, its L1 entry), flushed; only then are the clusters no longer
 * referenced (replaced data clusters, the sectors of compressed ones)
 * decremented and flushed.  A crash or failure at any point leaves each
 * cluster's guest data exactly old or exactly new and the image `qemu-img
 * check` clean but for leaked clusters.  After a failure the writer may
 * only be freed.
 */
int qcow2_data_writer_put(struct qcow2_data_writer *w,
                          uint64_t guest,
                          const void *buf);

/* Make every staged cluster live (see above).  Returns 0 or -errno. */
int qcow2_data_writer_sync(struct qcow2_data_writer *w);

/* Free W; staged changes not synced are dropped (their new clusters
 * leak, the guest data stays as it was). */
void qcow2_data_writer_free(struct qcow2_data_writer *w);

#endif /* QCBT_QCOW2_STORE_H */

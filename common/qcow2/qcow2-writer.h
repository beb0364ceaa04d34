/* qcbt: a buffered writer for new qcow2 v3 images (the backup agent's
 * output: a full backup stands alone, an incremental one names the
 * previous backup as its backing file).
 *
 * Format facts: QEMU docs/interop/qcow2.txt; ../shared/docs/qcow2-format.md
 * sections 1-6 and 13 ("Minimal-writer checklist").
 *
 * What comes out: version 3, header_length 112, refcount_order 4 (16-bit
 * refcounts), deflate compression type, no feature bits set, the
 * feature-name table when the cluster is larger than 4 KiB (as qemu 7.2
 * does), the backing-format extension and backing file name (stored
 * exactly as given) when there is a backing file.  Guest clusters are
 * DATA (offset | QCOW_OFLAG_COPIED), ZERO (QCOW_OFLAG_ZERO, no host
 * cluster) or unallocated (read through to the backing file).
 *
 * Host layout: cluster 0 is the header, written last; data clusters are
 * appended in the order they are first written, through a write-behind
 * buffer (large sequential pwrites); L2 tables are appended when they
 * leave memory (see Memory) and at close, then the L1 table, the refcount
 * table and the refcount blocks, and the header is written.  Refcounts are
 * exact (every cluster in use has refcount 1, clusters freed by a later zero
 * request have refcount 0 unless reused), so `qemu-img check` finds no errors
 * and no leaks.
 *
 * Memory: L2 tables are allocated per L1 entry on first use; when the file
 * can be read back (qcow2_writer_create(), a descriptor open O_RDWR, an
 * io), at most 4 MiB of them (and at least 4 tables) stay in memory: the
 * least recently used one is written to its host cluster and read back
 * if it is needed again (writes in nearly guest order, as a backup's,
 * write each table once).  A write-only descriptor keeps every table
 * touched until close (one cluster each: 128 MiB per TiB with 64 KiB
 * clusters).  Plus 24 bytes per L1 entry, the write-behind buffer and
 * one scratch cluster.
 *
 * Threads: a writer is NOT thread-safe.  All calls on one writer must come
 * from one thread at a time (the backup engine calls it from its single
 * writer thread); different writers are independent.  The fill callback
 * runs synchronously on the calling thread and must not call back into
 * the same writer.
 *
 * Errors: functions return 0 or -errno and record a one-line message
 * (common/utils/error.h) naming the file and the offset.  An I/O error on
 * the image file (a write, a writeback the writer starts or waits for, the
 * final flush) is sticky: every later call fails with the same errno and
 * close does not write a header, so the half-written file is never a valid
 * qcow2 image.  Argument errors (range outside the image) and fill
 * callback failures are not sticky; the range's guest contents are then
 * unspecified.
 */
#ifndef QCBT_QCOW2_WRITER_H
#define QCBT_QCOW2_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QCOW2_WRITER_DEFAULT_CLUSTER_SIZE (64u * 1024)
#define QCOW2_WRITER_DEFAULT_BUFFER_SIZE  (8u * 1024 * 1024)

/* Supplies the guest bytes [offset, offset+len) that the new image must
 * keep where a write or zero request covers only part of a cluster that
 * this image does not hold yet: normally what the backing chain reads
 * there (zeros without a backing file).  len < cluster size, and the
 * range never crosses the virtual size or a cluster boundary.  Returns 0,
 * or -errno after recording a message with qcbt_error().
 */
typedef int (*qcow2_writer_fill_fn)(void *opaque,
                                    void *buf,
                                    size_t len,
                                    uint64_t offset);

struct qcow2_writer_opts {
    /* Virtual size in bytes.  Rounded up to a multiple of 512 as
     * `qemu-img create` does (qcow2 sizes are in whole sectors); see
     * qcow2_writer_size().
     */
    uint64_t size;

    /* Power of two, 512 .. 2 MiB; 0 = 64 KiB. */
    uint32_t cluster_size;

    /* Backing file name, stored exactly as given (normally relative to
     * the new image's directory), at most 1023 bytes and it must fit in
     * cluster 0 after the header.  NULL or "" = no backing file.
     */
    const char *backing_file;

    /* Backing file format ("qcow2", "raw"; 1..15 bytes).  Required with a
     * backing file, must be NULL without one.
     */
    const char *backing_fmt;

    /* Partial-cluster completion, see qcow2_writer_fill_fn.  May be NULL
     * when there is no backing file (the rest of the cluster is then
     * zeros); with a backing file a partial write or zero request without
     * a fill callback fails with -EINVAL.
     */
    qcow2_writer_fill_fn fill;
    void *fill_opaque;

    /* Write-behind buffer in bytes; 0 = 8 MiB.  Rounded up to a whole
     * number of clusters (at least one).
     */
    size_t buffer_size;

    /* Host clusters the image will gain after close (bitmaps added with
     * qcow2-store.h): the refcount table is made large enough to cover
     * them too, so that the store need not grow it.  0 = none; at most
     * 2^40.
     */
    uint64_t refcount_reserve;
    /* Bytes of L2 tables kept in memory (see Memory); 0 = 4 MiB.  At
     * least 4 tables, at most 1024.
     */
    size_t l2_cache_size;

    /* qcow2_writer_create(): fail with -EEXIST if PATH exists (O_EXCL). */
    bool exclusive;
};

struct qcow2_writer;

/* Create the image file PATH (created with mode 0666 & ~umask, truncated
 * unless opts->exclusive) and a writer for it.  Nothing valid is on disk
 * until qcow2_writer_close() succeeds.  Returns 0 and *out (owned by the
 * caller: release with qcow2_writer_close() or qcow2_writer_abort()), or
 * -errno with a message.
 */
int qcow2_writer_create(const char *path,
                        const struct qcow2_writer_opts *opts,
                        struct qcow2_writer **out);

/* The same on an open file descriptor (must be open for writing, and for
 * reading too to bound the memory; a regular file is truncated to 0
 * bytes).  The writer takes ownership of
 * FD on success and on error (it is closed either way).  NAME is used in
 * messages only (copied).
 */
int qcow2_writer_create_fd(int fd,
                           const char *name,
                           const struct qcow2_writer_opts *opts,
                           struct qcow2_writer **out);

/* The same through IO (io.h), which the writer owns from the call on,
 * success or not: what the file descriptor variants use, and how a test
 * puts a failing device under the writer.  IO must be writable; the image
 * is written from offset 0 (nothing is truncated).
 */
struct qcbt_io;
int qcow2_writer_create_io(struct qcbt_io *io,
                           const struct qcow2_writer_opts *opts,
                           struct qcow2_writer **out);

/* Guest size after rounding, and cluster size in use. */
uint64_t qcow2_writer_size(const struct qcow2_writer *w);
uint32_t qcow2_writer_cluster_size(const struct qcow2_writer *w);

/* The L2 cache so far: tables in memory now, read back, written out
 * before close.  For tests and debug output.
 */
void qcow2_writer_l2_stats(const struct qcow2_writer *w,
                           size_t *resident,
                           uint64_t *loads,
                           uint64_t *stores);

/* Write guest bytes BUF[0..len) at OFFSET (any alignment; the range must
 * lie within the virtual size).  A cluster written for the first time
 * becomes a data cluster; the part of it outside the request comes from
 * the fill callback (or zeros if this image had already made it a zero
 * cluster).  Writing a cluster again overwrites its data in place.  BUF is
 * not kept.  Returns 0 or -errno.
 */
int qcow2_writer_write(struct qcow2_writer *w,
                       const void *buf,
                       size_t len,
                       uint64_t offset);

/* Make guest range [offset, offset+len) read as zeros, hiding the backing
 * file.  Whole clusters become zero clusters (a data cluster written
 * earlier is released); a partial cluster is written as data (fill +
 * zeros), or becomes a zero cluster if the result is all zeros.
 * Returns 0 or -errno.
 */
int qcow2_writer_zero(struct qcow2_writer *w, uint64_t offset, uint64_t len);

/* Ranges never written or zeroed stay unallocated: they read through to
 * the backing file (zeros without one).  There is no call for it.
 */

/* Finish the image: write the L2 tables, the L1 table, the refcount
 * structures and the header, then fdatasync and close the file.  Frees W
 * in every case (W may be NULL: returns 0).  Returns 0 only if every
 * write, the fdatasync and the close succeeded; otherwise -errno with a
 * message, and the file is not a valid image (the caller unlinks it).
 * Making the name durable (fsync of the directory after a rename) is the
 * caller's job.
 */
int qcow2_writer_close(struct qcow2_writer *w);

/* Discard: close the file without writing metadata and free W (NULL is a
 * no-op).  The file is left as it is, not a valid image; unlinking it is
 * up to the caller.
 */
void qcow2_writer_abort(struct qcow2_writer *w);

#endif /* QCBT_QCOW2_WRITER_H */

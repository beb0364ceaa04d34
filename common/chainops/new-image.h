/* qcbt: a new qcow2 image with persistent bitmaps, made by the writer
 * (qcow2-writer.h) and the bitmap store (qcow2-store.h): what
 * `qcbt snapshot` and `qcbt convert` produce.
 *
 * The file is created with O_EXCL (an existing file is never touched)
 * and holds QEMU's WRITE image lock from creation to the end, on the one
 * open file description every later step shares (dup(2)): nobody can
 * open it meanwhile, with or without -U.  Steps:
 *
 *   new_image_create()   create the file, take the lock
 *   new_image_writer()   the writer on it; write the guest data, then
 *                        qcow2_writer_close()
 *   new_image_open()     open the finished image read-write
 *   new_image_add_bitmap()  once per bitmap
 *   new_image_finish()   close and make the name durable
 *
 * new_image_discard() after any failure removes the file (only if the
 * name still refers to the file we created).  Not thread-safe.
 */
#ifndef QCBT_NEW_IMAGE_H
#define QCBT_NEW_IMAGE_H

#include <stdbool.h>
#include <stdint.h>

#include "bitmap.h"
#include "qcow2-writer.h"
#include "qcow2.h"

struct new_image;

/* Create PATH (mode 0666 & ~umask; -EEXIST if anything exists there) and
 * lock it for writing.  Returns 0 and *out or -errno with a message; on
 * failure nothing is left on disk.
 */
int new_image_create(const char *path, struct new_image **out);

/* A writer on the file (opts->exclusive is ignored).  Call once; the
 * caller closes it with qcow2_writer_close() (or aborts it) before
 * new_image_open().
 */
int new_image_writer(struct new_image *ni,
                     const struct qcow2_writer_opts *opts,
                     struct qcow2_writer **out);

/* Open the image the writer finished, read-write.  Returns 0 or -errno. */
int new_image_open(struct new_image *ni);

/* The opened image (NULL before new_image_open()). */
struct qcow2_image *new_image_qcow2(struct new_image *ni);

/* Add the persistent bitmap NAME of granularity 2^GBITS, enabled (flag
 * auto) or not, holding the bits of CONTENT (NULL or all clean: empty).
 * CONTENT may have another size or granularity: a bit is set where a set
 * bit of CONTENT overlaps it (bitmap_merge_into()).  Returns 0 or -errno
 * with a message.
 */
int new_image_add_bitmap(struct new_image *ni,
                         const char *name,
                         unsigned gbits,
                         bool enabled,
                         const struct bitmap *content);

/* The writer's refcount_reserve for the bitmaps new_image_add_bitmap()
 * will add: at most the clusters they take (each store writes a new table
 * and directory, and every data cluster).  Fill SIZE and CLUSTER_SIZE,
 * call new_image_reserve_bitmap() once per bitmap, then
 * new_image_reserve_total().
 */
struct new_image_reserve {
    uint64_t size;         /* guest bytes */
    uint32_t cluster_size; /* of the new image */
    uint64_t clusters;     /* tables and data, so far */
    uint64_t dir_bytes;    /* the directory, so far */
    uint64_t nr;           /* bitmaps, so far */
};

void new_image_reserve_bitmap(struct new_image_reserve *rv,
                              const char *name,
                              uint64_t granularity);
uint64_t new_image_reserve_total(const struct new_image_reserve *rv);

/* Close the image, fsync it and its directory, release the lock and free
 * NI.  On failure the file is removed (as new_image_discard()).  Returns 0
 * or -errno with a message.
 */
int new_image_finish(struct new_image *ni);

/* Close everything, remove the file, free NI (NULL: no-op).  The last
 * error message is kept.
 */
void new_image_discard(struct new_image *ni);

#endif /* QCBT_NEW_IMAGE_H */

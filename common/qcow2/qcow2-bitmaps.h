/* qcbt: the qcow2 bitmaps extension and bitmap directory (qcow2.txt
 * "Bitmaps extension", "Bitmap directory"; qcow2-format.md section 14).
 *
 * Parsing never fails on bad content: a bad extension or directory makes
 * every bitmap of the layer unusable with the reason recorded, and the
 * image's data stays readable.  Only out-of-memory is an error.
 */
#ifndef QCBT_QCOW2_BITMAPS_H
#define QCBT_QCOW2_BITMAPS_H

#include <stdbool.h>
#include <stdint.h>

#include "qcow2.h"

/* QCOW2_BME_* (directory entry flags and limits): qcow2-format.h. */

enum qcow2_bitmap_status {
    QCOW2_BITMAP_OK,      /* consistent: its data may be loaded */
    QCOW2_BITMAP_IN_USE,  /* in_use flag: contents cannot be trusted */
    QCOW2_BITMAP_INVALID, /* metadata broken (reason says why) */
};

struct qcow2_bitmap_info {
    char *name; /* NUL-free, valid UTF-8 unless INVALID */
    uint64_t table_offset;
    uint32_t table_size; /* entries */
    uint32_t flags;
    uint8_t type;
    uint8_t granularity_bits;
    uint32_t extra_data_size;
    enum qcow2_bitmap_status status;
    char reason[256]; /* for IN_USE / INVALID */
};

struct qcow2_bitmap_list {
    bool present;     /* the image has a bitmaps extension */
    bool usable;      /* the extension and directory are valid */
    bool names_known; /* every bitmap name of the layer is listed (false
                         when the directory cannot be walked: a bitmap
                         may hide there) */
    char reason[256]; /* why not usable */
    size_t nr;
    struct qcow2_bitmap_info *bitmaps;
};

/* Read and validate the bitmaps extension and directory of IMG.  Returns
 * 0 and *out (free with qcow2_bitmap_list_free) or -ENOMEM.  Rebuilds
 * the image's metadata map under its lock (qcow2_lock()); the list is the
 * image as it was then: hold the lock across this call and
 * qcow2_bitmap_load_data() if another thread may change the bitmaps.
 */
int qcow2_bitmaps_load(struct qcow2_image *img, struct qcow2_bitmap_list **out);

/* Parse a directory held in memory (for the unit tests and fuzzing);
 * builds the metadata map if there is none, under the image's lock. */
int qcow2_bitmaps_parse_dir(struct qcow2_image *img,
                            const unsigned char *dir,
                            uint64_t dir_size,
                            uint32_t nb_bitmaps,
                            struct qcow2_bitmap_list *list);

void qcow2_bitmap_list_free(struct qcow2_bitmap_list *list);

struct bitmap;

/* Load the contents of bitmap BI (status QCOW2_BITMAP_OK) of IMG into a
 * new dense bitmap *out.  Every table entry is validated (reserved bits,
 * alignment, all-ones flag with an offset, data past the end of the file,
 * clusters overlapping metadata or used twice): any failure is an error
 * and no bitmap is returned.  FLAGS: BITMAP_RAW keeps the garbage bits
 * past the end of the last word (for QEMU's digest).  Holds the image's
 * lock (it reads the metadata map) while it reads.
 */
int qcow2_bitmap_load_data(struct qcow2_image *img,
                           const struct qcow2_bitmap_info *bi,
                           unsigned flags,
                           struct bitmap **out);

/* Exact bitmap table size for a bitmap of IMG with granularity 2^gbits. */
uint64_t qcow2_bitmap_table_size(const struct qcow2_image *img, unsigned gbits);

#endif /* QCBT_QCOW2_BITMAPS_H */

/* qcbt: qcow2 refcounts (qcow2.txt "Reference count"), read-only.
 *
 * A reader needs them for one thing only: QEMU's block layer decides from
 * them whether an image is "metadata-preallocated", and then reports data
 * clusters sitting on file-system holes as zero.  To report the same
 * allocation as `qemu-img map`, we make the same decision.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "error.h"
#include "isaligned.h"
#include "qcow2.h"
#include "rounding.h"

/* The caller's cache: the last refcount table entry and block read, so
 * a walk over consecutive clusters reads each once (not one table entry
 * per cluster). */
struct rc_cache {
    unsigned char *block; /* one cluster */
    uint64_t block_off;   /* of the block in BLOCK, 0: none */
    uint64_t ti;          /* table index of ENTRY */
    bool have_entry;
    unsigned char entry[8];
};

/* Read refcount CLUSTER through the caller's cache. */
static int
get_refcount_cached(struct qcow2_image *img,
                    uint64_t cluster,
                    struct rc_cache *cc,
                    uint64_t *refcount)
{
    unsigned bits = 1u << img->hdr.refcount_order;
    uint64_t per_block = img->cluster_size * 8 / bits;
    uint64_t ti = cluster / per_block, bi = cluster % per_block;
    uint64_t entries, rt_off, off;
    int r;

    /* The table moves when an allocator grows it (qcow2.h). */
    qcow2_lock(img);
    entries = (uint64_t)img->st.refcount_table_clusters * img->cluster_size / 8;
    rt_off = img->st.refcount_table_offset;
    qcow2_unlock(img);
    *refcount = 0;
    if (ti >= entries)
        return 0;
    if (!cc->have_entry || cc->ti != ti) {
        cc->have_entry = false;
        r = qcbt_io_read_exact(img->io,
                               cc->entry,
                               8,
                               rt_off + ti * 8,
                               false,
                               "refcount table");
        if (r < 0)
            return r;
        cc->ti = ti;
        cc->have_entry = true;
    }
    off = qcow2_table_get(cc->entry, 0) & QCOW2_REFT_OFFSET_MASK;
    if (off == 0)
        return 0;
    if (!IS_ALIGNED(off, img->cluster_size) || off >= img->io->size)
        return qcbt_error(EIO,
                          "%s: refcount block offset 0x%" PRIx64 " is invalid",
                          img->io->name,
                          off);
    if (cc->block_off != off) {
        cc->block_off = 0;
        r = qcbt_io_read_exact(img->io,
                               cc->block,
                               img->cluster_size,
                               off,
                               true,
                               "refcount block");
        if (r < 0)
            return r;
        cc->block_off = off;
    }
    *refcount = qcow2_refblock_get(cc->block, img->hdr.refcount_order, bi);
    return 0;
}

int
qcow2_get_refcount(struct qcow2_image *img,
                   uint64_t cluster,
                   uint64_t *refcount)
{
    struct rc_cache cc = {.block = malloc(img->cluster_size)};
    int r;

    if (!cc.block)
        return qcbt_error(ENOMEM, "out of memory");
    r = get_refcount_cached(img, cluster, &cc, refcount);
    free(cc.block);
    return r;
}

/* qcow2_detect_metadata_preallocation(), with the same arithmetic. */
static bool
detect(struct qcow2_image *img)
{
    uint64_t file_length, real_clusters, threshold, end_cluster, i, count = 0;
    struct rc_cache cc = {0};
    bool result = false;

    if (img->io->allocated < 0)
        return false;
    /* The block layer sees the file in whole sectors. */
    file_length = ROUND_UP(img->io->size, 512);
    real_clusters = (uint64_t)img->io->allocated / img->cluster_size;
    threshold = real_clusters * 10 / 9;
    if (threshold < real_clusters + 2)
        threshold = real_clusters + 2;
    end_cluster = DIV_ROUND_UP(file_length, img->cluster_size);

    cc.block = malloc(img->cluster_size);
    if (!cc.block)
        return false;
    for (i = 0; i < end_cluster && count <= threshold; i++) {
        uint64_t rc;

        if (get_refcount_cached(img, i, &cc, &rc) < 0) {
            qcbt_error_clear();
            goto out;
        }
        count += rc != 0;
    }
    result = count > threshold;
out:
    free(cc.block);
    return result;
}

static __thread struct qcow2_image *once_img;

static void
detect_once(void)
{
    once_img->metadata_prealloc = detect(once_img);
}

bool
qcow2_metadata_preallocated(struct qcow2_image *img)
{
    /* pthread_once has no argument: hand the image over per thread.  The
     * once control lives in the image, so each image runs it once.
     */
    once_img = img;
    pthread_once(&img->prealloc_once, detect_once);
    return img->metadata_prealloc;
}

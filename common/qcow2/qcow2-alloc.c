/* qcbt: cluster allocation and refcount updates in an existing qcow2
 * image (qcow2.txt "Reference count"; see qcow2-store.h).
 *
 * New clusters are taken from the end of the file only: simple, and a
 * crash before the header switch then leaks clusters that nothing else
 * uses.  The refcount blocks missing for a run are reserved just before
 * it, at the end of the file, and counted by whichever block covers
 * them (possibly one of themselves).  The refcount table is never moved
 * or grown.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "isaligned.h"
#include "qcow2-store.h"
#include "rounding.h"

struct run {
    uint64_t start, n; /* clusters */
};

struct new_block {
    uint64_t ri;      /* refcount table index */
    uint64_t cluster; /* where the block goes, inside its own range */
};

struct qcow2_alloc {
    struct qcow2_image *img;
    struct qcbt_io *io;
    uint64_t cs;
    unsigned order;
    uint64_t rb_entries; /* refcounts per block */
    uint64_t rt_entries;
    uint64_t *rt;  /* host order, as on disk (masked) */
    uint64_t next; /* first cluster not yet reserved */
    struct run *runs;
    size_t nr_runs;
    struct new_block *nb;
    size_t nr_nb;
    unsigned char *block; /* scratch, one cluster */
};

int
qcow2_alloc_new(struct qcow2_image *img, struct qcow2_alloc **out)
{
    const struct qcow2_header *h = &img->hdr;
    struct qcow2_alloc *a;
    unsigned char *raw;
    uint64_t i, bytes;
    int r;

    if (h->incompatible_features & QCOW2_INCOMPAT_CORRUPT)
        return qcbt_error(EINVAL,
                          "%s: the image is marked corrupt (run "
                          "'qemu-img check -r all')",
                          img->io->name);
    if (h->incompatible_features & QCOW2_INCOMPAT_DIRTY)
        return qcbt_error(EINVAL,
                          "%s: the image is dirty: its refcounts are not "
                          "up to date (run 'qemu-img check -r all')",
                          img->io->name);
    a = calloc(1, sizeof *a);
    if (!a)
        return qcbt_error(ENOMEM, "out of memory");
    /* The refcounts and the end of the file are the image's mutable
     * state: held until qcow2_alloc_free() (qcow2.h). */
    qcow2_lock(img);
    a->img = img;
    a->io = img->io;
    a->cs = img->cluster_size;
    a->order = h->refcount_order;
    a->rb_entries = a->cs * 8 >> a->order;
    a->rt_entries = (uint64_t)h->refcount_table_clusters * a->cs / 8;
    a->next = DIV_ROUND_UP(a->io->size, a->cs);
    bytes = a->rt_entries * 8;
    a->rt = calloc(a->rt_entries ? a->rt_entries : 1, sizeof *a->rt);
    raw = malloc(bytes ? bytes : 1);
    a->block = malloc(a->cs);
    if (!a->rt || !raw || !a->block) {
        free(raw);
        qcow2_alloc_free(a);
        return qcbt_error(ENOMEM, "out of memory");
    }
    r = qcbt_io_read_exact(a->io,
                           raw,
                           bytes,
                           h->refcount_table_offset,
                           false,
                           "refcount table");
    for (i = 0; r == 0 && i < a->rt_entries; i++) {
        a->rt[i] = qcow2_table_get(raw, i) & QCOW2_REFT_OFFSET_MASK;
        if (a->rt[i] &&
            (!IS_ALIGNED(a->rt[i], a->cs) || a->rt[i] >= a->io->size))
            r = qcbt_error(EIO,
                           "%s: refcount block offset 0x%" PRIx64
                           " (refcount table entry %" PRIu64 ") is invalid",
                           a->io->name,
                           a->rt[i],
                           i);
    }
    free(raw);
    if (r < 0) {
        qcow2_alloc_free(a);
        return r;
    }
    *out = a;
    return 0;
}

void
qcow2_alloc_free(struct qcow2_alloc *a)
{
    if (!a)
        return;
    if (a->img)
        qcow2_unlock(a->img);
    free(a->rt);
    free(a->runs);
    free(a->nb);
    free(a->block);
    free(a);
}

static const struct new_block *
find_new_block(const struct qcow2_alloc *a, uint64_t ri)
{
    size_t i;

    for (i = 0; i < a->nr_nb; i++)
        if (a->nb[i].ri == ri)
            return &a->nb[i];
    return NULL;
}

static int
add_run(struct qcow2_alloc *a, uint64_t start, uint64_t n)
{
    void *grown = realloc(a->runs, (a->nr_runs + 1) * sizeof *a->runs);

    if (!grown)
        return qcbt_error(ENOMEM, "out of memory");
    a->runs = grown;
    a->runs[a->nr_runs++] = (struct run){start, n};
    return 0;
}

/* Ranges without a block (on disk or reserved) among those of clusters
 * [first, first+n); the first MAX of them go to LIST if not NULL. */
static uint64_t
missing_blocks(const struct qcow2_alloc *a,
               uint64_t first,
               uint64_t n,
               uint64_t *list,
               uint64_t max)
{
    uint64_t ri, m = 0;

    for (ri = first / a->rb_entries; ri <= (first + n - 1) / a->rb_entries;
         ri++)
        if (ri >= a->rt_entries || (!a->rt[ri] && !find_new_block(a, ri))) {
            if (list && m < max)
                list[m] = ri;
            m++;
        }
    return m;
}

int
qcow2_alloc_clusters(struct qcow2_alloc *a, uint64_t n, uint64_t *offset)
{
    uint64_t start = a->next, k = 0, m, i, *ris = NULL;
    uint64_t limit = (QCOW2_MAX_HOST_OFFSET + 1) / a->cs;
    void *grown;
    int r;

    if (n == 0)
        return qcbt_error(EINVAL, "allocating no cluster");
    /* K new blocks go first, at START..START+K-1, the run after them;
     * K is the number of ranges of [START, START+K+N) without a block
     * (a fixed point: it only grows, and by fewer than K+N clusters). */
    for (;;) {
        if (start > limit || k > limit - start || n > limit - start - k)
            return qcbt_error(EFBIG,
                              "%s: no room for %" PRIu64
                              " more clusters (largest qcow2 offset)",
                              a->io->name,
                              n);
        m = missing_blocks(a, start, k + n, NULL, 0);
        if (m == k)
            break;
        k = m;
    }
    if (k) {
        ris = malloc(k * sizeof *ris);
        if (!ris)
            return qcbt_error(ENOMEM, "out of memory");
        missing_blocks(a, start, k + n, ris, k);
        if (ris[k - 1] >= a->rt_entries) {
            r = qcbt_error(ENOSPC,
                           "%s: the image needs a larger refcount table "
                           "for cluster 0x%" PRIx64
                           " (qcbt does not grow it; 'qemu-img bitmap' "
                           "does)",
                           a->io->name,
                           (start + k + n - 1) * a->cs);
            free(ris);
            return r;
        }
        grown = realloc(a->nb, (a->nr_nb + k) * sizeof *a->nb);
        if (!grown) {
            free(ris);
            return qcbt_error(ENOMEM, "out of memory");
        }
        a->nb = grown;
        r = add_run(a, start, k);
        if (r < 0) {
            free(ris);
            return r;
        }
        for (i = 0; i < k; i++)
            a->nb[a->nr_nb++] = (struct new_block){ris[i], start + i};
        free(ris);
    }
    r = add_run(a, start + k, n);
    if (r < 0) {
        /* Undo the blocks reserved for it. */
        a->nr_nb -= k;
        if (k)
            a->nr_runs--;
        return r;
    }
    a->next = start + k + n;
    *offset = (start + k) * a->cs;
    return 0;
}

static int
read_block(struct qcow2_alloc *a, uint64_t ri)
{
    return qcbt_io_read_exact(a->io,
                              a->block,
                              a->cs,
                              a->rt[ri],
                              true,
                              "refcount block");
}

static int
write_block(struct qcow2_alloc *a, uint64_t off)
{
    return qcbt_io_write_exact(a->io, a->block, a->cs, off, "refcount block");
}

/* Set the refcount of every reserved cluster of range RI to 1 in
 * a->block (which holds that range's block). */
static int
mark_reserved(struct qcow2_alloc *a, uint64_t ri, bool check_free)
{
    uint64_t first = ri * a->rb_entries, last = first + a->rb_entries;
    uint64_t c;
    size_t i;

    for (i = 0; i < a->nr_runs; i++)
        for (c = a->runs[i].start; c < a->runs[i].start + a->runs[i].n; c++) {
            if (c < first || c >= last)
                continue;
            if (check_free &&
                qcow2_refblock_get(a->block, a->order, c - first) != 0)
                return qcbt_error(EIO,
                                  "%s: cluster 0x%" PRIx64
                                  " past the end of the file has a "
                                  "refcount (run 'qemu-img check -r all')",
                                  a->io->name,
                                  c * a->cs);
            qcow2_refblock_set(a->block, a->order, c - first, 1);
        }
    return 0;
}

int
qcow2_alloc_commit(struct qcow2_alloc *a)
{
    uint64_t ri, prev = UINT64_MAX, c;
    unsigned char e[8];
    size_t i;
    int r;

    /* New blocks: the reserved clusters of their range (blocks are
     * reserved clusters too). */
    for (i = 0; i < a->nr_nb; i++) {
        memset(a->block, 0, a->cs);
        r = mark_reserved(a, a->nb[i].ri, false);
        if (r == 0)
            r = write_block(a, a->nb[i].cluster * a->cs);
        if (r < 0)
            return r;
    }
    /* Existing blocks, each read and written once. */
    for (i = 0; i < a->nr_runs; i++)
        for (c = a->runs[i].start; c < a->runs[i].start + a->runs[i].n; c++) {
            ri = c / a->rb_entries;
            if (ri == prev || !a->rt[ri])
                continue;
            prev = ri;
            r = read_block(a, ri);
            if (r == 0)
                r = mark_reserved(a, ri, true);
            if (r == 0)
                r = write_block(a, a->rt[ri]);
            if (r < 0)
                return r;
        }
    r = qcbt_io_flush(a->io);
    if (r < 0 || a->nr_nb == 0)
        goto out;
    /* Only now may the table point at the new blocks. */
    for (i = 0; i < a->nr_nb; i++) {
        qcow2_table_set(e, 0, a->nb[i].cluster * a->cs);
        r = qcbt_io_write_exact(a->io,
                                e,
                                8,
                                a->img->hdr.refcount_table_offset +
                                    a->nb[i].ri * 8,
                                "refcount table");
        if (r < 0)
            return r;
        a->rt[a->nb[i].ri] = a->nb[i].cluster * a->cs;
    }
    r = qcbt_io_flush(a->io);
out:
    if (r == 0) {
        a->nr_runs = 0;
        a->nr_nb = 0;
    }
    return r;
}

int
qcow2_free_cluster(struct qcow2_alloc *a, uint64_t offset)
{
    uint64_t c = offset / a->cs, ri = c / a->rb_entries;
    uint64_t idx = c % a->rb_entries, rc, boff, blen;
    int r;

    if (ri >= a->rt_entries || !a->rt[ri])
        return qcbt_error(EIO,
                          "%s: freeing cluster 0x%" PRIx64
                          ": it has no refcount block",
                          a->io->name,
                          offset);
    r = read_block(a, ri);
    if (r < 0)
        return r;
    rc = qcow2_refblock_get(a->block, a->order, idx);
    if (rc == 0)
        return qcbt_error(EIO,
                          "%s: freeing cluster 0x%" PRIx64
                          ": its refcount is already 0",
                          a->io->name,
                          offset);
    qcow2_refblock_set(a->block, a->order, idx, rc - 1);
    /* Write the bytes holding the entry only. */
    boff = (idx << a->order) / 8;
    blen = a->order >= 3 ? (1u << a->order) / 8 : 1;
    return qcbt_io_write_exact(a->io,
                               a->block + boff,
                               blen,
                               a->rt[ri] + boff,
                               "refcount block");
}

int
qcow2_alloc_check_room(struct qcow2_alloc *a, uint64_t n)
{
    uint64_t total = n, last;
    int i;

    /* N clusters, the blocks counting them, the blocks counting those:
     * three rounds reach a bound (blocks are a 1/rb_entries fraction). */
    for (i = 0; i < 3; i++)
        total = n + DIV_ROUND_UP(total, a->rb_entries) + 1;
    if (total > UINT64_MAX - a->next)
        return qcbt_error(EFBIG,
                          "%s: no room for %" PRIu64 " more clusters",
                          a->io->name,
                          n);
    last = a->next + total - 1;
    if (last / a->rb_entries >= a->rt_entries)
        return qcbt_error(ENOSPC,
                          "%s: the image needs a larger refcount table for "
                          "%" PRIu64 " more clusters (qcbt does not grow it; "
                          "'qemu-img commit' does)",
                          a->io->name,
                          n);
    return 0;
}

/* qcbt: cluster allocation and refcount updates in an existing qcow2
 * image (qcow2.txt "Reference count"; see qcow2-store.h).
 *
 * New clusters are taken from the end of the file only: simple, and a
 * crash before the header switch then leaks clusters that nothing else
 * uses.  The refcount blocks missing for a run are reserved just before
 * it, at the end of the file, and counted by whichever block covers
 * them (possibly one of themselves).
 *
 * A block whose range lies past what the refcount table covers needs a
 * larger table (QEMU: block/qcow2-refcount.c, alloc_refcount_block()
 * and qcow2_refcount_area()).  The commit then writes a new table, half
 * as large again as needed or more, at the end of the file, followed by
 * the blocks that count it and themselves; flushes; switches the
 * header's two table fields with one write; flushes; and only then frees
 * the old table's clusters, counted in the new table.  A crash at any
 * point leaves the old table and its blocks whole (new clusters leak) or
 * the new table whole (the old one leaks).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "isaligned.h"
#include "qcow2-metamap.h"
#include "qcow2-store.h"
#include "rounding.h"

/* QEMU's largest refcount table, in entries. */
#define MAX_ENTRIES ((uint64_t)QCOW2_MAX_REFTABLE_BYTES / 8)

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
    uint64_t rt_off; /* where the table is now */
    uint64_t *rt;    /* host order, as on disk (masked) */
    uint64_t next;   /* first cluster not yet reserved */
    struct run *runs;
    size_t nr_runs;
    struct new_block *nb;
    size_t nr_nb;
    unsigned char *block;     /* scratch, one cluster */
    uint64_t grow_t, grow_tc; /* a planned new table (clusters), or 0 */
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
    a->rt_entries = (uint64_t)img->st.refcount_table_clusters * a->cs / 8;
    a->rt_off = img->st.refcount_table_offset;
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
                           a->rt_off,
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
         ri++) {
        if ((ri < a->rt_entries && a->rt[ri]) || find_new_block(a, ri))
            continue;
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
        /* Past the table: the commit grows it, up to QEMU's limit (which
         * must leave room for the blocks counting the table itself). */
        if (ris[k - 1] >= MAX_ENTRIES - MAX_ENTRIES / 8) {
            r = qcbt_error(ENOSPC,
                           "%s: cluster 0x%" PRIx64
                           " is past what the largest refcount table "
                           "(8 MiB) can count",
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

/* Does a reserved block lie past the table?  Then plan the new table:
 * TC clusters at a->next, then the K blocks missing for the ranges of
 * [a->next, a->next+TC+K) (a fixed point: both only grow), all reserved
 * like any run.  *tc = 0: no growth needed. */
static int
plan_growth(struct qcow2_alloc *a, uint64_t *tc_out)
{
    uint64_t need = 0, start = a->next, per = a->cs / 8;
    uint64_t tc = a->rt_entries / per, k = 0, ntc, m, i, *ris;
    uint64_t max_tc = QCOW2_MAX_REFTABLE_BYTES / a->cs;
    void *grown;
    int r;

    *tc_out = 0;
    for (i = 0; i < a->nr_nb; i++)
        if (a->nb[i].ri + 1 > need)
            need = a->nb[i].ri + 1;
    if (need <= a->rt_entries)
        return 0;
    for (;;) {
        uint64_t last_ri = (start + tc + k - 1) / a->rb_entries;

        if (last_ri + 1 > need)
            need = last_ri + 1;
        /* QEMU grows the table by half (next_refcount_table_size());
         * TC >= 1 (qcow2_header_check()), so each step grows it. */
        for (ntc = tc; ntc * per < need && ntc < max_tc;)
            ntc = (ntc * 3 + 1) / 2 < max_tc ? (ntc * 3 + 1) / 2 : max_tc;
        if (ntc * per < need)
            return qcbt_error(ENOSPC,
                              "%s: the refcount table would exceed "
                              "QEMU's 8 MiB limit",
                              a->io->name);
        m = missing_blocks(a, start, ntc + k, NULL, 0);
        if (ntc == tc && m == k)
            break;
        tc = ntc;
        k = m;
    }
    ris = malloc((k ? k : 1) * sizeof *ris);
    grown = realloc(a->nb, (a->nr_nb + k + 1) * sizeof *a->nb);
    if (grown)
        a->nb = grown;
    if (!ris || !grown) {
        free(ris);
        return qcbt_error(ENOMEM, "out of memory");
    }
    missing_blocks(a, start, tc + k, ris, k);
    r = add_run(a, start, tc + k);
    if (r == 0) {
        for (i = 0; i < k; i++)
            a->nb[a->nr_nb++] = (struct new_block){ris[i], start + tc + i};
        a->next = start + tc + k;
        *tc_out = tc;
    }
    free(ris);
    return r;
}

/* Switch the header to the table of TC clusters at cluster T: one write
 * of the bytes that change (offset and size are adjacent), as the
 * format layer encodes them. */
static int
switch_table(struct qcow2_alloc *a, uint64_t t, uint64_t tc)
{
    struct qcow2_header h;
    unsigned char *old = malloc(a->cs), *new = malloc(a->cs);
    uint64_t first, last;
    int r;

    if (!old || !new) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    r = qcbt_io_read_exact(a->io, old, a->cs, 0, true, "header cluster");
    if (r == 0)
        r = qcow2_header_decode(old, a->cs, &h);
    if (r < 0)
        goto out;
    if (h.refcount_table_offset != a->rt_off ||
        (uint64_t)h.refcount_table_clusters * a->cs / 8 != a->rt_entries) {
        r = qcbt_error(EIO,
                       "%s: the header's refcount table changed under "
                       "qcbt",
                       a->io->name);
        goto out;
    }
    h.refcount_table_offset = t * a->cs;
    h.refcount_table_clusters = (uint32_t)tc;
    memcpy(new, old, a->cs);
    qcow2_header_encode(&h, new);
    for (first = 0; first < a->cs && old[first] == new[first]; first++)
        ;
    for (last = a->cs - 1; last > first && old[last] == new[last]; last--)
        ;
    r = qcbt_io_write_exact(a->io,
                            new + first,
                            last - first + 1,
                            first,
                            "header");
out:
    free(old);
    free(new);
    return r;
}

/* The new table (T, TC clusters): the entries of the old one and of
 * every new block. */
static int
write_table(struct qcow2_alloc *a, uint64_t t, uint64_t tc)
{
    unsigned char *raw = calloc(tc, a->cs);
    size_t i;
    int r;

    if (!raw)
        return qcbt_error(ENOMEM, "out of memory");
    for (i = 0; i < a->rt_entries; i++)
        qcow2_table_set(raw, i, a->rt[i]);
    for (i = 0; i < a->nr_nb; i++)
        qcow2_table_set(raw, a->nb[i].ri, a->nb[i].cluster * a->cs);
    r = qcbt_io_write_exact(a->io,
                            raw,
                            tc * a->cs,
                            t * a->cs,
                            "refcount table");
    free(raw);
    return r;
}

/* After the switch: the allocator and the image follow the new table
 * (the bitmap loader's metadata map is rebuilt on next use), then the
 * old table's clusters are freed. */
static int
adopt_table(struct qcow2_alloc *a, uint64_t t, uint64_t tc)
{
    uint64_t old_off = a->rt_off, old_n = a->rt_entries * 8 / a->cs;
    uint64_t entries = tc * a->cs / 8, i;
    uint64_t *rt = calloc(entries, sizeof *rt);
    int r = 0;

    if (!rt)
        return qcbt_error(ENOMEM, "out of memory");
    memcpy(rt, a->rt, a->rt_entries * sizeof *rt);
    free(a->rt);
    a->rt = rt;
    a->rt_entries = entries;
    a->rt_off = t * a->cs;
    for (i = 0; i < a->nr_nb; i++)
        a->rt[a->nb[i].ri] = a->nb[i].cluster * a->cs;
    a->img->st.refcount_table_offset = a->rt_off;
    a->img->st.refcount_table_clusters = (uint32_t)tc;
    qcow2_metamap_free(a->img->st.bm_map);
    a->img->st.bm_map = NULL;
    for (i = 0; r == 0 && i < old_n; i++)
        r = qcow2_free_cluster(a, old_off + i * a->cs);
    if (r == 0)
        r = qcbt_io_flush(a->io);
    if (r < 0)
        r = qcbt_error_prefix(-r,
                              "%s: the refcount table moved, but its old "
                              "clusters may be leaked",
                              a->io->name);
    return r;
}

int
qcow2_alloc_commit(struct qcow2_alloc *a)
{
    uint64_t ri, prev = UINT64_MAX, c, t, tc;
    unsigned char e[8];
    size_t i;
    int r;

    /* Planned once: a commit retried after a failure reuses the plan. */
    if (!a->grow_tc) {
        a->grow_t = a->next;
        r = plan_growth(a, &a->grow_tc);
        if (r < 0)
            return r;
    }
    t = a->grow_t;
    tc = a->grow_tc;
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
            if (ri == prev || ri >= a->rt_entries || !a->rt[ri])
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
    if (tc) {
        /* Blocks and the new table durable; one switch; durable; only
         * then the old table goes. */
        r = write_table(a, t, tc);
        if (r == 0)
            r = qcbt_io_flush(a->io);
        if (r == 0)
            r = switch_table(a, t, tc);
        if (r == 0)
            r = qcbt_io_flush(a->io);
        if (r == 0)
            r = adopt_table(a, t, tc);
        goto out;
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
                                a->rt_off + a->nb[i].ri * 8,
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
        a->grow_tc = 0;
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
     * three rounds reach a bound (blocks are a 1/rb_entries fraction).
     * The table grows as needed, up to QEMU's limit (and the slack
     * qcow2_alloc_clusters() keeps for the table's own blocks). */
    for (i = 0; i < 3; i++)
        total = n + DIV_ROUND_UP(total, a->rb_entries) + 1;
    total += QCOW2_MAX_REFTABLE_BYTES / a->cs;
    if (total > UINT64_MAX - a->next)
        return qcbt_error(EFBIG,
                          "%s: no room for %" PRIu64 " more clusters",
                          a->io->name,
                          n);
    last = a->next + total - 1;
    if (last / a->rb_entries >= MAX_ENTRIES - MAX_ENTRIES / 8)
        return qcbt_error(ENOSPC,
                          "%s: %" PRIu64 " more clusters are more than "
                          "the largest refcount table (8 MiB) can count",
                          a->io->name,
                          n);
    return 0;
}

/* qcbt: commit the upper layers of a chain into a lower one (commit.h). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "chain.h"
#include "commit.h"
#include "error.h"
#include "merge.h"
#include "minmax.h"
#include "qcow2-bitmaps.h"
#include "qcow2-store.h"
#include "rounding.h"

struct job {
    struct chain *chain;
    size_t b;                 /* base layer */
    struct qcow2_image *base; /* opened read-write, WRITE lock */
    struct merge_result **results;
    struct commit_report *rep;
};

void
commit_report_free(struct commit_report *r)
{
    size_t i;

    if (!r)
        return;
    for (i = 0; i < r->nr_bitmaps; i++)
        free(r->bitmaps[i].name);
    free(r->bitmaps);
    free(r->base_path);
    free(r);
}

/* The layer of the chain that is the file BASE. */
static int
find_base(struct chain *c, const char *base, size_t *b)
{
    struct stat st;
    size_t i;

    if (!base) {
        *b = 1;
        return 0;
    }
    if (stat(base, &st) < 0)
        return qcbt_error(errno, "%s: %s", base, strerror(errno));
    for (i = 1; i < c->nr_layers; i++)
        if (c->layers[i].io->dev == st.st_dev &&
            c->layers[i].io->ino == st.st_ino) {
            *b = i;
            return 0;
        }
    if (c->layers[0].io->dev == st.st_dev && c->layers[0].io->ino == st.st_ino)
        return qcbt_error(EINVAL,
                          "%s: the base must be below the image, not the "
                          "image itself",
                          base);
    return qcbt_error(ENOENT,
                      "%s is not in the backing chain of %s",
                      base,
                      c->layers[0].path);
}

static int
check_layers(struct job *j)
{
    struct chain *c = j->chain;
    size_t i;

    if (c->layers[j->b].fmt != CHAIN_FMT_QCOW2)
        return qcbt_error(ENOTSUP,
                          "layer %zu (%s): committing into a raw base is not "
                          "supported (use 'qemu-img commit')",
                          j->b,
                          c->layers[j->b].path);
    for (i = 0; i <= j->b; i++) {
        if (c->layers[i].size != c->size)
            return qcbt_error(ENOTSUP,
                              "layer %zu (%s) is %" PRIu64
                              " bytes, the image %" PRIu64
                              ": committing layers of different sizes is "
                              "not supported (resize them with 'qemu-img "
                              "resize' first)",
                              i,
                              c->layers[i].path,
                              c->layers[i].size,
                              c->size);
        if (c->layers[i].data_file_path)
            return qcbt_error(ENOTSUP,
                              "layer %zu (%s) has an external data file: "
                              "committing it is not supported",
                              i,
                              c->layers[i].path);
    }
    return 0;
}

/* Drop the chain's READ lock on the base, open it read-write and take
 * the WRITE lock there (as qemu-img commit holds it). */
static int
open_base(struct job *j)
{
    struct chain_layer *l = &j->chain->layers[j->b];
    struct qcbt_io *io = NULL;
    int r;

    r = qcbt_io_lock(l->io, QCBT_IO_LOCK_NONE);
    if (r < 0)
        return r;
    r = qcbt_io_open_file_rw(l->path, &io);
    if (r < 0)
        return r;
    if (io->dev != l->io->dev || io->ino != l->io->ino) {
        qcbt_io_free(io);
        return qcbt_error(EAGAIN,
                          "%s: the file changed while it was opened",
                          l->path);
    }
    r = qcbt_io_lock(io, QCBT_IO_LOCK_WRITE);
    if (r < 0) {
        qcbt_io_free(io);
        return r;
    }
    return qcow2_open(io, &j->base); /* owns io */
}

static bool
has_name(const struct commit_report *rep, const char *name)
{
    size_t i;

    for (i = 0; i < rep->nr_bitmaps; i++)
        if (strcmp(rep->bitmaps[i].name, name) == 0)
            return true;
    return false;
}

/* Every bitmap name of L0..Lb, each once. */
static int
collect_names(struct job *j, struct merge_ctx *ctx)
{
    const struct qcow2_bitmap_list *list;
    struct commit_report *rep = j->rep;
    size_t i, k;
    void *grown;
    int r;

    for (i = 0; i <= j->b; i++) {
        r = merge_ctx_layer_bitmaps(ctx, i, &list);
        if (r < 0)
            return r;
        for (k = 0; k < list->nr; k++) {
            const char *name = list->bitmaps[k].name;

            if (list->bitmaps[k].status == QCOW2_BITMAP_INVALID &&
                qcow2_bitmap_name_check(name, strlen(name)) < 0) {
                qcbt_error_clear();
                continue; /* a name we cannot trust or store */
            }
            if (has_name(rep, name))
                continue;
            grown = realloc(rep->bitmaps,
                            (rep->nr_bitmaps + 1) * sizeof *rep->bitmaps);
            if (!grown)
                return qcbt_error(ENOMEM, "out of memory");
            rep->bitmaps = grown;
            memset(&rep->bitmaps[rep->nr_bitmaps], 0, sizeof *rep->bitmaps);
            rep->bitmaps[rep->nr_bitmaps].name = strdup(name);
            if (!rep->bitmaps[rep->nr_bitmaps].name)
                return qcbt_error(ENOMEM, "out of memory");
            rep->nr_bitmaps++;
        }
    }
    return 0;
}

/* Merge every name over [L0, Lb] before anything is written. */
static int
merge_all(struct job *j)
{
    struct merge_ctx *ctx = NULL;
    struct merge_opts mo = {
        .mode = MERGE_TOLERANT,
        .top = 0,
        .base = j->b + 1,
    };
    struct commit_report *rep = j->rep;
    size_t i;
    int r;

    r = merge_ctx_new(j->chain, &ctx);
    if (r == 0)
        r = collect_names(j, ctx);
    if (r == 0) {
        j->results =
            calloc(rep->nr_bitmaps ? rep->nr_bitmaps : 1, sizeof *j->results);
        if (!j->results)
            r = qcbt_error(ENOMEM, "out of memory");
    }
    for (i = 0; r == 0 && i < rep->nr_bitmaps; i++) {
        struct commit_bitmap *cb = &rep->bitmaps[i];

        r = merge_run(ctx, cb->name, &mo, &j->results[i]);
        if (r < 0)
            break;
        if (!j->results[i]->usable) {
            cb->action = COMMIT_BITMAP_SKIPPED;
            snprintf(cb->reason, sizeof cb->reason, "%s", j->results[i]->error);
        }
    }
    merge_ctx_free(ctx);
    return r;
}

/* Store each usable result in the base: merged into X@Lb, or a new X
 * with the granularity and recording state of the top-most layer whose
 * X the merge used. */
static int
store_bitmaps(struct job *j)
{
    struct qcow2_bitmap_list *list = NULL;
    struct commit_report *rep = j->rep;
    size_t i, k, top;
    int r;

    r = qcow2_bitmaps_load(j->base, &list);
    if (r < 0)
        return r;
    for (i = 0; r == 0 && i < rep->nr_bitmaps; i++) {
        struct commit_bitmap *cb = &rep->bitmaps[i];
        struct merge_result *res = j->results[i];
        bool in_base = false;

        if (!res->usable)
            continue;
        for (k = 0; k < list->nr; k++)
            if (strcmp(list->bitmaps[k].name, cb->name) == 0) {
                in_base = true;
                cb->granularity = 1ULL << list->bitmaps[k].granularity_bits;
            }
        if (in_base) {
            cb->action = COMMIT_BITMAP_MERGED;
            r = qcow2_bitmap_merge(j->base, cb->name, res->bm);
            continue;
        }
        for (top = 0; top <= j->b; top++)
            if (res->layers[top].source == MERGE_SRC_BITMAP)
                break;
        if (top > j->b) {
            /* Cannot be: a usable result without Lb used an X above. */
            r = qcbt_error(EIO, "bitmap '%s': no layer holds it", cb->name);
            break;
        }
        cb->action = COMMIT_BITMAP_CREATED;
        cb->granularity = res->layers[top].granularity;
        r = qcow2_bitmap_add_merged(j->base,
                                    cb->name,
                                    (unsigned)__builtin_ctzll(cb->granularity),
                                    !res->layers[top].enabled,
                                    res->bm);
    }
    qcow2_bitmap_list_free(list);
    return r;
}

/* What the layers above the base hold in base cluster [off, end): none
 * of it (*any false), all of it as zeros (*zero), or some data. */
static int
classify(struct job *j, uint64_t off, uint64_t end, bool *any, bool *zero)
{
    struct chain_status st;
    int r;

    *any = false;
    *zero = true;
    while (off < end) {
        r = chain_block_status(j->chain, off, end - off, &st);
        if (r < 0)
            return r;
        if (st.depth < j->b)
            *any = true;
        if (st.depth >= j->b || !st.zero)
            *zero = false;
        off += st.len;
    }
    return 0;
}

/* The next base cluster at or after *OFF that the layers above the base
 * touch: [*off, *end), all zeros there or not (*zero).  *off == size when
 * none is left.  A cluster is probed alone first (a probe scans as far
 * as its answer runs), and only an untouched one probes far ahead, so
 * the walk stays linear in the image. */
static int
next_cluster(struct job *j, uint64_t *off, uint64_t *end, bool *zero)
{
    uint64_t cs = j->base->cluster_size, size = j->chain->size, o = *off;
    struct chain_status st;
    bool any;
    int r;

    while (o < size) {
        *end = MIN(o + cs, size);
        r = classify(j, o, *end, &any, zero);
        if (r < 0)
            return r;
        if (any) {
            *off = o;
            return 0;
        }
        o = *end;
        if (o >= size)
            break;
        r = chain_block_status(j->chain, o, size - o, &st);
        if (r < 0)
            return r;
        if (st.depth >= j->b)
            o = MAX(o, ROUND_DOWN(o + st.len, cs));
    }
    *off = *end = size;
    return 0;
}

/* The most clusters the commit can allocate in the base: one per base
 * cluster it writes, one L2 table per L1 entry those touch, and for each
 * bitmap it stores a table, its data and a new directory.  Checked
 * against the largest refcount table before anything is written (a
 * smaller one grows as the commit allocates). */
static int
check_room(struct job *j)
{
    struct qcow2_alloc *a = NULL;
    uint64_t cs = j->base->cluster_size, size = j->chain->size;
    uint64_t off, end, n = 0, tables = 0, last_l1 = UINT64_MAX, per;
    struct qcow2_bitmap_list *list = NULL;
    bool zero;
    size_t i, k;
    int r = 0;

    for (off = 0;; off = end) {
        r = next_cluster(j, &off, &end, &zero);
        if (r < 0 || off >= size)
            break;
        n++;
        if (off / cs / j->base->l2_entries != last_l1) {
            last_l1 = off / cs / j->base->l2_entries;
            tables++;
        }
    }
    if (r < 0)
        return r;
    n += tables;
    r = qcow2_bitmaps_load(j->base, &list);
    if (r < 0)
        return r;
    for (i = 0; i < j->rep->nr_bitmaps; i++) {
        unsigned gbits;

        if (!j->results[i]->usable)
            continue;
        /* Stored with the base's granularity, or created with the
         * result's. */
        gbits = (unsigned)__builtin_ctzll(j->results[i]->bm->granularity);
        for (k = 0; k < list->nr; k++)
            if (list->bitmaps[k].status == QCOW2_BITMAP_OK &&
                strcmp(list->bitmaps[k].name, j->rep->bitmaps[i].name) == 0)
                gbits = list->bitmaps[k].granularity_bits;
        per = qcow2_bitmap_table_size(j->base, gbits);
        n += per + DIV_ROUND_UP(per * 8, cs) +
             DIV_ROUND_UP((uint64_t)(j->rep->nr_bitmaps + 1) *
                              (QCOW2_BITMAP_DIR_ENTRY_FIXED +
                               QCOW2_BME_MAX_NAME_SIZE + 8),
                          cs);
    }
    qcow2_bitmap_list_free(list);
    r = qcow2_alloc_new(j->base, &a);
    if (r == 0)
        r = qcow2_alloc_check_room(a, n);
    qcow2_alloc_free(a);
    return r;
}

static int
commit_data(struct job *j)
{
    struct qcow2_data_writer *w = NULL;
    uint64_t cs = j->base->cluster_size, size = j->chain->size;
    uint64_t off, end;
    unsigned char *buf;
    bool zero;
    int r;

    j->rep->cluster_size = cs;
    buf = malloc(cs);
    if (!buf)
        return qcbt_error(ENOMEM, "out of memory");
    r = qcow2_data_writer_new(j->base, &w);
    for (off = 0; r == 0; off = end) {
        r = next_cluster(j, &off, &end, &zero);
        if (r < 0 || off >= size)
            break;
        if (zero) {
            r = qcow2_data_writer_put(w, off, NULL);
            j->rep->zero_clusters += r == 0;
            continue;
        }
        memset(buf, 0, cs);
        r = chain_read(j->chain, buf, end - off, off);
        if (r == 0)
            r = qcow2_data_writer_put(w, off, buf);
        j->rep->data_clusters += r == 0;
    }
    if (r == 0)
        r = qcow2_data_writer_sync(w);
    qcow2_data_writer_free(w);
    free(buf);
    return r;
}

int
commit_run(const char *image,
           const struct commit_opts *opts,
           struct commit_report **out)
{
    struct chain_open_opts copts = {.lock = QCBT_IO_LOCK_READ};
    struct job j = {0};
    size_t i;
    int r;

    *out = NULL;
    chain_opts_from_env(&copts);
    j.rep = calloc(1, sizeof *j.rep);
    if (!j.rep)
        return qcbt_error(ENOMEM, "out of memory");
    r = chain_open(image, &copts, &j.chain);
    if (r < 0)
        goto out;
    if (j.chain->nr_layers < 2) {
        r = qcbt_error(EINVAL,
                       "%s has no backing file: nothing to commit",
                       image);
        goto out;
    }
    r = find_base(j.chain, opts->base, &j.b);
    if (r == 0)
        r = check_layers(&j);
    if (r < 0)
        goto out;
    j.rep->base_layer = j.b;
    j.rep->base_path = strdup(j.chain->layers[j.b].path);
    if (!j.rep->base_path) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    r = open_base(&j);
    if (r < 0)
        goto out;
    /* Refusals of the data writer before any bitmap is touched. */
    {
        struct qcow2_data_writer *w = NULL;

        r = qcow2_data_writer_new(j.base, &w);
        qcow2_data_writer_free(w);
        if (r < 0)
            goto out;
    }
    r = merge_all(&j);
    if (r == 0)
        r = check_room(&j);
    if (r < 0)
        goto out;
    /* From here on the base changes. */
    r = store_bitmaps(&j);
    if (r == 0)
        r = commit_data(&j);
    if (r < 0)
        r = qcbt_error_prefix(-r,
                              "commit into %s stopped (%s still reads as "
                              "before; run qcbt commit again)",
                              j.rep->base_path,
                              image);
out:
    if (j.base) {
        /* A close that fails after a write is the commit's failure. */
        int rc = qcbt_io_close(j.base->io);

        j.base->io = j.base->data_io = NULL;
        qcow2_close(j.base);
        if (r == 0 && rc < 0)
            r = rc;
    }
    if (j.results)
        for (i = 0; i < j.rep->nr_bitmaps; i++)
            merge_result_free(j.results[i]);
    free(j.results);
    chain_close(j.chain);
    if (r < 0)
        commit_report_free(j.rep);
    else
        *out = j.rep;
    return r;
}

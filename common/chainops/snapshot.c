/* qcbt: an external snapshot of an offline disk (see snapshot.h). */
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bitmap.h"
#include "error.h"
#include "new-image.h"
#include "qcow2-bitmaps.h"
#include "snapshot.h"

/* dirname() and basename() of a copy of PATH. */
static int
split_path(const char *path, char **dir, char **base)
{
    char *a = strdup(path), *b = strdup(path);

    *dir = *base = NULL;
    if (!a || !b) {
        free(a);
        free(b);
        return qcbt_error(ENOMEM, "out of memory");
    }
    *dir = strdup(dirname(a));
    *base = strdup(basename(b));
    free(a);
    free(b);
    if (!*dir || !*base) {
        free(*dir);
        free(*base);
        return qcbt_error(ENOMEM, "out of memory");
    }
    return 0;
}

static bool
same_file(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

int
snapshot_backing_name(const char *image, const char *new_path, char **out)
{
    char *idir = NULL, *ibase = NULL, *ndir = NULL, *nbase = NULL;
    char *real = NULL, *name = NULL, *resolved = NULL;
    struct stat si, sn;
    int r;

    *out = NULL;
    r = split_path(image, &idir, &ibase);
    if (r == 0)
        r = split_path(new_path, &ndir, &nbase);
    if (r < 0)
        goto out;
    if (stat(ndir, &sn) < 0) {
        r = qcbt_error(errno, "%s: %s", ndir, strerror(errno));
        goto out;
    }
    if (stat(idir, &si) < 0) {
        r = qcbt_error(errno, "%s: %s", idir, strerror(errno));
        goto out;
    }
    if (image[0] == '/')
        name = strdup(image);
    else if (same_file(&si, &sn))
        name = strdup(ibase);
    else {
        real = realpath(idir, NULL);
        if (!real) {
            r = qcbt_error(errno, "%s: %s", idir, strerror(errno));
            goto out;
        }
        if (asprintf(&name, "%s/%s", strcmp(real, "/") ? real : "", ibase) < 0)
            name = NULL;
    }
    if (!name) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    /* What QEMU will open from NEW's directory must be IMAGE. */
    if (name[0] == '/')
        resolved = strdup(name);
    else if (asprintf(&resolved, "%s/%s", ndir, name) < 0)
        resolved = NULL;
    if (!resolved) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    if (stat(resolved, &sn) < 0 || stat(image, &si) < 0 ||
        !same_file(&si, &sn)) {
        r = qcbt_error(EINVAL,
                       "%s: cannot name '%s' as a backing file that "
                       "resolves from the new image's directory",
                       new_path,
                       image);
        goto out;
    }
    *out = name;
    name = NULL;
out:
    free(idir);
    free(ibase);
    free(ndir);
    free(nbase);
    free(real);
    free(name);
    free(resolved);
    return r;
}

void
snapshot_result_free(struct snapshot_result *res)
{
    size_t i;

    if (!res)
        return;
    for (i = 0; i < res->nr_bitmaps; i++) {
        free(res->bitmaps[i].name);
        free(res->bitmaps[i].reason);
    }
    free(res->bitmaps);
    free(res->backing_name);
    free(res);
}

static int set_reason(struct snapshot_bitmap *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int
set_reason(struct snapshot_bitmap *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vasprintf(&b->reason, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->reason = NULL;
        return qcbt_error(ENOMEM, "out of memory");
    }
    qcbt_sanitize(b->reason);
    return 0;
}

/* Decide, for every bitmap of the top layer, whether NEW carries it. */
static int
pick_bitmaps(struct chain *chain, struct snapshot_result *res)
{
    struct qcow2_image *top = chain->layers[0].qcow2;
    struct qcow2_bitmap_list *list = NULL;
    size_t i;
    int r;

    if (!top)
        return 0; /* raw: no bitmaps */
    r = qcow2_bitmaps_load(top, &list);
    if (r < 0)
        return r;
    res->bitmaps = calloc(list->nr ? list->nr : 1, sizeof *res->bitmaps);
    if (!res->bitmaps) {
        qcow2_bitmap_list_free(list);
        return qcbt_error(ENOMEM, "out of memory");
    }
    for (i = 0; r == 0 && i < list->nr; i++) {
        const struct qcow2_bitmap_info *bi = &list->bitmaps[i];
        struct snapshot_bitmap *b = &res->bitmaps[i];
        struct bitmap *bm = NULL;

        res->nr_bitmaps++;
        b->name = strdup(bi->name);
        if (!b->name) {
            r = qcbt_error(ENOMEM, "out of memory");
            break;
        }
        b->granularity =
            bi->granularity_bits < 64 ? UINT64_C(1) << bi->granularity_bits : 0;
        if (!list->usable)
            r = set_reason(b,
                           "the layer's bitmaps are unusable: %s",
                           list->reason);
        else if (bi->status == QCOW2_BITMAP_IN_USE)
            r = set_reason(b,
                           "it is in use (the image was not closed "
                           "cleanly)");
        else if (bi->status != QCOW2_BITMAP_OK)
            r = set_reason(b, "it is invalid: %s", bi->reason);
        else if (!(bi->flags & QCOW2_BME_FLAG_AUTO))
            r = set_reason(b, "it is disabled (it records no writes)");
        else {
            /* Its data must load too: a corrupt table is not healthy. */
            r = qcow2_bitmap_load_data(top, bi, 0, &bm);
            bitmap_free(bm);
            if (r == -ENOMEM)
                break;
            if (r < 0)
                r = set_reason(b, "it is invalid: %s", qcbt_error_get());
            else
                b->carried = true;
        }
    }
    qcow2_bitmap_list_free(list);
    return r;
}

int
snapshot_create(struct chain *chain,
                const char *image,
                const char *new_path,
                struct snapshot_result **out)
{
    struct qcow2_writer_opts wo = {0};
    struct snapshot_result *res;
    struct new_image *ni = NULL;
    struct qcow2_writer *w = NULL;
    struct chain_layer *top = &chain->layers[0];
    struct new_image_reserve rv = {0};
    size_t i;
    int r;

    *out = NULL;
    res = calloc(1, sizeof *res);
    if (!res)
        return qcbt_error(ENOMEM, "out of memory");
    res->size = chain->size;
    res->cluster_size = top->qcow2 ? (uint32_t)top->qcow2->cluster_size
                                   : QCOW2_WRITER_DEFAULT_CLUSTER_SIZE;
    res->backing_fmt = chain_fmt_name(top->fmt);
    r = snapshot_backing_name(image, new_path, &res->backing_name);
    if (r == 0)
        r = pick_bitmaps(chain, res);
    if (r < 0)
        goto fail;

    rv.size = res->size;
    rv.cluster_size = res->cluster_size;
    for (i = 0; i < res->nr_bitmaps; i++)
        if (res->bitmaps[i].carried)
            new_image_reserve_bitmap(&rv,
                                     res->bitmaps[i].name,
                                     res->bitmaps[i].granularity);
    wo.size = res->size;
    wo.cluster_size = res->cluster_size;
    wo.backing_file = res->backing_name;
    wo.backing_fmt = res->backing_fmt;
    wo.refcount_reserve = new_image_reserve_total(&rv);

    r = new_image_create(new_path, &ni);
    if (r < 0)
        goto fail;
    r = new_image_writer(ni, &wo, &w);
    if (r == 0)
        r = qcow2_writer_close(w); /* no data: everything reads through */
    if (r == 0)
        r = new_image_open(ni);
    for (i = 0; r == 0 && i < res->nr_bitmaps; i++) {
        const struct snapshot_bitmap *b = &res->bitmaps[i];

        if (b->carried)
            r = new_image_add_bitmap(ni,
                                     b->name,
                                     (unsigned)__builtin_ctzll(b->granularity),
                                     true,
                                     NULL);
    }
    if (r < 0) {
        new_image_discard(ni);
        goto fail;
    }
    r = new_image_finish(ni);
    if (r < 0)
        goto fail;
    *out = res;
    return 0;
fail:
    snapshot_result_free(res);
    return r;
}

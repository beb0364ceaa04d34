/* nbdkit-qcbt-plugin and nbdkit-qcbt-filter: the view both serve. */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "minmax.h"
#include "publish.h"
#include "qcbt-view.h"

/* Report the thread's last qcbt error and return R (a -errno). */
static int
report(int r)
{
    const char *msg = qcbt_error_get();

    nbdkit_error("%s", msg[0] ? msg : strerror(-r));
    return r;
}

int
qcbt_view_config(struct qcbt_view_opts *o, const char *key, const char *value)
{
    int b;

    if (strcmp(key, "bitmap") == 0) {
        if (!value[0]) {
            nbdkit_error("bitmap: the bitmap name must not be empty");
            return -1;
        }
        o->bitmap = value;
        return 1;
    }
    if (strcmp(key, "strict") == 0 || strcmp(key, "dirty-only") == 0) {
        b = nbdkit_parse_bool(value);
        if (b == -1)
            return -1;
        if (key[0] == 's')
            o->strict = b;
        else
            o->dirty_only = b;
        return 1;
    }
    return 0;
}

int
qcbt_view_config_complete(const struct qcbt_view_opts *o)
{
    if (o->dirty_only && !o->bitmap) {
        nbdkit_error("dirty-only=true needs bitmap=NAME");
        return -1;
    }
    if (o->strict && !o->bitmap) {
        nbdkit_error("strict=true needs bitmap=NAME");
        return -1;
    }
    return 0;
}

/* Merge the bitmap (common/publish decides): a refusal is an error naming
 * the rule and the layer.  Its notices (the layers that contribute their
 * allocation map in tolerant mode) are logged: nbdkit has no warning
 * level, so they go to the debug log (-v) and `qcbt bitmap check` shows
 * them too.
 */
static int
build_dirty(struct qcbt_view *v, const struct qcbt_view_opts *o)
{
    struct publish_spec spec = {.name = o->bitmap};
    struct publish_opts po = {.mode =
                                  o->strict ? MERGE_STRICT : MERGE_TOLERANT};
    const struct merge_result *res;
    struct publish_set *set = NULL;
    size_t i;
    int r;

    r = publish_run(v->chain, &spec, 1, &po, &set);
    if (r < 0)
        return report(r);
    for (i = 0; i < set->nr_notices; i++)
        nbdkit_debug("qcbt: %s", set->notices[i].text);
    if (set->error) {
        nbdkit_error("qcbt: %s", set->error);
        publish_set_free(set);
        return -EINVAL;
    }
    v->published = set;
    res = v->dirty = set->bitmaps[0].merge;
    nbdkit_debug("qcbt: bitmap '%s' (%s): granularity %" PRIu64 ", %" PRIu64
                 " of %" PRIu64 " bits dirty, %zu fallback layer(s)",
                 o->bitmap,
                 o->strict ? "strict" : "tolerant",
                 res->bm->granularity,
                 bitmap_count(res->bm),
                 res->bm->nbits,
                 res->nr_fallbacks);
    return 0;
}

int
qcbt_view_init(struct qcbt_view *v,
               struct chain *chain,
               const struct qcbt_view_opts *o,
               const char *what)
{
    size_t i;
    int r, n;

    memset(v, 0, sizeof *v);
    v->chain = chain;
    v->size = chain->size;
    v->dirty_only = o->dirty_only;
    for (i = 0; i < chain->nr_layers; i++) {
        const char *path = chain->layers[i].path;
        char esc[1024]; /* the path comes from a backing file name */

        nbdkit_debug("qcbt: layer %zu: %s (%s%s), %" PRIu64 " bytes",
                     i,
                     qcbt_escape(esc, sizeof esc, path, strlen(path)),
                     chain_fmt_name(chain->layers[i].fmt),
                     chain->layers[i].fmt_probed ? ", probed" : "",
                     chain->layers[i].size);
    }
    if (o->bitmap) {
        r = build_dirty(v, o);
        if (r < 0) {
            qcbt_view_free(v);
            return r;
        }
    }
    if (o->bitmap)
        n = asprintf(&v->description,
                     "qcbt: %s (%zu layer%s), dirty view of bitmap '%s'%s",
                     what,
                     chain->nr_layers,
                     chain->nr_layers == 1 ? "" : "s",
                     o->bitmap,
                     o->dirty_only ? ", clean ranges read as zeros" : "");
    else
        n = asprintf(&v->description,
                     "qcbt: %s (%zu layer%s)",
                     what,
                     chain->nr_layers,
                     chain->nr_layers == 1 ? "" : "s");
    if (n < 0) {
        v->description = NULL;
        qcbt_view_free(v);
        nbdkit_error("out of memory");
        return -ENOMEM;
    }
    return 0;
}

void
qcbt_view_free(struct qcbt_view *v)
{
    publish_set_free(v->published);
    chain_close(v->chain);
    free(v->description);
    memset(v, 0, sizeof *v);
}

int
qcbt_view_pread(const struct qcbt_view *v,
                void *buf,
                uint32_t count,
                uint64_t offset)
{
    unsigned char *p = buf;
    uint64_t end = offset + count;
    int r;

    if (qcbt_debug_reads)
        nbdkit_debug("guest read count=%" PRIu32 " offset=%" PRIu64,
                     count,
                     offset);
    if (!v->dirty_only) {
        r = chain_read(v->chain, buf, count, offset);
        return r < 0 ? report(r) : 0;
    }
    while (offset < end) {
        struct bitmap_extent e;

        r = merge_result_extent(v->dirty, offset, end - offset, &e);
        if (r < 0)
            return report(r);
        if (e.dirty) {
            r = chain_read(v->chain, p, e.len, offset);
            if (r < 0)
                return report(r);
        } else {
            memset(p, 0, e.len);
        }
        p += e.len;
        offset += e.len;
    }
    return 0;
}

int
qcbt_view_extents(const struct qcbt_view *v,
                  uint32_t count,
                  uint64_t offset,
                  bool req_one,
                  struct nbdkit_extents *ex)
{
    uint64_t end = offset + count;
    unsigned n = 0;
    int r;

    while (offset < end && n < QCBT_VIEW_MAX_EXTENTS) {
        uint64_t len;
        uint32_t type;

        if (v->dirty) {
            struct bitmap_extent e;

            r = merge_result_extent(v->dirty, offset, end - offset, &e);
            if (r < 0)
                return report(r);
            len = e.len;
            /* ZERO promises that reads return zeros: only dirty-only
             * reads of clean ranges do; otherwise they return the data.
             */
            if (e.dirty)
                type = 0;
            else if (v->dirty_only)
                type = NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO;
            else
                type = NBDKIT_EXTENT_HOLE;
        } else {
            struct chain_status st;

            r = chain_block_status(v->chain, offset, end - offset, &st);
            if (r < 0)
                return report(r);
            len = st.len;
            type = (st.data ? 0 : NBDKIT_EXTENT_HOLE) |
                   (st.zero ? NBDKIT_EXTENT_ZERO : 0);
        }
        if (qcbt_debug_extents)
            nbdkit_debug("extent offset=%" PRIu64 " length=%" PRIu64
                         " type=%" PRIu32,
                         offset,
                         len,
                         type);
        /* nbdkit_add_extent merges neighbours of the same type. */
        if (nbdkit_add_extent(ex, offset, len, type) == -1)
            return -(errno ? errno : EIO);
        offset += len;
        n++;
        if (req_one)
            break;
    }
    return 0;
}

void
qcbt_view_block_size(const struct qcbt_view *v,
                     uint32_t *minimum,
                     uint32_t *preferred,
                     uint32_t *maximum)
{
    const struct chain_layer *top = &v->chain->layers[0];
    uint64_t pref = top->qcow2 ? top->qcow2->cluster_size : 4096;

    /* preferred must be a power of two in [512, 32 MiB]. */
    *minimum = 1;
    *preferred = (uint32_t)MIN(MAX(pref, UINT64_C(4096)), UINT64_C(2) << 20);
    *maximum = 0xffffffff;
}

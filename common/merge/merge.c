/* qcbt: the chain-aware merge engine. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "merge.h"
#include "minmax.h"

struct merge_ctx {
    struct chain *chain;
    struct qcow2_bitmap_list **lists; /* per layer, loaded lazily */
};

int
merge_ctx_new(struct chain *c, struct merge_ctx **out)
{
    struct merge_ctx *ctx = calloc(1, sizeof *ctx);

    if (ctx)
        ctx->lists = calloc(c->nr_layers, sizeof *ctx->lists);
    if (!ctx || !ctx->lists) {
        free(ctx);
        return qcbt_error(ENOMEM, "out of memory");
    }
    ctx->chain = c;
    *out = ctx;
    return 0;
}

void
merge_ctx_free(struct merge_ctx *ctx)
{
    size_t i;

    if (!ctx)
        return;
    for (i = 0; i < ctx->chain->nr_layers; i++)
        qcow2_bitmap_list_free(ctx->lists[i]);
    free(ctx->lists);
    free(ctx);
}

int
merge_ctx_layer_bitmaps(struct merge_ctx *ctx,
                        size_t layer,
                        const struct qcow2_bitmap_list **out)
{
    struct chain_layer *l;
    int r;

    if (layer >= ctx->chain->nr_layers)
        return qcbt_error(EINVAL, "no layer %zu", layer);
    if (!ctx->lists[layer]) {
        l = &ctx->chain->layers[layer];
        if (l->qcow2) {
            r = qcow2_bitmaps_load(l->qcow2, &ctx->lists[layer]);
            if (r < 0)
                return r;
        } else {
            ctx->lists[layer] = calloc(1, sizeof *ctx->lists[layer]);
            if (!ctx->lists[layer])
                return qcbt_error(ENOMEM, "out of memory");
            ctx->lists[layer]->names_known = true;
            ctx->lists[layer]->usable = true;
        }
    }
    *out = ctx->lists[layer];
    return 0;
}

static const struct qcow2_bitmap_info *
find_bitmap(const struct qcow2_bitmap_list *list, const char *name)
{
    size_t i;

    for (i = 0; i < list->nr; i++)
        if (strcmp(list->bitmaps[i].name, name) == 0)
            return &list->bitmaps[i];
    return NULL;
}

static void refuse(struct merge_result *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
refuse(struct merge_result *r, const char *fmt, ...)
{
    va_list ap;

    r->usable = false;
    va_start(ap, fmt);
    vsnprintf(r->error, sizeof r->error, fmt, ap);
    va_end(ap);
    /* It quotes layer paths and bitmap names: image strings. */
    qcbt_sanitize(r->error);
}

static void fallback(struct merge_layer *ml, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
fallback(struct merge_layer *ml, const char *fmt, ...)
{
    va_list ap;

    ml->source = MERGE_SRC_ALLOCATION;
    va_start(ap, fmt);
    vsnprintf(ml->reason, sizeof ml->reason, fmt, ap);
    va_end(ap);
    qcbt_sanitize(ml->reason);
}

/* Why X@layer cannot be used, or NULL if it can. */
static const char *
unusable_reason(const struct qcow2_bitmap_info *bi)
{
    return bi->status == QCOW2_BITMAP_OK ? NULL : bi->reason;
}

/* Mark everything layer LI itself allocates (alloc(Li)). */
static int
merge_allocation(struct chain *c, size_t li, struct bitmap *dst)
{
    uint64_t end = MIN(c->layers[li].size, dst->size);
    uint64_t pos = 0;
    int r;

    while (pos < end) {
        uint64_t n;
        bool allocated;

        r = chain_layer_allocated(c, li, pos, end - pos, &n, &allocated);
        if (r < 0)
            return r;
        if (allocated) {
            r = bitmap_set_bytes(dst, pos, n);
            if (r < 0)
                return r;
        }
        pos += n;
    }
    return 0;
}

/* Fill RES (allocated, range set) with the merge of NAME over
 * [top, base).  Returns 0 (usable or refused) or -errno; on -errno RES is
 * half-built and the caller frees it.
 */
static int
merge_into(struct merge_ctx *ctx,
           const char *name,
           const struct merge_opts *opts,
           struct merge_result *res)
{
    struct chain *c = ctx->chain;
    const struct qcow2_bitmap_list *list;
    const struct qcow2_bitmap_info *bi;
    size_t top = res->top, base = res->base, i, k = SIZE_MAX, topmost;
    bool found = false;
    int r;

    /* Lk: the deepest layer of the range that holds NAME.  A layer whose
     * directory cannot be walked below it may hide a deeper X: no answer.
     */
    for (i = base; i-- > top;) {
        r = merge_ctx_layer_bitmaps(ctx, i, &list);
        if (r < 0)
            return r;
        if (!list->names_known) {
            refuse(res,
                   "layer %zu (%s): bitmap directory unreadable (%s): "
                   "cannot tell whether it holds bitmap '%s'",
                   i,
                   c->layers[i].path,
                   list->reason,
                   name);
            return 0;
        }
        if (find_bitmap(list, name)) {
            k = i;
            found = true;
            break;
        }
    }
    if (!found) {
        refuse(res,
               "bitmap '%s' not found in any layer%s",
               name,
               top == 0 && base == c->nr_layers ? " of the chain"
                                                : " of the range");
        return 0;
    }
    res->deepest = k;

    /* Decide each layer's contribution. */
    for (i = top; i <= k; i++) {
        struct merge_layer *ml = &res->layers[i];
        const char *why;

        r = merge_ctx_layer_bitmaps(ctx, i, &list);
        if (r < 0)
            return r;
        bi = list->names_known ? find_bitmap(list, name) : NULL;
        why = bi ? unusable_reason(bi) : NULL;

        if (opts->mode == MERGE_STRICT || i == k) {
            if (!list->names_known) {
                refuse(res,
                       "layer %zu (%s): bitmap directory unreadable: %s",
                       i,
                       c->layers[i].path,
                       list->reason);
                return 0;
            }
            if (!bi && i == top) {
                refuse(res,
                       "bitmap '%s' is missing in the top layer %zu "
                       "(%s) but present in layer %zu (strict mode)",
                       name,
                       i,
                       c->layers[i].path,
                       k);
                return 0;
            }
            if (!bi) {
                refuse(res,
                       "bitmap '%s': gap at layer %zu (%s): present in "
                       "layers above and in layer %zu (strict mode)",
                       name,
                       i,
                       c->layers[i].path,
                       k);
                return 0;
            }
            if (bi->status == QCOW2_BITMAP_IN_USE) {
                refuse(res,
                       "bitmap '%s' is in use at layer %zu (%s): the "
                       "image was not closed cleanly",
                       name,
                       i,
                       c->layers[i].path);
                return 0;
            }
            if (why) {
                refuse(res,
                       "bitmap '%s' is invalid at layer %zu (%s): %s",
                       name,
                       i,
                       c->layers[i].path,
                       why);
                return 0;
            }
            ml->source = MERGE_SRC_BITMAP;
        } else if (!list->names_known) {
            fallback(ml, "bitmap directory unreadable: %s", list->reason);
        } else if (!bi) {
            fallback(ml,
                     "bitmap '%s' missing: the layer was created without "
                     "it",
                     name);
        } else if (bi->status == QCOW2_BITMAP_IN_USE) {
            fallback(ml, "bitmap '%s' is in use (not closed cleanly)", name);
        } else if (why) {
            fallback(ml, "bitmap '%s' is invalid: %s", name, why);
        } else {
            ml->source = MERGE_SRC_BITMAP;
        }
        if (ml->source == MERGE_SRC_BITMAP) {
            ml->granularity = 1ULL << bi->granularity_bits;
            ml->enabled = bi->flags & QCOW2_BME_FLAG_AUTO;
        }
    }

    /* Load and merge.  A bitmap whose data turns out to be corrupt falls
     * back to the allocation map where tolerant mode allows it.
     */
    for (i = top; i <= k; i++) {
        struct merge_layer *ml = &res->layers[i];
        struct bitmap *lb = NULL;

        if (ml->source != MERGE_SRC_BITMAP)
            continue;
        r = merge_ctx_layer_bitmaps(ctx, i, &list);
        if (r < 0)
            return r;
        bi = find_bitmap(list, name);
        r = qcow2_bitmap_load_data(c->layers[i].qcow2, bi, 0, &lb);
        if (r == -ENOMEM)
            return r;
        if (r < 0) {
            if (opts->mode == MERGE_STRICT || i == k) {
                refuse(res,
                       "bitmap '%s' is invalid at layer %zu (%s): %s",
                       name,
                       i,
                       c->layers[i].path,
                       qcbt_error_get());
                bitmap_free(res->bm);
                res->bm = NULL;
                return 0;
            }
            fallback(ml,
                     "bitmap '%s' data unreadable: %s",
                     name,
                     qcbt_error_get());
            continue;
        }
        if (!res->bm) {
            /* The topmost bitmap used sets the result's granularity. */
            r = bitmap_new(c->size, lb->granularity, &res->bm);
            if (r < 0) {
                bitmap_free(lb);
                return r;
            }
        }
        bitmap_merge_into(res->bm, lb);
        bitmap_free(lb);
    }
    /* Without any bitmap above (cannot happen: X@k is always used), the
     * allocation maps still need a bitmap to land in.
     */
    topmost = k;
    if (!res->bm) {
        r = bitmap_new(c->size, res->layers[topmost].granularity, &res->bm);
        if (r < 0)
            return r;
    }
    for (i = top; i <= k; i++) {
        if (res->layers[i].source != MERGE_SRC_ALLOCATION)
            continue;
        r = merge_allocation(c, i, res->bm);
        if (r < 0) {
            refuse(res,
                   "layer %zu (%s): cannot read its allocation: %s",
                   i,
                   c->layers[i].path,
                   qcbt_error_get());
            bitmap_free(res->bm);
            res->bm = NULL;
            return 0;
        }
        res->nr_fallbacks++;
    }
    return 0;
}

int
merge_run(struct merge_ctx *ctx,
          const char *name,
          const struct merge_opts *opts,
          struct merge_result **out)
{
    static const struct merge_opts defaults;
    struct chain *c = ctx->chain;
    struct merge_result *res;
    size_t top, base;
    int r;

    /* The result is the caller's only on success: on -errno *out is NULL
     * and nothing is left to free.
     */
    *out = NULL;
    if (!opts)
        opts = &defaults;
    top = opts->top;
    base = opts->base ? opts->base : c->nr_layers;
    if (top >= base || base > c->nr_layers)
        return qcbt_error(EINVAL, "invalid layer range [%zu, %zu)", top, base);

    res = calloc(1, sizeof *res);
    if (!res)
        return qcbt_error(ENOMEM, "out of memory");
    res->layers = calloc(c->nr_layers, sizeof *res->layers);
    res->name = strdup(name);
    if (!res->layers || !res->name) {
        merge_result_free(res);
        return qcbt_error(ENOMEM, "out of memory");
    }
    res->mode = opts->mode;
    res->top = top;
    res->base = base;
    res->nr_layers = c->nr_layers;
    res->usable = true;

    r = merge_into(ctx, name, opts, res);
    if (r < 0) {
        merge_result_free(res);
        return r;
    }
    *out = res;
    return 0;
}

void
merge_result_free(struct merge_result *r)
{
    if (!r)
        return;
    bitmap_free(r->bm);
    free(r->layers);
    free(r->name);
    free(r);
}

int
merge_result_extent(const struct merge_result *r,
                    uint64_t offset,
                    uint64_t max_len,
                    struct bitmap_extent *ext)
{
    if (!r->usable || !r->bm)
        return qcbt_error(EINVAL,
                          "bitmap '%s' has no usable merge: %s",
                          r->name,
                          r->error);
    return bitmap_extent(r->bm, offset, max_len, ext);
}

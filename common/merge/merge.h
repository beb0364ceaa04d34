/* qcbt: the chain-aware merge engine (DESIGN.md "The merge engine").
 *
 * "Changes since checkpoint X, seen from the top": one bitmap per
 * checkpoint, same-named bitmaps in each overlay created after X.  Lk is
 * the deepest layer of the merged range that holds X.
 *
 * Strict (libvirt's rules): X in the top layer of the range and in every
 * layer down to Lk with no gap, none in use or invalid; the result is the
 * union of X@top..X@k.
 *
 * Tolerant (default): every layer above Lk was created after X, so layer
 * j < k contributes X@j when it is present and usable, otherwise alloc(Lj)
 * (everything that layer holds); X@k must be present and usable.
 *
 * The result has the granularity of the topmost bitmap used; other inputs
 * (and cluster-granular allocation) are mapped conservatively.  Refusals
 * name the rule and the layer.  Results are dense bitmaps, walked with
 * merge_result_extent() (never a list of the whole disk).
 */
#ifndef QCBT_MERGE_H
#define QCBT_MERGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bitmap.h"
#include "chain.h"
#include "qcow2-bitmaps.h"

enum merge_mode { MERGE_TOLERANT = 0, MERGE_STRICT = 1 };

enum merge_source {
    MERGE_SRC_NONE,       /* outside the range, or below Lk */
    MERGE_SRC_BITMAP,     /* X@layer contributes */
    MERGE_SRC_ALLOCATION, /* tolerant fallback: alloc(layer) contributes */
};

struct merge_layer {
    enum merge_source source;
    uint64_t granularity; /* of X@layer when it contributes */
    bool enabled;         /* X@layer records writes (auto flag) */
    char reason[320];     /* why the allocation map was used */
};

struct merge_result {
    char *name;
    enum merge_mode mode;
    size_t top, base;    /* the merged range [top, base) */
    bool usable;         /* false: refused, see error; bm is NULL */
    char error[400];     /* the refusal: rule and layer */
    size_t deepest;      /* Lk */
    size_t nr_fallbacks; /* layers that contributed their allocation */
    struct bitmap *bm;   /* the merged bitmap (owned) */
    size_t nr_layers;    /* == chain->nr_layers */
    struct merge_layer *layers;
};

/* A merge context caches each layer's bitmap directory, so several
 * names merge with one parse per layer.  The chain must outlive it.
 */
struct merge_ctx;

int merge_ctx_new(struct chain *c, struct merge_ctx **out);
void merge_ctx_free(struct merge_ctx *ctx);

/* The bitmap directory of LAYER (a raw layer has an empty, usable one).
 * Returns 0 or -errno (out of memory).
 */
int merge_ctx_layer_bitmaps(struct merge_ctx *ctx,
                            size_t layer,
                            const struct qcow2_bitmap_list **out);

struct merge_opts {
    enum merge_mode mode;
    size_t top;  /* first layer of the range (0 = the top) */
    size_t base; /* one past the last layer; 0 = the whole chain */
};

/* Merge NAME over the range.  Returns 0 and *out in every case where an
 * answer exists, usable or refused (out->usable, out->error); -errno only
 * for out-of-memory, a result too large or bad arguments, and then *out is
 * NULL (nothing to free).  Free a result with merge_result_free().
 */
int merge_run(struct merge_ctx *ctx,
              const char *name,
              const struct merge_opts *opts,
              struct merge_result **out);

void merge_result_free(struct merge_result *r);

/* The run of equal dirtiness at guest OFFSET of a usable result (see
 * bitmap_extent()).
 */
int merge_result_extent(const struct merge_result *r,
                        uint64_t offset,
                        uint64_t max_len,
                        struct bitmap_extent *ext);

#endif /* QCBT_MERGE_H */

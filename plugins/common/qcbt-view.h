/* nbdkit-qcbt-plugin and nbdkit-qcbt-filter: the view both serve.
 *
 * A view is the guest view of a chain (common/chain) plus, with bitmap=,
 * the chain's merged dirty bitmap (common/merge).  It is built once, before
 * the first connection, and immutable after, so every connection and
 * worker thread reads it without a lock (STYLE.md "Threads").
 *
 * What nbdkit lets a plugin publish is base:allocation only, so:
 *   - without bitmap=, extents are the chain's allocation: data -> 0,
 *     otherwise HOLE; reads-as-zero -> ZERO (qemu-nbd's base:allocation);
 *   - with bitmap=NAME, extents are the "dirty view": dirty -> 0 (data),
 *     clean -> HOLE.  ZERO is a promise about reads, so clean ranges carry
 *     it only with dirty-only=true, where their reads return zeros: then
 *     a stock copier copies only changed data.
 *
 * Every function that fails has already reported the failure with
 * nbdkit_error() (the message from qcbt_error_get()) and returns -errno
 * for nbdkit_set_error() or the filter's *err.
 */
#ifndef QCBT_PLUGINS_VIEW_H
#define QCBT_PLUGINS_VIEW_H

#include <stdbool.h>
#include <stdint.h>

#include "chain.h"
#include "merge.h"

struct publish_set;

struct nbdkit_extents;

/* Debug flags (-D qcbt.extents=1, -D qcbt.reads=1), defined by each .so. */
extern int qcbt_debug_extents;
extern int qcbt_debug_reads;

/* The parameters shared by the plugin and the filter. */
struct qcbt_view_opts {
    const char *bitmap; /* bitmap=NAME, or NULL */
    bool strict;        /* strict=true: libvirt's merge rules */
    bool dirty_only;    /* dirty-only=true: clean ranges read as zeros */
};

#define QCBT_VIEW_CONFIG_HELP                                           \
    "bitmap=NAME          Extents describe NAME's merged dirty map.\n"  \
    "strict=true          libvirt's merge rules (default: tolerant).\n" \
    "dirty-only=true      With bitmap=, clean ranges read as zeros."

/* Handle KEY=VALUE if it is one of the shared parameters.  Returns 1 when
 * handled, 0 when KEY is not ours, -1 on a bad value (reported).
 */
int
qcbt_view_config(struct qcbt_view_opts *o, const char *key, const char *value);

/* Check the parameters together (dirty-only needs bitmap).  0 or -1. */
int qcbt_view_config_complete(const struct qcbt_view_opts *o);

struct qcbt_view {
    struct chain *chain;              /* owned */
    uint64_t size;                    /* exported size */
    const struct merge_result *dirty; /* the dirty view, or NULL */
    struct publish_set *published;    /* owns dirty; NULL without it */
    bool dirty_only;
    char *description; /* export description; owned */
};

/* Build the view over CHAIN (ownership passes to V, on error too).
 * WHAT names the image in the description.  0 or -errno.
 */
int qcbt_view_init(struct qcbt_view *v,
                   struct chain *chain,
                   const struct qcbt_view_opts *o,
                   const char *what);

/* Release everything V owns; V may be zeroed or half built. */
void qcbt_view_free(struct qcbt_view *v);

/* Read guest bytes [offset, offset+count) (within v->size). */
int qcbt_view_pread(const struct qcbt_view *v,
                    void *buf,
                    uint32_t count,
                    uint64_t offset);

/* Add the extents of [offset, offset+count) to EX; only the first one
 * when REQ_ONE.  Reports at most QCBT_VIEW_MAX_EXTENTS per call (a client
 * asks again from where the reply ends).
 */
#define QCBT_VIEW_MAX_EXTENTS 65536
int qcbt_view_extents(const struct qcbt_view *v,
                      uint32_t count,
                      uint64_t offset,
                      bool req_one,
                      struct nbdkit_extents *ex);

/* Block size constraints for .block_size: no minimum beyond a byte, the
 * top layer's cluster as the preferred size, no maximum.
 */
void qcbt_view_block_size(const struct qcbt_view *v,
                          uint32_t *minimum,
                          uint32_t *preferred,
                          uint32_t *maximum);

#endif /* QCBT_PLUGINS_VIEW_H */

/* qcbt: commit the layers above a base into it, in place, merging the
 * persistent bitmaps (DESIGN.md "The merge engine", "Sub-ranges";
 * docs/qcbt.pod "qcbt commit").
 *
 * IMAGE's chain is L0 (top) ... Lb (base) ... Ln.  After the commit, Lb
 * reads as L0 read before (for every guest byte L0..Lb-1 allocate; the
 * rest was Lb's already), and each bitmap X of L0..Lb is, in Lb, the
 * merge engine's tolerant answer over [L0, Lb]: X@Lb when no upper layer
 * changed anything, plus each upper layer's X or, where it lacks a usable
 * one, everything it allocates.  L0..Lb-1 are left as they were (like
 * `qemu-img commit -d`): they still read the same, now over a base that
 * holds their union.
 *
 * Order: every bitmap result computed first; then the bitmaps stored in
 * Lb, each by one header switch (a crash leaves each exactly old or
 * exactly new); then the data, L2 table by L2 table (qcow2-store.h
 * qcow2_data_writer_put()).  A new bitmap only ever says more is dirty
 * than Lb's data yet shows, never less, so no bitmap needs in_use.
 *
 * A bitmap whose merge is refused (its deepest holder in use or invalid)
 * is not invented: a broken X@Lb stays as it is (already inconsistent),
 * and none is created in Lb when Lb lacks X; the report says so.
 */
#ifndef QCBT_COMMIT_H
#define QCBT_COMMIT_H

#include <stddef.h>
#include <stdint.h>

struct commit_opts {
    const char *base; /* a layer of IMAGE's chain (path); NULL: L1 */
};

enum commit_bitmap_action {
    COMMIT_BITMAP_MERGED,  /* X@Lb now holds the merged answer */
    COMMIT_BITMAP_CREATED, /* X created in Lb with the merged answer */
    COMMIT_BITMAP_SKIPPED, /* refused by the merge engine: see reason */
};

struct commit_bitmap {
    char *name;
    enum commit_bitmap_action action;
    uint64_t granularity; /* of X@Lb (MERGED, CREATED) */
    char reason[400];     /* SKIPPED: the merge engine's refusal */
};

struct commit_report {
    char *base_path;
    size_t base_layer; /* b */
    uint64_t data_clusters, zero_clusters, cluster_size;
    size_t nr_bitmaps;
    struct commit_bitmap *bitmaps;
};

/* Commit IMAGE's layers above the base into it.  Takes the WRITE image
 * lock on the base and READ locks on every other layer, for the whole
 * run: a file another process holds is -EAGAIN, "... held by another
 * process ...".  Refused before anything is written (one line): a
 * single-layer chain, a base not in the chain or not qcow2, layers of
 * different sizes, external data files, and what the data writer
 * refuses (qcow2_data_writer_new()).  Returns 0 and *out
 * (commit_report_free()), or -errno with a message and *out NULL.
 */
int commit_run(const char *image,
               const struct commit_opts *opts,
               struct commit_report **out);

void commit_report_free(struct commit_report *r);

#endif /* QCBT_COMMIT_H */

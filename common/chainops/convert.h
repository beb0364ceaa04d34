/* qcbt: squash a chain into one new qcow2 image with its merged bitmaps
 * (`qcbt convert`; DESIGN.md "The merge engine" (squash/convert),
 * "Persistence transform and aliases").
 *
 * The new image DST has no backing file, the chain's virtual size and the
 * top layer's cluster size (64 KiB for a raw top).  Guest data: every
 * cluster the chain holds as data is written, unless it reads as all
 * zeros; ranges that are unallocated or zero in the chain, and data
 * clusters of zeros, stay unallocated (they read as zeros: DST has no
 * backing file).  Compressed clusters are read (decompressed) and written
 * as plain data.
 *
 * Bitmaps: each one is the merge engine's answer on the whole chain
 * (publish.h: the same rules as qcbt-server's exports), stored in DST with
 * the granularity of that answer (the topmost bitmap used), so DST's bits
 * are exactly the merged bits.  Its recording state is that of the
 * topmost layer's bitmap used, unless the spec says enabled=on|off.
 * Without specs, every bitmap of the chain that can be merged is stored
 * under its own name and the others are skipped with a notice; with
 * specs, only those are, and one that cannot be merged refuses the whole
 * conversion before DST is created.  persistent=off: merged (so a
 * refusal still refuses) but not stored: a qcow2 file holds persistent
 * bitmaps only.
 */
#ifndef QCBT_CONVERT_H
#define QCBT_CONVERT_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chain.h"
#include "merge.h"

/* NAME[=ALIAS][,persistent=on|off][,enabled=on|off] */
struct convert_bitmap_spec {
    char *name;
    char *alias;     /* NULL: NAME */
    bool persistent; /* default on */
    int enabled;     /* -1: as the source (default), 0 off, 1 on */
};

/* Parse ARG.  Fields are separated by ','; ",," stands for one ',' in
 * NAME or ALIAS (QEMU's option escape).  The first '=' of the first field
 * ends NAME.  Values: on|off (also true|false, yes|no).  Each option at
 * most once.  Returns 0 and *out (convert_bitmap_spec_free()) or -EINVAL
 * with a message quoting ARG, -ENOMEM.
 */
int convert_bitmap_spec_parse(const char *arg, struct convert_bitmap_spec *out);
void convert_bitmap_spec_free(struct convert_bitmap_spec *s);

struct convert_opts {
    const struct convert_bitmap_spec *specs; /* NULL/0: every bitmap */
    size_t nr_specs;
    bool no_bitmaps; /* store none (specs must be empty) */
    enum merge_mode mode;
    /* Optional: when *stop becomes non-zero (a signal handler sets it),
     * the conversion stops at the next chunk of data or bitmap with
     * -EINTR, and DST is removed as after any failure.
     */
    const volatile sig_atomic_t *stop;
};

struct convert_bitmap {
    char *name;  /* in the chain */
    char *alias; /* in DST */
    uint64_t granularity;
    bool enabled;
    bool persistent; /* false: merged, not stored */
    uint64_t dirty_bytes;
};

struct convert_result {
    uint64_t size;
    uint32_t cluster_size;
    uint64_t data_bytes; /* guest bytes written as data clusters */
    size_t nr_bitmaps;
    struct convert_bitmap *bitmaps;
    size_t nr_notices; /* one line each: fallbacks, skipped bitmaps */
    char **notices;
};

/* Convert SRC (an open chain; the caller holds its locks) into the new
 * file DST_PATH, which must not exist and does not exist after a
 * failure.  Returns 0 and *out (convert_result_free()) or -errno with a
 * message (a bitmap refused: "bitmap 'X' cannot be used (MODE mode):
 * WHY").
 */
int convert_run(struct chain *src,
                const char *dst_path,
                const struct convert_opts *o,
                struct convert_result **out);

void convert_result_free(struct convert_result *r);

#endif /* QCBT_CONVERT_H */

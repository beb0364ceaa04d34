/* qcbt: an external snapshot of an offline disk (`qcbt snapshot IMAGE
 * NEW`): a new qcow2 overlay NEW backed by IMAGE, carrying libvirt's
 * checkpoint rule so the chain stays valid for strict merges (DESIGN.md
 * "The merge engine": "When an external snapshot is taken, a same-named
 * empty bitmap is created in the new overlay").
 *
 * NEW: qcow2 v3, the virtual size of IMAGE, IMAGE's cluster size (64 KiB
 * for a raw IMAGE), backing file IMAGE with its format, no data.  Every
 * bitmap of IMAGE's own layer that is consistent (not in use, metadata and
 * data valid) and enabled gets an empty, enabled, same-named bitmap of the
 * same granularity in NEW.  The others are left out, each with the reason
 * (disabled: it records nothing any more, so nothing is lost; in use or
 * invalid: it is broken already, and an empty one above it would claim
 * what it cannot).
 *
 * The backing name is stored so that QEMU resolves it from NEW's
 * directory: IMAGE's last component when IMAGE is in NEW's directory and
 * was given relative; IMAGE as given when absolute; otherwise IMAGE's
 * absolute path (its directory resolved with realpath(3)).  Before NEW is
 * created, the stored name is checked to lead to IMAGE.
 */
#ifndef QCBT_SNAPSHOT_H
#define QCBT_SNAPSHOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chain.h"

struct snapshot_bitmap {
    char *name;
    uint64_t granularity;
    bool carried;
    char *reason; /* why not carried (one line, sanitized), or NULL */
};

struct snapshot_result {
    char *backing_name; /* as stored in NEW */
    const char *backing_fmt;
    uint64_t size;
    uint32_t cluster_size;
    size_t nr_bitmaps; /* every bitmap of IMAGE's layer, in its order */
    struct snapshot_bitmap *bitmaps;
};

/* Make NEW over IMAGE, whose chain CHAIN was opened from the same IMAGE
 * string (the caller holds its locks: READ refuses an image a writer
 * holds).  NEW must not exist; on any failure it does not exist
 * afterwards.  Returns 0 and *out (snapshot_result_free()) or -errno with
 * a message.
 */
int snapshot_create(struct chain *chain,
                    const char *image,
                    const char *new_path,
                    struct snapshot_result **out);

void snapshot_result_free(struct snapshot_result *r);

/* The backing name NEW must store to reach IMAGE (rules above).  Returns
 * 0 and *out (malloc'ed) or -errno with a message.
 */
int snapshot_backing_name(const char *image, const char *new_path, char **out);

#endif /* QCBT_SNAPSHOT_H */

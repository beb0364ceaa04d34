/* qcbt: where an image's metadata lives, to check that bitmap tables and
 * bitmap data clusters do not sit on it (reliability-catalogue.md A43,
 * A44: QEMU does not check this on load).
 */
#ifndef QCBT_QCOW2_METAMAP_H
#define QCBT_QCOW2_METAMAP_H

#include <stddef.h>
#include <stdint.h>

#include "qcow2.h"

struct qcow2_range {
    uint64_t off, len;
    const char *what; /* static string */
};

struct qcow2_metamap {
    size_t n, cap;
    struct qcow2_range *r; /* sorted by off after qcow2_metamap_sort */
    uint64_t *maxend;      /* maxend[i] = max end of r[0..i] */
};

/* The header cluster, L1 table, refcount table, refcount blocks and L2
 * tables of IMG.  Returns 0 or -errno (an
 * unreadable refcount table is an error: placement cannot be checked).
 */
int qcow2_metamap_build(struct qcow2_image *img, struct qcow2_metamap **out);

int qcow2_metamap_add(struct qcow2_metamap *m,
                      uint64_t off,
                      uint64_t len,
                      const char *what);

/* Sort and index; call after the last add, before qcow2_metamap_hit. */
int qcow2_metamap_sort(struct qcow2_metamap *m);

/* What [off, off+len) overlaps, or NULL. */
const char *
qcow2_metamap_hit(const struct qcow2_metamap *m, uint64_t off, uint64_t len);

void qcow2_metamap_free(struct qcow2_metamap *m);

#endif /* QCBT_QCOW2_METAMAP_H */

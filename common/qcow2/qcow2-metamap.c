/* qcbt: where an image's metadata lives. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "error.h"
#include "qcow2-metamap.h"

int
qcow2_metamap_add(struct qcow2_metamap *m,
                  uint64_t off,
                  uint64_t len,
                  const char *what)
{
    if (len == 0)
        return 0;
    if (m->n == m->cap) {
        size_t nc = m->cap ? m->cap * 2 : 64;
        struct qcow2_range *nr = realloc(m->r, nc * sizeof *nr);

        if (!nr)
            return qcbt_error(ENOMEM, "out of memory");
        m->r = nr;
        m->cap = nc;
    }
    m->r[m->n++] = (struct qcow2_range){off, len, what};
    return 0;
}

static int
cmp_range(const void *a, const void *b)
{
    const struct qcow2_range *x = a, *y = b;

    return x->off < y->off ? -1 : x->off > y->off;
}

int
qcow2_metamap_sort(struct qcow2_metamap *m)
{
    size_t i;

    if (m->n > 1)
        qsort(m->r, m->n, sizeof *m->r, cmp_range);
    free(m->maxend);
    m->maxend = malloc((m->n ? m->n : 1) * sizeof *m->maxend);
    if (!m->maxend)
        return qcbt_error(ENOMEM, "out of memory");
    for (i = 0; i < m->n; i++) {
        uint64_t end = m->r[i].off + m->r[i].len;

        m->maxend[i] = i && m->maxend[i - 1] > end ? m->maxend[i - 1] : end;
    }
    return 0;
}

const char *
qcow2_metamap_hit(const struct qcow2_metamap *m, uint64_t off, uint64_t len)
{
    size_t lo = 0, hi = m->n;
    uint64_t end = off + len;

    if (len == 0 || m->n == 0)
        return NULL;
    /* First range starting at or after END: everything before it starts
     * before END. */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if (m->r[mid].off < end)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || m->maxend[lo - 1] <= off)
        return NULL;
    /* Some range before LO ends after OFF: find one to name. */
    while (lo-- > 0)
        if (m->r[lo].off + m->r[lo].len > off)
            return m->r[lo].what;
    return "metadata";
}

void
qcow2_metamap_free(struct qcow2_metamap *m)
{
    if (!m)
        return;
    free(m->r);
    free(m->maxend);
    free(m);
}

int
qcow2_metamap_build(struct qcow2_image *img, struct qcow2_metamap **out)
{
    struct qcow2_metamap *m = calloc(1, sizeof *m);
    uint64_t cs = img->cluster_size;
    uint64_t rt_bytes = (uint64_t)img->st.refcount_table_clusters * cs;
    unsigned char *rt = NULL;
    size_t i;
    int r;

    if (!m)
        return qcbt_error(ENOMEM, "out of memory");
    if ((r = qcow2_metamap_add(m, 0, cs, "the header")) < 0 ||
        (r = qcow2_metamap_add(m,
                               img->hdr.l1_table_offset,
                               (uint64_t)img->hdr.l1_size * 8,
                               "the L1 table")) < 0 ||
        (r = qcow2_metamap_add(m,
                               img->st.refcount_table_offset,
                               rt_bytes,
                               "the refcount table")) < 0)
        goto fail;
    for (i = 0; i < img->hdr.l1_size; i++) {
        uint64_t l2 = img->l1[i] & QCOW2_L1E_OFFSET_MASK;

        if (l2 && (r = qcow2_metamap_add(m, l2, cs, "an L2 table")) < 0)
            goto fail;
    }
    /* The refcount table is bounded (8 MiB) by qcow2_open. */
    rt = malloc(rt_bytes);
    if (!rt) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto fail;
    }
    r = qcbt_io_read_exact(img->io,
                           rt,
                           rt_bytes,
                           img->st.refcount_table_offset,
                           true,
                           "refcount table");
    if (r < 0)
        goto fail;
    for (i = 0; i < rt_bytes / 8; i++) {
        uint64_t rb = qcow2_table_get(rt, i) & QCOW2_REFT_OFFSET_MASK;

        if (rb && (r = qcow2_metamap_add(m, rb, cs, "a refcount block")) < 0)
            goto fail;
    }
    free(rt);
    r = qcow2_metamap_sort(m);
    if (r < 0)
        goto fail2;
    *out = m;
    return 0;
fail:
    free(rt);
fail2:
    qcow2_metamap_free(m);
    return r;
}

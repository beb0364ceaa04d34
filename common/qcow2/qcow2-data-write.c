/* qcbt: writing guest data into an existing qcow2 image (qcow2.txt
 * "Cluster mapping"; the order of the writes is in qcow2-store.h).
 *
 * One L2 table is staged at a time: its entries as they will be, which of
 * them change, the clusters to decrement once they are switched.  Data
 * is gathered into one write per run of host-contiguous clusters (in
 * place, or into reserved clusters that nothing points to yet), all of
 * it written before the sync's first flush; entries switch in
 * qcow2_data_writer_sync().
 * Every entry written is checked by the format layer's validator
 * (qcow2_l2_entry_check()) first, as every entry read is.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "isaligned.h"
#include "qcow2-metamap.h"
#include "qcow2-store.h"
#include "rounding.h"

struct qcow2_data_writer {
    struct qcow2_image *img;
    struct qcow2_alloc *alloc;
    struct qcow2_metamap *meta; /* metadata, never overwritten as data */
    uint64_t cs;
    uint64_t file_end;  /* file size at start: older clusters lie below */
    uint64_t l1_idx;    /* L1 index of the staged table, UINT64_MAX none */
    uint64_t l2_off;    /* its offset; 0 for a new table not reserved yet */
    bool l2_new;        /* the table is new (the L1 entry was empty) */
    unsigned char *l2;  /* the staged table, entries as they will be */
    unsigned char *chg; /* per entry: changed */
    bool staged;        /* anything to sync */
    uint64_t next;      /* lowest guest offset put may take */
    uint64_t *frees;    /* clusters to decrement after the switch */
    size_t nr_frees, cap_frees;
    bool broken; /* a write failed: only free is allowed */
    /* Data to host-contiguous clusters goes out in one write. */
    unsigned char *wb;
    uint64_t wb_off, wb_len, wb_cap;
};

#define DATA_WRITE_MAX (1024u * 1024)

int
qcow2_data_writer_new(struct qcow2_image *img, struct qcow2_data_writer **out)
{
    const struct qcow2_header *h = &img->hdr;
    struct qcow2_data_writer *w;
    const char *name = img->io->name;
    int r;

    if (h->version < 3)
        return qcbt_error(ENOTSUP,
                          "%s: writing guest data into a version 2 qcow2 "
                          "image is not supported (use 'qemu-img amend -o "
                          "compat=1.1')",
                          name);
    if (img->extended_l2)
        return qcbt_error(ENOTSUP,
                          "%s: writing guest data into an image with "
                          "extended L2 entries (subclusters) is not "
                          "supported",
                          name);
    if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
        return qcbt_error(ENOTSUP,
                          "%s: writing guest data into an image with an "
                          "external data file is not supported",
                          name);
    if (h->crypt_method)
        return qcbt_error(ENOTSUP,
                          "%s: writing into an encrypted image is not "
                          "supported",
                          name);
    if (h->nb_snapshots)
        return qcbt_error(ENOTSUP,
                          "%s: the image has %" PRIu32 " internal "
                          "snapshot(s): writing guest data into it is not "
                          "supported (shared clusters)",
                          name,
                          h->nb_snapshots);
    if (!img->io->ops->pwrite)
        return qcbt_error(EROFS, "%s: opened read-only", name);
    w = calloc(1, sizeof *w);
    if (!w)
        return qcbt_error(ENOMEM, "out of memory");
    w->img = img;
    w->cs = img->cluster_size;
    w->file_end = img->io->size;
    w->l1_idx = UINT64_MAX;
    w->l2 = malloc(w->cs);
    w->chg = calloc(img->l2_entries, 1);
    w->wb_cap = w->cs > DATA_WRITE_MAX ? w->cs : DATA_WRITE_MAX;
    w->wb = malloc(w->wb_cap);
    if (!w->l2 || !w->chg || !w->wb) {
        qcow2_data_writer_free(w);
        return qcbt_error(ENOMEM, "out of memory");
    }
    r = qcow2_alloc_new(img, &w->alloc);
    if (r == 0)
        r = qcow2_metamap_build(img, &w->meta);
    if (r < 0) {
        qcow2_data_writer_free(w);
        return r;
    }
    *out = w;
    return 0;
}

void
qcow2_data_writer_free(struct qcow2_data_writer *w)
{
    if (!w)
        return;
    qcow2_alloc_free(w->alloc);
    qcow2_metamap_free(w->meta);
    free(w->l2);
    free(w->chg);
    free(w->frees);
    free(w->wb);
    free(w);
}

static int
queue_free(struct qcow2_data_writer *w, uint64_t off)
{
    if (w->nr_frees == w->cap_frees) {
        size_t nc = w->cap_frees ? w->cap_frees * 2 : 64;
        uint64_t *grown = realloc(w->frees, nc * sizeof *grown);

        if (!grown)
            return qcbt_error(ENOMEM, "out of memory");
        w->frees = grown;
        w->cap_frees = nc;
    }
    w->frees[w->nr_frees++] = off;
    return 0;
}

/* Queue the host clusters the old entry ENTRY references: a data or
 * zero-allocated cluster, or every cluster the compressed data touches
 * (QEMU's qcow2_free_any_cluster()). */
static int
queue_entry_clusters(struct qcow2_data_writer *w, uint64_t entry)
{
    struct qcow2_compressed_desc d;
    uint64_t c, last;
    int r;

    if (entry & QCOW2_OFLAG_COMPRESSED) {
        qcow2_compressed_desc_decode(entry, w->img->hdr.cluster_bits, &d);
        last = d.host_offset + qcow2_compressed_desc_len(&d) - 1;
        if (last >= w->file_end)
            return qcbt_error(EIO,
                              "%s: compressed cluster at 0x%" PRIx64
                              " runs past the end of the file",
                              w->img->io->name,
                              d.host_offset);
        for (c = ROUND_DOWN(d.host_offset, w->cs); c <= last; c += w->cs) {
            r = queue_free(w, c);
            if (r < 0)
                return r;
        }
        return 0;
    }
    c = entry & QCOW2_L2E_OFFSET_MASK;
    return c ? queue_free(w, c) : 0;
}

/* Write the runs of changed entries of an existing table: each entry is
 * 8 aligned bytes, so each cluster switches as a whole. */
static int
write_changed_entries(struct qcow2_data_writer *w)
{
    uint64_t i = 0, j, n = w->img->l2_entries;
    int r;

    while (i < n) {
        if (!w->chg[i]) {
            i++;
            continue;
        }
        for (j = i; j < n && w->chg[j]; j++)
            ;
        r = qcbt_io_write_exact(w->img->io,
                                w->l2 + i * 8,
                                (j - i) * 8,
                                w->l2_off + i * 8,
                                "L2 table");
        if (r < 0)
            return r;
        i = j;
    }
    return 0;
}

/* Write the data gathered so far and start its writeback at once, so
 * that the flush before the switch finds little left to write. */
static int
flush_data(struct qcow2_data_writer *w)
{
    int r;

    if (w->wb_len == 0)
        return 0;
    r = qcbt_io_write_exact(w->img->io,
                            w->wb,
                            w->wb_len,
                            w->wb_off,
                            "guest data");
    if (r == 0)
        r = qcbt_io_writeback(w->img->io, w->wb_off, w->wb_len, false);
    w->wb_len = 0;
    return r;
}

/* One cluster of guest data for host cluster HOST: gathered while the
 * clusters are contiguous, written by flush_data() (at the latest by the
 * sync, before anything may point to them). */
static int
write_data(struct qcow2_data_writer *w, const void *buf, uint64_t host)
{
    int r;

    if (w->wb_len &&
        (host != w->wb_off + w->wb_len || w->wb_len + w->cs > w->wb_cap)) {
        r = flush_data(w);
        if (r < 0)
            return r;
    }
    if (w->wb_len == 0)
        w->wb_off = host;
    memcpy(w->wb + w->wb_len, buf, w->cs);
    w->wb_len += w->cs;
    return 0;
}

int
qcow2_data_writer_sync(struct qcow2_data_writer *w)
{
    struct qcow2_image *img = w->img;
    unsigned char e[8];
    uint64_t l1e;
    size_t i;
    int r;

    if (w->broken)
        return qcbt_error(EIO, "%s: an earlier write failed", img->io->name);
    if (!w->staged)
        return 0;
    w->broken = true;
    r = flush_data(w);
    if (r < 0)
        return r;
    if (w->l2_new) {
        r = qcbt_io_write_exact(img->io, w->l2, w->cs, w->l2_off, "L2 table");
        if (r < 0)
            return r;
    }
    /* New clusters counted, every byte so far durable. */
    r = qcow2_alloc_commit(w->alloc);
    if (r < 0)
        return r;
    if (w->l2_new) {
        l1e = w->l2_off | QCOW2_OFLAG_COPIED;
        qcow2_table_set(e, 0, l1e);
        r = qcbt_io_write_exact(img->io,
                                e,
                                8,
                                img->hdr.l1_table_offset + w->l1_idx * 8,
                                "L1 table");
        if (r == 0)
            img->l1[w->l1_idx] = l1e;
    } else {
        r = write_changed_entries(w);
    }
    if (r == 0)
        r = qcbt_io_flush(img->io);
    if (r < 0)
        return r;
    /* Freed last: from here on a failure only leaks. */
    for (i = 0; i < w->nr_frees; i++) {
        r = qcow2_free_cluster(w->alloc, w->frees[i]);
        if (r < 0)
            return qcbt_error_prefix(-r,
                                     "%s: data written, but old clusters "
                                     "may be leaked ('qemu-img check -r "
                                     "leaks' frees them)",
                                     img->io->name);
    }
    if (w->nr_frees) {
        r = qcbt_io_flush(img->io);
        if (r < 0)
            return r;
    }
    w->nr_frees = 0;
    w->l2_new = false;
    w->staged = false;
    memset(w->chg, 0, img->l2_entries);
    w->broken = false;
    return 0;
}

/* Make the table of L1 index IDX the staged one. */
static int
load_table(struct qcow2_data_writer *w, uint64_t idx)
{
    struct qcow2_image *img = w->img;
    uint64_t l1e, off, rc;
    int r;

    if (idx >= img->hdr.l1_size)
        return qcbt_error(EIO,
                          "%s: the L1 table is too small for the image "
                          "size",
                          img->io->name);
    l1e = img->l1[idx];
    if (l1e & QCOW2_L1E_RESERVED_MASK)
        return qcbt_error(EIO,
                          "%s: L1 entry %" PRIu64 " 0x%016" PRIx64
                          " has reserved bits set",
                          img->io->name,
                          idx,
                          l1e);
    off = l1e & QCOW2_L1E_OFFSET_MASK;
    w->l1_idx = idx;
    w->l2_off = off;
    w->l2_new = off == 0;
    if (off == 0) {
        memset(w->l2, 0, w->cs);
        return 0;
    }
    if (!IS_ALIGNED(off, w->cs) || off + w->cs > w->file_end)
        return qcbt_error(EIO,
                          "%s: L2 table offset 0x%" PRIx64 " (L1 entry %" PRIu64
                          ") is invalid",
                          img->io->name,
                          off,
                          idx);
    r = qcow2_get_refcount(img, off / w->cs, &rc);
    if (r < 0)
        return r;
    if (rc != 1)
        return qcbt_error(ENOTSUP,
                          "%s: the L2 table at 0x%" PRIx64
                          " has refcount %" PRIu64
                          ", not 1: shared tables are not supported "
                          "(run 'qemu-img check')",
                          img->io->name,
                          off,
                          rc);
    return qcbt_io_read_exact(img->io, w->l2, w->cs, off, false, "L2 table");
}

/* The host bytes the old entry ENTRY of guest cluster GUEST references
 * must lie inside the file and on no metadata: they are about to be
 * overwritten or freed, and a hostile entry pointing at the L1 table
 * must cost an error, not the table. */
static int
check_old(struct qcow2_data_writer *w, uint64_t entry, uint64_t guest)
{
    struct qcow2_compressed_desc d;
    uint64_t off, len;
    const char *what;

    if (entry & QCOW2_OFLAG_COMPRESSED) {
        qcow2_compressed_desc_decode(entry, w->img->hdr.cluster_bits, &d);
        off = d.host_offset;
        len = qcow2_compressed_desc_len(&d);
    } else {
        off = entry & QCOW2_L2E_OFFSET_MASK;
        len = off ? w->cs : 0;
    }
    if (len == 0)
        return 0;
    if (off + len > w->file_end)
        return qcbt_error(EIO,
                          "%s: the L2 entry of guest offset 0x%" PRIx64
                          " points past the end of the file (0x%" PRIx64 ")",
                          w->img->io->name,
                          guest,
                          off);
    what = qcow2_metamap_hit(w->meta, off, len);
    if (what)
        return qcbt_error(EIO,
                          "%s: the L2 entry of guest offset 0x%" PRIx64
                          " points at %s (0x%" PRIx64 "; run 'qemu-img check')",
                          w->img->io->name,
                          guest,
                          what,
                          off);
    return 0;
}

/* May the data cluster at HOST (checked by check_old()) be overwritten
 * in place?  Only a cluster referenced once. */
static int
reusable(struct qcow2_data_writer *w, uint64_t host, bool *ok)
{
    uint64_t rc;
    int r;

    *ok = false;
    r = qcow2_get_refcount(w->img, host / w->cs, &rc);
    if (r < 0)
        return r;
    *ok = rc == 1;
    return 0;
}

static int
set_entry(struct qcow2_data_writer *w, uint64_t l2i, uint64_t entry)
{
    int r = qcow2_l2_entry_check(entry, 0, &w->img->hdr);

    if (r < 0)
        return qcbt_error_prefix(-r,
                                 "%s: refusing to write L2 entry 0x%016" PRIx64,
                                 w->img->io->name,
                                 entry);
    /* A new table gets its cluster with its first entry. */
    if (w->l2_new && w->l2_off == 0) {
        r = qcow2_alloc_clusters(w->alloc, 1, &w->l2_off);
        if (r < 0)
            return r;
    }
    qcow2_table_set(w->l2, l2i, entry);
    w->chg[l2i] = 1;
    w->staged = true;
    return 0;
}

int
qcow2_data_writer_put(struct qcow2_data_writer *w,
                      uint64_t guest,
                      const void *buf)
{
    struct qcow2_image *img = w->img;
    uint64_t idx, l2i, old, host, newhost;
    bool inplace = false;
    int r;

    if (w->broken)
        return qcbt_error(EIO, "%s: an earlier write failed", img->io->name);
    if (!IS_ALIGNED(guest, w->cs) || guest >= img->size || guest < w->next)
        return qcbt_error(EINVAL,
                          "%s: guest cluster 0x%" PRIx64
                          " out of order or out of range",
                          img->io->name,
                          guest);
    idx = guest / w->cs / img->l2_entries;
    l2i = guest / w->cs % img->l2_entries;
    if (idx != w->l1_idx) {
        r = qcow2_data_writer_sync(w);
        if (r == 0)
            r = load_table(w, idx);
        if (r < 0)
            return r;
    }
    w->next = guest + w->cs;
    old = qcow2_table_get(w->l2, l2i);
    r = qcow2_l2_entry_check(old, 0, &img->hdr);
    if (r < 0)
        return qcbt_error_prefix(-r,
                                 "%s: corrupt L2 entry 0x%016" PRIx64
                                 " for guest offset 0x%" PRIx64,
                                 img->io->name,
                                 old,
                                 guest);
    r = check_old(w, old, guest);
    if (r < 0)
        return r;
    host = old & QCOW2_OFLAG_COMPRESSED ? 0 : old & QCOW2_L2E_OFFSET_MASK;

    if (!buf) {
        /* A plain zero cluster; whatever was there is dropped. */
        if (old == QCOW2_OFLAG_ZERO)
            return 0;
        r = queue_entry_clusters(w, old);
        if (r == 0)
            r = set_entry(w, l2i, QCOW2_OFLAG_ZERO);
        return r;
    }

    if (host) {
        r = reusable(w, host, &inplace);
        if (r < 0)
            return r;
    }
    if (inplace) {
        /* Data now, the entry (if the zero flag goes) at the switch. */
        w->staged = true;
        r = write_data(w, buf, host);
        if (r == 0 && old != (host | QCOW2_OFLAG_COPIED))
            r = set_entry(w, l2i, host | QCOW2_OFLAG_COPIED);
        if (r < 0)
            w->broken = true;
        return r;
    }
    r = qcow2_alloc_clusters(w->alloc, 1, &newhost);
    if (r == 0)
        r = write_data(w, buf, newhost);
    if (r == 0)
        r = queue_entry_clusters(w, old);
    if (r == 0)
        r = set_entry(w, l2i, newhost | QCOW2_OFLAG_COPIED);
    if (r < 0)
        w->broken = true;
    return r;
}

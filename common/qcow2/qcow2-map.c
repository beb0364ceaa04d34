/* qcbt: qcow2 guest-to-host mapping (L1/L2, standard and extended L2).
 *
 * qcow2.txt "Cluster mapping" and "Extended L2 Entries".  The
 * classification mirrors QEMU's qcow2_get_subcluster_type() so that our
 * allocation answers are QEMU's; entries QEMU would flag as corrupt are an
 * I/O error for that range (never data from the wrong place).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "isaligned.h"
#include "minmax.h"
#include "qcow2.h"
#include "qcow2-internal.h"

/* A small LRU cache of L2 tables in host byte order.  Protected by lock;
 * qcow2_map() holds it while it scans one table.
 */
struct l2_slot {
    uint64_t offset; /* host offset of the table, 0 = empty slot */
    uint64_t used;   /* LRU stamp */
    uint64_t *table; /* l2_entries (x2 with extended L2) words */
};

struct qcow2_l2_cache {
    pthread_mutex_t lock;
    size_t nr_slots;
    uint64_t clock;
    unsigned char *raw; /* one cluster of scratch for loading */
    struct l2_slot slots[];
};

#define L2_CACHE_BYTES     (4u * 1024 * 1024)
#define L2_CACHE_MIN_SLOTS 4

int
qcow2_l2_cache_new(struct qcow2_image *img)
{
    struct qcow2_l2_cache *c;
    size_t n = L2_CACHE_BYTES / img->cluster_size;

    if (n < L2_CACHE_MIN_SLOTS)
        n = L2_CACHE_MIN_SLOTS;
    c = calloc(1, sizeof *c + n * sizeof c->slots[0]);
    if (!c)
        return qcbt_error(ENOMEM, "out of memory");
    c->nr_slots = n;
    pthread_mutex_init(&c->lock, NULL);
    img->l2_cache = c;
    return 0;
}

void
qcow2_l2_cache_free(struct qcow2_image *img)
{
    struct qcow2_l2_cache *c = img->l2_cache;
    size_t i;

    if (!c)
        return;
    for (i = 0; i < c->nr_slots; i++)
        free(c->slots[i].table);
    free(c->raw);
    pthread_mutex_destroy(&c->lock);
    free(c);
    img->l2_cache = NULL;
}

/* Find or load the L2 table at l2_offset.  Caller holds the lock. */
static int
l2_get_locked(struct qcow2_image *img, uint64_t l2_offset, uint64_t **table)
{
    struct qcow2_l2_cache *c = img->l2_cache;
    struct l2_slot *victim = &c->slots[0];
    size_t i, nwords = img->cluster_size / 8;
    int r;

    for (i = 0; i < c->nr_slots; i++) {
        if (c->slots[i].offset == l2_offset) {
            c->slots[i].used = ++c->clock;
            *table = c->slots[i].table;
            return 0;
        }
        if (c->slots[i].used < victim->used)
            victim = &c->slots[i];
    }

    if (!c->raw && !(c->raw = malloc(img->cluster_size)))
        return qcbt_error(ENOMEM, "out of memory");
    if (!victim->table && !(victim->table = malloc(img->cluster_size)))
        return qcbt_error(ENOMEM, "out of memory");
    victim->offset = 0;
    r = qcbt_io_read_exact(img->io,
                           c->raw,
                           img->cluster_size,
                           l2_offset,
                           true,
                           "L2 table");
    if (r < 0)
        return r;
    for (i = 0; i < nwords; i++)
        victim->table[i] = qcow2_table_get(c->raw, i);
    victim->offset = l2_offset;
    victim->used = ++c->clock;
    *table = victim->table;
    return 0;
}

/* One unit of mapping: a cluster (standard L2) or a subcluster. */
struct unit {
    enum qcow2_kind kind;
    bool offset_valid;
    uint64_t host; /* host offset of the unit's first byte (DATA) */
};

/* Classify subcluster SC (0 for standard L2) of the cluster described by
 * ENTRY/BITMAP (qcow2_get_subcluster_type() in QEMU terms).  The rules of
 * the entry are the format layer's (qcow2_l2_entry_check()).
 */
static int
classify(struct qcow2_image *img,
         uint64_t guest,
         uint64_t entry,
         uint64_t bitmap,
         unsigned sc,
         struct unit *u)
{
    uint64_t host = entry & QCOW2_L2E_OFFSET_MASK;
    bool has_data_file =
        img->hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE;
    bool allocated;
    int r;

    u->offset_valid = false;
    u->host = 0;
    r = qcow2_l2_entry_check(entry, img->extended_l2 ? bitmap : 0, &img->hdr);
    if (r < 0)
        return qcbt_error_prefix(-r,
                                 "%s: corrupt L2 entry 0x%016" PRIx64
                                 " for guest offset 0x%" PRIx64,
                                 img->io->name,
                                 entry,
                                 guest);
    if (entry & QCOW2_OFLAG_COMPRESSED) {
        u->kind = QCOW2_COMPRESSED;
        return 0;
    }

    allocated = host != 0 || (has_data_file && (entry & QCOW2_OFLAG_COPIED));

    if (!img->extended_l2) {
        if (entry & QCOW2_OFLAG_ZERO) {
            u->kind = QCOW2_ZERO;
            u->offset_valid = host != 0;
            u->host = host;
        } else if (!allocated) {
            u->kind = QCOW2_UNALLOCATED;
        } else {
            u->kind = QCOW2_DATA;
            u->offset_valid = true;
            u->host = host;
        }
        return 0;
    }

    /* Extended L2: 32 alloc bits, then 32 zero bits. */
    if (allocated) {
        u->offset_valid = true;
        u->host = host + ((uint64_t)sc << img->subcluster_bits);
        if (bitmap & (1ULL << (32 + sc)))
            u->kind = QCOW2_ZERO;
        else if (bitmap & (1ULL << sc))
            u->kind = QCOW2_DATA;
        else
            u->kind = QCOW2_UNALLOCATED;
    } else {
        u->kind =
            (bitmap & (1ULL << (32 + sc))) ? QCOW2_ZERO : QCOW2_UNALLOCATED;
    }
    return 0;
}

int
qcow2_map(struct qcow2_image *img,
          uint64_t offset,
          uint64_t len,
          struct qcow2_extent *ext)
{
    struct qcow2_l2_cache *c = img->l2_cache;
    const unsigned cbits = img->hdr.cluster_bits;
    const unsigned ubits = img->subcluster_bits;
    const uint64_t unit_size = 1ULL << ubits;
    uint64_t l1_index, l2_index, l2_offset, l2_span_end, end, pos;
    uint64_t *table = NULL;
    struct unit first, u;
    int r;

    if (len == 0 || offset >= img->size)
        return qcbt_error(EINVAL,
                          "%s: map request at 0x%" PRIx64 " outside the image",
                          img->io->name,
                          offset);
    len = MIN(len, img->size - offset);
    memset(ext, 0, sizeof *ext);

    l1_index = offset >> (cbits + img->l2_bits);
    /* End of the range this L2 table covers. */
    l2_span_end = (l1_index + 1) << (cbits + img->l2_bits);
    end = MIN(offset + len, l2_span_end);

    if (l1_index >= img->hdr.l1_size) {
        ext->kind = QCOW2_UNALLOCATED;
        ext->len = end - offset;
        return 0;
    }
    if (img->l1[l1_index] & QCOW2_L1E_RESERVED_MASK)
        return qcbt_error(EIO,
                          "%s: corrupt L1 entry %" PRIu64 " (0x%016" PRIx64
                          "): reserved bits set",
                          img->io->name,
                          l1_index,
                          img->l1[l1_index]);
    l2_offset = img->l1[l1_index] & QCOW2_L1E_OFFSET_MASK;
    if (l2_offset == 0) {
        ext->kind = QCOW2_UNALLOCATED;
        ext->len = end - offset;
        return 0;
    }
    if (!IS_ALIGNED(l2_offset, img->cluster_size))
        return qcbt_error(EIO,
                          "%s: corrupt L1 entry %" PRIu64
                          ": L2 table offset 0x%" PRIx64 " not cluster aligned",
                          img->io->name,
                          l1_index,
                          l2_offset);
    if (l2_offset >= img->io->size)
        return qcbt_error(EIO,
                          "%s: corrupt L1 entry %" PRIu64
                          ": L2 table offset 0x%" PRIx64
                          " past the end of the file",
                          img->io->name,
                          l1_index,
                          l2_offset);

    pthread_mutex_lock(&c->lock);
    r = l2_get_locked(img, l2_offset, &table);
    if (r < 0)
        goto out;

    pos = offset;
    l2_index = (pos >> cbits) & (img->l2_entries - 1);
    {
        uint64_t e = img->extended_l2 ? table[2 * l2_index] : table[l2_index];
        uint64_t b = img->extended_l2 ? table[2 * l2_index + 1] : 0;
        unsigned sc = (pos >> ubits) & ((1u << (cbits - ubits)) - 1);

        r = classify(img, pos, e, b, sc, &first);
        if (r < 0)
            goto out;
        if (first.kind == QCOW2_COMPRESSED) {
            ext->kind = QCOW2_COMPRESSED;
            ext->l2_entry = e;
            ext->len = MIN(end, ((pos >> cbits) + 1) << cbits) - pos;
            goto out;
        }
        ext->kind = first.kind;
        ext->offset_valid = first.offset_valid;
        ext->host_offset = first.host + (pos & (unit_size - 1));
    }

    /* Extend the run unit by unit while the kind (and, for data, host
     * contiguity) stays the same.
     */
    pos = (pos | (unit_size - 1)) + 1;
    while (pos < end) {
        uint64_t e, b;
        unsigned sc;

        l2_index = (pos >> cbits) & (img->l2_entries - 1);
        e = img->extended_l2 ? table[2 * l2_index] : table[l2_index];
        b = img->extended_l2 ? table[2 * l2_index + 1] : 0;
        if (e == 0 && b == 0) {
            /* An empty entry: the whole cluster is unallocated, whatever
             * its subcluster (what classify() says of it).  Sparse disks
             * are mostly this, and a 4 GiB block status window may cover
             * 64 Ki of them: skip them in a tight loop.
             */
            const uint64_t last = ((end - 1) >> cbits) & (img->l2_entries - 1);
            uint64_t i = l2_index + 1;

            if (first.kind != QCOW2_UNALLOCATED)
                break;
            if (img->extended_l2)
                while (i <= last && (table[2 * i] | table[2 * i + 1]) == 0)
                    i++;
            else
                while (i <= last && table[i] == 0)
                    i++;
            pos =
                (pos & ~((1ULL << (cbits + img->l2_bits)) - 1)) + (i << cbits);
            continue;
        }
        sc = (pos >> ubits) & ((1u << (cbits - ubits)) - 1);
        if (classify(img, pos, e, b, sc, &u) < 0) {
            /* Stop before the bad entry; it is reported when reached. */
            qcbt_error_clear();
            break;
        }
        if (u.kind != first.kind || u.offset_valid != first.offset_valid)
            break;
        if (u.kind == QCOW2_DATA && u.host != ext->host_offset + (pos - offset))
            break;
        /* Data wholly past EOF is an error when reached, as alone. */
        if (u.kind == QCOW2_DATA && img->data_io == img->io &&
            u.host >= img->io->size)
            break;
        pos += unit_size;
    }
    ext->len = MIN(pos, end) - offset;
    r = 0;

out:
    pthread_mutex_unlock(&c->lock);
    if (r == 0 && ext->kind == QCOW2_DATA && img->data_io == img->io &&
        ext->host_offset >= img->io->size)
        r = qcbt_error(EIO,
                       "%s: data cluster for guest offset 0x%" PRIx64
                       " at 0x%" PRIx64 " is past the end of the file",
                       img->io->name,
                       offset,
                       ext->host_offset);
    return r;
}

/* qcbt: the qcow2 bitmaps extension and bitmap directory.
 *
 * Checks everything QEMU's qcow2_read_extensions(), bitmap_list_load() and
 * check_dir_entry() check, plus what they miss (reliability-catalogue.md
 * A31-A43): duplicate names, names that are not valid NBD strings, and
 * directory or table offsets past the end of the file or overlapping the
 * header, the L1 table, the refcount table or each other.  The rules of
 * the extension, of a directory entry and of a table entry are the format
 * layer's validators (qcow2-format.h), the same the writer obeys; this
 * file adds what needs the image as a whole.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "byteorder.h"
#include "error.h"
#include "qcow2-bitmaps.h"
#include "qcow2-metamap.h"

static void set_reason(char *dst, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
set_reason(char *dst, size_t len, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(dst, len, fmt, ap);
    va_end(ap);
}

#define LAYER_BAD(list, ...) \
    set_reason((list)->reason, sizeof(list)->reason, __VA_ARGS__)
#define BITMAP_BAD(bm, ...)                                        \
    do {                                                           \
        (bm)->status = QCOW2_BITMAP_INVALID;                       \
        set_reason((bm)->reason, sizeof(bm)->reason, __VA_ARGS__); \
    } while (0)

uint64_t
qcow2_bitmap_table_size(const struct qcow2_image *img, unsigned gbits)
{
    return qcow2_bitmap_table_size_needed(img->size, img->cluster_size, gbits);
}

/* Is [off, off+len) disjoint from [m, m+mlen)? */
static bool
overlaps(uint64_t off, uint64_t len, uint64_t m, uint64_t mlen)
{
    return len && mlen && off < m + mlen && m < off + len;
}

/* What metadata (header, L1, refcount table and blocks, L2 tables, the
 * bitmap directory, and once the directory is valid the bitmap tables)
 * a host range overlaps, or NULL.  The map is the image's mutable state:
 * the caller holds img->st.lock.
 */
static const char *
hits_metadata_locked(const struct qcow2_image *img, uint64_t off, uint64_t len)
{
    return img->st.bm_map ? qcow2_metamap_hit(img->st.bm_map, off, len) : NULL;
}

/* Where an entry that passed qcow2_bitmap_dir_entry_check() keeps its
 * table, and whether it is in use: what needs the image, not the entry.
 */
static void
check_entry(struct qcow2_image *img, struct qcow2_bitmap_info *bm)
{
    uint64_t table_bytes = (uint64_t)bm->table_size * 8;
    const char *hit;
    char name[80];

    qcbt_escape(name, sizeof name, bm->name, strlen(bm->name));
    bm->status = QCOW2_BITMAP_OK;
    if (bm->table_offset > QCOW2_MAX_HOST_OFFSET ||
        bm->table_offset + table_bytes > img->io->size) {
        BITMAP_BAD(bm,
                   "bitmap '%s': bitmap table at 0x%" PRIx64
                   " runs past the end of the file",
                   name,
                   bm->table_offset);
        return;
    }
    hit = hits_metadata_locked(img, bm->table_offset, table_bytes);
    if (hit) {
        BITMAP_BAD(bm,
                   "bitmap '%s': bitmap table at 0x%" PRIx64 " overlaps %s",
                   name,
                   bm->table_offset,
                   hit);
        return;
    }
    if (bm->flags & QCOW2_BME_FLAG_IN_USE) {
        bm->status = QCOW2_BITMAP_IN_USE;
        set_reason(bm->reason,
                   sizeof bm->reason,
                   "bitmap '%s' is in use (the image was not closed "
                   "cleanly): its contents cannot be trusted",
                   name);
    }
}

/* qsort has no argument: the list being sorted, per thread (two threads
 * may load the bitmaps of two images at once). */
static __thread const struct qcow2_bitmap_list *sort_list;

static int
cmp_name_idx(const void *a, const void *b)
{
    return strcmp(sort_list->bitmaps[*(const size_t *)a].name,
                  sort_list->bitmaps[*(const size_t *)b].name);
}

static int
cmp_table_idx(const void *a, const void *b)
{
    uint64_t x = sort_list->bitmaps[*(const size_t *)a].table_offset;
    uint64_t y = sort_list->bitmaps[*(const size_t *)b].table_offset;

    return x < y ? -1 : x > y;
}

/* Duplicate names and overlapping tables, in O(n log n) (a layer may hold
 * 65535 bitmaps).  Sets the layer's reason on a problem.
 */
static int
check_unique(struct qcow2_image *img, struct qcow2_bitmap_list *list)
{
    size_t *idx = malloc((list->nr ? list->nr : 1) * sizeof *idx);
    uint64_t maxend = 0;
    char name[80];
    size_t i;

    (void)img;
    if (!idx)
        return qcbt_error(ENOMEM, "out of memory");
    for (i = 0; i < list->nr; i++)
        idx[i] = i;
    sort_list = list;
    qsort(idx, list->nr, sizeof *idx, cmp_name_idx);
    for (i = 1; i < list->nr; i++) {
        const char *a = list->bitmaps[idx[i]].name;

        if (strcmp(a, list->bitmaps[idx[i - 1]].name) == 0) {
            LAYER_BAD(list,
                      "duplicate bitmap name '%s'",
                      qcbt_escape(name, sizeof name, a, strlen(a)));
            free(idx);
            return 0;
        }
    }
    qsort(idx, list->nr, sizeof *idx, cmp_table_idx);
    for (i = 0; i < list->nr; i++) {
        const struct qcow2_bitmap_info *b = &list->bitmaps[idx[i]];
        uint64_t end = b->table_offset + (uint64_t)b->table_size * 8;

        if (i > 0 && b->table_offset < maxend) {
            LAYER_BAD(list,
                      "bitmap tables of '%s' and another bitmap "
                      "overlap",
                      qcbt_escape(name, sizeof name, b->name, strlen(b->name)));
            free(idx);
            return 0;
        }
        if (end > maxend)
            maxend = end;
    }
    free(idx);
    return 0;
}

static int
parse_dir(struct qcow2_image *img,
          const unsigned char *dir,
          uint64_t dir_size,
          uint32_t nb_bitmaps,
          struct qcow2_bitmap_list *list)
{
    uint64_t off = 0;
    size_t i;
    int r;

    list->bitmaps = calloc(nb_bitmaps ? nb_bitmaps : 1, sizeof *list->bitmaps);
    if (!list->bitmaps)
        return qcbt_error(ENOMEM, "out of memory");

    while (off < dir_size) {
        struct qcow2_bitmap_dir_entry e;
        struct qcow2_bitmap_info *bm;

        if (list->nr == nb_bitmaps) {
            LAYER_BAD(list,
                      "broken bitmap directory: more bitmaps found "
                      "than the %" PRIu32 " the header extension says",
                      nb_bitmaps);
            return 0;
        }
        if (qcow2_bitmap_dir_entry_decode(dir + off, dir_size - off, &e) < 0) {
            LAYER_BAD(list,
                      "bitmap directory entry %zu at offset %" PRIu64 ": %s",
                      list->nr,
                      off,
                      qcbt_error_get());
            qcbt_error_clear();
            return 0;
        }
        /* A name that cannot be trusted ends the walk: the names of the
         * layer are not known (the entry's other rules come later). */
        if (qcow2_bitmap_name_check(e.name, e.name_size) < 0) {
            LAYER_BAD(list,
                      "bitmap directory entry %zu: %s",
                      list->nr,
                      qcbt_error_get());
            qcbt_error_clear();
            return 0;
        }

        bm = &list->bitmaps[list->nr];
        bm->table_offset = e.bitmap_table_offset;
        bm->table_size = e.bitmap_table_size;
        bm->flags = e.flags;
        bm->type = e.type;
        bm->granularity_bits = e.granularity_bits;
        bm->extra_data_size = 0;
        bm->name = malloc(e.name_size + 1);
        if (!bm->name)
            return qcbt_error(ENOMEM, "out of memory");
        memcpy(bm->name, e.name, e.name_size);
        bm->name[e.name_size] = '\0';
        /* The entry's own rules (QEMU's check_dir_entry()); reported
         * once the directory has been walked. */
        if (qcow2_bitmap_dir_entry_check(&e, img->cluster_size, img->size) <
            0) {
            BITMAP_BAD(bm, "%s", qcbt_error_get());
            qcbt_error_clear();
        }
        list->nr++;
        off += qcow2_bitmap_dir_entry_size(&e);
    }
    if (list->nr != nb_bitmaps) {
        LAYER_BAD(list,
                  "broken bitmap directory: %zu bitmaps found, the "
                  "header extension says %" PRIu32,
                  list->nr,
                  nb_bitmaps);
        return 0;
    }
    /* Every name is known from here on, even if the layer is unusable. */
    list->names_known = true;

    /* Per-entry constraints; QEMU refuses the whole image on any of them,
     * so any failure makes the whole directory unusable.
     */
    for (i = 0; i < list->nr; i++) {
        if (list->bitmaps[i].status != QCOW2_BITMAP_INVALID)
            check_entry(img, &list->bitmaps[i]);
        if (list->bitmaps[i].status == QCOW2_BITMAP_INVALID) {
            LAYER_BAD(list, "%s", list->bitmaps[i].reason);
            return 0;
        }
    }
    /* Names are unique (QEMU does not check), tables do not overlap each
     * other or the directory: sort and compare neighbours.
     */
    r = check_unique(img, list);
    if (r < 0 || list->reason[0])
        return r;
    list->usable = true;
    return 0;
}

/* Make sure the metadata map exists (callers that parse a directory
 * without qcow2_bitmaps_load, e.g. the fuzzer).
 */
static int
ensure_map_locked(struct qcow2_image *img, struct qcow2_bitmap_list *list)
{
    int r;

    if (img->st.bm_map)
        return 0;
    r = qcow2_metamap_build(img, &img->st.bm_map);
    if (r == -ENOMEM)
        return r;
    if (r < 0) {
        LAYER_BAD(list,
                  "cannot check where bitmaps are stored: %s",
                  qcbt_error_get());
        return 0;
    }
    if (img->st.bitmaps.present &&
        ((r = qcow2_metamap_add(img->st.bm_map,
                                img->st.bitmaps.ext.bitmap_directory_offset,
                                img->st.bitmaps.ext.bitmap_directory_size,
                                "the bitmap directory")) < 0 ||
         (r = qcow2_metamap_sort(img->st.bm_map)) < 0))
        return r;
    return 0;
}

static int
parse_dir_locked(struct qcow2_image *img,
                 const unsigned char *dir,
                 uint64_t dir_size,
                 uint32_t nb_bitmaps,
                 struct qcow2_bitmap_list *list)
{
    size_t i;
    int r;

    /* Bounds the allocation below for callers that skipped the
     * extension checks of qcow2_bitmaps_load(). */
    if (nb_bitmaps == 0 || nb_bitmaps > QCOW2_MAX_BITMAPS) {
        LAYER_BAD(list,
                  "bitmaps extension: %" PRIu32 " bitmaps (1..%d "
                  "allowed)",
                  nb_bitmaps,
                  QCOW2_MAX_BITMAPS);
        return 0;
    }
    r = ensure_map_locked(img, list);
    if (r < 0)
        return r;
    if (!list->reason[0]) {
        r = parse_dir(img, dir, dir_size, nb_bitmaps, list);
        if (r < 0)
            return r;
    }
    /* A rejected directory has no usable bitmap, whatever was parsed. */
    if (!list->usable)
        for (i = 0; i < list->nr; i++)
            if (list->bitmaps[i].status != QCOW2_BITMAP_INVALID) {
                list->bitmaps[i].status = QCOW2_BITMAP_INVALID;
                snprintf(list->bitmaps[i].reason,
                         sizeof list->bitmaps[i].reason,
                         "%s",
                         list->reason);
            }
    return 0;
}

int
qcow2_bitmaps_parse_dir(struct qcow2_image *img,
                        const unsigned char *dir,
                        uint64_t dir_size,
                        uint32_t nb_bitmaps,
                        struct qcow2_bitmap_list *list)
{
    int r;

    qcow2_lock(img);
    r = parse_dir_locked(img, dir, dir_size, nb_bitmaps, list);
    qcow2_unlock(img);
    return r;
}

static int cmp_u64(const void *a, const void *b);

/* A host range a bitmap owns: its table or one of its data clusters. */
struct owned {
    uint64_t off, len;
    size_t owner;
    bool table;
};

static int
cmp_owned(const void *a, const void *b)
{
    const struct owned *x = a, *y = b;

    return x->off < y->off ? -1 : x->off > y->off;
}

/* The owned range overlapping [off, off+len), or NULL.  The ranges are
 * sorted and do not overlap each other (except exact duplicates: data
 * clusters shared between bitmaps, already refused), so only the last
 * one starting before the end can.
 */
static const struct owned *
owned_hit(const struct owned *o, size_t n, uint64_t off, uint64_t len)
{
    size_t lo = 0, hi = n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if (o[mid].off < off + len)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo && o[lo - 1].off + o[lo - 1].len > off)
        return &o[lo - 1];
    return NULL;
}

/* Guest data on a bitmap's table or data cluster: the guest's writes
 * have been landing in the bitmap (or the bitmap's in the guest data),
 * so the bitmap says nothing reliable.  QEMU finds this only with
 * qemu-img check (refcounts); here every L2 table of the image is walked
 * once, when its bitmaps are loaded.
 *
 * This walk is most of the cost of loading the bitmaps of a large image
 * (64 MiB of L2 tables for 1 TiB), so the scan is cheap per entry: runs
 * of unallocated entries are skipped a block at a time, and an entry that
 * lies wholly outside the span of the owned ranges needs no search.
 * Every allocated entry is still checked.
 */
#define L2_SKIP_BYTES 512 /* the smallest cluster */

static void
check_l2_entry(struct qcow2_image *img,
               struct qcow2_bitmap_list *list,
               const struct owned *o,
               size_t n,
               uint64_t span_end,
               uint64_t e,
               uint64_t guest)
{
    uint64_t off, len;
    const struct owned *hit;

    if (e & QCOW2_OFLAG_COMPRESSED) {
        struct qcow2_compressed_desc d;

        qcow2_compressed_desc_decode(e, img->hdr.cluster_bits, &d);
        off = d.host_offset;
        len = qcow2_compressed_desc_len(&d);
    } else {
        off = e & QCOW2_L2E_OFFSET_MASK;
        len = img->cluster_size;
    }
    /* Both masked offsets are < 2^62 and len <= 2 clusters: no wrap. */
    if (!off || off >= span_end || off + len <= o[0].off)
        return;
    hit = owned_hit(o, n, off, len);
    if (hit && list->bitmaps[hit->owner].status == QCOW2_BITMAP_OK) {
        struct qcow2_bitmap_info *bi = &list->bitmaps[hit->owner];
        char name[80];

        BITMAP_BAD(bi,
                   "bitmap '%s': its %s at 0x%" PRIx64
                   " is also guest data (guest offset 0x%" PRIx64
                   ", host 0x%" PRIx64 ")",
                   qcbt_escape(name, sizeof name, bi->name, strlen(bi->name)),
                   hit->table ? "table" : "data cluster",
                   hit->off,
                   guest,
                   off);
    }
}

static int
check_guest_overlap(struct qcow2_image *img,
                    struct qcow2_bitmap_list *list,
                    struct owned *o,
                    size_t n)
{
    uint64_t cs = img->cluster_size;
    uint64_t words = img->extended_l2 ? 2 : 1; /* per L2 entry */
    uint64_t span_end = 0;
    unsigned char *t;
    uint64_t i, k, j;

    if (n == 0 || img->data_io != img->io)
        return 0; /* guest data lives in another file */
    qsort(o, n, sizeof *o, cmp_owned);
    for (k = 0; k < n; k++)
        if (o[k].off + o[k].len > span_end)
            span_end = o[k].off + o[k].len;
    t = malloc(cs);
    if (!t)
        return qcbt_error(ENOMEM, "out of memory");
    for (i = 0; i < img->hdr.l1_size; i++) {
        uint64_t l2 = img->l1[i] & QCOW2_L1E_OFFSET_MASK;

        if (!l2)
            continue;
        if (qcbt_io_read_exact(img->io, t, cs, l2, false, "L2 table") < 0) {
            list->usable = false;
            LAYER_BAD(list,
                      "cannot check that guest data and bitmaps are apart: "
                      "%s",
                      qcbt_error_get());
            break;
        }
        /* Blocks of L2_SKIP_BYTES (a cluster holds whole blocks): one
         * all-zero block is that many unallocated entries. */
        for (k = 0; k < cs; k += L2_SKIP_BYTES) {
            const unsigned char *p = t + k;
            uint64_t any = 0, w;

            /* Zero in any byte order. */
            for (j = 0; j < L2_SKIP_BYTES; j += 8) {
                memcpy(&w, p + j, 8);
                any |= w;
            }
            if (!any)
                continue;
            for (j = 0; j < L2_SKIP_BYTES; j += words * 8) {
                uint64_t e = get_be64(p + j);

                if (e)
                    check_l2_entry(
                        img,
                        list,
                        o,
                        n,
                        span_end,
                        e,
                        ((i << img->l2_bits) + (k + j) / (words * 8)) * cs);
            }
        }
    }
    free(t);
    return 0;
}

/* With a valid directory: the tables join the metadata map, and no data
 * cluster may sit on metadata or be shared between bitmaps.  A bitmap
 * breaking that is invalid (the others stay usable).
 */
static int
check_placement_locked(struct qcow2_image *img, struct qcow2_bitmap_list *list)
{
    struct owned *refs = NULL;
    size_t nrefs = 0, cap = 0, i, k;
    unsigned char *t = NULL;
    int r;

    for (i = 0; i < list->nr; i++) {
        r = qcow2_metamap_add(img->st.bm_map,
                              list->bitmaps[i].table_offset,
                              (uint64_t)list->bitmaps[i].table_size * 8,
                              "a bitmap table");
        if (r < 0)
            return r;
    }
    r = qcow2_metamap_sort(img->st.bm_map);
    if (r < 0)
        return r;

    for (i = 0; i < list->nr; i++) {
        struct qcow2_bitmap_info *bi = &list->bitmaps[i];
        size_t tb = (size_t)bi->table_size * 8;
        unsigned char *nt;

        if (bi->status != QCOW2_BITMAP_OK)
            continue;
        nt = realloc(t, tb);
        if (!nt) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        t = nt;
        if (qcbt_io_read_exact(img->io,
                               t,
                               tb,
                               bi->table_offset,
                               false,
                               "bitmap table") < 0) {
            BITMAP_BAD(bi, "%s", qcbt_error_get());
            continue;
        }
        for (k = 0; k < bi->table_size; k++) {
            struct qcow2_bitmap_table_entry te;
            uint64_t off;
            const char *hit;

            /* Entries breaking the rules of a table entry are reported
             * by qcow2_bitmap_load_data(), which applies the same
             * validator: here they place nothing. */
            qcow2_bitmap_table_entry_decode(t + k * 8, &te);
            if (qcow2_bitmap_table_entry_check(&te, img->cluster_size) < 0) {
                qcbt_error_clear();
                continue;
            }
            off = te.offset;
            if (!off)
                continue;
            hit = overlaps(off, img->cluster_size, bi->table_offset, tb)
                      ? "its own bitmap table"
                      : hits_metadata_locked(img, off, img->cluster_size);
            if (hit) {
                char name[80];

                BITMAP_BAD(
                    bi,
                    "bitmap '%s': data cluster 0x%" PRIx64 " overlaps %s",
                    qcbt_escape(name, sizeof name, bi->name, strlen(bi->name)),
                    off,
                    hit);
                break;
            }
            if (nrefs == cap) {
                size_t nc = cap ? cap * 2 : 256;
                struct owned *nr2 = realloc(refs, nc * sizeof *nr2);

                if (!nr2) {
                    r = qcbt_error(ENOMEM, "out of memory");
                    goto out;
                }
                refs = nr2;
                cap = nc;
            }
            refs[nrefs++] = (struct owned){off, img->cluster_size, i, false};
        }
    }
    if (nrefs > 1)
        qsort(refs, nrefs, sizeof *refs, cmp_owned);
    for (k = 1; k < nrefs; k++) {
        if (refs[k].off == refs[k - 1].off &&
            refs[k].owner != refs[k - 1].owner) {
            struct qcow2_bitmap_info *a = &list->bitmaps[refs[k - 1].owner];
            struct qcow2_bitmap_info *b = &list->bitmaps[refs[k].owner];
            char na[80], nb[80];

            qcbt_escape(na, sizeof na, a->name, strlen(a->name));
            qcbt_escape(nb, sizeof nb, b->name, strlen(b->name));
            BITMAP_BAD(a,
                       "bitmap '%s': data cluster 0x%" PRIx64
                       " is shared with bitmap '%s'",
                       na,
                       refs[k].off,
                       nb);
            BITMAP_BAD(b,
                       "bitmap '%s': data cluster 0x%" PRIx64
                       " is shared with bitmap '%s'",
                       nb,
                       refs[k].off,
                       na);
        }
    }
    /* Tables and data clusters against the guest's clusters. */
    {
        size_t no = nrefs;
        struct owned *o = realloc(refs, (nrefs + list->nr + 1) * sizeof *o);

        if (!o) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        refs = o;
        for (i = 0; i < list->nr; i++)
            if (list->bitmaps[i].table_size)
                o[no++] =
                    (struct owned){list->bitmaps[i].table_offset,
                                   (uint64_t)list->bitmaps[i].table_size * 8,
                                   i,
                                   true};
        r = check_guest_overlap(img, list, o, no);
        if (r < 0)
            goto out;
    }
    r = 0;
out:
    free(refs);
    free(t);
    return r;
}

static int
bitmaps_load_locked(struct qcow2_image *img, struct qcow2_bitmap_list **out)
{
    const struct qcow2_bitmaps_found *found = &img->st.bitmaps;
    const struct qcow2_bitmaps_ext *ext = &found->ext;
    struct qcow2_bitmap_list *list;
    unsigned char *dir = NULL;
    const char *hit;
    size_t i;
    int r;

    list = calloc(1, sizeof *list);
    if (!list)
        return qcbt_error(ENOMEM, "out of memory");
    *out = list;
    list->present = found->present;
    list->names_known = !found->present;
    if (!found->present) {
        /* No bitmaps: nothing is wrong (unless the autoclear bit says
         * there should be some). */
        list->usable = !(img->st.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS);
        if (img->st.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)
            LAYER_BAD(list,
                      "bitmaps autoclear bit set without a bitmaps "
                      "extension");
        return 0;
    }

    /* Extension-level rules (qcow2_read_extensions). */
    if (found->ext_len != QCOW2_BITMAPS_EXT_SIZE) {
        LAYER_BAD(list,
                  "bitmaps extension has length %" PRIu32 " (24 expected)",
                  found->ext_len);
        return 0;
    }
    if (qcow2_bitmaps_ext_check(ext, img->cluster_size, img->io->size) < 0) {
        LAYER_BAD(list, "%s", qcbt_error_get());
        qcbt_error_clear();
        return 0;
    }
    /* The map of the image's own metadata (without the directory yet),
     * rebuilt on every load (tables are added below).
     */
    qcow2_metamap_free(img->st.bm_map);
    img->st.bm_map = NULL;
    {
        r = qcow2_metamap_build(img, &img->st.bm_map);
        if (r == -ENOMEM)
            return r;
        if (r < 0) {
            LAYER_BAD(list,
                      "cannot check where bitmaps are stored: %s",
                      qcbt_error_get());
            return 0;
        }
    }
    hit = hits_metadata_locked(img,
                               ext->bitmap_directory_offset,
                               ext->bitmap_directory_size);
    if (hit) {
        LAYER_BAD(list,
                  "bitmap directory at 0x%" PRIx64 " overlaps %s",
                  ext->bitmap_directory_offset,
                  hit);
        return 0;
    }

    dir = malloc(ext->bitmap_directory_size);
    if (!dir)
        return qcbt_error(ENOMEM, "out of memory");
    r = qcbt_io_read_exact(img->io,
                           dir,
                           ext->bitmap_directory_size,
                           ext->bitmap_directory_offset,
                           false,
                           "bitmap directory");
    if (r < 0) {
        LAYER_BAD(list, "%s", qcbt_error_get());
        free(dir);
        return 0;
    }
    if ((r = qcow2_metamap_add(img->st.bm_map,
                               ext->bitmap_directory_offset,
                               ext->bitmap_directory_size,
                               "the bitmap directory")) < 0 ||
        (r = qcow2_metamap_sort(img->st.bm_map)) < 0) {
        free(dir);
        return r;
    }
    r = parse_dir_locked(img,
                         dir,
                         ext->bitmap_directory_size,
                         ext->nb_bitmaps,
                         list);
    free(dir);
    if (r < 0)
        return r;

    /* The directory is well formed, but is it trustworthy? */
    if (list->usable && img->hdr.version < 3) {
        list->usable = false;
        LAYER_BAD(list,
                  "bitmaps extension in a version 2 image: all "
                  "bitmaps are inconsistent");
    }
    if (list->usable &&
        !(img->st.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)) {
        list->usable = false;
        LAYER_BAD(list,
                  "bitmaps autoclear bit is clear: a program lacking "
                  "bitmap support modified the image, all bitmaps are "
                  "inconsistent");
    }
    if (list->usable &&
        (img->hdr.incompatible_features & QCOW2_INCOMPAT_CORRUPT)) {
        list->usable = false;
        LAYER_BAD(list,
                  "the image is marked corrupt: bitmaps are not "
                  "trusted");
    }
    if (list->usable) {
        r = check_placement_locked(img, list);
        if (r < 0)
            return r;
    }
    if (!list->usable) {
        for (i = 0; i < list->nr; i++) {
            if (list->bitmaps[i].status != QCOW2_BITMAP_INVALID) {
                list->bitmaps[i].status = QCOW2_BITMAP_INVALID;
                snprintf(list->bitmaps[i].reason,
                         sizeof list->bitmaps[i].reason,
                         "%s",
                         list->reason);
            }
        }
    }
    return 0;
}

int
qcow2_bitmaps_load(struct qcow2_image *img, struct qcow2_bitmap_list **out)
{
    int r;

    qcow2_lock(img);
    r = bitmaps_load_locked(img, out);
    qcow2_unlock(img);
    return r;
}

void
qcow2_bitmap_list_free(struct qcow2_bitmap_list *list)
{
    size_t i;

    if (!list)
        return;
    for (i = 0; i < list->nr; i++)
        free(list->bitmaps[i].name);
    free(list->bitmaps);
    free(list);
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static int
load_data_locked(struct qcow2_image *img,
                 const struct qcow2_bitmap_info *bi,
                 unsigned flags,
                 struct bitmap **out)
{
    struct bitmap *bm = NULL;
    unsigned char *raw = NULL, *cluster = NULL;
    uint64_t *offsets = NULL;
    uint64_t want, i, n_off = 0;
    char name[80];
    int r;

    qcbt_escape(name, sizeof name, bi->name, strlen(bi->name));
    if (bi->status != QCOW2_BITMAP_OK)
        return qcbt_error(EINVAL,
                          "%s: bitmap '%s' cannot be loaded: %s",
                          img->io->name,
                          name,
                          bi->reason);
    r = bitmap_new(img->size, 1ULL << bi->granularity_bits, &bm);
    if (r < 0)
        return qcbt_error_prefix(-r, "%s: bitmap '%s'", img->io->name, name);

    /* The stream QEMU keeps in memory: whole words (it hashes them). */
    want =
        (flags & BITMAP_RAW) ? bitmap_raw_size(bm) : bitmap_serialized_size(bm);
    raw = malloc((size_t)bi->table_size * 8);
    offsets = malloc((size_t)bi->table_size * sizeof *offsets);
    cluster = malloc(img->cluster_size);
    if (!raw || !offsets || !cluster) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    r = qcbt_io_read_exact(img->io,
                           raw,
                           (size_t)bi->table_size * 8,
                           bi->table_offset,
                           false,
                           "bitmap table");
    if (r < 0)
        goto out;

    for (i = 0; i < bi->table_size; i++) {
        struct qcow2_bitmap_table_entry te;
        uint64_t off;
        uint64_t pos = i * img->cluster_size;
        uint64_t len = pos < want ? want - pos : 0;
        const char *hit;

        if (len > img->cluster_size)
            len = img->cluster_size;
        qcow2_bitmap_table_entry_decode(raw + i * 8, &te);
        if (qcow2_bitmap_table_entry_check(&te, img->cluster_size) < 0) {
            r = qcbt_error_prefix(EINVAL,
                                  "%s: bitmap '%s': table entry %" PRIu64
                                  " (0x%016" PRIx64 ")",
                                  img->io->name,
                                  name,
                                  i,
                                  qcow2_table_get(raw, i));
            goto out;
        }
        off = te.offset;
        if (off == 0) {
            if (te.all_ones && len) {
                r = bitmap_import_fill(bm, pos, len, true, flags);
                if (r < 0)
                    goto out;
            }
            continue;
        }
        hit = hits_metadata_locked(img, off, img->cluster_size);
        if (!hit && overlaps(off,
                             img->cluster_size,
                             bi->table_offset,
                             (uint64_t)bi->table_size * 8))
            hit = "its own bitmap table";
        if (!hit && overlaps(off,
                             img->cluster_size,
                             img->st.bitmaps.ext.bitmap_directory_offset,
                             img->st.bitmaps.ext.bitmap_directory_size))
            hit = "the bitmap directory";
        if (hit) {
            r = qcbt_error(EINVAL,
                           "%s: bitmap '%s': data cluster 0x%" PRIx64
                           " overlaps %s",
                           img->io->name,
                           name,
                           off,
                           hit);
            goto out;
        }
        offsets[n_off++] = off;
        if (len == 0)
            continue;
        /* Never read a short read or EOF as "clean". */
        r = qcbt_io_read_exact(img->io,
                               cluster,
                               len,
                               off,
                               false,
                               "bitmap data cluster");
        if (r < 0)
            goto out;
        r = bitmap_import(bm, pos, cluster, len, flags);
        if (r < 0)
            goto out;
    }

    /* One data cluster shared by two entries is corruption. */
    qsort(offsets, n_off, sizeof *offsets, cmp_u64);
    for (i = 1; i < n_off; i++) {
        if (offsets[i] == offsets[i - 1]) {
            r = qcbt_error(EINVAL,
                           "%s: bitmap '%s': data cluster 0x%" PRIx64
                           " is used twice",
                           img->io->name,
                           name,
                           offsets[i]);
            goto out;
        }
    }
    *out = bm;
    bm = NULL;
    r = 0;

out:
    bitmap_free(bm);
    free(raw);
    free(offsets);
    free(cluster);
    return r;
}

int
qcow2_bitmap_load_data(struct qcow2_image *img,
                       const struct qcow2_bitmap_info *bi,
                       unsigned flags,
                       struct bitmap **out)
{
    int r;

    qcow2_lock(img);
    r = load_data_locked(img, bi, flags, out);
    qcow2_unlock(img);
    return r;
}

/* qcbt: changing the bitmap directory of an existing qcow2 image, as
 * `qemu-img bitmap --add/--remove/--clear/--enable/--disable` does
 * (qcow2.txt "Bitmaps extension", "Bitmap directory"; see
 * qcow2-store.h for the order of the writes).
 *
 * Bitmaps the operation does not touch keep their tables and data where
 * they are; only their directory entries are copied into the new
 * directory.  The directory is always written to new clusters, never
 * updated in place.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "error.h"
#include "qcow2-bitmaps.h"
#include "qcow2-store.h"
#include "rounding.h"

struct store {
    struct qcow2_image *img;
    struct qcow2_alloc *alloc;
    uint64_t *old; /* clusters to free once the new directory is live */
    size_t nr_old;
};

static int
add_old(struct store *s, uint64_t off)
{
    void *grown = realloc(s->old, (s->nr_old + 1) * sizeof *s->old);

    if (!grown)
        return qcbt_error(ENOMEM, "out of memory");
    s->old = grown;
    s->old[s->nr_old++] = off;
    return 0;
}

/* Queue the table and data clusters of bitmap BI for freeing.  Data
 * cluster entries that fail the table entry rules are not followed (a
 * leak, never a wrong free).
 */
static int
queue_bitmap_clusters(struct store *s, const struct qcow2_bitmap_info *bi)
{
    uint64_t cs = s->img->cluster_size;
    uint64_t bytes = (uint64_t)bi->table_size * 8, off, i;
    struct qcow2_bitmap_table_entry te;
    unsigned char *t;
    int r;

    t = malloc(bytes ? bytes : 1);
    if (!t)
        return qcbt_error(ENOMEM, "out of memory");
    r = qcbt_io_read_exact(s->img->io,
                           t,
                           bytes,
                           bi->table_offset,
                           false,
                           "bitmap table");
    for (i = 0; r == 0 && i < bi->table_size; i++) {
        qcow2_bitmap_table_entry_decode(t + i * 8, &te);
        if (qcow2_bitmap_table_entry_check(&te, cs) < 0) {
            qcbt_error_clear();
            continue;
        }
        if (te.offset)
            r = add_old(s, te.offset);
    }
    free(t);
    for (off = 0; r == 0 && off < bytes; off += cs)
        r = add_old(s, bi->table_offset + off);
    return r;
}

/* Write the bitmap table of N entries at OFFSET, in clusters already
 * reserved: entry k points at DATA[k] (0: a zero cluster), all zero
 * (an empty bitmap) when DATA is NULL. */
static int
write_table(struct store *s, uint64_t n, uint64_t offset, const uint64_t *data)
{
    uint64_t cs = s->img->cluster_size;
    uint64_t clusters = DIV_ROUND_UP(n * 8, cs), k;
    struct qcow2_bitmap_table_entry te = {0};
    unsigned char *t;
    int r;

    t = calloc(clusters, cs);
    if (!t)
        return qcbt_error(ENOMEM, "out of memory");
    for (k = 0; data && k < n; k++) {
        te.offset = data[k];
        qcow2_bitmap_table_entry_encode(&te, t + k * 8);
    }
    r = qcbt_io_write_exact(s->img->io,
                            t,
                            clusters * cs,
                            offset,
                            "bitmap table");
    free(t);
    return r;
}

static bool
is_zero(const unsigned char *p, size_t len)
{
    return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
}

/* Reserve a data cluster for every cluster of BM's serialized data that
 * is not all zero (QEMU stores zero clusters as table entry 0 and never
 * uses the all-ones flag); *data gets the N offsets (0: none). */
static int
reserve_data(struct store *s,
             const struct bitmap *bm,
             uint64_t n,
             unsigned char *buf,
             uint64_t **data)
{
    uint64_t cs = s->img->cluster_size, k;
    int r = 0;

    *data = calloc(n ? n : 1, sizeof **data);
    if (!*data)
        return qcbt_error(ENOMEM, "out of memory");
    for (k = 0; r == 0 && k < n; k++) {
        r = bitmap_export(bm, k * cs, buf, cs, 0);
        if (r == 0 && !is_zero(buf, cs))
            r = qcow2_alloc_clusters(s->alloc, 1, &(*data)[k]);
    }
    return r;
}

static int
write_data(struct store *s,
           const struct bitmap *bm,
           uint64_t n,
           unsigned char *buf,
           const uint64_t *data)
{
    uint64_t cs = s->img->cluster_size, k;
    int r = 0;

    for (k = 0; r == 0 && k < n; k++) {
        if (!data[k])
            continue;
        r = bitmap_export(bm, k * cs, buf, cs, 0);
        if (r == 0)
            r = qcbt_io_write_exact(s->img->io,
                                    buf,
                                    cs,
                                    data[k],
                                    "bitmap data");
    }
    return r;
}

static bool
extension_before_bitmaps(uint32_t type)
{
    /* QEMU's qcow2_update_header() order: backing format, data file,
     * encryption, feature names, bitmaps, then unknown extensions. */
    return type == QCOW2_EXT_BACKING_FMT || type == QCOW2_EXT_DATA_FILE ||
           type == QCOW2_EXT_CRYPTO || type == QCOW2_EXT_FEATURES;
}

static void
put_bitmaps_ext(unsigned char *p, const struct qcow2_bitmaps_ext *be)
{
    struct qcow2_header_ext e = {QCOW2_EXT_BITMAPS, QCOW2_BITMAPS_EXT_SIZE};

    qcow2_header_ext_encode(&e, p);
    qcow2_bitmaps_ext_encode(be, p + QCOW2_HEADER_EXT_SIZE);
}

/* Point the header at the new directory (NB == 0: no bitmaps extension)
 * with one write of the bytes of cluster 0 that change, and set the
 * autoclear bits to what they now mean.  The extensions other than
 * bitmaps and the backing file name are kept byte for byte.  The image's
 * mutable state follows the header: the caller holds img->st.lock.
 */
static int
switch_header_locked(struct qcow2_image *img,
                     const struct qcow2_bitmaps_ext *be)
{
    uint64_t cs = img->cluster_size, off, end, pos, sz, first, last;
    struct qcow2_header h;
    struct qcow2_header_ext e;
    unsigned char *old, *new;
    bool placed = false;
    int r;

    old = malloc(cs);
    new = calloc(1, cs);
    if (!old || !new) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    r = qcbt_io_read_exact(img->io, old, cs, 0, true, "header cluster");
    if (r < 0)
        goto out;
    r = qcow2_header_decode(old, cs, &h);
    if (r < 0)
        goto out;
    memcpy(new, old, h.header_length);
    end = h.backing_file_offset ? h.backing_file_offset : cs;
    pos = h.header_length;
    for (off = h.header_length; off + QCOW2_HEADER_EXT_SIZE <= end; off += sz) {
        qcow2_header_ext_decode(old + off, &e);
        if (e.type == QCOW2_EXT_END)
            break;
        r = qcow2_header_ext_check(&e, off, end);
        if (r < 0)
            goto out;
        sz = qcow2_header_ext_size(e.len);
        if (e.type == QCOW2_EXT_BITMAPS ||
            (be->nb_bitmaps && !placed && !extension_before_bitmaps(e.type))) {
            if (be->nb_bitmaps && !placed) {
                if (pos + 32 > cs)
                    goto full;
                put_bitmaps_ext(new + pos, be);
                pos += 32;
                placed = true;
            }
            if (e.type == QCOW2_EXT_BITMAPS)
                continue;
        }
        if (pos + sz > cs)
            goto full;
        memcpy(new + pos, old + off, sz);
        pos += sz;
    }
    if (be->nb_bitmaps && !placed) {
        if (pos + 32 > cs)
            goto full;
        put_bitmaps_ext(new + pos, be);
        pos += 32;
    }
    if (pos + QCOW2_HEADER_EXT_SIZE > cs)
        goto full;
    pos += QCOW2_HEADER_EXT_SIZE; /* the end extension: zeros */
    if (h.backing_file_offset && h.backing_file_size) {
        if (pos + h.backing_file_size > cs)
            goto full;
        memcpy(new + pos, old + h.backing_file_offset, h.backing_file_size);
        h.backing_file_offset = pos;
    }
    /* Bits a writer does not understand must be cleared (qcow2.txt
     * "autoclear_features"); the bitmaps bit says the extension is
     * consistent. */
    h.autoclear_features &= QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_RAW;
    if (be->nb_bitmaps)
        h.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
    else
        h.autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
    qcow2_header_encode(&h, new);

    for (first = 0; first < cs && old[first] == new[first]; first++)
        ;
    if (first == cs)
        goto out; /* nothing changes */
    for (last = cs - 1; old[last] == new[last]; last--)
        ;
    r = qcbt_io_write_exact(img->io,
                            new + first,
                            last - first + 1,
                            first,
                            "header");
    if (r == 0) {
        img->st.autoclear_features = h.autoclear_features;
        img->st.backing_file_offset = h.backing_file_offset;
        img->st.bitmaps.present = be->nb_bitmaps != 0;
        img->st.bitmaps.ext_len = be->nb_bitmaps ? QCOW2_BITMAPS_EXT_SIZE : 0;
        img->st.bitmaps.ext = *be;
    }
    goto out;
full:
    r = qcbt_error(ENOSPC,
                   "%s: the header extensions do not fit in the first "
                   "cluster",
                   img->io->name);
out:
    free(old);
    free(new);
    return r;
}

/* The consistent bitmap NAME of LIST (IMG's bitmaps): qemu-img's
 * refusals of a merge source, then its data.  *out: bitmap_free().
 */
static int
load_from_list(struct qcow2_image *img,
               const struct qcow2_bitmap_list *list,
               const char *name,
               struct bitmap **out)
{
    size_t i;

    for (i = 0; i < list->nr; i++)
        if (strcmp(list->bitmaps[i].name, name) == 0)
            break;
    if (!list->usable)
        return qcbt_error(EINVAL,
                          "%s: bitmaps unusable: %s",
                          img->io->name,
                          list->reason);
    if (i == list->nr)
        return qcbt_error(ENOENT,
                          "%s: bitmap '%s' not found",
                          img->io->name,
                          name);
    if (list->bitmaps[i].status == QCOW2_BITMAP_IN_USE)
        return qcbt_error(EBUSY,
                          "%s: bitmap '%s' is in use (inconsistent)",
                          img->io->name,
                          name);
    if (list->bitmaps[i].status != QCOW2_BITMAP_OK)
        return qcbt_error(EINVAL,
                          "%s: bitmap '%s' is invalid: %s",
                          img->io->name,
                          name,
                          list->bitmaps[i].reason);
    return qcow2_bitmap_load_data(img, &list->bitmaps[i], 0, out);
}

static const char *const op_names[] = {
    [QCOW2_BITMAP_ADD] = "adding",
    [QCOW2_BITMAP_REMOVE] = "removing",
    [QCOW2_BITMAP_CLEAR] = "clearing",
    [QCOW2_BITMAP_ENABLE] = "enabling",
    [QCOW2_BITMAP_DISABLE] = "disabling",
    [QCOW2_BITMAP_MERGE] = "merging into",
};

/* One change, under img->st.lock (the caller holds it). */
static int
change_locked(struct qcow2_image *img,
              enum qcow2_bitmap_op op,
              const char *name,
              unsigned gbits,
              bool disabled,
              const struct bitmap *src,
              const char *src_name)
{
    struct store s = {.img = img};
    struct qcow2_bitmap_list *list = NULL;
    struct qcow2_bitmap_dir_entry *ents = NULL;
    struct qcow2_bitmaps_ext be = {0};
    const struct qcow2_bitmaps_ext oldext = img->st.bitmaps.ext;
    uint64_t cs = img->cluster_size, dir_size = 0, dir_off = 0, off;
    uint64_t dir_clusters;
    bool new_table = false;
    struct bitmap *merged = NULL, *own_src = NULL;
    uint64_t *data = NULL;
    unsigned char *cbuf = NULL;
    unsigned char *dir = NULL;
    size_t nr = 0, i, idx = SIZE_MAX, len = strlen(name);
    bool ignore_old;
    int64_t w;
    int r;

    /* A source in IMG itself: the bitmaps are loaded (and the L2 tables
     * walked) once for both, the source's refusals first as before. */
    if (src_name) {
        r = qcow2_bitmaps_load(img, &list);
        if (r == 0)
            r = load_from_list(img, list, src_name, &own_src);
        if (r < 0)
            goto out;
        src = own_src;
    }
    if (img->hdr.version < 3) {
        r = qcbt_error(ENOTSUP,
                       "%s: version 2 qcow2 images cannot hold "
                       "persistent bitmaps (use 'qemu-img amend -o "
                       "compat=1.1')",
                       img->io->name);
        goto out;
    }
    r = qcow2_bitmap_name_check(name, len);
    if (r < 0) {
        r = qcbt_error_prefix(-r, "%s: bitmap name", img->io->name);
        goto out;
    }
    if (!list) {
        r = qcow2_bitmaps_load(img, &list);
        if (r < 0)
            goto out;
    }
    /* A bitmaps extension without the autoclear bit was left by a program
     * that does not know bitmaps: QEMU drops it, and so do we (its
     * clusters are leaked, as QEMU leaks them). */
    ignore_old = list->present &&
                 !(img->st.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS);
    if (!ignore_old && !list->usable) {
        r = qcbt_error(EINVAL,
                       "%s: cannot change bitmaps: %s",
                       img->io->name,
                       list->reason);
        goto out;
    }
    if (!ignore_old)
        nr = list->nr;
    ents = calloc(nr + 1, sizeof *ents);
    if (!ents) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    for (i = 0; i < nr; i++) {
        const struct qcow2_bitmap_info *bi = &list->bitmaps[i];

        if (bi->status == QCOW2_BITMAP_INVALID) {
            r = qcbt_error(EINVAL,
                           "%s: cannot change bitmaps: bitmap '%s' is "
                           "invalid: %s",
                           img->io->name,
                           bi->name,
                           bi->reason);
            goto out;
        }
        ents[i] = (struct qcow2_bitmap_dir_entry){
            .bitmap_table_offset = bi->table_offset,
            .bitmap_table_size = bi->table_size,
            .flags = bi->flags,
            .type = bi->type,
            .granularity_bits = bi->granularity_bits,
            .name_size = (uint16_t)strlen(bi->name),
            .name = bi->name,
        };
        if (strcmp(bi->name, name) == 0)
            idx = i;
    }

    if (op == QCOW2_BITMAP_ADD && idx != SIZE_MAX) {
        r = qcbt_error(EEXIST,
                       "%s: bitmap '%s' already exists",
                       img->io->name,
                       name);
        goto out;
    }
    if (op != QCOW2_BITMAP_ADD && idx == SIZE_MAX) {
        r = qcbt_error(ENOENT,
                       "%s: bitmap '%s' not found",
                       img->io->name,
                       name);
        goto out;
    }
    if (op != QCOW2_BITMAP_ADD && op != QCOW2_BITMAP_REMOVE &&
        (ents[idx].flags & QCOW2_BME_FLAG_IN_USE)) {
        r = qcbt_error(EBUSY,
                       "%s: bitmap '%s' is in use (inconsistent): it can "
                       "only be removed",
                       img->io->name,
                       name);
        goto out;
    }
    if (op == QCOW2_BITMAP_ADD) {
        if (gbits == 0)
            gbits = qcow2_bitmap_default_gbits(cs);
        if (gbits < QCOW2_BME_MIN_GRANULARITY_BITS ||
            gbits > QCOW2_BME_MAX_GRANULARITY_BITS) {
            r = qcbt_error(EINVAL,
                           "granularity must be a power of two from 512 "
                           "bytes to 2 GiB");
            goto out;
        }
        if (nr >= QCOW2_MAX_BITMAPS) {
            r = qcbt_error(ENOSPC,
                           "%s: the image already has %d bitmaps",
                           img->io->name,
                           QCOW2_MAX_BITMAPS);
            goto out;
        }
        idx = nr++;
        ents[idx] = (struct qcow2_bitmap_dir_entry){
            .bitmap_table_size = (uint32_t)qcow2_bitmap_table_size(img, gbits),
            .flags = disabled ? 0 : QCOW2_BME_FLAG_AUTO,
            .type = QCOW2_BME_TYPE_DIRTY_TRACKING,
            .granularity_bits = (uint8_t)gbits,
            .name_size = (uint16_t)len,
            .name = name,
        };
        /* Checked with a placeholder offset: size limits first, before
         * anything is allocated. */
        ents[idx].bitmap_table_offset = cs;
        if (qcow2_bitmap_table_size(img, gbits) > QCOW2_BME_MAX_TABLE_SIZE)
            ents[idx].bitmap_table_size = QCOW2_BME_MAX_TABLE_SIZE + 1;
        r = qcow2_bitmap_dir_entry_check(&ents[idx], cs, img->size);
        if (r < 0) {
            r = qcbt_error_prefix(-r, "%s: bitmap '%s'", img->io->name, name);
            goto out;
        }
    }

    r = qcow2_alloc_new(img, &s.alloc);
    if (r < 0)
        goto out;

    /* Every cluster is reserved before anything is written: a refusal
     * (past the largest refcount table) leaves the file untouched. */
    switch (op) {
    case QCOW2_BITMAP_ADD:
        new_table = true;
        if (!src)
            break;
        /* qcow2_bitmap_add_merged(): the new bitmap holds SRC. */
        if (src->size != img->size)
            r = qcbt_error(EINVAL,
                           "%s: bitmaps are of different sizes (image "
                           "size is %" PRIu64 ", source size is %" PRIu64 ")",
                           img->io->name,
                           img->size,
                           src->size);
        if (r == 0)
            r = bitmap_new(img->size, 1ULL << gbits, &merged);
        if (r == 0)
            r = bitmap_merge_into(merged, src);
        cbuf = malloc(cs);
        if (r == 0 && !cbuf)
            r = qcbt_error(ENOMEM, "out of memory");
        break;
    case QCOW2_BITMAP_CLEAR:
        new_table = true;
        r = queue_bitmap_clusters(&s, &list->bitmaps[idx]);
        break;
    case QCOW2_BITMAP_REMOVE:
        r = queue_bitmap_clusters(&s, &list->bitmaps[idx]);
        memmove(&ents[idx], &ents[idx + 1], (nr - idx - 1) * sizeof *ents);
        nr--;
        break;
    case QCOW2_BITMAP_ENABLE:
        ents[idx].flags |= QCOW2_BME_FLAG_AUTO;
        break;
    case QCOW2_BITMAP_DISABLE:
        ents[idx].flags &= ~QCOW2_BME_FLAG_AUTO;
        break;
    case QCOW2_BITMAP_MERGE:
        /* QEMU's rule (bdrv_merge_dirty_bitmap): equal sizes; the
         * granularities may differ (any overlap marks a bit). */
        if (src->size != img->size) {
            r = qcbt_error(EINVAL,
                           "%s: bitmaps are of different sizes (destination "
                           "size is %" PRIu64 ", source size is %" PRIu64 ")",
                           img->io->name,
                           img->size,
                           src->size);
            break;
        }
        r = qcow2_bitmap_load_data(img, &list->bitmaps[idx], 0, &merged);
        if (r == 0)
            r = bitmap_merge_into(merged, src);
        if (r == 0)
            r = queue_bitmap_clusters(&s, &list->bitmaps[idx]);
        new_table = r == 0;
        cbuf = malloc(cs);
        if (r == 0 && !cbuf)
            r = qcbt_error(ENOMEM, "out of memory");
        break;
    }
    if (r == 0 && merged)
        r = reserve_data(&s, merged, ents[idx].bitmap_table_size, cbuf, &data);
    if (r == 0 && new_table)
        r = qcow2_alloc_clusters(
            s.alloc,
            DIV_ROUND_UP((uint64_t)ents[idx].bitmap_table_size * 8, cs),
            &ents[idx].bitmap_table_offset);
    if (r < 0)
        goto out;

    /* The new directory, in new clusters. */
    for (i = 0; i < nr; i++)
        dir_size += qcow2_bitmap_dir_entry_size(&ents[i]);
    if (dir_size > QCOW2_MAX_BITMAP_DIR_SIZE) {
        r = qcbt_error(ENOSPC,
                       "%s: the bitmap directory would exceed %llu bytes",
                       img->io->name,
                       (unsigned long long)QCOW2_MAX_BITMAP_DIR_SIZE);
        goto out;
    }
    dir_clusters = DIV_ROUND_UP(dir_size, cs);
    if (nr) {
        r = qcow2_alloc_clusters(s.alloc, dir_clusters, &dir_off);
        if (r < 0)
            goto out;
        dir = calloc(dir_clusters, cs);
        if (!dir) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        for (off = 0, i = 0; i < nr; i++, off += (uint64_t)w) {
            w = qcow2_bitmap_dir_entry_encode(&ents[i],
                                              dir + off,
                                              dir_size - off);
            if (w < 0) {
                r = qcbt_error(EIO, "encoding the bitmap directory");
                goto out;
            }
        }
    }
    if (merged)
        r = write_data(&s, merged, ents[idx].bitmap_table_size, cbuf, data);
    if (r == 0 && new_table)
        r = write_table(&s,
                        ents[idx].bitmap_table_size,
                        ents[idx].bitmap_table_offset,
                        data);
    if (r == 0 && nr)
        r = qcbt_io_write_exact(img->io,
                                dir,
                                dir_clusters * cs,
                                dir_off,
                                "bitmap directory");
    if (r < 0)
        goto out;
    if (!ignore_old && list->present)
        for (off = 0; off < oldext.bitmap_directory_size; off += cs) {
            r = add_old(&s, oldext.bitmap_directory_offset + off);
            if (r < 0)
                goto out;
        }

    /* New clusters and their refcounts durable, then the switch. */
    r = qcow2_alloc_commit(s.alloc);
    if (r < 0)
        goto out;
    be.nb_bitmaps = (uint32_t)nr;
    be.bitmap_directory_size = dir_size;
    be.bitmap_directory_offset = dir_off;
    r = switch_header_locked(img, &be);
    if (r == 0)
        r = qcbt_io_flush(img->io);
    if (r < 0)
        goto out;

    /* Old clusters last: a failure from here on only leaks. */
    for (i = 0; r == 0 && i < s.nr_old; i++)
        r = qcow2_free_cluster(s.alloc, s.old[i]);
    if (r == 0)
        r = qcbt_io_flush(img->io);
    if (r < 0)
        r = qcbt_error_prefix(-r,
                              "bitmap '%s' changed, but its old clusters "
                              "may be leaked ('qemu-img check -r leaks' "
                              "frees them)",
                              name);
out:
    if (r < 0 && qcbt_error_get()[0] == '\0')
        r = qcbt_error(-r, "%s bitmap '%s' failed", op_names[op], name);
    free(dir);
    free(data);
    free(cbuf);
    bitmap_free(merged);
    bitmap_free(own_src);
    free(ents);
    free(s.old);
    qcow2_alloc_free(s.alloc);
    qcow2_bitmap_list_free(list);
    return r;
}

static int
change(struct qcow2_image *img,
       enum qcow2_bitmap_op op,
       const char *name,
       unsigned gbits,
       bool disabled,
       const struct bitmap *src,
       const char *src_name)
{
    int r;

    qcow2_lock(img);
    r = change_locked(img, op, name, gbits, disabled, src, src_name);
    qcow2_unlock(img);
    return r;
}

int
qcow2_bitmap_modify(struct qcow2_image *img,
                    enum qcow2_bitmap_op op,
                    const char *name,
                    unsigned gbits,
                    bool disabled)
{
    if (op == QCOW2_BITMAP_MERGE)
        return qcbt_error(EINVAL, "merge needs a source bitmap");
    return change(img, op, name, gbits, disabled, NULL, NULL);
}

int
qcow2_bitmap_merge(struct qcow2_image *img,
                   const char *name,
                   const struct bitmap *src)
{
    return change(img, QCOW2_BITMAP_MERGE, name, 0, false, src, NULL);
}

int
qcow2_bitmap_merge_named(struct qcow2_image *img,
                         const char *name,
                         const char *src_name)
{
    return change(img, QCOW2_BITMAP_MERGE, name, 0, false, NULL, src_name);
}

int
qcow2_bitmap_add_merged(struct qcow2_image *img,
                        const char *name,
                        unsigned gbits,
                        bool disabled,
                        const struct bitmap *src)
{
    return change(img, QCOW2_BITMAP_ADD, name, gbits, disabled, src, NULL);
}

int
qcow2_bitmap_load_named(struct qcow2_image *img,
                        const char *name,
                        struct bitmap **out)
{
    struct qcow2_bitmap_list *list = NULL;
    int r;

    /* The list and the data from one state of the image. */
    qcow2_lock(img);
    r = qcow2_bitmaps_load(img, &list);
    if (r == 0)
        r = load_from_list(img, list, name, out);
    qcow2_unlock(img);
    qcow2_bitmap_list_free(list);
    return r;
}

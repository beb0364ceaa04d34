/* qcbt: qcow2 open: header, header extensions, L1 table.
 *
 * Validation follows what QEMU's qcow2_do_open() enforces (qcow2-format.md
 * sections 1-4) plus the checks it misses (reliability-catalogue.md 3(a)).
 * Nothing read from the image is trusted before it has been checked against
 * a named limit, and every size computation is overflow-checked.  The
 * structures are decoded and their rules checked by the format layer
 * (qcow2-format.c); this file adds what needs the image as a whole (the
 * file size, the order of the extensions, duplicates, the backing name).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "minmax.h"
#include "qcow2.h"
#include "qcow2-internal.h"
#include "qcow2-metamap.h"
#include "rounding.h"

int
qcow2_parse_header(const void *buf,
                   size_t len,
                   uint64_t file_size,
                   struct qcow2_header *hdr)
{
    int r;

    memset(hdr, 0, sizeof *hdr);
    if (len < QCOW2_HEADER_V2_LENGTH || file_size < QCOW2_HEADER_V2_LENGTH)
        return qcbt_error(EINVAL,
                          "image is too small to be qcow2 (%" PRIu64 " bytes)",
                          file_size);
    r = qcow2_header_decode(buf, MIN((uint64_t)len, file_size), hdr);
    if (r < 0)
        return r;
    return qcow2_header_check(hdr, file_size);
}

const char *
qcow2_feature_name(const struct qcow2_image *img, uint8_t type, uint8_t bit)
{
    size_t i;

    for (i = 0; img && i < img->nr_features; i++)
        if (img->features[i].type == type && img->features[i].bit == bit &&
            img->features[i].name[0])
            return img->features[i].name;
    for (i = 0; i < qcow2_nr_known_features; i++)
        if (qcow2_known_features[i].type == type &&
            qcow2_known_features[i].bit == bit)
            return qcow2_known_features[i].name;
    return NULL;
}

static char *
dup_string(const unsigned char *p, size_t len)
{
    char *s = malloc(len + 1);

    if (s) {
        memcpy(s, p, len);
        s[len] = '\0';
    }
    return s;
}

/* Walk the header extensions in cluster 0 (qcow2.txt "Header
 * extensions"): from header_length up to the backing file name, or the end
 * of the cluster.  The walk is bounded by the cluster; every length is
 * checked before it is used.
 */
static int
parse_extensions(struct qcow2_image *img, const unsigned char *c0)
{
    const struct qcow2_header *hdr = &img->hdr;
    uint64_t off = hdr->header_length;
    uint64_t end =
        hdr->backing_file_offset ? hdr->backing_file_offset : img->cluster_size;
    bool seen_fmt = false, seen_features = false, seen_bitmaps = false;
    bool seen_crypto = false, seen_data_file = false;

    while (off + QCOW2_HEADER_EXT_SIZE <= end) {
        struct qcow2_header_ext ext;
        const unsigned char *data;
        uint32_t type, len;
        int r;

        qcow2_header_ext_decode(c0 + off, &ext);
        type = ext.type;
        len = ext.len;
        if (type == QCOW2_EXT_END)
            return 0;
        r = qcow2_header_ext_check(&ext, off, end);
        if (r < 0)
            return r;
        data = c0 + off + QCOW2_HEADER_EXT_SIZE;

        switch (type) {
        case QCOW2_EXT_BACKING_FMT:
            if (seen_fmt)
                return qcbt_error(EINVAL,
                                  "duplicate backing format header "
                                  "extension");
            seen_fmt = true;
            if (len > QCOW2_MAX_BACKING_FMT)
                return qcbt_error(EINVAL,
                                  "backing format name too long "
                                  "(%" PRIu32 " bytes)",
                                  len);
            if (memchr(data, '\0', len))
                return qcbt_error(EINVAL,
                                  "backing format name contains a "
                                  "NUL byte");
            img->backing_fmt = dup_string(data, len);
            if (!img->backing_fmt)
                return qcbt_error(ENOMEM, "out of memory");
            break;

        case QCOW2_EXT_FEATURES: {
            size_t i, n = len / QCOW2_FEATURE_NAME_SIZE;

            if (seen_features)
                return qcbt_error(EINVAL, "duplicate feature name table");
            seen_features = true;
            img->features = calloc(n ? n : 1, sizeof *img->features);
            if (!img->features)
                return qcbt_error(ENOMEM, "out of memory");
            /* Entries no lookup can match (bad type or bit) are
             * skipped, as QEMU ignores them. */
            for (i = 0; i < n; i++) {
                struct qcow2_feature_name *f = &img->features[img->nr_features];

                qcow2_feature_name_decode(data + i * QCOW2_FEATURE_NAME_SIZE,
                                          f);
                if (qcow2_feature_name_check(f) < 0)
                    qcbt_error_clear();
                else
                    img->nr_features++;
            }
            break;
        }

        case QCOW2_EXT_BITMAPS:
            if (seen_bitmaps)
                return qcbt_error(EINVAL,
                                  "duplicate bitmaps header "
                                  "extension");
            seen_bitmaps = true;
            img->st.bitmaps.present = true;
            img->st.bitmaps.ext_len = len;
            /* Its rules are checked by qcow2_bitmaps_load(). */
            if (len >= QCOW2_BITMAPS_EXT_SIZE)
                qcow2_bitmaps_ext_decode(data, &img->st.bitmaps.ext);
            break;

        case QCOW2_EXT_CRYPTO:
            if (seen_crypto)
                return qcbt_error(EINVAL,
                                  "duplicate encryption header "
                                  "extension");
            seen_crypto = true;
            /* Only valid with LUKS, which is refused earlier. */
            return qcbt_error(EINVAL,
                              "encryption header extension found in "
                              "an unencrypted image");

        case QCOW2_EXT_DATA_FILE:
            if (seen_data_file)
                return qcbt_error(EINVAL,
                                  "duplicate data file header "
                                  "extension");
            seen_data_file = true;
            if (len == 0 || memchr(data, '\0', len))
                return qcbt_error(EINVAL, "invalid external data file name");
            img->data_file_name = dup_string(data, len);
            if (!img->data_file_name)
                return qcbt_error(ENOMEM, "out of memory");
            break;

        default:
            /* Recorded for qcbt info, up to a bound: a 2 MiB header
             * cluster can hold 262,000 empty extensions.
             */
            if (img->nr_unknown_exts < QCOW2_MAX_UNKNOWN_EXTS) {
                if (img->nr_unknown_exts == 0)
                    img->unknown_exts = malloc(QCOW2_MAX_UNKNOWN_EXTS *
                                               sizeof *img->unknown_exts);
                if (!img->unknown_exts)
                    return qcbt_error(ENOMEM, "out of memory");
                img->unknown_exts[img->nr_unknown_exts].type = type;
                img->unknown_exts[img->nr_unknown_exts].len = len;
                img->nr_unknown_exts++;
            }
            break;
        }
        off += qcow2_header_ext_size(len);
    }
    /* No end marker before the limit: QEMU accepts this too. */
    return 0;
}

static int
check_incompatible(struct qcow2_image *img)
{
    uint64_t unknown = img->hdr.incompatible_features & ~QCOW2_INCOMPAT_KNOWN;
    char list[512] = "";
    size_t used = 0;
    unsigned bit;

    if (!unknown)
        return 0;
    for (bit = 0; bit < 64; bit++) {
        const char *name;
        char esc[64];

        if (!(unknown & (1ULL << bit)))
            continue;
        name = qcow2_feature_name(img, 0, bit);
        if (name)
            qcbt_escape(esc, sizeof esc, name, strlen(name));
        used += snprintf(list + used,
                         used < sizeof list ? sizeof list - used : 0,
                         "%sbit %u%s%s%s",
                         used ? ", " : "",
                         bit,
                         name ? " (" : "",
                         name ? esc : "",
                         name ? ")" : "");
        if (used >= sizeof list)
            break;
    }
    return qcbt_error(ENOTSUP, "unsupported incompatible feature: %s", list);
}

/* The lock of the mutable part: recursive (qcow2.h). */
static int
init_state_lock(struct qcow2_image *img)
{
    pthread_mutexattr_t attr;
    int r;

    r = pthread_mutexattr_init(&attr);
    if (r == 0) {
        r = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
        if (r == 0)
            r = pthread_mutex_init(&img->st.lock, &attr);
        pthread_mutexattr_destroy(&attr);
    }
    if (r != 0)
        return qcbt_error(r, "image lock: %s", strerror(r));
    return 0;
}

void
qcow2_lock(struct qcow2_image *img)
{
    pthread_mutex_lock(&img->st.lock);
}

void
qcow2_unlock(struct qcow2_image *img)
{
    pthread_mutex_unlock(&img->st.lock);
}

void
qcow2_get_bitmaps_found(struct qcow2_image *img,
                        struct qcow2_bitmaps_found *out)
{
    qcow2_lock(img);
    *out = img->st.bitmaps;
    qcow2_unlock(img);
}

uint64_t
qcow2_autoclear_features(struct qcow2_image *img)
{
    uint64_t v;

    qcow2_lock(img);
    v = img->st.autoclear_features;
    qcow2_unlock(img);
    return v;
}

int
qcow2_open(struct qcbt_io *io, struct qcow2_image **out)
{
    struct qcow2_image *img;
    unsigned char *c0 = NULL;
    uint64_t c0_len;
    unsigned char *l1raw = NULL;
    size_t l1_bytes, i;
    int r;

    img = calloc(1, sizeof *img);
    if (!img) {
        qcbt_io_free(io);
        return qcbt_error(ENOMEM, "out of memory");
    }
    r = init_state_lock(img);
    if (r < 0) {
        free(img);
        qcbt_io_free(io);
        return r;
    }
    img->io = io;
    img->prealloc_once = (pthread_once_t)PTHREAD_ONCE_INIT;

    /* Read the fixed header first, then the whole of cluster 0. */
    {
        unsigned char h[QCOW2_HEADER_LENGTH];
        uint64_t n = MIN((uint64_t)sizeof h, io->size);

        r = qcbt_io_read_exact(io, h, n, 0, false, "qcow2 header");
        if (r < 0)
            goto fail;
        r = qcow2_parse_header(h, n, io->size, &img->hdr);
        if (r < 0)
            goto fail;
    }
    img->st.autoclear_features = img->hdr.autoclear_features;
    img->st.backing_file_offset = img->hdr.backing_file_offset;
    img->st.refcount_table_offset = img->hdr.refcount_table_offset;
    img->st.refcount_table_clusters = img->hdr.refcount_table_clusters;
    img->cluster_size = 1ULL << img->hdr.cluster_bits;
    img->extended_l2 = img->hdr.incompatible_features & QCOW2_INCOMPAT_EXTL2;
    img->l2_bits = img->hdr.cluster_bits - (img->extended_l2 ? 4 : 3);
    img->l2_entries = 1ULL << img->l2_bits;
    img->subcluster_bits = img->hdr.cluster_bits - (img->extended_l2 ? 5 : 0);
    /* QEMU sizes the guest in whole sectors, rounding down. */
    img->size = ROUND_DOWN(img->hdr.size, 512);

    c0_len = img->cluster_size;
    c0 = malloc(c0_len);
    if (!c0) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto fail;
    }
    r = qcbt_io_read_exact(io, c0, c0_len, 0, true, "qcow2 header cluster");
    if (r < 0)
        goto fail;

    r = parse_extensions(img, c0);
    if (r < 0)
        goto fail;
    r = check_incompatible(img);
    if (r < 0)
        goto fail;

    if (img->hdr.backing_file_offset && img->hdr.backing_file_size) {
        const unsigned char *name = c0 + img->hdr.backing_file_offset;

        if (memchr(name, '\0', img->hdr.backing_file_size)) {
            r = qcbt_error(EINVAL, "backing file name contains a NUL byte");
            goto fail;
        }
        img->backing_name = dup_string(name, img->hdr.backing_file_size);
        if (!img->backing_name) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto fail;
        }
    }
    if (img->hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
        if (img->backing_name &&
            (img->hdr.autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW)) {
            r = qcbt_error(EINVAL,
                           "an image with a raw external data file "
                           "cannot have a backing file");
            goto fail;
        }
    } else {
        free(img->data_file_name);
        img->data_file_name = NULL;
    }
    free(c0);
    c0 = NULL;

    /* The active L1 table, converted to host order once. */
    l1_bytes = (size_t)img->hdr.l1_size * 8;
    img->l1 = calloc(img->hdr.l1_size ? img->hdr.l1_size : 1, 8);
    l1raw = malloc(l1_bytes ? l1_bytes : 1);
    if (!img->l1 || !l1raw) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto fail;
    }
    r = qcbt_io_read_exact(io,
                           l1raw,
                           l1_bytes,
                           img->hdr.l1_table_offset,
                           true,
                           "L1 table");
    if (r < 0)
        goto fail;
    for (i = 0; i < img->hdr.l1_size; i++)
        img->l1[i] = qcow2_table_get(l1raw, i);
    free(l1raw);
    l1raw = NULL;

    r = qcow2_l2_cache_new(img);
    if (r < 0)
        goto fail;

    /* With an external data file, data_io stays NULL until the caller
     * attaches it: reading guest data from the qcow2 file would be wrong. */
    img->data_io =
        (img->hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) ? NULL : io;
    *out = img;
    return 0;

fail:
    free(c0);
    free(l1raw);
    qcow2_close(img);
    return r;
}

void
qcow2_set_data_file(struct qcow2_image *img, struct qcbt_io *data_io)
{
    if (img->data_io && img->data_io != img->io)
        qcbt_io_free(img->data_io);
    img->data_io = data_io;
}

void
qcow2_close(struct qcow2_image *img)
{
    if (!img)
        return;
    qcow2_l2_cache_free(img);
    qcow2_metamap_free(img->st.bm_map);
    pthread_mutex_destroy(&img->st.lock);
    if (img->data_io && img->data_io != img->io)
        qcbt_io_free(img->data_io);
    qcbt_io_free(img->io);
    free(img->l1);
    free(img->backing_name);
    free(img->backing_fmt);
    free(img->data_file_name);
    free(img->features);
    free(img->unknown_exts);
    free(img);
}

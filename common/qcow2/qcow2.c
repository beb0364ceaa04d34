/* qcbt: qcow2 open: header, header extensions, L1 table.
 *
 * Validation follows what QEMU's qcow2_do_open() enforces (qcow2-format.md
 * sections 1-4) plus the checks it misses (reliability-catalogue.md 3(a)).
 * Nothing read from the image is trusted before it has been checked against
 * a named limit, and every size computation is overflow-checked.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "byteorder.h"
#include "checked-overflow.h"
#include "error.h"
#include "isaligned.h"
#include "minmax.h"
#include "qcow2.h"
#include "qcow2-internal.h"
#include "qcow2-metamap.h"
#include "rounding.h"

#define QCOW2_V2_HEADER_LENGTH QCOW2_HEADER_V2_LENGTH
#define QCOW2_V3_HEADER_LENGTH QCOW2_HEADER_V3_LENGTH

int
qcow2_parse_header(const void *buf,
                   size_t len,
                   uint64_t file_size,
                   struct qcow2_header *hdr)
{
    const unsigned char *p = buf;
    uint64_t cluster_size, l1_bytes, l1_needed, per_l1, end;
    unsigned l2_bits;

    memset(hdr, 0, sizeof *hdr);
    if (len < QCOW2_V2_HEADER_LENGTH || file_size < QCOW2_V2_HEADER_LENGTH)
        return qcbt_error(EINVAL,
                          "image is too small to be qcow2 (%" PRIu64 " bytes)",
                          file_size);
    if (get_be32(p) != QCOW2_MAGIC)
        return qcbt_error(EINVAL,
                          "not a qcow2 image (bad magic 0x%08x)",
                          get_be32(p));

    hdr->version = get_be32(p + 4);
    hdr->backing_file_offset = get_be64(p + 8);
    hdr->backing_file_size = get_be32(p + 16);
    hdr->cluster_bits = get_be32(p + 20);
    hdr->size = get_be64(p + 24);
    hdr->crypt_method = get_be32(p + 32);
    hdr->l1_size = get_be32(p + 36);
    hdr->l1_table_offset = get_be64(p + 40);
    hdr->refcount_table_offset = get_be64(p + 48);
    hdr->refcount_table_clusters = get_be32(p + 56);
    hdr->nb_snapshots = get_be32(p + 60);
    hdr->snapshots_offset = get_be64(p + 64);

    if (hdr->version != 2 && hdr->version != 3)
        return qcbt_error(ENOTSUP,
                          "unsupported qcow2 version %" PRIu32,
                          hdr->version);
    if (hdr->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        hdr->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
        return qcbt_error(EINVAL,
                          "unsupported cluster size: 2^%" PRIu32
                          " (cluster_bits must be %d..%d)",
                          hdr->cluster_bits,
                          QCOW2_MIN_CLUSTER_BITS,
                          QCOW2_MAX_CLUSTER_BITS);
    cluster_size = 1ULL << hdr->cluster_bits;

    if (hdr->version == 2) {
        hdr->refcount_order = 4;
        hdr->header_length = QCOW2_V2_HEADER_LENGTH;
    } else {
        if (len < QCOW2_V3_HEADER_LENGTH || file_size < QCOW2_V3_HEADER_LENGTH)
            return qcbt_error(EINVAL, "qcow2 v3 header is truncated");
        hdr->incompatible_features = get_be64(p + 72);
        hdr->compatible_features = get_be64(p + 80);
        hdr->autoclear_features = get_be64(p + 88);
        hdr->refcount_order = get_be32(p + 96);
        hdr->header_length = get_be32(p + 100);
        if (hdr->header_length < QCOW2_V3_HEADER_LENGTH)
            return qcbt_error(EINVAL,
                              "qcow2 header too short (header_length "
                              "%" PRIu32 ")",
                              hdr->header_length);
        if (hdr->header_length > cluster_size)
            return qcbt_error(EINVAL,
                              "qcow2 header_length %" PRIu32
                              " exceeds the cluster size",
                              hdr->header_length);
        if (!IS_ALIGNED(hdr->header_length, 8))
            return qcbt_error(EINVAL,
                              "qcow2 header_length %" PRIu32
                              " is not a multiple of 8",
                              hdr->header_length);
        if (hdr->header_length > QCOW2_V3_HEADER_LENGTH) {
            if (len < QCOW2_V3_HEADER_LENGTH + 1)
                return qcbt_error(EINVAL, "qcow2 header is truncated");
            hdr->compression_type = p[104];
        }
    }
    if (hdr->refcount_order > 6)
        return qcbt_error(EINVAL,
                          "invalid refcount_order %" PRIu32 " (maximum 6)",
                          hdr->refcount_order);

    /* Compression type and its incompatible bit must agree both ways. */
    if (hdr->compression_type > QCOW2_COMPRESSION_ZSTD)
        return qcbt_error(ENOTSUP,
                          "unknown compression type %u",
                          hdr->compression_type);
    if (hdr->compression_type != 0 &&
        !(hdr->incompatible_features & QCOW2_INCOMPAT_COMPRESSION))
        return qcbt_error(EINVAL,
                          "compression type %u without the "
                          "compression-type incompatible bit",
                          hdr->compression_type);
    if (hdr->compression_type == 0 &&
        (hdr->incompatible_features & QCOW2_INCOMPAT_COMPRESSION))
        return qcbt_error(EINVAL,
                          "compression-type incompatible bit set "
                          "with the default (deflate) compression type");
    if ((hdr->incompatible_features & QCOW2_INCOMPAT_EXTL2) &&
        hdr->cluster_bits < 14)
        return qcbt_error(EINVAL,
                          "extended L2 entries need clusters of at "
                          "least 16 KiB (cluster_bits %" PRIu32 ")",
                          hdr->cluster_bits);

    if (hdr->crypt_method > 2)
        return qcbt_error(ENOTSUP,
                          "unknown encryption method %" PRIu32,
                          hdr->crypt_method);
    if (hdr->crypt_method != 0)
        return qcbt_error(ENOTSUP,
                          "encrypted qcow2 images (%s) are not "
                          "supported",
                          hdr->crypt_method == 1 ? "AES" : "LUKS");

    if (hdr->size > (uint64_t)INT64_MAX)
        return qcbt_error(EFBIG,
                          "virtual size %" PRIu64 " is too large",
                          hdr->size);

    /* Backing file name: inside cluster 0, at most 1023 bytes. */
    if (hdr->backing_file_offset) {
        if (hdr->backing_file_offset > cluster_size)
            return qcbt_error(EINVAL,
                              "invalid backing file offset 0x%" PRIx64,
                              hdr->backing_file_offset);
        if (hdr->backing_file_size > QCOW2_MAX_BACKING_NAME ||
            hdr->backing_file_size > cluster_size - hdr->backing_file_offset)
            return qcbt_error(EINVAL,
                              "backing file name too long (%" PRIu32 " bytes)",
                              hdr->backing_file_size);
    }

    /* L1 table: bounded, aligned, large enough for the virtual size. */
    l2_bits = hdr->cluster_bits -
              ((hdr->incompatible_features & QCOW2_INCOMPAT_EXTL2) ? 4 : 3);
    per_l1 = 1ULL << (hdr->cluster_bits + l2_bits); /* <= 2^39 */
    l1_needed = DIV_ROUND_UP(hdr->size, per_l1);
    l1_bytes = (uint64_t)hdr->l1_size * 8;
    if (l1_bytes > QCOW2_MAX_L1_BYTES)
        return qcbt_error(EFBIG,
                          "active L1 table too large (%" PRIu32 " entries)",
                          hdr->l1_size);
    if (hdr->l1_size < l1_needed)
        return qcbt_error(EINVAL,
                          "L1 table is too small (%" PRIu32 " entries, %" PRIu64
                          " needed for the virtual size)",
                          hdr->l1_size,
                          l1_needed);
    if (hdr->l1_size > 0) {
        if (!IS_ALIGNED(hdr->l1_table_offset, cluster_size))
            return qcbt_error(EINVAL,
                              "invalid L1 table offset 0x%" PRIx64
                              " (not cluster aligned)",
                              hdr->l1_table_offset);
        if (ADD_OVERFLOW(hdr->l1_table_offset, l1_bytes, &end) ||
            end > (uint64_t)INT64_MAX)
            return qcbt_error(EINVAL,
                              "invalid L1 table offset 0x%" PRIx64,
                              hdr->l1_table_offset);
        if (hdr->l1_table_offset >= file_size)
            return qcbt_error(EINVAL,
                              "L1 table offset 0x%" PRIx64
                              " is past the end of the file",
                              hdr->l1_table_offset);
    }

    /* Refcount table: only validated (a reader never follows it). */
    if (hdr->refcount_table_clusters == 0)
        return qcbt_error(EINVAL,
                          "image does not contain a reference count "
                          "table");
    if ((uint64_t)hdr->refcount_table_clusters * cluster_size >
        QCOW2_MAX_REFTABLE_BYTES)
        return qcbt_error(EFBIG,
                          "reference count table too large (%" PRIu32
                          " clusters)",
                          hdr->refcount_table_clusters);
    if (!IS_ALIGNED(hdr->refcount_table_offset, cluster_size) ||
        hdr->refcount_table_offset == 0 ||
        hdr->refcount_table_offset >
            (uint64_t)INT64_MAX - QCOW2_MAX_REFTABLE_BYTES)
        return qcbt_error(EINVAL,
                          "invalid reference count table offset 0x%" PRIx64,
                          hdr->refcount_table_offset);

    /* Snapshot table: bounded and aligned (contents are not needed). */
    if (hdr->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
        return qcbt_error(EINVAL,
                          "too many internal snapshots (%" PRIu32 ")",
                          hdr->nb_snapshots);
    if (hdr->nb_snapshots > 0 &&
        (!IS_ALIGNED(hdr->snapshots_offset, cluster_size) ||
         hdr->snapshots_offset > (uint64_t)INT64_MAX))
        return qcbt_error(EINVAL,
                          "invalid snapshot table offset 0x%" PRIx64,
                          hdr->snapshots_offset);
    return 0;
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

    while (off + 8 <= end) {
        uint32_t type = get_be32(c0 + off);
        uint32_t len = get_be32(c0 + off + 4);
        const unsigned char *data;

        off += 8;
        if (type == QCOW2_EXT_END)
            return 0;
        if (len > end - off)
            return qcbt_error(EINVAL,
                              "header extension 0x%08x too large "
                              "(%" PRIu32 " bytes at offset 0x%" PRIx64 ")",
                              type,
                              len,
                              off - 8);
        data = c0 + off;

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
            size_t i, n = len / 48;

            if (seen_features)
                return qcbt_error(EINVAL, "duplicate feature name table");
            seen_features = true;
            img->features = calloc(n ? n : 1, sizeof *img->features);
            if (!img->features)
                return qcbt_error(ENOMEM, "out of memory");
            for (i = 0; i < n; i++) {
                struct qcow2_feature_name *f = &img->features[i];
                f->type = data[i * 48];
                f->bit = data[i * 48 + 1];
                memcpy(f->name, data + i * 48 + 2, 46);
                f->name[46] = '\0';
            }
            img->nr_features = n;
            break;
        }

        case QCOW2_EXT_BITMAPS:
            if (seen_bitmaps)
                return qcbt_error(EINVAL,
                                  "duplicate bitmaps header "
                                  "extension");
            seen_bitmaps = true;
            img->bitmaps.present = true;
            img->bitmaps.ext_len = len;
            if (len >= QCOW2_BITMAPS_EXT_SIZE)
                qcow2_bitmaps_ext_decode(data, &img->bitmaps.ext);
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
        off += ROUND_UP((uint64_t)len, 8);
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
    img->io = io;
    img->prealloc_once = (pthread_once_t)PTHREAD_ONCE_INIT;

    /* Read the fixed header first, then the whole of cluster 0. */
    {
        unsigned char h[QCOW2_V3_HEADER_LENGTH + 8];
        uint64_t n = MIN((uint64_t)sizeof h, io->size);

        r = qcbt_io_read_exact(io, h, n, 0, false, "qcow2 header");
        if (r < 0)
            goto fail;
        r = qcow2_parse_header(h, n, io->size, &img->hdr);
        if (r < 0)
            goto fail;
    }
    img->cluster_size = 1ULL << img->hdr.cluster_bits;
    img->extended_l2 = img->hdr.incompatible_features & QCOW2_INCOMPAT_EXTL2;
    img->l2_bits = img->hdr.cluster_bits - (img->extended_l2 ? 4 : 3);
    img->l2_entries = 1ULL << img->l2_bits;
    img->subcluster_bits = img->hdr.cluster_bits - (img->extended_l2 ? 5 : 0);
    img->csize_shift = 62 - (img->hdr.cluster_bits - 8);
    img->csize_mask = (1ULL << (img->hdr.cluster_bits - 8)) - 1;
    img->coffset_mask = (1ULL << img->csize_shift) - 1;
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
        img->l1[i] = get_be64(l1raw + i * 8);
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
    qcow2_metamap_free(img->bm_map);
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

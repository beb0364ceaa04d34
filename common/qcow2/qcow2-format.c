/* qcbt: the qcow2 on-disk format: decode, encode and validate each
 * structure (see qcow2-format.h).
 *
 * The only file of qcbt that converts the byte order of qcow2 fields.
 * Offsets are those of qcow2.txt; the rules cite QEMU's functions that
 * enforce them (block/qcow2.c qcow2_do_open(), block/qcow2-bitmap.c
 * check_dir_entry() and check_table_entry()).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "byteorder.h"
#include "checked-overflow.h"
#include "error.h"
#include "isaligned.h"
#include "qcow2-format.h"
#include "rounding.h"
#include "utf8.h"

/* ------------------------------------------------------------------ */
/* Header */

bool
qcow2_probe(const void *buf, size_t len)
{
    return len >= 4 && get_be32(buf) == QCOW2_MAGIC;
}

int
qcow2_header_decode(const void *buf, size_t len, struct qcow2_header *h)
{
    const unsigned char *p = buf;

    memset(h, 0, sizeof *h);
    if (len < QCOW2_HEADER_V2_LENGTH)
        return qcbt_error(EINVAL,
                          "qcow2 header is truncated (%zu of %d bytes)",
                          len,
                          QCOW2_HEADER_V2_LENGTH);
    h->magic = get_be32(p + 0);
    h->version = get_be32(p + 4);
    h->backing_file_offset = get_be64(p + 8);
    h->backing_file_size = get_be32(p + 16);
    h->cluster_bits = get_be32(p + 20);
    h->size = get_be64(p + 24);
    h->crypt_method = get_be32(p + 32);
    h->l1_size = get_be32(p + 36);
    h->l1_table_offset = get_be64(p + 40);
    h->refcount_table_offset = get_be64(p + 48);
    h->refcount_table_clusters = get_be32(p + 56);
    h->nb_snapshots = get_be32(p + 60);
    h->snapshots_offset = get_be64(p + 64);

    /* Without the magic this is no qcow2 header: the validator says so,
     * however short the buffer. */
    if (h->version < 3 || h->magic != QCOW2_MAGIC) {
        /* What a version-2 header implies (qcow2.txt "Header"). */
        h->refcount_order = 4;
        h->header_length = QCOW2_HEADER_V2_LENGTH;
        return 0;
    }
    if (len < QCOW2_HEADER_V3_LENGTH)
        return qcbt_error(EINVAL, "qcow2 v3 header is truncated");
    h->incompatible_features = get_be64(p + 72);
    h->compatible_features = get_be64(p + 80);
    h->autoclear_features = get_be64(p + 88);
    h->refcount_order = get_be32(p + 96);
    h->header_length = get_be32(p + 100);
    if (h->header_length > QCOW2_HEADER_V3_LENGTH) {
        if (len < QCOW2_HEADER_V3_LENGTH + 1)
            return qcbt_error(EINVAL, "qcow2 header is truncated");
        h->compression_type = p[104];
    }
    return 0;
}

size_t
qcow2_header_encode(const struct qcow2_header *h, void *buf)
{
    unsigned char *p = buf;
    size_t n;

    put_be32(p + 0, h->magic);
    put_be32(p + 4, h->version);
    put_be64(p + 8, h->backing_file_offset);
    put_be32(p + 16, h->backing_file_size);
    put_be32(p + 20, h->cluster_bits);
    put_be64(p + 24, h->size);
    put_be32(p + 32, h->crypt_method);
    put_be32(p + 36, h->l1_size);
    put_be64(p + 40, h->l1_table_offset);
    put_be64(p + 48, h->refcount_table_offset);
    put_be32(p + 56, h->refcount_table_clusters);
    put_be32(p + 60, h->nb_snapshots);
    put_be64(p + 64, h->snapshots_offset);
    if (h->version < 3)
        return QCOW2_HEADER_V2_LENGTH;
    put_be64(p + 72, h->incompatible_features);
    put_be64(p + 80, h->compatible_features);
    put_be64(p + 88, h->autoclear_features);
    put_be32(p + 96, h->refcount_order);
    put_be32(p + 100, h->header_length);
    if (h->header_length <= QCOW2_HEADER_V3_LENGTH)
        return QCOW2_HEADER_V3_LENGTH;
    /* compression_type, then padding to a multiple of 8 */
    n = h->header_length < QCOW2_HEADER_LENGTH ? h->header_length
                                               : QCOW2_HEADER_LENGTH;
    p[104] = h->compression_type;
    memset(p + 105, 0, n - 105);
    return n;
}

/* Rules of the fields before the L1 table: version, sizes, features. */
static int
check_header_format(const struct qcow2_header *h, uint64_t cluster_size)
{
    if (h->version == 2) {
        /* Encoded as 72 bytes: nothing else can be stored. */
        if (h->incompatible_features || h->compatible_features ||
            h->autoclear_features)
            return qcbt_error(EINVAL,
                              "qcow2 version 2 header with feature bits "
                              "set (they need version 3)");
        if (h->refcount_order != 4 ||
            h->header_length != QCOW2_HEADER_V2_LENGTH)
            return qcbt_error(EINVAL,
                              "qcow2 version 2 header with refcount_order "
                              "%" PRIu32 " and header_length %" PRIu32
                              " (version 2 implies 4 and 72)",
                              h->refcount_order,
                              h->header_length);
    } else {
        if (h->header_length < QCOW2_HEADER_V3_LENGTH)
            return qcbt_error(EINVAL,
                              "qcow2 header too short (header_length "
                              "%" PRIu32 ")",
                              h->header_length);
        if (h->header_length > cluster_size)
            return qcbt_error(EINVAL,
                              "qcow2 header_length %" PRIu32
                              " exceeds the cluster size",
                              h->header_length);
        if (!IS_ALIGNED(h->header_length, 8))
            return qcbt_error(EINVAL,
                              "qcow2 header_length %" PRIu32
                              " is not a multiple of 8",
                              h->header_length);
    }
    if (h->refcount_order > QCOW2_MAX_REFCOUNT_ORDER)
        return qcbt_error(EINVAL,
                          "invalid refcount_order %" PRIu32 " (maximum 6)",
                          h->refcount_order);

    /* Compression type and its incompatible bit must agree both ways. */
    if (h->compression_type > QCOW2_COMPRESSION_ZSTD)
        return qcbt_error(ENOTSUP,
                          "unknown compression type %u",
                          h->compression_type);
    if (h->compression_type != 0 &&
        !(h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION))
        return qcbt_error(EINVAL,
                          "compression type %u without the "
                          "compression-type incompatible bit",
                          h->compression_type);
    if (h->compression_type == 0 &&
        (h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION))
        return qcbt_error(EINVAL,
                          "compression-type incompatible bit set "
                          "with the default (deflate) compression type");
    if (h->compression_type != 0 && h->header_length <= QCOW2_HEADER_V3_LENGTH)
        return qcbt_error(EINVAL,
                          "compression type %u with header_length %" PRIu32
                          " (the field starts at byte 104)",
                          h->compression_type,
                          h->header_length);
    if ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) &&
        h->cluster_bits < 14)
        return qcbt_error(EINVAL,
                          "extended L2 entries need clusters of at "
                          "least 16 KiB (cluster_bits %" PRIu32 ")",
                          h->cluster_bits);

    if (h->crypt_method > 2)
        return qcbt_error(ENOTSUP,
                          "unknown encryption method %" PRIu32,
                          h->crypt_method);
    if (h->crypt_method != 0)
        return qcbt_error(ENOTSUP,
                          "encrypted qcow2 images (%s) are not "
                          "supported",
                          h->crypt_method == 1 ? "AES" : "LUKS");

    if (h->size > (uint64_t)INT64_MAX)
        return qcbt_error(EFBIG,
                          "virtual size %" PRIu64 " is too large",
                          h->size);

    /* Backing file name: inside cluster 0, at most 1023 bytes. */
    if (h->backing_file_offset) {
        if (h->backing_file_offset > cluster_size)
            return qcbt_error(EINVAL,
                              "invalid backing file offset 0x%" PRIx64,
                              h->backing_file_offset);
        if (h->backing_file_size > QCOW2_MAX_BACKING_NAME ||
            h->backing_file_size > cluster_size - h->backing_file_offset)
            return qcbt_error(EINVAL,
                              "backing file name too long (%" PRIu32 " bytes)",
                              h->backing_file_size);
    }
    return 0;
}

/* Rules of the table pointers: L1, refcount table, snapshot table. */
static int
check_header_tables(const struct qcow2_header *h,
                    uint64_t cluster_size,
                    uint64_t file_size)
{
    uint64_t l1_bytes, l1_needed, per_l1, end;
    unsigned l2_bits;

    /* L1 table: bounded, aligned, large enough for the virtual size. */
    l2_bits = h->cluster_bits -
              ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) ? 4 : 3);
    per_l1 = 1ULL << (h->cluster_bits + l2_bits); /* <= 2^39 */
    l1_needed = DIV_ROUND_UP(h->size, per_l1);
    l1_bytes = (uint64_t)h->l1_size * 8;
    if (l1_bytes > QCOW2_MAX_L1_BYTES)
        return qcbt_error(EFBIG,
                          "active L1 table too large (%" PRIu32 " entries)",
                          h->l1_size);
    if (h->l1_size < l1_needed)
        return qcbt_error(EINVAL,
                          "L1 table is too small (%" PRIu32 " entries, %" PRIu64
                          " needed for the virtual size)",
                          h->l1_size,
                          l1_needed);
    if (h->l1_size > 0) {
        if (!IS_ALIGNED(h->l1_table_offset, cluster_size))
            return qcbt_error(EINVAL,
                              "invalid L1 table offset 0x%" PRIx64
                              " (not cluster aligned)",
                              h->l1_table_offset);
        if (ADD_OVERFLOW(h->l1_table_offset, l1_bytes, &end) ||
            end > (uint64_t)INT64_MAX)
            return qcbt_error(EINVAL,
                              "invalid L1 table offset 0x%" PRIx64,
                              h->l1_table_offset);
        if (h->l1_table_offset >= file_size)
            return qcbt_error(EINVAL,
                              "L1 table offset 0x%" PRIx64
                              " is past the end of the file",
                              h->l1_table_offset);
    }

    if (h->refcount_table_clusters == 0)
        return qcbt_error(EINVAL,
                          "image does not contain a reference count "
                          "table");
    if ((uint64_t)h->refcount_table_clusters * cluster_size >
        QCOW2_MAX_REFTABLE_BYTES)
        return qcbt_error(EFBIG,
                          "reference count table too large (%" PRIu32
                          " clusters)",
                          h->refcount_table_clusters);
    if (!IS_ALIGNED(h->refcount_table_offset, cluster_size) ||
        h->refcount_table_offset == 0 ||
        h->refcount_table_offset >
            (uint64_t)INT64_MAX - QCOW2_MAX_REFTABLE_BYTES)
        return qcbt_error(EINVAL,
                          "invalid reference count table offset 0x%" PRIx64,
                          h->refcount_table_offset);

    if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
        return qcbt_error(EINVAL,
                          "too many internal snapshots (%" PRIu32 ")",
                          h->nb_snapshots);
    if (h->nb_snapshots > 0 &&
        (!IS_ALIGNED(h->snapshots_offset, cluster_size) ||
         h->snapshots_offset > (uint64_t)INT64_MAX))
        return qcbt_error(EINVAL,
                          "invalid snapshot table offset 0x%" PRIx64,
                          h->snapshots_offset);
    return 0;
}

int
qcow2_header_check(const struct qcow2_header *h, uint64_t file_size)
{
    uint64_t cluster_size;
    int r;

    if (h->magic != QCOW2_MAGIC)
        return qcbt_error(EINVAL,
                          "not a qcow2 image (bad magic 0x%08x)",
                          h->magic);
    if (h->version != 2 && h->version != 3)
        return qcbt_error(ENOTSUP,
                          "unsupported qcow2 version %" PRIu32,
                          h->version);
    /* Before any shift by cluster_bits. */
    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
        return qcbt_error(EINVAL,
                          "unsupported cluster size: 2^%" PRIu32
                          " (cluster_bits must be %d..%d)",
                          h->cluster_bits,
                          QCOW2_MIN_CLUSTER_BITS,
                          QCOW2_MAX_CLUSTER_BITS);
    cluster_size = 1ULL << h->cluster_bits;
    r = check_header_format(h, cluster_size);
    if (r == 0)
        r = check_header_tables(h, cluster_size, file_size);
    return r;
}

/* ------------------------------------------------------------------ */
/* Header extensions */

void
qcow2_header_ext_decode(const void *buf, struct qcow2_header_ext *e)
{
    const unsigned char *p = buf;

    e->type = get_be32(p);
    e->len = get_be32(p + 4);
}

void
qcow2_header_ext_encode(const struct qcow2_header_ext *e, void *buf)
{
    unsigned char *p = buf;

    put_be32(p, e->type);
    put_be32(p + 4, e->len);
}

int
qcow2_header_ext_check(const struct qcow2_header_ext *e,
                       uint64_t off,
                       uint64_t end)
{
    if (off > end || end - off < QCOW2_HEADER_EXT_SIZE ||
        e->len > end - off - QCOW2_HEADER_EXT_SIZE)
        return qcbt_error(EINVAL,
                          "header extension 0x%08x too large "
                          "(%" PRIu32 " bytes at offset 0x%" PRIx64 ")",
                          e->type,
                          e->len,
                          off);
    return 0;
}

uint64_t
qcow2_header_ext_size(uint32_t len)
{
    return QCOW2_HEADER_EXT_SIZE + ROUND_UP((uint64_t)len, 8);
}

/* ------------------------------------------------------------------ */
/* Feature name table */

const struct qcow2_feature_name qcow2_known_features[] = {
    {QCOW2_FEATURE_TYPE_INCOMPAT, 0, "dirty bit"},
    {QCOW2_FEATURE_TYPE_INCOMPAT, 1, "corrupt bit"},
    {QCOW2_FEATURE_TYPE_INCOMPAT, 2, "external data file"},
    {QCOW2_FEATURE_TYPE_INCOMPAT, 3, "compression type"},
    {QCOW2_FEATURE_TYPE_INCOMPAT, 4, "extended L2 entries"},
    {QCOW2_FEATURE_TYPE_COMPAT, 0, "lazy refcounts"},
    {QCOW2_FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"},
    {QCOW2_FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"},
};
const size_t qcow2_nr_known_features =
    sizeof qcow2_known_features / sizeof qcow2_known_features[0];

void
qcow2_feature_name_decode(const void *buf, struct qcow2_feature_name *f)
{
    const unsigned char *p = buf;

    f->type = p[0];
    f->bit = p[1];
    memcpy(f->name, p + 2, QCOW2_FEATURE_NAME_LEN);
    f->name[QCOW2_FEATURE_NAME_LEN] = '\0';
}

void
qcow2_feature_name_encode(const struct qcow2_feature_name *f, void *buf)
{
    unsigned char *p = buf;
    size_t n = strnlen(f->name, QCOW2_FEATURE_NAME_LEN);

    p[0] = f->type;
    p[1] = f->bit;
    memcpy(p + 2, f->name, n);
    memset(p + 2 + n, 0, QCOW2_FEATURE_NAME_LEN - n);
}

int
qcow2_feature_name_check(const struct qcow2_feature_name *f)
{
    if (f->type > QCOW2_FEATURE_TYPE_AUTOCLEAR)
        return qcbt_error(EINVAL,
                          "feature name table entry: unknown type %u "
                          "(0..2)",
                          f->type);
    if (f->bit > 63)
        return qcbt_error(EINVAL,
                          "feature name table entry: bit %u out of range "
                          "(0..63)",
                          f->bit);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Bitmaps extension */

void
qcow2_bitmaps_ext_decode(const void *buf, struct qcow2_bitmaps_ext *e)
{
    const unsigned char *p = buf;

    e->nb_bitmaps = get_be32(p);
    e->reserved32 = get_be32(p + 4);
    e->bitmap_directory_size = get_be64(p + 8);
    e->bitmap_directory_offset = get_be64(p + 16);
}

void
qcow2_bitmaps_ext_encode(const struct qcow2_bitmaps_ext *e, void *buf)
{
    unsigned char *p = buf;

    put_be32(p, e->nb_bitmaps);
    put_be32(p + 4, e->reserved32);
    put_be64(p + 8, e->bitmap_directory_size);
    put_be64(p + 16, e->bitmap_directory_offset);
}

int
qcow2_bitmaps_ext_check(const struct qcow2_bitmaps_ext *e,
                        uint64_t cluster_size,
                        uint64_t file_size)
{
    uint64_t end;

    if (e->reserved32 != 0)
        return qcbt_error(EINVAL,
                          "bitmaps extension: reserved field is not zero");
    if (e->nb_bitmaps == 0 || e->nb_bitmaps > QCOW2_MAX_BITMAPS)
        return qcbt_error(EINVAL,
                          "bitmaps extension: %" PRIu32 " bitmaps (1..%d "
                          "allowed)",
                          e->nb_bitmaps,
                          QCOW2_MAX_BITMAPS);
    if (e->bitmap_directory_size == 0 ||
        e->bitmap_directory_size > QCOW2_MAX_BITMAP_DIR_SIZE)
        return qcbt_error(EINVAL,
                          "bitmaps extension: directory size %" PRIu64
                          " out of range",
                          e->bitmap_directory_size);
    if (!IS_ALIGNED(e->bitmap_directory_offset, cluster_size) ||
        ADD_OVERFLOW(e->bitmap_directory_offset,
                     e->bitmap_directory_size,
                     &end) ||
        end > file_size)
        return qcbt_error(EINVAL,
                          "bitmaps extension: directory at 0x%" PRIx64
                          " (%" PRIu64 " bytes) is misaligned or past the "
                          "end of the file",
                          e->bitmap_directory_offset,
                          e->bitmap_directory_size);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Bitmap directory entry */

uint64_t
qcow2_bitmap_dir_entry_size(const struct qcow2_bitmap_dir_entry *e)
{
    return ROUND_UP((uint64_t)QCOW2_BITMAP_DIR_ENTRY_FIXED + e->name_size, 8);
}

int
qcow2_bitmap_dir_entry_decode(const void *buf,
                              size_t len,
                              struct qcow2_bitmap_dir_entry *e)
{
    const unsigned char *p = buf;
    uint32_t extra;
    uint64_t size;

    memset(e, 0, sizeof *e);
    if (len < QCOW2_BITMAP_DIR_ENTRY_FIXED)
        return qcbt_error(EINVAL,
                          "truncated (%zu of the %d bytes of an entry "
                          "header)",
                          len,
                          QCOW2_BITMAP_DIR_ENTRY_FIXED);
    e->bitmap_table_offset = get_be64(p);
    e->bitmap_table_size = get_be32(p + 8);
    e->flags = get_be32(p + 12);
    e->type = p[16];
    e->granularity_bits = p[17];
    e->name_size = get_be16(p + 18);
    extra = get_be32(p + 20);
    /* 64-bit arithmetic: extra_data_size may be close to 4 GiB. */
    size =
        ROUND_UP((uint64_t)QCOW2_BITMAP_DIR_ENTRY_FIXED + extra + e->name_size,
                 8);
    if (size > len)
        return qcbt_error(EINVAL,
                          "entry of %" PRIu64 " bytes runs past the end "
                          "of the directory (%zu bytes left)",
                          size,
                          len);
    if (extra != 0)
        return qcbt_error(ENOTSUP,
                          "extra_data_size %" PRIu32 ": extra data is "
                          "not supported",
                          extra);
    e->name = (const char *)p + QCOW2_BITMAP_DIR_ENTRY_FIXED;
    return 0;
}

int64_t
qcow2_bitmap_dir_entry_encode(const struct qcow2_bitmap_dir_entry *e,
                              void *buf,
                              size_t len)
{
    unsigned char *p = buf;
    uint64_t size = qcow2_bitmap_dir_entry_size(e);

    if (size > len)
        return qcbt_error(ENOSPC,
                          "bitmap directory entry of %" PRIu64
                          " bytes does not fit in %zu bytes",
                          size,
                          len);
    put_be64(p, e->bitmap_table_offset);
    put_be32(p + 8, e->bitmap_table_size);
    put_be32(p + 12, e->flags);
    p[16] = e->type;
    p[17] = e->granularity_bits;
    put_be16(p + 18, e->name_size);
    put_be32(p + 20, 0); /* extra_data_size */
    if (e->name_size)
        memcpy(p + QCOW2_BITMAP_DIR_ENTRY_FIXED, e->name, e->name_size);
    memset(p + QCOW2_BITMAP_DIR_ENTRY_FIXED + e->name_size,
           0,
           size - QCOW2_BITMAP_DIR_ENTRY_FIXED - e->name_size);
    return (int64_t)size;
}

int
qcow2_bitmap_name_check(const char *name, size_t len)
{
    if (len == 0 || len > QCOW2_BME_MAX_NAME_SIZE)
        return qcbt_error(EINVAL,
                          "name size %zu out of range (1..%d)",
                          len,
                          QCOW2_BME_MAX_NAME_SIZE);
    if (memchr(name, '\0', len) ||
        !utf8_valid((const unsigned char *)name, len))
        return qcbt_error(EINVAL, "name is not valid UTF-8 without NUL bytes");
    return 0;
}

uint64_t
qcow2_bitmap_table_size_needed(uint64_t virtual_size,
                               uint64_t cluster_size,
                               unsigned gbits)
{
    uint64_t nbits = DIV_ROUND_UP(virtual_size, 1ULL << gbits);
    uint64_t nbytes = DIV_ROUND_UP(nbits, 8);

    return DIV_ROUND_UP(nbytes, cluster_size);
}

int
qcow2_bitmap_dir_entry_check(const struct qcow2_bitmap_dir_entry *e,
                             uint64_t cluster_size,
                             uint64_t virtual_size)
{
    uint64_t phys, need;
    char name[80];

    if (qcow2_bitmap_name_check(e->name, e->name_size) < 0)
        return qcbt_error_prefix(EINVAL, "bitmap directory entry");
    qcbt_escape(name, sizeof name, e->name, e->name_size);
    if (e->type != QCOW2_BME_TYPE_DIRTY_TRACKING)
        return qcbt_error(EINVAL,
                          "bitmap '%s': unknown type %u",
                          name,
                          e->type);
    if (e->flags & ~(QCOW2_BME_FLAG_IN_USE | QCOW2_BME_FLAG_AUTO))
        return qcbt_error(EINVAL,
                          "bitmap '%s': unsupported flags 0x%" PRIx32,
                          name,
                          e->flags);
    if (e->granularity_bits < QCOW2_BME_MIN_GRANULARITY_BITS ||
        e->granularity_bits > QCOW2_BME_MAX_GRANULARITY_BITS)
        return qcbt_error(EINVAL,
                          "bitmap '%s': granularity_bits %u out of range "
                          "(%d..%d)",
                          name,
                          e->granularity_bits,
                          QCOW2_BME_MIN_GRANULARITY_BITS,
                          QCOW2_BME_MAX_GRANULARITY_BITS);
    if (e->bitmap_table_size == 0 ||
        e->bitmap_table_size > QCOW2_BME_MAX_TABLE_SIZE)
        return qcbt_error(EINVAL,
                          "bitmap '%s': bitmap table size %" PRIu32
                          " out of range",
                          name,
                          e->bitmap_table_size);
    phys = (uint64_t)e->bitmap_table_size * cluster_size;
    if (phys > QCOW2_BME_MAX_PHYS_SIZE)
        return qcbt_error(EINVAL,
                          "bitmap '%s': %" PRIu64 " bytes of bitmap data "
                          "exceed the 512 MiB limit",
                          name,
                          phys);
    if (e->bitmap_table_offset == 0 ||
        !IS_ALIGNED(e->bitmap_table_offset, cluster_size))
        return qcbt_error(EINVAL,
                          "bitmap '%s': bitmap table offset 0x%" PRIx64
                          " is not cluster aligned",
                          name,
                          e->bitmap_table_offset);
    /* An in_use bitmap may have missed a resize: its size is not
     * checked (QEMU's check_dir_entry()). */
    if (e->flags & QCOW2_BME_FLAG_IN_USE)
        return 0;
    need = qcow2_bitmap_table_size_needed(virtual_size,
                                          cluster_size,
                                          e->granularity_bits);
    if (e->bitmap_table_size != need)
        return qcbt_error(EINVAL,
                          "bitmap '%s': bitmap table has %" PRIu32
                          " entries, %" PRIu64 " expected for the virtual size",
                          name,
                          e->bitmap_table_size,
                          need);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Bitmap table entry */

void
qcow2_bitmap_table_entry_decode(const void *buf,
                                struct qcow2_bitmap_table_entry *e)
{
    uint64_t v = get_be64(buf);

    e->offset = v & QCOW2_BME_TABLE_OFFSET_MASK;
    e->all_ones = v & QCOW2_BME_TABLE_ALL_ONES;
    e->reserved = v & QCOW2_BME_TABLE_RESERVED_MASK;
}

void
qcow2_bitmap_table_entry_encode(const struct qcow2_bitmap_table_entry *e,
                                void *buf)
{
    put_be64(buf,
             (e->offset & QCOW2_BME_TABLE_OFFSET_MASK) |
                 (e->all_ones ? QCOW2_BME_TABLE_ALL_ONES : 0) |
                 (e->reserved & QCOW2_BME_TABLE_RESERVED_MASK));
}

int
qcow2_bitmap_table_entry_check(const struct qcow2_bitmap_table_entry *e,
                               uint64_t cluster_size)
{
    if (e->reserved)
        return qcbt_error(EINVAL,
                          "reserved bits 0x%016" PRIx64 " set",
                          e->reserved);
    if (e->offset == 0)
        return 0;
    if (e->all_ones)
        return qcbt_error(EINVAL, "both a data offset and the all-ones flag");
    if (!IS_ALIGNED(e->offset, cluster_size))
        return qcbt_error(EINVAL,
                          "data offset 0x%" PRIx64 " is not cluster aligned",
                          e->offset);
    return 0;
}

/* ------------------------------------------------------------------ */
/* L2 entries */

int
qcow2_l2_entry_check(uint64_t entry,
                     uint64_t bitmap,
                     const struct qcow2_header *h)
{
    bool data_file = h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE;
    bool extended = h->incompatible_features & QCOW2_INCOMPAT_EXTL2;
    uint64_t host = entry & QCOW2_L2E_OFFSET_MASK;
    bool allocated;

    if (entry & QCOW2_OFLAG_COMPRESSED) {
        if (data_file)
            return qcbt_error(EIO,
                              "compressed cluster with an external data "
                              "file");
        if (extended && bitmap != 0)
            return qcbt_error(EIO,
                              "compressed cluster with a non-zero "
                              "subcluster bitmap");
        return 0;
    }
    if (entry & QCOW2_L2E_STD_RESERVED)
        return qcbt_error(EIO, "reserved bits set");
    if (h->version < 3 && (entry & QCOW2_OFLAG_ZERO))
        return qcbt_error(EIO,
                          "reserved bit 0 (the zero flag) set in a version "
                          "2 image");
    if (!IS_ALIGNED(host, 1ULL << h->cluster_bits))
        return qcbt_error(EIO, "data offset not cluster aligned");
    if (!extended)
        return 0;
    /* Extended L2: 32 allocation bits, then 32 zero bits. */
    allocated = host != 0 || (data_file && (entry & QCOW2_OFLAG_COPIED));
    if (allocated && ((bitmap >> 32) & bitmap & 0xffffffffULL))
        return qcbt_error(EIO, "subcluster both allocated and zero");
    if (!allocated && (bitmap & 0xffffffffULL))
        return qcbt_error(EIO,
                          "allocated subclusters in an unallocated "
                          "cluster");
    return 0;
}

/* ------------------------------------------------------------------ */
/* Tables and refcount blocks */

uint64_t
qcow2_table_get(const void *table, uint64_t idx)
{
    return get_be64((const unsigned char *)table + idx * 8);
}

void
qcow2_table_set(void *table, uint64_t idx, uint64_t entry)
{
    put_be64((unsigned char *)table + idx * 8, entry);
}

uint64_t
qcow2_refblock_get(const void *block, unsigned refcount_order, uint64_t idx)
{
    const unsigned char *b = block;
    unsigned bits = 1u << refcount_order;

    switch (bits) {
    case 1:
    case 2:
    case 4: {
        unsigned per_byte = 8 / bits;

        return (b[idx / per_byte] >> ((idx % per_byte) * bits)) &
               ((1u << bits) - 1);
    }
    case 8:
        return b[idx];
    case 16:
        return get_be16(b + idx * 2);
    case 32:
        return get_be32(b + idx * 4);
    default:
        return get_be64(b + idx * 8);
    }
}

void
qcow2_refblock_set(void *block,
                   unsigned refcount_order,
                   uint64_t idx,
                   uint64_t refcount)
{
    unsigned char *b = block;
    unsigned bits = 1u << refcount_order;

    switch (bits) {
    case 1:
    case 2:
    case 4: {
        unsigned per_byte = 8 / bits;
        unsigned shift = (idx % per_byte) * bits;
        unsigned mask = ((1u << bits) - 1) << shift;

        b[idx / per_byte] = (unsigned char)((b[idx / per_byte] & ~mask) |
                                            ((refcount << shift) & mask));
        break;
    }
    case 8:
        b[idx] = (unsigned char)refcount;
        break;
    case 16:
        put_be16(b + idx * 2, (uint16_t)refcount);
        break;
    case 32:
        put_be32(b + idx * 4, (uint32_t)refcount);
        break;
    default:
        put_be64(b + idx * 8, refcount);
        break;
    }
}

/* ------------------------------------------------------------------ */
/* Compressed cluster descriptor */

/* x = 62 - (cluster_bits - 8): the offset takes bits 0..x-1, the sector
 * count bits x..61 (qcow2.txt; QEMU's csize_shift). */
static unsigned
csize_shift(unsigned cluster_bits)
{
    return 62 - (cluster_bits - 8);
}

static uint64_t
csize_mask(unsigned cluster_bits)
{
    return (1ULL << (cluster_bits - 8)) - 1;
}

void
qcow2_compressed_desc_decode(uint64_t l2_entry,
                             unsigned cluster_bits,
                             struct qcow2_compressed_desc *d)
{
    unsigned x = csize_shift(cluster_bits);

    d->host_offset = l2_entry & ((1ULL << x) - 1);
    d->nb_sectors = (l2_entry >> x) & csize_mask(cluster_bits);
}

uint64_t
qcow2_compressed_desc_encode(const struct qcow2_compressed_desc *d,
                             unsigned cluster_bits)
{
    unsigned x = csize_shift(cluster_bits);

    return QCOW2_OFLAG_COMPRESSED |
           ((d->nb_sectors & csize_mask(cluster_bits)) << x) |
           (d->host_offset & ((1ULL << x) - 1));
}

int
qcow2_compressed_desc_check(const struct qcow2_compressed_desc *d,
                            unsigned cluster_bits)
{
    unsigned x = csize_shift(cluster_bits);

    if (d->host_offset > QCOW2_MAX_HOST_OFFSET || d->host_offset >= (1ULL << x))
        return qcbt_error(EINVAL,
                          "host offset 0x%" PRIx64 " too large",
                          d->host_offset);
    if (d->nb_sectors > csize_mask(cluster_bits))
        return qcbt_error(EINVAL,
                          "%" PRIu64 " additional sectors (at most %" PRIu64
                          " with %u cluster bits)",
                          d->nb_sectors,
                          csize_mask(cluster_bits),
                          cluster_bits);
    return 0;
}

uint64_t
qcow2_compressed_desc_len(const struct qcow2_compressed_desc *d)
{
    return (d->nb_sectors + 1) * 512 - (d->host_offset & 511);
}

uint64_t
qcow2_compressed_max_len(unsigned cluster_bits)
{
    return (csize_mask(cluster_bits) + 1) * 512;
}

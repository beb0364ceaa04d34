/* qcbt unit tests: the qcow2 format layer (common/qcow2/qcow2-format.c).
 *
 * For every on-disk structure: decode(encode(x)) == x; encode produces the
 * bytes QEMU writes (reference arrays captured once from qemu-img 7.2, see
 * below; the tests themselves need no qemu); each rule of the validator
 * rejects one bad field with -errno and a one-line message naming it, and
 * accepts the good structure.
 */
#include <errno.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "error.h"
#include "qcow2-format.h"

#define KiB 1024ULL
#define MiB (1024ULL * 1024)

/* ------------------------------------------------------------------ */
/* Reference bytes.  Captured with qemu-img 7.2.22 (Debian 12):
 *
 *   qemu-img create -f qcow2 a.qcow2 64M                 (file: 196616 B)
 *   xxd -l 0x200 a.qcow2              -> QEMU_HEADER_64M, QEMU_FEATURES
 *   qemu-img bitmap --add -g 65536 a.qcow2 b0            (file: 327712 B)
 *   extension at 0x1f8, directory at 0x50000 -> QEMU_BITMAPS_EXT,
 *                                                QEMU_DIR_ENTRY_B0
 *   cp a.qcow2 d.qcow2; qemu-io -f qcow2 -c 'write 0 4k' d.qcow2
 *   bitmap table of b0 (0x90000), entry 0 -> QEMU_TABLE_ENTRY
 *   qemu-img create -f qcow2 \
 *       -o compression_type=zstd,extended_l2=on z.qcow2 1G
 *   xxd -l 112 z.qcow2                -> QEMU_HEADER_ZSTD_EXTL2
 */

/* The first 112 bytes of a fresh 64 MiB image: v3, 64 KiB clusters,
 * refcount table at 0x10000, L1 (1 entry) at 0x30000, header_length 112.
 */
static const unsigned char QEMU_HEADER_64M[112] = {
    0x51, 0x46, 0x49, 0xfb, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,
    0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x70, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
};
#define QEMU_FILE_SIZE_64M 196616

/* 1 GiB, zstd (byte 104 = 1) and extended L2: incompatible 0x18, l1_size
 * 4. */
static const unsigned char QEMU_HEADER_ZSTD_EXTL2[112] = {
    0x51, 0x46, 0x49, 0xfb, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,
    0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x70, 0x01, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
};
#define QEMU_FILE_SIZE_ZSTD_EXTL2 196640

/* The feature name table extension at 0x70: header (magic, 384) and the
 * eight 48-byte entries QEMU 7.2 writes.
 */
/* clang-format off */
static const unsigned char QEMU_FEATURES[8 + 384] = {
    0x68, 0x03, 0xf8, 0x57, 0x00, 0x00, 0x01, 0x80,
    /* (0, 0) "dirty bit" */
    0x00, 0x00, 0x64, 0x69, 0x72, 0x74, 0x79, 0x20, 0x62, 0x69, 0x74, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    /* (0, 1) "corrupt bit" */
    0x00, 0x01, 0x63, 0x6f, 0x72, 0x72, 0x75, 0x70, 0x74, 0x20, 0x62, 0x69,
    0x74, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    /* (0, 2) "external data file" */
    0x00, 0x02, 0x65, 0x78, 0x74, 0x65, 0x72, 0x6e, 0x61, 0x6c, 0x20, 0x64,
    0x61, 0x74, 0x61, 0x20, 0x66, 0x69, 0x6c, 0x65, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    /* (0, 3) "compression type" */
    0x00, 0x03, 0x63, 0x6f, 0x6d, 0x70, 0x72, 0x65, 0x73, 0x73, 0x69, 0x6f,
    0x6e, 0x20, 0x74, 0x79, 0x70, 0x65, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    /* (0, 4) "extended L2 entries" */
    0x00, 0x04, 0x65, 0x78, 0x74, 0x65, 0x6e, 0x64, 0x65, 0x64, 0x20, 0x4c,
    0x32, 0x20, 0x65, 0x6e, 0x74, 0x72, 0x69, 0x65, 0x73, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    /* (1, 0) "lazy refcounts" */
    0x01, 0x00, 0x6c, 0x61, 0x7a, 0x79, 0x20, 0x72, 0x65, 0x66, 0x63, 0x6f,
    0x75, 0x6e, 0x74, 0x73, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    /* (2, 0) "bitmaps" */
    0x02, 0x00, 0x62, 0x69, 0x74, 0x6d, 0x61, 0x70, 0x73, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    /* (2, 1) "raw external data" */
    0x02, 0x01, 0x72, 0x61, 0x77, 0x20, 0x65, 0x78, 0x74, 0x65, 0x72, 0x6e,
    0x61, 0x6c, 0x20, 0x64, 0x61, 0x74, 0x61, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
};
/* clang-format on */

/* The bitmaps extension at 0x1f8: header (magic, 24), one bitmap, a
 * 32-byte directory at 0x50000. */
static const unsigned char QEMU_BITMAPS_EXT[8 + 24] = {
    0x23, 0x85, 0x28, 0x75, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00,
};
#define QEMU_FILE_SIZE_BITMAP 327712

/* The directory entry of "b0": table at 0x40000 (1 entry), flags auto,
 * type 1, granularity_bits 16, name_size 2, no extra data, padding. */
static const unsigned char QEMU_DIR_ENTRY_B0[32] = {
    0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x02, 0x01, 0x10, 0x00, 0x02, 0x00, 0x00,
    0x00, 0x00, 0x62, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
};

/* After a 4 KiB write: table entry 0 points at the data cluster 0x80000. */
static const unsigned char QEMU_TABLE_ENTRY[8] = {
    0x00,
    0x00,
    0x00,
    0x00,
    0x00,
    0x08,
    0x00,
    0x00,
};

/* ------------------------------------------------------------------ */
/* Helpers */

/* R must be -ERRNUM, recorded with a one-line message naming SUB. */
static void
check_reject(int r, int errnum, const char *sub, const char *what)
{
    const char *msg = qcbt_error_get();

    if (r != -errnum)
        fail_msg("%s: returned %d, expected %d (%s)", what, r, -errnum, msg);
    if (qcbt_error_errno() != errnum)
        fail_msg("%s: recorded errno %d, expected %d (%s)",
                 what,
                 qcbt_error_errno(),
                 errnum,
                 msg);
    if (!msg[0] || strchr(msg, '\n'))
        fail_msg("%s: message is empty or not one line: \"%s\"", what, msg);
    if (!strstr(msg, sub))
        fail_msg("%s: message \"%s\" does not name \"%s\"", what, msg, sub);
}

static void
check_accept(int r, const char *what)
{
    if (r != 0)
        fail_msg("%s: rejected (%d): %s", what, r, qcbt_error_get());
}

static void
assert_header_equal(const struct qcow2_header *a, const struct qcow2_header *b)
{
    assert_int_equal(a->magic, b->magic);
    assert_int_equal(a->version, b->version);
    assert_int_equal(a->backing_file_offset, b->backing_file_offset);
    assert_int_equal(a->backing_file_size, b->backing_file_size);
    assert_int_equal(a->cluster_bits, b->cluster_bits);
    assert_int_equal(a->size, b->size);
    assert_int_equal(a->crypt_method, b->crypt_method);
    assert_int_equal(a->l1_size, b->l1_size);
    assert_int_equal(a->l1_table_offset, b->l1_table_offset);
    assert_int_equal(a->refcount_table_offset, b->refcount_table_offset);
    assert_int_equal(a->refcount_table_clusters, b->refcount_table_clusters);
    assert_int_equal(a->nb_snapshots, b->nb_snapshots);
    assert_int_equal(a->snapshots_offset, b->snapshots_offset);
    assert_int_equal(a->incompatible_features, b->incompatible_features);
    assert_int_equal(a->compatible_features, b->compatible_features);
    assert_int_equal(a->autoclear_features, b->autoclear_features);
    assert_int_equal(a->refcount_order, b->refcount_order);
    assert_int_equal(a->header_length, b->header_length);
    assert_int_equal(a->compression_type, b->compression_type);
}

/* The header of QEMU_HEADER_64M, as a struct. */
static struct qcow2_header
header_64m(void)
{
    struct qcow2_header h = {
        .magic = QCOW2_MAGIC,
        .version = 3,
        .cluster_bits = 16,
        .size = 64 * MiB,
        .l1_size = 1,
        .l1_table_offset = 0x30000,
        .refcount_table_offset = 0x10000,
        .refcount_table_clusters = 1,
        .refcount_order = 4,
        .header_length = 112,
    };

    return h;
}

/* ------------------------------------------------------------------ */
/* Header */

static void
test_header_qemu_bytes(void **state)
{
    struct qcow2_header h, want = header_64m();
    unsigned char buf[QCOW2_HEADER_LENGTH];

    (void)state;
    /* decode what QEMU wrote */
    assert_int_equal(qcow2_header_decode(QEMU_HEADER_64M, 112, &h), 0);
    assert_header_equal(&h, &want);
    check_accept(qcow2_header_check(&h, QEMU_FILE_SIZE_64M), "qemu 64M");
    /* and encode exactly those bytes */
    memset(buf, 0xa5, sizeof buf);
    assert_int_equal(qcow2_header_encode(&want, buf), 112);
    assert_memory_equal(buf, QEMU_HEADER_64M, 112);

    /* zstd + extended L2: the additional field at byte 104 */
    want.size = 1024 * MiB;
    want.l1_size = 4;
    want.incompatible_features =
        QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2;
    want.compression_type = QCOW2_COMPRESSION_ZSTD;
    assert_int_equal(qcow2_header_decode(QEMU_HEADER_ZSTD_EXTL2, 112, &h), 0);
    assert_header_equal(&h, &want);
    check_accept(qcow2_header_check(&h, QEMU_FILE_SIZE_ZSTD_EXTL2),
                 "qemu zstd");
    memset(buf, 0xa5, sizeof buf);
    assert_int_equal(qcow2_header_encode(&want, buf), 112);
    assert_memory_equal(buf, QEMU_HEADER_ZSTD_EXTL2, 112);

    assert_true(qcow2_probe(QEMU_HEADER_64M, 4));
    assert_false(qcow2_probe(QEMU_HEADER_64M, 3));
    assert_false(qcow2_probe(QEMU_HEADER_64M + 1, 4));
}

static void
test_header_round_trip(void **state)
{
    struct qcow2_header x, y;
    unsigned char buf[QCOW2_HEADER_LENGTH + 16];
    size_t n;

    (void)state;
    /* v3, every field distinct and non-zero */
    x = (struct qcow2_header){
        .magic = QCOW2_MAGIC,
        .version = 3,
        .backing_file_offset = 0x0102030405060708ULL,
        .backing_file_size = 0x11121314,
        .cluster_bits = 0x21222324,
        .size = 0x3132333435363738ULL,
        .crypt_method = 0x41424344,
        .l1_size = 0x51525354,
        .l1_table_offset = 0x6162636465666768ULL,
        .refcount_table_offset = 0x7172737475767778ULL,
        .refcount_table_clusters = 0x81828384,
        .nb_snapshots = 0x91929394,
        .snapshots_offset = 0xa1a2a3a4a5a6a7a8ULL,
        .incompatible_features = 0xb1b2b3b4b5b6b7b8ULL,
        .compatible_features = 0xc1c2c3c4c5c6c7c8ULL,
        .autoclear_features = 0xd1d2d3d4d5d6d7d8ULL,
        .refcount_order = 0xe1e2e3e4,
        .header_length = 120,
        .compression_type = 0xf1,
    };
    memset(buf, 0xa5, sizeof buf);
    n = qcow2_header_encode(&x, buf);
    assert_int_equal(n, 112);
    /* padding to 112 is zero; bytes past it (unknown additional fields
     * up to header_length 120) are the caller's and left alone */
    for (size_t i = 105; i < 112; i++)
        assert_int_equal(buf[i], 0);
    assert_int_equal(buf[112], 0xa5);
    assert_int_equal(qcow2_header_decode(buf, 120, &y), 0);
    assert_header_equal(&x, &y);

    /* v3 without the additional field: 104 bytes */
    x.header_length = 104;
    x.compression_type = 0;
    memset(buf, 0xa5, sizeof buf);
    assert_int_equal(qcow2_header_encode(&x, buf), 104);
    assert_int_equal(buf[104], 0xa5);
    assert_int_equal(qcow2_header_decode(buf, 104, &y), 0);
    assert_header_equal(&x, &y);

    /* v2: 72 bytes, the v3 fields implied */
    x = header_64m();
    x.version = 2;
    x.header_length = 72;
    memset(buf, 0xa5, sizeof buf);
    assert_int_equal(qcow2_header_encode(&x, buf), 72);
    assert_int_equal(buf[72], 0xa5);
    assert_int_equal(qcow2_header_decode(buf, 72, &y), 0);
    assert_header_equal(&x, &y);
    check_accept(qcow2_header_check(&y, QEMU_FILE_SIZE_64M), "v2");
}

static void
test_header_decode_short(void **state)
{
    unsigned char buf[QCOW2_HEADER_LENGTH];
    struct qcow2_header h;

    (void)state;
    memcpy(buf, QEMU_HEADER_64M, sizeof buf);
    qcbt_error_clear();
    check_reject(qcow2_header_decode(buf, 71, &h),
                 EINVAL,
                 "truncated",
                 "71 bytes");
    check_reject(qcow2_header_decode(buf, 103, &h),
                 EINVAL,
                 "v3 header is truncated",
                 "v3 in 103 bytes");
    /* header_length 112 announces byte 104 */
    check_reject(qcow2_header_decode(buf, 104, &h),
                 EINVAL,
                 "header is truncated",
                 "compression type missing");
    /* ... header_length 104 does not */
    buf[103] = 104;
    assert_int_equal(qcow2_header_decode(buf, 104, &h), 0);
    assert_int_equal(h.header_length, 104);
    /* a v2 header needs 72 bytes only */
    buf[7] = 2;
    assert_int_equal(qcow2_header_decode(buf, 72, &h), 0);
    assert_int_equal(h.refcount_order, 4);
    assert_int_equal(h.header_length, 72);
    /* without the magic it is no header: nothing more is decoded, so
     * that the validator names the magic */
    buf[7] = 3;
    buf[0] = 'X';
    assert_int_equal(qcow2_header_decode(buf, 80, &h), 0);
    check_reject(qcow2_header_check(&h, 80), EINVAL, "magic", "bad magic");
}

/* One case per rule of qcow2_header_check(). */
#define BAD_HEADER(mutation, errnum, sub)                        \
    do {                                                         \
        struct qcow2_header h = header_64m();                    \
        mutation;                                                \
        qcbt_error_clear();                                      \
        check_reject(qcow2_header_check(&h, QEMU_FILE_SIZE_64M), \
                     (errnum),                                   \
                     (sub),                                      \
                     #mutation);                                 \
    } while (0)

static void
test_header_check(void **state)
{
    struct qcow2_header good = header_64m();

    (void)state;
    check_accept(qcow2_header_check(&good, QEMU_FILE_SIZE_64M), "good");

    BAD_HEADER(h.magic = 0x514649fa, EINVAL, "bad magic 0x514649fa");
    BAD_HEADER(h.version = 4, ENOTSUP, "version 4");
    BAD_HEADER(h.version = 1, ENOTSUP, "version 1");
    BAD_HEADER(h.cluster_bits = 8, EINVAL, "cluster_bits");
    BAD_HEADER(h.cluster_bits = 22, EINVAL, "cluster_bits");
    BAD_HEADER((h.version = 2, h.header_length = 72, h.autoclear_features = 1),
               EINVAL,
               "feature bits");
    BAD_HEADER((h.version = 2, h.header_length = 72, h.refcount_order = 5),
               EINVAL,
               "refcount_order 5");
    BAD_HEADER((h.version = 2, h.header_length = 112),
               EINVAL,
               "header_length 112");
    BAD_HEADER(h.header_length = 96, EINVAL, "header_length 96");
    BAD_HEADER(h.header_length = 64 * KiB + 8,
               EINVAL,
               "exceeds the cluster size");
    BAD_HEADER(h.header_length = 116, EINVAL, "not a multiple of 8");
    BAD_HEADER(h.refcount_order = 7, EINVAL, "refcount_order 7");
    BAD_HEADER((h.compression_type = 2,
                h.incompatible_features = QCOW2_INCOMPAT_COMPRESSION),
               ENOTSUP,
               "compression type 2");
    BAD_HEADER(h.compression_type = 1,
               EINVAL,
               "without the compression-type incompatible bit");
    BAD_HEADER(h.incompatible_features = QCOW2_INCOMPAT_COMPRESSION,
               EINVAL,
               "compression-type incompatible bit set");
    BAD_HEADER((h.compression_type = 1,
                h.incompatible_features = QCOW2_INCOMPAT_COMPRESSION,
                h.header_length = 104),
               EINVAL,
               "header_length 104");
    BAD_HEADER(
        (h.cluster_bits = 13, h.incompatible_features = QCOW2_INCOMPAT_EXTL2),
        EINVAL,
        "extended L2");
    BAD_HEADER(h.crypt_method = 3, ENOTSUP, "encryption method 3");
    BAD_HEADER(h.crypt_method = 2, ENOTSUP, "LUKS");
    BAD_HEADER(h.size = 1ULL << 63, EFBIG, "virtual size");
    BAD_HEADER(h.backing_file_offset = 64 * KiB + 1,
               EINVAL,
               "backing file offset");
    BAD_HEADER((h.backing_file_offset = 0x200, h.backing_file_size = 1024),
               EINVAL,
               "backing file name too long (1024");
    BAD_HEADER(
        (h.backing_file_offset = 64 * KiB - 100, h.backing_file_size = 101),
        EINVAL,
        "backing file name too long (101");
    BAD_HEADER(h.l1_size = QCOW2_MAX_L1_BYTES / 8 + 1, EFBIG, "L1 table");
    BAD_HEADER(h.l1_size = 0, EINVAL, "L1 table is too small");
    BAD_HEADER(h.l1_table_offset = 0x30200, EINVAL, "not cluster aligned");
    BAD_HEADER((h.l1_size = QCOW2_MAX_L1_BYTES / 8,
                h.l1_table_offset = 0x7fffffffffff0000ULL),
               EINVAL,
               "invalid L1 table offset 0x7fffffffffff0000");
    BAD_HEADER(h.l1_table_offset = 0x40000, EINVAL, "past the end of the file");
    BAD_HEADER(h.refcount_table_clusters = 0, EINVAL, "reference count table");
    BAD_HEADER(h.refcount_table_clusters = 129, EFBIG, "too large");
    BAD_HEADER(h.refcount_table_offset = 0,
               EINVAL,
               "reference count table offset 0x0");
    BAD_HEADER(h.refcount_table_offset = 0x10200,
               EINVAL,
               "reference count table offset 0x10200");
    BAD_HEADER(h.nb_snapshots = QCOW2_MAX_SNAPSHOTS + 1,
               EINVAL,
               "internal snapshots");
    BAD_HEADER((h.nb_snapshots = 1, h.snapshots_offset = 0x1000),
               EINVAL,
               "snapshot table offset");
}

/* ------------------------------------------------------------------ */
/* Header extensions and the feature name table */

static void
test_header_ext(void **state)
{
    struct qcow2_header_ext x = {QCOW2_EXT_BACKING_FMT, 3}, y;
    unsigned char buf[8];

    (void)state;
    qcow2_header_ext_encode(&x, buf);
    assert_memory_equal(buf, "\xe2\x79\x2a\xca\x00\x00\x00\x03", 8);
    qcow2_header_ext_decode(buf, &y);
    assert_int_equal(y.type, x.type);
    assert_int_equal(y.len, x.len);
    assert_int_equal(qcow2_header_ext_size(0), 8);
    assert_int_equal(qcow2_header_ext_size(3), 16);
    assert_int_equal(qcow2_header_ext_size(384), 392);
    assert_int_equal(qcow2_header_ext_size(UINT32_MAX), 8 + 0x100000000ULL);

    /* the data must end by the end of the extension area */
    check_accept(qcow2_header_ext_check(&x, 112, 112 + 8 + 3), "exact");
    x.len = 4;
    qcbt_error_clear();
    check_reject(qcow2_header_ext_check(&x, 112, 112 + 8 + 3),
                 EINVAL,
                 "header extension 0xe2792aca too large (4 bytes at offset "
                 "0x70)",
                 "one byte over");
    check_reject(qcow2_header_ext_check(&x, 112, 112 + 4),
                 EINVAL,
                 "too large",
                 "header over the end");
    check_reject(qcow2_header_ext_check(&x, 200, 112),
                 EINVAL,
                 "too large",
                 "past the end");
}

static void
test_feature_names(void **state)
{
    unsigned char buf[8 + 384];
    struct qcow2_header_ext ext = {QCOW2_EXT_FEATURES, 384};
    struct qcow2_feature_name f, g;
    size_t i;

    (void)state;
    /* the table QEMU writes, entry by entry */
    assert_int_equal(qcow2_nr_known_features, 8);
    memset(buf, 0xa5, sizeof buf);
    qcow2_header_ext_encode(&ext, buf);
    for (i = 0; i < qcow2_nr_known_features; i++) {
        check_accept(qcow2_feature_name_check(&qcow2_known_features[i]),
                     qcow2_known_features[i].name);
        qcow2_feature_name_encode(&qcow2_known_features[i], buf + 8 + i * 48);
    }
    assert_memory_equal(buf, QEMU_FEATURES, sizeof buf);
    for (i = 0; i < qcow2_nr_known_features; i++) {
        qcow2_feature_name_decode(QEMU_FEATURES + 8 + i * 48, &f);
        assert_int_equal(f.type, qcow2_known_features[i].type);
        assert_int_equal(f.bit, qcow2_known_features[i].bit);
        assert_string_equal(f.name, qcow2_known_features[i].name);
    }

    /* round trip with a name filling all 46 bytes (no NUL on disk) */
    memset(&f, 0, sizeof f);
    f.type = QCOW2_FEATURE_TYPE_AUTOCLEAR;
    f.bit = 63;
    memset(f.name, 'n', QCOW2_FEATURE_NAME_LEN);
    qcow2_feature_name_encode(&f, buf);
    assert_int_equal(buf[47], 'n');
    qcow2_feature_name_decode(buf, &g);
    assert_int_equal(g.type, f.type);
    assert_int_equal(g.bit, f.bit);
    assert_memory_equal(g.name, f.name, sizeof f.name);
    check_accept(qcow2_feature_name_check(&g), "bit 63");

    f.type = 3;
    qcbt_error_clear();
    check_reject(qcow2_feature_name_check(&f), EINVAL, "type 3", "type");
    f.type = 0;
    f.bit = 64;
    check_reject(qcow2_feature_name_check(&f), EINVAL, "bit 64", "bit");
}

/* ------------------------------------------------------------------ */
/* Bitmaps extension */

static void
test_bitmaps_ext(void **state)
{
    struct qcow2_bitmaps_ext want = {1, 0, 32, 0x50000}, x;
    struct qcow2_header_ext ext;
    unsigned char buf[8 + 24];

    (void)state;
    qcow2_header_ext_decode(QEMU_BITMAPS_EXT, &ext);
    assert_int_equal(ext.type, QCOW2_EXT_BITMAPS);
    assert_int_equal(ext.len, QCOW2_BITMAPS_EXT_SIZE);
    qcow2_bitmaps_ext_decode(QEMU_BITMAPS_EXT + 8, &x);
    assert_int_equal(x.nb_bitmaps, 1);
    assert_int_equal(x.reserved32, 0);
    assert_int_equal(x.bitmap_directory_size, 32);
    assert_int_equal(x.bitmap_directory_offset, 0x50000);
    check_accept(qcow2_bitmaps_ext_check(&x, 64 * KiB, QEMU_FILE_SIZE_BITMAP),
                 "qemu");
    qcow2_header_ext_encode(&ext, buf);
    qcow2_bitmaps_ext_encode(&want, buf + 8);
    assert_memory_equal(buf, QEMU_BITMAPS_EXT, sizeof buf);

    /* round trip, every field distinct */
    want = (struct qcow2_bitmaps_ext){0x01020304,
                                      0x05060708,
                                      0x1112131415161718ULL,
                                      0x2122232425262728ULL};
    qcow2_bitmaps_ext_encode(&want, buf);
    qcow2_bitmaps_ext_decode(buf, &x);
    assert_int_equal(x.nb_bitmaps, want.nb_bitmaps);
    assert_int_equal(x.reserved32, want.reserved32);
    assert_int_equal(x.bitmap_directory_size, want.bitmap_directory_size);
    assert_int_equal(x.bitmap_directory_offset, want.bitmap_directory_offset);
}

#define BAD_BITMAPS_EXT(mutation, sub)                                    \
    do {                                                                  \
        struct qcow2_bitmaps_ext e = {1, 0, 32, 0x50000};                 \
        mutation;                                                         \
        qcbt_error_clear();                                               \
        check_reject(                                                     \
            qcow2_bitmaps_ext_check(&e, 64 * KiB, QEMU_FILE_SIZE_BITMAP), \
            EINVAL,                                                       \
            (sub),                                                        \
            #mutation);                                                   \
    } while (0)

static void
test_bitmaps_ext_check(void **state)
{
    (void)state;
    BAD_BITMAPS_EXT(e.reserved32 = 1, "reserved");
    BAD_BITMAPS_EXT(e.nb_bitmaps = 0, "0 bitmaps");
    BAD_BITMAPS_EXT(e.nb_bitmaps = QCOW2_MAX_BITMAPS + 1, "65536 bitmaps");
    BAD_BITMAPS_EXT(e.bitmap_directory_size = 0, "directory size 0");
    BAD_BITMAPS_EXT(e.bitmap_directory_size = QCOW2_MAX_BITMAP_DIR_SIZE + 1,
                    "directory size 67107841");
    BAD_BITMAPS_EXT(e.bitmap_directory_offset = 0x50200, "misaligned");
    BAD_BITMAPS_EXT(e.bitmap_directory_offset = 0x50000 + 64 * KiB,
                    "past the end of the file");
    BAD_BITMAPS_EXT(e.bitmap_directory_offset = 0xffffffffffff0000ULL,
                    "past the end of the file");
}

/* ------------------------------------------------------------------ */
/* Bitmap directory entry */

static void
assert_entry_equal(const struct qcow2_bitmap_dir_entry *a,
                   const struct qcow2_bitmap_dir_entry *b)
{
    assert_int_equal(a->bitmap_table_offset, b->bitmap_table_offset);
    assert_int_equal(a->bitmap_table_size, b->bitmap_table_size);
    assert_int_equal(a->flags, b->flags);
    assert_int_equal(a->type, b->type);
    assert_int_equal(a->granularity_bits, b->granularity_bits);
    assert_int_equal(a->name_size, b->name_size);
    assert_memory_equal(a->name, b->name, a->name_size);
}

static void
test_dir_entry_qemu_bytes(void **state)
{
    struct qcow2_bitmap_dir_entry want = {
        .bitmap_table_offset = 0x40000,
        .bitmap_table_size = 1,
        .flags = QCOW2_BME_FLAG_AUTO,
        .type = QCOW2_BME_TYPE_DIRTY_TRACKING,
        .granularity_bits = 16,
        .name_size = 2,
        .name = "b0",
    };
    struct qcow2_bitmap_dir_entry e;
    unsigned char buf[40];

    (void)state;
    assert_int_equal(qcow2_bitmap_dir_entry_decode(QEMU_DIR_ENTRY_B0, 32, &e),
                     0);
    assert_entry_equal(&e, &want);
    assert_ptr_equal(e.name, (const char *)QEMU_DIR_ENTRY_B0 + 24);
    assert_int_equal(qcow2_bitmap_dir_entry_size(&e), 32);
    check_accept(qcow2_bitmap_dir_entry_check(&e, 64 * KiB, 64 * MiB), "b0");
    memset(buf, 0xa5, sizeof buf);
    assert_int_equal(qcow2_bitmap_dir_entry_encode(&want, buf, sizeof buf), 32);
    assert_memory_equal(buf, QEMU_DIR_ENTRY_B0, 32);
    assert_int_equal(buf[32], 0xa5);
}

static void
test_dir_entry_round_trip(void **state)
{
    static char name[QCOW2_BME_MAX_NAME_SIZE];
    static const uint16_t sizes[] = {1, 7, 8, 9, 16, 17, 1022, 1023};
    unsigned char buf[24 + QCOW2_BME_MAX_NAME_SIZE + 8];
    size_t i, k;

    (void)state;
    for (k = 0; k < sizeof name; k++)
        name[k] = (char)('a' + k % 26);
    for (i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        struct qcow2_bitmap_dir_entry x = {
            .bitmap_table_offset = 0x0102030405060708ULL,
            .bitmap_table_size = 0x11121314,
            .flags = 0x21222324,
            .type = 0x31,
            .granularity_bits = 0x41,
            .name_size = sizes[i],
            .name = name,
        };
        struct qcow2_bitmap_dir_entry y;
        uint64_t size = (24 + sizes[i] + 7) / 8 * 8;

        assert_int_equal(qcow2_bitmap_dir_entry_size(&x), size);
        memset(buf, 0xa5, sizeof buf);
        assert_int_equal(qcow2_bitmap_dir_entry_encode(&x, buf, size), size);
        /* zero padding, nothing written past the entry */
        for (k = 24 + sizes[i]; k < size; k++)
            assert_int_equal(buf[k], 0);
        if (size < sizeof buf)
            assert_int_equal(buf[size], 0xa5);
        /* exactly the bytes the entry takes are enough to decode it */
        assert_int_equal(qcow2_bitmap_dir_entry_decode(buf, size, &y), 0);
        assert_entry_equal(&x, &y);
        /* and one byte less is not enough to encode it */
        qcbt_error_clear();
        check_reject((int)qcow2_bitmap_dir_entry_encode(&x, buf, size - 1),
                     ENOSPC,
                     "does not fit",
                     "encode short");
    }
}

static void
test_dir_entry_decode_bad(void **state)
{
    unsigned char buf[64];
    struct qcow2_bitmap_dir_entry e;

    (void)state;
    memcpy(buf, QEMU_DIR_ENTRY_B0, 32);
    qcbt_error_clear();
    check_reject(qcow2_bitmap_dir_entry_decode(buf, 23, &e),
                 EINVAL,
                 "truncated (23 of the 24 bytes",
                 "fixed part cut");
    check_reject(qcow2_bitmap_dir_entry_decode(buf, 31, &e),
                 EINVAL,
                 "entry of 32 bytes runs past the end of the directory (31",
                 "padding cut");
    /* name_size 0xffff, extra_data_size ~0: 64-bit size arithmetic */
    buf[18] = buf[19] = 0xff;
    memset(buf + 20, 0xff, 4);
    check_reject(qcow2_bitmap_dir_entry_decode(buf, sizeof buf, &e),
                 EINVAL,
                 "runs past the end",
                 "both sizes huge");
    /* extra data QEMU refuses, even when it fits */
    memcpy(buf, QEMU_DIR_ENTRY_B0, 32);
    buf[23] = 8;
    memmove(buf + 32, buf + 24, 8);
    check_reject(qcow2_bitmap_dir_entry_decode(buf, 40, &e),
                 ENOTSUP,
                 "extra_data_size 8",
                 "extra data");
}

#define BAD_ENTRY(mutation, sub)                                           \
    do {                                                                   \
        struct qcow2_bitmap_dir_entry e = good;                            \
        mutation;                                                          \
        qcbt_error_clear();                                                \
        check_reject(qcow2_bitmap_dir_entry_check(&e, 64 * KiB, 64 * MiB), \
                     EINVAL,                                               \
                     (sub),                                                \
                     #mutation);                                           \
    } while (0)

static void
test_dir_entry_check(void **state)
{
    static char long_name[QCOW2_BME_MAX_NAME_SIZE + 1];
    const struct qcow2_bitmap_dir_entry good = {
        .bitmap_table_offset = 0x40000,
        .bitmap_table_size = 1,
        .flags = QCOW2_BME_FLAG_AUTO,
        .type = QCOW2_BME_TYPE_DIRTY_TRACKING,
        .granularity_bits = 16,
        .name_size = 2,
        .name = "b0",
    };
    struct qcow2_bitmap_dir_entry ok = good;

    (void)state;
    memset(long_name, 'x', sizeof long_name);
    check_accept(qcow2_bitmap_dir_entry_check(&ok, 64 * KiB, 64 * MiB), "good");
    ok.name = "\xc3\xa9t\xc3\xa9"; /* "été" */
    ok.name_size = 5;
    check_accept(qcow2_bitmap_dir_entry_check(&ok, 64 * KiB, 64 * MiB), "utf8");
    ok = good;
    ok.name = long_name;
    ok.name_size = QCOW2_BME_MAX_NAME_SIZE;
    check_accept(qcow2_bitmap_dir_entry_check(&ok, 64 * KiB, 64 * MiB), "1023");

    BAD_ENTRY(e.name_size = 0, "name size 0");
    BAD_ENTRY((e.name = long_name, e.name_size = QCOW2_BME_MAX_NAME_SIZE + 1),
              "name size 1024");
    BAD_ENTRY((e.name = "a\0b", e.name_size = 3), "NUL");
    BAD_ENTRY((e.name = "a\xc3", e.name_size = 2), "UTF-8");
    BAD_ENTRY((e.name = "\xed\xa0\x80", e.name_size = 3), "UTF-8");
    BAD_ENTRY(e.type = 2, "'b0': unknown type 2");
    BAD_ENTRY(e.flags |= QCOW2_BME_FLAG_EXTRA_DATA_COMPATIBLE,
              "unsupported flags 0x6");
    BAD_ENTRY(e.flags = 1u << 31, "unsupported flags 0x80000000");
    BAD_ENTRY(e.granularity_bits = 8, "granularity_bits 8");
    BAD_ENTRY(e.granularity_bits = 32, "granularity_bits 32");
    BAD_ENTRY(e.bitmap_table_size = 0, "table size 0");
    BAD_ENTRY(e.bitmap_table_size = QCOW2_BME_MAX_TABLE_SIZE + 1,
              "table size 134217729");
    BAD_ENTRY(e.bitmap_table_size = 512 * MiB / (64 * KiB) + 1, "512 MiB");
    BAD_ENTRY(e.bitmap_table_offset = 0, "table offset 0x0");
    BAD_ENTRY(e.bitmap_table_offset = 0x40200, "not cluster aligned");
    BAD_ENTRY(e.bitmap_table_size = 2, "2 entries, 1 expected");
    /* 1 entry covers 32 GiB at 64 KiB granularity: 64 GiB needs 2 */
    ok = good;
    qcbt_error_clear();
    check_reject(qcow2_bitmap_dir_entry_check(&ok, 64 * KiB, 64 * 1024 * MiB),
                 EINVAL,
                 "1 entries, 2 expected",
                 "64 GiB");

    /* in_use: the size may be stale (a resize while in use) */
    ok = good;
    ok.flags = QCOW2_BME_FLAG_IN_USE;
    ok.bitmap_table_size = 2;
    check_accept(qcow2_bitmap_dir_entry_check(&ok, 64 * KiB, 64 * MiB),
                 "in_use, stale size");

    /* the size needed (qcow2-format.md 14.4) */
    assert_int_equal(qcow2_bitmap_table_size_needed(64 * MiB, 64 * KiB, 16), 1);
    assert_int_equal(
        qcow2_bitmap_table_size_needed(32 * 1024 * MiB, 64 * KiB, 16),
        1);
    assert_int_equal(
        qcow2_bitmap_table_size_needed(32 * 1024 * MiB + 1, 64 * KiB, 16),
        2);
    assert_int_equal(qcow2_bitmap_table_size_needed(0, 64 * KiB, 16), 0);
    assert_int_equal(qcow2_bitmap_table_size_needed(1, 512, 31), 1);
    /* 8 * 512 bits of 512 bytes: 2 MiB per entry with 512-byte clusters */
    assert_int_equal(qcow2_bitmap_table_size_needed(2 * MiB, 512, 9), 1);
    assert_int_equal(qcow2_bitmap_table_size_needed(2 * MiB + 1, 512, 9), 2);
}

/* ------------------------------------------------------------------ */
/* Bitmap table entry */

static void
test_table_entry(void **state)
{
    struct qcow2_bitmap_table_entry e;
    unsigned char buf[8], out[8];
    uint64_t v = 0x9e3779b97f4a7c15ULL;
    int i;

    (void)state;
    /* what QEMU wrote */
    qcow2_bitmap_table_entry_decode(QEMU_TABLE_ENTRY, &e);
    assert_int_equal(e.offset, 0x80000);
    assert_false(e.all_ones);
    assert_int_equal(e.reserved, 0);
    check_accept(qcow2_bitmap_table_entry_check(&e, 64 * KiB), "qemu");
    qcow2_bitmap_table_entry_encode(&e, out);
    assert_memory_equal(out, QEMU_TABLE_ENTRY, 8);

    /* the masks cover the 64 bits exactly once, so every pattern
     * survives decode and encode */
    assert_int_equal(QCOW2_BME_TABLE_OFFSET_MASK &
                         QCOW2_BME_TABLE_RESERVED_MASK,
                     0);
    assert_int_equal(QCOW2_BME_TABLE_OFFSET_MASK |
                         QCOW2_BME_TABLE_RESERVED_MASK |
                         QCOW2_BME_TABLE_ALL_ONES,
                     UINT64_MAX);
    for (i = 0; i < 1000; i++) {
        v ^= v << 13;
        v ^= v >> 7;
        v ^= v << 17;
        qcow2_table_set(buf, 0, v);
        qcow2_bitmap_table_entry_decode(buf, &e);
        qcow2_bitmap_table_entry_encode(&e, out);
        assert_memory_equal(out, buf, 8);
    }

    /* QEMU's check_table_entry(), one case per rule */
    e = (struct qcow2_bitmap_table_entry){0, false, 0};
    check_accept(qcow2_bitmap_table_entry_check(&e, 64 * KiB), "zeros");
    e.all_ones = true;
    check_accept(qcow2_bitmap_table_entry_check(&e, 64 * KiB), "ones");
    e = (struct qcow2_bitmap_table_entry){0, false, 1ULL << 1};
    qcbt_error_clear();
    check_reject(qcow2_bitmap_table_entry_check(&e, 64 * KiB),
                 EINVAL,
                 "reserved bits 0x0000000000000002",
                 "bit 1");
    e.reserved = 1ULL << 56;
    check_reject(qcow2_bitmap_table_entry_check(&e, 64 * KiB),
                 EINVAL,
                 "reserved bits",
                 "bit 56");
    e = (struct qcow2_bitmap_table_entry){0x80000, true, 0};
    check_reject(qcow2_bitmap_table_entry_check(&e, 64 * KiB),
                 EINVAL,
                 "all-ones",
                 "offset and all-ones");
    e = (struct qcow2_bitmap_table_entry){0x80200, false, 0};
    check_reject(qcow2_bitmap_table_entry_check(&e, 64 * KiB),
                 EINVAL,
                 "data offset 0x80200 is not cluster aligned",
                 "unaligned");
    check_accept(qcow2_bitmap_table_entry_check(&e, 512), "512-byte cluster");
}

/* ------------------------------------------------------------------ */
/* L1/L2/refcount entries, tables and refcount blocks */

static void
test_entry_masks(void **state)
{
    (void)state;
    /* L1: offset, reserved, copied partition the bits */
    assert_int_equal(QCOW2_L1E_OFFSET_MASK & QCOW2_L1E_RESERVED_MASK, 0);
    assert_int_equal(QCOW2_L1E_OFFSET_MASK | QCOW2_L1E_RESERVED_MASK |
                         QCOW2_OFLAG_COPIED,
                     UINT64_MAX);
    /* standard L2: offset, reserved, zero, compressed, copied */
    assert_int_equal(QCOW2_L2E_OFFSET_MASK & QCOW2_L2E_STD_RESERVED, 0);
    assert_int_equal(QCOW2_L2E_OFFSET_MASK | QCOW2_L2E_STD_RESERVED |
                         QCOW2_OFLAG_ZERO | QCOW2_OFLAG_COMPRESSED |
                         QCOW2_OFLAG_COPIED,
                     UINT64_MAX);
    /* bits 9-55: host offsets below 2^56 */
    assert_int_equal(QCOW2_L2E_OFFSET_MASK, QCOW2_MAX_HOST_OFFSET & ~511ULL);
    assert_int_equal(QCOW2_REFT_OFFSET_MASK, ~511ULL);
}

/* qcow2_l2_entry_check(): one case per rule, and the entries QEMU writes
 * pass (qcow2-format.md section 5).
 */
static void
test_l2_entry_check(void **state)
{
    struct qcow2_header v3 = {.version = 3, .cluster_bits = 16};
    struct qcow2_header v2 = {.version = 2, .cluster_bits = 16};
    struct qcow2_header ext = v3, dfile = v3;
    const uint64_t data = 0x8000000000050000ULL;
    const uint64_t compressed = QCOW2_OFLAG_COMPRESSED | 0x1234567ULL;

    (void)state;
    ext.incompatible_features = QCOW2_INCOMPAT_EXTL2;
    dfile.incompatible_features = QCOW2_INCOMPAT_DATA_FILE;

    check_accept(qcow2_l2_entry_check(0, 0, &v3), "unallocated");
    check_accept(qcow2_l2_entry_check(data, 0, &v3), "data");
    check_accept(qcow2_l2_entry_check(data, 0, &v2), "v2 data");
    check_accept(qcow2_l2_entry_check(QCOW2_OFLAG_ZERO, 0, &v3), "zero");
    check_accept(qcow2_l2_entry_check(data | QCOW2_OFLAG_ZERO, 0, &v3),
                 "zero with a preallocated cluster");
    /* bit 0 of a compressed descriptor is part of its offset */
    check_accept(qcow2_l2_entry_check(compressed, 0, &v2), "v2 compressed");

    check_reject(qcow2_l2_entry_check(QCOW2_OFLAG_ZERO, 0, &v2),
                 EIO,
                 "reserved bit 0 (the zero flag) set in a version 2 image",
                 "v2 zero flag");
    check_reject(qcow2_l2_entry_check(data | QCOW2_OFLAG_ZERO, 0, &v2),
                 EIO,
                 "version 2",
                 "v2 zero flag with a host offset");
    check_reject(qcow2_l2_entry_check(data | 2, 0, &v3),
                 EIO,
                 "reserved bits set",
                 "bit 1");
    check_reject(qcow2_l2_entry_check(data | (1ULL << 56), 0, &v3),
                 EIO,
                 "reserved bits set",
                 "bit 56");
    check_reject(qcow2_l2_entry_check(0x8000000000050200ULL, 0, &v3),
                 EIO,
                 "data offset not cluster aligned",
                 "unaligned");
    v2.cluster_bits = 9;
    check_accept(qcow2_l2_entry_check(0x8000000000050200ULL, 0, &v2),
                 "aligned to 512-byte clusters");

    check_reject(qcow2_l2_entry_check(compressed, 0, &dfile),
                 EIO,
                 "compressed cluster with an external data file",
                 "compressed + data file");
    check_accept(qcow2_l2_entry_check(compressed, 0, &ext),
                 "compressed, extended L2");
    check_reject(qcow2_l2_entry_check(compressed, 1, &ext),
                 EIO,
                 "non-zero subcluster bitmap",
                 "compressed + bitmap");

    /* extended L2 */
    check_accept(qcow2_l2_entry_check(data, 0x0000000100000002ULL, &ext),
                 "alloc and zero in different subclusters");
    check_reject(qcow2_l2_entry_check(data, 0x0000000200000002ULL, &ext),
                 EIO,
                 "subcluster both allocated and zero",
                 "alloc + zero");
    check_accept(qcow2_l2_entry_check(0, 0xffffffff00000000ULL, &ext),
                 "unallocated cluster, zero subclusters");
    check_reject(qcow2_l2_entry_check(0, 1, &ext),
                 EIO,
                 "allocated subclusters in an unallocated cluster",
                 "alloc bit without a cluster");
    /* with a data file, COPIED alone makes the cluster allocated */
    ext.incompatible_features |= QCOW2_INCOMPAT_DATA_FILE;
    check_accept(qcow2_l2_entry_check(QCOW2_OFLAG_COPIED, 1, &ext),
                 "data file, offset 0");
    /* without extended L2 the bitmap is not looked at */
    check_accept(qcow2_l2_entry_check(0, 1, &v3), "standard L2");
}

static void
test_tables(void **state)
{
    unsigned char t[24];

    (void)state;
    /* qcow2-format.md section 5: a fresh write, then "write -z" */
    memset(t, 0xa5, sizeof t);
    qcow2_table_set(t, 1, 0x8000000000050000ULL);
    assert_memory_equal(t + 8, "\x80\x00\x00\x00\x00\x05\x00\x00", 8);
    assert_int_equal(t[0], 0xa5);
    assert_int_equal(t[16], 0xa5);
    assert_int_equal(qcow2_table_get(t, 1), 0x8000000000050000ULL);
    qcow2_table_set(t, 2, 0x8000000000050001ULL);
    assert_int_equal(qcow2_table_get(t, 2) & QCOW2_OFLAG_ZERO, 1);
    assert_int_equal(qcow2_table_get(t, 2) & QCOW2_L2E_OFFSET_MASK, 0x50000);
}

static void
test_refblocks(void **state)
{
    /* qcow2-format.md section 6: four used clusters, by width */
    static const struct {
        unsigned order;
        size_t len;
        const char *bytes;
    } used4[] = {
        {0, 1, "\x0f"},
        {1, 1, "\x55"},
        {2, 2, "\x11\x11"},
        {3, 4, "\x01\x01\x01\x01"},
        {4, 8, "\x00\x01\x00\x01\x00\x01\x00\x01"},
        {5, 16, "\0\0\0\x01\0\0\0\x01\0\0\0\x01\0\0\0\x01"},
        {6,
         32,
         "\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x01"
         "\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x01"},
    };
    unsigned char b[64];
    size_t i;
    uint64_t k;

    (void)state;
    for (i = 0; i < sizeof used4 / sizeof used4[0]; i++) {
        unsigned order = used4[i].order;
        unsigned bits = 1u << order;
        uint64_t max = bits == 64 ? UINT64_MAX : (1ULL << bits) - 1;
        uint64_t n = sizeof b * 8 / bits;

        memset(b, 0, sizeof b);
        for (k = 0; k < 4; k++)
            qcow2_refblock_set(b, order, k, 1);
        assert_memory_equal(b, used4[i].bytes, used4[i].len);
        for (k = used4[i].len; k < sizeof b; k++)
            assert_int_equal(b[k], 0);
        for (k = 0; k < n; k++)
            assert_int_equal(qcow2_refblock_get(b, order, k), k < 4);
        /* the largest refcount, without touching the neighbours */
        qcow2_refblock_set(b, order, 5, max);
        assert_int_equal(qcow2_refblock_get(b, order, 5), max);
        assert_int_equal(qcow2_refblock_get(b, order, 4), 0);
        assert_int_equal(qcow2_refblock_get(b, order, 6), 0);
        qcow2_refblock_set(b, order, 5, 0);
        assert_int_equal(qcow2_refblock_get(b, order, 5), 0);
        assert_int_equal(qcow2_refblock_get(b, order, 3), 1);
    }
}

/* ------------------------------------------------------------------ */
/* Compressed cluster descriptor */

static void
test_compressed_desc(void **state)
{
    /* qcow2-format.md section 5, three clusters packed in one host
     * cluster by qemu (cluster_bits 16) */
    static const struct {
        uint64_t entry, offset, len;
    } qemu[] = {
        {0x4000000000050000ULL, 0x50000, 512},
        {0x400000000005009eULL, 0x5009e, 354},
        {0x400000000005013cULL, 0x5013c, 196},
    };
    struct qcow2_compressed_desc d, e;
    unsigned cb;
    size_t i;

    (void)state;
    for (i = 0; i < 3; i++) {
        qcow2_compressed_desc_decode(qemu[i].entry, 16, &d);
        assert_int_equal(d.host_offset, qemu[i].offset);
        assert_int_equal(d.nb_sectors, 0);
        assert_int_equal(qcow2_compressed_desc_len(&d), qemu[i].len);
        check_accept(qcow2_compressed_desc_check(&d, 16), "qemu");
        assert_int_equal(qcow2_compressed_desc_encode(&d, 16), qemu[i].entry);
    }
    /* the largest values of every layout survive the round trip */
    for (cb = QCOW2_MIN_CLUSTER_BITS; cb <= QCOW2_MAX_CLUSTER_BITS; cb++) {
        unsigned x = 62 - (cb - 8);
        uint64_t off_max = (1ULL << x) - 1;

        d.host_offset =
            off_max < QCOW2_MAX_HOST_OFFSET ? off_max : QCOW2_MAX_HOST_OFFSET;
        d.nb_sectors = (1ULL << (cb - 8)) - 1;
        check_accept(qcow2_compressed_desc_check(&d, cb), "max");
        qcow2_compressed_desc_decode(qcow2_compressed_desc_encode(&d, cb),
                                     cb,
                                     &e);
        assert_int_equal(e.host_offset, d.host_offset);
        assert_int_equal(e.nb_sectors, d.nb_sectors);
        assert_int_equal(qcow2_compressed_desc_encode(&d, cb) >> 62, 1);
        assert_int_equal(qcow2_compressed_max_len(cb), 2ULL << cb);
    }
    assert_int_equal(qcow2_compressed_max_len(16), 128 * KiB);

    /* one case per rule */
    d = (struct qcow2_compressed_desc){1ULL << 56, 0};
    qcbt_error_clear();
    check_reject(qcow2_compressed_desc_check(&d, 9),
                 EINVAL,
                 "host offset 0x100000000000000 too large",
                 "2^56");
    d = (struct qcow2_compressed_desc){1ULL << 49, 0};
    check_reject(qcow2_compressed_desc_check(&d, 21),
                 EINVAL,
                 "host offset",
                 "past the 49-bit field");
    d = (struct qcow2_compressed_desc){0x50000, 256};
    check_reject(qcow2_compressed_desc_check(&d, 16),
                 EINVAL,
                 "256 additional sectors",
                 "count field");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_header_qemu_bytes),
        cmocka_unit_test(test_header_round_trip),
        cmocka_unit_test(test_header_decode_short),
        cmocka_unit_test(test_header_check),
        cmocka_unit_test(test_header_ext),
        cmocka_unit_test(test_feature_names),
        cmocka_unit_test(test_bitmaps_ext),
        cmocka_unit_test(test_bitmaps_ext_check),
        cmocka_unit_test(test_dir_entry_qemu_bytes),
        cmocka_unit_test(test_dir_entry_round_trip),
        cmocka_unit_test(test_dir_entry_decode_bad),
        cmocka_unit_test(test_dir_entry_check),
        cmocka_unit_test(test_table_entry),
        cmocka_unit_test(test_entry_masks),
        cmocka_unit_test(test_l2_entry_check),
        cmocka_unit_test(test_tables),
        cmocka_unit_test(test_refblocks),
        cmocka_unit_test(test_compressed_desc),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}

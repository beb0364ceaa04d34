/* qcbt unit tests: the qcow2 reader and backing chains against good and
 * hostile images (reliability-catalogue.md 3(a), items A1-A30).
 *
 * Images are built in memory by qcow2-builder.c; chain tests write them
 * into a private mkdtemp() directory.  Every refusal must be a negative
 * errno with a one-line message that names the field at fault; the whole
 * suite also runs under ASan+UBSan, where a read outside an image buffer
 * (each is malloc'ed to its exact length) or an undefined shift fails it.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cmocka.h>

#include "chain.h"
#include "error.h"
#include "io.h"
#include "minmax.h"
#include "qcow2.h"
#include "qcow2-builder.h"
#include "test-tmpdir.h"

#define KiB 1024ULL
#define MiB (1024ULL * 1024)

/* ------------------------------------------------------------------ */
/* Helpers */

/* Deterministic bytes: a xorshift stream seeded per cluster. */
static void
fill(void *buf, size_t len, uint64_t seed)
{
    unsigned char *p = buf;
    uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 0x1234567;
    size_t i;

    for (i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (unsigned char)x;
    }
}

/* Compressible bytes: runs of a per-seed value with a little noise. */
static void
fill_compressible(void *buf, size_t len, uint64_t seed)
{
    unsigned char *p = buf;
    size_t i;

    for (i = 0; i < len; i++)
        p[i] = (unsigned char)(seed * 7 + (i / 97) + ((i % 1024) == 5 ? i : 0));
}

static unsigned char *
dup_buf(const void *p, size_t len)
{
    unsigned char *d = malloc(len ? len : 1);

    assert_non_null(d);
    memcpy(d, p, len);
    return d;
}

static int
open_mem(const unsigned char *buf, size_t len, struct qcow2_image **img)
{
    struct qcbt_io *io;

    *img = NULL;
    qcbt_error_clear();
    assert_int_equal(qcbt_io_open_mem(buf, len, "test.qcow2", &io), 0);
    return qcow2_open(io, img);
}

/* R must be a negative errno, the message non-empty and contain every
 * NULL-terminated substring, and the recorded errno must agree.
 */
static void
check_err(int r, const char *what, ...)
{
    const char *msg = qcbt_error_get();
    const char *sub;
    va_list ap;

    if (r >= 0)
        fail_msg("%s: expected an error, got %d", what, r);
    if (r < -4095)
        fail_msg("%s: %d is not a negative errno", what, r);
    if (!msg[0])
        fail_msg("%s: error %d without a message", what, r);
    if (strchr(msg, '\n'))
        fail_msg("%s: message is not one line: %s", what, msg);
    if (qcbt_error_errno() != -r)
        fail_msg("%s: returned %d but recorded errno %d (%s)",
                 what,
                 r,
                 qcbt_error_errno(),
                 msg);
    va_start(ap, what);
    while ((sub = va_arg(ap, const char *)) != NULL) {
        if (!strstr(msg, sub)) {
            va_end(ap);
            fail_msg("%s: message \"%s\" does not name \"%s\"", what, msg, sub);
        }
    }
    va_end(ap);
}

#define CHECK_ERR(r, what, ...) check_err((r), (what), __VA_ARGS__, NULL)

/* qcow2_open must refuse BUF with a message naming SUB. */
static void
expect_open_fail(const unsigned char *buf,
                 size_t len,
                 const char *what,
                 const char *sub)
{
    struct qcow2_image *img;
    int r = open_mem(buf, len, &img);

    if (r >= 0) {
        qcow2_close(img);
        fail_msg("%s: qcow2_open accepted the image", what);
    }
    check_err(r, what, sub, NULL);
}

static struct qcow2_image *
expect_open_ok(const unsigned char *buf, size_t len, const char *what)
{
    struct qcow2_image *img;
    int r = open_mem(buf, len, &img);

    if (r < 0)
        fail_msg("%s: qcow2_open failed: %d %s", what, r, qcbt_error_get());
    assert_non_null(img);
    return img;
}

/* A one-layer chain over an in-memory image, to read guest bytes. */
static struct chain *
chain_mem(const unsigned char *buf, size_t len, const char *what)
{
    struct qcbt_io *io;
    struct chain *c;
    int r;

    qcbt_error_clear();
    assert_int_equal(qcbt_io_open_mem(buf, len, "test.qcow2", &io), 0);
    r = chain_open_io(io, "qcow2", NULL, NULL, &c);
    if (r < 0)
        fail_msg("%s: chain_open_io failed: %s", what, qcbt_error_get());
    return c;
}

static void
poke32(unsigned char *img, uint64_t off, uint32_t v)
{
    qb_put_be32(img, off, v);
}

static void
poke64(unsigned char *img, uint64_t off, uint64_t v)
{
    qb_put_be64(img, off, v);
}

/* Header mutation: copy BASE, poke a WIDTH-byte big-endian VALUE at OFF,
 * expect qcow2_open to refuse naming SUB.
 */
static void
mutate_fail(const unsigned char *base,
            size_t len,
            uint64_t off,
            int width,
            uint64_t value,
            const char *sub)
{
    unsigned char *m = dup_buf(base, len);
    char what[128];

    if (width == 4)
        poke32(m, off, (uint32_t)value);
    else if (width == 8)
        poke64(m, off, value);
    else
        m[off] = (unsigned char)value;
    snprintf(what,
             sizeof what,
             "header offset %" PRIu64 " = 0x%" PRIx64,
             off,
             value);
    expect_open_fail(m, len, what, sub);
    free(m);
}

/* A good v3 (or v2) image, 64 KiB clusters, 4 MiB, cluster 0 written. */
static unsigned char *
good_image(unsigned version, size_t *len)
{
    struct qb *b = qb_new(version, 16, 4 * MiB, false, false);
    unsigned char *data = malloc(64 * KiB);
    unsigned char *img;

    assert_non_null(data);
    fill(data, 64 * KiB, 1);
    qb_write_cluster(b, 0, data);
    img = qb_finish(b, len);
    qb_free(b);
    free(data);
    return img;
}

/* ------------------------------------------------------------------ */
/* Good images */

/* v3 standard L2 (and the same layout as v2, without zero clusters):
 * data runs, zero-plain, zero-alloc, unallocated, a cluster with only the
 * copied bit, two L2 tables.
 */
static void
check_standard(unsigned version)
{
    const uint64_t cs = 4 * KiB, size = 4 * MiB, nclusters = size / cs;
    struct qb *b = qb_new(version, 12, size, false, false);
    unsigned char *model = calloc(1, size), *out = malloc(size);
    unsigned char *img;
    size_t len;
    uint64_t h0 = 0, h3 = 0, gc;
    struct qcow2_image *q;
    struct qcow2_extent e;
    struct chain *c;
    struct chain_status st;
    unsigned char cl[4096];

    assert_non_null(model);
    assert_non_null(out);
    for (gc = 0; gc < nclusters; gc++) {
        bool write = gc == 0 || gc == 1 || gc == 511 || gc == 512 ||
                     gc == nclusters - 1 || (gc >= 600 && gc < 610);
        if (!write)
            continue;
        fill(cl, cs, gc + 100);
        if (gc == 0)
            h0 = qb_write_cluster(b, gc, cl);
        else
            qb_write_cluster(b, gc, cl);
        memcpy(model + gc * cs, cl, cs);
    }
    if (version >= 3) {
        /* zero plain; zero alloc over real bytes (must still read 0) */
        qb_set_l2(b, 2, 1, 0);
        fill(cl, cs, 999);
        h3 = qb_alloc_cluster(b, cl, cs);
        qb_set_l2(b, 3, h3 | (1ULL << 63) | 1, 0);
    }
    /* copied bit with offset 0: unallocated, never the header's bytes */
    qb_set_l2(b, 5, 1ULL << 63, 0);
    img = qb_finish(b, &len);
    qb_free(b);

    q = expect_open_ok(img, len, "standard image");
    assert_int_equal(q->hdr.version, version);
    assert_int_equal(q->cluster_size, cs);
    assert_int_equal(q->size, size);
    assert_int_equal(q->l2_entries, cs / 8);
    assert_int_equal(q->hdr.l1_size, 2);
    assert_false(q->extended_l2);
    assert_null(q->backing_name);

    /* clusters 0 and 1 are host-contiguous: one run */
    assert_int_equal(qcow2_map(q, 0, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.len, 2 * cs);
    assert_int_equal(e.host_offset, h0);
    assert_true(e.offset_valid);
    assert_int_equal(qcow2_map(q, 100, 10, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.len, 10);
    assert_int_equal(e.host_offset, h0 + 100);
    if (version >= 3) {
        assert_int_equal(qcow2_map(q, 2 * cs, size, &e), 0);
        assert_int_equal(e.kind, QCOW2_ZERO);
        assert_int_equal(e.len, cs);
        assert_false(e.offset_valid);
        assert_int_equal(qcow2_map(q, 3 * cs + 5, size, &e), 0);
        assert_int_equal(e.kind, QCOW2_ZERO);
        assert_int_equal(e.len, cs - 5);
        assert_true(e.offset_valid);
        assert_int_equal(e.host_offset, h3 + 5);
    }
    /* 4, 5 (copied bit only) ... 510 unallocated */
    assert_int_equal(qcow2_map(q, 4 * cs, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_UNALLOCATED);
    assert_int_equal(e.len, 507 * cs);
    /* a run of empty entries ends where the request does */
    assert_int_equal(qcow2_map(q, 6 * cs + 7, 100 * cs, &e), 0);
    assert_int_equal(e.kind, QCOW2_UNALLOCATED);
    assert_false(e.offset_valid);
    assert_int_equal(e.len, 100 * cs);
    /* 511 and 512 are in different L2 tables: the run stops at 2 MiB */
    assert_int_equal(qcow2_map(q, 511 * cs, 2 * cs, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.len, cs);
    assert_int_equal(qcow2_map(q, 512 * cs, 2 * cs, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.len, cs);
    assert_int_equal(qcow2_map(q, 600 * cs, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.len, 10 * cs);
    /* clamped to the image end */
    assert_int_equal(qcow2_map(q, size - 1, 100, &e), 0);
    assert_int_equal(e.len, 1);
    /* outside the image */
    CHECK_ERR(qcow2_map(q, size, 1, &e), "map past end", "outside");
    CHECK_ERR(qcow2_map(q, 0, 0, &e), "map of 0 bytes", "outside");
    qcow2_close(q);

    c = chain_mem(img, len, "standard image");
    assert_int_equal(c->size, size);
    assert_int_equal(chain_read(c, out, size, 0), 0);
    assert_memory_equal(out, model, size);
    /* unaligned reads across every kind of boundary */
    assert_int_equal(chain_read(c, out, 3 * cs + 17, cs - 9), 0);
    assert_memory_equal(out, model + cs - 9, 3 * cs + 17);
    assert_int_equal(chain_read(c, out, 2 * cs, 511 * cs - 1), 0);
    assert_memory_equal(out, model + 511 * cs - 1, 2 * cs);
    CHECK_ERR(chain_read(c, out, 2, size - 1), "read past end", "outside");
    assert_int_equal(chain_block_status(c, 0, size, &st), 0);
    assert_true(st.present && st.data && !st.zero);
    assert_int_equal(st.len, 2 * cs);
    if (version >= 3) {
        /* zero-plain then zero-alloc: two runs (offset_valid differs) */
        assert_int_equal(chain_block_status(c, 2 * cs, size, &st), 0);
        assert_true(st.present && st.zero && !st.data);
        assert_int_equal(st.len, cs);
        assert_int_equal(chain_block_status(c, 3 * cs, size, &st), 0);
        assert_true(st.present && st.zero && !st.data);
        assert_int_equal(st.len, cs);
    }
    assert_int_equal(chain_block_status(c, 4 * cs, size, &st), 0);
    assert_true(!st.present && st.zero && !st.data);
    chain_close(c);

    free(img);
    free(model);
    free(out);
}

static void
test_good_v3_standard(void **state)
{
    check_standard(3);
}

static void
test_good_v2_standard(void **state)
{
    check_standard(2);
}

/* Extended L2 (qcow2-format.md 5, "Extended L2 entries"): 64 KiB clusters,
 * 2 KiB subclusters.
 */
static void
test_good_extended_l2(void **state)
{
    const uint64_t cs = 64 * KiB, sc = 2 * KiB, size = 1 * MiB;
    struct qb *b = qb_new(3, 16, size, true, false);
    unsigned char *model = calloc(1, size), *out = malloc(size);
    unsigned char *cl = malloc(cs), *img;
    uint64_t x, y, z;
    size_t len;
    struct qcow2_image *q;
    struct qcow2_extent e;
    struct chain *c;

    assert_non_null(model);
    assert_non_null(out);
    assert_non_null(cl);
    qb_l2_table(b, 0);
    /* cluster 0: subclusters 0 and 3 allocated (bitmap 0x9) */
    fill(cl, cs, 10);
    x = qb_alloc_cluster(b, cl, cs);
    qb_set_l2(b, 0, x | (1ULL << 63), 0x9);
    memcpy(model, cl, sc);
    memcpy(model + 3 * sc, cl + 3 * sc, sc);
    /* cluster 1: unallocated, all subclusters zero */
    qb_set_l2(b, 1, 0, 0xffffffff00000000ULL);
    /* cluster 2: sub 0 and 2 allocated, sub 1 zero (alloc'ed cluster) */
    fill(cl, cs, 12);
    y = qb_alloc_cluster(b, cl, cs);
    qb_set_l2(b, 2, y | (1ULL << 63), 0x5 | (1ULL << 33));
    memcpy(model + 2 * cs, cl, sc);
    memcpy(model + 2 * cs + 2 * sc, cl + 2 * sc, sc);
    /* cluster 3: unallocated, only subcluster 5 zero */
    qb_set_l2(b, 3, 0, 1ULL << 37);
    /* clusters 4 and 5: fully allocated, host-contiguous */
    fill(cl, cs, 14);
    z = qb_write_cluster(b, 4, cl);
    memcpy(model + 4 * cs, cl, cs);
    fill(cl, cs, 15);
    assert_int_equal(qb_write_cluster(b, 5, cl), z + cs);
    memcpy(model + 5 * cs, cl, cs);
    img = qb_finish(b, &len);
    qb_free(b);

    q = expect_open_ok(img, len, "extended L2 image");
    assert_true(q->extended_l2);
    assert_int_equal(q->l2_entries, cs / 16);
    assert_int_equal(q->subcluster_bits, 11);

    assert_int_equal(qcow2_map(q, 0, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.len, sc);
    assert_int_equal(e.host_offset, x);
    assert_int_equal(qcow2_map(q, sc, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_UNALLOCATED);
    assert_true(e.offset_valid); /* allocated cluster, unallocated sub */
    assert_int_equal(e.len, 2 * sc);
    assert_int_equal(qcow2_map(q, 3 * sc + 1, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.len, sc - 1);
    assert_int_equal(e.host_offset, x + 3 * sc + 1);
    assert_int_equal(qcow2_map(q, 4 * sc, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_UNALLOCATED);
    assert_int_equal(e.len, cs - 4 * sc);
    assert_int_equal(qcow2_map(q, cs, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_ZERO);
    assert_false(e.offset_valid);
    assert_int_equal(e.len, cs);
    assert_int_equal(qcow2_map(q, 2 * cs + sc, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_ZERO);
    assert_true(e.offset_valid);
    assert_int_equal(e.len, sc);
    assert_int_equal(qcow2_map(q, 2 * cs + 2 * sc, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.host_offset, y + 2 * sc);
    assert_int_equal(e.len, sc);
    assert_int_equal(qcow2_map(q, 3 * cs, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_UNALLOCATED);
    assert_false(e.offset_valid);
    assert_int_equal(e.len, 5 * sc);
    assert_int_equal(qcow2_map(q, 3 * cs + 5 * sc, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_ZERO);
    assert_int_equal(e.len, sc);
    assert_int_equal(qcow2_map(q, 4 * cs, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.len, 2 * cs);
    assert_int_equal(e.host_offset, z);
    /* clusters 6.. have empty entries: unallocated to the end, or to
     * where the request ends */
    assert_int_equal(qcow2_map(q, 6 * cs + 3 * sc, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_UNALLOCATED);
    assert_false(e.offset_valid);
    assert_int_equal(e.len, size - 6 * cs - 3 * sc);
    assert_int_equal(qcow2_map(q, 7 * cs + 100, 3 * cs, &e), 0);
    assert_int_equal(e.kind, QCOW2_UNALLOCATED);
    assert_int_equal(e.len, 3 * cs);
    qcow2_close(q);

    c = chain_mem(img, len, "extended L2 image");
    assert_int_equal(chain_read(c, out, size, 0), 0);
    assert_memory_equal(out, model, size);
    assert_int_equal(chain_read(c, out, 3 * sc, sc / 2), 0);
    assert_memory_equal(out, model + sc / 2, 3 * sc);
    chain_close(c);
    free(img);
    free(model);
    free(out);
    free(cl);
}

/* Compressed clusters: packed back to back (QEMU's layout), one whose
 * sector count overshoots into the next cluster's bytes, one at the end of
 * the file whose sectors run past EOF, and incompressible data.
 */
static void
check_compressed_good(enum qb_compression method)
{
    const uint64_t cs = 64 * KiB, size = 1 * MiB;
    struct qb *b = qb_new(3, 16, size, false, method == QB_ZSTD);
    unsigned char *model = calloc(1, size), *out = malloc(size);
    unsigned char *cl = malloc(cs), *img, *scratch, *dec = malloc(cs);
    void *z3, *z4, *z5;
    size_t n3, n4, n5, len;
    uint64_t c3, c4, c5, gc, entry;
    struct qcow2_image *q;
    struct qcow2_extent e;
    struct chain *c;
    struct chain_status st;

    assert_non_null(model);
    assert_non_null(out);
    assert_non_null(cl);
    assert_non_null(dec);
    qb_l2_table(b, 0);
    for (gc = 0; gc < 3; gc++) {
        fill_compressible(cl, cs, gc);
        qb_write_compressed(b, gc, cl, NULL, NULL);
        memcpy(model + gc * cs, cl, cs);
    }
    /* gc 3: descriptor covers all of gc 4's bytes and more */
    fill_compressible(cl, cs, 3);
    memcpy(model + 3 * cs, cl, cs);
    n3 = qb_compress(method, cl, cs, &z3);
    fill_compressible(cl, cs, 4);
    memcpy(model + 4 * cs, cl, cs);
    n4 = qb_compress(method, cl, cs, &z4);
    c3 = qb_append(b, z3, n3);
    c4 = qb_append(b, z4, n4);
    qb_set_l2(b,
              3,
              qb_compressed_entry_raw(b, c3, (c4 + n4 + 1024) / 512 - c3 / 512),
              0);
    qb_set_l2(b, 4, qb_compressed_entry(b, c4, n4), 0);
    /* gc 6: incompressible */
    fill(cl, cs, 6);
    memcpy(model + 6 * cs, cl, cs);
    qb_write_compressed(b, 6, cl, NULL, NULL);
    /* gc 5: last in the file, 10 extra sectors past EOF */
    fill_compressible(cl, cs, 5);
    memcpy(model + 5 * cs, cl, cs);
    n5 = qb_compress(method, cl, cs, &z5);
    c5 = qb_append(b, z5, n5);
    entry = qb_compressed_entry_raw(b, c5, (c5 + n5 - 1) / 512 - c5 / 512 + 10);
    qb_set_l2(b, 5, entry, 0);
    img = qb_finish(b, &len);
    assert_int_equal(len, c5 + n5); /* really at the end of the file */
    qb_free(b);
    free(z3);
    free(z4);
    free(z5);

    q = expect_open_ok(img, len, "compressed image");
    assert_int_equal(q->hdr.compression_type,
                     method == QB_ZSTD ? QCOW2_COMPRESSION_ZSTD
                                       : QCOW2_COMPRESSION_DEFLATE);
    assert_int_equal(qcow2_map(q, 5 * cs + 7, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_COMPRESSED);
    assert_int_equal(e.len, cs - 7);
    assert_int_equal(e.l2_entry, entry);
    {
        uint64_t coff, csize;

        assert_int_equal(qcow2_decode_compressed(q, entry, &coff, &csize), 0);
        assert_int_equal(coff, c5);
        assert_true(c5 + csize > len);
    }
    scratch = malloc(qcow2_compressed_scratch_size(q));
    assert_non_null(scratch);
    assert_int_equal(qcow2_compressed_scratch_size(q), 256 * 512);
    assert_int_equal(qcow2_read_compressed(q, entry, dec, scratch), 0);
    assert_memory_equal(dec, model + 5 * cs, cs);
    assert_int_equal(qcow2_map(q, 3 * cs, size, &e), 0);
    assert_int_equal(e.kind, QCOW2_COMPRESSED);
    assert_int_equal(e.len, cs);
    assert_int_equal(qcow2_read_compressed(q, e.l2_entry, dec, scratch), 0);
    assert_memory_equal(dec, model + 3 * cs, cs);
    free(scratch);
    qcow2_close(q);

    c = chain_mem(img, len, "compressed image");
    assert_int_equal(chain_read(c, out, size, 0), 0);
    assert_memory_equal(out, model, size);
    /* small reads inside and across compressed clusters */
    assert_int_equal(chain_read(c, out, 100, 4 * cs - 50), 0);
    assert_memory_equal(out, model + 4 * cs - 50, 100);
    assert_int_equal(chain_read(c, out, 1, 5 * cs + cs - 1), 0);
    assert_memory_equal(out, model + 6 * cs - 1, 1);
    assert_int_equal(chain_block_status(c, 0, size, &st), 0);
    assert_true(st.present && st.data && st.compressed);
    assert_true(st.len <= cs);
    chain_close(c);
    free(img);
    free(model);
    free(out);
    free(cl);
    free(dec);
}

static void
test_good_compressed_deflate(void **state)
{
    check_compressed_good(QB_DEFLATE);
}

static void
test_good_compressed_zstd(void **state)
{
    check_compressed_good(QB_ZSTD);
}

/* The compressed descriptor layout at the extremes of cluster_bits
 * (qcow2-format.md 5: offset/count bit split moves with cluster_bits).
 */
static void
test_good_compressed_cluster_sizes(void **state)
{
    static const unsigned bits[] = {9, 12, 14, 21};
    size_t i;
    int m;

    for (i = 0; i < sizeof bits / sizeof bits[0]; i++) {
        for (m = 0; m < 2; m++) {
            const uint64_t cs = 1ULL << bits[i], size = 4 * cs;
            struct qb *b = qb_new(3, bits[i], size, false, m == 1);
            unsigned char *model = calloc(1, size), *out = malloc(size);
            unsigned char *img;
            size_t len;
            uint64_t gc, coff;
            size_t clen;
            struct chain *c;
            char what[64];

            assert_non_null(model);
            assert_non_null(out);
            qb_l2_table(b, 0);
            for (gc = 0; gc < 3; gc++) {
                fill_compressible(model + gc * cs, cs, gc + bits[i]);
                qb_write_compressed(b, gc, model + gc * cs, &coff, &clen);
            }
            /* the last one with one more sector than it needs */
            qb_set_l2(b,
                      2,
                      qb_compressed_entry_raw(b,
                                              coff,
                                              (coff + clen - 1) / 512 -
                                                  coff / 512 + 1),
                      0);
            img = qb_finish(b, &len);
            qb_free(b);
            snprintf(what,
                     sizeof what,
                     "cluster_bits %u %s",
                     bits[i],
                     m ? "zstd" : "deflate");
            c = chain_mem(img, len, what);
            if (chain_read(c, out, size, 0) < 0)
                fail_msg("%s: %s", what, qcbt_error_get());
            assert_memory_equal(out, model, size);
            chain_close(c);
            free(img);
            free(model);
            free(out);
        }
    }
}

/* zstd: QEMU tolerates several frames in one cluster. */
static void
test_good_zstd_multi_frame(void **state)
{
    const uint64_t cs = 64 * KiB, size = 1 * MiB;
    struct qb *b = qb_new(3, 16, size, false, true);
    unsigned char *cl = malloc(cs), *out = malloc(cs), *img;
    void *z1, *z2;
    size_t n1, n2, len;
    uint64_t off;
    struct chain *c;

    assert_non_null(cl);
    assert_non_null(out);
    fill_compressible(cl, cs, 77);
    n1 = qb_compress(QB_ZSTD, cl, cs / 2, &z1);
    n2 = qb_compress(QB_ZSTD, cl + cs / 2, cs / 2, &z2);
    qb_l2_table(b, 0);
    off = qb_append(b, z1, n1);
    qb_append(b, z2, n2);
    qb_set_l2(b, 0, qb_compressed_entry(b, off, n1 + n2), 0);
    img = qb_finish(b, &len);
    qb_free(b);
    c = chain_mem(img, len, "two zstd frames");
    assert_int_equal(chain_read(c, out, cs, 0), 0);
    assert_memory_equal(out, cl, cs);
    chain_close(c);
    free(z1);
    free(z2);
    free(img);
    free(cl);
    free(out);
}

/* QEMU does not pad the last cluster of a file: a data cluster whose tail
 * lies past EOF reads zeros there.
 */
static void
test_good_data_tail_past_eof(void **state)
{
    const uint64_t cs = 64 * KiB, size = 1 * MiB;
    struct qb *b = qb_new(3, 16, size, false, false);
    unsigned char *cl = malloc(cs), *out = malloc(2 * cs), *img;
    uint64_t h;
    size_t len;
    struct chain *c;
    struct qcow2_extent e;
    struct qcow2_image *q;

    assert_non_null(cl);
    assert_non_null(out);
    fill(cl, cs, 42);
    h = qb_write_cluster(b, 1, cl);
    qb_set_file_len(b, h + 1000);
    img = qb_finish(b, &len);
    qb_free(b);
    assert_int_equal(len, h + 1000);

    q = expect_open_ok(img, len, "short last cluster");
    assert_int_equal(qcow2_map(q, cs, cs, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.host_offset, h);
    qcow2_close(q);

    c = chain_mem(img, len, "short last cluster");
    memset(out, 0xaa, 2 * cs);
    assert_int_equal(chain_read(c, out, 2 * cs, 0), 0);
    assert_true(out[0] == 0 && out[cs - 1] == 0);
    assert_memory_equal(out + cs, cl, 1000);
    {
        size_t i;

        for (i = cs + 1000; i < 2 * cs; i++)
            if (out[i])
                fail_msg("byte %zu past EOF is 0x%02x, not zero", i, out[i]);
    }
    chain_close(c);
    free(img);
    free(cl);
    free(out);
}

/* Header details that must be accepted: dirty and corrupt bits (A6/A7: a
 * read-only reader may read), unknown compatible/autoclear bits, the
 * feature table, unknown extensions, no end marker (QEMU accepts it),
 * header_length 104, odd and zero sizes.
 */
static void
test_good_header_variants(void **state)
{
    static const struct qb_feature feats[] = {
        {0, 0, "dirty bit"},
        {0, 1, "corrupt bit"},
        {1, 0, "lazy refcounts"},
        {2, 0, "bitmaps"},
        {1, 9, "some future flag"},
    };
    struct qb *b;
    struct qcow2_image *q;
    unsigned char *img;
    size_t len;
    const char *name;

    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_hdr(b)->incompatible_features = 3; /* dirty + corrupt */
    qb_hdr(b)->compatible_features = (1ULL << 0) | (1ULL << 9);
    qb_hdr(b)->autoclear_features = 1ULL << 40;
    qb_add_feature_table(b, feats, 5);
    qb_add_ext(b, 0x12345678, "hello", 5);
    qb_add_ext(b, 0x12345678, "again", 5);
    img = qb_finish(b, &len);
    qb_free(b);
    q = expect_open_ok(img, len, "dirty+corrupt, feature table");
    assert_int_equal(q->nr_features, 5);
    name = qcow2_feature_name(q, 1, 9);
    assert_non_null(name);
    assert_string_equal(name, "some future flag");
    assert_int_equal(q->nr_unknown_exts, 2);
    assert_int_equal(q->unknown_exts[0].type, 0x12345678);
    assert_int_equal(q->unknown_exts[0].len, 5);
    qcow2_close(q);
    free(img);

    /* no end marker; an unknown extension runs to the end of cluster 0 */
    b = qb_new(3, 12, 4 * MiB, false, false);
    qb_omit_end_marker(b);
    qb_add_ext_len(b, 0x77777777, 4096 - 112 - 8, NULL, 0);
    img = qb_finish(b, &len);
    qb_free(b);
    q = expect_open_ok(img, len, "no end marker");
    qcow2_close(q);
    free(img);

    /* header_length 104: compression type absent (deflate) */
    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_hdr(b)->header_length = 104;
    img = qb_finish(b, &len);
    qb_free(b);
    q = expect_open_ok(img, len, "header_length 104");
    assert_int_equal(q->hdr.compression_type, 0);
    qcow2_close(q);
    free(img);

    /* header_length == cluster size (512) */
    b = qb_new(3, 9, 1 * MiB, false, false);
    qb_hdr(b)->header_length = 512;
    img = qb_finish(b, &len);
    qb_free(b);
    q = expect_open_ok(img, len, "header_length == cluster size");
    qcow2_close(q);
    free(img);

    /* size 0 (no L1 at all) and a size that is not a multiple of 512 */
    b = qb_new(3, 16, 0, false, false);
    img = qb_finish(b, &len);
    qb_free(b);
    q = expect_open_ok(img, len, "size 0");
    assert_int_equal(q->size, 0);
    assert_int_equal(q->hdr.l1_size, 0);
    qcow2_close(q);
    free(img);

    b = qb_new(3, 16, 1000000, false, false);
    img = qb_finish(b, &len);
    qb_free(b);
    q = expect_open_ok(img, len, "size 1000000");
    assert_int_equal(q->size, 1000000 / 512 * 512);
    qcow2_close(q);
    free(img);

    /* v2 with a backing file and its format extension */
    b = qb_new(2, 16, 1 * MiB, false, false);
    qb_set_backing(b, "base.raw", "raw");
    img = qb_finish(b, &len);
    qb_free(b);
    q = expect_open_ok(img, len, "v2 with backing");
    assert_string_equal(q->backing_name, "base.raw");
    assert_string_equal(q->backing_fmt, "raw");
    qcow2_close(q);
    free(img);
}

/* ------------------------------------------------------------------ */
/* A1-A18: header, feature bits, extensions */

/* A1 (and truncated files) */
static void
test_bad_magic(void **state)
{
    static const uint32_t magics[] = {0,
                                      0x514649fa,
                                      0x514649fb ^ 0x80000000,
                                      0x716f7732 /* "qow2" */,
                                      0xffffffff};
    unsigned char *base, *m;
    size_t len, i;

    base = good_image(3, &len);
    for (i = 0; i < sizeof magics / sizeof magics[0]; i++)
        mutate_fail(base, len, QB_OFF_MAGIC, 4, magics[i], "magic");
    /* too short to hold a header at all */
    expect_open_fail(base, 0, "empty file", "too small");
    expect_open_fail(base, 3, "3-byte file", "too small");
    expect_open_fail(base, 71, "71-byte file", "too small");
    /* v3 header cut inside the v3 fields */
    m = dup_buf(base, 100);
    expect_open_fail(m, 100, "100-byte v3 file", "truncated");
    free(m);
    /* qcow2_parse_header itself on a short buffer */
    {
        struct qcow2_header h;

        qcbt_error_clear();
        CHECK_ERR(qcow2_parse_header(base, 71, len, &h),
                  "parse 71 bytes",
                  "too small");
        CHECK_ERR(qcow2_parse_header(base, 80, len, &h),
                  "parse 80 bytes",
                  "truncated");
        assert_int_equal(qcow2_parse_header(base, 112, len, &h), 0);
        assert_int_equal(h.cluster_bits, 16);
        assert_int_equal(h.header_length, 112);
    }
    assert_false(qcow2_probe(base, 3));
    assert_true(qcow2_probe(base, 4));
    free(base);
}

/* A2 */
static void
test_bad_version(void **state)
{
    static const uint32_t versions[] = {0, 1, 4, 0xffffffff};
    unsigned char *base;
    size_t len, i;

    base = good_image(3, &len);
    for (i = 0; i < sizeof versions / sizeof versions[0]; i++) {
        mutate_fail(base, len, QB_OFF_VERSION, 4, versions[i], "version");
        assert_int_equal(qcbt_error_errno(), ENOTSUP);
    }
    free(base);
}

/* A3: refused before any shift (UBSan checks the "before"). */
static void
test_bad_cluster_bits(void **state)
{
    static const uint32_t bits[] = {0, 1, 8, 22, 31, 32, 63, 64, 0xffffffff};
    unsigned char *base;
    size_t len, i;
    int v;

    for (v = 2; v <= 3; v++) {
        base = good_image((unsigned)v, &len);
        for (i = 0; i < sizeof bits / sizeof bits[0]; i++)
            mutate_fail(base,
                        len,
                        QB_OFF_CLUSTER_BITS,
                        4,
                        bits[i],
                        "cluster_bits");
        free(base);
    }
    /* extended L2 needs cluster_bits >= 14 */
    base = good_image(3, &len);
    poke64(base, QB_OFF_INCOMPAT, 1ULL << 4);
    mutate_fail(base, len, QB_OFF_CLUSTER_BITS, 4, 13, "extended L2");
    free(base);
}

/* A4 */
static void
test_bad_header_length(void **state)
{
    static const uint32_t lens[] = {0,
                                    8,
                                    71,
                                    72,
                                    103,
                                    105,
                                    108 + 1,
                                    65536 + 8,
                                    131072,
                                    0x7fffffff,
                                    0xfffffff8,
                                    0xffffffff};
    unsigned char *base;
    size_t len, i;

    base = good_image(3, &len);
    for (i = 0; i < sizeof lens / sizeof lens[0]; i++)
        mutate_fail(base,
                    len,
                    QB_OFF_HEADER_LENGTH,
                    4,
                    lens[i],
                    "header_length");
    free(base);
    /* 512-byte clusters: 520 is a multiple of 8 but past the cluster */
    {
        struct qb *b = qb_new(3, 9, 1 * MiB, false, false);

        base = qb_finish(b, &len);
        qb_free(b);
        mutate_fail(base, len, QB_OFF_HEADER_LENGTH, 4, 520, "header_length");
        free(base);
    }
}

/* A5: an unknown incompatible bit is refused and named, with its name
 * from the feature table when there is one (escaped and bounded).
 */
static void
test_bad_incompat_unknown(void **state)
{
    unsigned char *base, *img;
    size_t len;
    struct qb *b;
    struct qcow2_image *q;
    int r;

    base = good_image(3, &len);
    mutate_fail(base, len, QB_OFF_INCOMPAT, 8, 1ULL << 63, "bit 63");
    assert_int_equal(qcbt_error_errno(), ENOTSUP);
    mutate_fail(base, len, QB_OFF_INCOMPAT, 8, 1ULL << 5, "bit 5");
    mutate_fail(base, len, QB_OFF_INCOMPAT, 8, 1ULL << 5, "incompatible");
    free(base);

    /* with a feature table naming it */
    {
        static const struct qb_feature f[] = {
            {0, 63, "evil feature"},
            {1, 63, "not this one"},
        };
        b = qb_new(3, 16, 4 * MiB, false, false);
        qb_hdr(b)->incompatible_features = 1ULL << 63;
        qb_add_feature_table(b, f, 2);
        img = qb_finish(b, &len);
        qb_free(b);
        r = open_mem(img, len, &q);
        CHECK_ERR(r, "named unknown bit", "bit 63", "evil feature");
        assert_null(strstr(qcbt_error_get(), "not this one"));
        free(img);
    }

    /* every unknown bit set, each with a 46-byte unterminated name full of
     * control characters: the message stays one bounded, printable line */
    {
        struct qb_feature f[59];
        char names[59][47];
        unsigned bit;
        const char *msg;
        size_t i;

        for (bit = 5; bit < 64; bit++) {
            memset(names[bit - 5], 'A' + bit % 26, 46);
            names[bit - 5][3] = '\n';
            names[bit - 5][4] = '\x1b';
            names[bit - 5][46] = '\0';
            f[bit - 5].type = 0;
            f[bit - 5].bit = (uint8_t)bit;
            f[bit - 5].name = names[bit - 5];
        }
        b = qb_new(3, 16, 4 * MiB, false, false);
        qb_hdr(b)->incompatible_features = ~0x1fULL;
        qb_add_feature_table(b, f, 59);
        img = qb_finish(b, &len);
        qb_free(b);
        r = open_mem(img, len, &q);
        CHECK_ERR(r, "all unknown bits", "bit 5");
        msg = qcbt_error_get();
        for (i = 0; msg[i]; i++)
            if ((unsigned char)msg[i] < 0x20 || (unsigned char)msg[i] >= 0x7f)
                fail_msg("unescaped byte 0x%02x in \"%s\"",
                         (unsigned char)msg[i],
                         msg);
        assert_true(strlen(msg) < 1024);
        free(img);
    }

    /* a feature table whose length is not a multiple of 48 and an entry
     * with a bit number > 63: parsed within bounds, image still refused */
    {
        unsigned char t[48 + 20];

        memset(t, 'x', sizeof t);
        t[0] = 0;
        t[1] = 200;
        b = qb_new(3, 16, 4 * MiB, false, false);
        qb_hdr(b)->incompatible_features = 1ULL << 7;
        qb_add_ext(b, 0x6803f857U, t, sizeof t);
        img = qb_finish(b, &len);
        qb_free(b);
        r = open_mem(img, len, &q);
        CHECK_ERR(r, "odd feature table", "bit 7");
        free(img);
    }
}

/* A11 */
static void
test_bad_refcount_order(void **state)
{
    static const uint32_t orders[] = {7, 8, 64, 0x80000000, 0xffffffff};
    unsigned char *base;
    size_t len, i;

    base = good_image(3, &len);
    for (i = 0; i < sizeof orders / sizeof orders[0]; i++)
        mutate_fail(base,
                    len,
                    QB_OFF_REFCOUNT_ORDER,
                    4,
                    orders[i],
                    "refcount_order");
    free(base);
}

/* A15 */
static void
test_bad_compression_type(void **state)
{
    const uint64_t bit3 = 1ULL << 3;
    unsigned char *base, *m;
    size_t len;

    base = good_image(3, &len);
    /* type 1 (zstd) without the incompatible bit */
    mutate_fail(base, len, QB_OFF_COMPRESSION_TYPE, 1, 1, "compression type");
    /* unknown types, with and without the bit */
    mutate_fail(base, len, QB_OFF_COMPRESSION_TYPE, 1, 2, "compression type");
    mutate_fail(base, len, QB_OFF_COMPRESSION_TYPE, 1, 255, "compression type");
    m = dup_buf(base, len);
    poke64(m, QB_OFF_INCOMPAT, bit3);
    /* the bit with type 0 */
    expect_open_fail(m, len, "bit 3 with deflate", "compression-type");
    m[QB_OFF_COMPRESSION_TYPE] = 2;
    expect_open_fail(m, len, "bit 3 with type 2", "compression type 2");
    /* the bit with header_length 104: the field is absent (= 0) */
    m[QB_OFF_COMPRESSION_TYPE] = 1;
    poke32(m, QB_OFF_HEADER_LENGTH, 104);
    expect_open_fail(m, len, "bit 3, header_length 104", "compression");
    free(m);
    free(base);
}

/* A13: backing file name offset and size */
static void
test_bad_backing_name(void **state)
{
    struct qb *b = qb_new(3, 16, 4 * MiB, false, false);
    unsigned char *base;
    size_t len;
    const uint64_t cs = 64 * KiB;

    qb_set_backing(b, "base.qcow2", "qcow2");
    base = qb_finish(b, &len);
    qb_free(b);
    {
        struct qcow2_image *q = expect_open_ok(base, len, "good backing");

        assert_string_equal(q->backing_name, "base.qcow2");
        assert_string_equal(q->backing_fmt, "qcow2");
        qcow2_close(q);
    }
    mutate_fail(base, len, QB_OFF_BACKING_OFFSET, 8, cs + 1, "backing file");
    mutate_fail(base,
                len,
                QB_OFF_BACKING_OFFSET,
                8,
                1ULL << 32,
                "backing file");
    mutate_fail(base,
                len,
                QB_OFF_BACKING_OFFSET,
                8,
                UINT64_MAX,
                "backing file");
    mutate_fail(base, len, QB_OFF_BACKING_SIZE, 4, 1024, "backing file name");
    mutate_fail(base,
                len,
                QB_OFF_BACKING_SIZE,
                4,
                0x7fffffff,
                "backing file name");
    mutate_fail(base,
                len,
                QB_OFF_BACKING_SIZE,
                4,
                0xffffffff,
                "backing file name");
    /* crossing the end of cluster 0 */
    {
        unsigned char *m = dup_buf(base, len);

        poke64(m, QB_OFF_BACKING_OFFSET, cs - 10);
        poke32(m, QB_OFF_BACKING_SIZE, 11);
        expect_open_fail(m,
                         len,
                         "name crosses cluster end",
                         "backing file name");
        /* exactly up to the end is fine as far as bounds go, but the
         * bytes there are zeros: a NUL in the name */
        poke32(m, QB_OFF_BACKING_SIZE, 10);
        expect_open_fail(m, len, "NUL in backing name", "NUL");
        free(m);
    }
    free(base);

    /* a backing format name too long, with a NUL, and duplicated */
    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_set_backing(b, "base", "qcow2-but-much-longer");
    base = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(base, len, "long backing format", "backing format");
    free(base);
    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_set_backing(b, "base", NULL);
    qb_add_ext(b, 0xe2792acaU, "raw\0x", 5);
    base = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(base, len, "NUL in backing format", "backing format");
    free(base);
}

/* A14 */
static void
test_bad_crypt_method(void **state)
{
    static const uint32_t methods[] = {1, 2, 3, 0xffffffff};
    unsigned char *base;
    size_t len, i;
    int v;

    for (v = 2; v <= 3; v++) {
        base = good_image((unsigned)v, &len);
        for (i = 0; i < sizeof methods / sizeof methods[0]; i++) {
            mutate_fail(base,
                        len,
                        QB_OFF_CRYPT_METHOD,
                        4,
                        methods[i],
                        "encrypt");
            assert_int_equal(qcbt_error_errno(), ENOTSUP);
        }
        free(base);
    }
    /* the LUKS header pointer extension in an unencrypted image */
    {
        struct qb *b = qb_new(3, 16, 4 * MiB, false, false);
        unsigned char p[16] = {0};

        qb_add_ext(b, 0x0537be77U, p, sizeof p);
        base = qb_finish(b, &len);
        qb_free(b);
        expect_open_fail(base, len, "crypto extension", "encryption");
        free(base);
    }
}

/* A8: virtual size against the L1 table */
static void
test_bad_size(void **state)
{
    unsigned char *base;
    size_t len;

    base = good_image(3, &len);
    mutate_fail(base, len, QB_OFF_SIZE, 8, 1ULL << 63, "virtual size");
    mutate_fail(base, len, QB_OFF_SIZE, 8, UINT64_MAX, "virtual size");
    mutate_fail(base, len, QB_OFF_SIZE, 8, (1ULL << 63) + 512, "virtual size");
    /* huge but < 2^63: the L1 table (1 entry) is too small */
    mutate_fail(base, len, QB_OFF_SIZE, 8, INT64_MAX, "L1 table is too small");
    mutate_fail(base,
                len,
                QB_OFF_SIZE,
                8,
                INT64_MAX - 511,
                "L1 table is too small");
    /* one byte more than the L1 table maps (1 entry x 512 MiB) */
    mutate_fail(base,
                len,
                QB_OFF_SIZE,
                8,
                512 * MiB + 1,
                "L1 table is too small");
    free(base);
}

/* A9: the L1 table */
static void
test_bad_l1_table(void **state)
{
    unsigned char *base, *m;
    size_t len;

    base = good_image(3, &len);
    mutate_fail(base, len, QB_OFF_L1_SIZE, 4, 0xffffffff, "L1 table");
    mutate_fail(base, len, QB_OFF_L1_SIZE, 4, 0x7fffffff, "L1 table");
    mutate_fail(base, len, QB_OFF_L1_SIZE, 4, 32 * MiB / 8 + 1, "L1 table");
    mutate_fail(base, len, QB_OFF_L1_SIZE, 4, 0, "L1 table is too small");
    /* offset unaligned, past EOF, wrapping, above 2^63 */
    mutate_fail(base,
                len,
                QB_OFF_L1_OFFSET,
                8,
                3 * 64 * KiB + 512,
                "L1 table offset");
    mutate_fail(base,
                len,
                QB_OFF_L1_OFFSET,
                8,
                3 * 64 * KiB + 8,
                "L1 table offset");
    mutate_fail(base, len, QB_OFF_L1_OFFSET, 8, 1ULL << 40, "L1 table offset");
    mutate_fail(base,
                len,
                QB_OFF_L1_OFFSET,
                8,
                (len + 0xffff) & ~0xffffULL,
                "L1 table offset");
    mutate_fail(base,
                len,
                QB_OFF_L1_OFFSET,
                8,
                0xffffffffffff0000ULL,
                "L1 table offset");
    mutate_fail(base,
                len,
                QB_OFF_L1_OFFSET,
                8,
                0x7fffffffffff0000ULL,
                "L1 table offset");
    mutate_fail(base, len, QB_OFF_L1_OFFSET, 8, 1ULL << 63, "L1 table offset");
    /* offset + size wrapping with the largest allowed L1 */
    m = dup_buf(base, len);
    poke32(m, QB_OFF_L1_SIZE, 32 * MiB / 8);
    poke64(m, QB_OFF_L1_OFFSET, 0x7ffffffffe000000ULL);
    expect_open_fail(m, len, "32 MiB L1 ending at 2^63", "L1 table offset");
    free(m);
    free(base);
}

/* A10: the refcount table (validated, never followed by a reader) */
static void
test_bad_refcount_table(void **state)
{
    unsigned char *base;
    size_t len;

    base = good_image(3, &len);
    mutate_fail(base,
                len,
                QB_OFF_REFTABLE_CLUSTERS,
                4,
                0,
                "reference count table");
    mutate_fail(base,
                len,
                QB_OFF_REFTABLE_CLUSTERS,
                4,
                129,
                "reference count table too large");
    mutate_fail(base,
                len,
                QB_OFF_REFTABLE_CLUSTERS,
                4,
                0xffffffff,
                "reference count table too large");
    mutate_fail(base,
                len,
                QB_OFF_REFTABLE_OFFSET,
                8,
                64 * KiB + 512,
                "reference count table offset");
    mutate_fail(base,
                len,
                QB_OFF_REFTABLE_OFFSET,
                8,
                64 * KiB + 1,
                "reference count table offset");
    mutate_fail(base,
                len,
                QB_OFF_REFTABLE_OFFSET,
                8,
                0,
                "reference count table offset");
    mutate_fail(base,
                len,
                QB_OFF_REFTABLE_OFFSET,
                8,
                0xffffffffffff0000ULL,
                "reference count table offset");
    mutate_fail(base,
                len,
                QB_OFF_REFTABLE_OFFSET,
                8,
                0x7fffffffffff0000ULL,
                "reference count table offset");
    free(base);
}

/* A12: never loop 4G times */
static void
test_bad_snapshots(void **state)
{
    unsigned char *base, *m;
    size_t len;

    base = good_image(3, &len);
    mutate_fail(base, len, QB_OFF_NB_SNAPSHOTS, 4, 0xffffffff, "snapshots");
    mutate_fail(base, len, QB_OFF_NB_SNAPSHOTS, 4, 65537, "snapshots");
    m = dup_buf(base, len);
    poke32(m, QB_OFF_NB_SNAPSHOTS, 1);
    poke64(m, QB_OFF_SNAPSHOTS_OFFSET, 64 * KiB + 8);
    expect_open_fail(m, len, "unaligned snapshot table", "snapshot table");
    poke64(m, QB_OFF_SNAPSHOTS_OFFSET, 0xffffffffffff0000ULL);
    expect_open_fail(m, len, "snapshot table above 2^63", "snapshot table");
    free(m);
    free(base);
}

/* A17: header extension lengths */
static void
test_bad_extension_length(void **state)
{
    static const uint32_t lens[] = {0x7fffffff,
                                    0x80000000,
                                    0xfffffff8,
                                    0xffffffff};
    struct qb *b;
    unsigned char *img;
    size_t len, i;

    for (i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        b = qb_new(3, 16, 4 * MiB, false, false);
        qb_add_ext_len(b, 0x12345678, lens[i], NULL, 0);
        img = qb_finish(b, &len);
        qb_free(b);
        expect_open_fail(img, len, "huge extension length", "too large");
        free(img);
        /* the same through a known extension type */
        b = qb_new(3, 16, 4 * MiB, false, false);
        qb_add_ext_len(b, 0x6803f857U, lens[i], NULL, 0);
        img = qb_finish(b, &len);
        qb_free(b);
        expect_open_fail(img, len, "huge feature table length", "too large");
        free(img);
    }
    /* one byte past the end of cluster 0 */
    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_omit_end_marker(b);
    qb_add_ext_len(b, 0x12345678, 64 * KiB - 120 + 1, NULL, 0);
    img = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(img, len, "extension past cluster 0", "too large");
    free(img);
    /* the second extension runs past the cluster (512-byte clusters) */
    b = qb_new(3, 9, 1 * MiB, false, false);
    qb_add_ext(b, 0x11111111, NULL, 0);
    qb_add_ext_len(b, 0x22222222, 512 - 128 + 1, NULL, 0);
    img = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(img, len, "second extension past cluster 0", "too large");
    free(img);
    /* an extension running into the backing file name */
    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_add_ext_len(b, 0x12345678, 9, NULL, 0);
    qb_set_backing(b, "base.qcow2", NULL);
    img = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(img, len, "extension over the backing name", "too large");
    free(img);
    /* a bitmaps extension that lies about its size cannot make the
     * reader read past it (the bitmap module judges its contents) */
    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_add_ext(b, 0x23852875U, "\0\0\0\1", 4);
    img = qb_finish(b, &len);
    qb_free(b);
    {
        struct qcow2_image *q = expect_open_ok(img, len, "short bitmaps ext");
        struct qcow2_bitmaps_found found;

        qcow2_get_bitmaps_found(q, &found);
        assert_true(found.present);
        assert_int_equal(found.ext_len, 4);
        assert_int_equal(found.ext.nb_bitmaps, 0);
        qcow2_close(q);
    }
    free(img);
    /* 2 MiB clusters packed with empty unknown extensions and no end
     * marker: the walk is bounded by the cluster (262,130 entries) */
    b = qb_new(3, 21, 4 * MiB, false, false);
    img = qb_finish(b, &len);
    qb_free(b);
    {
        uint64_t off;
        struct qcow2_image *q;

        for (off = 112; off + 8 <= 2 * MiB; off += 8) {
            poke32(img, off, 0x11111111);
            poke32(img, off + 4, 0);
        }
        q = expect_open_ok(img, len, "cluster 0 full of extensions");
        /* Only the first few are recorded (the walk itself is bounded by
         * the cluster; recording all of them once took minutes under
         * ASan with realloc per entry). */
        assert_int_equal(q->nr_unknown_exts, QCOW2_MAX_UNKNOWN_EXTS);
        qcow2_close(q);
    }
    free(img);
}

/* A18: each known extension at most once */
static void
test_bad_extension_duplicate(void **state)
{
    static const struct qb_feature f[] = {{0, 0, "dirty bit"}};
    unsigned char bm[24] = {0}, *img;
    struct qb *b;
    size_t len;

    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_set_backing(b, "base", "qcow2");
    qb_add_ext(b, 0xe2792acaU, "raw", 3);
    img = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(img, len, "two backing formats", "duplicate");
    free(img);

    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_add_feature_table(b, f, 1);
    qb_add_feature_table(b, f, 1);
    img = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(img, len, "two feature tables", "duplicate");
    free(img);

    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_hdr(b)->autoclear_features = 1;
    qb_add_ext(b, 0x23852875U, bm, sizeof bm);
    qb_add_ext(b, 0x23852875U, bm, sizeof bm);
    img = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(img, len, "two bitmaps extensions", "duplicate");
    free(img);

    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_hdr(b)->incompatible_features = 1ULL << 2;
    qb_add_ext(b, 0x44415441U, "a.raw", 5);
    qb_add_ext(b, 0x44415441U, "b.raw", 5);
    img = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(img, len, "two data file names", "duplicate");
    free(img);
}

/* A16 at the qcow2 layer: the data file name is validated; guest data is
 * never read from the qcow2 file itself.
 */
static void
test_bad_data_file_header(void **state)
{
    struct qb *b;
    unsigned char *img;
    size_t len;
    struct qcow2_image *q;

    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_hdr(b)->incompatible_features = 1ULL << 2;
    qb_add_ext(b, 0x44415441U, "", 0);
    img = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(img, len, "empty data file name", "data file");
    free(img);

    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_hdr(b)->incompatible_features = 1ULL << 2;
    qb_add_ext(b, 0x44415441U, "a\0b", 3);
    img = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(img, len, "NUL in data file name", "data file");
    free(img);

    /* raw external data + backing file */
    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_hdr(b)->incompatible_features = 1ULL << 2;
    qb_hdr(b)->autoclear_features = 1ULL << 1;
    qb_add_ext(b, 0x44415441U, "data.raw", 8);
    qb_set_backing(b, "base.qcow2", "qcow2");
    img = qb_finish(b, &len);
    qb_free(b);
    expect_open_fail(img, len, "raw data file with backing", "backing file");
    free(img);

    /* the data file bit: no data_io until the caller attaches one */
    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_hdr(b)->incompatible_features = 1ULL << 2;
    qb_add_ext(b, 0x44415441U, "data.raw", 8);
    /* host offset 0 is valid in a data file when the copied bit is set */
    qb_set_l2(b, 0, 1ULL << 63, 0);
    qb_set_l2(b, 1, qb_compressed_entry_raw(b, 4096, 0), 0);
    img = qb_finish(b, &len);
    qb_free(b);
    q = expect_open_ok(img, len, "data file bit");
    assert_null(q->data_io);
    assert_string_equal(q->data_file_name, "data.raw");
    {
        struct qcow2_extent e;

        assert_int_equal(qcow2_map(q, 0, 4 * MiB, &e), 0);
        assert_int_equal(e.kind, QCOW2_DATA);
        assert_int_equal(e.host_offset, 0);
        assert_int_equal(e.len, 64 * KiB);
        qcbt_error_clear();
        CHECK_ERR(qcow2_map(q, 64 * KiB, 4 * MiB, &e),
                  "compressed with a data file",
                  "external data file");
    }
    qcow2_close(q);
    free(img);

    /* without the bit the extension is ignored */
    b = qb_new(3, 16, 4 * MiB, false, false);
    qb_add_ext(b, 0x44415441U, "/etc/shadow", 11);
    img = qb_finish(b, &len);
    qb_free(b);
    q = expect_open_ok(img, len, "data file ext without bit");
    assert_null(q->data_file_name);
    assert_ptr_equal(q->data_io, q->io);
    qcow2_close(q);
    free(img);
}

/* ------------------------------------------------------------------ */
/* A24-A29: per-entry corruption is an error for that range only */

/* 4 KiB clusters, 8 MiB: four L1 entries of 2 MiB.  Guest clusters 0, 1,
 * 512 (L1[1]) and 1024 (L1[2]) hold data.
 */
struct entry_image {
    struct qb *b;
    unsigned char *model; /* 8 MiB guest view */
    uint64_t host[4];     /* host offsets of gc 0, 1, 512, 1024 */
};

static void
entry_image_new_version(struct entry_image *ei, unsigned version)
{
    static const uint64_t gcs[4] = {0, 1, 512, 1024};
    unsigned char cl[4096];
    int i;

    ei->b = qb_new(version, 12, 8 * MiB, false, false);
    ei->model = calloc(1, 8 * MiB);
    assert_non_null(ei->model);
    for (i = 0; i < 4; i++) {
        fill(cl, sizeof cl, gcs[i] + 7);
        ei->host[i] = qb_write_cluster(ei->b, gcs[i], cl);
        memcpy(ei->model + gcs[i] * 4096, cl, 4096);
    }
}

static void
entry_image_new(struct entry_image *ei)
{
    entry_image_new_version(ei, 3);
}

static void
entry_image_free(struct entry_image *ei)
{
    qb_free(ei->b);
    free(ei->model);
}

/* How a bad range must fail: MAP_FAILS when the first byte's entry is
 * itself bad (qcow2_map and chain_block_status refuse it too); READ_FAILS
 * when only reading the data can find the fault (compressed data, or a
 * bad entry later in the range: the mapping stops before it).
 */
enum fails { MAP_FAILS, READ_FAILS };

/* The range [off, off+len) must fail naming SUB; the reference range must
 * still read correctly afterwards (the server stays up).
 */
static void
expect_range_fails(const unsigned char *img,
                   size_t len,
                   const unsigned char *model,
                   uint64_t off,
                   uint64_t n,
                   uint64_t good_off,
                   uint64_t good_n,
                   const char *what,
                   const char *sub,
                   enum fails how)
{
    struct qcow2_image *q = expect_open_ok(img, len, what);
    struct qcow2_extent e;
    struct chain *c;
    struct chain_status st;
    unsigned char *out = malloc(n > good_n ? n : good_n);

    assert_non_null(out);
    if (how == MAP_FAILS) {
        qcbt_error_clear();
        check_err(qcow2_map(q, off, n, &e), what, sub, NULL);
    }
    qcow2_close(q);

    c = chain_mem(img, len, what);
    qcbt_error_clear();
    check_err(chain_read(c, out, n, off), what, sub, NULL);
    if (how == MAP_FAILS) {
        qcbt_error_clear();
        check_err(chain_block_status(c, off, n, &st), what, sub, NULL);
    }
    if (chain_read(c, out, good_n, good_off) < 0)
        fail_msg("%s: good range failed after the bad one: %s",
                 what,
                 qcbt_error_get());
    assert_memory_equal(out, model + good_off, good_n);
    /* and the bad range is still refused (no cached half-state) */
    check_err(chain_read(c, out, n, off), what, sub, NULL);
    chain_close(c);
    free(out);
}

/* A24 */
static void
test_bad_l1_entry(void **state)
{
    struct {
        const char *what;
        uint64_t xor_or_value;
        int mode; /* 0: or into the entry, 1: replace, 2: add */
        const char *sub;
    } cases[] = {
        {"L1 reserved bit 0", 1, 0, "reserved"},
        {"L1 reserved bit 8", 1ULL << 8, 0, "reserved"},
        {"L1 reserved bit 56", 1ULL << 56, 0, "reserved"},
        {"L1 reserved bit 62", 1ULL << 62, 0, "reserved"},
        {"L1 offset >= 2^56", (1ULL << 56) | (1ULL << 63), 1, "reserved"},
        {"L1 offset unaligned", 0x200, 2, "not cluster aligned"},
        {"L1 offset past EOF", (1ULL << 40) | (1ULL << 63), 1, "past the end"},
        {"L1 offset 2^55", (1ULL << 55) | (1ULL << 63), 1, "past the end"},
    };
    size_t i;

    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct entry_image ei;
        unsigned char *img;
        size_t len;
        uint64_t e;

        entry_image_new(&ei);
        e = qb_get_l1(ei.b, 0);
        if (cases[i].mode == 0)
            e |= cases[i].xor_or_value;
        else if (cases[i].mode == 1)
            e = cases[i].xor_or_value;
        else
            e += cases[i].xor_or_value;
        qb_set_l1(ei.b, 0, e);
        img = qb_finish(ei.b, &len);
        expect_range_fails(img,
                           len,
                           ei.model,
                           0,
                           4096,
                           2 * MiB,
                           8192,
                           cases[i].what,
                           "L1 entry",
                           MAP_FAILS);
        expect_range_fails(img,
                           len,
                           ei.model,
                           4096 * 5,
                           1,
                           4 * MiB + 512,
                           4096,
                           cases[i].what,
                           cases[i].sub,
                           MAP_FAILS);
        free(img);
        entry_image_free(&ei);
    }
}

/* A26 */
static void
test_bad_l2_entry(void **state)
{
    struct {
        const char *what;
        uint64_t value;
        int mode; /* 0: or into gc 1's entry, 1: replace, 2: add */
        const char *sub;
    } cases[] = {
        {"L2 reserved bit 1", 2, 0, "reserved"},
        {"L2 reserved bit 8", 1ULL << 8, 0, "reserved"},
        {"L2 reserved bit 56", 1ULL << 56, 0, "reserved"},
        {"L2 reserved bit 61", 1ULL << 61, 0, "reserved"},
        {"L2 offset >= 2^56", (1ULL << 56) | (1ULL << 63), 1, "reserved"},
        {"L2 zero flag + reserved", (1ULL << 57) | 1, 1, "reserved"},
        {"L2 data offset unaligned", 0x200, 2, "not cluster aligned"},
        {"L2 data offset unaligned zero-alloc",
         0x201,
         2,
         "not cluster aligned"},
        {"L2 data past EOF", (1ULL << 40) | (1ULL << 63), 1, "past the end"},
        {"L2 data 2^55", (1ULL << 55) | (1ULL << 63), 1, "past the end"},
    };
    size_t i;

    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct entry_image ei;
        unsigned char *img;
        size_t len;
        uint64_t e;

        entry_image_new(&ei);
        e = ei.host[1] | (1ULL << 63);
        if (cases[i].mode == 0)
            e |= cases[i].value;
        else if (cases[i].mode == 1)
            e = cases[i].value;
        else
            e += cases[i].value;
        qb_set_l2(ei.b, 1, e, 0);
        img = qb_finish(ei.b, &len);
        expect_range_fails(img,
                           len,
                           ei.model,
                           4096,
                           4096,
                           0,
                           4096,
                           cases[i].what,
                           cases[i].sub,
                           MAP_FAILS);
        /* a read covering the good and the bad cluster fails too */
        expect_range_fails(img,
                           len,
                           ei.model,
                           0,
                           8192,
                           2 * MiB,
                           4096,
                           cases[i].what,
                           cases[i].sub,
                           READ_FAILS);
        /* the mapping of the good cluster stops before the bad one */
        {
            struct qcow2_image *q = expect_open_ok(img, len, cases[i].what);
            struct qcow2_extent x;

            assert_int_equal(qcow2_map(q, 0, 8 * MiB, &x), 0);
            assert_int_equal(x.kind, QCOW2_DATA);
            assert_int_equal(x.len, 4096);
            qcow2_close(q);
        }
        free(img);
        entry_image_free(&ei);
    }
}

/* Version 2 images have no zero flag: bit 0 of a standard L2 entry is
 * reserved there, and QEMU fails the read ("Zero cluster entry found in
 * pre-v3 image") whether or not the entry has a host offset.  Reading
 * zeros instead would hide the data the entry points at.  A compressed
 * descriptor's bit 0 is part of its host offset and stays valid.
 */
static void
test_v2_zero_flag(void **state)
{
    struct {
        const char *what;
        bool keep_host; /* the entry still points at gc 1's data */
        uint64_t bits;
    } cases[] = {
        {"v2 bit 0 with data offset and copied", true, (1ULL << 63) | 1},
        {"v2 bit 0 with data offset", true, 1},
        {"v2 bit 0 alone", false, 1},
        {"v2 bit 0 and copied, no offset", false, (1ULL << 63) | 1},
    };
    size_t i;

    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct entry_image ei;
        unsigned char *img;
        size_t len;

        entry_image_new_version(&ei, 2);
        qb_set_l2(ei.b,
                  1,
                  (cases[i].keep_host ? ei.host[1] : 0) | cases[i].bits,
                  0);
        img = qb_finish(ei.b, &len);
        expect_range_fails(img,
                           len,
                           ei.model,
                           4096,
                           4096,
                           0,
                           4096,
                           cases[i].what,
                           "reserved bit 0",
                           MAP_FAILS);
        expect_range_fails(img,
                           len,
                           ei.model,
                           4096 + 17,
                           1,
                           2 * MiB,
                           4096,
                           cases[i].what,
                           "version 2",
                           MAP_FAILS);
        /* a read covering the good and the bad cluster fails too */
        expect_range_fails(img,
                           len,
                           ei.model,
                           0,
                           8192,
                           2 * MiB,
                           4096,
                           cases[i].what,
                           "guest offset 0x1000",
                           READ_FAILS);
        /* the mapping of the good cluster stops before the bad one */
        {
            struct qcow2_image *q = expect_open_ok(img, len, cases[i].what);
            struct qcow2_extent x;

            assert_int_equal(qcow2_map(q, 0, 8 * MiB, &x), 0);
            assert_int_equal(x.kind, QCOW2_DATA);
            assert_int_equal(x.len, 4096);
            qcow2_close(q);
        }
        free(img);
        entry_image_free(&ei);
    }

    /* The same entry in a version 3 image is a zero cluster. */
    {
        struct entry_image ei;
        struct chain *c;
        unsigned char *img, out[4096], zero[4096] = {0};
        size_t len;

        entry_image_new_version(&ei, 3);
        qb_set_l2(ei.b, 1, ei.host[1] | (1ULL << 63) | 1, 0);
        img = qb_finish(ei.b, &len);
        c = chain_mem(img, len, "v3 zero-alloc");
        assert_int_equal(chain_read(c, out, sizeof out, 4096), 0);
        assert_memory_equal(out, zero, sizeof out);
        chain_close(c);
        free(img);
        entry_image_free(&ei);
    }

    /* A compressed cluster whose host offset is odd (bit 0 set) reads. */
    {
        struct entry_image ei;
        struct qcow2_image *q;
        struct qcow2_extent x;
        struct chain *c;
        unsigned char cl[4096], out[4096], *img;
        void *z = NULL;
        size_t n, len;
        uint64_t off, entry;

        entry_image_new_version(&ei, 2);
        fill_compressible(cl, sizeof cl, 77);
        n = qb_compress(QB_DEFLATE, cl, sizeof cl, &z);
        if (qb_file_len(ei.b) % 2 == 0)
            qb_append(ei.b, "", 1);
        off = qb_append(ei.b, z, n);
        assert_true(off & 1);
        entry = qb_compressed_entry(ei.b, off, n);
        assert_true(entry & 1);
        qb_set_l2(ei.b, 1, entry, 0);
        img = qb_finish(ei.b, &len);
        q = expect_open_ok(img, len, "v2 compressed at an odd offset");
        assert_int_equal(qcow2_map(q, 4096, 4096, &x), 0);
        assert_int_equal(x.kind, QCOW2_COMPRESSED);
        qcow2_close(q);
        c = chain_mem(img, len, "v2 compressed at an odd offset");
        if (chain_read(c, out, sizeof out, 4096) < 0)
            fail_msg("v2 compressed at an odd offset: %s", qcbt_error_get());
        assert_memory_equal(out, cl, sizeof out);
        chain_close(c);
        free(z);
        free(img);
        entry_image_free(&ei);
    }
}

/* A26: a run of host-contiguous clusters whose second cluster lies wholly
 * past EOF must fail like that cluster alone does, whatever the request's
 * alignment (never zeros invented for a cluster outside the file).
 */
static void
test_bad_l2_run_past_eof(void **state)
{
    struct entry_image ei;
    unsigned char *img;
    size_t len;
    uint64_t last;

    entry_image_new(&ei);
    /* gc 1 is the last cluster of the file; gc 2 follows it, past EOF */
    last = ei.host[3];
    qb_set_l2(ei.b, 1024, last | (1ULL << 63), 0);
    qb_set_l2(ei.b, 1025, (last + 4096) | (1ULL << 63), 0);
    img = qb_finish(ei.b, &len);
    assert_int_equal(len, last + 4096);
    expect_range_fails(img,
                       len,
                       ei.model,
                       1025 * 4096,
                       4096,
                       0,
                       4096,
                       "cluster past EOF alone",
                       "past the end",
                       MAP_FAILS);
    expect_range_fails(img,
                       len,
                       ei.model,
                       1024 * 4096,
                       8192,
                       0,
                       4096,
                       "cluster past EOF in a run",
                       "past the end",
                       READ_FAILS);
    free(img);
    entry_image_free(&ei);
}

/* A28 and the other extended L2 rules (qcow2-format.md 5). */
static void
test_bad_extended_l2(void **state)
{
    struct {
        const char *what;
        bool alloc;      /* entry has a host offset */
        bool compressed; /* entry is a compressed descriptor */
        uint64_t bitmap;
        uint64_t extra; /* or'ed into the entry */
        const char *sub;
    } cases[] = {
        {"alloc+zero same subcluster",
         true,
         false,
         0x1 | (1ULL << 32),
         0,
         "both allocated and zero"},
        {"alloc+zero subcluster 31",
         true,
         false,
         0xffffffffULL | (1ULL << 63),
         0,
         "both allocated and zero"},
        {"alloc bits, offset 0",
         false,
         false,
         0x1,
         0,
         "allocated subclusters in an unallocated cluster"},
        {"alloc bits, offset 0, copied",
         false,
         false,
         0x80000000ULL,
         1ULL << 63,
         "allocated subclusters in an unallocated cluster"},
        {"compressed with alloc bits",
         false,
         true,
         0x1,
         0,
         "subcluster bitmap"},
        {"compressed with zero bits",
         false,
         true,
         1ULL << 40,
         0,
         "subcluster bitmap"},
        {"extended L2 reserved bits", true, false, 0x1, 1ULL << 58, "reserved"},
    };
    const uint64_t cs = 16 * KiB;
    size_t i;

    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct qb *b = qb_new(3, 14, 1 * MiB, true, false);
        unsigned char *cl = malloc(cs), *model = calloc(1, 1 * MiB), *img;
        uint64_t h, e;
        size_t len;

        assert_non_null(cl);
        assert_non_null(model);
        fill(cl, cs, 5);
        qb_write_cluster(b, 0, cl);
        memcpy(model, cl, cs);
        if (cases[i].compressed) {
            void *z;
            size_t n = qb_compress(QB_DEFLATE, cl, cs, &z);

            h = qb_append(b, z, n);
            e = qb_compressed_entry(b, h, n);
            free(z);
        } else if (cases[i].alloc) {
            h = qb_alloc_cluster(b, cl, cs);
            e = h | (1ULL << 63);
        } else {
            e = 0;
        }
        qb_set_l2(b, 1, e | cases[i].extra, cases[i].bitmap);
        img = qb_finish(b, &len);
        /* the whole entry is corrupt, whichever subcluster is asked */
        expect_range_fails(img,
                           len,
                           model,
                           cs,
                           512,
                           0,
                           cs,
                           cases[i].what,
                           cases[i].sub,
                           MAP_FAILS);
        expect_range_fails(img,
                           len,
                           model,
                           cs + 20 * 512,
                           1,
                           0,
                           cs,
                           cases[i].what,
                           cases[i].sub,
                           MAP_FAILS);
        qb_free(b);
        free(img);
        free(cl);
        free(model);
    }
}

/* A25: L1 entries pointing at metadata.  A reader cannot recurse; the
 * result must be well defined: the bytes of that host cluster read as an
 * L2 table, or an error.  Offset 0 (the header) means "unallocated".
 */
static void
test_l1_points_at_metadata(void **state)
{
    struct entry_image ei;
    unsigned char *img, *out;
    size_t len;
    int k;

    out = malloc(2 * MiB);
    assert_non_null(out);
    for (k = 0; k < 4; k++) {
        struct chain *c;
        uint64_t target, i;
        int r;

        entry_image_new(&ei);
        switch (k) {
        case 0:
            target = 3 * 4096; /* the L1 table itself */
            break;
        case 1:
            target = 4096; /* the refcount table */
            break;
        case 2:
            target = 2 * 4096; /* the refcount block */
            break;
        default:
            target = 0; /* the header: offset 0 = unallocated */
            break;
        }
        qb_set_l1(ei.b, 1, target | (1ULL << 63));
        img = qb_finish(ei.b, &len);
        c = chain_mem(img, len, "L1 at metadata");
        qcbt_error_clear();
        r = chain_read(c, out, 2 * MiB, 2 * MiB);
        if (r < 0) {
            CHECK_ERR(r, "L1 at metadata", "test.qcow2");
        } else {
            /* each 8-byte word of the target is an L2 entry */
            for (i = 0; i < 512; i++) {
                uint64_t ent = 0, host;
                int j;

                if (target) {
                    for (j = 0; j < 8; j++)
                        ent = (ent << 8) | img[target + i * 8 + j];
                }
                host = ent & 0x00fffffffffffe00ULL;
                if (host == 0 || (ent & 1)) {
                    size_t z;

                    for (z = 0; z < 4096; z++)
                        if (out[i * 4096 + z])
                            fail_msg("case %d: cluster %" PRIu64
                                     " should read zeros",
                                     k,
                                     i);
                } else {
                    assert_true(host + 4096 <= len);
                    assert_memory_equal(out + i * 4096, img + host, 4096);
                }
            }
        }
        /* the other L1 entries are unaffected */
        assert_int_equal(chain_read(c, out, 8192, 0), 0);
        assert_memory_equal(out, ei.model, 8192);
        chain_close(c);
        free(img);
        entry_image_free(&ei);
    }
    free(out);
}

/* L2 entries that point at the header can never return header bytes:
 * offset 0 is "unallocated" (QEMU), a compressed descriptor at offset 0
 * is corrupt data.
 */
static void
test_l2_points_at_header(void **state)
{
    struct entry_image ei;
    unsigned char *img, *out = malloc(4096);
    size_t len, i;
    struct chain *c;
    struct qcow2_image *q;
    struct qcow2_extent e;

    assert_non_null(out);
    entry_image_new(&ei);
    qb_set_l2(ei.b, 1, 1ULL << 63, 0);       /* copied, offset 0 */
    qb_set_l2(ei.b, 2, (1ULL << 63) | 1, 0); /* zero, offset 0 */
    qb_set_l2(ei.b, 3, qb_compressed_entry_raw(ei.b, 0, 1), 0);
    qb_set_l2(ei.b, 4, qb_compressed_entry_raw(ei.b, 104, 0), 0);
    img = qb_finish(ei.b, &len);

    q = expect_open_ok(img, len, "L2 at header");
    assert_int_equal(qcow2_map(q, 4096, 4096, &e), 0);
    assert_int_equal(e.kind, QCOW2_UNALLOCATED);
    assert_false(e.offset_valid);
    assert_int_equal(qcow2_map(q, 2 * 4096, 4096, &e), 0);
    assert_int_equal(e.kind, QCOW2_ZERO);
    assert_false(e.offset_valid);
    qcow2_close(q);

    c = chain_mem(img, len, "L2 at header");
    for (i = 1; i <= 2; i++) {
        size_t z;

        memset(out, 0xaa, 4096);
        assert_int_equal(chain_read(c, out, 4096, i * 4096), 0);
        for (z = 0; z < 4096; z++)
            if (out[z])
                fail_msg("cluster %zu returned header bytes", i);
    }
    qcbt_error_clear();
    CHECK_ERR(chain_read(c, out, 4096, 3 * 4096),
              "compressed at 0",
              "compressed cluster");
    qcbt_error_clear();
    CHECK_ERR(chain_read(c, out, 4096, 4 * 4096),
              "compressed at 104",
              "compressed cluster");
    chain_close(c);
    free(img);
    entry_image_free(&ei);
    free(out);
}

/* A29: many L2 entries sharing one data cluster, and an L2 table that
 * maps itself: reads are well defined.
 */
static void
test_shared_clusters(void **state)
{
    struct entry_image ei;
    unsigned char *img, *out = malloc(64 * 4096), cl[4096];
    size_t len;
    uint64_t shared, gc, l2;
    struct chain *c;
    struct qcow2_image *q;
    struct qcow2_extent e;

    assert_non_null(out);
    entry_image_new(&ei);
    fill(cl, sizeof cl, 31337);
    shared = qb_alloc_cluster(ei.b, cl, sizeof cl);
    for (gc = 100; gc < 164; gc++)
        qb_set_l2(ei.b, gc, shared, 0); /* refcount > 1: no copied bit */
    l2 = qb_l2_table(ei.b, 0);
    qb_set_l2(ei.b, 200, l2 | (1ULL << 63), 0); /* the L2 table itself */
    img = qb_finish(ei.b, &len);

    q = expect_open_ok(img, len, "shared clusters");
    assert_int_equal(qcow2_map(q, 100 * 4096, 64 * 4096, &e), 0);
    assert_int_equal(e.kind, QCOW2_DATA);
    assert_int_equal(e.len, 4096); /* not host-contiguous */
    assert_int_equal(e.host_offset, shared);
    qcow2_close(q);

    c = chain_mem(img, len, "shared clusters");
    assert_int_equal(chain_read(c, out, 64 * 4096, 100 * 4096), 0);
    for (gc = 0; gc < 64; gc++)
        assert_memory_equal(out + gc * 4096, cl, 4096);
    assert_int_equal(chain_read(c, out, 4096, 200 * 4096), 0);
    assert_memory_equal(out, img + l2, 4096);
    chain_close(c);
    free(img);
    entry_image_free(&ei);
    free(out);
}

/* ------------------------------------------------------------------ */
/* A27: compressed clusters */

enum zcase {
    Z_TRUNC_EOF,       /* stream cut, at the end of the file */
    Z_TRUNC_DESC,      /* descriptor's sector count shorter than the data */
    Z_GARBAGE,         /* not a stream at all */
    Z_BAD_HEADER,      /* valid stream with a corrupt header */
    Z_SHORT,           /* decompresses to half a cluster */
    Z_BOMB,            /* decompresses to 64 clusters */
    Z_ONE_MORE,        /* decompresses to a cluster + 1 byte */
    Z_PAST_EOF,        /* data offset past EOF */
    Z_COPIED,          /* bit 63 set in a compressed descriptor */
    Z_AT_OTHER_STREAM, /* offset in the middle of another stream */
};

static const char *const zcase_names[] = {
    "truncated at EOF",
    "truncated by descriptor",
    "garbage",
    "corrupt header",
    "half a cluster",
    "zip bomb",
    "one byte more",
    "offset past EOF",
    "copied bit",
    "mid-stream offset",
};

static void
check_compressed_bad(enum qb_compression method, enum zcase zc)
{
    const uint64_t cs = 64 * KiB, size = 1 * MiB;
    struct qb *b = qb_new(3, 16, size, false, method == QB_ZSTD);
    unsigned char *cl = malloc(64 * cs), *model = calloc(1, size), *img;
    void *z = NULL;
    size_t n, len;
    uint64_t off, entry, c0;
    size_t n0;
    char what[96];

    assert_non_null(cl);
    assert_non_null(model);
    snprintf(what,
             sizeof what,
             "%s: %s",
             method == QB_ZSTD ? "zstd" : "deflate",
             zcase_names[zc]);
    qb_l2_table(b, 0);
    fill_compressible(cl, cs, 1);
    memcpy(model, cl, cs);
    qb_write_compressed(b, 0, cl, &c0, &n0);

    switch (zc) {
    case Z_TRUNC_EOF:
        n = qb_compress(method, cl, cs, &z);
        off = qb_append(b, z, n / 2);
        entry = qb_compressed_entry(b, off, n / 2);
        break;
    case Z_TRUNC_DESC:
        fill(cl, 8192, 3);
        n = qb_compress(method, cl, cs, &z);
        assert_true(n > 1024);
        off = qb_append(b, z, n);
        memset(cl, 0x55, cs);
        qb_append(b, cl, cs); /* not at EOF */
        entry = qb_compressed_entry_raw(b, off, 0);
        break;
    case Z_GARBAGE:
        memset(cl, 0xff, 4096);
        off = qb_append(b, cl, 4096);
        entry = qb_compressed_entry(b, off, 4096);
        break;
    case Z_BAD_HEADER:
        n = qb_compress(method, cl, cs, &z);
        if (method == QB_DEFLATE)
            ((unsigned char *)z)[0] = 0x07; /* BFINAL, BTYPE 11 */
        else
            ((unsigned char *)z)[4] |= 0x08; /* FHD reserved bit */
        off = qb_append(b, z, n);
        entry = qb_compressed_entry(b, off, n);
        break;
    case Z_SHORT:
        n = qb_compress(method, cl, cs / 2, &z);
        off = qb_append(b, z, n);
        entry = qb_compressed_entry(b, off, n);
        break;
    case Z_BOMB:
        memset(cl, 0, 64 * cs);
        n = qb_compress(method, cl, 64 * cs, &z);
        assert_true(n < 128 * KiB);
        off = qb_append(b, z, n);
        entry = qb_compressed_entry(b, off, n);
        break;
    case Z_ONE_MORE:
        fill_compressible(cl, cs + 1, 9);
        n = qb_compress(method, cl, cs + 1, &z);
        off = qb_append(b, z, n);
        entry = qb_compressed_entry(b, off, n);
        break;
    case Z_PAST_EOF:
        entry = qb_compressed_entry(b, qb_file_len(b) + 4096, 100);
        break;
    case Z_COPIED:
        entry = qb_compressed_entry(b, c0, n0) | (1ULL << 63);
        break;
    case Z_AT_OTHER_STREAM:
    default:
        entry = qb_compressed_entry(b, c0 + n0 / 2, n0 / 2);
        break;
    }
    free(z);
    qb_set_l2(b, 1, entry, 0);
    img = qb_finish(b, &len);
    qb_free(b);
    expect_range_fails(img,
                       len,
                       model,
                       cs,
                       cs,
                       0,
                       cs,
                       what,
                       "compressed cluster",
                       READ_FAILS);
    expect_range_fails(img,
                       len,
                       model,
                       cs + 100,
                       1,
                       0,
                       100,
                       what,
                       "compressed cluster",
                       READ_FAILS);
    /* the low-level call agrees */
    {
        struct qcow2_image *q = expect_open_ok(img, len, what);
        unsigned char *scratch = malloc(qcow2_compressed_scratch_size(q));
        unsigned char *dec = malloc(cs);

        assert_non_null(scratch);
        assert_non_null(dec);
        qcbt_error_clear();
        check_err(qcow2_read_compressed(q, entry, dec, scratch),
                  what,
                  "compressed cluster",
                  NULL);
        free(scratch);
        free(dec);
        qcow2_close(q);
    }
    free(img);
    free(cl);
    free(model);
}

static void
test_bad_compressed_deflate(void **state)
{
    int zc;

    for (zc = Z_TRUNC_EOF; zc <= Z_AT_OTHER_STREAM; zc++)
        check_compressed_bad(QB_DEFLATE, (enum zcase)zc);
}

static void
test_bad_compressed_zstd(void **state)
{
    int zc;

    for (zc = Z_TRUNC_EOF; zc <= Z_AT_OTHER_STREAM; zc++)
        check_compressed_bad(QB_ZSTD, (enum zcase)zc);
}

/* A compressed data offset >= 2^56 (expressible with small clusters). */
static void
test_bad_compressed_offset_bits(void **state)
{
    struct qb *b = qb_new(3, 12, 1 * MiB, false, false);
    unsigned char *img, *out = malloc(4096);
    size_t len;
    struct chain *c;

    assert_non_null(out);
    qb_set_l2(b, 0, qb_compressed_entry_raw(b, 1ULL << 56, 0), 0);
    qb_set_l2(b, 1, qb_compressed_entry_raw(b, (1ULL << 57) - 512, 3), 0);
    img = qb_finish(b, &len);
    qb_free(b);
    c = chain_mem(img, len, "compressed offset >= 2^56");
    qcbt_error_clear();
    CHECK_ERR(chain_read(c, out, 4096, 0),
              "compressed offset 2^56",
              "too large");
    qcbt_error_clear();
    CHECK_ERR(chain_read(c, out, 4096, 4096),
              "compressed offset 2^57-512",
              "too large");
    chain_close(c);
    free(img);
    free(out);
}

/* qcow2_decompress on its own: exactly one cluster, never more or less,
 * trailing bytes after a complete cluster are the neighbour's.
 */
static void
test_decompress_bounds(void **state)
{
    const size_t cs = 64 * KiB;
    unsigned char *in = malloc(4 * cs), *out = malloc(cs + 64);
    void *z;
    size_t n;
    int m;

    assert_non_null(in);
    assert_non_null(out);
    for (m = 0; m < 2; m++) {
        enum qcow2_compression t =
            m ? QCOW2_COMPRESSION_ZSTD : QCOW2_COMPRESSION_DEFLATE;
        enum qb_compression bm = m ? QB_ZSTD : QB_DEFLATE;
        unsigned char *buf;

        fill_compressible(in, 4 * cs, 3);
        /* exact, and exact followed by garbage */
        n = qb_compress(bm, in, cs, &z);
        buf = malloc(n + 700);
        assert_non_null(buf);
        memcpy(buf, z, n);
        memset(buf + n, 0xee, 700);
        memset(out, 0, cs + 64);
        assert_int_equal(qcow2_decompress(t, buf, n, out, cs), 0);
        assert_memory_equal(out, in, cs);
        assert_int_equal(qcow2_decompress(t, buf, n + 700, out, cs), 0);
        assert_memory_equal(out, in, cs);
        /* nothing is written past outlen */
        assert_int_equal(out[cs], 0);
        /* no input at all */
        qcbt_error_clear();
        CHECK_ERR(qcow2_decompress(t, buf, 0, out, cs),
                  "empty input",
                  "compressed cluster");
        /* each prefix of the stream is refused, never accepted short */
        {
            size_t cut;

            for (cut = 1; cut + 16 < n; cut += n / 7 + 1) {
                qcbt_error_clear();
                CHECK_ERR(qcow2_decompress(t, buf, cut, out, cs),
                          "truncated stream",
                          "compressed cluster");
            }
        }
        free(buf);
        free(z);
        /* larger than a cluster, by a lot and by one byte */
        n = qb_compress(bm, in, 4 * cs, &z);
        qcbt_error_clear();
        CHECK_ERR(qcow2_decompress(t, z, n, out, cs),
                  "4 clusters",
                  "compressed cluster");
        assert_int_equal(out[cs], 0);
        free(z);
        n = qb_compress(bm, in, cs + 1, &z);
        qcbt_error_clear();
        CHECK_ERR(qcow2_decompress(t, z, n, out, cs),
                  "cluster + 1",
                  "compressed cluster");
        free(z);
        /* smaller than a cluster */
        n = qb_compress(bm, in, cs - 1, &z);
        qcbt_error_clear();
        CHECK_ERR(qcow2_decompress(t, z, n, out, cs),
                  "cluster - 1",
                  "compressed cluster");
        free(z);
    }
    qcbt_error_clear();
    CHECK_ERR(qcow2_decompress((enum qcow2_compression)7, in, 10, out, cs),
              "unknown method",
              "compression type");
    free(in);
    free(out);
}

/* ------------------------------------------------------------------ */
/* A1, A16, A19-A23: backing chains of real files */

/* PATH of NAME inside the test's directory SUB (created on first use). */
static const char *
tpath(const char *sub, const char *name)
{
    static char buf[4][PATH_MAX];
    static int next;
    char *p = buf[next++ % 4];

    int n = snprintf(p, PATH_MAX, "%s/%s", test_tmpdir, sub);

    assert_true(n > 0 && n < PATH_MAX);
    mkdir(p, 0700);
    if (name) {
        n = snprintf(p + n, PATH_MAX - n, "/%s", name);
        assert_true(n > 0 && (size_t)n < PATH_MAX - strlen(test_tmpdir));
    }
    return p;
}

static void
write_file(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");

    if (!f)
        fail_msg("cannot create %s", path);
    assert_int_equal(fwrite(buf, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* Finish B into PATH and free it. */
static void
write_qcow2(const char *path, struct qb *b)
{
    size_t len;
    unsigned char *img = qb_finish(b, &len);

    write_file(path, img, len);
    free(img);
    qb_free(b);
}

/* A small qcow2 overlay (512-byte clusters) with a backing file. */
static void
write_overlay(const char *path,
              uint64_t size,
              const char *backing,
              const char *fmt)
{
    struct qb *b = qb_new(3, 9, size, false, false);

    if (backing)
        qb_set_backing(b, backing, fmt);
    write_qcow2(path, b);
}

static int
count_fds(void)
{
    int n = 0, fd;

    for (fd = 0; fd < 4096; fd++)
        if (fcntl(fd, F_GETFD) >= 0)
            n++;
    return n;
}

static void
expect_chain_fail(const char *path,
                  const struct chain_open_opts *o,
                  const char *what,
                  int err,
                  const char *sub1,
                  const char *sub2)
{
    struct chain *c = NULL;
    int fds = count_fds();
    int r;

    qcbt_error_clear();
    r = chain_open(path, o, &c);
    if (r >= 0) {
        chain_close(c);
        fail_msg("%s: chain_open accepted %s", what, path);
    }
    check_err(r, what, sub1, sub2, NULL);
    if (err && r != -err)
        fail_msg("%s: expected -%d, got %d (%s)",
                 what,
                 err,
                 r,
                 qcbt_error_get());
    if (count_fds() != fds)
        fail_msg("%s: file descriptors leaked on error", what);
}

static struct chain *
expect_chain_ok(const char *path,
                const struct chain_open_opts *o,
                const char *what)
{
    struct chain *c;
    int r;

    qcbt_error_clear();
    r = chain_open(path, o, &c);
    if (r < 0)
        fail_msg("%s: chain_open failed: %s", what, qcbt_error_get());
    return c;
}

/* A23 and DESIGN.md "Chain and guest view": a raw base larger than its
 * overlay, a qcow2 overlay smaller than the top, different cluster sizes,
 * zero clusters hiding the backing file, extended-L2 subclusters reading
 * through.
 */
static void
test_chain_read_through(void **state)
{
    const uint64_t base_size = 5 * MiB + 100, mid_size = 4 * MiB;
    const uint64_t top_size = 6 * MiB;
    unsigned char *base = malloc(base_size), *model = calloc(1, top_size);
    unsigned char *out = malloc(top_size), *cl = malloc(64 * KiB);
    struct qb *b;
    struct chain *c;
    struct chain_status st;
    uint64_t i;

    assert_non_null(base);
    assert_non_null(model);
    assert_non_null(out);
    assert_non_null(cl);
    fill(base, base_size, 1);
    write_file(tpath("rt", "base.raw"), base, base_size);
    memcpy(model, base, mid_size); /* the mid layer ends at 4 MiB */

    /* mid: 64 KiB clusters; data in cluster 1, zero cluster 2, zero-alloc
     * cluster 3 */
    b = qb_new(3, 16, mid_size, false, false);
    qb_set_backing(b, "base.raw", "raw");
    fill(cl, 64 * KiB, 2);
    qb_write_cluster(b, 1, cl);
    memcpy(model + 64 * KiB, cl, 64 * KiB);
    qb_set_l2(b, 2, 1, 0);
    memset(model + 128 * KiB, 0, 64 * KiB);
    fill(cl, 64 * KiB, 3);
    qb_set_l2(b, 3, qb_alloc_cluster(b, cl, 64 * KiB) | (1ULL << 63) | 1, 0);
    memset(model + 192 * KiB, 0, 64 * KiB);
    write_qcow2(tpath("rt", "mid.qcow2"), b);

    /* top: 4 KiB clusters, larger than mid; data at 4 KiB and at 5 MiB */
    b = qb_new(3, 12, top_size, false, false);
    qb_set_backing(b, "mid.qcow2", "qcow2");
    fill(cl, 4096, 4);
    qb_write_cluster(b, 1, cl);
    memcpy(model + 4096, cl, 4096);
    fill(cl, 4096, 5);
    qb_write_cluster(b, 5 * MiB / 4096, cl);
    memcpy(model + 5 * MiB, cl, 4096);
    /* a zero cluster over mid's data */
    qb_set_l2(b, 64 * KiB / 4096 + 3, 1, 0);
    memset(model + 64 * KiB + 3 * 4096, 0, 4096);
    write_qcow2(tpath("rt", "top.qcow2"), b);

    c = expect_chain_ok(tpath("rt", "top.qcow2"), NULL, "3-layer chain");
    assert_int_equal(c->nr_layers, 3);
    assert_int_equal(c->size, top_size);
    assert_int_equal(c->layers[1].fmt, CHAIN_FMT_QCOW2);
    assert_int_equal(c->layers[2].fmt, CHAIN_FMT_RAW);
    assert_false(c->layers[1].fmt_probed);
    assert_false(c->layers[2].fmt_probed);
    assert_int_equal(c->layers[2].size, (base_size + 511) / 512 * 512);
    assert_int_equal(chain_read(c, out, top_size, 0), 0);
    for (i = 0; i < top_size; i += 4096)
        if (memcmp(out + i, model + i, 4096))
            fail_msg("3-layer chain: guest cluster at 0x%" PRIx64 " differs",
                     i);
    assert_int_equal(chain_read(c, out, 3 * 4096 + 5, 4 * MiB - 4096 - 2), 0);
    assert_memory_equal(out, model + 4 * MiB - 4096 - 2, 3 * 4096 + 5);
    /* block status: depth of the answering layer */
    assert_int_equal(chain_block_status(c, 0, 4096, &st), 0);
    assert_int_equal(st.depth, 2);
    assert_true(st.present && st.data);
    assert_int_equal(chain_block_status(c, 4096, 4096, &st), 0);
    assert_int_equal(st.depth, 0);
    assert_int_equal(chain_block_status(c, 128 * KiB, 4096, &st), 0);
    assert_int_equal(st.depth, 1);
    assert_true(st.present && st.zero && !st.data);
    assert_int_equal(chain_block_status(c, 4 * MiB + 4096, 4096, &st), 0);
    assert_false(st.present);
    assert_true(st.zero);
    chain_close(c);

    /* a raw base of 1000 bytes under a 1 MiB overlay: the sector tail and
     * everything past it read as zeros */
    write_file(tpath("rt", "tiny.raw"), base, 1000);
    write_overlay(tpath("rt", "over-tiny.qcow2"), 1 * MiB, "tiny.raw", "raw");
    c = expect_chain_ok(tpath("rt", "over-tiny.qcow2"), NULL, "tiny base");
    memset(out, 0xaa, 1 * MiB);
    assert_int_equal(chain_read(c, out, 1 * MiB, 0), 0);
    assert_memory_equal(out, base, 1000);
    for (i = 1000; i < 1 * MiB; i++)
        if (out[i])
            fail_msg("tiny base: byte %" PRIu64 " is not zero", i);
    chain_close(c);

    /* extended L2 overlay: unallocated subclusters read the base */
    b = qb_new(3, 14, 1 * MiB, true, false);
    qb_set_backing(b, "base.raw", "raw");
    fill(cl, 16 * KiB, 6);
    qb_l2_table(b, 0);
    qb_set_l2(b,
              0,
              qb_alloc_cluster(b, cl, 16 * KiB) | (1ULL << 63),
              0x2 | (1ULL << 34));  /* sub 1 data, sub 2 zero */
    qb_set_l2(b, 1, 0, 1ULL << 32); /* unallocated, sub 0 zero */
    write_qcow2(tpath("rt", "ext.qcow2"), b);
    memcpy(model, base, 1 * MiB);
    memcpy(model + 512, cl + 512, 512);
    memset(model + 1024, 0, 512);
    memset(model + 16 * KiB, 0, 512);
    c = expect_chain_ok(tpath("rt", "ext.qcow2"), NULL, "extended L2 chain");
    assert_int_equal(chain_read(c, out, 1 * MiB, 0), 0);
    assert_memory_equal(out, model, 1 * MiB);
    chain_close(c);

    free(base);
    free(model);
    free(out);
    free(cl);
}

/* A21: loops by file identity, whatever the name */
static void
test_chain_loops(void **state)
{
    char target[PATH_MAX];

    write_overlay(tpath("loop", "self.qcow2"), 1 * MiB, "self.qcow2", "qcow2");
    expect_chain_fail(tpath("loop", "self.qcow2"),
                      NULL,
                      "A -> A",
                      ELOOP,
                      "loop",
                      NULL);

    write_overlay(tpath("loop", "dot.qcow2"), 1 * MiB, "./dot.qcow2", "qcow2");
    expect_chain_fail(tpath("loop", "dot.qcow2"),
                      NULL,
                      "A -> ./A",
                      ELOOP,
                      "loop",
                      NULL);

    write_overlay(tpath("loop", "a.qcow2"), 1 * MiB, "b.qcow2", "qcow2");
    write_overlay(tpath("loop", "b.qcow2"), 1 * MiB, "a.qcow2", "qcow2");
    expect_chain_fail(tpath("loop", "a.qcow2"),
                      NULL,
                      "A -> B -> A",
                      ELOOP,
                      "loop",
                      NULL);

    write_overlay(tpath("loop", "c.qcow2"), 1 * MiB, "d.qcow2", "qcow2");
    write_overlay(tpath("loop", "d.qcow2"), 1 * MiB, "e.qcow2", "qcow2");
    write_overlay(tpath("loop", "e.qcow2"),
                  1 * MiB,
                  "../loop/d.qcow2",
                  "qcow2");
    expect_chain_fail(tpath("loop", "c.qcow2"),
                      NULL,
                      "C -> D -> E -> D",
                      ELOOP,
                      "loop",
                      NULL);

    /* through a symlink */
    write_overlay(tpath("loop", "s.qcow2"), 1 * MiB, "link.qcow2", "qcow2");
    snprintf(target, sizeof target, "%s", tpath("loop", "s.qcow2"));
    assert_int_equal(symlink(target, tpath("loop", "link.qcow2")), 0);
    expect_chain_fail(tpath("loop", "s.qcow2"),
                      NULL,
                      "A -> symlink(A)",
                      ELOOP,
                      "loop",
                      NULL);
    /* opening the symlink itself */
    expect_chain_fail(tpath("loop", "link.qcow2"),
                      NULL,
                      "symlink(A) -> A",
                      ELOOP,
                      "loop",
                      NULL);

    /* through a hard link */
    write_overlay(tpath("loop", "h.qcow2"), 1 * MiB, "hard.qcow2", "qcow2");
    snprintf(target, sizeof target, "%s", tpath("loop", "h.qcow2"));
    assert_int_equal(link(target, tpath("loop", "hard.qcow2")), 0);
    expect_chain_fail(tpath("loop", "h.qcow2"),
                      NULL,
                      "A -> hardlink(A)",
                      ELOOP,
                      "loop",
                      NULL);

    /* an absolute name for itself */
    snprintf(target, sizeof target, "%s", tpath("loop", "abs.qcow2"));
    write_overlay(target, 1 * MiB, target, "qcow2");
    expect_chain_fail(target, NULL, "A -> /abs/A", ELOOP, "loop", NULL);
}

/* A22: depth cap, iterative, bounded file descriptors */
static void
test_chain_depth(void **state)
{
    char name[32], next[32];
    unsigned char *out = malloc(128 * 512), expect[512];
    struct chain_open_opts o = {0};
    struct chain *c;
    int i, fds;

    assert_non_null(out);
    /* 70 layers: l00 (top) .. l69 (raw base); layer i writes cluster i */
    for (i = 0; i < 70; i++) {
        snprintf(name, sizeof name, "l%02d.qcow2", i);
        snprintf(next, sizeof next, "l%02d.qcow2", i + 1);
        if (i == 69) {
            fill(expect, 512, 1000 + i);
            memset(out, 0, 128 * 512);
            memcpy(out + 69 * 512, expect, 512);
            write_file(tpath("deep", name), out, 128 * 512);
        } else {
            struct qb *b = qb_new(3, 9, 128 * 512, false, false);

            qb_set_backing(b, next, i == 68 ? "raw" : "qcow2");
            fill(expect, 512, 1000 + i);
            qb_write_cluster(b, (uint64_t)i, expect);
            write_qcow2(tpath("deep", name), b);
        }
    }
    expect_chain_fail(tpath("deep", "l00.qcow2"),
                      NULL,
                      "70 layers",
                      EMLINK,
                      "64",
                      NULL);
    /* exactly 64 layers open (l06 .. l69) and every layer is read */
    fds = count_fds();
    c = expect_chain_ok(tpath("deep", "l06.qcow2"), NULL, "64 layers");
    assert_int_equal(c->nr_layers, 64);
    assert_int_equal(chain_read(c, out, 128 * 512, 0), 0);
    for (i = 0; i < 70; i++) {
        fill(expect, 512, 1000 + i);
        if (i < 6) {
            size_t z;

            for (z = 0; z < 512; z++)
                assert_int_equal(out[i * 512 + z], 0);
        } else {
            assert_memory_equal(out + i * 512, expect, 512);
        }
    }
    chain_close(c);
    assert_int_equal(count_fds(), fds);
    /* 65 layers do not */
    expect_chain_fail(tpath("deep", "l05.qcow2"),
                      NULL,
                      "65 layers",
                      EMLINK,
                      "deeper",
                      NULL);
    /* a caller's lower cap, and no_backing */
    o.max_depth = 3;
    expect_chain_fail(tpath("deep", "l60.qcow2"),
                      &o,
                      "max_depth 3",
                      EMLINK,
                      "deeper than 3",
                      NULL);
    o.max_depth = 0;
    o.no_backing = true;
    c = expect_chain_ok(tpath("deep", "l00.qcow2"), &o, "no_backing");
    assert_int_equal(c->nr_layers, 1);
    chain_close(c);
    free(out);
}

/* Missing backing files, named with the layer */
static void
test_chain_missing(void **state)
{
    write_overlay(tpath("miss", "top.qcow2"), 1 * MiB, "nope.qcow2", "qcow2");
    expect_chain_fail(tpath("miss", "top.qcow2"),
                      NULL,
                      "missing backing",
                      ENOENT,
                      "nope.qcow2",
                      "layer 1");
    write_overlay(tpath("miss", "top2.qcow2"), 1 * MiB, "nope.raw", NULL);
    expect_chain_fail(tpath("miss", "top2.qcow2"),
                      NULL,
                      "missing backing, no format",
                      ENOENT,
                      "nope.raw",
                      NULL);
    write_overlay(tpath("miss", "top3.qcow2"),
                  1 * MiB,
                  "missing-dir/x.raw",
                  "raw");
    expect_chain_fail(tpath("miss", "top3.qcow2"),
                      NULL,
                      "backing in a missing directory",
                      ENOENT,
                      "x.raw",
                      NULL);
    expect_chain_fail(tpath("miss", "no-such-top.qcow2"),
                      NULL,
                      "missing top",
                      ENOENT,
                      "no-such-top.qcow2",
                      NULL);
}

/* A20: protocol and json: names are never followed (CVE-2024-4467) */
static void
test_chain_protocols(void **state)
{
    static const char *const names[] = {
        "json:{\"file.filename\":\"/etc/passwd\"}",
        "json:{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\","
        "\"path\":\"/tmp/s\"}}",
        "nbd://localhost:10809/export",
        "nbd:unix:/tmp/nbd.sock",
        "nbd+unix:///export?socket=/tmp/s",
        "http://example.com/base.qcow2",
        "https://example.com/base.qcow2",
        "ssh://host/base.qcow2",
        "file:base.raw",
        "null-co://",
    };
    size_t i;

    for (i = 0; i < sizeof names / sizeof names[0]; i++) {
        write_overlay(tpath("proto", "top.qcow2"), 1 * MiB, names[i], "raw");
        expect_chain_fail(tpath("proto", "top.qcow2"),
                          NULL,
                          names[i],
                          ENOTSUP,
                          "protocol",
                          NULL);
        /* the same name as an external data file */
        {
            struct qb *b = qb_new(3, 16, 1 * MiB, false, false);

            qb_hdr(b)->incompatible_features = 1ULL << 2;
            qb_add_ext(b, 0x44415441U, names[i], strlen(names[i]));
            write_qcow2(tpath("proto", "df.qcow2"), b);
            expect_chain_fail(tpath("proto", "df.qcow2"),
                              NULL,
                              names[i],
                              ENOTSUP,
                              "protocol",
                              NULL);
        }
    }
}

/* A20: only regular files, and opening a FIFO never blocks */
static void
test_chain_special_files(void **state)
{
    static const char *const devs[] = {"/dev/zero",
                                       "/dev/null",
                                       "/dev/urandom"};
    struct stat st;
    size_t i;

    assert_int_equal(mkfifo(tpath("special", "fifo"), 0600), 0);
    write_overlay(tpath("special", "top.qcow2"), 1 * MiB, "fifo", "raw");
    expect_chain_fail(tpath("special", "top.qcow2"),
                      NULL,
                      "FIFO backing",
                      EINVAL,
                      "not a regular file",
                      NULL);
    expect_chain_fail(tpath("special", "fifo"),
                      NULL,
                      "FIFO top",
                      EINVAL,
                      "not a regular file",
                      NULL);
    write_overlay(tpath("special", "top.qcow2"), 1 * MiB, "fifo", NULL);
    expect_chain_fail(tpath("special", "top.qcow2"),
                      NULL,
                      "FIFO backing, no format",
                      EINVAL,
                      "not a regular file",
                      NULL);

    for (i = 0; i < sizeof devs / sizeof devs[0]; i++) {
        write_overlay(tpath("special", "top.qcow2"), 1 * MiB, devs[i], "raw");
        expect_chain_fail(tpath("special", "top.qcow2"),
                          NULL,
                          devs[i],
                          EINVAL,
                          "not a regular file",
                          NULL);
    }
    /* a directory */
    mkdir(tpath("special", "dir"), 0700);
    write_overlay(tpath("special", "top.qcow2"), 1 * MiB, "dir", "raw");
    expect_chain_fail(tpath("special", "top.qcow2"),
                      NULL,
                      "directory",
                      EINVAL,
                      "not a regular file",
                      NULL);
    /* /dev/stdin: refused unless the test's stdin happens to be a file */
    if (fstat(0, &st) == 0 && !S_ISREG(st.st_mode)) {
        write_overlay(tpath("special", "top.qcow2"),
                      1 * MiB,
                      "/dev/stdin",
                      "raw");
        expect_chain_fail(tpath("special", "top.qcow2"),
                          NULL,
                          "/dev/stdin",
                          0,
                          "layer 1",
                          NULL);
    }
}

/* A19 and A1: the declared format only, never a guess that widens it */
static void
test_chain_formats(void **state)
{
    struct qb *b;
    struct chain *c;
    unsigned char *out = malloc(1 * MiB), *cl = malloc(512);
    unsigned char *file;
    size_t flen;
    FILE *f;

    assert_non_null(out);
    assert_non_null(cl);
    /* a base that really is qcow2 (its own backing points at a secret) */
    fill(cl, 512, 8);
    write_file(tpath("fmt", "secret.raw"), cl, 512);
    b = qb_new(3, 9, 1 * MiB, false, false);
    qb_set_backing(b, "secret.raw", "raw");
    write_qcow2(tpath("fmt", "base.qcow2"), b);

    /* declared raw: read as raw bytes, the secret is not reached */
    write_overlay(tpath("fmt", "top.qcow2"), 1 * MiB, "base.qcow2", "raw");
    c = expect_chain_ok(tpath("fmt", "top.qcow2"), NULL, "raw with header");
    assert_int_equal(c->nr_layers, 2);
    assert_int_equal(c->layers[1].fmt, CHAIN_FMT_RAW);
    assert_false(c->layers[1].fmt_probed);
    assert_int_equal(chain_read(c, out, 1 * MiB, 0), 0);
    f = fopen(tpath("fmt", "base.qcow2"), "rb");
    assert_non_null(f);
    file = malloc(1 * MiB);
    assert_non_null(file);
    flen = fread(file, 1, 1 * MiB, f);
    fclose(f);
    assert_true(flen > 4);
    assert_memory_equal(out, "QFI\xfb", 4);
    assert_memory_equal(out, file, flen);
    free(file);
    chain_close(c);

    /* unknown, empty and oversized formats */
    write_overlay(tpath("fmt", "top.qcow2"), 1 * MiB, "base.qcow2", "vmdk");
    expect_chain_fail(tpath("fmt", "top.qcow2"),
                      NULL,
                      "format vmdk",
                      ENOTSUP,
                      "backing format",
                      "vmdk");
    write_overlay(tpath("fmt", "top.qcow2"), 1 * MiB, "base.qcow2", "");
    expect_chain_fail(tpath("fmt", "top.qcow2"),
                      NULL,
                      "empty format",
                      ENOTSUP,
                      "backing format",
                      NULL);
    write_overlay(tpath("fmt", "top.qcow2"),
                  1 * MiB,
                  "base.qcow2",
                  "qcow2qcow2qcow2q");
    expect_chain_fail(tpath("fmt", "top.qcow2"),
                      NULL,
                      "16-byte format",
                      0,
                      "backing format",
                      "layer 0");

    /* A1: a format given for the top is not second-guessed */
    expect_chain_fail(tpath("fmt", "secret.raw"),
                      &(struct chain_open_opts){.format = "qcow2"},
                      "raw file opened as qcow2",
                      EINVAL,
                      "magic",
                      NULL);
    expect_chain_fail(tpath("fmt", "top.qcow2"),
                      &(struct chain_open_opts){.format = "vmdk"},
                      "top format vmdk",
                      ENOTSUP,
                      "vmdk",
                      NULL);
    c = expect_chain_ok(tpath("fmt", "base.qcow2"),
                        &(struct chain_open_opts){.format = "raw"},
                        "qcow2 opened as raw");
    assert_int_equal(c->nr_layers, 1);
    assert_int_equal(c->layers[0].fmt, CHAIN_FMT_RAW);
    chain_close(c);
    /* a probed top that has the magic but a bad header is an error, not
     * a raw image */
    {
        unsigned char *img;
        size_t len;

        b = qb_new(3, 9, 1 * MiB, false, false);
        qb_hdr(b)->version = 4;
        img = qb_finish(b, &len);
        qb_free(b);
        write_file(tpath("fmt", "v4.qcow2"), img, len);
        free(img);
        expect_chain_fail(tpath("fmt", "v4.qcow2"),
                          NULL,
                          "probed v4",
                          ENOTSUP,
                          "version",
                          NULL);
    }
    free(out);
    free(cl);
}

/* A16: an external data file outside the image's directory is refused
 * by default (CVE-2024-32498 class); protocol names are covered above.
 */
static void
test_chain_data_file_policy(void **state)
{
    unsigned char secret[4096];
    char abs[PATH_MAX];
    struct qb *b;

    fill(secret, sizeof secret, 99);
    write_file(tpath("df-outside", "secret.raw"), secret, sizeof secret);
    snprintf(abs, sizeof abs, "%s", tpath("df-outside", "secret.raw"));

    b = qb_new(3, 12, 1 * MiB, false, false);
    qb_hdr(b)->incompatible_features = 1ULL << 2;
    qb_add_ext(b, 0x44415441U, abs, strlen(abs));
    write_qcow2(tpath("df", "abs.qcow2"), b);
    expect_chain_fail(tpath("df", "abs.qcow2"),
                      NULL,
                      "absolute data file outside the image directory",
                      0,
                      "data file",
                      NULL);

    b = qb_new(3, 12, 1 * MiB, false, false);
    qb_hdr(b)->incompatible_features = 1ULL << 2;
    qb_add_ext(b, 0x44415441U, "../df-outside/secret.raw", 24);
    write_qcow2(tpath("df", "rel.qcow2"), b);
    expect_chain_fail(tpath("df", "rel.qcow2"),
                      NULL,
                      "data file ../ outside the image directory",
                      0,
                      "data file",
                      NULL);

    /* the data-file bit without a name */
    b = qb_new(3, 12, 1 * MiB, false, false);
    qb_hdr(b)->incompatible_features = 1ULL << 2;
    write_qcow2(tpath("df", "noname.qcow2"), b);
    expect_chain_fail(tpath("df", "noname.qcow2"),
                      NULL,
                      "data file unnamed",
                      EINVAL,
                      "data file",
                      NULL);
}

/* chain_open_io(): "backing_dir NULL: no backing files allowed" (chain.h),
 * so an image read through the nbdkit filter cannot open files relative
 * to the server's working directory.
 */
static void
test_chain_open_io_no_backing_dir(void **state)
{
    unsigned char raw[4096];
    char cwd[PATH_MAX];
    struct qb *b;
    struct qcbt_io *io;
    struct chain *c = NULL;
    unsigned char *img;
    size_t len;
    int r;

    fill(raw, sizeof raw, 5);
    write_file(tpath("cwd", "b.raw"), raw, sizeof raw);
    b = qb_new(3, 12, 1 * MiB, false, false);
    qb_set_backing(b, "b.raw", "raw");
    img = qb_finish(b, &len);
    qb_free(b);

    assert_non_null(getcwd(cwd, sizeof cwd));
    assert_int_equal(chdir(tpath("cwd", NULL)), 0);
    assert_int_equal(qcbt_io_open_mem(img, len, "filter-image", &io), 0);
    qcbt_error_clear();
    r = chain_open_io(io, "qcow2", NULL, NULL, &c);
    assert_int_equal(chdir(cwd), 0);
    if (r >= 0) {
        size_t n = c->nr_layers;

        chain_close(c);
        free(img);
        fail_msg("chain_open_io with backing_dir NULL opened %zu layers "
                 "(backing file resolved against the working directory)",
                 n);
    }
    CHECK_ERR(r, "backing_dir NULL", "backing");
    free(img);
}

/* Corruption in a lower layer is reported for reads that reach it. */
static void
test_chain_lower_layer_corrupt(void **state)
{
    struct qb *b;
    struct chain *c;
    unsigned char out[4096], cl[4096];

    b = qb_new(3, 12, 1 * MiB, false, false);
    fill(cl, sizeof cl, 1);
    qb_write_cluster(b, 0, cl);
    qb_set_l2(b, 1, (qb_alloc_cluster(b, cl, 4096) + 0x200) | (1ULL << 63), 0);
    write_qcow2(tpath("lower", "base.qcow2"), b);
    write_overlay(tpath("lower", "top.qcow2"), 1 * MiB, "base.qcow2", "qcow2");
    c = expect_chain_ok(tpath("lower", "top.qcow2"), NULL, "corrupt base");
    assert_int_equal(chain_read(c, out, 4096, 0), 0);
    assert_memory_equal(out, cl, 4096);
    qcbt_error_clear();
    CHECK_ERR(chain_read(c, out, 4096, 4096),
              "corrupt base",
              "base.qcow2",
              "not cluster aligned");
    chain_close(c);
}

/* Other image formats: probed as QEMU probes them (block.c
 * find_image_format and each driver's .bdrv_probe) and refused by name,
 * for the top and for backing files, probed or given as qcow2; given as
 * raw they are raw bytes, as in QEMU.
 */
struct foreign {
    const char *fmt;
    const char *file;
    unsigned char head[600];
    size_t len; /* file length (>= the header written) */
};

static void
le32_at(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static size_t
make_foreign(struct foreign *f)
{
    static const char cloop[] =
        "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t "
        "iso9660 /dev/cloop $1\n";
    static struct foreign all[] = {
        {"vmdk", "sparse.vmdk", "KDMV\x01", 4096},
        {"vmdk", "vmfs.vmdk", "COWD", 4096},
        {"vmdk", "desc.vmdk", "# Disk DescriptorFile\n   \r\nversion=1\n", 0},
        {"vmdk", "desc-crlf.vmdk", "#c\r\nversion=3\r\nCID=1\r\n", 0},
        {"qed", "d.qed", "QED\0\0\0\1\0", 4096},
        {"vdi", "d.vdi", "<<< QEMU VM Virtual Disk Image >>>\n", 1024},
        {"vhdx", "d.vhdx", "vhdxfile", 65536},
        {"vpc", "d.vpc", "conectix", 2560},
        {"luks", "d.luks", "LUKS\xba\xbe\0\1aes", 4096},
        {"qcow", "d.qcow", "QFI\xfb\0\0\0\1", 4096},
        {"bochs", "d.bochs", "Bochs Virtual HD Image", 4096},
        {"parallels", "d.hdd", "WithoutFreeSpace\2", 4096},
        {"parallels", "d2.hdd", "WithouFreSpacExt\2", 4096},
        {"cloop", "d.cloop", "", 4096},
        {"dmg", "random.dmg", "\x01\x02", 4096},
    };
    static size_t next;

    if (next == sizeof all / sizeof all[0]) {
        next = 0;
        return 0;
    }
    *f = all[next++];
    if (strcmp(f->file, "d.vdi") == 0)
        le32_at(f->head + 0x40, 0xbeda107f);
    if (strcmp(f->fmt, "bochs") == 0) {
        memcpy(f->head + 32, "Redolog", 8);
        memcpy(f->head + 48, "Growing", 8);
        le32_at(f->head + 64, 0x00020000);
    }
    if (strcmp(f->fmt, "cloop") == 0)
        memcpy(f->head, cloop, sizeof cloop - 1);
    if (f->len == 0)
        f->len = strlen((const char *)f->head);
    return 1;
}

static void
write_foreign(const char *path, const struct foreign *f)
{
    unsigned char *buf = calloc(1, f->len);

    assert_non_null(buf);
    memcpy(buf, f->head, MIN(f->len, sizeof f->head));
    write_file(path, buf, f->len);
    free(buf);
}

/* chain_open_opts.lock: every layer is locked as QEMU locks it (io.h);
 * a layer another process writes is refused unless force-share, and the
 * chain's locks keep a writer out until chain_close().  (The same locks
 * against real QEMU processes: tests/interop/test-locks.sh.)
 */
static void
test_chain_locks(void **state)
{
    struct chain_open_opts o = {.lock = QCBT_IO_LOCK_READ};
    struct qcbt_io *w;
    struct chain *c;
    char top[PATH_MAX], base[PATH_MAX];

    (void)state;
    snprintf(base, sizeof base, "%s", tpath("locks", "base.qcow2"));
    snprintf(top, sizeof top, "%s", tpath("locks", "top.qcow2"));
    write_overlay(base, 1 * MiB, NULL, NULL);
    write_overlay(top, 1 * MiB, "base.qcow2", "qcow2");

    /* another process writes the base */
    assert_int_equal(qcbt_io_open_file_rw(base, &w), 0);
    assert_int_equal(qcbt_io_lock(w, QCBT_IO_LOCK_WRITE), 0);
    expect_chain_fail(top,
                      &o,
                      "base written",
                      EAGAIN,
                      "layer 1: ",
                      "base.qcow2: held by another process (failed to get "
                      "shared \"write\" lock)");
    o.lock = QCBT_IO_LOCK_SHARED;
    chain_close(expect_chain_ok(top, &o, "force-share"));
    o.lock = QCBT_IO_LOCK_NONE;
    chain_close(expect_chain_ok(top, &o, "no locks"));
    qcbt_io_free(w);

    /* the open chain keeps writers out of every layer, until closed */
    o.lock = QCBT_IO_LOCK_READ;
    c = expect_chain_ok(top, &o, "read");
    assert_int_equal(qcbt_io_open_file_rw(top, &w), 0);
    assert_int_equal(qcbt_io_lock(w, QCBT_IO_LOCK_WRITE), -EAGAIN);
    qcbt_io_free(w);
    assert_int_equal(qcbt_io_open_file_rw(base, &w), 0);
    assert_int_equal(qcbt_io_lock(w, QCBT_IO_LOCK_WRITE), -EAGAIN);
    assert_non_null(strstr(qcbt_error_get(), "failed to get \"write\" lock"));
    /* readers share */
    chain_close(expect_chain_ok(top, &o, "second reader"));
    chain_close(c);
    assert_int_equal(qcbt_io_lock(w, QCBT_IO_LOCK_WRITE), 0);
    qcbt_io_free(w);
}

static void
test_chain_foreign_formats(void **state)
{
    char msg[256];
    struct foreign f;
    struct chain *c;

    while (make_foreign(&f)) {
        const char *path = tpath("foreign", f.file);
        char what[64];

        write_foreign(path, &f);
        snprintf(msg, sizeof msg, "image format %s is not supported", f.fmt);
        snprintf(what, sizeof what, "%s probed", f.file);
        expect_chain_fail(path, NULL, what, ENOTSUP, msg, "layer 0");
        check_err(-ENOTSUP, what, f.file, "qcbt reads qcow2 and raw", NULL);

        /* the plugin, the filter and -f qcow2 give the format: the
         * refusal still says what the file is (not for dmg: QEMU
         * recognises it by its name only)
         */
        if (strcmp(f.fmt, "dmg") != 0) {
            snprintf(what, sizeof what, "%s as qcow2", f.file);
            expect_chain_fail(path,
                              &(struct chain_open_opts){.format = "qcow2"},
                              what,
                              ENOTSUP,
                              msg,
                              "layer 0");
        }

        /* given as raw: the container's bytes, as qemu-nbd -f raw */
        c = expect_chain_ok(path,
                            &(struct chain_open_opts){.format = "raw"},
                            "foreign as raw");
        assert_int_equal(c->nr_layers, 1);
        assert_int_equal(c->layers[0].fmt, CHAIN_FMT_RAW);
        assert_int_equal(c->size, (f.len + 511) / 512 * 512);
        chain_close(c);

        /* as a backing file: probed, recorded as qcow2, recorded as raw */
        write_overlay(tpath("foreign", "top.qcow2"), 1 * MiB, f.file, NULL);
        snprintf(what, sizeof what, "%s probed backing", f.file);
        expect_chain_fail(tpath("foreign", "top.qcow2"),
                          NULL,
                          what,
                          ENOTSUP,
                          msg,
                          "layer 1");
        if (strcmp(f.fmt, "dmg") != 0) {
            write_overlay(tpath("foreign", "top.qcow2"),
                          1 * MiB,
                          f.file,
                          "qcow2");
            snprintf(what, sizeof what, "%s qcow2 backing", f.file);
            expect_chain_fail(tpath("foreign", "top.qcow2"),
                              NULL,
                              what,
                              ENOTSUP,
                              msg,
                              "layer 1");
        }
        write_overlay(tpath("foreign", "top.qcow2"), 1 * MiB, f.file, "raw");
        c = expect_chain_ok(tpath("foreign", "top.qcow2"),
                            NULL,
                            "foreign raw backing");
        assert_int_equal(c->nr_layers, 2);
        assert_int_equal(c->layers[1].fmt, CHAIN_FMT_RAW);
        chain_close(c);
        /* the format it records is refused by name */
        write_overlay(tpath("foreign", "top.qcow2"), 1 * MiB, f.file, f.fmt);
        snprintf(what, sizeof what, "%s recorded backing", f.file);
        expect_chain_fail(tpath("foreign", "top.qcow2"),
                          NULL,
                          what,
                          ENOTSUP,
                          "backing format",
                          f.fmt);
    }

    /* through an io (the filter's path, and chain_open_io probing) */
    {
        struct foreign v;
        struct qcbt_io *io;
        int r;

        make_foreign(&v);
        assert_string_equal(v.fmt, "vmdk");
        assert_int_equal(qcbt_io_open_mem(v.head, sizeof v.head, "d.vmdk", &io),
                         0);
        qcbt_error_clear();
        r = chain_open_io(io, NULL, NULL, NULL, &c);
        check_err(r, "io probed", "image format vmdk", NULL);
        assert_int_equal(qcbt_io_open_mem(v.head, sizeof v.head, "d.vmdk", &io),
                         0);
        qcbt_error_clear();
        r = chain_open_io(io, "qcow2", NULL, NULL, &c);
        check_err(r, "io as qcow2", "image format vmdk", NULL);
        while (make_foreign(&v))
            ;
    }

    /* what QEMU probes as raw stays raw */
    {
        static const struct {
            const char *what;
            const char *bytes;
        } raw[] = {
            {"empty", ""},
            {"blank line before version", "\nversion=1\n"},
            {"version 4 descriptor", "version=4\n"},
            {"descriptor without newline", "version=1"},
            {"spaces then text", "  x\nversion=1\n"},
            {"LUKS version 2", "LUKS\xba\xbe\0\2"},
            {"parallels version 3", "WithoutFreeSpace\3"},
            {"bochs without its type", "Bochs Virtual HD Image"},
            {"QED without NUL", "QEDX"},
            {"half a cloop header", "#!/bin/sh\n#V2.0 Format\n"},
        };
        size_t i;

        for (i = 0; i < sizeof raw / sizeof raw[0]; i++) {
            const char *path = tpath("foreign", "maybe.img");

            write_file(path, raw[i].bytes, strlen(raw[i].bytes));
            c = expect_chain_ok(path, NULL, raw[i].what);
            assert_int_equal(c->layers[0].fmt, CHAIN_FMT_RAW);
            assert_true(c->layers[0].fmt_probed);
            chain_close(c);
        }
    }
}

/* A message made from image strings must be one line a terminal shows as
 * text: no C0 control byte (ESC, CR, LF, BEL), no DEL, no C1 control
 * (U+0080..U+009F, CSI is U+009B) and no byte that is not UTF-8.
 */
static void
check_clean_line(const char *msg, const char *what)
{
    const unsigned char *p = (const unsigned char *)msg;

    while (*p) {
        size_t len = *p < 0x80             ? 1
                     : (*p & 0xe0) == 0xc0 ? 2
                     : (*p & 0xf0) == 0xe0 ? 3
                     : (*p & 0xf8) == 0xf0 ? 4
                                           : 0;
        size_t i;

        if (len == 0)
            fail_msg("%s: byte 0x%02x is not UTF-8 in \"%s\"", what, *p, msg);
        for (i = 1; i < len; i++)
            if ((p[i] & 0xc0) != 0x80)
                fail_msg("%s: broken UTF-8 in \"%s\"", what, msg);
        if (*p < 0x20 || *p == 0x7f || (*p == 0xc2 && p[1] < 0xa0))
            fail_msg("%s: control character 0x%02x%02x in \"%s\"",
                     what,
                     p[0],
                     len > 1 ? p[1] : 0,
                     msg);
        p += len;
    }
}

/* Backing file names, backing formats and the paths built from them come
 * from the image: a crafted image must not send escape sequences or extra
 * lines to the terminal (or a log) through an error message.
 */
static void
test_chain_hostile_names(void **state)
{
    const char *evil = "evil\x1b[31mRED\nsecond\r\x07\x9b"
                       "2J\xc2\x9b"
                       "1m";
    struct qb *b;

    /* a missing backing file: its name (and the path) in the message */
    write_overlay(tpath("names", "top.qcow2"), 1 * MiB, evil, "qcow2");
    expect_chain_fail(tpath("names", "top.qcow2"),
                      NULL,
                      "missing hostile backing",
                      ENOENT,
                      "evil?[31mRED?second???2J?1m",
                      "layer 1");
    check_clean_line(qcbt_error_get(), "missing hostile backing");
    /* the system error follows once, not the path again */
    {
        const char *m = qcbt_error_get(), *p = m;
        int n = 0;

        while ((p = strstr(p, "evil?[31m")) != NULL) {
            n++;
            p++;
        }
        if (n != 2)
            fail_msg("the name appears %d times (want 2) in \"%s\"", n, m);
    }

    /* a protocol-looking name (OSC sequence) */
    write_overlay(tpath("names", "top.qcow2"),
                  1 * MiB,
                  "x:\x1b]0;owned\x07",
                  "qcow2");
    expect_chain_fail(tpath("names", "top.qcow2"),
                      NULL,
                      "protocol hostile backing",
                      ENOTSUP,
                      "protocol",
                      "x:?]0;owned?");
    check_clean_line(qcbt_error_get(), "protocol hostile backing");

    /* a hostile backing format */
    write_overlay(tpath("names", "base.qcow2"), 1 * MiB, NULL, NULL);
    write_overlay(tpath("names", "top.qcow2"),
                  1 * MiB,
                  "base.qcow2",
                  "vm\x1b[2Jdk\n");
    expect_chain_fail(tpath("names", "top.qcow2"),
                      NULL,
                      "hostile backing format",
                      ENOTSUP,
                      "backing format",
                      "vm?[2Jdk?");
    check_clean_line(qcbt_error_get(), "hostile backing format");

    /* a backing file that exists under a hostile name and is corrupt:
     * the layer's path (built from the name) is in the message
     */
    b = qb_new(3, 9, 1 * MiB, false, false);
    qb_hdr(b)->version = 7;
    write_qcow2(tpath("names", "b\x1b[1m\n.qcow2"), b);
    write_overlay(tpath("names", "top.qcow2"),
                  1 * MiB,
                  "b\x1b[1m\n.qcow2",
                  "qcow2");
    expect_chain_fail(tpath("names", "top.qcow2"),
                      NULL,
                      "corrupt hostile backing",
                      0,
                      "b?[1m?.qcow2",
                      "version");
    check_clean_line(qcbt_error_get(), "corrupt hostile backing");

    /* UTF-8 text is kept as it is */
    write_overlay(tpath("names", "top.qcow2"),
                  1 * MiB,
                  "\xc3\xa9t\xc3\xa9-\xe6\x97\xa5.qcow2",
                  "qcow2");
    expect_chain_fail(tpath("names", "top.qcow2"),
                      NULL,
                      "UTF-8 backing name",
                      ENOENT,
                      "'\xc3\xa9t\xc3\xa9-\xe6\x97\xa5.qcow2'",
                      NULL);
    check_clean_line(qcbt_error_get(), "UTF-8 backing name");
}

/* qcbt_escape: the one helper for image strings in text */
static void
test_escape(void **state)
{
    char buf[64];

    assert_string_equal(qcbt_escape(buf, sizeof buf, "a\x1b[0m\n", 6),
                        "a?[0m?");
    /* C1 controls, raw or UTF-8 encoded; invalid UTF-8; DEL */
    assert_string_equal(qcbt_escape(buf, sizeof buf, "\x9b\xc2\x9b\x7f|", 5),
                        "???|");
    /* overlong NUL, a surrogate, above U+10FFFF, a truncated sequence */
    assert_string_equal(qcbt_escape(buf,
                                    sizeof buf,
                                    "\xc0\x80\xed\xa0\x80\xf4\x90\x80\x80\xe6",
                                    10),
                        "??????????");
    /* NBSP and later pass */
    assert_string_equal(qcbt_escape(buf, sizeof buf, "\xc2\xa0\xe6\x97\xa5", 5),
                        "\xc2\xa0\xe6\x97\xa5");
    /* truncation: "..." and never half a UTF-8 sequence */
    assert_string_equal(qcbt_escape(buf, 8, "abcdefgh", 8), "abcd...");
    assert_string_equal(qcbt_escape(buf, 9, "abcdefgh", 8), "abcdefgh");
    assert_string_equal(qcbt_escape(buf, 9, "abc\xe6\x97\xa5xyz", 9), "abc...");
    assert_string_equal(qcbt_escape(buf, 10, "abc\xe6\x97\xa5xyz", 9),
                        "abc\xe6\x97\xa5xyz");
    /* in place */
    snprintf(buf, sizeof buf, "x\x1b[2J\xc3\xa9\ny");
    assert_string_equal(qcbt_sanitize(buf), "x?[2J\xc3\xa9?y");
    /* messages are made safe whatever went into them */
    qcbt_error(EIO, "%s: bad", "n\x1b]0;t\x07\n");
    assert_string_equal(qcbt_error_get(), "n?]0;t??: bad");
    qcbt_error_prefix(EIO, "p\r%s", "\x9b");
    assert_string_equal(qcbt_error_get(), "p??: n?]0;t??: bad");
    qcbt_error_clear();
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_v3_standard),
        cmocka_unit_test(test_good_v2_standard),
        cmocka_unit_test(test_good_extended_l2),
        cmocka_unit_test(test_good_compressed_deflate),
        cmocka_unit_test(test_good_compressed_zstd),
        cmocka_unit_test(test_good_compressed_cluster_sizes),
        cmocka_unit_test(test_good_zstd_multi_frame),
        cmocka_unit_test(test_good_data_tail_past_eof),
        cmocka_unit_test(test_good_header_variants),
        cmocka_unit_test(test_bad_magic),
        cmocka_unit_test(test_bad_version),
        cmocka_unit_test(test_bad_cluster_bits),
        cmocka_unit_test(test_bad_header_length),
        cmocka_unit_test(test_bad_incompat_unknown),
        cmocka_unit_test(test_bad_refcount_order),
        cmocka_unit_test(test_bad_compression_type),
        cmocka_unit_test(test_bad_backing_name),
        cmocka_unit_test(test_bad_crypt_method),
        cmocka_unit_test(test_bad_size),
        cmocka_unit_test(test_bad_l1_table),
        cmocka_unit_test(test_bad_refcount_table),
        cmocka_unit_test(test_bad_snapshots),
        cmocka_unit_test(test_bad_extension_length),
        cmocka_unit_test(test_bad_extension_duplicate),
        cmocka_unit_test(test_bad_data_file_header),
        cmocka_unit_test(test_bad_l1_entry),
        cmocka_unit_test(test_bad_l2_entry),
        cmocka_unit_test(test_v2_zero_flag),
        cmocka_unit_test(test_bad_l2_run_past_eof),
        cmocka_unit_test(test_bad_extended_l2),
        cmocka_unit_test(test_l1_points_at_metadata),
        cmocka_unit_test(test_l2_points_at_header),
        cmocka_unit_test(test_shared_clusters),
        cmocka_unit_test(test_bad_compressed_deflate),
        cmocka_unit_test(test_bad_compressed_zstd),
        cmocka_unit_test(test_bad_compressed_offset_bits),
        cmocka_unit_test(test_decompress_bounds),
        cmocka_unit_test(test_chain_read_through),
        cmocka_unit_test(test_chain_loops),
        cmocka_unit_test(test_chain_depth),
        cmocka_unit_test(test_chain_missing),
        cmocka_unit_test(test_chain_protocols),
        cmocka_unit_test(test_chain_special_files),
        cmocka_unit_test(test_chain_formats),
        cmocka_unit_test(test_chain_data_file_policy),
        cmocka_unit_test(test_chain_open_io_no_backing_dir),
        cmocka_unit_test(test_chain_lower_layer_corrupt),
        cmocka_unit_test(test_chain_foreign_formats),
        cmocka_unit_test(test_chain_locks),
        cmocka_unit_test(test_chain_hostile_names),
        cmocka_unit_test(test_escape),
    };

    return cmocka_run_group_tests(tests,
                                  test_tmpdir_setup,
                                  test_tmpdir_teardown);
}

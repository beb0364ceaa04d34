/* Unit tests: cluster allocation and refcount updates in an existing
 * image (common/qcow2/qcow2-alloc.c), on images qcbt's writer makes in
 * memory with 512-byte clusters, so that one refcount block covers 256
 * clusters and the refcount table (one cluster) 64 blocks.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "error.h"
#include "io.h"
#include "qcow2-store.h"
#include "qcow2-writer.h"
#include "qcow2.h"

#define CAP (32u * 1024 * 1024)

struct fixture {
    unsigned char *buf;
    struct qcow2_image *img;
};

/* A 1 MiB image with 512-byte clusters, opened read-write in memory. */
static int
setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    struct qcow2_writer_opts o = {.size = 1024 * 1024, .cluster_size = 512};
    struct qcow2_writer *w;
    struct qcbt_io *io;
    size_t len;

    assert_non_null(f);
    f->buf = calloc(1, CAP);
    assert_non_null(f->buf);
    assert_int_equal(qcbt_io_open_mem_rw(f->buf, CAP, 0, "w", &io), 0);
    assert_int_equal(qcow2_writer_create_io(io, &o, &w), 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    for (len = CAP; len > 0 && f->buf[len - 1] == 0; len--)
        ;
    len = (len + 511) & ~(size_t)511;
    assert_int_equal(qcbt_io_open_mem_rw(f->buf, CAP, len, "img", &io), 0);
    assert_int_equal(qcow2_open(io, &f->img), 0);
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fixture *f = *state;

    qcow2_close(f->img);
    free(f->buf);
    free(f);
    return 0;
}

static uint64_t
refcount(struct qcow2_image *img, uint64_t cluster)
{
    uint64_t rc = 99;

    assert_int_equal(qcow2_get_refcount(img, cluster, &rc), 0);
    return rc;
}

/* A run reaching past the first block's range gets the missing block
 * reserved just before it (counted by the first block); nothing is
 * written before the commit; the table points at the new block after
 * it.  A run over several missing ranges gets one block each. */
static void
test_new_refcount_blocks(void **state)
{
    struct fixture *f = *state;
    struct qcow2_image *img = f->img;
    struct qcow2_alloc *a;
    uint64_t size0 = img->io->size, start = size0 / 512, off, c;

    assert_true(start < 256);
    assert_int_equal(qcow2_alloc_new(img, &a), 0);
    assert_int_equal(qcow2_alloc_clusters(a, 300, &off), 0);
    assert_int_equal(off, (start + 1) * 512);
    assert_int_equal(img->io->size, size0);
    assert_int_equal(refcount(img, start), 0);

    if (qcow2_alloc_commit(a) < 0)
        fail_msg("commit: %s", qcbt_error_get());
    for (c = start; c < start + 301; c++)
        assert_int_equal(refcount(img, c), 1);
    assert_int_equal(refcount(img, start + 301), 0);

    /* 600 more: over ranges 1 (has its block now), 2 and 3. */
    assert_int_equal(qcow2_alloc_clusters(a, 600, &off), 0);
    assert_int_equal(off, (start + 301 + 2) * 512);
    if (qcow2_alloc_commit(a) < 0)
        fail_msg("commit: %s", qcbt_error_get());
    for (c = start; c < start + 903; c++)
        assert_int_equal(refcount(img, c), 1);
    assert_int_equal(refcount(img, start + 903), 0);

    assert_int_equal(qcow2_free_cluster(a, 300 * 512), 0);
    assert_int_equal(refcount(img, 300), 0);
    assert_int_equal(refcount(img, 301), 1);
    assert_int_equal(qcow2_free_cluster(a, 300 * 512), -EIO);
    assert_non_null(strstr(qcbt_error_get(), "already 0"));
    qcow2_alloc_free(a);
}

/* Past the 64 blocks the table holds, the commit grows the table: a new
 * one at the end of the file (with the blocks counting it), the header
 * switched to it, the old one freed; the image reopened from the bytes
 * counts the same; the allocator goes on in the new table. */
static void
test_reftable_grows(void **state)
{
    struct fixture *f = *state;
    struct qcow2_image *img = f->img, *img2;
    struct qcow2_alloc *a;
    struct qcbt_io *io;
    uint64_t off = 0, off2 = 0, c, old_rt = img->hdr.refcount_table_offset;
    uint64_t n = 64 * 256, rt, rtc, end;

    assert_int_equal(img->st.refcount_table_clusters, 1);
    assert_int_equal(qcow2_alloc_new(img, &a), 0);
    assert_int_equal(qcow2_alloc_clusters(a, n, &off), 0);
    if (qcow2_alloc_commit(a) < 0)
        fail_msg("commit: %s", qcbt_error_get());
    rt = img->st.refcount_table_offset;
    rtc = img->st.refcount_table_clusters;
    /* Half as large again as the 65 entries needed, at least. */
    assert_true(rtc >= 2);
    assert_true(rt >= off + n * 512);
    end = img->io->size / 512;
    assert_int_equal(refcount(img, old_rt / 512), 0);
    for (c = 0; c < rtc; c++)
        assert_int_equal(refcount(img, rt / 512 + c), 1);
    for (c = off / 512; c < end; c++)
        if (c < rt / 512 || c >= rt / 512 + rtc)
            assert_int_equal(refcount(img, c), 1);
    assert_int_equal(refcount(img, end), 0);

    /* On disk: the header points at the new table. */
    assert_int_equal(
        qcbt_io_open_mem_rw(f->buf, CAP, img->io->size, "img2", &io),
        0);
    assert_int_equal(qcow2_open(io, &img2), 0);
    assert_int_equal(img2->hdr.refcount_table_offset, rt);
    assert_int_equal(img2->hdr.refcount_table_clusters, rtc);
    assert_int_equal(refcount(img2, old_rt / 512), 0);
    for (c = off / 512; c < end; c += 97)
        assert_int_equal(refcount(img2, c), 1);
    qcow2_close(img2);

    /* More clusters, counted through the new table, no new move. */
    assert_int_equal(qcow2_alloc_clusters(a, 700, &off2), 0);
    assert_true(off2 >= end * 512 && off2 <= (end + 4) * 512);
    if (qcow2_alloc_commit(a) < 0)
        fail_msg("commit: %s", qcbt_error_get());
    assert_int_equal(img->st.refcount_table_offset, rt);
    for (c = off2 / 512; c < off2 / 512 + 700; c++)
        assert_int_equal(refcount(img, c), 1);
    assert_int_equal(qcow2_free_cluster(a, off2), 0);
    assert_int_equal(refcount(img, off2 / 512), 0);

    /* Past the 128 blocks of two clusters: a second move, to three
     * clusters (QEMU's (n * 3 + 1) / 2); the table moved before, counted
     * by a block the first move made, is freed. */
    assert_int_equal(rtc, 2);
    assert_int_equal(qcow2_alloc_clusters(a, 128 * 256 - end, &off), 0);
    if (qcow2_alloc_commit(a) < 0)
        fail_msg("commit: %s", qcbt_error_get());
    assert_int_equal(img->st.refcount_table_clusters, 3);
    assert_true(img->st.refcount_table_offset > rt);
    assert_int_equal(refcount(img, rt / 512), 0);
    assert_int_equal(refcount(img, rt / 512 + 1), 0);
    for (c = 0; c < 3; c++)
        assert_int_equal(refcount(img, img->st.refcount_table_offset / 512 + c),
                         1);
    assert_int_equal(refcount(img, off / 512 + 128 * 256 - end - 1), 1);
    qcow2_alloc_free(a);
}

/* QEMU's limit stays: a cluster past what an 8 MiB table counts is
 * refused before anything is reserved. */
static void
test_reftable_limit(void **state)
{
    struct fixture *f = *state;
    struct qcow2_alloc *a;
    uint64_t off = 0, size0 = f->img->io->size;

    assert_int_equal(qcow2_alloc_new(f->img, &a), 0);
    assert_int_equal(qcow2_alloc_clusters(a, UINT64_C(1) << 28, &off), -ENOSPC);
    assert_non_null(strstr(qcbt_error_get(), "largest refcount table"));
    assert_int_equal(qcow2_alloc_check_room(a, UINT64_C(1) << 28), -ENOSPC);
    assert_int_equal(qcow2_alloc_check_room(a, 64 * 256), 0);
    assert_int_equal(qcow2_alloc_commit(a), 0);
    assert_int_equal(f->img->io->size, size0);
    qcow2_alloc_free(a);
}

/* Images whose refcounts cannot be trusted are refused. */
static void
test_refuse_dirty_and_corrupt(void **state)
{
    struct fixture *f = *state;
    struct qcow2_alloc *a = NULL;

    f->img->hdr.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
    assert_int_equal(qcow2_alloc_new(f->img, &a), -EINVAL);
    assert_non_null(strstr(qcbt_error_get(), "dirty"));
    f->img->hdr.incompatible_features = QCOW2_INCOMPAT_CORRUPT;
    assert_int_equal(qcow2_alloc_new(f->img, &a), -EINVAL);
    assert_non_null(strstr(qcbt_error_get(), "corrupt"));
    assert_null(a);
}

/* A writer told to reserve room (refcount_reserve) makes a refcount
 * table that covers the clusters allocated after close, where the
 * smallest table is full (without growing it, test_reftable_grows). */
static void
test_writer_reserve(void **state)
{
    struct qcow2_writer_opts o = {.size = 1024 * 1024,
                                  .cluster_size = 512,
                                  .refcount_reserve = 64 * 256};
    unsigned char *buf = calloc(1, CAP);
    struct qcow2_image *img;
    struct qcow2_writer *w;
    struct qcow2_alloc *a;
    struct qcbt_io *io;
    uint64_t off = 0, c;
    size_t len;

    (void)state;
    assert_non_null(buf);
    assert_int_equal(qcbt_io_open_mem_rw(buf, CAP, 0, "w", &io), 0);
    assert_int_equal(qcow2_writer_create_io(io, &o, &w), 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    for (len = CAP; len > 0 && buf[len - 1] == 0; len--)
        ;
    len = (len + 511) & ~(size_t)511;
    assert_int_equal(qcbt_io_open_mem_rw(buf, CAP, len, "img", &io), 0);
    assert_int_equal(qcow2_open(io, &img), 0);
    assert_int_equal(img->hdr.refcount_table_clusters, 2);
    assert_int_equal(qcow2_alloc_new(img, &a), 0);
    if (qcow2_alloc_clusters(a, 64 * 256, &off) < 0 || qcow2_alloc_commit(a))
        fail_msg("alloc: %s", qcbt_error_get());
    for (c = 0; c < 64 * 256; c += 255)
        assert_int_equal(refcount(img, off / 512 + c), 1);
    qcow2_alloc_free(a);
    qcow2_close(img);

    o.refcount_reserve = (UINT64_C(1) << 40) + 1;
    assert_int_equal(qcbt_io_open_mem_rw(buf, CAP, 0, "w", &io), 0);
    assert_int_equal(qcow2_writer_create_io(io, &o, &w), -EINVAL);
    assert_non_null(strstr(qcbt_error_get(), "reserve"));
    free(buf);
}

/* QEMU's bdrv_get_default_bitmap_granularity() on qcow2, checked with
 * qemu-img bitmap --add (docs/qcow2-format.md 14.4; the interop test
 * test-bitmap-write.sh compares with qemu-img itself).
 */
static void
test_default_granularity(void **state)
{
    (void)state;
    assert_int_equal(qcow2_bitmap_default_gbits(512), 12);
    assert_int_equal(qcow2_bitmap_default_gbits(1024), 12);
    assert_int_equal(qcow2_bitmap_default_gbits(4096), 12);
    assert_int_equal(qcow2_bitmap_default_gbits(8192), 13);
    assert_int_equal(qcow2_bitmap_default_gbits(16384), 14);
    assert_int_equal(qcow2_bitmap_default_gbits(32768), 15);
    assert_int_equal(qcow2_bitmap_default_gbits(65536), 16);
    assert_int_equal(qcow2_bitmap_default_gbits(128 << 10), 16);
    assert_int_equal(qcow2_bitmap_default_gbits(2 << 20), 16);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_granularity),
        cmocka_unit_test_setup_teardown(test_new_refcount_blocks,
                                        setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_reftable_grows, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reftable_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refuse_dirty_and_corrupt,
                                        setup,
                                        teardown),
        cmocka_unit_test(test_writer_reserve),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}

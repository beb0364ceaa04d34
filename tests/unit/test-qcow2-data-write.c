/* Unit tests: guest data written into an existing image
 * (common/qcow2/qcow2-data-write.c), on images qcbt's writer makes in
 * memory with 512-byte clusters: an L2 table holds 64 entries (32 KiB of
 * guest data), so a few writes touch several tables.
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

#define CAP (16u * 1024 * 1024)
#define CS  512u

struct fixture {
    unsigned char *buf;
    struct qcow2_image *img;
};

/* A 1 MiB empty image with 512-byte clusters, read-write in memory. */
static int
setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    struct qcow2_writer_opts o = {.size = 1024 * 1024, .cluster_size = CS};
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
    len = (len + CS - 1) & ~(size_t)(CS - 1);
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

/* Reopen the image from its bytes: what a later reader sees. */
static void
reopen(struct fixture *f)
{
    struct qcbt_io *io;
    uint64_t len = f->img->io->size;

    qcow2_close(f->img);
    assert_int_equal(qcbt_io_open_mem_rw(f->buf, CAP, len, "img", &io), 0);
    assert_int_equal(qcow2_open(io, &f->img), 0);
}

static uint64_t
refcount(struct qcow2_image *img, uint64_t off)
{
    uint64_t rc = 99;

    assert_int_equal(qcow2_get_refcount(img, off / CS, &rc), 0);
    return rc;
}

static void
put(struct qcow2_data_writer *w, uint64_t guest, int fill)
{
    unsigned char b[CS];

    memset(b, fill, sizeof b);
    if (qcow2_data_writer_put(w, guest, fill < 0 ? NULL : b) < 0)
        fail_msg("put 0x%llx: %s", (unsigned long long)guest, qcbt_error_get());
}

static void
sync_writer(struct qcow2_data_writer *w)
{
    if (qcow2_data_writer_sync(w) < 0)
        fail_msg("sync: %s", qcbt_error_get());
}

/* The kind of guest cluster GUEST and, for data, its host offset, after
 * checking its bytes are FILL. */
static enum qcow2_kind
kind_at(struct fixture *f, uint64_t guest, int fill, uint64_t *host)
{
    struct qcow2_extent e;
    unsigned char b[CS], want[CS];

    assert_int_equal(qcow2_map(f->img, guest, CS, &e), 0);
    if (e.kind == QCOW2_DATA) {
        *host = e.host_offset;
        memcpy(b, f->buf + e.host_offset, CS);
        memset(want, fill, CS);
        assert_memory_equal(b, want, CS);
    }
    return e.kind;
}

/* Empty L1 entries get new L2 tables (COPIED in L1 and L2, refcount 1);
 * a zero put is the zero flag, not data. */
static void
test_new_tables(void **state)
{
    struct fixture *f = *state;
    struct qcow2_data_writer *w;
    uint64_t h0 = 0, h1 = 0, l2;

    assert_int_equal(f->img->l1[0], 0);
    assert_int_equal(qcow2_data_writer_new(f->img, &w), 0);
    put(w, 0, 0x11);
    put(w, CS, -1);
    put(w, 40 * 1024, 0x22); /* second table */
    sync_writer(w);
    qcow2_data_writer_free(w);
    reopen(f);

    assert_true(f->img->l1[0] & QCOW2_OFLAG_COPIED);
    assert_true(f->img->l1[1] & QCOW2_OFLAG_COPIED);
    l2 = f->img->l1[0] & QCOW2_L1E_OFFSET_MASK;
    assert_int_equal(refcount(f->img, l2), 1);
    assert_int_equal(kind_at(f, 0, 0x11, &h0), QCOW2_DATA);
    assert_int_equal(kind_at(f, CS, 0, &h1), QCOW2_ZERO);
    assert_int_equal(kind_at(f, 2 * CS, 0, &h1), QCOW2_UNALLOCATED);
    assert_int_equal(kind_at(f, 40 * 1024, 0x22, &h1), QCOW2_DATA);
    assert_int_equal(refcount(f->img, h0), 1);
    assert_int_equal(refcount(f->img, h1), 1);
}

/* A data cluster of refcount 1 is overwritten in place; a zero put then
 * frees it, after the switch. */
static void
test_in_place_then_zero(void **state)
{
    struct fixture *f = *state;
    struct qcow2_data_writer *w;
    uint64_t h = 0, h2 = 0, size;

    assert_int_equal(qcow2_data_writer_new(f->img, &w), 0);
    put(w, 0, 0x11);
    sync_writer(w);
    qcow2_data_writer_free(w);
    reopen(f);
    assert_int_equal(kind_at(f, 0, 0x11, &h), QCOW2_DATA);
    size = f->img->io->size;

    assert_int_equal(qcow2_data_writer_new(f->img, &w), 0);
    put(w, 0, 0x33);
    sync_writer(w);
    qcow2_data_writer_free(w);
    reopen(f);
    assert_int_equal(kind_at(f, 0, 0x33, &h2), QCOW2_DATA);
    assert_int_equal(h2, h);
    assert_int_equal(f->img->io->size, size); /* nothing allocated */

    assert_int_equal(qcow2_data_writer_new(f->img, &w), 0);
    put(w, 0, -1);
    sync_writer(w);
    qcow2_data_writer_free(w);
    reopen(f);
    assert_int_equal(kind_at(f, 0, 0, &h2), QCOW2_ZERO);
    assert_int_equal(refcount(f->img, h), 0);
}

/* Zero cluster to data: a new cluster, entry switched at sync only. */
static void
test_switch_at_sync(void **state)
{
    struct fixture *f = *state;
    struct qcow2_data_writer *w;
    uint64_t h = 0;

    assert_int_equal(qcow2_data_writer_new(f->img, &w), 0);
    put(w, 0, -1);
    sync_writer(w);
    put(w, CS, 0x44);
    /* Staged, not switched: a reader sees the old mapping. */
    assert_int_equal(kind_at(f, CS, 0, &h), QCOW2_UNALLOCATED);
    sync_writer(w);
    qcow2_data_writer_free(w);
    reopen(f);
    assert_int_equal(kind_at(f, 0, 0, &h), QCOW2_ZERO);
    assert_int_equal(kind_at(f, CS, 0x44, &h), QCOW2_DATA);
}

static void
test_refusals(void **state)
{
    struct fixture *f = *state;
    struct qcow2_data_writer *w = NULL;
    unsigned char b[CS] = {0};

    f->img->hdr.nb_snapshots = 1;
    assert_int_equal(qcow2_data_writer_new(f->img, &w), -ENOTSUP);
    assert_non_null(strstr(qcbt_error_get(), "internal snapshot"));
    f->img->hdr.nb_snapshots = 0;
    f->img->hdr.version = 2;
    assert_int_equal(qcow2_data_writer_new(f->img, &w), -ENOTSUP);
    assert_non_null(strstr(qcbt_error_get(), "version 2"));
    f->img->hdr.version = 3;

    assert_int_equal(qcow2_data_writer_new(f->img, &w), 0);
    put(w, 4 * CS, 0x55);
    /* Out of order, unaligned, past the end. */
    assert_int_equal(qcow2_data_writer_put(w, 2 * CS, b), -EINVAL);
    assert_int_equal(qcow2_data_writer_put(w, 5 * CS + 1, b), -EINVAL);
    assert_int_equal(qcow2_data_writer_put(w, 1024 * 1024, b), -EINVAL);
    qcow2_data_writer_free(w);
}

/* An L2 entry with reserved bits is refused, not followed. */
static void
test_corrupt_entry(void **state)
{
    struct fixture *f = *state;
    struct qcow2_data_writer *w;
    uint64_t l2;
    unsigned char b[CS] = {0};

    assert_int_equal(qcow2_data_writer_new(f->img, &w), 0);
    put(w, 0, 0x11);
    sync_writer(w);
    qcow2_data_writer_free(w);
    l2 = f->img->l1[0] & QCOW2_L1E_OFFSET_MASK;
    qcow2_table_set(f->buf + l2, 1, 0x0000000000000100ULL | (3ULL << 9));
    reopen(f);
    assert_int_equal(qcow2_data_writer_new(f->img, &w), 0);
    assert_int_equal(qcow2_data_writer_put(w, CS, b), -EIO);
    assert_non_null(strstr(qcbt_error_get(), "corrupt L2 entry"));
    qcow2_data_writer_free(w);
}

/* A data entry pointing at the L1 table: refused, the table intact. */
static void
test_entry_on_metadata(void **state)
{
    struct fixture *f = *state;
    struct qcow2_data_writer *w;
    uint64_t l2, l1off = f->img->hdr.l1_table_offset;
    unsigned char b[CS] = {0}, l1[CS];

    assert_int_equal(qcow2_data_writer_new(f->img, &w), 0);
    put(w, 0, 0x11);
    sync_writer(w);
    qcow2_data_writer_free(w);
    l2 = f->img->l1[0] & QCOW2_L1E_OFFSET_MASK;
    qcow2_table_set(f->buf + l2, 1, l1off | QCOW2_OFLAG_COPIED);
    memcpy(l1, f->buf + l1off, CS);
    reopen(f);
    assert_int_equal(qcow2_data_writer_new(f->img, &w), 0);
    assert_int_equal(qcow2_data_writer_put(w, CS, b), -EIO);
    assert_non_null(strstr(qcbt_error_get(), "points at the L1 table"));
    qcow2_data_writer_free(w);
    assert_memory_equal(f->buf + l1off, l1, CS);
    assert_int_equal(refcount(f->img, l1off), 1);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_new_tables, setup, teardown),
        cmocka_unit_test_setup_teardown(test_in_place_then_zero,
                                        setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_switch_at_sync, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refusals, setup, teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_entry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_entry_on_metadata,
                                        setup,
                                        teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}

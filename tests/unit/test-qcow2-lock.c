/* Unit tests: the lock of an image's mutable part (qcow2.h "Threads").
 *
 * Several threads use one image object at once, as a server publishing
 * bitmaps while a bitmap command runs would: one reloads the bitmap list
 * (qcow2_bitmaps_load() rebuilds the metadata map), one loads bitmap data
 * (qcow2_bitmap_load_data() checks every data cluster against that map),
 * one changes the bitmap directory (qcow2_bitmap_modify() switches the
 * header), and one loads the bitmaps of a second image (the sort of the
 * directory must not share state between images).  Without the lock the
 * loader frees the map the data loader is reading (ASan: heap use after
 * free; TSan: a data race on the map and the extension), and a data load
 * during the switch reads the directory in the middle of its move.  Each
 * thread checks every answer it gets; the main thread asserts.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "bitmap.h"
#include "error.h"
#include "io.h"
#include "qcow2-bitmaps.h"
#include "qcow2-store.h"
#include "qcow2-writer.h"
#include "qcow2.h"

#define CAP    (8u * 1024 * 1024)
#define SIZE   (64u * 1024 * 1024)
#define ROUNDS 1500

struct image {
    unsigned char *buf;
    struct qcow2_image *img;
};

/* A SIZE image with 512-byte clusters in memory, opened read-write, with
 * bitmaps "a" (64 KiB, bits at 0, 1 MiB and the last 64 KiB) and "b". */
static void
make_image(struct image *m)
{
    struct qcow2_writer_opts o = {.size = SIZE, .cluster_size = 512};
    struct qcow2_writer *w;
    struct qcbt_io *io;
    struct bitmap *src;
    size_t len;

    m->buf = calloc(1, CAP);
    assert_non_null(m->buf);
    assert_int_equal(qcbt_io_open_mem_rw(m->buf, CAP, 0, "w", &io), 0);
    assert_int_equal(qcow2_writer_create_io(io, &o, &w), 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    for (len = CAP; len > 0 && m->buf[len - 1] == 0; len--)
        ;
    len = (len + 511) & ~(size_t)511;
    assert_int_equal(qcbt_io_open_mem_rw(m->buf, CAP, len, "img", &io), 0);
    assert_int_equal(qcow2_open(io, &m->img), 0);
    assert_int_equal(
        qcow2_bitmap_modify(m->img, QCOW2_BITMAP_ADD, "a", 16, false),
        0);
    assert_int_equal(
        qcow2_bitmap_modify(m->img, QCOW2_BITMAP_ADD, "b", 16, false),
        0);
    assert_int_equal(bitmap_new(SIZE, 65536, &src), 0);
    assert_int_equal(bitmap_set_bytes(src, 0, 65536), 0);
    assert_int_equal(bitmap_set_bytes(src, 1024 * 1024, 65536), 0);
    assert_int_equal(bitmap_set_bytes(src, SIZE - 65536, 65536), 0);
    assert_int_equal(qcow2_bitmap_merge(m->img, "a", src), 0);
    bitmap_free(src);
}

static void
free_image(struct image *m)
{
    qcow2_close(m->img);
    free(m->buf);
}

struct shared {
    struct qcow2_image *img, *img2;
    const struct qcow2_bitmap_info *a; /* "a" of img: its table never moves */
    pthread_mutex_t mu;
    int errors;
    char first[512];
};

static void
record(struct shared *s, const char *who, const char *what)
{
    pthread_mutex_lock(&s->mu);
    if (s->errors++ == 0)
        snprintf(s->first, sizeof s->first, "%s: %s", who, what);
    pthread_mutex_unlock(&s->mu);
}

/* The list of IMG: usable, "a" and "b" (in any state of "b"). */
static void
check_list(struct shared *s, struct qcow2_image *img, const char *who)
{
    struct qcow2_bitmap_list *l = NULL;

    if (qcow2_bitmaps_load(img, &l) < 0)
        record(s, who, qcbt_error_get());
    else if (!l->usable || l->nr != 2 || strcmp(l->bitmaps[0].name, "a") ||
             strcmp(l->bitmaps[1].name, "b") ||
             l->bitmaps[0].status != QCOW2_BITMAP_OK ||
             l->bitmaps[1].status != QCOW2_BITMAP_OK)
        record(s, who, l->usable ? "wrong bitmaps" : l->reason);
    qcow2_bitmap_list_free(l);
}

static void *
loader(void *p)
{
    struct shared *s = p;
    int i;

    for (i = 0; i < ROUNDS; i++)
        check_list(s, s->img, "loader");
    return NULL;
}

static void *
other_image(void *p)
{
    struct shared *s = p;
    int i;

    for (i = 0; i < ROUNDS; i++)
        check_list(s, s->img2, "other image");
    return NULL;
}

static void *
data_reader(void *p)
{
    struct shared *s = p;
    struct bitmap *bm;
    int i;

    for (i = 0; i < ROUNDS; i++) {
        if (qcow2_bitmap_load_data(s->img, s->a, 0, &bm) < 0) {
            record(s, "data reader", qcbt_error_get());
            continue;
        }
        if (bitmap_count(bm) != 3 || !bitmap_test(bm, 0) ||
            !bitmap_test(bm, 16) || !bitmap_test(bm, SIZE / 65536 - 1))
            record(s, "data reader", "bitmap a has the wrong bits");
        bitmap_free(bm);
    }
    return NULL;
}

static void *
writer(void *p)
{
    struct shared *s = p;
    int i;

    for (i = 0; i < ROUNDS / 3; i++)
        if (qcow2_bitmap_modify(s->img,
                                i % 2 ? QCOW2_BITMAP_ENABLE
                                      : QCOW2_BITMAP_DISABLE,
                                "b",
                                0,
                                false) < 0)
            record(s, "writer", qcbt_error_get());
    return NULL;
}

static void
test_threads(void **state)
{
    struct image m, m2;
    struct shared s = {.mu = PTHREAD_MUTEX_INITIALIZER};
    struct qcow2_bitmap_list *l;
    pthread_t t[4];
    void *(*fn[4])(void *) = {loader, data_reader, writer, other_image};
    size_t i;

    (void)state;
    make_image(&m);
    make_image(&m2);
    s.img = m.img;
    s.img2 = m2.img;
    assert_int_equal(qcow2_bitmaps_load(m.img, &l), 0);
    assert_true(l->usable);
    assert_int_equal(l->nr, 2);
    s.a = &l->bitmaps[0];
    for (i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&t[i], NULL, fn[i], &s), 0);
    for (i = 0; i < 4; i++)
        assert_int_equal(pthread_join(t[i], NULL), 0);
    if (s.errors)
        fail_msg("%d failures, first: %s", s.errors, s.first);
    /* The writer's last change (an even count of toggles: enabled). */
    check_list(&s, m.img, "after");
    assert_int_equal(s.errors, 0);
    qcow2_bitmap_list_free(l);
    free_image(&m);
    free_image(&m2);
}

/* The lock is recursive (a writer holding it loads bitmaps) and the
 * accessors give the state after a change, not the header at open. */
static void
test_state_after_change(void **state)
{
    struct image m;
    struct qcow2_bitmaps_found found;
    struct bitmap *bm;

    (void)state;
    make_image(&m);
    qcow2_lock(m.img);
    qcow2_get_bitmaps_found(m.img, &found);
    assert_true(found.present);
    assert_int_equal(found.ext.nb_bitmaps, 2);
    assert_true(qcow2_autoclear_features(m.img) & QCOW2_AUTOCLEAR_BITMAPS);
    assert_false(m.img->hdr.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS);
    assert_int_equal(
        qcow2_bitmap_modify(m.img, QCOW2_BITMAP_REMOVE, "b", 0, false),
        0);
    assert_int_equal(qcow2_bitmap_load_named(m.img, "a", &bm), 0);
    qcow2_unlock(m.img);
    assert_int_equal(bitmap_count(bm), 3);
    bitmap_free(bm);
    qcow2_get_bitmaps_found(m.img, &found);
    assert_int_equal(found.ext.nb_bitmaps, 1);
    assert_int_equal(
        qcow2_bitmap_modify(m.img, QCOW2_BITMAP_REMOVE, "a", 0, false),
        0);
    qcow2_get_bitmaps_found(m.img, &found);
    assert_false(found.present);
    assert_false(qcow2_autoclear_features(m.img) & QCOW2_AUTOCLEAR_BITMAPS);
    free_image(&m);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_state_after_change),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}

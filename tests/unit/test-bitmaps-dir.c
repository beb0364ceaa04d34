/* qcbt unit tests: the qcow2 bitmaps extension, bitmap directory, bitmap
 * tables and bitmap data (qcow2-format.md section 14,
 * reliability-catalogue.md 3(a) items A31-A48).
 *
 * Good directories must load with the right fields, status and contents
 * (compared bit by bit with the streams the images were built from, and
 * with QEMU's digests of section 14.9).  Every hostile mutation must leave
 * the image readable (qcow2_open succeeds and the guest can be mapped),
 * make the layer or the bitmap unusable with a one-line reason naming the
 * problem, and never let a bitmap load whose metadata is wrong.  Images
 * are malloc'ed to their exact length and directories are also parsed from
 * exact-size copies, so under ASan any read past them fails the suite.
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

#include "bitmap.h"
#include "bitmap-digest.h"
#include "error.h"
#include "io.h"
#include "qcow2.h"
#include "qcow2-bitmaps.h"
#include "qcow2-builder.h"

#define KiB 1024ULL
#define MiB (1024ULL * 1024)

/* NULL-terminated list of substrings a message must contain. */
#define SUBS(...) ((const char *const[]){__VA_ARGS__, NULL})

/* ------------------------------------------------------------------ */
/* Helpers */

/* splitmix64 at a fixed seed. */
static uint64_t rng_state;

static void
rng_seed(uint64_t seed)
{
    rng_state = seed;
}

static uint64_t
rng(void)
{
    uint64_t z = (rng_state += UINT64_C(0x9e3779b97f4a7c15));

    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static uint64_t
div_up(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

static uint64_t
nbits_of(uint64_t size, unsigned gbits)
{
    return div_up(size / 512 * 512, 1ULL << gbits);
}

static unsigned char *
dup_buf(const void *p, size_t len)
{
    unsigned char *d = malloc(len ? len : 1);

    assert_non_null(d);
    memcpy(d, p, len);
    return d;
}

static uint32_t
get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           p[3];
}

static uint64_t
get64(const unsigned char *p)
{
    return (uint64_t)get32(p) << 32 | get32(p + 4);
}

static void
put16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

/* MSG must be non-empty, one line, and contain every substring. */
static void
check_msg(const char *msg, const char *what, const char *const *subs)
{
    size_t i;

    if (!msg[0])
        fail_msg("%s: empty message", what);
    if (strchr(msg, '\n') || strchr(msg, '\r'))
        fail_msg("%s: message is not one line: %s", what, msg);
    for (i = 0; subs && subs[i]; i++)
        if (!strstr(msg, subs[i]))
            fail_msg("%s: message \"%s\" does not name \"%s\"",
                     what,
                     msg,
                     subs[i]);
}

/* R must be a negative errno agreeing with the recorded error. */
static void
check_err(int r, const char *what, const char *const *subs)
{
    if (r >= 0)
        fail_msg("%s: expected an error, got %d", what, r);
    if (r < -4095)
        fail_msg("%s: %d is not a negative errno", what, r);
    if (qcbt_error_errno() != -r)
        fail_msg("%s: returned %d but recorded errno %d (%s)",
                 what,
                 r,
                 qcbt_error_errno(),
                 qcbt_error_get());
    check_msg(qcbt_error_get(), what, subs);
}

static struct qcow2_image *
open_img(const unsigned char *buf, size_t len, const char *what)
{
    struct qcow2_image *img;
    struct qcbt_io *io;
    uint64_t off;
    int r;

    qcbt_error_clear();
    assert_int_equal(qcbt_io_open_mem(buf, len, "test.qcow2", &io), 0);
    r = qcow2_open(io, &img);
    if (r < 0)
        fail_msg("%s: qcow2_open failed: %s", what, qcbt_error_get());
    /* The guest data stays readable: the whole disk can be mapped. */
    for (off = 0; off < img->size;) {
        struct qcow2_extent e;

        r = qcow2_map(img, off, img->size - off, &e);
        if (r < 0)
            fail_msg("%s: qcow2_map(0x%" PRIx64 ") failed: %s",
                     what,
                     off,
                     qcbt_error_get());
        assert_true(e.len > 0);
        off += e.len;
    }
    return img;
}

static struct qcow2_bitmap_list *
load_list(struct qcow2_image *img, const char *what)
{
    struct qcow2_bitmap_list *list = NULL;
    size_t i;
    int r;

    r = qcow2_bitmaps_load(img, &list);
    if (r < 0)
        fail_msg("%s: qcow2_bitmaps_load failed: %s", what, qcbt_error_get());
    assert_non_null(list);
    /* No extension and no reason: simply no bitmaps. */
    if (!list->usable && (list->present || list->reason[0]))
        check_msg(list->reason, what, NULL);
    for (i = 0; i < list->nr; i++) {
        const struct qcow2_bitmap_info *bi = &list->bitmaps[i];

        assert_non_null(bi->name);
        if (bi->status != QCOW2_BITMAP_OK)
            check_msg(bi->reason, what, NULL);
    }
    return list;
}

/* Loading bitmap BI must fail (both with and without BITMAP_RAW) with a
 * message naming SUBS, and return no bitmap.
 */
static void
expect_load_fail(struct qcow2_image *img,
                 const struct qcow2_bitmap_info *bi,
                 const char *what,
                 const char *const *subs)
{
    unsigned flags;

    for (flags = 0; flags <= BITMAP_RAW; flags++) {
        struct bitmap *bm = NULL;
        int r;

        qcbt_error_clear();
        r = qcow2_bitmap_load_data(img, bi, flags, &bm);
        if (r >= 0) {
            bitmap_free(bm);
            fail_msg("%s: bitmap '%s' loaded although it is bad",
                     what,
                     bi->name);
        }
        assert_null(bm);
        check_err(r, what, subs);
    }
}

static struct bitmap *
load_ok(struct qcow2_image *img,
        const struct qcow2_bitmap_info *bi,
        unsigned flags,
        const char *what)
{
    struct bitmap *bm = NULL;
    int r;

    qcbt_error_clear();
    r = qcow2_bitmap_load_data(img, bi, flags, &bm);
    if (r < 0)
        fail_msg("%s: loading bitmap '%s' failed: %s",
                 what,
                 bi->name,
                 qcbt_error_get());
    assert_non_null(bm);
    return bm;
}

/* BM must hold exactly the bits of STREAM (serialised, LSB first; bytes
 * past STREAM_LEN are clear) below nbits, and nothing past nbits.
 */
static void
check_bits(const struct bitmap *bm,
           const unsigned char *stream,
           size_t stream_len,
           const char *what)
{
    uint64_t k, count = 0;

    for (k = 0; k < bm->nbits; k++) {
        bool want = k / 8 < stream_len && (stream[k / 8] >> (k % 8)) & 1;

        if (bitmap_test(bm, k) != want)
            fail_msg("%s: bit %" PRIu64 " is %d, expected %d",
                     what,
                     k,
                     bitmap_test(bm, k),
                     want);
        count += want;
    }
    assert_int_equal(bitmap_count(bm), count);
    assert_false(bitmap_test(bm, bm->nbits));
    assert_int_equal(bitmap_next_dirty(bm, bm->nbits), bm->nbits);
}

static const struct qcow2_bitmap_info *
find_bi(const struct qcow2_bitmap_list *list, const char *name)
{
    size_t i;

    for (i = 0; i < list->nr; i++)
        if (strcmp(list->bitmaps[i].name, name) == 0)
            return &list->bitmaps[i];
    fail_msg("bitmap '%s' not listed", name);
    return NULL;
}

static void
digest_of(const struct bitmap *bm, char hex[BITMAP_SHA256_HEX_LEN + 1])
{
    assert_int_equal(bitmap_sha256(bm, hex), 0);
}

/* Random serialised bits: NBITS bits at about DENSITY/256 set, tail bits
 * of the last byte clear (QEMU pads with zeros).  Returns the stream of
 * ceil(nbits/8) bytes (malloc'ed, at least 1 byte).
 */
static unsigned char *
random_stream(uint64_t nbits, unsigned density, size_t *len)
{
    size_t n = div_up(nbits, 8), i;
    unsigned char *s = calloc(n ? n : 1, 1);

    assert_non_null(s);
    for (i = 0; i < nbits; i++)
        if ((rng() & 255) < density)
            s[i / 8] |= 1u << (i % 8);
    *len = n;
    return s;
}

static unsigned char *
finish(struct qb *b, size_t *len)
{
    return qb_finish(b, len);
}

/* ------------------------------------------------------------------ */
/* The base image every mutation starts from.
 *
 * v3 (or v2), 512-byte clusters by default, 8 MiB + 1536 bytes of guest
 * (not a multiple of any granularity), one guest data cluster, and three
 * bitmaps:
 *   "a"  64 KiB granularity, auto, 129 bits, one table entry;
 *   "b"  512 B granularity, 16387 bits = 2049 bytes: 5 table entries with
 *        512-byte clusters, entry 2 left unallocated (all clear);
 *   "c"  4 KiB granularity, auto, 2049 bits.
 */
#define NB_BASE   3
#define BASE_SIZE (8 * MiB + 1536)

static const char *const base_names[NB_BASE] = {"a", "b", "c"};
static const unsigned base_gbits[NB_BASE] = {16, 9, 12};
static const uint32_t base_flags[NB_BASE] = {QB_BME_AUTO, 0, QB_BME_AUTO};

struct base {
    unsigned char *buf;
    size_t len;
    uint64_t cs;
    uint64_t ext_pos; /* the extension's header; data at +8 */
    uint64_t dir_off, dir_size;
    uint64_t entry[NB_BASE]; /* file offsets of the directory entries */
    uint64_t table[NB_BASE];
    uint32_t tsize[NB_BASE];
    unsigned char *stream[NB_BASE];
    size_t stream_len[NB_BASE];
    uint64_t l1_off, reftable_off, refblock_off, l2_off, guest_off;
};

static void
base_build_l2(struct base *bs,
              unsigned version,
              unsigned cluster_bits,
              bool extl2)
{
    struct qb *b = qb_new(version, cluster_bits, BASE_SIZE, extl2, false);
    unsigned char *cl;
    size_t i;

    memset(bs, 0, sizeof *bs);
    bs->cs = qb_cluster_size(b);
    cl = malloc(bs->cs);
    assert_non_null(cl);
    memset(cl, 0x5a, bs->cs);
    bs->guest_off = qb_write_cluster(b, 7, cl);
    free(cl);
    bs->l2_off = qb_l2_table(b, 7);
    rng_seed(42 + cluster_bits);
    for (i = 0; i < NB_BASE; i++) {
        uint64_t nbits = nbits_of(BASE_SIZE, base_gbits[i]);

        bs->stream[i] = random_stream(nbits, 40, &bs->stream_len[i]);
        if (i == 1 && bs->cs == 512) /* table entry 2 stays 0 */
            memset(bs->stream[i] + 1024, 0, 512);
        bs->stream[i][0] |= 1; /* every bitmap has a data cluster */
        qb_add_bitmap(b,
                      base_names[i],
                      base_gbits[i],
                      base_flags[i],
                      bs->stream[i],
                      bs->stream_len[i]);
        bs->table[i] = qb_bitmap(b, i)->table_offset;
        bs->tsize[i] = qb_bitmap(b, i)->table_size;
    }
    qb_store_bitmaps(b);
    bs->ext_pos = qb_bitmaps_ext_pos(b);
    bs->dir_off = qb_bitmap_dir_offset(b);
    bs->dir_size = qb_bitmap_dir_size(b);
    for (i = 0; i < NB_BASE; i++)
        bs->entry[i] = qb_bitmap_entry_pos(b, i);
    bs->l1_off = qb_hdr(b)->l1_table_offset;
    bs->reftable_off = qb_hdr(b)->refcount_table_offset;
    bs->refblock_off = bs->reftable_off + bs->cs; /* builder layout */
    bs->buf = finish(b, &bs->len);
    qb_free(b);
}

static void
base_build(struct base *bs, unsigned version, unsigned cluster_bits)
{
    base_build_l2(bs, version, cluster_bits, false);
}

static void
base_free(struct base *bs)
{
    size_t i;

    free(bs->buf);
    for (i = 0; i < NB_BASE; i++)
        free(bs->stream[i]);
}

/* Host offset of data cluster I of bitmap IDX (0: unallocated). */
static uint64_t
base_data(const struct base *bs, size_t idx, size_t i)
{
    return get64(bs->buf + bs->table[idx] + i * 8);
}

/* A copy of the base image, LEN bytes (extra bytes zeroed). */
static unsigned char *
base_copy(const struct base *bs, size_t len)
{
    unsigned char *m = calloc(1, len ? len : 1);

    assert_non_null(m);
    memcpy(m, bs->buf, len < bs->len ? len : bs->len);
    return m;
}

/* The image must open, the layer's bitmaps must all be unusable, the
 * reason must name SUBS, and no bitmap may load.  NAMES_KNOWN: 0 or 1 to
 * check list->names_known, -1 not to.  Also parses the directory bytes it
 * finds (when the extension is sane enough to locate them) from an
 * exact-size copy.
 */
static void
expect_layer_bad(const unsigned char *buf,
                 size_t len,
                 const char *what,
                 int names_known,
                 const char *const *subs)
{
    struct qcow2_image *img = open_img(buf, len, what);
    struct qcow2_bitmap_list *list = load_list(img, what);
    size_t i;

    if (list->usable)
        fail_msg("%s: the bitmap directory was accepted", what);
    check_msg(list->reason, what, subs);
    if (names_known >= 0 && list->names_known != (names_known != 0))
        fail_msg("%s: names_known is %d, expected %d",
                 what,
                 list->names_known,
                 names_known);
    for (i = 0; i < list->nr; i++) {
        const struct qcow2_bitmap_info *bi = &list->bitmaps[i];

        if (bi->status == QCOW2_BITMAP_OK)
            fail_msg("%s: bitmap '%s' is OK in an unusable layer",
                     what,
                     bi->name);
        expect_load_fail(img, bi, what, SUBS("cannot be loaded"));
    }
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
}

/* Bitmap NAME of the image must have STATUS (the layer stays usable when
 * STATUS is IN_USE) with a reason naming SUBS, and must not load.
 */
static void
expect_bitmap_status(const unsigned char *buf,
                     size_t len,
                     const char *what,
                     const char *name,
                     enum qcow2_bitmap_status status,
                     const char *const *subs)
{
    struct qcow2_image *img = open_img(buf, len, what);
    struct qcow2_bitmap_list *list = load_list(img, what);
    const struct qcow2_bitmap_info *bi = find_bi(list, name);

    if (status == QCOW2_BITMAP_IN_USE && !list->usable)
        fail_msg("%s: layer unusable: %s", what, list->reason);
    if (bi->status != status)
        fail_msg("%s: bitmap '%s' has status %d, expected %d (%s)",
                 what,
                 name,
                 bi->status,
                 status,
                 bi->reason);
    check_msg(bi->reason, what, subs);
    expect_load_fail(img, bi, what, SUBS("cannot be loaded"));
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
}

/* The directory is fine but the data of bitmap NAME is bad: the layer is
 * usable, the bitmap's metadata OK, and loading it must fail naming SUBS.
 */
static void
expect_data_bad(const unsigned char *buf,
                size_t len,
                const char *what,
                const char *name,
                const char *const *subs)
{
    struct qcow2_image *img = open_img(buf, len, what);
    struct qcow2_bitmap_list *list = load_list(img, what);
    const struct qcow2_bitmap_info *bi;

    if (!list->usable)
        fail_msg("%s: layer unusable: %s", what, list->reason);
    bi = find_bi(list, name);
    /* Either the directory load already saw the bad data placement (the
     * bitmap is invalid, its reason names it) or loading the data does. */
    if (bi->status == QCOW2_BITMAP_INVALID) {
        check_msg(bi->reason, what, subs);
        expect_load_fail(img, bi, what, SUBS("cannot be loaded"));
    } else if (bi->status != QCOW2_BITMAP_OK) {
        fail_msg("%s: bitmap '%s' has status %d: %s",
                 what,
                 name,
                 bi->status,
                 bi->reason);
    } else {
        expect_load_fail(img, bi, what, subs);
    }
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
}

/* Parse DIR (copied into an exact-size buffer) against the base image
 * with NB bitmaps claimed.  Returns whether the layer was usable; the
 * reason must name SUBS when it was not.
 */
static bool
parse_dir_copy(const struct base *bs,
               const unsigned char *dir,
               size_t dir_len,
               uint32_t nb,
               const char *what,
               const char *const *subs)
{
    struct qcow2_image *img = open_img(bs->buf, bs->len, what);
    struct qcow2_bitmap_list *list = calloc(1, sizeof *list);
    unsigned char *exact = dup_buf(dir, dir_len);
    bool usable;
    size_t i;

    assert_non_null(list);
    assert_int_equal(qcow2_bitmaps_parse_dir(img, exact, dir_len, nb, list), 0);
    usable = list->usable;
    if (!usable)
        check_msg(list->reason, what, subs);
    for (i = 0; i < list->nr; i++)
        assert_true(list->bitmaps[i].name != NULL);
    free(exact);
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
    return usable;
}

/* Directory-level mutation: poke the base's directory bytes (MUT applied
 * to a copy of the whole image) and expect the layer to be bad, both via
 * the image and via qcow2_bitmaps_parse_dir() on an exact-size copy of
 * the (possibly resized) directory.
 */
static void
expect_dir_bad(const struct base *bs,
               const unsigned char *m,
               size_t len,
               const char *what,
               int names_known,
               const char *const *subs)
{
    uint32_t nb = get32(m + bs->ext_pos + 8);
    uint64_t dsize = get64(m + bs->ext_pos + 16);
    uint64_t doff = get64(m + bs->ext_pos + 24);
    bool ext_sane = get32(m + bs->ext_pos + 4) == 24 &&
                    get32(m + bs->ext_pos + 12) == 0 && nb == NB_BASE &&
                    get64(m + QB_OFF_SIZE) == BASE_SIZE;
    bool usable;

    expect_layer_bad(m, len, what, names_known, subs);
    /* The directory bytes alone, from an exact-size buffer (bounds); when
     * the mutation is in the directory itself, it must be refused there
     * too, for the same reason.
     */
    if (dsize <= 64 * KiB && doff == bs->dir_off && doff + dsize <= len &&
        nb <= QCOW2_MAX_BITMAPS) {
        usable = parse_dir_copy(bs,
                                m + doff,
                                dsize,
                                nb,
                                what,
                                ext_sane ? subs : NULL);
        if (ext_sane && usable)
            fail_msg("%s: qcow2_bitmaps_parse_dir accepted the directory",
                     what);
    }
}

/* ------------------------------------------------------------------ */
/* Good images */

/* The base image: fields, status and contents of every bitmap; the
 * directory also parses from an exact-size copy.
 */
static void
test_good_base(void **state)
{
    static const unsigned cbits[] = {9, 12, 16};
    size_t ci, i;

    for (ci = 0; ci < sizeof cbits / sizeof cbits[0]; ci++) {
        struct base bs;
        struct qcow2_image *img;
        struct qcow2_bitmap_list *list;

        base_build(&bs, 3, cbits[ci]);
        img = open_img(bs.buf, bs.len, "base");
        list = load_list(img, "base");
        assert_true(list->present);
        assert_true(list->usable);
        assert_true(list->names_known);
        assert_int_equal(list->nr, NB_BASE);
        for (i = 0; i < NB_BASE; i++) {
            const struct qcow2_bitmap_info *bi = &list->bitmaps[i];
            struct bitmap *bm;

            assert_string_equal(bi->name, base_names[i]);
            assert_int_equal(bi->status, QCOW2_BITMAP_OK);
            assert_int_equal(bi->table_offset, bs.table[i]);
            assert_int_equal(bi->table_size, bs.tsize[i]);
            assert_int_equal(bi->table_size, div_up(bs.stream_len[i], bs.cs));
            assert_int_equal(bi->table_size,
                             qcow2_bitmap_table_size(img, base_gbits[i]));
            assert_int_equal(bi->flags, base_flags[i]);
            assert_int_equal(bi->type, 1);
            assert_int_equal(bi->granularity_bits, base_gbits[i]);
            assert_int_equal(bi->extra_data_size, 0);
            bm = load_ok(img, bi, 0, "base");
            assert_int_equal(bm->size, img->size);
            assert_int_equal(bm->granularity, 1ULL << base_gbits[i]);
            assert_int_equal(bm->nbits, nbits_of(BASE_SIZE, base_gbits[i]));
            check_bits(bm, bs.stream[i], bs.stream_len[i], base_names[i]);
            bitmap_free(bm);
        }
        if (cbits[ci] == 9) /* entry 2 of "b" really is unallocated */
            assert_int_equal(base_data(&bs, 1, 2), 0);
        qcow2_bitmap_list_free(list);
        qcow2_close(img);
        assert_true(parse_dir_copy(&bs,
                                   bs.buf + bs.dir_off,
                                   bs.dir_size,
                                   NB_BASE,
                                   "base dir",
                                   NULL));
        base_free(&bs);
    }
}

/* qcow2-format.md section 14.9 test vectors: 64 MiB disk, 64 KiB clusters
 * and granularity, one bitmap "b0" with bits 0 and 16 (the example of
 * 14.2, auto), an empty one, an all-ones table entry, and a 13-cluster
 * disk with an all-ones entry (whose raw tail bits QEMU hashes).
 */
static void
test_good_qemu_vectors(void **state)
{
    struct qb *b = qb_new(3, 16, 64 * MiB, false, false);
    unsigned char s[128] = {0}, *buf, *g9;
    const uint64_t ones = QB_BME_ALL_ONES;
    struct qcow2_image *img;
    struct qcow2_bitmap_list *list;
    const struct qcow2_bitmap_info *bi;
    struct bitmap *bm;
    char hex[BITMAP_SHA256_HEX_LEN + 1];
    size_t len, i;

    s[0] = 0x01;
    s[2] = 0x01;
    qb_add_bitmap(b, "b0", 16, QB_BME_AUTO, s, sizeof s);
    qb_add_bitmap(b, "empty", 16, 0, NULL, 0);
    qb_add_bitmap_table(b, "ones", 16, QB_BME_AUTO, &ones, 1);
    g9 = malloc(16 * KiB);
    assert_non_null(g9);
    for (i = 0; i < 16 * KiB; i++)
        g9[i] = (unsigned char)(i * 7);
    qb_add_bitmap(b, "g9", 9, QB_BME_AUTO, g9, 16 * KiB);
    qb_store_bitmaps(b);
    buf = finish(b, &len);
    qb_free(b);

    img = open_img(buf, len, "vectors");
    list = load_list(img, "vectors");
    assert_true(list->usable);
    assert_int_equal(list->nr, 4);

    /* The directory entry of section 14.2's example. */
    bi = find_bi(list, "b0");
    assert_int_equal(bi->table_size, 1);
    assert_int_equal(bi->flags, QCOW2_BME_FLAG_AUTO);
    assert_int_equal(bi->granularity_bits, 16);
    bm = load_ok(img, bi, BITMAP_RAW, "b0");
    assert_int_equal(bm->nbits, 1024);
    assert_int_equal(bitmap_count(bm), 2);
    assert_true(bitmap_test(bm, 0));
    assert_true(bitmap_test(bm, 16));
    digest_of(bm, hex);
    assert_string_equal(
        hex,
        "74405e30c41046a1543d86ede797bcb511244cbfddac8afd9b4772473f8fe968");
    bitmap_free(bm);

    bm = load_ok(img, find_bi(list, "empty"), BITMAP_RAW, "empty");
    assert_int_equal(bitmap_count(bm), 0);
    digest_of(bm, hex);
    assert_string_equal(
        hex,
        "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca");
    bitmap_free(bm);
    assert_int_equal(bitmap_sha256_zero(64 * MiB, 64 * KiB, hex), 0);
    assert_string_equal(
        hex,
        "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca");

    /* A45: an all-ones entry makes every bit dirty. */
    for (i = 0; i <= BITMAP_RAW; i++) {
        bm = load_ok(img, find_bi(list, "ones"), (unsigned)i, "ones");
        assert_int_equal(bitmap_count(bm), 1024);
        digest_of(bm, hex);
        assert_string_equal(
            hex,
            "e9175db65a9789096ca9cb5524d3abc2107df03e3c9ba3af1aca628f9c5d3bd2");
        bitmap_free(bm);
    }

    /* Digest of a 512-byte-granularity bitmap, as reported by
     * qemu-storage-daemon 7.2 for this very image (bytes i*7).
     */
    bm = load_ok(img, find_bi(list, "g9"), BITMAP_RAW, "g9");
    assert_int_equal(bm->nbits, 131072);
    check_bits(bm, g9, 16 * KiB, "g9");
    digest_of(bm, hex);
    assert_string_equal(
        hex,
        "582bf46c154f087f3ba98b298fbe978c18f8b60cae2d67d7cb5c233396744125");
    bitmap_free(bm);
    free(g9);
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
    free(buf);

    /* 13 x 64 KiB: 13 bits, all-ones entry.  QEMU hashes the whole word
     * of ones (BITMAP_RAW); the bits themselves are just 0..12.
     */
    b = qb_new(3, 16, 13 * 64 * KiB, false, false);
    qb_add_bitmap_table(b, "b0", 16, 0, &ones, 1);
    qb_store_bitmaps(b);
    buf = finish(b, &len);
    qb_free(b);
    img = open_img(buf, len, "13 clusters");
    list = load_list(img, "13 clusters");
    assert_true(list->usable);
    bm = load_ok(img, &list->bitmaps[0], BITMAP_RAW, "13 raw");
    assert_int_equal(bm->nbits, 13);
    assert_int_equal(bitmap_count(bm), 13);
    assert_false(bitmap_test(bm, 13));
    digest_of(bm, hex);
    assert_string_equal(
        hex,
        "12a3ae445661ce5dee78d0650d33362dec29c4f82af05e7e57fb595bbbacf0ca");
    bitmap_free(bm);
    bm = load_ok(img, &list->bitmaps[0], 0, "13 masked");
    assert_int_equal(bitmap_count(bm), 13);
    assert_int_equal(bitmap_next_clean(bm, 0), 13);
    bitmap_free(bm);
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
    free(buf);
}

/* A45: tables mixing all-ones entries, unallocated entries and data
 * clusters, including an all-ones last entry that covers the partial tail.
 */
static void
test_good_all_ones_mixed(void **state)
{
    const uint64_t size = 3 * MiB + 512; /* 6145 bits of 512 B: 769 B */
    struct qb *b = qb_new(3, 9, size, false, false);
    unsigned char data[512], model[769];
    uint64_t table[2];
    struct qcow2_image *img;
    struct qcow2_bitmap_list *list;
    struct bitmap *bm;
    unsigned char *buf;
    size_t len, i;

    rng_seed(7);
    for (i = 0; i < sizeof data; i++)
        data[i] = (unsigned char)rng();
    /* "x": data cluster then all-ones; "y": all-ones then unallocated */
    table[0] = qb_alloc_clusters(b, data, sizeof data);
    table[1] = QB_BME_ALL_ONES;
    qb_add_bitmap_table(b, "x", 9, 0, table, 2);
    table[0] = QB_BME_ALL_ONES;
    table[1] = 0;
    qb_add_bitmap_table(b, "y", 9, QB_BME_AUTO, table, 2);
    qb_store_bitmaps(b);
    buf = finish(b, &len);
    qb_free(b);

    img = open_img(buf, len, "mixed");
    list = load_list(img, "mixed");
    assert_true(list->usable);

    memcpy(model, data, 512);
    memset(model + 512, 0xff, sizeof model - 512);
    model[768] = 0x01; /* 6145 bits: one bit in the last byte */
    bm = load_ok(img, find_bi(list, "x"), 0, "x");
    assert_int_equal(bm->nbits, 6145);
    check_bits(bm, model, sizeof model, "x");
    bitmap_free(bm);

    memset(model, 0xff, 512);
    memset(model + 512, 0, sizeof model - 512);
    bm = load_ok(img, find_bi(list, "y"), 0, "y");
    check_bits(bm, model, sizeof model, "y");
    bitmap_free(bm);
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
    free(buf);
}

/* Many bitmaps (300) of random granularities 9..31 and random contents,
 * on a disk whose size is no multiple of the granularities.
 */
static void
test_good_many(void **state)
{
    enum { N = 300 };
    const uint64_t size = 3 * MiB + 1536;
    struct qb *b = qb_new(3, 9, size, false, false);
    unsigned char *streams[N];
    size_t slen[N];
    unsigned gb[N];
    uint32_t fl[N];
    struct qcow2_image *img;
    struct qcow2_bitmap_list *list;
    unsigned char *buf;
    size_t len, i;

    rng_seed(300);
    for (i = 0; i < N; i++) {
        char name[32];

        gb[i] = 9 + (unsigned)(rng() % 23);
        fl[i] = (uint32_t)(rng() % 2) * QB_BME_AUTO;
        streams[i] = random_stream(nbits_of(size, gb[i]),
                                   (unsigned)(rng() % 256),
                                   &slen[i]);
        snprintf(name, sizeof name, "bitmap-%zu", i);
        qb_add_bitmap(b, name, gb[i], fl[i], streams[i], slen[i]);
    }
    qb_store_bitmaps(b);
    buf = finish(b, &len);
    qb_free(b);

    img = open_img(buf, len, "many");
    list = load_list(img, "many");
    assert_true(list->usable);
    assert_int_equal(list->nr, N);
    for (i = 0; i < N; i++) {
        const struct qcow2_bitmap_info *bi = &list->bitmaps[i];
        char name[32];
        struct bitmap *bm;

        snprintf(name, sizeof name, "bitmap-%zu", i);
        assert_string_equal(bi->name, name);
        assert_int_equal(bi->status, QCOW2_BITMAP_OK);
        assert_int_equal(bi->granularity_bits, gb[i]);
        assert_int_equal(bi->flags, fl[i]);
        bm = load_ok(img, bi, 0, name);
        check_bits(bm, streams[i], slen[i], name);
        bitmap_free(bm);
        free(streams[i]);
    }
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
    free(buf);
}

/* Every granularity QEMU accepts, 2^9 .. 2^31, with the exact table size
 * (one data cluster per 8 * cluster_size bits).
 */
static void
test_good_granularities(void **state)
{
    const uint64_t size = 5 * MiB + 512;
    struct qb *b = qb_new(3, 9, size, false, false);
    unsigned char *streams[23];
    size_t slen[23];
    struct qcow2_image *img;
    struct qcow2_bitmap_list *list;
    unsigned char *buf;
    size_t len;
    unsigned g;

    rng_seed(923);
    for (g = 9; g <= 31; g++) {
        char name[16];

        snprintf(name, sizeof name, "g%u", g);
        streams[g - 9] = random_stream(nbits_of(size, g), 128, &slen[g - 9]);
        streams[g - 9][slen[g - 9] - 1] |= 1u << ((nbits_of(size, g) - 1) % 8);
        qb_add_bitmap(b, name, g, QB_BME_AUTO, streams[g - 9], slen[g - 9]);
    }
    qb_store_bitmaps(b);
    buf = finish(b, &len);
    qb_free(b);

    img = open_img(buf, len, "granularities");
    list = load_list(img, "granularities");
    assert_true(list->usable);
    for (g = 9; g <= 31; g++) {
        const struct qcow2_bitmap_info *bi = &list->bitmaps[g - 9];
        uint64_t nbits = nbits_of(size, g);
        struct bitmap *bm;

        assert_int_equal(bi->granularity_bits, g);
        assert_int_equal(bi->table_size, div_up(div_up(nbits, 8), 512));
        bm = load_ok(img, bi, 0, bi->name);
        assert_int_equal(bm->nbits, nbits);
        assert_int_equal(bm->granularity, 1ULL << g);
        check_bits(bm, streams[g - 9], slen[g - 9], bi->name);
        /* The last bit covers the partial end of the disk. */
        assert_true(bitmap_test(bm, nbits - 1));
        bitmap_free(bm);
        free(streams[g - 9]);
    }
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
    free(buf);
}

/* Names: 1 byte, 1023 bytes (QEMU's maximum), UTF-8 of 2, 3 and 4 bytes
 * per character, and names that are valid NBD strings but hostile in a
 * log (newline, escape): accepted, and escaped in every message.
 */
static void
test_good_names(void **state)
{
    static const char *const names[] = {
        "x",
        "\xc3\xa9t\xc3\xa9",                           /* été */
        "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e",        /* 日本語 */
        "emoji \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf end", /* U+1F600 U+10FFFF */
        "line\nbreak\x1b[31m",
    };
    const size_t nn = sizeof names / sizeof names[0];
    struct qb *b = qb_new(3, 12, 4 * MiB, false, false);
    char longname[1024];
    struct qcow2_image *img;
    struct qcow2_bitmap_list *list;
    unsigned char *buf, s = 0x81;
    size_t len, i;

    memset(longname, 'L', 1023);
    longname[1023] = '\0';
    longname[0] = 'A';
    longname[1022] = 'Z';
    for (i = 0; i < nn; i++)
        qb_add_bitmap(b, names[i], 16, QB_BME_AUTO, &s, 1);
    qb_add_bitmap(b, longname, 16, 0, &s, 1);
    /* in_use copies, so that their reasons quote the names */
    qb_add_bitmap(b, "in\nuse", 16, QB_BME_IN_USE | QB_BME_AUTO, &s, 1);
    longname[0] = 'B';
    qb_add_bitmap(b, longname, 16, QB_BME_IN_USE, &s, 1);
    qb_store_bitmaps(b);
    buf = finish(b, &len);
    qb_free(b);

    img = open_img(buf, len, "names");
    list = load_list(img, "names");
    if (!list->usable)
        fail_msg("names: %s", list->reason);
    assert_int_equal(list->nr, nn + 3);
    for (i = 0; i < nn; i++) {
        struct bitmap *bm;

        assert_string_equal(list->bitmaps[i].name, names[i]);
        assert_int_equal(list->bitmaps[i].status, QCOW2_BITMAP_OK);
        bm = load_ok(img, &list->bitmaps[i], 0, names[i]);
        check_bits(bm, &s, 1, "names");
        bitmap_free(bm);
    }
    longname[0] = 'A';
    assert_int_equal(strlen(list->bitmaps[nn].name), 1023);
    assert_string_equal(list->bitmaps[nn].name, longname);
    assert_int_equal(list->bitmaps[nn].status, QCOW2_BITMAP_OK);

    /* Messages quote names escaped and truncated (CVE-2020-10761). */
    assert_string_equal(list->bitmaps[nn + 1].name, "in\nuse");
    assert_int_equal(list->bitmaps[nn + 1].status, QCOW2_BITMAP_IN_USE);
    check_msg(list->bitmaps[nn + 1].reason, "in\\nuse", SUBS("in?use"));
    assert_int_equal(list->bitmaps[nn + 2].status, QCOW2_BITMAP_IN_USE);
    check_msg(list->bitmaps[nn + 2].reason, "long in_use", SUBS("BLLL"));
    assert_null(strstr(list->bitmaps[nn + 2].reason, "LLZ"));
    expect_load_fail(img,
                     &list->bitmaps[nn + 1],
                     "in_use newline",
                     SUBS("in?use", "cannot be loaded"));
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
    free(buf);
}

/* A46: in_use bitmaps are listed (names known) but never loaded; auto and
 * in_use flags are reported as stored.
 */
static void
test_good_flags(void **state)
{
    static const uint32_t flags[] = {0,
                                     QB_BME_AUTO,
                                     QB_BME_IN_USE,
                                     QB_BME_IN_USE | QB_BME_AUTO};
    struct qb *b = qb_new(3, 12, 4 * MiB, false, false);
    struct qcow2_image *img;
    struct qcow2_bitmap_list *list;
    unsigned char *buf, s[8] = {0xff, 0, 0x10};
    size_t len, i;

    for (i = 0; i < 4; i++) {
        char name[8];

        snprintf(name, sizeof name, "f%zu", i);
        qb_add_bitmap(b, name, 16, flags[i], s, sizeof s);
    }
    qb_store_bitmaps(b);
    buf = finish(b, &len);
    qb_free(b);
    img = open_img(buf, len, "flags");
    list = load_list(img, "flags");
    assert_true(list->usable);
    assert_true(list->names_known);
    for (i = 0; i < 4; i++) {
        const struct qcow2_bitmap_info *bi = &list->bitmaps[i];

        assert_int_equal(bi->flags, flags[i]);
        if (flags[i] & QB_BME_IN_USE) {
            assert_int_equal(bi->status, QCOW2_BITMAP_IN_USE);
            check_msg(bi->reason, "in_use", SUBS("in use", bi->name));
            expect_load_fail(img, bi, "in_use", SUBS("cannot be loaded"));
        } else {
            struct bitmap *bm = load_ok(img, bi, 0, "flags");

            assert_int_equal(bi->status, QCOW2_BITMAP_OK);
            check_bits(bm, s, sizeof s, "flags");
            bitmap_free(bm);
        }
    }
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
    free(buf);
}

/* An image without bitmaps: nothing present, names known, no reason. */
static void
test_good_no_bitmaps(void **state)
{
    struct qb *b = qb_new(3, 16, 1 * MiB, false, false);
    struct qcow2_image *img;
    struct qcow2_bitmap_list *list;
    unsigned char *buf;
    size_t len;

    buf = finish(b, &len);
    qb_free(b);
    img = open_img(buf, len, "none");
    list = load_list(img, "none");
    assert_false(list->present);
    assert_true(list->usable); /* nothing is wrong */
    assert_true(list->names_known);
    assert_int_equal(list->nr, 0);
    assert_string_equal(list->reason, "");
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
    free(buf);
}

/* ------------------------------------------------------------------ */
/* A31, A32, A48, corrupt bit: bits that say the extension is not to be
 * trusted.
 */
static void
test_autoclear_and_version(void **state)
{
    struct base bs;
    unsigned char *m;
    struct qb *b;
    size_t len;

    base_build(&bs, 3, 9);

    /* A31: the "old writer" case: every bitmap inconsistent, but every
     * name still known (a merge may fall back per layer).
     */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, QB_OFF_AUTOCLEAR, 0);
    expect_layer_bad(m, bs.len, "A31", 1, SUBS("autoclear bit is clear"));
    /* Unknown autoclear bits beside it do not matter; bit 0 does. */
    qb_put_be64(m, QB_OFF_AUTOCLEAR, 0x80);
    expect_layer_bad(m, bs.len, "A31 other bits", 1, SUBS("autoclear"));
    free(m);

    /* Corrupt bit (incompatible bit 1): readable, bitmaps not trusted. */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, QB_OFF_INCOMPAT, 2);
    expect_layer_bad(m, bs.len, "corrupt bit", 1, SUBS("corrupt"));
    free(m);

    /* A48: a v2 image has no autoclear field: always inconsistent. */
    base_free(&bs);
    base_build(&bs, 2, 9);
    expect_layer_bad(bs.buf, bs.len, "A48", 1, SUBS("version 2"));
    base_free(&bs);

    /* A32: autoclear bit 0 without an extension: no bitmaps, a warning. */
    b = qb_new(3, 16, 1 * MiB, false, false);
    qb_hdr(b)->autoclear_features = QB_AUTOCLEAR_BITMAPS;
    m = finish(b, &len);
    qb_free(b);
    {
        struct qcow2_image *img = open_img(m, len, "A32");
        struct qcow2_bitmap_list *list = load_list(img, "A32");

        assert_false(list->present);
        assert_false(list->usable);
        assert_int_equal(list->nr, 0);
        assert_true(list->names_known);
        check_msg(list->reason,
                  "A32",
                  SUBS("autoclear bit set without a bitmaps extension"));
        qcow2_bitmap_list_free(list);
        qcow2_close(img);
    }
    free(m);
}

/* A33: extension length 16, 32, 0, 0xffffffff; reserved32 != 0. */
static void
test_ext_length_reserved(void **state)
{
    struct base bs;
    unsigned char *m;
    uint64_t lenpos;

    base_build(&bs, 3, 9);
    lenpos = bs.ext_pos + 4;

    /* 16: the extension walk goes on at +24, which holds the directory
     * offset's high word (0): the end marker.  The image stays readable.
     */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be32(m, lenpos, 16);
    expect_layer_bad(m, bs.len, "A33 len 16", 0, SUBS("length 16"));
    /* 32: the 8 bytes of the end marker become part of the extension. */
    qb_put_be32(m, lenpos, 32);
    expect_layer_bad(m, bs.len, "A33 len 32", 0, SUBS("length 32"));
    qb_put_be32(m, lenpos, 0);
    expect_layer_bad(m, bs.len, "A33 len 0", 0, SUBS("length 0"));
    qb_put_be32(m, lenpos, 23);
    expect_layer_bad(m, bs.len, "A33 len 23", 0, SUBS("length 23"));

    /* 0xffffffff overruns the header cluster: the extension walk cannot
     * continue, so the image is refused as a whole (A17, and QEMU's
     * "Header extension too large"); no read outside the cluster.
     */
    qb_put_be32(m, lenpos, 0xffffffff);
    {
        struct qcow2_image *img = NULL;
        struct qcbt_io *io;
        int r;

        qcbt_error_clear();
        assert_int_equal(qcbt_io_open_mem(m, bs.len, "t", &io), 0);
        r = qcow2_open(io, &img);
        if (r >= 0) {
            qcow2_close(img);
            fail_msg("A33 len 0xffffffff: image accepted");
        }
        check_err(r, "A33 len 0xffffffff", SUBS("too large"));
    }
    free(m);

    /* reserved32 */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be32(m, bs.ext_pos + 12, 1);
    expect_dir_bad(&bs, m, bs.len, "A33 reserved", 0, SUBS("reserved"));
    qb_put_be32(m, bs.ext_pos + 12, 0x80000000);
    expect_dir_bad(&bs, m, bs.len, "A33 reserved hi", 0, SUBS("reserved"));
    free(m);
    base_free(&bs);
}

/* A34: nb_bitmaps 0, 65536, 0xffffffff; more or fewer than the entries. */
static void
test_nb_bitmaps(void **state)
{
    struct base bs;
    unsigned char *m;
    uint64_t nbpos;

    base_build(&bs, 3, 9);
    nbpos = bs.ext_pos + 8;
    m = dup_buf(bs.buf, bs.len);

    qb_put_be32(m, nbpos, 0);
    expect_dir_bad(&bs, m, bs.len, "A34 0", 0, SUBS("0 bitmaps"));
    qb_put_be32(m, nbpos, 65536);
    expect_dir_bad(&bs, m, bs.len, "A34 65536", 0, SUBS("65536 bitmaps"));
    qb_put_be32(m, nbpos, 0xffffffff);
    expect_dir_bad(&bs, m, bs.len, "A34 max", 0, SUBS("4294967295"));

    /* The header says 2, the directory holds 3. */
    qb_put_be32(m, nbpos, 2);
    expect_dir_bad(&bs,
                   m,
                   bs.len,
                   "A34 more",
                   0,
                   SUBS("broken bitmap directory", "more bitmaps"));
    qb_put_be32(m, nbpos, 1);
    expect_dir_bad(&bs, m, bs.len, "A34 more 1", 0, SUBS("more bitmaps"));
    /* The header says 4 or 65535, the directory holds 3. */
    qb_put_be32(m, nbpos, 4);
    expect_dir_bad(&bs,
                   m,
                   bs.len,
                   "A34 fewer",
                   0,
                   SUBS("broken bitmap directory", "3 bitmaps found", "4"));
    qb_put_be32(m, nbpos, 65535);
    expect_dir_bad(&bs, m, bs.len, "A34 fewer max", 0, SUBS("65535"));
    free(m);
    base_free(&bs);
}

/* A35: directory size and offset. */
static void
test_dir_size_offset(void **state)
{
    static const uint64_t bad_sizes[] =
        {0, 1024ULL * 65535 + 1, 64 * MiB, 1ULL << 32, 1ULL << 63, UINT64_MAX};
    struct base bs;
    unsigned char *m;
    uint64_t szpos, offpos, eof;
    size_t i;
    char what[64];

    base_build(&bs, 3, 9);
    szpos = bs.ext_pos + 16;
    offpos = bs.ext_pos + 24;
    eof = (bs.len + bs.cs - 1) / bs.cs * bs.cs;

    for (i = 0; i < sizeof bad_sizes / sizeof bad_sizes[0]; i++) {
        m = dup_buf(bs.buf, bs.len);
        qb_put_be64(m, szpos, bad_sizes[i]);
        snprintf(what, sizeof what, "A35 size %" PRIu64, bad_sizes[i]);
        expect_layer_bad(m, bs.len, what, 0, SUBS("directory size"));
        free(m);
    }

    m = dup_buf(bs.buf, bs.len);
    /* unaligned (by 8 and by one byte) */
    qb_put_be64(m, offpos, bs.dir_off + 8);
    expect_layer_bad(m, bs.len, "A35 unaligned", 0, SUBS("misaligned"));
    qb_put_be64(m, offpos, bs.dir_off + 1);
    expect_layer_bad(m, bs.len, "A35 unaligned 1", 0, SUBS("directory at"));
    /* past EOF, ending past EOF, wrapping around 2^64 */
    qb_put_be64(m, offpos, eof + 16 * bs.cs);
    expect_layer_bad(m, bs.len, "A35 past EOF", 0, SUBS("past the end"));
    qb_put_be64(m, offpos, eof);
    expect_layer_bad(m, bs.len, "A35 at EOF", 0, SUBS("past the end"));
    qb_put_be64(m, offpos, bs.dir_off);
    qb_put_be64(m, szpos, bs.len - bs.dir_off + 8);
    expect_layer_bad(m, bs.len, "A35 crossing EOF", 0, SUBS("past the end"));
    qb_put_be64(m, szpos, bs.dir_size);
    qb_put_be64(m, offpos, 0ULL - bs.cs);
    expect_layer_bad(m, bs.len, "A35 wrap", 0, SUBS("past the end"));
    qb_put_be64(m, offpos, 1ULL << 56);
    expect_layer_bad(m, bs.len, "A35 2^56", 0, SUBS("past the end"));
    /* overlapping the header, the L1 table, the refcount table */
    qb_put_be64(m, offpos, 0);
    expect_layer_bad(m, bs.len, "A35 header", 0, SUBS("overlaps the header"));
    qb_put_be64(m, offpos, bs.l1_off);
    expect_layer_bad(m, bs.len, "A35 L1", 0, SUBS("overlaps the L1 table"));
    qb_put_be64(m, offpos, bs.l1_off + bs.cs); /* inside a multi-cluster L1 */
    expect_layer_bad(m, bs.len, "A35 L1 inner", 0, SUBS("the L1 table"));
    qb_put_be64(m, offpos, bs.reftable_off);
    expect_layer_bad(m,
                     bs.len,
                     "A35 reftable",
                     0,
                     SUBS("overlaps the refcount table"));
    free(m);
    base_free(&bs);
}

/* A36: trailing garbage after the last entry; a directory ending in the
 * middle of an entry's header or of its name.
 */
static void
test_dir_trailing_truncated(void **state)
{
    struct base bs;
    unsigned char *m;
    uint64_t szpos, nbpos, e2;

    base_build(&bs, 3, 9);
    szpos = bs.ext_pos + 16;
    nbpos = bs.ext_pos + 8;
    e2 = bs.entry[2] - bs.dir_off;
    assert_int_equal(bs.dir_size, 3 * 32);

    m = dup_buf(bs.buf, bs.len);
    /* 8 bytes of zeros after the entries (inside the directory cluster) */
    qb_put_be64(m, szpos, bs.dir_size + 8);
    expect_dir_bad(&bs, m, bs.len, "A36 trailing", 0, SUBS("more bitmaps"));
    /* ... and the count says there is one more: a truncated header */
    qb_put_be32(m, nbpos, 4);
    expect_dir_bad(&bs,
                   m,
                   bs.len,
                   "A36 trailing 4",
                   0,
                   SUBS("entry 3", "truncated"));
    /* 24 more bytes of zeros: an entry with name_size 0 */
    qb_put_be64(m, szpos, bs.dir_size + 32);
    expect_dir_bad(&bs, m, bs.len, "A36 zero entry", 0, SUBS("name size 0"));
    /* non-zero garbage */
    memset(m + bs.dir_off + bs.dir_size, 0xa5, 32);
    expect_dir_bad(&bs, m, bs.len, "A36 garbage", 0, SUBS("entry 3"));
    free(m);

    /* ending inside entry 2's fixed header (1..23 bytes of it) */
    for (uint64_t cut = 1; cut < 24; cut++) {
        char what[64];

        m = dup_buf(bs.buf, bs.len);
        qb_put_be64(m, szpos, e2 + cut);
        snprintf(what, sizeof what, "A36 header cut %" PRIu64, cut);
        expect_dir_bad(&bs, m, bs.len, what, 0, SUBS("entry 2", "truncated"));
        free(m);
    }
    /* ending inside entry 2's name or padding */
    for (uint64_t cut = 24; cut < 32; cut++) {
        char what[64];

        m = dup_buf(bs.buf, bs.len);
        qb_put_be64(m, szpos, e2 + cut);
        snprintf(what, sizeof what, "A36 name cut %" PRIu64, cut);
        expect_dir_bad(&bs,
                       m,
                       bs.len,
                       what,
                       0,
                       SUBS("entry 2", "past the end of the directory"));
        free(m);
    }
    /* a directory of a few bytes: no entry header fits at all */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, szpos, 8);
    expect_dir_bad(&bs, m, bs.len, "A36 8 bytes", 0, SUBS("entry 0"));
    free(m);
    base_free(&bs);
}

/* A37, A38: name_size and extra_data_size. */
static void
test_entry_name_extra_sizes(void **state)
{
    static const uint32_t huge_extra[] = {0xfffffff8,
                                          0xffffffff,
                                          0xffffffe8,
                                          0x80000000};
    struct base bs;
    unsigned char *m;
    uint64_t e0, e2;
    size_t i;
    char what[64];

    base_build(&bs, 3, 9);
    e0 = bs.entry[0];
    e2 = bs.entry[2];

    m = dup_buf(bs.buf, bs.len);
    put16(m + e0 + 18, 0);
    expect_dir_bad(&bs, m, bs.len, "A37 name 0", 0, SUBS("name size 0"));
    /* 0xffff, 1024, 200 and 9 run past a 96-byte directory (entry 2),
     * or into the next entry (entry 0: the walk desynchronises).
     */
    put16(m + e0 + 18, 0xffff);
    expect_dir_bad(&bs, m, bs.len, "A37 0xffff", 0, SUBS("past the end"));
    free(m);
    m = dup_buf(bs.buf, bs.len);
    put16(m + e2 + 18, 0xffff);
    expect_dir_bad(&bs, m, bs.len, "A37 0xffff e2", 0, SUBS("entry 2"));
    put16(m + e2 + 18, 1024);
    expect_dir_bad(&bs, m, bs.len, "A37 1024 e2", 0, SUBS("past the end"));
    put16(m + e2 + 18, 9); /* 24 + 9 > 32 */
    expect_dir_bad(&bs, m, bs.len, "A37 9 e2", 0, SUBS("past the end"));
    free(m);
    for (i = 0; i < sizeof huge_extra / sizeof huge_extra[0]; i++) {
        m = dup_buf(bs.buf, bs.len);
        qb_put_be32(m, e0 + 20, huge_extra[i]);
        snprintf(what, sizeof what, "A38 extra 0x%" PRIx32, huge_extra[i]);
        expect_dir_bad(&bs, m, bs.len, what, 0, SUBS("past the end"));
        free(m);
        m = dup_buf(bs.buf, bs.len);
        qb_put_be32(m, e2 + 20, huge_extra[i]);
        expect_dir_bad(&bs, m, bs.len, what, 0, SUBS("entry 2"));
        free(m);
    }
    /* extra_data_size 0xffffffff with name_size 0xffff: both maximal */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be32(m, e2 + 20, 0xffffffff);
    put16(m + e2 + 18, 0xffff);
    expect_dir_bad(&bs, m, bs.len, "A38 both max", 0, SUBS("past the end"));
    free(m);
    base_free(&bs);

    /* Entries that really hold what they claim: a 1024-byte name, small
     * extra data (with and without extra_data_compatible).
     */
    {
        struct qb *b = qb_new(3, 12, 4 * MiB, false, false);
        struct qb_bitmap_entry *e;
        unsigned char *buf, s = 1;
        char name[1024];
        size_t len;

        memset(name, 'n', sizeof name);
        qb_add_bitmap(b, "ok", 16, 0, &s, 1);
        qb_add_bitmap(b, "long", 16, 0, &s, 1);
        e = qb_bitmap(b, 1);
        e->name = name; /* the builder copies at store time */
        e->name_len = 1024;
        e->name_size = 1024;
        qb_store_bitmaps(b);
        buf = finish(b, &len);
        qb_free(b);
        expect_layer_bad(buf, len, "A37 1024", 0, SUBS("name size 1024"));
        free(buf);
    }
    {
        static const uint32_t extra_sizes[] = {8, 1, 3, 16};
        static const uint32_t extra_flags[] = {
            0,
            QCOW2_BME_FLAG_EXTRA_DATA_COMPATIBLE};
        const unsigned char extra[16] = "extra-data-16by";
        size_t k, f;

        for (k = 0; k < 4; k++) {
            for (f = 0; f < 2; f++) {
                struct qb *b = qb_new(3, 12, 4 * MiB, false, false);
                struct qb_bitmap_entry *e;
                unsigned char *buf, s = 1;
                size_t len;

                qb_add_bitmap(b, "ok", 16, 0, &s, 1);
                qb_add_bitmap(b, "extra", 16, 0, &s, 1);
                e = qb_bitmap(b, 1);
                e->extra = extra;
                e->extra_len = extra_sizes[k];
                e->extra_data_size = extra_sizes[k];
                e->flags |= extra_flags[f];
                qb_store_bitmaps(b);
                buf = finish(b, &len);
                qb_free(b);
                snprintf(what,
                         sizeof what,
                         "A38 extra %" PRIu32 " flags %" PRIx32,
                         extra_sizes[k],
                         extra_flags[f]);
                expect_layer_bad(buf, len, what, 0, SUBS("extra data"));
                free(buf);
            }
        }
    }
}

/* A39: names with NUL bytes, invalid UTF-8; duplicate names. */
static void
test_entry_names(void **state)
{
    static const struct {
        const char *bytes;
        size_t len;
    } bad[] = {
        {"\0", 1},
        {"a\0b", 3},
        {"ab\0", 3},
        {"\xff", 1},
        {"\xfe", 1},
        {"\x80", 1},                 /* lone continuation byte */
        {"\xc0\x80", 2},             /* overlong NUL */
        {"\xc1\xbf", 2},             /* overlong */
        {"\xe0\x80\xaf", 3},         /* overlong '/' */
        {"\xed\xa0\x80", 3},         /* surrogate U+D800 */
        {"\xed\xbf\xbf", 3},         /* surrogate U+DFFF */
        {"\xf4\x90\x80\x80", 4},     /* U+110000 */
        {"\xf8\x88\x80\x80\x80", 5}, /* 5-byte form */
        {"\xe2\x82", 2},             /* truncated at the end */
        {"a\xc3", 2},                /* truncated */
        {"\xc3\x28", 2},             /* bad continuation */
        {"\xf0\x9f\x98", 3},         /* truncated 4-byte */
    };
    const unsigned char s = 1;
    size_t i;
    char what[64];

    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct qb *b = qb_new(3, 12, 4 * MiB, false, false);
        struct qb_bitmap_entry *e;
        unsigned char *buf;
        size_t len;

        qb_add_bitmap(b, "good", 16, 0, &s, 1);
        qb_add_bitmap(b, "placeholder", 16, 0, &s, 1);
        e = qb_bitmap(b, 1);
        e->name = bad[i].bytes;
        e->name_len = bad[i].len;
        e->name_size = (uint16_t)bad[i].len;
        qb_store_bitmaps(b);
        buf = finish(b, &len);
        qb_free(b);
        snprintf(what, sizeof what, "A39 bad name %zu", i);
        expect_layer_bad(buf, len, what, 0, SUBS("entry 1", "name"));
        free(buf);
    }

    /* Duplicates: two equal names, also among many, also names that are
     * equal only up to the length of the shorter one (not duplicates).
     */
    {
        struct qb *b = qb_new(3, 12, 4 * MiB, false, false);
        unsigned char *buf;
        size_t len;

        qb_add_bitmap(b, "aa", 16, 0, &s, 1);
        qb_add_bitmap(b, "a", 16, 0, &s, 1);
        qb_add_bitmap(b, "aaa", 16, 0, &s, 1);
        qb_add_bitmap(b, "aa", 16, QB_BME_AUTO, &s, 1);
        qb_store_bitmaps(b);
        buf = finish(b, &len);
        qb_free(b);
        expect_layer_bad(buf, len, "A39 duplicate", 1, SUBS("duplicate", "aa"));
        free(buf);

        b = qb_new(3, 12, 4 * MiB, false, false);
        qb_add_bitmap(b, "aa", 16, 0, &s, 1);
        qb_add_bitmap(b, "a", 16, 0, &s, 1);
        qb_add_bitmap(b, "aaa", 16, 0, &s, 1);
        qb_store_bitmaps(b);
        buf = finish(b, &len);
        qb_free(b);
        {
            struct qcow2_image *img = open_img(buf, len, "prefixes");
            struct qcow2_bitmap_list *list = load_list(img, "prefixes");

            assert_true(list->usable);
            qcow2_bitmap_list_free(list);
            qcow2_close(img);
        }
        free(buf);

        /* duplicate where one copy is in_use: still refused */
        b = qb_new(3, 12, 4 * MiB, false, false);
        qb_add_bitmap(b, "dup\nname", 16, QB_BME_IN_USE, &s, 1);
        qb_add_bitmap(b, "dup\nname", 16, 0, &s, 1);
        qb_store_bitmaps(b);
        buf = finish(b, &len);
        qb_free(b);
        expect_layer_bad(buf,
                         len,
                         "A39 duplicate in_use",
                         1,
                         SUBS("duplicate", "dup?name"));
        free(buf);
    }

    /* In place, in the base image: "b" renamed "a". */
    {
        struct base bs;
        unsigned char *m;

        base_build(&bs, 3, 9);
        m = dup_buf(bs.buf, bs.len);
        m[bs.entry[1] + 24] = 'a';
        expect_dir_bad(&bs, m, bs.len, "A39 dup base", 1, SUBS("'a'"));
        m[bs.entry[1] + 24] = '\0';
        expect_dir_bad(&bs, m, bs.len, "A39 NUL base", 0, SUBS("NUL"));
        m[bs.entry[1] + 24] = 0xc3;
        expect_dir_bad(&bs, m, bs.len, "A39 UTF-8 base", 0, SUBS("UTF-8"));
        free(m);
        base_free(&bs);
    }
}

/* A40, A41: type, flags, granularity. */
static void
test_entry_type_flags_granularity(void **state)
{
    static const uint8_t types[] = {0, 2, 3, 0x81, 0xff};
    static const uint8_t gbits[] = {0, 1, 8, 32, 33, 63, 64, 255};
    struct base bs;
    unsigned char *m;
    size_t i, e;
    unsigned bit;
    char what[64], sub[64];

    base_build(&bs, 3, 9);
    for (e = 0; e < NB_BASE; e++) {
        for (i = 0; i < sizeof types; i++) {
            m = dup_buf(bs.buf, bs.len);
            m[bs.entry[e] + 16] = types[i];
            snprintf(what, sizeof what, "A40 type %u (%zu)", types[i], e);
            snprintf(sub, sizeof sub, "unknown type %u", types[i]);
            expect_dir_bad(&bs, m, bs.len, what, 1, SUBS(sub, base_names[e]));
            free(m);
        }
        /* bit 2 (extra_data_compatible, refused by QEMU) and 3..31 */
        for (bit = 2; bit < 32; bit++) {
            uint32_t flags = base_flags[e] | (1u << bit);

            m = dup_buf(bs.buf, bs.len);
            qb_put_be32(m, bs.entry[e] + 12, flags);
            snprintf(what, sizeof what, "A40 flag bit %u (%zu)", bit, e);
            snprintf(sub, sizeof sub, "flags 0x%" PRIx32, flags);
            expect_dir_bad(&bs, m, bs.len, what, 1, SUBS(sub));
            /* also together with in_use: still refused, not "in use" */
            qb_put_be32(m, bs.entry[e] + 12, flags | QB_BME_IN_USE);
            expect_dir_bad(&bs, m, bs.len, what, 1, SUBS("unsupported flags"));
            free(m);
        }
        for (i = 0; i < sizeof gbits; i++) {
            m = dup_buf(bs.buf, bs.len);
            m[bs.entry[e] + 17] = gbits[i];
            snprintf(what,
                     sizeof what,
                     "A41 granularity %u (%zu)",
                     gbits[i],
                     e);
            snprintf(sub, sizeof sub, "granularity_bits %u", gbits[i]);
            expect_dir_bad(&bs, m, bs.len, what, 1, SUBS(sub));
            /* in_use does not excuse a bad granularity */
            qb_put_be32(m, bs.entry[e] + 12, QB_BME_IN_USE);
            expect_dir_bad(&bs, m, bs.len, what, 1, SUBS(sub));
            free(m);
        }
    }
    base_free(&bs);
}

/* A42, A47: bitmap table sizes. */
static void
test_table_size(void **state)
{
    struct base bs;
    unsigned char *m;
    uint64_t tpos;

    base_build(&bs, 3, 9);
    assert_int_equal(bs.tsize[1], 5);
    tpos = bs.entry[1] + 8;

    m = dup_buf(bs.buf, bs.len);
    qb_put_be32(m, tpos, 0);
    expect_dir_bad(&bs, m, bs.len, "A42 0", 1, SUBS("table size 0"));
    qb_put_be32(m, tpos, 0x8000001);
    expect_dir_bad(&bs, m, bs.len, "A42 >max", 1, SUBS("134217729"));
    qb_put_be32(m, tpos, 0xffffffff);
    expect_dir_bad(&bs, m, bs.len, "A42 ~0", 1, SUBS("4294967295"));
    /* at QEMU's entry limit, but over 512 MiB of bitmap data */
    qb_put_be32(m, tpos, 0x8000000);
    expect_dir_bad(&bs, m, bs.len, "A42 phys", 1, SUBS("512 MiB"));
    qb_put_be32(m, tpos, (uint32_t)(512 * MiB / bs.cs) + 1);
    expect_dir_bad(&bs, m, bs.len, "A42 phys+1", 1, SUBS("512 MiB"));
    /* ... even when in_use */
    qb_put_be32(m, bs.entry[1] + 12, QB_BME_IN_USE);
    expect_dir_bad(&bs, m, bs.len, "A42 phys in_use", 1, SUBS("512 MiB"));
    free(m);

    /* not in_use: the size must be exact */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be32(m, tpos, 4);
    expect_dir_bad(&bs,
                   m,
                   bs.len,
                   "A42 smaller",
                   1,
                   SUBS("'b'", "4 entries", "5 expected"));
    qb_put_be32(m, tpos, 1);
    expect_dir_bad(&bs, m, bs.len, "A42 1", 1, SUBS("1 entries"));
    qb_put_be32(m, tpos, 6);
    expect_dir_bad(&bs, m, bs.len, "A42 larger", 1, SUBS("6 entries"));
    qb_put_be32(m, tpos, 64); /* 512 bytes: the whole table cluster */
    expect_dir_bad(&bs, m, bs.len, "A42 64", 1, SUBS("64 entries"));

    /* A47: in_use: a wrong size is expected (a resize while in use) */
    qb_put_be32(m, bs.entry[1] + 12, QB_BME_IN_USE);
    qb_put_be32(m, tpos, 4);
    expect_bitmap_status(m,
                         bs.len,
                         "A47 smaller in_use",
                         "b",
                         QCOW2_BITMAP_IN_USE,
                         SUBS("'b'", "in use"));
    qb_put_be32(m, tpos, 64);
    expect_bitmap_status(m,
                         bs.len,
                         "A47 larger in_use",
                         "b",
                         QCOW2_BITMAP_IN_USE,
                         SUBS("in use"));
    /* but its table must still lie in the file */
    qb_put_be32(m, tpos, (uint32_t)((bs.len - bs.table[1]) / 8 + 1));
    expect_dir_bad(&bs, m, bs.len, "A47 past EOF", 1, SUBS("past the end"));
    free(m);

    /* A47: the virtual size changed under the bitmaps (shrunk to 4 MiB:
     * "b" needs 2 entries, "a" and "c" still need 1).
     */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, QB_OFF_SIZE, 4 * MiB);
    expect_dir_bad(&bs,
                   m,
                   bs.len,
                   "A47 shrunk",
                   1,
                   SUBS("'b'", "5 entries", "2 expected"));
    qb_put_be32(m, bs.entry[1] + 12, QB_BME_IN_USE);
    expect_bitmap_status(m,
                         bs.len,
                         "A47 shrunk in_use",
                         "b",
                         QCOW2_BITMAP_IN_USE,
                         SUBS("in use"));
    free(m);
    base_free(&bs);
}

/* A43: bitmap table offsets. */
static void
test_table_offset(void **state)
{
    struct base bs;
    unsigned char *m;
    uint64_t eof;
    size_t e;
    char what[80];

    base_build(&bs, 3, 9);
    eof = (bs.len + bs.cs - 1) / bs.cs * bs.cs;
    for (e = 0; e < NB_BASE; e++) {
        uint64_t tpos = bs.entry[e];
        const struct {
            uint64_t off;
            const char *sub;
        } cases[] = {
            {0, "offset 0x0"},
            {bs.table[e] + 8, "not cluster aligned"},
            {bs.table[e] + 1, "not cluster aligned"},
            {bs.table[e] | (1ULL << 63), "past the end"},
            {eof, "past the end"},
            {eof + 1024 * bs.cs, "past the end"},
            {1ULL << 56, "past the end"},
            {0ULL - bs.cs, "past the end"},
            {bs.l1_off, "overlaps the L1 table"},
            {bs.l1_off + 2 * bs.cs, "overlaps the L1 table"},
            {bs.reftable_off, "overlaps the refcount table"},
            {bs.dir_off, "overlaps the bitmap directory"},
            {bs.table[(e + 1) % NB_BASE], "bitmap tables of"},
            {bs.table[(e + 2) % NB_BASE], "bitmap tables of"},
        };
        size_t i;

        for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            m = dup_buf(bs.buf, bs.len);
            qb_put_be64(m, tpos, cases[i].off);
            snprintf(what,
                     sizeof what,
                     "A43 '%s' table at 0x%" PRIx64,
                     base_names[e],
                     cases[i].off);
            expect_dir_bad(&bs, m, bs.len, what, 1, SUBS(cases[i].sub));
            /* in_use does not excuse a bad table offset either */
            qb_put_be32(m, tpos + 12, QB_BME_IN_USE);
            expect_dir_bad(&bs, m, bs.len, what, 1, SUBS(cases[i].sub));
            free(m);
        }
    }
    /* A table ending past EOF: "b"'s table moved to the last cluster of
     * the file, which holds only 2 of its 5 entries.
     */
    m = base_copy(&bs, eof + 16);
    memcpy(m + eof, bs.buf + bs.table[1], 16);
    qb_put_be64(m, bs.entry[1], eof);
    expect_layer_bad(m, eof + 16, "A43 table cut", 1, SUBS("past the end"));
    free(m);
    base_free(&bs);
}

/* A44: bitmap table entries. */
static void
test_table_entries(void **state)
{
    static const unsigned reserved_bits[] = {1, 2, 5, 8, 56, 57, 62, 63};
    struct base bs;
    unsigned char *m;
    uint64_t t, d0, d1, eof;
    size_t i;
    char what[64];

    base_build(&bs, 3, 9);
    t = bs.table[1]; /* "b": 5 entries, entry 2 unallocated */
    d0 = base_data(&bs, 1, 0);
    d1 = base_data(&bs, 1, 1);
    assert_true(d0 != 0 && d1 != 0);
    eof = (bs.len + bs.cs - 1) / bs.cs * bs.cs;

    for (i = 0; i < sizeof reserved_bits / sizeof reserved_bits[0]; i++) {
        uint64_t bit = 1ULL << reserved_bits[i];

        snprintf(what, sizeof what, "A44 reserved bit %u", reserved_bits[i]);
        m = dup_buf(bs.buf, bs.len);
        qb_put_be64(m, t, d0 | bit); /* on a data entry */
        expect_data_bad(m, bs.len, what, "b", SUBS("'b'", "reserved bits"));
        qb_put_be64(m, t, d0);
        qb_put_be64(m, t + 16, bit); /* on the unallocated entry */
        expect_data_bad(m, bs.len, what, "b", SUBS("entry 2", "reserved"));
        qb_put_be64(m, t + 16, bit | QB_BME_ALL_ONES);
        expect_data_bad(m, bs.len, what, "b", SUBS("reserved"));
        free(m);
    }
    /* the last entry's reserved bits count too ("a" has one entry) */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, bs.table[0], base_data(&bs, 0, 0) | 0x100);
    expect_data_bad(m, bs.len, "A44 a reserved", "a", SUBS("reserved"));
    free(m);

    /* offset and the all-ones flag together */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, t + 8, d1 | QB_BME_ALL_ONES);
    expect_data_bad(m, bs.len, "A44 offset+ones", "b", SUBS("all-ones"));
    free(m);

    /* past EOF: well past, exactly at EOF, at the 2^56 limit */
    {
        const uint64_t offs[] = {eof, eof + 64 * bs.cs, 0x00fffffffffffe00ULL};

        for (i = 0; i < 3; i++) {
            m = dup_buf(bs.buf, bs.len);
            qb_put_be64(m, t + 8, offs[i]);
            snprintf(what, sizeof what, "A44 past EOF 0x%" PRIx64, offs[i]);
            expect_data_bad(m,
                            bs.len,
                            what,
                            "b",
                            SUBS("bitmap data cluster", "past the end"));
            free(m);
        }
    }
    /* the last cluster of the file holds only half of a data cluster:
     * never read a short read as clean
     */
    {
        size_t len = eof + bs.cs / 2;

        m = base_copy(&bs, len);
        memset(m + eof, 0xff, bs.cs / 2);
        qb_put_be64(m, t, eof);
        expect_data_bad(m, len, "A44 short cluster", "b", SUBS("past the end"));
        free(m);
    }
    /* data clusters overlapping metadata */
    {
        const struct {
            uint64_t off;
            const char *sub;
        } cases[] = {
            {bs.l1_off, "the L1 table"},
            {bs.l1_off + bs.cs, "the L1 table"},
            {bs.reftable_off, "the refcount table"},
            {bs.table[1], "its own bitmap table"},
            {bs.dir_off, "the bitmap directory"},
        };

        for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            m = dup_buf(bs.buf, bs.len);
            qb_put_be64(m, t + 8, cases[i].off);
            snprintf(what, sizeof what, "A44 data on %s", cases[i].sub);
            expect_data_bad(m, bs.len, what, "b", SUBS(cases[i].sub));
            /* also in the unallocated slot and in the last entry */
            qb_put_be64(m, t + 8, d1);
            qb_put_be64(m, t + 16, cases[i].off);
            expect_data_bad(m, bs.len, what, "b", SUBS(cases[i].sub));
            qb_put_be64(m, t + 16, 0);
            qb_put_be64(m, t + 32, cases[i].off);
            expect_data_bad(m, bs.len, what, "b", SUBS(cases[i].sub));
            free(m);
        }
    }
    /* one data cluster used twice by the same bitmap (adjacent and not) */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, t + 8, d0);
    expect_data_bad(m, bs.len, "A44 twice", "b", SUBS("used twice"));
    qb_put_be64(m, t + 8, d1);
    qb_put_be64(m, t + 32, d0);
    expect_data_bad(m, bs.len, "A44 twice far", "b", SUBS("used twice"));
    qb_put_be64(m, t + 32, base_data(&bs, 1, 4));
    qb_put_be64(m, t + 16, d1);
    expect_data_bad(m, bs.len, "A44 twice slot", "b", SUBS("used twice"));
    free(m);

    /* a bitmap with unaligned data offsets needs clusters > 512 bytes */
    base_free(&bs);
    base_build(&bs, 3, 12);
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, bs.table[1], base_data(&bs, 1, 0) + 512);
    expect_data_bad(m,
                    bs.len,
                    "A44 unaligned",
                    "b",
                    SUBS("not cluster aligned"));
    qb_put_be64(m, bs.table[1], base_data(&bs, 1, 0) + 2048);
    expect_data_bad(m, bs.len, "A44 unaligned 2", "b", SUBS("aligned"));
    free(m);
    base_free(&bs);
}

/* Bitmap NAME of the image must never load: either the layer or the
 * bitmap is refused with a reason naming SUBS, or loading its data fails
 * with a message naming SUBS.  Returns NULL if so, else what went wrong
 * (static buffer), so that a test can list every case that fails.
 */
static const char *
never_loads(const unsigned char *buf,
            size_t len,
            const char *name,
            const char *const *subs)
{
    static char why[512];
    struct qcow2_image *img = open_img(buf, len, name);
    struct qcow2_bitmap_list *list = load_list(img, name);
    const struct qcow2_bitmap_info *bi = find_bi(list, name);
    const char *msg;
    struct bitmap *bm = NULL;
    size_t i;

    why[0] = '\0';
    if (!list->usable || bi->status != QCOW2_BITMAP_OK) {
        msg = list->usable ? bi->reason : list->reason;
    } else if (qcow2_bitmap_load_data(img, bi, 0, &bm) < 0) {
        msg = qcbt_error_get();
    } else {
        bitmap_free(bm);
        snprintf(why, sizeof why, "bitmap '%s' loads", name);
        msg = NULL;
    }
    for (i = 0; msg && subs[i]; i++)
        if (!strstr(msg, subs[i]))
            snprintf(why,
                     sizeof why,
                     "bitmap '%s' refused, but \"%s\" does not name \"%s\"",
                     name,
                     msg,
                     subs[i]);
    qcow2_bitmap_list_free(list);
    qcow2_close(img);
    return why[0] ? why : NULL;
}

/* Record a failed case in LOG (so that every case runs). */
static void
log_case(char *log, size_t size, const char *what, const char *why)
{
    size_t used = strlen(log);

    if (why && used < size)
        snprintf(log + used, size - used, "\n  %s: %s", what, why);
}

/* A43/A44 (catalogue): bitmap tables and data clusters on metadata (an
 * L2 table listed in the L1 table, a refcount block listed in the
 * refcount table, another bitmap's table), data clusters shared between
 * two bitmaps, and guest data clusters (plain or compressed) on a bitmap's
 * table or data.  Every such bitmap must be refused, by the directory
 * check or by the loader.
 */
static void
test_tables_cross_metadata(void **state)
{
    struct base bs;
    unsigned char *m;
    uint64_t t;
    char log[4096] = "";

    base_build(&bs, 3, 9);
    t = bs.table[1];

    /* bitmap tables */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, bs.entry[0], bs.l2_off);
    log_case(log,
             sizeof log,
             "table of 'a' on the L2 table",
             never_loads(m, bs.len, "a", SUBS("L2")));
    qb_put_be64(m, bs.entry[0], bs.refblock_off);
    log_case(log,
             sizeof log,
             "table of 'a' on the refcount block",
             never_loads(m, bs.len, "a", SUBS("refcount")));
    free(m);

    /* data clusters */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, t + 8, bs.l2_off);
    log_case(log,
             sizeof log,
             "data of 'b' on the L2 table",
             never_loads(m, bs.len, "b", SUBS("L2")));
    qb_put_be64(m, t + 8, bs.refblock_off);
    log_case(log,
             sizeof log,
             "data of 'b' on the refcount block",
             never_loads(m, bs.len, "b", SUBS("refcount")));
    qb_put_be64(m, t + 8, bs.table[0]);
    log_case(log,
             sizeof log,
             "data of 'b' on the table of 'a'",
             never_loads(m, bs.len, "b", SUBS("table")));
    free(m);

    /* entry 1 of "b" shares the data cluster of "a": neither can be
     * trusted
     */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, t + 8, base_data(&bs, 0, 0));
    log_case(log,
             sizeof log,
             "data cluster shared by 'a' and 'b' (b)",
             never_loads(m, bs.len, "b", SUBS("'b'")));
    log_case(log,
             sizeof log,
             "data cluster shared by 'a' and 'b' (a)",
             never_loads(m, bs.len, "a", SUBS("'a'")));
    free(m);
    /* guest data (the L2 table maps guest cluster 7 at bs.guest_off;
     * 512-byte clusters: one L2 table of 64 entries)
     */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m, t + 8, bs.guest_off);
    log_case(log,
             sizeof log,
             "data of 'b' on guest data",
             never_loads(m, bs.len, "b", SUBS("guest data", "'b'")));
    free(m);
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m,
                bs.l2_off + 7 * 8,
                base_data(&bs, 0, 0) | QCOW2_OFLAG_COPIED);
    log_case(log,
             sizeof log,
             "guest data on the data of 'a'",
             never_loads(m, bs.len, "a", SUBS("guest data", "data cluster")));
    qb_put_be64(m, bs.l2_off + 7 * 8, bs.table[2] | QCOW2_OFLAG_COPIED);
    log_case(log,
             sizeof log,
             "guest data on the table of 'c'",
             never_loads(m, bs.len, "c", SUBS("guest data", "table")));
    free(m);
    /* a compressed guest cluster whose bytes run into a data cluster of
     * 'a' (two sectors starting 512 bytes before it)
     */
    m = dup_buf(bs.buf, bs.len);
    qb_put_be64(m,
                bs.l2_off + 7 * 8,
                QCOW2_OFLAG_COMPRESSED | (1ULL << (62 - (9 - 8))) |
                    (base_data(&bs, 0, 0) - 512));
    log_case(log,
             sizeof log,
             "compressed guest data on the data of 'a'",
             never_loads(m, bs.len, "a", SUBS("guest data")));
    free(m);
    base_free(&bs);
    if (log[0])
        fail_msg("bitmaps on metadata or shared clusters accepted:%s", log);
}

/* The walk of the L2 tables that finds guest data on bitmap clusters
 * skips blocks of unallocated entries and entries outside the span of
 * the bitmaps' clusters: a guest entry at every position around a block
 * boundary (0, 1, 31..33, 63..65, the last), in plain and extended L2
 * tables, pointing at the lowest and at the highest-ending bitmap
 * cluster, is still found, at the right guest offset.
 */
static void
test_guest_overlap_positions(void **state)
{
    static const struct {
        unsigned cluster_bits;
        bool extl2;
    } geo[] = {{9, false}, {16, false}, {16, true}};
    /* UINT64_MAX: the last entry of the table. */
    static const uint64_t pos[] = {0, 1, 31, 32, 33, 63, 64, 65, UINT64_MAX};
    char log[8192] = "";
    size_t g, p, i, j, t;

    (void)state;
    for (g = 0; g < sizeof geo / sizeof geo[0]; g++) {
        struct base bs;
        uint64_t esize = geo[g].extl2 ? 16 : 8;
        uint64_t entries, lo = UINT64_MAX, hi_end = 0;
        size_t lo_owner = 0, hi_owner = 0;

        base_build_l2(&bs, 3, geo[g].cluster_bits, geo[g].extl2);
        entries = bs.cs / esize;
        /* The lowest owned range and the one ending highest. */
        for (i = 0; i < NB_BASE; i++) {
            uint64_t ends[2] = {bs.table[i], bs.table[i] + bs.tsize[i] * 8};

            for (j = 0; j <= bs.tsize[i]; j++) {
                if (j > 0) { /* data cluster j - 1 */
                    ends[0] = base_data(&bs, i, j - 1);
                    if (!ends[0])
                        continue;
                    ends[1] = ends[0] + bs.cs;
                }
                if (ends[0] < lo) {
                    lo = ends[0];
                    lo_owner = i;
                }
                if (ends[1] > hi_end) {
                    hi_end = ends[1];
                    hi_owner = i;
                }
            }
        }
        for (p = 0; p < sizeof pos / sizeof pos[0]; p++) {
            uint64_t idx = pos[p] == UINT64_MAX ? entries - 1 : pos[p];

            if (idx >= entries)
                continue;
            for (t = 0; t < 2; t++) {
                uint64_t host = t ? (hi_end - 1) & ~(bs.cs - 1) : lo;
                const char *owner = base_names[t ? hi_owner : lo_owner];
                unsigned char *m = dup_buf(bs.buf, bs.len);
                char what[160], where[64];

                qb_put_be64(m,
                            bs.l2_off + idx * esize,
                            host | QCOW2_OFLAG_COPIED);
                if (geo[g].extl2) /* subcluster 0 allocated */
                    qb_put_be64(m, bs.l2_off + idx * esize + 8, 1);
                snprintf(where,
                         sizeof where,
                         "guest offset 0x%" PRIx64 ",",
                         idx * bs.cs);
                snprintf(what,
                         sizeof what,
                         "%u-bit clusters%s, L2 entry %" PRIu64
                         ", on the %s cluster of '%s'",
                         geo[g].cluster_bits,
                         geo[g].extl2 ? " (extended L2)" : "",
                         idx,
                         t ? "highest" : "lowest",
                         owner);
                log_case(log,
                         sizeof log,
                         what,
                         never_loads(m,
                                     bs.len,
                                     owner,
                                     SUBS("is also guest data", where)));
                free(m);
            }
        }
        base_free(&bs);
    }
    if (log[0])
        fail_msg("guest data on bitmap clusters accepted:%s", log);
}

/* qcow2_bitmaps_parse_dir() on its own (the fuzzing entry point): when it
 * reports the directory unusable, no bitmap it lists may say OK (header
 * of qcow2-bitmaps.h: "a bad extension or directory makes every bitmap of
 * the layer unusable with the reason recorded").
 */
static void
test_parse_dir_unusable_statuses(void **state)
{
    struct base bs;
    unsigned char *dir;
    char log[4096] = "";
    size_t c;

    base_build(&bs, 3, 9);
    for (c = 0; c < 4; c++) {
        struct qcow2_image *img = open_img(bs.buf, bs.len, "parse_dir");
        struct qcow2_bitmap_list *list = calloc(1, sizeof *list);
        uint64_t size = bs.dir_size;
        uint32_t nb = NB_BASE;
        size_t i;

        dir = dup_buf(bs.buf + bs.dir_off, bs.dir_size);
        switch (c) {
        case 0: /* entry 2 truncated */
            size = 64 + 8;
            break;
        case 1: /* one entry more than claimed */
            nb = 2;
            break;
        case 2: /* entry 1 has a bad type (entries 0 and 2 are fine) */
            dir[32 + 16] = 7;
            break;
        case 3: /* entry 0 and 2 share a table */
            memcpy(dir + 64, dir, 8);
            break;
        }
        assert_non_null(list);
        assert_int_equal(qcow2_bitmaps_parse_dir(img, dir, size, nb, list), 0);
        assert_false(list->usable);
        check_msg(list->reason, "parse_dir", NULL);
        for (i = 0; i < list->nr; i++) {
            char what[32], why[320];

            if (list->bitmaps[i].status != QCOW2_BITMAP_OK)
                continue;
            snprintf(what, sizeof what, "case %zu", c);
            snprintf(why,
                     sizeof why,
                     "bitmap '%s' is OK (%.200s)",
                     list->bitmaps[i].name,
                     list->reason);
            log_case(log, sizeof log, what, why);
        }
        qcow2_bitmap_list_free(list);
        free(dir);
        qcow2_close(img);
    }
    base_free(&bs);
    if (log[0])
        fail_msg("parse_dir left bitmaps OK in unusable directories:%s", log);
}

/* Every mutation of every byte of the directory and extension to a few
 * values: no crash, no read outside the image or directory, messages one
 * line.  (Fixed seed; ASan checks the bounds.)
 */
static void
test_dir_bytes_fuzz(void **state)
{
    static const unsigned char vals[] = {0x00, 0x01, 0x08, 0x7f, 0x80, 0xff};
    struct base bs;
    uint64_t pos;
    size_t v;

    base_build(&bs, 3, 9);
    for (pos = bs.ext_pos; pos < bs.ext_pos + 32; pos++) {
        for (v = 0; v < sizeof vals; v++) {
            unsigned char *m = dup_buf(bs.buf, bs.len);
            struct qcow2_image *img = NULL;
            struct qcbt_io *io;
            struct qcow2_bitmap_list *list;
            size_t i;

            m[pos] = vals[v];
            assert_int_equal(qcbt_io_open_mem(m, bs.len, "f", &io), 0);
            if (qcow2_open(io, &img) == 0) {
                list = load_list(img, "ext fuzz");
                for (i = 0; i < list->nr; i++) {
                    struct bitmap *bm = NULL;

                    if (qcow2_bitmap_load_data(img,
                                               &list->bitmaps[i],
                                               0,
                                               &bm) == 0)
                        bitmap_free(bm);
                    else
                        check_msg(qcbt_error_get(), "ext fuzz", NULL);
                }
                qcow2_bitmap_list_free(list);
                qcow2_close(img);
            }
            free(m);
        }
    }
    for (pos = 0; pos < bs.dir_size; pos++) {
        for (v = 0; v < sizeof vals; v++) {
            unsigned char *m = dup_buf(bs.buf, bs.len);
            unsigned char *dir;
            struct qcow2_image *img;
            struct qcow2_bitmap_list *list;
            size_t i;

            m[bs.dir_off + pos] = vals[v];
            img = open_img(m, bs.len, "dir fuzz");
            list = load_list(img, "dir fuzz");
            for (i = 0; i < list->nr; i++) {
                struct bitmap *bm = NULL;

                if (qcow2_bitmap_load_data(img, &list->bitmaps[i], 0, &bm) ==
                    0) {
                    assert_true(list->usable);
                    bitmap_free(bm);
                }
            }
            qcow2_bitmap_list_free(list);
            /* the same bytes from an exact-size buffer */
            dir = dup_buf(m + bs.dir_off, bs.dir_size);
            list = calloc(1, sizeof *list);
            assert_non_null(list);
            assert_int_equal(
                qcow2_bitmaps_parse_dir(img, dir, bs.dir_size, NB_BASE, list),
                0);
            qcow2_bitmap_list_free(list);
            free(dir);
            qcow2_close(img);
            free(m);
        }
    }
    base_free(&bs);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_base),
        cmocka_unit_test(test_good_qemu_vectors),
        cmocka_unit_test(test_good_all_ones_mixed),
        cmocka_unit_test(test_good_many),
        cmocka_unit_test(test_good_granularities),
        cmocka_unit_test(test_good_names),
        cmocka_unit_test(test_good_flags),
        cmocka_unit_test(test_good_no_bitmaps),
        cmocka_unit_test(test_autoclear_and_version),
        cmocka_unit_test(test_ext_length_reserved),
        cmocka_unit_test(test_nb_bitmaps),
        cmocka_unit_test(test_dir_size_offset),
        cmocka_unit_test(test_dir_trailing_truncated),
        cmocka_unit_test(test_entry_name_extra_sizes),
        cmocka_unit_test(test_entry_names),
        cmocka_unit_test(test_entry_type_flags_granularity),
        cmocka_unit_test(test_table_size),
        cmocka_unit_test(test_table_offset),
        cmocka_unit_test(test_table_entries),
        cmocka_unit_test(test_tables_cross_metadata),
        cmocka_unit_test(test_guest_overlap_positions),
        cmocka_unit_test(test_parse_dir_unusable_statuses),
        cmocka_unit_test(test_dir_bytes_fuzz),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}

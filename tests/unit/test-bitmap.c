/* qcbt: unit tests for common/bitmap (dense bitmaps).
 *
 * Every operation is mirrored on a naive shadow model (one byte per bit,
 * written from the definitions in bitmap.h and qcow2-format.md section
 * 14.4, not from the word-wise code) and every query is compared with it
 * after each step of random operation sequences at fixed seeds, for every
 * granularity 2^9 .. 2^31 and sizes that are not multiples of it.
 *
 * `test-bitmap --bench` runs a micro-benchmark instead (by hand, not a
 * test): OR of two 2^28-bit bitmaps and a full extent walk of a bitmap
 * with every other bit set.
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
#include <time.h>

#include <cmocka.h>

#include "bitmap.h"
#include "error.h"

/* splitmix64: a fixed-seed generator that is the same everywhere. */
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

/* Uniform in [0, n]; n may be UINT64_MAX. */
static uint64_t
rng_upto(uint64_t n)
{
    return n == UINT64_MAX ? rng() : rng() % (n + 1);
}

/* ------------------------------------------------------------------ */
/* The shadow model: one byte per bit, over the whole raw word buffer
 * (nraw = nwords * 64 bits), so that raw tail bits are modelled too.
 */
struct shadow {
    uint64_t size, g, nbits, nraw;
    uint8_t *b;
};

static void
shadow_init(struct shadow *s, uint64_t size, uint64_t g)
{
    uint64_t nwords;

    s->size = size;
    s->g = g;
    s->nbits = size / g + (size % g != 0);
    nwords = s->nbits == 0 ? 1 : (s->nbits + 63) / 64;
    s->nraw = nwords * 64;
    s->b = calloc(s->nraw, 1);
    assert_non_null(s->b);
}

static void
shadow_free(struct shadow *s)
{
    free(s->b);
    s->b = NULL;
}

static void
shadow_fill(struct shadow *s, uint64_t bit, uint64_t n, uint8_t v)
{
    for (uint64_t i = bit; i < bit + n; i++)
        s->b[i] = v;
}

/* Bit j covers [j*g, (j+1)*g): set it if that meets [off, off+len). */
static void
shadow_set_bytes(struct shadow *s, uint64_t off, uint64_t len)
{
    for (uint64_t j = 0; j < s->nbits; j++) {
        uint64_t lo = j * s->g, hi = lo + s->g;
        if (len > 0 && lo < off + len && off < hi)
            s->b[j] = 1;
    }
}

/* Clear bit j if [j*g, min((j+1)*g, size)) lies inside [off, off+len). */
static void
shadow_clear_bytes(struct shadow *s, uint64_t off, uint64_t len)
{
    for (uint64_t j = 0; j < s->nbits; j++) {
        uint64_t lo = j * s->g, hi = lo + s->g;
        if (hi > s->size)
            hi = s->size;
        if (len > 0 && off <= lo && hi <= off + len)
            s->b[j] = 0;
    }
}

/* Bit k of the stream is byte k/8, bit k%8 (LSB first). */
static void
shadow_import(struct shadow *s,
              uint64_t off,
              const uint8_t *buf,
              uint64_t len,
              bool raw)
{
    for (uint64_t p = off; p < off + len && p < s->nraw / 8; p++) {
        for (unsigned t = 0; t < 8; t++) {
            uint64_t k = p * 8 + t;
            uint8_t v = (buf[p - off] >> t) & 1;
            s->b[k] = (k < s->nbits || raw) ? v : 0;
        }
    }
}

static void
shadow_export(const struct shadow *s,
              uint64_t off,
              uint8_t *buf,
              uint64_t len,
              bool raw)
{
    memset(buf, 0, len);
    for (uint64_t p = off; p < off + len; p++) {
        for (unsigned t = 0; t < 8; t++) {
            uint64_t k = p * 8 + t;
            if (k < s->nraw && (k < s->nbits || raw) && s->b[k])
                buf[p - off] |= 1 << t;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Compare every query with the shadow. */

static void
check_invariant(const struct bitmap *bm)
{
    size_t last = bm->nwords - 1;

    for (uint64_t k = bm->nbits; k < (uint64_t)bm->nwords * 64; k++) {
        if ((bm->words[k / 64] >> (k % 64)) & 1)
            fail_msg("bit %" PRIu64 " past nbits %" PRIu64 " is set",
                     k,
                     bm->nbits);
    }
    /* The raw tail holds only bits past nbits of the last word. */
    for (uint64_t k = last * 64; k < bm->nbits; k++) {
        if ((bm->tail >> (k % 64)) & 1)
            fail_msg("tail has bit %" PRIu64 " below nbits %" PRIu64,
                     k,
                     bm->nbits);
    }
}

static void
check_extent_at(const struct bitmap *bm,
                const struct shadow *s,
                uint64_t off,
                uint64_t max_len)
{
    struct bitmap_extent e;
    uint64_t end, b, eb, x;
    uint8_t v;

    assert_int_equal(bitmap_extent(bm, off, max_len, &e), 0);
    end = (max_len > s->size - off) ? s->size : off + max_len;
    b = off / s->g;
    v = s->b[b];
    eb = end / s->g + (end % s->g != 0);
    x = b + 1;
    while (x < eb && s->b[x] == v)
        x++;
    assert_int_equal(e.offset, off);
    assert_int_equal(e.dirty, v);
    assert_int_equal(e.len, (x * s->g < end ? x * s->g : end) - off);
}

static void
check_all(const struct bitmap *bm, const struct shadow *s)
{
    const uint64_t n = s->nbits;
    uint64_t *nd, *nc, total = 0;
    uint8_t *got, *want;
    uint64_t raw = bm->nwords * 8;

    assert_int_equal(bm->nbits, n);
    assert_int_equal(bitmap_raw_size(bm), s->nraw / 8);
    assert_int_equal(bitmap_serialized_size(bm), (n + 7) / 8);
    check_invariant(bm);

    /* test() on every bit and a little past the end. */
    for (uint64_t i = 0; i < n + 70; i++) {
        bool want_bit = i < n && s->b[i];
        if (bitmap_test(bm, i) != want_bit)
            fail_msg("test(%" PRIu64 ") != %d (nbits %" PRIu64 ")",
                     i,
                     want_bit,
                     n);
    }
    assert_false(bitmap_test(bm, UINT64_MAX));

    /* next_dirty / next_clean from every position. */
    nd = malloc((n + 1) * sizeof *nd);
    nc = malloc((n + 1) * sizeof *nc);
    assert_non_null(nd);
    assert_non_null(nc);
    nd[n] = nc[n] = n;
    for (uint64_t i = n; i-- > 0;) {
        nd[i] = s->b[i] ? i : nd[i + 1];
        nc[i] = s->b[i] ? nc[i + 1] : i;
        total += s->b[i];
    }
    for (uint64_t i = 0; i <= n; i++) {
        if (bitmap_next_dirty(bm, i) != nd[i])
            fail_msg("next_dirty(%" PRIu64 ") = %" PRIu64 " != %" PRIu64,
                     i,
                     bitmap_next_dirty(bm, i),
                     nd[i]);
        if (bitmap_next_clean(bm, i) != nc[i])
            fail_msg("next_clean(%" PRIu64 ") = %" PRIu64 " != %" PRIu64,
                     i,
                     bitmap_next_clean(bm, i),
                     nc[i]);
    }
    assert_int_equal(bitmap_next_dirty(bm, n + 1), n);
    assert_int_equal(bitmap_next_clean(bm, n + 100), n);
    assert_int_equal(bitmap_next_dirty(bm, UINT64_MAX), n);
    free(nd);
    free(nc);

    /* Counts. */
    assert_int_equal(bitmap_count(bm), total);
    assert_int_equal(bitmap_count_range(bm, 0, UINT64_MAX), total);
    for (int t = 0; t < 12; t++) {
        uint64_t a = rng_upto(n), len = rng_upto(n - a), c = 0;
        if (t == 0)
            len = UINT64_MAX - a; /* clipped */
        for (uint64_t i = a; i < n && i - a < len; i++)
            c += s->b[i];
        if (bitmap_count_range(bm, a, len) != c)
            fail_msg("count_range(%" PRIu64 ", %" PRIu64 ") = %" PRIu64
                     " != %" PRIu64,
                     a,
                     len,
                     bitmap_count_range(bm, a, len),
                     c);
    }
    assert_int_equal(bitmap_count_range(bm, n + 5, 10), 0);

    /* Serialized form, whole and in pieces, masked and raw, with
     * zero padding past the end.
     */
    got = malloc(raw + 65);
    want = malloc(raw + 65);
    assert_non_null(got);
    assert_non_null(want);
    for (unsigned flags = 0; flags <= BITMAP_RAW; flags++) {
        memset(got, 0xa5, raw + 64);
        assert_int_equal(bitmap_export(bm, 0, got, raw + 64, flags), 0);
        shadow_export(s, 0, want, raw + 64, flags);
        assert_memory_equal(got, want, raw + 64);
        for (int t = 0; t < 4; t++) {
            uint64_t a = rng_upto(raw + 8), len = rng_upto(raw + 64 - a);
            if (a > raw + 64)
                a = raw + 64;
            memset(got, 0xa5, raw + 65);
            assert_int_equal(bitmap_export(bm, a, got, len, flags), 0);
            shadow_export(s, a, want, len, flags);
            if (len > 0)
                assert_memory_equal(got, want, len);
            assert_int_equal(got[len], 0xa5); /* no overrun */
        }
    }
    free(got);
    free(want);

    /* Extents: a full walk, then random starts and bounds. */
    if (s->size > 0) {
        uint64_t off = 0, prev_end = 0;
        int prev_dirty = -1;
        while (off < s->size) {
            struct bitmap_extent e;
            assert_int_equal(bitmap_extent(bm, off, UINT64_MAX, &e), 0);
            assert_int_equal(e.offset, prev_end);
            assert_true(e.len > 0);
            assert_true(e.dirty != prev_dirty); /* maximal runs */
            check_extent_at(bm, s, off, UINT64_MAX);
            prev_dirty = e.dirty;
            off += e.len;
            prev_end = off;
        }
        assert_int_equal(off, s->size);
        for (int t = 0; t < 16; t++) {
            uint64_t o = rng_upto(s->size - 1);
            uint64_t ml = 1 + rng_upto(s->size - o + 100);
            if (t % 4 == 0)
                ml = UINT64_MAX - rng_upto(5);
            if (t % 4 == 1)
                o = (o / s->g) * s->g; /* on a bit boundary */
            check_extent_at(bm, s, o, ml);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Random operation sequences. */

/* A random bit range within [0, n]: small, arbitrary, to the end, full. */
static void
random_range(uint64_t n, uint64_t *bit, uint64_t *len)
{
    switch (rng() % 6) {
    case 0:
    case 1:
        *bit = rng_upto(n);
        *len = rng_upto(n - *bit < 130 ? n - *bit : 130);
        break;
    case 2:
        *bit = rng_upto(n);
        *len = rng_upto(n - *bit);
        break;
    case 3: /* around a word boundary */
        *bit = (rng_upto(n / 64) * 64) + rng_upto(3) - 2;
        if (*bit > n)
            *bit = n;
        *len = rng_upto(n - *bit < 70 ? n - *bit : 70);
        break;
    case 4:
        *bit = rng_upto(n);
        *len = n - *bit;
        break;
    default:
        *bit = 0;
        *len = n;
        break;
    }
}

/* A random byte position in [0, size], often near a bit boundary. */
static uint64_t
random_offset(const struct shadow *s)
{
    uint64_t o;

    switch (rng() % 4) {
    case 0:
        o = rng_upto(s->size);
        break;
    default: {
        uint64_t j = rng_upto(s->nbits);
        uint64_t d = rng() % 3 == 0 ? rng_upto(s->g - 1) : 0;
        o = j * s->g + d;
        if (rng() % 2 && o > 0)
            o--;
        else if (rng() % 2)
            o++;
        break;
    }
    }
    return o > s->size ? s->size : o;
}

/* Random stream bytes with a random density. */
static void
random_bytes(uint8_t *buf, uint64_t len)
{
    unsigned kind = rng() % 5;

    for (uint64_t i = 0; i < len; i++) {
        switch (kind) {
        case 0:
            buf[i] = rng();
            break;
        case 1:
            buf[i] = 0xff;
            break;
        case 2:
            buf[i] = 0;
            break;
        case 3:
            buf[i] = rng() % 16 == 0 ? 1u << (rng() % 8) : 0;
            break;
        default:
            buf[i] = rng() % 16 == 0 ? 0 : 0xff;
            break;
        }
    }
}

/* A bitmap of the same shape with random content, and its shadow. */
static void
random_other(uint64_t size, uint64_t g, struct bitmap **out, struct shadow *s)
{
    uint64_t raw;
    uint8_t *buf;

    assert_int_equal(bitmap_new(size, g, out), 0);
    shadow_init(s, size, g);
    raw = s->nraw / 8;
    buf = malloc(raw);
    assert_non_null(buf);
    random_bytes(buf, raw);
    assert_int_equal(bitmap_import(*out, 0, buf, raw, 0), 0);
    shadow_import(s, 0, buf, raw, false);
    free(buf);
}

static void
random_op(struct bitmap *bm, struct shadow *s)
{
    uint64_t bit, len, off, raw = s->nraw / 8;

    switch (rng() % 12) {
    case 0:
    case 1:
        random_range(s->nbits, &bit, &len);
        assert_int_equal(bitmap_set(bm, bit, len), 0);
        shadow_fill(s, bit, len, 1);
        break;
    case 2:
    case 3:
        random_range(s->nbits, &bit, &len);
        assert_int_equal(bitmap_clear(bm, bit, len), 0);
        shadow_fill(s, bit, len, 0);
        break;
    case 4: {
        uint64_t a = random_offset(s), b = random_offset(s);
        if (a > b) {
            uint64_t t = a;
            a = b;
            b = t;
        }
        assert_int_equal(bitmap_set_bytes(bm, a, b - a), 0);
        shadow_set_bytes(s, a, b - a);
        break;
    }
    case 5: {
        uint64_t a = random_offset(s), b = random_offset(s);
        if (a > b) {
            uint64_t t = a;
            a = b;
            b = t;
        }
        if (rng() % 4 == 0)
            b = s->size;
        assert_int_equal(bitmap_clear_bytes(bm, a, b - a), 0);
        shadow_clear_bytes(s, a, b - a);
        break;
    }
    case 6: { /* import a piece of the stream, maybe past the end */
        bool raw_flag = rng() % 2;
        uint8_t *buf;
        off = rng() % 3 == 0 ? rng_upto(raw / 8) * 8 : rng_upto(raw);
        len = rng_upto(raw + 16 - off);
        buf = malloc(len + 1);
        assert_non_null(buf);
        random_bytes(buf, len);
        assert_int_equal(
            bitmap_import(bm, off, buf, len, raw_flag ? BITMAP_RAW : 0),
            0);
        shadow_import(s, off, buf, len, raw_flag);
        free(buf);
        break;
    }
    case 7: { /* fill, e.g. an all-ones table entry */
        bool raw_flag = rng() % 2, ones = rng() % 2;
        uint8_t *buf;
        off = rng() % 2 ? rng_upto(raw / 8) * 8 : rng_upto(raw);
        len = rng_upto(raw + 4096 - off);
        assert_int_equal(
            bitmap_import_fill(bm, off, len, ones, raw_flag ? BITMAP_RAW : 0),
            0);
        buf = malloc(len + 1);
        assert_non_null(buf);
        memset(buf, ones ? 0xff : 0, len);
        shadow_import(s, off, buf, len, raw_flag);
        free(buf);
        break;
    }
    case 8:
    case 9:
    case 10: { /* or / and-not / merge_into with a same-shape bitmap */
        struct bitmap *o;
        struct shadow os;
        unsigned kind = rng() % 3;
        random_other(s->size, s->g, &o, &os);
        if (kind == 0)
            assert_int_equal(bitmap_or(bm, o), 0);
        else if (kind == 1)
            assert_int_equal(bitmap_andnot(bm, o), 0);
        else
            assert_int_equal(bitmap_merge_into(bm, o), 0);
        for (uint64_t i = 0; i < s->nbits; i++) {
            if (kind == 1)
                s->b[i] &= !os.b[i];
            else
                s->b[i] |= os.b[i];
        }
        bitmap_free(o);
        shadow_free(&os);
        break;
    }
    default: /* or with itself: no change; and-not with itself: empty */
        if (rng() % 2) {
            assert_int_equal(bitmap_or(bm, bm), 0);
            assert_int_equal(bitmap_merge_into(bm, bm), 0);
        } else {
            assert_int_equal(bitmap_andnot(bm, bm), 0);
            for (uint64_t i = 0; i < s->nbits; i++)
                s->b[i] = 0;
        }
        break;
    }
}

static void
run_random(uint64_t size, unsigned gbits, unsigned nops, uint64_t seed)
{
    struct bitmap *bm;
    struct shadow s;
    uint64_t g = UINT64_C(1) << gbits;

    rng_seed(seed);
    assert_int_equal(bitmap_new(size, g, &bm), 0);
    assert_int_equal(bm->size, size);
    assert_int_equal(bm->granularity, g);
    assert_int_equal(bm->gran_bits, gbits);
    shadow_init(&s, size, g);
    check_all(bm, &s);
    for (unsigned i = 0; i < nops; i++) {
        random_op(bm, &s);
        check_all(bm, &s);
    }
    bitmap_free(bm);
    shadow_free(&s);
}

/* Every granularity exponent, sizes not multiples of the granularity
 * (plus one that is): one partial bit, about one word, a few words, and
 * a random larger size.
 */
static void
test_random_all_granularities(void **state)
{
    for (unsigned gbits = BITMAP_MIN_GRANULARITY_BITS;
         gbits <= BITMAP_MAX_GRANULARITY_BITS;
         gbits++) {
        uint64_t g = UINT64_C(1) << gbits;
        uint64_t nbits_list[] = {1, 2, 63, 64, 65, 128, 129, 0, 0, 0, 0};

        rng_seed(0x5eed0000 + gbits);
        for (size_t t = 0; t < sizeof nbits_list / sizeof *nbits_list; t++) {
            uint64_t nb = nbits_list[t];
            uint64_t size;
            if (nb == 0) /* random: a few words, then many */
                nb = t % 2 ? 200 + rng_upto(800) : 1000 + rng_upto(4000);
            /* (nb-1) whole bits and a partial one of 1 .. g-1 bytes. */
            size = (nb - 1) * g + 1 + rng_upto(g - 2);
            run_random(size, gbits, nb < 200 ? 200 : 100, gbits * 1000 + t);
        }
        /* An exact multiple of the granularity. */
        run_random(130 * g, gbits, 30, gbits * 1000 + 99);
    }
}

/* ------------------------------------------------------------------ */
/* Granularity conversion against a naive model. */

static void
check_merge(uint64_t ssize, unsigned sgb, uint64_t dsize, unsigned dgb)
{
    struct bitmap *src, *dst;
    struct shadow ss, ds;
    uint64_t gs = UINT64_C(1) << sgb, gd = UINT64_C(1) << dgb;
    uint64_t common = ssize < dsize ? ssize : dsize;
    uint8_t *want, *got;
    uint64_t raw;

    random_other(ssize, gs, &src, &ss);
    /* A sparse destination: bits already set must stay set. */
    assert_int_equal(bitmap_new(dsize, gd, &dst), 0);
    shadow_init(&ds, dsize, gd);
    for (uint64_t j = 0; j < ds.nbits; j++) {
        if (rng() % 50 == 0) {
            assert_int_equal(bitmap_set(dst, j, 1), 0);
            ds.b[j] = 1;
        }
    }
    assert_int_equal(bitmap_merge_into(dst, src), 0);

    /* Dst bit j covers [j*gd, min((j+1)*gd, common)); src bit k covers
     * [k*gs, (k+1)*gs): set j if any set k overlaps.
     */
    for (uint64_t j = 0; j < ds.nbits; j++) {
        uint64_t lo = j * gd, hi = lo + gd;
        if (hi > common)
            hi = common;
        if (lo >= hi)
            continue;
        for (uint64_t k = lo / gs; k * gs < hi && k < ss.nbits; k++) {
            if (ss.b[k]) {
                ds.b[j] = 1;
                break;
            }
        }
    }
    /* Compare through the serialized form and the invariant. */
    check_invariant(dst);
    raw = ds.nraw / 8;
    got = malloc(raw);
    want = malloc(raw);
    assert_non_null(got);
    assert_non_null(want);
    assert_int_equal(bitmap_export(dst, 0, got, raw, 0), 0);
    shadow_export(&ds, 0, want, raw, false);
    if (memcmp(got, want, raw) != 0) {
        for (uint64_t j = 0; j < ds.nbits; j++) {
            if (bitmap_test(dst, j) != ds.b[j])
                fail_msg("merge src size %" PRIu64 " gran 2^%u into dst size "
                         "%" PRIu64 " gran 2^%u: bit %" PRIu64 " is %d",
                         ssize,
                         sgb,
                         dsize,
                         dgb,
                         j,
                         bitmap_test(dst, j));
        }
        fail_msg("merge: serialized forms differ");
    }
    free(got);
    free(want);
    bitmap_free(src);
    bitmap_free(dst);
    shadow_free(&ss);
    shadow_free(&ds);
}

static void
test_merge_granularities(void **state)
{
    rng_seed(0xc0ffee);
    for (unsigned sgb = 9; sgb <= 31; sgb++) {
        for (unsigned dgb = 9; dgb <= 31; dgb++) {
            unsigned m = sgb < dgb ? sgb : dgb;
            for (int t = 0; t < 6; t++) {
                /* Up to ~3000 bits at the finer granularity. */
                uint64_t ssize = 1 + rng_upto((UINT64_C(3000) << m) - 1);
                uint64_t dsize = ssize;
                if (t % 3 == 1)
                    dsize = 1 + rng_upto((UINT64_C(3000) << m) - 1);
                else if (t % 3 == 2)
                    ssize = ssize / 2 + 1;
                check_merge(ssize, sgb, dsize, dgb);
            }
        }
    }
}

/* Many words on both sides, for every ratio 2^1 .. 2^8 both ways. */
static void
test_merge_large(void **state)
{
    rng_seed(0xbadcafe);
    for (unsigned k = 1; k <= 8; k++) {
        for (int t = 0; t < 2; t++) {
            unsigned fine = 9 + rng_upto(12), coarse = fine + k;
            uint64_t size = (UINT64_C(150000) << fine) + rng_upto(1 << fine);
            uint64_t other = size - rng_upto(size / 4);
            check_merge(size, fine, t ? other : size, coarse);
            check_merge(size, coarse, t ? other : size, fine);
        }
    }
}

/* Hand-checked conversions (qcow2-format.md 14.8: a 1 MiB bit sets 256
 * bits of a 4 KiB target).
 */
static void
test_merge_examples(void **state)
{
    struct bitmap *coarse, *fine;
    const uint64_t size = 64 << 20;

    assert_int_equal(bitmap_new(size, 1 << 20, &coarse), 0);
    assert_int_equal(bitmap_new(size, 4096, &fine), 0);
    assert_int_equal(bitmap_set(coarse, 3, 1), 0);
    assert_int_equal(bitmap_merge_into(fine, coarse), 0);
    assert_int_equal(bitmap_count(fine), 256);
    assert_int_equal(bitmap_next_dirty(fine, 0), 3 * 256);
    assert_int_equal(bitmap_next_clean(fine, 3 * 256), 4 * 256);

    /* Back: one fine bit sets the coarse bit covering it. */
    assert_int_equal(bitmap_clear(coarse, 0, coarse->nbits), 0);
    assert_int_equal(bitmap_clear(fine, 0, fine->nbits), 0);
    assert_int_equal(bitmap_set(fine, 256 * 7 + 255, 1), 0);
    assert_int_equal(bitmap_merge_into(coarse, fine), 0);
    assert_int_equal(bitmap_count(coarse), 1);
    assert_true(bitmap_test(coarse, 7));
    bitmap_free(coarse);
    bitmap_free(fine);

    /* Partial last bit: a 1000-byte disk, 64 KiB bit -> 512 B bits. */
    assert_int_equal(bitmap_new(1000, 65536, &coarse), 0);
    assert_int_equal(bitmap_new(1000, 512, &fine), 0);
    assert_int_equal(bitmap_set(coarse, 0, 1), 0);
    assert_int_equal(bitmap_merge_into(fine, coarse), 0);
    assert_int_equal(fine->nbits, 2);
    assert_int_equal(bitmap_count(fine), 2);
    assert_int_equal(fine->words[0], 3);
    bitmap_free(coarse);
    bitmap_free(fine);

    /* Different sizes: bytes only one disk has mark nothing. */
    assert_int_equal(bitmap_new(10 * 4096, 4096, &fine), 0);
    assert_int_equal(bitmap_new(4 * 4096 + 1, 4096, &coarse), 0);
    assert_int_equal(bitmap_set(fine, 0, 10), 0);
    assert_int_equal(bitmap_merge_into(coarse, fine), 0);
    assert_int_equal(bitmap_count(coarse), 5);
    assert_int_equal(bitmap_clear(fine, 0, 10), 0);
    assert_int_equal(bitmap_merge_into(fine, coarse), 0);
    assert_int_equal(bitmap_count(fine), 5);
    bitmap_free(coarse);
    bitmap_free(fine);
}

/* ------------------------------------------------------------------ */
/* Edge cases. */

static void
test_empty(void **state)
{
    struct bitmap *bm;
    struct bitmap_extent e;
    uint8_t buf[16];

    /* Size 0 is allowed: 0 bits, one (zero) word for the digest. */
    assert_int_equal(bitmap_new(0, 65536, &bm), 0);
    assert_int_equal(bm->nbits, 0);
    assert_int_equal(bm->nwords, 1);
    assert_int_equal(bitmap_serialized_size(bm), 0);
    assert_int_equal(bitmap_raw_size(bm), 8);
    assert_int_equal(bitmap_next_dirty(bm, 0), 0);
    assert_int_equal(bitmap_next_clean(bm, 0), 0);
    assert_int_equal(bitmap_count(bm), 0);
    assert_false(bitmap_test(bm, 0));
    assert_int_equal(bitmap_set(bm, 0, 0), 0);
    assert_int_equal(bitmap_clear(bm, 0, 0), 0);
    assert_int_equal(bitmap_set_bytes(bm, 0, 0), 0);
    assert_int_equal(bitmap_set(bm, 0, 1), -EINVAL);
    assert_int_equal(bitmap_set_bytes(bm, 0, 1), -EINVAL);
    assert_int_equal(bitmap_extent(bm, 0, 1, &e), -EINVAL);
    /* All-ones "cluster", raw: the whole word is the tail. */
    assert_int_equal(bitmap_import_fill(bm, 0, 65536, true, BITMAP_RAW), 0);
    assert_int_equal(bm->words[0], 0);
    assert_int_equal(bm->tail, UINT64_MAX);
    assert_int_equal(bitmap_count(bm), 0);
    assert_int_equal(bitmap_export(bm, 0, buf, 16, BITMAP_RAW), 0);
    for (int i = 0; i < 16; i++)
        assert_int_equal(buf[i], i < 8 ? 0xff : 0);
    assert_int_equal(bitmap_export(bm, 0, buf, 16, 0), 0);
    for (int i = 0; i < 16; i++)
        assert_int_equal(buf[i], 0);
    bitmap_free(bm);
    bitmap_free(NULL);
}

static void
test_small_and_partial(void **state)
{
    struct bitmap *bm;
    struct bitmap_extent e;

    /* size < granularity: one partial bit. */
    assert_int_equal(bitmap_new(1000, 65536, &bm), 0);
    assert_int_equal(bm->nbits, 1);
    assert_int_equal(bitmap_set_bytes(bm, 999, 1), 0);
    assert_true(bitmap_test(bm, 0));
    assert_int_equal(bitmap_extent(bm, 10, UINT64_MAX, &e), 0);
    assert_int_equal(e.offset, 10);
    assert_int_equal(e.len, 990);
    assert_true(e.dirty);
    assert_int_equal(bitmap_extent(bm, 10, 5, &e), 0);
    assert_int_equal(e.len, 5);
    assert_int_equal(bitmap_set_bytes(bm, 999, 2), -EINVAL);
    assert_int_equal(bitmap_extent(bm, 1000, 1, &e), -EINVAL);
    assert_int_equal(bitmap_extent(bm, 0, 0, &e), -EINVAL);
    /* Clearing needs the whole bit, which ends at the disk's end. */
    assert_int_equal(bitmap_clear_bytes(bm, 1, 999), 0);
    assert_true(bitmap_test(bm, 0));
    assert_int_equal(bitmap_clear_bytes(bm, 0, 999), 0);
    assert_true(bitmap_test(bm, 0));
    assert_int_equal(bitmap_clear_bytes(bm, 0, 1000), 0);
    assert_false(bitmap_test(bm, 0));
    bitmap_free(bm);

    /* Last partial word and word-crossing ranges. */
    assert_int_equal(bitmap_new(100 * 512 - 7, 512, &bm), 0);
    assert_int_equal(bm->nbits, 100);
    assert_int_equal(bm->nwords, 2);
    assert_int_equal(bitmap_set(bm, 60, 10), 0);
    assert_int_equal(bm->words[0], UINT64_C(0xf) << 60);
    assert_int_equal(bm->words[1], 0x3f);
    assert_int_equal(bitmap_next_dirty(bm, 0), 60);
    assert_int_equal(bitmap_next_clean(bm, 60), 70);
    assert_int_equal(bitmap_count_range(bm, 62, 5), 5);
    assert_int_equal(bitmap_set(bm, 0, 100), 0);
    assert_int_equal(bm->words[0], UINT64_MAX);
    assert_int_equal(bm->words[1], (UINT64_C(1) << 36) - 1);
    assert_int_equal(bitmap_count(bm), 100);
    assert_int_equal(bitmap_next_clean(bm, 0), 100);
    assert_int_equal(bitmap_set(bm, 0, 101), -EINVAL);
    assert_int_equal(bitmap_set(bm, 100, 1), -EINVAL);
    assert_int_equal(bitmap_set(bm, 1, UINT64_MAX), -EINVAL);
    assert_int_equal(bitmap_clear(bm, UINT64_MAX, 2), -EINVAL);
    assert_int_equal(bitmap_clear(bm, 0, 100), 0);
    assert_int_equal(bitmap_count(bm), 0);
    assert_int_equal(bitmap_next_dirty(bm, 0), 100);
    bitmap_free(bm);

    /* Full range on a whole number of words. */
    assert_int_equal(bitmap_new(256 * 4096, 4096, &bm), 0);
    assert_int_equal(bitmap_set(bm, 0, 256), 0);
    assert_int_equal(bitmap_count(bm), 256);
    assert_int_equal(bitmap_extent(bm, 0, UINT64_MAX, &e), 0);
    assert_int_equal(e.len, 256 * 4096);
    assert_true(e.dirty);
    assert_int_equal(bitmap_clear_bytes(bm, 4095, 4098), 0);
    assert_int_equal(bitmap_count(bm), 255);
    assert_false(bitmap_test(bm, 1));
    bitmap_free(bm);
}

/* qcow2-format.md 14.4 example: 64 MiB disk, 64 KiB granularity, writes
 * at 0 (4K), 1 MiB (64K), 10 MiB (130K), 64M-64K (512 B).
 */
static void
test_layout_example(void **state)
{
    struct bitmap *bm;
    uint8_t buf[128];

    assert_int_equal(bitmap_new(64 << 20, 65536, &bm), 0);
    assert_int_equal(bitmap_set_bytes(bm, 0, 4096), 0);
    assert_int_equal(bitmap_set_bytes(bm, 1 << 20, 65536), 0);
    assert_int_equal(bitmap_set_bytes(bm, 10 << 20, 130 << 10), 0);
    assert_int_equal(bitmap_set_bytes(bm, (64 << 20) - 65536, 512), 0);
    assert_int_equal(bitmap_serialized_size(bm), 128);
    assert_int_equal(bitmap_export(bm, 0, buf, 128, 0), 0);
    for (int i = 0; i < 128; i++) {
        uint8_t want = i == 0     ? 0x01
                       : i == 2   ? 0x01
                       : i == 20  ? 0x07
                       : i == 127 ? 0x80
                                  : 0;
        assert_int_equal(buf[i], want);
    }
    bitmap_free(bm);
}

/* A small SHA-256 (FIPS 180-4), only to check the raw export against
 * QEMU's verified x-debug-block-dirty-bitmap-sha256 vectors (14.9).
 */
static const uint32_t sha_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
    0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
    0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static uint32_t
ror32(uint32_t x, unsigned n)
{
    return (x >> n) | (x << (32 - n));
}

static void
sha256_block(uint32_t h[8], const uint8_t *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, hh;

    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 =
            ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 =
            ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0], b = h[1], c = h[2], d = h[3];
    e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = hh + (ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25)) +
                      ((e & f) ^ (~e & g)) + sha_k[i] + w[i];
        uint32_t t2 = (ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22)) +
                      ((a & b) ^ (a & c) ^ (b & c));
        hh = g, g = f, f = e, e = d + t1;
        d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d;
    h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
}

/* Hex digest of LEN (< 4096) bytes. */
static void
sha256_hex(const uint8_t *data, size_t len, char out[65])
{
    uint32_t h[8] = {0x6a09e667,
                     0xbb67ae85,
                     0x3c6ef372,
                     0xa54ff53a,
                     0x510e527f,
                     0x9b05688c,
                     0x1f83d9ab,
                     0x5be0cd19};
    uint8_t buf[4096 + 128] = {0};
    size_t n = (len + 9 + 63) / 64 * 64;
    uint64_t bits = (uint64_t)len * 8;

    assert_true(len < 4096);
    memcpy(buf, data, len);
    buf[len] = 0x80;
    for (int i = 0; i < 8; i++)
        buf[n - 1 - i] = bits >> (8 * i);
    for (size_t off = 0; off < n; off += 64)
        sha256_block(h, buf + off);
    for (int i = 0; i < 8; i++)
        snprintf(out + 8 * i, 9, "%08x", h[i]);
}

static void
check_digest(const struct bitmap *bm, const char *want)
{
    uint8_t buf[4096];
    char hex[65];
    uint64_t n = bitmap_raw_size(bm);

    assert_true(n <= sizeof buf);
    assert_int_equal(bitmap_export(bm, 0, buf, n, BITMAP_RAW), 0);
    sha256_hex(buf, n, hex);
    assert_string_equal(hex, want);
}

static void
test_qemu_digest(void **state)
{
    struct bitmap *bm;
    uint8_t cluster[65536];

    /* SHA-256 sanity: "abc". */
    {
        char hex[65];
        sha256_hex((const uint8_t *)"abc", 3, hex);
        assert_string_equal(hex,
                            "ba7816bf8f01cfea414140de5dae2223b00361a3"
                            "96177a9cb410ff61f20015ad");
    }

    assert_int_equal(bitmap_new(64 << 20, 65536, &bm), 0);
    check_digest(bm,
                 "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e9"
                 "35fd5ca");
    assert_int_equal(bitmap_set(bm, 0, 1), 0);
    assert_int_equal(bitmap_set(bm, 16, 1), 0);
    check_digest(bm,
                 "74405e30c41046a1543d86ede797bcb511244cbfddac8afd9b47724"
                 "73f8fe968");
    /* Loaded from a data cluster, as the loader will. */
    memset(cluster, 0, sizeof cluster);
    cluster[0] = 0x01;
    cluster[2] = 0x01;
    assert_int_equal(bitmap_import_fill(bm, 0, 65536, false, 0), 0);
    assert_int_equal(bitmap_import(bm, 0, cluster, sizeof cluster, 0), 0);
    assert_int_equal(bitmap_count(bm), 2);
    check_digest(bm,
                 "74405e30c41046a1543d86ede797bcb511244cbfddac8afd9b47724"
                 "73f8fe968");
    assert_int_equal(bitmap_import_fill(bm, 0, 65536, true, BITMAP_RAW), 0);
    assert_int_equal(bitmap_count(bm), 1024);
    check_digest(bm,
                 "e9175db65a9789096ca9cb5524d3abc2107df03e3c9ba3af1aca628f9"
                 "c5d3bd2");
    bitmap_free(bm);

    /* 13 bits, all-ones entry: QEMU hashes the 51 garbage tail bits. */
    assert_int_equal(bitmap_new(13 * 65536, 65536, &bm), 0);
    assert_int_equal(bitmap_import_fill(bm, 0, 65536, true, BITMAP_RAW), 0);
    assert_int_equal(bitmap_count(bm), 13);
    assert_int_equal(bm->words[0], 0x1fff);
    check_digest(bm,
                 "12a3ae445661ce5dee78d0650d33362dec29c4f82af05e7e57fb595bb"
                 "bacf0ca");
    /* Operations never touch the tail; a masked import drops it. */
    assert_int_equal(bitmap_clear(bm, 0, 13), 0);
    assert_int_equal(bm->tail, ~UINT64_C(0x1fff));
    memset(cluster, 0xff, 8);
    assert_int_equal(bitmap_import(bm, 0, cluster, 8, 0), 0);
    assert_int_equal(bm->tail, 0);
    assert_int_equal(bm->words[0], 0x1fff);
    bitmap_free(bm);
}

/* ------------------------------------------------------------------ */
/* Errors. */

/* bitmap_dirty_bytes(): set bits times the granularity, the last bit
 * clipped to the disk.
 */
static void
test_dirty_bytes(void **state)
{
    struct bitmap *bm;

    (void)state;
    assert_int_equal(bitmap_new(100000, 65536, &bm), 0);
    assert_int_equal(bitmap_dirty_bytes(bm), 0);
    assert_int_equal(bitmap_set(bm, 1, 1), 0);
    assert_int_equal(bitmap_dirty_bytes(bm), 100000 - 65536);
    assert_int_equal(bitmap_set(bm, 0, 1), 0);
    assert_int_equal(bitmap_dirty_bytes(bm), 100000);
    bitmap_free(bm);
    assert_int_equal(bitmap_new(131072, 65536, &bm), 0);
    assert_int_equal(bitmap_set(bm, 0, 2), 0);
    assert_int_equal(bitmap_dirty_bytes(bm), 131072);
    bitmap_free(bm);
}

static void
test_errors(void **state)
{
    struct bitmap *bm = (struct bitmap *)1, *other;
    uint8_t buf[8];
    static const uint64_t bad[] =
        {0, 1, 256, 3000, 511, 1536, UINT64_C(1) << 32, UINT64_MAX};

    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        qcbt_error_clear();
        assert_int_equal(bitmap_new(1 << 20, bad[i], &bm), -EINVAL);
        assert_null(bm);
        assert_int_equal(qcbt_error_errno(), EINVAL);
        assert_non_null(strstr(qcbt_error_get(), "granularity"));
    }
    /* The limits themselves are fine. */
    assert_int_equal(bitmap_new(1 << 20, 512, &bm), 0);
    bitmap_free(bm);
    assert_int_equal(bitmap_new(1 << 20, UINT64_C(1) << 31, &bm), 0);
    assert_int_equal(bm->nbits, 1);
    bitmap_free(bm);

    /* Huge sizes: one bit past BITMAP_MAX_BITS, and the largest size. */
    qcbt_error_clear();
    assert_int_equal(bitmap_new(BITMAP_MAX_BITS * 512 + 1, 512, &bm), -EFBIG);
    assert_null(bm);
    assert_non_null(strstr(qcbt_error_get(), "limit"));
    assert_int_equal(bitmap_new(UINT64_MAX, 512, &bm), -EFBIG);
    assert_int_equal(bitmap_new(UINT64_MAX, UINT64_C(1) << 31, &bm), -EFBIG);
    /* 16 TiB at 64 KiB: 2^28 bits, 32 MiB. */
    assert_int_equal(bitmap_new(UINT64_C(16) << 40, 65536, &bm), 0);
    assert_int_equal(bm->nbits, UINT64_C(1) << 28);
    assert_int_equal(bitmap_raw_size(bm), 32 << 20);

    /* Shape mismatches. */
    assert_int_equal(bitmap_new(UINT64_C(16) << 40, 4096, &other), 0);
    assert_int_equal(bitmap_or(bm, other), -EINVAL);
    assert_int_equal(bitmap_andnot(bm, other), -EINVAL);
    bitmap_free(other);
    assert_int_equal(bitmap_new((UINT64_C(16) << 40) - 1, 65536, &other), 0);
    assert_int_equal(bitmap_or(bm, other), -EINVAL);
    assert_non_null(strstr(qcbt_error_get(), "shapes differ"));
    bitmap_free(other);

    /* Ranges. */
    assert_int_equal(bitmap_set_bytes(bm, UINT64_MAX, 2), -EINVAL);
    assert_int_equal(bitmap_clear_bytes(bm, UINT64_C(16) << 40, 1), -EINVAL);
    assert_int_equal(bitmap_import(bm, (32 << 20) + 1, buf, 1, 0), -EINVAL);
    assert_int_equal(bitmap_import(bm, 8, buf, UINT64_MAX, 0), -EINVAL);
    assert_int_equal(bitmap_import(bm, 0, NULL, 8, 0), -EINVAL);
    assert_int_equal(bitmap_import(bm, 0, buf, 8, 0x80), -EINVAL);
    assert_int_equal(bitmap_import_fill(bm, UINT64_MAX, 2, true, 0), -EINVAL);
    assert_int_equal(bitmap_export(bm, UINT64_MAX, buf, 2, 0), -EINVAL);
    assert_int_equal(bitmap_export(bm, 0, buf, 8, 2), -EINVAL);
    /* Exporting past the end is zero padding, not an error. */
    memset(buf, 0xaa, sizeof buf);
    assert_int_equal(bitmap_export(bm, UINT64_C(1) << 40, buf, 8, 0), 0);
    for (int i = 0; i < 8; i++)
        assert_int_equal(buf[i], 0);
    assert_int_equal(bitmap_count(bm), 0);
    bitmap_free(bm);
}

/* ------------------------------------------------------------------ */
/* Micro-benchmark (by hand: test-bitmap --bench). */

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int
bench(void)
{
    const uint64_t size = UINT64_C(16) << 40, g = 65536;
    struct bitmap *a, *b, *c;
    uint64_t runs = 0, dirty = 0, sum = 0;
    double t0, t;
    const int reps = 10;

    if (bitmap_new(size, g, &a) < 0 || bitmap_new(size, g, &b) < 0 ||
        bitmap_new(size, 1 << 20, &c) < 0) {
        fprintf(stderr, "%s\n", qcbt_error_get());
        return 1;
    }
    rng_seed(1);
    for (size_t i = 0; i < a->nwords; i++) {
        a->words[i] = rng() & rng();
        b->words[i] = rng() & rng() & rng();
    }
    printf("bitmaps: %" PRIu64 " bits (%" PRIu64 " MiB) each\n",
           a->nbits,
           bitmap_raw_size(a) >> 20);

    bitmap_or(a, b); /* warm up */
    t0 = now();
    for (int i = 0; i < reps; i++)
        bitmap_or(a, b);
    t = (now() - t0) / reps;
    printf("bitmap_or:                 %8.2f ms  (%.1f GB/s of dst)\n",
           t * 1e3,
           bitmap_raw_size(a) / t / 1e9);

    t0 = now();
    for (int i = 0; i < reps; i++)
        bitmap_merge_into(a, b);
    t = (now() - t0) / reps;
    printf("bitmap_merge_into (same):  %8.2f ms\n", t * 1e3);

    t0 = now();
    bitmap_merge_into(c, a);
    printf("merge 64K -> 1M gran:      %8.2f ms\n", (now() - t0) * 1e3);
    t0 = now();
    bitmap_merge_into(b, c);
    printf("merge 1M -> 64K gran:      %8.2f ms\n", (now() - t0) * 1e3);

    t0 = now();
    sum = bitmap_count(a);
    printf("bitmap_count:              %8.2f ms  (%" PRIu64 " set)\n",
           (now() - t0) * 1e3,
           sum);

    /* Every other bit set: 2^28 runs of one bit each. */
    bitmap_import_fill(a, 0, bitmap_raw_size(a), false, 0);
    for (size_t i = 0; i < a->nwords; i++)
        a->words[i] = UINT64_C(0x5555555555555555);
    t0 = now();
    for (uint64_t o = 0; o < size;) {
        struct bitmap_extent e;
        bitmap_extent(a, o, UINT64_MAX, &e);
        runs++;
        dirty += e.dirty ? e.len : 0;
        o += e.len;
    }
    t = now() - t0;
    printf("extent walk, alternating:  %8.2f ms  (%" PRIu64
           " extents, %.1f ns each, %" PRIu64 " dirty bytes)\n",
           t * 1e3,
           runs,
           t / runs * 1e9,
           dirty);

    /* A sparse walk: one dirty bit per 4096. */
    bitmap_import_fill(a, 0, bitmap_raw_size(a), false, 0);
    for (uint64_t k = 0; k < a->nbits; k += 4096)
        bitmap_set(a, k, 1);
    runs = 0;
    t0 = now();
    for (uint64_t o = 0; o < size;) {
        struct bitmap_extent e;
        bitmap_extent(a, o, UINT64_MAX, &e);
        runs++;
        o += e.len;
    }
    t = now() - t0;
    printf("extent walk, 1 bit / 4096: %8.2f ms  (%" PRIu64 " extents)\n",
           t * 1e3,
           runs);

    bitmap_free(a);
    bitmap_free(b);
    bitmap_free(c);
    return 0;
}

int
main(int argc, char *argv[])
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_dirty_bytes),
        cmocka_unit_test(test_small_and_partial),
        cmocka_unit_test(test_layout_example),
        cmocka_unit_test(test_qemu_digest),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_merge_examples),
        cmocka_unit_test(test_merge_granularities),
        cmocka_unit_test(test_merge_large),
        cmocka_unit_test(test_random_all_granularities),
    };

    if (argc > 1 && strcmp(argv[1], "--bench") == 0)
        return bench();
    return cmocka_run_group_tests(tests, NULL, NULL);
}

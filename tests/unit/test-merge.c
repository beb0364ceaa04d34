/* qcbt unit tests: the chain-aware merge engine (DESIGN.md "The merge
 * engine: changes since checkpoint X, seen from the top").
 *
 * Chains of small qcow2 layers (and raw bases) are written as real files
 * into a private mkdtemp() directory, each layer with chosen allocations
 * (data, zero, zero-allocated and compressed clusters) and chosen bitmaps
 * (bits, granularity, in_use, broken metadata, broken data).  Every merge
 * is checked against a naive model written from DESIGN.md, not from
 * merge.c: the model keeps one flag per 512-byte sector of the guest,
 * marks the sectors each contributing bitmap bit or allocated cluster
 * covers, and derives each result bit from the sectors it covers.  Named
 * tests check each rule and its refusal message; a random test at a fixed
 * seed compares whole chains, both modes and every sub-range.
 */
#include <errno.h>
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

#include "bitmap.h"
#include "chain.h"
#include "error.h"
#include "merge.h"
#include "qcow2-bitmaps.h"
#include "qcow2-builder.h"
#include "test-tmpdir.h"

#define KiB 1024ULL
#define MiB (1024ULL * 1024)

#define MAX_LAYERS  8
#define MAX_BITMAPS 4

/* ------------------------------------------------------------------ */
/* Helpers */

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

/* Uniform in [0, n). */
static uint64_t
rng_below(uint64_t n)
{
    return rng() % n;
}

static uint64_t
div_up(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

static uint64_t
min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
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

/* MSG must contain every NULL-terminated substring. */
#define SUBS(...) ((const char *const[]){__VA_ARGS__, NULL})

static void
check_msg(const char *msg, const char *what, const char *const *subs)
{
    size_t i;

    if (!msg[0])
        fail_msg("%s: empty message", what);
    if (strchr(msg, '\n'))
        fail_msg("%s: message is not one line: %s", what, msg);
    for (i = 0; subs && subs[i]; i++)
        if (!strstr(msg, subs[i]))
            fail_msg("%s: message \"%s\" does not name \"%s\"",
                     what,
                     msg,
                     subs[i]);
}

/* ------------------------------------------------------------------ */
/* Chain description and files */

enum alloc_kind { A_NONE, A_DATA, A_ZERO, A_ZERO_ALLOC, A_COMPRESSED };

enum bm_state {
    BM_OK,
    BM_IN_USE,   /* in_use flag */
    BM_BAD_DATA, /* directory fine, a table entry has reserved bits */
    BM_BAD_META, /* entry type 2: QEMU refuses the whole directory */
};

enum dir_state {
    DIR_OK,
    DIR_UNWALKABLE, /* nb_bitmaps one too many: names unknown */
    DIR_AUTOCLEAR,  /* autoclear bit 0 clear: all bitmaps inconsistent */
};

struct mbitmap {
    char name[16];
    unsigned gbits;
    enum bm_state state;
    bool autof;
    uint64_t nbits;
    uint8_t *bits; /* one byte per bit */
};

struct mlayer {
    bool raw;
    uint64_t size;      /* guest bytes (qcow2: a multiple of 512) */
    uint64_t file_size; /* raw: bytes in the file */
    unsigned cluster_bits;
    uint64_t nclusters;
    uint8_t *alloc; /* enum alloc_kind per guest cluster */
    struct mbitmap bm[MAX_BITMAPS];
    size_t nbm;
    enum dir_state dir;
};

struct mchain {
    size_t n;
    struct mlayer l[MAX_LAYERS];
    char dir[PATH_MAX];
    char top[PATH_MAX];
};

static void
layer_qcow2(struct mlayer *l, uint64_t size, unsigned cluster_bits)
{
    memset(l, 0, sizeof *l);
    l->size = size / 512 * 512;
    l->cluster_bits = cluster_bits;
    l->nclusters = div_up(l->size, 1ULL << cluster_bits);
    l->alloc = calloc(l->nclusters ? l->nclusters : 1, 1);
    assert_non_null(l->alloc);
}

static void
layer_raw(struct mlayer *l, uint64_t file_size)
{
    memset(l, 0, sizeof *l);
    l->raw = true;
    l->file_size = file_size;
    l->size = div_up(file_size, 512) * 512; /* QEMU rounds raw sizes up */
}

static void
layer_free(struct mlayer *l)
{
    size_t i;

    free(l->alloc);
    for (i = 0; i < l->nbm; i++)
        free(l->bm[i].bits);
}

static void
mchain_free(struct mchain *mc)
{
    size_t i;

    for (i = 0; i < mc->n; i++)
        layer_free(&mc->l[i]);
}

/* Allocate guest bytes [off, off+len) of L (whole clusters) as KIND. */
static void
layer_alloc(struct mlayer *l, uint64_t off, uint64_t len, enum alloc_kind k)
{
    uint64_t cs = 1ULL << l->cluster_bits, c;

    assert_false(l->raw);
    for (c = off / cs; c < div_up(off + len, cs) && c < l->nclusters; c++)
        l->alloc[c] = (uint8_t)k;
}

static struct mbitmap *
layer_bitmap(struct mlayer *l,
             const char *name,
             unsigned gbits,
             enum bm_state state)
{
    struct mbitmap *bm;

    assert_false(l->raw);
    assert_true(l->nbm < MAX_BITMAPS);
    bm = &l->bm[l->nbm++];
    snprintf(bm->name, sizeof bm->name, "%s", name);
    bm->gbits = gbits;
    bm->state = state;
    bm->autof = true;
    bm->nbits = div_up(l->size, 1ULL << gbits);
    bm->bits = calloc(bm->nbits ? bm->nbits : 1, 1);
    assert_non_null(bm->bits);
    return bm;
}

/* Mark guest bytes [off, off+len) dirty in BM (every bit they touch). */
static void
bm_dirty(struct mbitmap *bm, uint64_t off, uint64_t len)
{
    uint64_t g = 1ULL << bm->gbits, k;

    for (k = off / g; k < div_up(off + len, g) && k < bm->nbits; k++)
        bm->bits[k] = 1;
}

static void
bm_random(struct mbitmap *bm, unsigned density)
{
    uint64_t k;

    for (k = 0; k < bm->nbits; k++)
        bm->bits[k] = rng_below(256) < density;
}

static const char *
layer_file(const struct mchain *mc, size_t i)
{
    static char names[MAX_LAYERS][32];

    snprintf(names[i],
             sizeof names[i],
             mc->l[i].raw ? "base%zu.raw" : "l%zu.qcow2",
             i);
    return names[i];
}

static void
write_layer(struct mchain *mc, size_t i)
{
    struct mlayer *l = &mc->l[i];
    char path[PATH_MAX + 64];
    unsigned char *pattern, *img;
    uint64_t cs, c, toff[MAX_BITMAPS] = {0};
    struct qb *b;
    size_t len, j;

    if (snprintf(path, sizeof path, "%s/%s", mc->dir, layer_file(mc, i)) >=
        (int)sizeof path)
        fail_msg("path too long");
    if (l->raw) {
        pattern = malloc(l->file_size ? l->file_size : 1);
        assert_non_null(pattern);
        memset(pattern, 0x3c, l->file_size);
        write_file(path, pattern, l->file_size);
        free(pattern);
        return;
    }
    b = qb_new(3, l->cluster_bits, l->size, false, false);
    cs = qb_cluster_size(b);
    if (i + 1 < mc->n)
        qb_set_backing(b,
                       layer_file(mc, i + 1),
                       mc->l[i + 1].raw ? "raw" : "qcow2");
    pattern = malloc(cs);
    assert_non_null(pattern);
    for (c = 0; c < l->nclusters; c++) {
        memset(pattern, (int)(c * 13 + i + 1), cs);
        switch ((enum alloc_kind)l->alloc[c]) {
        case A_NONE:
            break;
        case A_DATA:
            qb_write_cluster(b, c, pattern);
            break;
        case A_ZERO:
            qb_set_l2(b, c, 1, 0);
            break;
        case A_ZERO_ALLOC:
            qb_set_l2(b,
                      c,
                      qb_alloc_cluster(b, pattern, cs) | (1ULL << 63) | 1,
                      0);
            break;
        case A_COMPRESSED:
            qb_write_compressed(b, c, pattern, NULL, NULL);
            break;
        }
    }
    free(pattern);

    /* An unwalkable directory needs a directory. */
    if (l->dir != DIR_OK && l->nbm == 0)
        layer_bitmap(l, "pad", 16, BM_OK);
    for (j = 0; j < l->nbm; j++) {
        struct mbitmap *bm = &l->bm[j];
        size_t slen = div_up(bm->nbits, 8);
        unsigned char *s = calloc(slen ? slen : 1, 1);
        uint32_t flags = (bm->autof ? QB_BME_AUTO : 0) |
                         (bm->state == BM_IN_USE ? QB_BME_IN_USE : 0);
        uint64_t k;
        size_t idx;

        assert_non_null(s);
        for (k = 0; k < bm->nbits; k++)
            if (bm->bits[k])
                s[k / 8] |= 1u << (k % 8);
        idx = qb_add_bitmap(b, bm->name, bm->gbits, flags, s, slen);
        if (bm->state == BM_BAD_META)
            qb_bitmap(b, idx)->type = 2;
        toff[j] = qb_bitmap(b, idx)->table_offset;
        free(s);
    }
    if (l->nbm)
        qb_store_bitmaps(b);
    img = qb_finish(b, &len);
    for (j = 0; j < l->nbm; j++)
        if (l->bm[j].state == BM_BAD_DATA)
            img[toff[j] + 7] |= 0x02; /* reserved bit 1 of entry 0 */
    if (l->dir == DIR_UNWALKABLE) {
        uint64_t p = qb_bitmaps_ext_pos(b) + 8;

        qb_put_be32(img, p, (uint32_t)l->nbm + 1);
    }
    if (l->dir == DIR_AUTOCLEAR)
        qb_put_be64(img, QB_OFF_AUTOCLEAR, 0);
    write_file(path, img, len);
    free(img);
    qb_free(b);
}

/* Write every layer of MC into a new directory SUB of the test's
 * directory.
 */
static void
mchain_write(struct mchain *mc, const char *sub)
{
    size_t i;
    int n = snprintf(mc->dir, sizeof mc->dir, "%s/%s", test_tmpdir, sub);

    assert_true(n > 0 && (size_t)n < sizeof mc->dir);
    if (mkdir(mc->dir, 0700) < 0)
        fail_msg("mkdir %s: %s", mc->dir, strerror(errno));
    for (i = 0; i < mc->n; i++)
        write_layer(mc, i);
    n = snprintf(mc->top, sizeof mc->top, "%s/%s", mc->dir, layer_file(mc, 0));
    assert_true(n > 0 && (size_t)n < sizeof mc->top);
}

static struct chain *
mchain_open(const struct mchain *mc)
{
    struct chain_open_opts o = {.format = mc->l[0].raw ? "raw" : "qcow2"};
    struct chain *c;
    int r;

    qcbt_error_clear();
    r = chain_open(mc->top, &o, &c);
    if (r < 0)
        fail_msg("chain_open %s: %s", mc->top, qcbt_error_get());
    assert_int_equal(c->nr_layers, mc->n);
    return c;
}

/* ------------------------------------------------------------------ */
/* The model (DESIGN.md "The merge engine") */

enum mstatus {
    MS_ABSENT,
    MS_UNKNOWN,
    MS_OK,
    MS_IN_USE,
    MS_INVALID,
    MS_BAD_DATA
};

static const struct mbitmap *
model_find(const struct mlayer *l, const char *name)
{
    size_t i;

    for (i = 0; i < l->nbm; i++)
        if (strcmp(l->bm[i].name, name) == 0)
            return &l->bm[i];
    return NULL;
}

/* What the layer's directory says about NAME. */
static enum mstatus
model_status(const struct mlayer *l, const char *name)
{
    const struct mbitmap *bm;
    size_t i;

    if (l->raw)
        return MS_ABSENT;
    if (l->dir == DIR_UNWALKABLE)
        return MS_UNKNOWN;
    bm = model_find(l, name);
    if (!bm)
        return MS_ABSENT;
    if (l->dir == DIR_AUTOCLEAR)
        return MS_INVALID;
    for (i = 0; i < l->nbm; i++)
        if (l->bm[i].state == BM_BAD_META)
            return MS_INVALID; /* QEMU refuses the whole directory */
    switch (bm->state) {
    case BM_IN_USE:
        return MS_IN_USE;
    case BM_BAD_DATA:
        return MS_BAD_DATA;
    default:
        return MS_OK;
    }
}

struct mresult {
    bool usable;
    char err[3][96]; /* substrings of the refusal */
    size_t k;
    enum merge_source src[MAX_LAYERS];
    unsigned gbits;
    size_t nr_fallbacks;
    uint64_t nbits;
    uint8_t *bits;
};

static void
model_refuse(struct mresult *m, const char *a, const char *b, const char *c)
{
    m->usable = false;
    snprintf(m->err[0], sizeof m->err[0], "%s", a);
    snprintf(m->err[1], sizeof m->err[1], "%s", b ? b : "");
    snprintf(m->err[2], sizeof m->err[2], "%s", c ? c : "");
}

static void
model_merge(const struct mchain *mc,
            const char *name,
            enum merge_mode mode,
            size_t top,
            size_t base,
            struct mresult *m)
{
    const uint64_t size = mc->l[0].size, nsec = size / 512;
    uint8_t *dirty;
    char layer[32], q[48];
    bool found = false;
    size_t i;
    uint64_t s, j;

    memset(m, 0, sizeof *m);
    m->usable = true;
    snprintf(q, sizeof q, "'%s'", name);

    /* Lk: the deepest layer of the range holding NAME; a directory that
     * cannot be walked on the way there leaves no answer.
     */
    for (i = base; i-- > top;) {
        enum mstatus st = model_status(&mc->l[i], name);

        if (st == MS_UNKNOWN) {
            snprintf(layer, sizeof layer, "layer %zu", i);
            model_refuse(m, layer, "cannot tell", q);
            return;
        }
        if (st != MS_ABSENT) {
            m->k = i;
            found = true;
            break;
        }
    }
    if (!found) {
        model_refuse(m, q, "not found", NULL);
        return;
    }

    /* The rules on the metadata, top down. */
    for (i = top; i <= m->k; i++) {
        enum mstatus st = model_status(&mc->l[i], name);

        snprintf(layer, sizeof layer, "layer %zu", i);
        if (mode == MERGE_STRICT || i == m->k) {
            switch (st) {
            case MS_UNKNOWN:
                model_refuse(m, layer, "unreadable", NULL);
                return;
            case MS_ABSENT:
                if (i == top)
                    model_refuse(m, q, "missing in the top layer", layer);
                else
                    model_refuse(m, q, "gap at", layer);
                return;
            case MS_IN_USE:
                model_refuse(m, q, "in use at", layer);
                return;
            case MS_INVALID:
                model_refuse(m, q, "invalid at", layer);
                return;
            default:
                m->src[i] = MERGE_SRC_BITMAP;
            }
        } else {
            m->src[i] = st == MS_OK || st == MS_BAD_DATA ? MERGE_SRC_BITMAP
                                                         : MERGE_SRC_ALLOCATION;
        }
    }
    /* Then the data: a bitmap whose data is bad is refused where strict
     * (or at Lk), replaced by the allocation elsewhere.
     */
    for (i = top; i <= m->k; i++) {
        if (m->src[i] != MERGE_SRC_BITMAP)
            continue;
        if (model_status(&mc->l[i], name) == MS_BAD_DATA) {
            snprintf(layer, sizeof layer, "layer %zu", i);
            if (mode == MERGE_STRICT || i == m->k) {
                model_refuse(m, q, "invalid at", layer);
                return;
            }
            m->src[i] = MERGE_SRC_ALLOCATION;
        }
    }
    /* The result has the granularity of the topmost bitmap used. */
    for (i = top; i <= m->k; i++) {
        if (m->src[i] == MERGE_SRC_BITMAP) {
            m->gbits = model_find(&mc->l[i], name)->gbits;
            break;
        }
        if (m->src[i] == MERGE_SRC_ALLOCATION)
            m->nr_fallbacks++;
    }
    for (; i <= m->k; i++)
        if (m->src[i] == MERGE_SRC_ALLOCATION)
            m->nr_fallbacks++;

    /* One flag per 512-byte sector of the guest. */
    dirty = calloc(nsec ? nsec : 1, 1);
    assert_non_null(dirty);
    for (i = top; i <= m->k; i++) {
        const struct mlayer *l = &mc->l[i];
        uint64_t lsec = min_u64(l->size, size) / 512;

        if (m->src[i] == MERGE_SRC_BITMAP) {
            const struct mbitmap *bm = model_find(l, name);

            for (s = 0; s < lsec; s++)
                if (bm->bits[(s * 512) >> bm->gbits])
                    dirty[s] = 1;
        } else if (m->src[i] == MERGE_SRC_ALLOCATION) {
            for (s = 0; s < lsec; s++)
                if (l->raw || l->alloc[(s * 512) >> l->cluster_bits] != A_NONE)
                    dirty[s] = 1;
        }
    }
    m->nbits = div_up(size, 1ULL << m->gbits);
    m->bits = calloc(m->nbits ? m->nbits : 1, 1);
    assert_non_null(m->bits);
    for (j = 0; j < m->nbits; j++) {
        uint64_t first = (j << m->gbits) / 512;
        uint64_t last = min_u64(((j + 1) << m->gbits) / 512, nsec);

        for (s = first; s < last; s++)
            if (dirty[s]) {
                m->bits[j] = 1;
                break;
            }
    }
    free(dirty);
}

/* Compare a merge_run result with the model; WHAT names the case. */
static void
check_result(const struct mchain *mc,
             const struct merge_result *res,
             const struct mresult *m,
             const char *what)
{
    uint64_t j, off;
    size_t i;

    if (res->usable != m->usable)
        fail_msg("%s: usable %d, model %d (%s) (model: %s %s %s)",
                 what,
                 res->usable,
                 m->usable,
                 res->error,
                 m->err[0],
                 m->err[1],
                 m->err[2]);
    if (!res->usable) {
        const char *const subs[] = {m->err[0],
                                    m->err[1][0] ? m->err[1] : NULL,
                                    m->err[2][0] ? m->err[2] : NULL,
                                    NULL};

        check_msg(res->error, what, subs[1] ? subs : SUBS(m->err[0]));
        if (m->err[1][0] && m->err[2][0])
            check_msg(res->error, what, SUBS(m->err[2]));
        assert_null(res->bm);
        {
            struct bitmap_extent e;

            qcbt_error_clear();
            assert_true(merge_result_extent(res, 0, 1, &e) < 0);
        }
        return;
    }
    if (res->deepest != m->k)
        fail_msg("%s: deepest %zu, model %zu", what, res->deepest, m->k);
    for (i = 0; i < mc->n; i++) {
        enum merge_source want =
            i >= res->top && i <= m->k ? m->src[i] : MERGE_SRC_NONE;

        if (res->layers[i].source != want)
            fail_msg("%s: layer %zu source %d, model %d (%s)",
                     what,
                     i,
                     res->layers[i].source,
                     want,
                     res->layers[i].reason);
        if (want == MERGE_SRC_ALLOCATION)
            check_msg(res->layers[i].reason, what, NULL);
        if (want == MERGE_SRC_BITMAP) {
            const struct mbitmap *bm = model_find(&mc->l[i], res->name);

            assert_int_equal(res->layers[i].granularity, 1ULL << bm->gbits);
            assert_int_equal(res->layers[i].enabled, bm->autof);
        }
    }
    assert_int_equal(res->nr_fallbacks, m->nr_fallbacks);
    assert_non_null(res->bm);
    if (res->bm->granularity != 1ULL << m->gbits)
        fail_msg("%s: result granularity %" PRIu64 ", model %llu",
                 what,
                 res->bm->granularity,
                 1ULL << m->gbits);
    assert_int_equal(res->bm->size, mc->l[0].size);
    assert_int_equal(res->bm->nbits, m->nbits);
    for (j = 0; j < m->nbits; j++)
        if (bitmap_test(res->bm, j) != m->bits[j])
            fail_msg("%s: bit %" PRIu64 " (byte 0x%llx) is %d, model %d",
                     what,
                     j,
                     (unsigned long long)(j << m->gbits),
                     bitmap_test(res->bm, j),
                     m->bits[j]);
    /* The extent walk agrees with the bits. */
    for (off = 0; off < res->bm->size;) {
        struct bitmap_extent e;
        uint64_t b0, b1;

        assert_int_equal(merge_result_extent(res, off, UINT64_MAX, &e), 0);
        assert_int_equal(e.offset, off);
        assert_true(e.len > 0);
        b0 = off >> m->gbits;
        b1 = div_up(off + e.len, 1ULL << m->gbits);
        for (j = b0; j < b1; j++)
            if (m->bits[j] != e.dirty)
                fail_msg("%s: extent at 0x%" PRIx64 " says %d, bit %" PRIu64
                         " is %d",
                         what,
                         off,
                         e.dirty,
                         j,
                         m->bits[j]);
        off += e.len;
    }
}

/* Run the merge of NAME over [top, base) (base 0: whole chain) in MODE
 * and compare with the model.  Returns whether it was usable.
 */
static bool
run_check(struct merge_ctx *ctx,
          const struct mchain *mc,
          const char *name,
          enum merge_mode mode,
          size_t top,
          size_t base,
          const char *what)
{
    struct merge_opts o = {.mode = mode, .top = top, .base = base};
    struct merge_result *res = NULL;
    struct mresult m;
    char w[256];
    bool usable;
    int r;

    snprintf(w,
             sizeof w,
             "%s [%s %s %zu..%zu)",
             what,
             name,
             mode == MERGE_STRICT ? "strict" : "tolerant",
             top,
             base ? base : mc->n);
    qcbt_error_clear();
    r = merge_run(ctx, name, &o, &res);
    if (r < 0)
        fail_msg("%s: merge_run failed: %s", w, qcbt_error_get());
    assert_non_null(res);
    assert_string_equal(res->name, name);
    assert_int_equal(res->mode, mode);
    assert_int_equal(res->top, top);
    assert_int_equal(res->base, base ? base : mc->n);
    assert_int_equal(res->nr_layers, mc->n);
    model_merge(mc, name, mode, top, base ? base : mc->n, &m);
    check_result(mc, res, &m, w);
    usable = res->usable;
    free(m.bits);
    merge_result_free(res);
    return usable;
}

/* Both modes over the whole chain. */
static void
run_both(const struct mchain *mc,
         const char *name,
         bool strict_ok,
         bool tolerant_ok,
         const char *what)
{
    struct chain *c = mchain_open(mc);
    struct merge_ctx *ctx;

    assert_int_equal(merge_ctx_new(c, &ctx), 0);
    if (run_check(ctx, mc, name, MERGE_STRICT, 0, 0, what) != strict_ok)
        fail_msg("%s: strict usable != %d", what, strict_ok);
    if (run_check(ctx, mc, name, MERGE_TOLERANT, 0, 0, what) != tolerant_ok)
        fail_msg("%s: tolerant usable != %d", what, tolerant_ok);
    merge_ctx_free(ctx);
    chain_close(c);
}

/* merge_run must give a result whose error names SUBS. */
static void
expect_refusal(const struct mchain *mc,
               const char *name,
               enum merge_mode mode,
               size_t top,
               size_t base,
               const char *const *subs)
{
    struct chain *c = mchain_open(mc);
    struct merge_ctx *ctx;
    struct merge_opts o = {.mode = mode, .top = top, .base = base};
    struct merge_result *res = NULL;

    assert_int_equal(merge_ctx_new(c, &ctx), 0);
    assert_int_equal(merge_run(ctx, name, &o, &res), 0);
    if (res->usable)
        fail_msg("%s %s: merge accepted", mc->dir, name);
    check_msg(res->error, mc->dir, subs);
    merge_result_free(res);
    merge_ctx_free(ctx);
    chain_close(c);
}

/* The merged result of NAME (usable), for tests that look at it. */
static struct merge_result *
merge_ok(struct merge_ctx *ctx,
         const char *name,
         enum merge_mode mode,
         size_t top,
         size_t base)
{
    struct merge_opts o = {.mode = mode, .top = top, .base = base};
    struct merge_result *res = NULL;

    assert_int_equal(merge_run(ctx, name, &o, &res), 0);
    if (!res->usable)
        fail_msg("merge of %s refused: %s", name, res->error);
    return res;
}

/* ------------------------------------------------------------------ */
/* Named cases */

/* Three qcow2 layers, X in each with different bits: strict and tolerant
 * both give the union; a bitmap only in the base (Y) follows the rules.
 */
static void
test_valid_chain(void **state)
{
    struct mchain mc = {.n = 3};
    struct mbitmap *x;
    struct chain *c;
    struct merge_ctx *ctx;
    struct merge_result *res;
    const struct qcow2_bitmap_list *list;
    size_t i;

    for (i = 0; i < 3; i++)
        layer_qcow2(&mc.l[i], 4 * MiB, 16);
    x = layer_bitmap(&mc.l[0], "X", 16, BM_OK);
    bm_dirty(x, 0, 4096);
    bm_dirty(x, 3 * MiB, 1);
    x = layer_bitmap(&mc.l[1], "X", 16, BM_OK);
    bm_dirty(x, 64 * KiB, 128 * KiB);
    x = layer_bitmap(&mc.l[2], "X", 16, BM_OK);
    bm_dirty(x, 4 * MiB - 1, 1);
    bm_dirty(x, 0, 1);
    layer_bitmap(&mc.l[2], "Y", 16, BM_OK)->bits[5] = 1;
    layer_alloc(&mc.l[0], 0, 1 * MiB, A_DATA);
    mchain_write(&mc, "valid");

    run_both(&mc, "X", true, true, "valid");
    /* Y only in the base: strict refuses, tolerant uses L0 and L1's
     * allocation (L1 allocates nothing).
     */
    run_both(&mc, "Y", false, true, "valid Y");
    expect_refusal(&mc,
                   "Y",
                   MERGE_STRICT,
                   0,
                   0,
                   SUBS("'Y'", "missing in the top layer 0"));

    /* Spot checks without the model: exactly these bits. */
    c = mchain_open(&mc);
    assert_int_equal(merge_ctx_new(c, &ctx), 0);
    res = merge_ok(ctx, "X", MERGE_STRICT, 0, 0);
    assert_int_equal(res->deepest, 2);
    assert_int_equal(res->nr_fallbacks, 0);
    assert_int_equal(res->bm->granularity, 64 * KiB);
    assert_int_equal(bitmap_count(res->bm), 1 + 1 + 2 + 1);
    assert_true(bitmap_test(res->bm, 0));
    assert_true(bitmap_test(res->bm, 1));
    assert_true(bitmap_test(res->bm, 2));
    assert_true(bitmap_test(res->bm, 48));
    assert_true(bitmap_test(res->bm, 63));
    merge_result_free(res);
    /* The directories are cached per layer. */
    assert_int_equal(merge_ctx_layer_bitmaps(ctx, 2, &list), 0);
    assert_int_equal(list->nr, 2);
    assert_true(list->usable);
    qcbt_error_clear();
    assert_true(merge_ctx_layer_bitmaps(ctx, 3, &list) < 0);
    merge_ctx_free(ctx);
    chain_close(c);
    mchain_free(&mc);
}

/* X missing in the top layer. */
static void
test_missing_in_top(void **state)
{
    struct mchain mc = {.n = 3};
    size_t i;

    for (i = 0; i < 3; i++)
        layer_qcow2(&mc.l[i], 2 * MiB, 12);
    layer_alloc(&mc.l[0], 100 * KiB, 8 * KiB, A_DATA);
    layer_alloc(&mc.l[0], 1 * MiB, 4 * KiB, A_ZERO);
    bm_dirty(layer_bitmap(&mc.l[1], "X", 15, BM_OK), 0, 1);
    bm_dirty(layer_bitmap(&mc.l[2], "X", 15, BM_OK), 1 * MiB + 5, 1);
    layer_bitmap(&mc.l[0], "other", 15, BM_OK);
    mchain_write(&mc, "missing-top");
    run_both(&mc, "X", false, true, "missing in top");
    expect_refusal(&mc,
                   "X",
                   MERGE_STRICT,
                   0,
                   0,
                   SUBS("'X'", "missing in the top layer 0", "layer 2"));
    mchain_free(&mc);
}

/* A gap: X in L0 and L2, not in L1. */
static void
test_gap(void **state)
{
    struct mchain mc = {.n = 4};
    size_t i;

    for (i = 0; i < 4; i++)
        layer_qcow2(&mc.l[i], 2 * MiB, 12);
    bm_dirty(layer_bitmap(&mc.l[0], "X", 16, BM_OK), 0, 1);
    layer_alloc(&mc.l[1], 512 * KiB, 4 * KiB, A_DATA);
    layer_alloc(&mc.l[1], 600 * KiB, 4 * KiB, A_ZERO_ALLOC);
    bm_dirty(layer_bitmap(&mc.l[2], "X", 16, BM_OK), 1 * MiB, 1);
    layer_alloc(&mc.l[3], 0, 2 * MiB, A_DATA); /* below Lk: ignored */
    mchain_write(&mc, "gap");
    run_both(&mc, "X", false, true, "gap");
    expect_refusal(&mc,
                   "X",
                   MERGE_STRICT,
                   0,
                   0,
                   SUBS("'X'", "gap at layer 1", "layer 2"));
    /* the allocation of L1 appears in the tolerant result */
    {
        struct chain *c = mchain_open(&mc);
        struct merge_ctx *ctx;
        struct merge_result *res;

        assert_int_equal(merge_ctx_new(c, &ctx), 0);
        res = merge_ok(ctx, "X", MERGE_TOLERANT, 0, 0);
        assert_int_equal(res->layers[1].source, MERGE_SRC_ALLOCATION);
        check_msg(res->layers[1].reason, "gap", SUBS("missing"));
        assert_int_equal(res->nr_fallbacks, 1);
        assert_int_equal(res->deepest, 2);
        assert_int_equal(res->layers[3].source, MERGE_SRC_NONE);
        assert_int_equal(bitmap_count(res->bm), 4); /* 0, 8, 9, 16 */
        assert_true(bitmap_test(res->bm, 8));
        assert_true(bitmap_test(res->bm, 9));
        merge_result_free(res);
        merge_ctx_free(ctx);
        chain_close(c);
    }
    mchain_free(&mc);
}

/* in_use at each position of a 3-layer chain: strict refuses; tolerant
 * falls back to the allocation above Lk and refuses at Lk.  The same for
 * a bitmap with broken metadata, a layer whose autoclear bit is clear,
 * and a bitmap whose data cannot be loaded.
 */
static void
test_unusable_at_each_position(void **state)
{
    static const struct {
        const char *label;
        enum bm_state bs;
        enum dir_state ds;
        const char *sub;
    } kinds[] = {
        {"in-use", BM_IN_USE, DIR_OK, "in use at"},
        {"bad-meta", BM_BAD_META, DIR_OK, "invalid at"},
        {"autoclear", BM_OK, DIR_AUTOCLEAR, "invalid at"},
        {"bad-data", BM_BAD_DATA, DIR_OK, "invalid at"},
    };
    size_t kind, pos, i;

    for (kind = 0; kind < sizeof kinds / sizeof kinds[0]; kind++) {
        for (pos = 0; pos < 3; pos++) {
            struct mchain mc = {.n = 3};
            char sub[64], layer[32];

            for (i = 0; i < 3; i++) {
                struct mbitmap *x;

                layer_qcow2(&mc.l[i], 1 * MiB, 9);
                layer_alloc(&mc.l[i], i * 64 * KiB, 2 * KiB, A_DATA);
                x = layer_bitmap(&mc.l[i],
                                 "X",
                                 10 + (unsigned)i,
                                 i == pos ? kinds[kind].bs : BM_OK);
                bm_dirty(x, 512 * KiB + i * 4096, 1);
                if (i == pos)
                    mc.l[i].dir = kinds[kind].ds;
            }
            snprintf(sub, sizeof sub, "%s-%zu", kinds[kind].label, pos);
            mchain_write(&mc, sub);
            run_both(&mc, "X", false, pos < 2, sub);
            snprintf(layer, sizeof layer, "layer %zu", pos);
            expect_refusal(&mc,
                           "X",
                           MERGE_STRICT,
                           0,
                           0,
                           SUBS("'X'", kinds[kind].sub, layer));
            if (pos == 2)
                expect_refusal(&mc,
                               "X",
                               MERGE_TOLERANT,
                               0,
                               0,
                               SUBS("'X'", kinds[kind].sub, layer));
            mchain_free(&mc);
        }
    }
}

/* X nowhere: refused in both modes, naming the chain or the range. */
static void
test_not_found(void **state)
{
    struct mchain mc = {.n = 3};
    size_t i;

    for (i = 0; i < 3; i++)
        layer_qcow2(&mc.l[i], 1 * MiB, 16);
    layer_bitmap(&mc.l[0], "A", 16, BM_OK);
    layer_bitmap(&mc.l[2], "B", 16, BM_OK);
    mchain_write(&mc, "not-found");
    run_both(&mc, "X", false, false, "not found");
    expect_refusal(&mc,
                   "X",
                   MERGE_TOLERANT,
                   0,
                   0,
                   SUBS("'X'", "not found", "chain"));
    expect_refusal(&mc,
                   "B",
                   MERGE_TOLERANT,
                   0,
                   2,
                   SUBS("'B'", "not found", "range"));
    /* names are case-sensitive and exact */
    expect_refusal(&mc, "a", MERGE_TOLERANT, 0, 0, SUBS("not found"));
    expect_refusal(&mc, "", MERGE_TOLERANT, 0, 0, SUBS("not found"));
    mchain_free(&mc);
}

/* Mixed granularities: the result has the granularity of the topmost
 * bitmap used, and every input maps conservatively both ways.
 */
static void
test_granularities(void **state)
{
    static const unsigned combos[][3] = {
        {16, 9, 20},
        {9, 16, 20},
        {20, 9, 12},
        {12, 12, 12},
        {31, 9, 16},
        {9, 31, 9},
    };
    size_t ci, i;

    rng_seed(2024);
    for (ci = 0; ci < sizeof combos / sizeof combos[0]; ci++) {
        struct mchain mc = {.n = 3};
        char sub[32];

        for (i = 0; i < 3; i++) {
            layer_qcow2(&mc.l[i], 3 * MiB + 1536, 12);
            bm_random(layer_bitmap(&mc.l[i], "X", combos[ci][i], BM_OK), 6);
        }
        /* a sparse bit in the coarse bitmaps as well */
        for (i = 0; i < 3; i++)
            bm_dirty(&mc.l[i].bm[0], (i + 1) * 700 * KiB + 512, 1);
        snprintf(sub, sizeof sub, "gran-%zu", ci);
        mchain_write(&mc, sub);
        run_both(&mc, "X", true, true, sub);
        /* tolerant with X@0 in use: the granularity is X@1's */
        mc.l[0].bm[0].state = BM_IN_USE;
        snprintf(sub, sizeof sub, "gran-inuse-%zu", ci);
        mchain_write(&mc, sub);
        run_both(&mc, "X", false, true, sub);
        mchain_free(&mc);
    }

    /* Coarse over fine, exactly: one 1 MiB bit covers 2048 bits of 512 B;
     * a 512 B bit sets the one 1 MiB bit covering it.
     */
    {
        struct mchain mc = {.n = 2};
        struct chain *c;
        struct merge_ctx *ctx;
        struct merge_result *res;

        layer_qcow2(&mc.l[0], 4 * MiB, 16);
        layer_qcow2(&mc.l[1], 4 * MiB, 16);
        bm_dirty(layer_bitmap(&mc.l[0], "X", 9, BM_OK), 3 * MiB + 512, 1);
        bm_dirty(layer_bitmap(&mc.l[1], "X", 20, BM_OK), 1 * MiB, 1);
        bm_dirty(layer_bitmap(&mc.l[0], "Y", 20, BM_OK), 1 * MiB, 1);
        bm_dirty(layer_bitmap(&mc.l[1], "Y", 9, BM_OK), 3 * MiB + 512, 1);
        mchain_write(&mc, "coarse-fine");
        c = mchain_open(&mc);
        assert_int_equal(merge_ctx_new(c, &ctx), 0);
        res = merge_ok(ctx, "X", MERGE_STRICT, 0, 0);
        assert_int_equal(res->bm->granularity, 512);
        assert_int_equal(bitmap_count(res->bm), 2048 + 1);
        assert_int_equal(bitmap_next_dirty(res->bm, 0), 2048);
        assert_int_equal(bitmap_next_clean(res->bm, 2048), 4096);
        assert_true(bitmap_test(res->bm, 6145));
        merge_result_free(res);
        res = merge_ok(ctx, "Y", MERGE_STRICT, 0, 0);
        assert_int_equal(res->bm->granularity, 1 * MiB);
        assert_int_equal(bitmap_count(res->bm), 2);
        assert_true(bitmap_test(res->bm, 1));
        assert_true(bitmap_test(res->bm, 3));
        merge_result_free(res);
        merge_ctx_free(ctx);
        chain_close(c);
        run_both(&mc, "X", true, true, "coarse-fine X");
        run_both(&mc, "Y", true, true, "coarse-fine Y");
        mchain_free(&mc);
    }
}

/* A raw base: its (empty) directory is usable, it never holds X, and a
 * range of only the raw layer finds nothing.
 */
static void
test_raw_base(void **state)
{
    struct mchain mc = {.n = 3};
    struct chain *c;
    struct merge_ctx *ctx;
    const struct qcow2_bitmap_list *list;

    layer_qcow2(&mc.l[0], 2 * MiB, 16);
    layer_qcow2(&mc.l[1], 2 * MiB, 16);
    layer_raw(&mc.l[2], 2 * MiB + 100);
    bm_dirty(layer_bitmap(&mc.l[0], "X", 16, BM_OK), 0, 1);
    bm_dirty(layer_bitmap(&mc.l[1], "X", 16, BM_OK), 1 * MiB, 1);
    bm_dirty(layer_bitmap(&mc.l[0], "T", 16, BM_OK), 64 * KiB, 1);
    layer_alloc(&mc.l[1], 0, 64 * KiB, A_DATA);
    mchain_write(&mc, "raw-base");
    run_both(&mc, "X", true, true, "raw base");
    run_both(&mc, "T", true, true, "raw base T");

    c = mchain_open(&mc);
    assert_int_equal(c->layers[2].fmt, CHAIN_FMT_RAW);
    assert_int_equal(merge_ctx_new(c, &ctx), 0);
    assert_int_equal(merge_ctx_layer_bitmaps(ctx, 2, &list), 0);
    assert_true(list->usable);
    assert_true(list->names_known);
    assert_int_equal(list->nr, 0);
    run_check(ctx, &mc, "X", MERGE_TOLERANT, 2, 3, "raw only");
    run_check(ctx, &mc, "X", MERGE_STRICT, 1, 3, "raw range");
    merge_ctx_free(ctx);
    chain_close(c);
    expect_refusal(&mc, "X", MERGE_TOLERANT, 2, 3, SUBS("not found"));
    mchain_free(&mc);

    /* A chain that is only a raw file. */
    {
        struct mchain r = {.n = 1};

        layer_raw(&r.l[0], 1 * MiB);
        mchain_write(&r, "raw-only");
        run_both(&r, "X", false, false, "raw only chain");
        mchain_free(&r);
    }
}

/* A layer whose directory cannot be walked: below the deepest holder it
 * may hide a deeper X, so both modes refuse; above it, strict refuses and
 * tolerant falls back to its allocation; outside the range it does not
 * matter.
 */
static void
test_unwalkable_directory(void **state)
{
    struct mchain mc = {.n = 4};
    size_t i;

    for (i = 0; i < 4; i++)
        layer_qcow2(&mc.l[i], 2 * MiB, 12);
    bm_dirty(layer_bitmap(&mc.l[0], "X", 16, BM_OK), 0, 1);
    bm_dirty(layer_bitmap(&mc.l[1], "X", 16, BM_OK), 1 * MiB, 1);
    layer_bitmap(&mc.l[2], "X", 16, BM_OK);
    mc.l[2].dir = DIR_UNWALKABLE;
    bm_dirty(layer_bitmap(&mc.l[3], "Z", 16, BM_OK), 64 * KiB, 1);
    mchain_write(&mc, "unwalkable");

    /* X: L2 (below X@1) cannot be walked: no answer at all */
    run_both(&mc, "X", false, false, "unwalkable below");
    expect_refusal(&mc,
                   "X",
                   MERGE_TOLERANT,
                   0,
                   0,
                   SUBS("layer 2", "cannot tell", "'X'"));
    expect_refusal(&mc,
                   "X",
                   MERGE_STRICT,
                   0,
                   0,
                   SUBS("layer 2", "cannot tell"));
    /* the range [0, 2) does not include it */
    {
        struct chain *c = mchain_open(&mc);
        struct merge_ctx *ctx;

        assert_int_equal(merge_ctx_new(c, &ctx), 0);
        run_check(ctx, &mc, "X", MERGE_STRICT, 0, 2, "unwalkable out");
        run_check(ctx, &mc, "X", MERGE_TOLERANT, 0, 2, "unwalkable out");
        /* Z in L3: L2 is above Lk */
        run_check(ctx, &mc, "Z", MERGE_TOLERANT, 0, 0, "unwalkable above");
        run_check(ctx, &mc, "Z", MERGE_STRICT, 2, 4, "unwalkable top");
        merge_ctx_free(ctx);
        chain_close(c);
    }
    expect_refusal(&mc, "Z", MERGE_STRICT, 2, 4, SUBS("layer 2", "unreadable"));
    mchain_free(&mc);
}

/* Sub-ranges: [top, base) merges; layers outside contribute nothing and
 * the top of the range is what "top" means for strict mode.
 */
static void
test_subranges(void **state)
{
    struct mchain mc = {.n = 5};
    struct chain *c;
    struct merge_ctx *ctx;
    size_t i, t, b;

    rng_seed(55);
    for (i = 0; i < 5; i++) {
        layer_qcow2(&mc.l[i], 2 * MiB + 512 * i, 12);
        layer_alloc(&mc.l[i], i * 256 * KiB, 64 * KiB, A_DATA);
        if (i != 1 && i != 3)
            bm_random(layer_bitmap(&mc.l[i], "X", 12 + (unsigned)i, BM_OK), 4);
    }
    bm_random(layer_bitmap(&mc.l[1], "Y", 13, BM_OK), 4);
    mchain_write(&mc, "subranges");
    c = mchain_open(&mc);
    assert_int_equal(merge_ctx_new(c, &ctx), 0);
    for (t = 0; t < 5; t++) {
        for (b = t + 1; b <= 5; b++) {
            run_check(ctx, &mc, "X", MERGE_STRICT, t, b, "subrange");
            run_check(ctx, &mc, "X", MERGE_TOLERANT, t, b, "subrange");
            run_check(ctx, &mc, "Y", MERGE_TOLERANT, t, b, "subrange");
        }
    }
    /* bad ranges are argument errors */
    {
        struct merge_opts o = {.top = 3, .base = 3};
        struct merge_result *res = NULL;

        qcbt_error_clear();
        assert_int_equal(merge_run(ctx, "X", &o, &res), -EINVAL);
        o.top = 4;
        o.base = 2;
        assert_int_equal(merge_run(ctx, "X", &o, &res), -EINVAL);
        o.top = 0;
        o.base = 6;
        assert_int_equal(merge_run(ctx, "X", &o, &res), -EINVAL);
        o.top = 5;
        o.base = 0;
        assert_int_equal(merge_run(ctx, "X", &o, &res), -EINVAL);
        assert_null(res);
    }
    merge_ctx_free(ctx);
    chain_close(c);
    /* [1, 3): X only in L2, the top of the range (L1) lacks it */
    expect_refusal(&mc,
                   "X",
                   MERGE_STRICT,
                   1,
                   3,
                   SUBS("missing in the top layer 1"));
    expect_refusal(&mc,
                   "X",
                   MERGE_STRICT,
                   3,
                   5,
                   SUBS("missing in the top layer 3"));
    mchain_free(&mc);
}

/* The tolerant fallback is exactly the layer's allocation: data, zero
 * (with and without a host cluster) and compressed clusters count,
 * unallocated ones do not; for cluster sizes both finer and coarser than
 * the result's granularity.  Cross-checked with chain_layer_allocated().
 */
static void
test_allocation_fallback(void **state)
{
    static const unsigned cfg[][2] = {
        /* cluster_bits of L0, granularity of X@1 */
        {12, 16},
        {16, 9},
        {9, 9},
        {16, 16},
        {14, 13},
    };
    size_t ci;

    for (ci = 0; ci < sizeof cfg / sizeof cfg[0]; ci++) {
        struct mchain mc = {.n = 2};
        struct chain *c;
        struct merge_ctx *ctx;
        struct merge_result *res;
        struct bitmap *alloc;
        uint64_t cs = 1ULL << cfg[ci][0], pos, g;
        char sub[32];

        layer_qcow2(&mc.l[0], 3 * MiB + 512, cfg[ci][0]);
        layer_qcow2(&mc.l[1], 3 * MiB + 512, 16);
        layer_alloc(&mc.l[0], 0, 1, A_DATA);
        layer_alloc(&mc.l[0], 5 * cs, 1, A_ZERO);
        layer_alloc(&mc.l[0], 9 * cs, 2 * cs, A_ZERO_ALLOC);
        layer_alloc(&mc.l[0], 20 * cs, 1, A_COMPRESSED);
        layer_alloc(&mc.l[0], 3 * MiB, 512, A_DATA); /* the partial end */
        bm_dirty(layer_bitmap(&mc.l[1], "X", cfg[ci][1], BM_OK), 2 * MiB, 1);
        snprintf(sub, sizeof sub, "alloc-%zu", ci);
        mchain_write(&mc, sub);
        run_both(&mc, "X", false, true, sub);

        /* independent check: the result is alloc(L0) | X@1 */
        c = mchain_open(&mc);
        assert_int_equal(merge_ctx_new(c, &ctx), 0);
        res = merge_ok(ctx, "X", MERGE_TOLERANT, 0, 0);
        assert_int_equal(res->nr_fallbacks, 1);
        assert_int_equal(res->layers[0].source, MERGE_SRC_ALLOCATION);
        g = 1ULL << cfg[ci][1];
        assert_int_equal(res->bm->granularity, g);
        assert_int_equal(bitmap_new(c->size, g, &alloc), 0);
        for (pos = 0; pos < c->size;) {
            uint64_t n;
            bool a;

            assert_int_equal(
                chain_layer_allocated(c, 0, pos, c->size - pos, &n, &a),
                0);
            assert_true(n > 0);
            if (a)
                assert_int_equal(bitmap_set_bytes(alloc, pos, n), 0);
            pos += n;
        }
        assert_int_equal(bitmap_set_bytes(alloc, 2 * MiB, 1), 0);
        for (pos = 0; pos < alloc->nbits; pos++)
            if (bitmap_test(alloc, pos) != bitmap_test(res->bm, pos))
                fail_msg("%s: bit %" PRIu64 ": alloc|X %d, merge %d",
                         sub,
                         pos,
                         bitmap_test(alloc, pos),
                         bitmap_test(res->bm, pos));
        /* zero and compressed clusters are in it */
        assert_true(bitmap_test(res->bm, 5 * cs / g));
        assert_true(bitmap_test(res->bm, 10 * cs / g));
        assert_true(bitmap_test(res->bm, 20 * cs / g));
        assert_true(bitmap_test(res->bm, res->bm->nbits - 1));
        bitmap_free(alloc);
        merge_result_free(res);
        merge_ctx_free(ctx);
        chain_close(c);
        mchain_free(&mc);
    }
}

/* Layers of different sizes: a smaller lower layer contributes only its
 * range, a larger one is cut at the top's size.
 */
static void
test_layer_sizes(void **state)
{
    struct mchain mc = {.n = 4};
    size_t i;

    rng_seed(77);
    layer_qcow2(&mc.l[0], 3 * MiB, 12);
    layer_qcow2(&mc.l[1], 1 * MiB + 512, 9);
    layer_qcow2(&mc.l[2], 5 * MiB, 16);
    layer_qcow2(&mc.l[3], 2 * MiB, 12);
    for (i = 0; i < 4; i++) {
        layer_alloc(&mc.l[i], 0, mc.l[i].size, A_DATA);
        bm_random(layer_bitmap(&mc.l[i], "X", 9 + 3 * (unsigned)i, BM_OK), 3);
        bm_dirty(&mc.l[i].bm[0], mc.l[i].size - 1, 1);
    }
    mc.l[1].bm[0].state = BM_IN_USE; /* tolerant: all of L1 */
    mchain_write(&mc, "sizes");
    run_both(&mc, "X", false, true, "sizes");
    mc.l[1].bm[0].state = BM_OK;
    mchain_write(&mc, "sizes-ok");
    run_both(&mc, "X", true, true, "sizes ok");
    mchain_free(&mc);
}

/* Random chains at a fixed seed: 1..6 layers (a raw base sometimes), each
 * with random sizes, cluster sizes, allocations and bitmaps X and Y in
 * random states; every merge of X and Y, both modes, every sub-range,
 * against the model.
 */
static void
test_random_chains(void **state)
{
    static const unsigned cbits[] = {9, 12, 16};
    size_t iter, runs = 0, usable = 0;

    rng_seed(0x5eed);
    for (iter = 0; iter < 120; iter++) {
        struct mchain mc = {.n = 1 + (size_t)rng_below(6)};
        struct chain *c;
        struct merge_ctx *ctx;
        char sub[32];
        size_t i, t, b;

        for (i = 0; i < mc.n; i++) {
            struct mlayer *l = &mc.l[i];
            uint64_t size = 512 * (1 + rng_below(4 * 2048));
            const char *const names[] = {"X", "Y"};
            size_t nm;
            uint64_t cl;

            if (i == mc.n - 1 && i > 0 && rng_below(3) == 0) {
                layer_raw(l, size - rng_below(512));
                continue;
            }
            layer_qcow2(l, size, cbits[rng_below(3)]);
            for (cl = 0; cl < l->nclusters; cl++) {
                uint64_t p = rng_below(100);

                l->alloc[cl] = p < 15   ? A_DATA
                               : p < 19 ? A_ZERO
                               : p < 22 ? A_ZERO_ALLOC
                               : p < 24 ? A_COMPRESSED
                                        : A_NONE;
            }
            for (nm = 0; nm < 2; nm++) {
                uint64_t p = rng_below(100);
                enum bm_state st;
                struct mbitmap *bm;

                if (p < 25)
                    continue; /* absent */
                p = rng_below(100);
                st = p < 75   ? BM_OK
                     : p < 87 ? BM_IN_USE
                     : p < 94 ? BM_BAD_DATA
                              : BM_BAD_META;
                bm =
                    layer_bitmap(l, names[nm], 9 + (unsigned)rng_below(14), st);
                bm->autof = rng_below(2);
                bm_random(bm, (unsigned)rng_below(12));
            }
            {
                uint64_t p = rng_below(100);

                l->dir = p < 90   ? DIR_OK
                         : p < 95 ? DIR_UNWALKABLE
                                  : DIR_AUTOCLEAR;
            }
        }
        snprintf(sub, sizeof sub, "random-%zu", iter);
        mchain_write(&mc, sub);
        c = mchain_open(&mc);
        assert_int_equal(merge_ctx_new(c, &ctx), 0);
        for (t = 0; t < mc.n; t++) {
            for (b = t + 1; b <= mc.n; b++) {
                usable += run_check(ctx, &mc, "X", MERGE_STRICT, t, b, sub);
                usable += run_check(ctx, &mc, "X", MERGE_TOLERANT, t, b, sub);
                usable += run_check(ctx, &mc, "Y", MERGE_TOLERANT, t, b, sub);
                runs += 3;
            }
        }
        merge_ctx_free(ctx);
        chain_close(c);
        mchain_free(&mc);
    }
    /* the seed must exercise both outcomes substantially */
    print_message("random chains: %zu merges, %zu usable\n", runs, usable);
    assert_true(usable > runs / 5);
    assert_true(usable < runs - runs / 5);
}

/* merge_run's result is the caller's only when it returns 0.  An error
 * found after the result was built (here the merged bitmap of a 4 TiB
 * guest at the 512-byte granularity of X@base: 2^33 bits, over
 * BITMAP_MAX_BITS) returns -errno with *out NULL and nothing allocated;
 * under ASan the leak check at exit covers the "nothing".  The callers
 * (server, plugin, CLI) only free a result they were given.
 */
static void
test_error_after_result(void **state)
{
    char dir[PATH_MAX + 16], base[PATH_MAX + 32], top[PATH_MAX + 32];
    struct chain_open_opts o = {.format = "qcow2"};
    unsigned char bits[16], *img;
    struct merge_result sentinel, *res = &sentinel;
    struct merge_ctx *ctx;
    struct chain *c;
    struct qb *b;
    size_t len;
    int r;

    snprintf(dir, sizeof dir, "%s/late-error", test_tmpdir);
    if (mkdir(dir, 0700) < 0)
        fail_msg("mkdir %s: %s", dir, strerror(errno));
    snprintf(base, sizeof base, "%s/base.qcow2", dir);
    snprintf(top, sizeof top, "%s/top.qcow2", dir);

    b = qb_new(3, 16, 1 * MiB, false, false);
    memset(bits, 0x5a, sizeof bits);
    qb_add_bitmap(b, "X", 9, QB_BME_AUTO, bits, sizeof bits);
    qb_store_bitmaps(b);
    img = qb_finish(b, &len);
    write_file(base, img, len);
    free(img);
    qb_free(b);

    /* The top was made without X: tolerant mode uses its allocation. */
    b = qb_new(3, 16, 4 * MiB * MiB, false, false);
    qb_set_backing(b, "base.qcow2", "qcow2");
    img = qb_finish(b, &len);
    write_file(top, img, len);
    free(img);
    qb_free(b);

    qcbt_error_clear();
    if (chain_open(top, &o, &c) < 0)
        fail_msg("chain_open %s: %s", top, qcbt_error_get());
    assert_int_equal(c->nr_layers, 2);
    assert_int_equal(merge_ctx_new(c, &ctx), 0);
    r = merge_run(ctx, "X", &(struct merge_opts){.mode = MERGE_TOLERANT}, &res);
    assert_int_equal(r, -EFBIG);
    assert_null(res);
    check_msg(qcbt_error_get(),
              "late error",
              (const char *const[]){"bits", NULL});

    /* The same context still answers: strict mode refuses (X is missing
     * in the top), a refusal being a result, not an error.
     */
    res = &sentinel;
    r = merge_run(ctx, "X", &(struct merge_opts){.mode = MERGE_STRICT}, &res);
    assert_int_equal(r, 0);
    assert_non_null(res);
    assert_ptr_not_equal(res, &sentinel);
    assert_false(res->usable);
    check_msg(res->error,
              "strict refusal",
              (const char *const[]){"missing in the top layer", NULL});
    merge_result_free(res);

    /* Bad arguments: *out NULL as well. */
    res = &sentinel;
    r = merge_run(ctx, "X", &(struct merge_opts){.top = 2, .base = 1}, &res);
    assert_int_equal(r, -EINVAL);
    assert_null(res);

    merge_ctx_free(ctx);
    chain_close(c);
}

/* One line a terminal shows as text: no C0 control, DEL or C1 control,
 * nothing that is not UTF-8.
 */
static void
check_clean_line(const char *msg, const char *what)
{
    const unsigned char *p = (const unsigned char *)msg;

    for (; *p; p++)
        if (*p < 0x20 || *p == 0x7f || *p >= 0x80)
            fail_msg("%s: byte 0x%02x in \"%s\"", what, *p, msg);
}

/* Refusals and fallback reasons quote layer paths (built from backing
 * names) and bitmap names, both from the images: they reach terminals and
 * logs, so they are made safe like every other message.
 */
static void
test_hostile_names(void **state)
{
    static const char name[] = "X\x1b[1m\n";
    static const char mid[] = "m\x1b[2J\n.qcow2";
    static const char base[] = "b\x1b]0;t\x07.qcow2";
    static const char *const files[3] = {"top.qcow2", mid, base};
    static const uint32_t flags[3] = {
        QB_BME_AUTO | QB_BME_IN_USE,
        QB_BME_AUTO,
        QB_BME_AUTO | QB_BME_IN_USE,
    };
    char dir[PATH_MAX + 16], path[PATH_MAX + 64];
    struct chain_open_opts o = {.format = "qcow2"};
    struct merge_result *res;
    struct merge_ctx *ctx;
    struct chain *c;
    unsigned char bits = 0xff, *img;
    size_t len, i;

    snprintf(dir, sizeof dir, "%s/hostile", test_tmpdir);
    if (mkdir(dir, 0700) < 0)
        fail_msg("mkdir %s: %s", dir, strerror(errno));
    for (i = 0; i < 3; i++) {
        struct qb *b = qb_new(3, 16, 1 * MiB, false, false);

        if (i < 2)
            qb_set_backing(b, files[i + 1], "qcow2");
        qb_add_bitmap(b, name, 16, flags[i], &bits, 1);
        qb_store_bitmaps(b);
        img = qb_finish(b, &len);
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        write_file(path, img, len);
        free(img);
        qb_free(b);
    }
    snprintf(path, sizeof path, "%s/top.qcow2", dir);
    qcbt_error_clear();
    if (chain_open(path, &o, &c) < 0)
        fail_msg("chain_open %s: %s", path, qcbt_error_get());
    assert_int_equal(c->nr_layers, 3);
    assert_int_equal(merge_ctx_new(c, &ctx), 0);

    /* tolerant: the top falls back (X in use), the base refuses */
    assert_int_equal(merge_run(ctx,
                               name,
                               &(struct merge_opts){.mode = MERGE_TOLERANT},
                               &res),
                     0);
    assert_false(res->usable);
    assert_int_equal(res->layers[0].source, MERGE_SRC_ALLOCATION);
    check_clean_line(res->layers[0].reason, "fallback reason");
    check_msg(res->layers[0].reason,
              "fallback reason",
              (const char *const[]){"'X?[1m?'", "in use", NULL});
    check_clean_line(res->error, "tolerant refusal");
    check_msg(res->error,
              "tolerant refusal",
              (const char *const[]){"layer 2", "b?]0;t?.qcow2", NULL});
    merge_result_free(res);

    /* a refusal naming the middle layer's path */
    assert_int_equal(
        merge_run(
            ctx,
            name,
            &(struct merge_opts){.mode = MERGE_STRICT, .top = 1, .base = 3},
            &res),
        0);
    assert_false(res->usable);
    check_clean_line(res->error, "strict refusal");
    check_msg(res->error,
              "strict refusal",
              (const char *const[]){"layer 2", "b?]0;t?.qcow2", NULL});
    merge_result_free(res);

    merge_ctx_free(ctx);
    chain_close(c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_chain),
        cmocka_unit_test(test_missing_in_top),
        cmocka_unit_test(test_gap),
        cmocka_unit_test(test_unusable_at_each_position),
        cmocka_unit_test(test_not_found),
        cmocka_unit_test(test_granularities),
        cmocka_unit_test(test_raw_base),
        cmocka_unit_test(test_unwalkable_directory),
        cmocka_unit_test(test_subranges),
        cmocka_unit_test(test_allocation_fallback),
        cmocka_unit_test(test_layer_sizes),
        cmocka_unit_test(test_random_chains),
        cmocka_unit_test(test_error_after_result),
        cmocka_unit_test(test_hostile_names),
    };

    return cmocka_run_group_tests(tests,
                                  test_tmpdir_setup,
                                  test_tmpdir_teardown);
}

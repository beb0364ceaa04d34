/* qcbt: unit tests for client/digest-index (the digest index of a backup).
 *
 * Indexes are written with dgi_writer and read back through chains of
 * them; every lookup is checked against a shadow model (an array of the
 * contribution each backup gave each granule, written from the definition
 * in digest-index.h).  Broken indexes (a flipped byte, a truncated file,
 * another disk's or another backup's index, blocks whose checksum is
 * right but whose records are out of order or out of range, a header
 * that claims more records than granules) must answer "unknown", never a
 * value, and say what is wrong.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <xxhash.h>

#include "byteorder.h"
#include "digest-index.h"
#include "digest.h"
#include "test-tmpdir.h"

#define NGRAN 3000u /* granules: 17+ blocks of records */
#define SIZE  ((uint64_t)NGRAN * DGI_GRANULE - 4096)

static uint64_t rng_state;

static uint64_t
rng(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* The shadow model: per backup, per granule, written or not and what. */
struct model {
    bool wrote[NGRAN];
    dgi_u128 v[NGRAN];
    dgi_u128 sum;
};

static void
path_of(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", test_tmpdir, name);
}

static void
sum_hex(dgi_u128 sum, char hex[DIGEST_HEX_LEN + 1])
{
    struct gdigest d = {.sum = sum, .size = SIZE};

    gdigest_sum_hex(&d, hex);
}

/* Write an index NAME for model M: each granule written with P_WRITE %,
 * a third of those zeros (runs), the rest random.
 */
static void
make_index(const char *name, struct model *m, unsigned p_write)
{
    struct dgi_writer *w;
    char path[4200];
    uint64_t g;

    memset(m, 0, sizeof *m);
    m->sum = ((dgi_u128)rng() << 64) | rng();
    path_of(path, sizeof path, name);
    assert_int_equal(dgi_writer_open(path, SIZE, &w), 0);
    for (g = 0; g < NGRAN; g++) {
        if (rng() % 100 >= p_write)
            continue;
        m->wrote[g] = true;
        m->v[g] = rng() % 3 == 0 ? 0 : ((dgi_u128)rng() << 64) | rng();
        assert_int_equal(dgi_writer_add(w, g, m->v[g]), 0);
    }
    assert_int_equal(dgi_writer_finish(w, m->sum), 0);
}

/* Look up every STEP-th granule through chain C of models MS (newest
 * first, the last a full backup when LAST_FULL) and compare.  Returns how
 * many lookups answered.
 */
static unsigned
check_chain(struct dgi_chain *c,
            struct model **ms,
            size_t n,
            bool last_full,
            unsigned step)
{
    unsigned answered = 0;
    uint64_t g;

    for (g = 0; g < NGRAN; g += step) {
        dgi_u128 v = 7, want = 0;
        bool known = false;
        size_t i;

        for (i = 0; i < n; i++)
            if (ms[i]->wrote[g]) {
                want = ms[i]->v[g];
                known = true;
                break;
            }
        if (!known && last_full) {
            want = 0;
            known = true;
        }
        if (dgi_chain_lookup(c, g, &v)) {
            assert_true(known);
            assert_true(v == want);
            answered++;
        } else {
            assert_false(known);
        }
    }
    return answered;
}

static struct dgi_chain *
open_chain(const char **names, struct model **ms, size_t n, bool last_full)
{
    struct dgi_chain *c = dgi_chain_new(SIZE);
    char path[4200], hex[DIGEST_HEX_LEN + 1], why[256];
    size_t i;

    assert_non_null(c);
    for (i = 0; i < n; i++) {
        path_of(path, sizeof path, names[i]);
        sum_hex(ms[i]->sum, hex);
        assert_int_equal(
            dgi_chain_add(c, path, hex, last_full && i + 1 == n, why, 256),
            0);
        assert_string_equal(why, "");
    }
    return c;
}

static void
test_chain_lookups(void **state)
{
    static struct model full, inc1, inc2;
    struct model *ms[] = {&inc2, &inc1, &full};
    const char *names[] = {"i2.dgi", "i1.dgi", "full.dgi"};
    unsigned step;

    (void)state;
    rng_state = 1;
    make_index("full.dgi", &full, 90);
    make_index("i1.dgi", &inc1, 30);
    make_index("i2.dgi", &inc2, 5);
    /* Dense walks, sparse ones (galloping over blocks), one lookup. */
    for (step = 1; step < NGRAN; step = step * 3 + 1) {
        struct dgi_chain *c = open_chain(names, ms, 3, true);
        char why[256];

        assert_int_equal(check_chain(c, ms, 3, true, step),
                         (NGRAN + step - 1) / step);
        assert_false(dgi_chain_broken(c, why, sizeof why));
        assert_true(dgi_chain_bytes_read(c) > 0);
        dgi_chain_free(c);
    }
    /* Without the full backup at the bottom, unlisted means unknown. */
    {
        struct dgi_chain *c = open_chain(names, ms, 2, false);

        check_chain(c, ms, 2, false, 1);
        dgi_chain_free(c);
    }
}

/* A dense walk reads each block once, a walk that skips blocks each at
 * most once, a walk to a late granule a few.
 */
static void
test_reads_bounded(void **state)
{
    static struct model full;
    struct model *ms[] = {&full};
    const char *names[] = {"full.dgi"};
    struct dgi_chain *c;
    uint64_t file = DGI_HEADER_SIZE, nrec = 0, g;
    dgi_u128 v;

    (void)state;
    rng_state = 2;
    make_index("full.dgi", &full, 100);
    for (g = 0; g < NGRAN; g++)
        nrec += g == 0 || full.v[g] != 0 || full.v[g - 1] != 0;
    file += nrec * DGI_RECORD_SIZE + (nrec + DGI_BLOCK_RECORDS - 1) /
                                         DGI_BLOCK_RECORDS * DGI_TRAILER_SIZE;
    c = open_chain(names, ms, 1, true);
    check_chain(c, ms, 1, true, 1);
    assert_true(dgi_chain_bytes_read(c) == file);
    dgi_chain_free(c);
    /* Lookups a block or two apart: still each block at most once. */
    c = open_chain(names, ms, 1, true);
    for (g = 0; g < NGRAN; g += 250) {
        assert_int_equal(dgi_chain_lookup(c, g, &v), 1);
        assert_true(v == full.v[g]);
    }
    assert_true(dgi_chain_bytes_read(c) <= file);
    dgi_chain_free(c);
    c = open_chain(names, ms, 1, true);
    assert_int_equal(dgi_chain_lookup(c, NGRAN - 1, &v), 1);
    assert_true(v == full.v[NGRAN - 1]);
    /* header + about 2 log2(blocks) probes */
    assert_true(dgi_chain_bytes_read(c) <=
                DGI_HEADER_SIZE + 12 * DGI_BLOCK_SIZE);
    dgi_chain_free(c);
}

/* Open NAME as the only (full) backup of a chain with the sum of M: its
 * WHY, or "" when it is usable.
 */
static struct dgi_chain *
open_one(const char *name, const struct model *m, uint64_t size, char *why)
{
    struct dgi_chain *c = dgi_chain_new(size);
    char path[4200], hex[DIGEST_HEX_LEN + 1];

    assert_non_null(c);
    path_of(path, sizeof path, name);
    sum_hex(m->sum, hex);
    assert_int_equal(dgi_chain_add(c, path, hex, true, why, 256), 0);
    return c;
}

static void
copy_file(const char *from, const char *to, off_t len)
{
    char a[4200], b[4200], buf[1 << 16];
    int in, out;
    ssize_t n;

    path_of(a, sizeof a, from);
    path_of(b, sizeof b, to);
    in = open(a, O_RDONLY);
    out = open(b, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(in >= 0 && out >= 0);
    while ((n = read(in, buf, sizeof buf)) > 0)
        assert_int_equal(write(out, buf, n), n);
    if (len >= 0)
        assert_int_equal(ftruncate(out, len), 0);
    close(in);
    close(out);
}

static void
poke(const char *name, off_t off, const void *bytes, size_t len)
{
    char path[4200];
    int fd;

    path_of(path, sizeof path, name);
    fd = open(path, O_WRONLY);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, bytes, len, off), (ssize_t)len);
    close(fd);
}

static void
test_broken_open(void **state)
{
    static struct model full, other;
    struct dgi_chain *c;
    char why[256], path[4200];
    unsigned char b;
    dgi_u128 v;

    (void)state;
    rng_state = 3;
    make_index("good.dgi", &full, 90);

    /* Missing. */
    c = open_one("none.dgi", &full, SIZE, why);
    assert_non_null(strstr(why, "No such file"));
    assert_int_equal(dgi_chain_lookup(c, 0, &v), 0);
    dgi_chain_free(c);
    /* No index recorded. */
    c = dgi_chain_new(SIZE);
    assert_int_equal(dgi_chain_add(c, NULL, NULL, true, why, 256), 0);
    assert_string_equal(why, "none recorded");
    assert_int_equal(dgi_chain_lookup(c, 0, &v), 0);
    dgi_chain_free(c);
    /* Truncated by a byte, and to less than a header. */
    copy_file("good.dgi", "trunc.dgi", 4000);
    c = open_one("trunc.dgi", &full, SIZE, why);
    assert_non_null(strstr(why, "truncated"));
    assert_int_equal(dgi_chain_lookup(c, 5, &v), 0);
    dgi_chain_free(c);
    copy_file("good.dgi", "short.dgi", 10);
    c = open_one("short.dgi", &full, SIZE, why);
    assert_non_null(strstr(why, "truncated header"));
    dgi_chain_free(c);
    /* Another backup's sum, another disk's size. */
    other = full;
    other.sum++;
    c = open_one("good.dgi", &other, SIZE, why);
    assert_non_null(strstr(why, "does not match the manifest"));
    dgi_chain_free(c);
    c = open_one("good.dgi", &full, SIZE + 512, why);
    assert_non_null(strstr(why, "for a disk of"));
    dgi_chain_free(c);
    /* A flipped header byte. */
    copy_file("good.dgi", "hdr.dgi", -1);
    b = 0x55;
    poke("hdr.dgi", 20, &b, 1);
    c = open_one("hdr.dgi", &full, SIZE, why);
    assert_non_null(strstr(why, "header checksum"));
    dgi_chain_free(c);
    /* Not a file. */
    path_of(path, sizeof path, "dir.dgi");
    assert_int_equal(mkdir(path, 0755), 0);
    c = open_one("dir.dgi", &full, SIZE, why);
    assert_string_not_equal(why, "");
    dgi_chain_free(c);
}

/* A byte flipped in block 5: lookups before it answer, from it on they
 * do not, and the chain says which file and block.
 */
static void
test_broken_block(void **state)
{
    static struct model full;
    struct dgi_chain *c;
    char why[256];
    uint64_t g, first_bad = UINT64_MAX;
    unsigned char b = 0xff;
    dgi_u128 v;

    (void)state;
    rng_state = 4;
    make_index("flip.dgi", &full, 100);
    poke("flip.dgi", DGI_HEADER_SIZE + 5 * DGI_BLOCK_SIZE + 100, &b, 1);
    c = open_one("flip.dgi", &full, SIZE, why);
    assert_string_equal(why, "");
    for (g = 0; g < NGRAN; g++) {
        if (dgi_chain_lookup(c, g, &v)) {
            assert_true(first_bad == UINT64_MAX);
            assert_true(v == full.v[g]);
        } else if (first_bad == UINT64_MAX) {
            first_bad = g;
        }
    }
    assert_true(first_bad != UINT64_MAX && first_bad > 0);
    assert_true(dgi_chain_broken(c, why, sizeof why));
    assert_non_null(strstr(why, "flip.dgi: block 5: checksum mismatch"));
    assert_false(dgi_chain_broken(c, why, sizeof why)); /* said once */
    dgi_chain_free(c);
}

/* Write a one-block index by hand: records RECS (key, hi, lo), header
 * claiming NREC_CLAIM records (or the real count).
 */
static void
craft(const char *name,
      const uint64_t (*recs)[3],
      unsigned n,
      uint64_t nrec_claim,
      dgi_u128 sum)
{
    unsigned char h[DGI_HEADER_SIZE] = {0};
    unsigned char blk[DGI_BLOCK_SIZE];
    char path[4200];
    unsigned i;
    int fd;

    memcpy(h, "QCBTDGI1", 8);
    put_be32(h + 8, 1);
    put_be32(h + 12, DGI_GRANULE_BITS);
    put_be64(h + 16, SIZE);
    put_be64(h + 24, nrec_claim);
    put_be64(h + 32, (uint64_t)(sum >> 64));
    put_be64(h + 40, (uint64_t)sum);
    put_be64(h + 56, XXH64(h, 56, 0));
    for (i = 0; i < n; i++) {
        put_be64(blk + i * DGI_RECORD_SIZE, recs[i][0]);
        put_be64(blk + i * DGI_RECORD_SIZE + 8, recs[i][1]);
        put_be64(blk + i * DGI_RECORD_SIZE + 16, recs[i][2]);
    }
    put_be32(blk + n * DGI_RECORD_SIZE, n);
    put_be32(blk + n * DGI_RECORD_SIZE + 4, 0);
    put_be64(blk + n * DGI_RECORD_SIZE + 8,
             XXH64(blk, (size_t)n * DGI_RECORD_SIZE, 0));
    path_of(path, sizeof path, name);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, h, sizeof h), (ssize_t)sizeof h);
    assert_int_equal(write(fd, blk, n * DGI_RECORD_SIZE + DGI_TRAILER_SIZE),
                     (ssize_t)(n * DGI_RECORD_SIZE + DGI_TRAILER_SIZE));
    close(fd);
}

static void
test_hostile_records(void **state)
{
    static const struct {
        const char *what;
        uint64_t recs[3][3];
    } cases[] = {
        {"descending", {{10, 0, 1}, {5, 0, 2}, {20, 0, 3}}},
        {"overlapping run", {{10 | DGI_KEY_RUN, 0, 5}, {12, 0, 2}, {20, 0, 3}}},
        {"run of none", {{10 | DGI_KEY_RUN, 0, 0}, {12, 0, 2}, {20, 0, 3}}},
        {"run past the end",
         {{10, 0, 1}, {12 | DGI_KEY_RUN, 0, NGRAN}, {0, 0, 0}}},
        {"huge run", {{10, 0, 1}, {12 | DGI_KEY_RUN, 1, 1}, {0, 0, 0}}},
        {"granule past the end", {{10, 0, 1}, {NGRAN, 0, 2}, {0, 0, 0}}},
        {"key bits", {{10, 0, 1}, {1ULL << 50, 0, 2}, {0, 0, 0}}},
    };
    struct model m = {.sum = 42};
    char why[256];
    size_t k;
    dgi_u128 v;

    (void)state;
    for (k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        unsigned n = cases[k].recs[2][0] || cases[k].recs[2][2] ? 3 : 2;
        struct dgi_chain *c;

        craft("h.dgi", cases[k].recs, n, n, m.sum);
        c = open_one("h.dgi", &m, SIZE, why);
        assert_string_equal(why, "");
        assert_int_equal(dgi_chain_lookup(c, 1, &v), 0);
        assert_true(dgi_chain_broken(c, why, sizeof why));
        if (!strstr(why, "out of order or range"))
            fail_msg("%s: %s", cases[k].what, why);
        dgi_chain_free(c);
    }
    /* A header claiming more records than granules. */
    craft("h.dgi", cases[0].recs, 1, (uint64_t)NGRAN + 1, m.sum);
    {
        struct dgi_chain *c = open_one("h.dgi", &m, SIZE, why);

        assert_non_null(strstr(why, "more records than granules"));
        dgi_chain_free(c);
    }
    /* A well-formed crafted one is read as written. */
    {
        static const uint64_t ok[3][3] = {{3, 0, 9},
                                          {5 | DGI_KEY_RUN, 0, 4},
                                          {9, 1, 0}};
        struct dgi_chain *c;

        craft("h.dgi", ok, 3, 3, m.sum);
        c = open_one("h.dgi", &m, SIZE, why);
        assert_string_equal(why, "");
        assert_int_equal(dgi_chain_lookup(c, 3, &v), 1);
        assert_true(v == 9);
        assert_int_equal(dgi_chain_lookup(c, 6, &v), 1);
        assert_true(v == 0);
        assert_int_equal(dgi_chain_lookup(c, 9, &v), 1);
        assert_true(v == (dgi_u128)1 << 64);
        assert_int_equal(dgi_chain_lookup(c, 10, &v), 1); /* full: zero */
        assert_true(v == 0);
        dgi_chain_free(c);
    }
}

/* The writer refuses granules out of order or past the disk. */
static void
test_writer_order(void **state)
{
    struct dgi_writer *w;
    char path[4200];

    (void)state;
    path_of(path, sizeof path, "w.dgi");
    assert_int_equal(dgi_writer_open(path, SIZE, &w), 0);
    assert_int_equal(dgi_writer_add(w, 5, 1), 0);
    assert_int_equal(dgi_writer_add(w, 5, 1), -EINVAL);
    assert_int_equal(dgi_writer_add(w, NGRAN, 1), -EINVAL);
    dgi_writer_abort(w);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chain_lookups),
        cmocka_unit_test(test_reads_bounded),
        cmocka_unit_test(test_broken_open),
        cmocka_unit_test(test_broken_block),
        cmocka_unit_test(test_hostile_records),
        cmocka_unit_test(test_writer_order),
    };

    return cmocka_run_group_tests(tests,
                                  test_tmpdir_setup,
                                  test_tmpdir_teardown);
}

/* qcbt unit tests: the qcow2 writer (common/qcow2/qcow2-writer.c).
 *
 * Shadow-model tests: random writes, zero requests and untouched ranges at
 * fixed seeds are applied both to the writer and to an in-memory model of
 * the guest; the image is then reopened with our reader (chain_open +
 * chain_read, qcow2_open + qcow2_map) and every byte is compared, every
 * cluster's kind is checked against what the model says it must be, no
 * two guest clusters share a host cluster and every data cluster has
 * refcount 1.  Cluster sizes 512 B .. 2 MiB, sizes that are not cluster
 * (or sector) multiples, overwrites, partial clusters completed from a
 * backing file through the fill callback, tiny write-behind buffers (so
 * in-place rewrites hit clusters already flushed) and the error paths.
 * Images live in a private mkdtemp() directory.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
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

#include "byteorder.h"
#include "chain.h"
#include "error.h"
#include "io.h"
#include "qcow2.h"
#include "qcow2-writer.h"

#define KiB 1024ULL
#define MiB (1024ULL * 1024)
#define GiB (1024ULL * 1024 * 1024)

static char tmpdir[] = "/tmp/qcbt-writer-XXXXXX";

/* ------------------------------------------------------------------ */
/* Helpers */

static uint64_t rng_state;

static uint64_t
rng(void)
{
    uint64_t x = rng_state;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng_state = x;
    return x;
}

static uint64_t
rng_below(uint64_t n)
{
    return n ? rng() % n : 0;
}

static void
random_bytes(unsigned char *p, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++)
        p[i] = (unsigned char)(rng() >> 24);
}

static char *
tmp_path(const char *name)
{
    char *p;

    assert_true(asprintf(&p, "%s/%s", tmpdir, name) > 0);
    unlink(p);
    return p;
}

static void
write_file(const char *path, const void *buf, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, buf, len), (ssize_t)len);
    assert_int_equal(close(fd), 0);
}

static void
read_header(const char *path, unsigned char *buf, size_t len)
{
    int fd = open(path, O_RDONLY);

    assert_true(fd >= 0);
    assert_int_equal(pread(fd, buf, len, 0), (ssize_t)len);
    close(fd);
}

static uint64_t
file_size(const char *path)
{
    struct stat st;

    assert_int_equal(stat(path, &st), 0);
    return (uint64_t)st.st_size;
}

static void
expect_error(int r, int errnum, const char *needle)
{
    if (r != -errnum || strstr(qcbt_error_get(), needle) == NULL)
        fail_msg("expected -%d with '%s', got %d: %s",
                 errnum,
                 needle,
                 r,
                 qcbt_error_get());
    /* One line. */
    assert_null(strchr(qcbt_error_get(), '\n'));
}

/* ------------------------------------------------------------------ */
/* The model */

enum kind { K_UNALLOC, K_ZERO, K_DATA, K_ZERO_OR_DATA };

struct model {
    uint64_t size; /* rounded */
    uint32_t cs;
    unsigned char *guest; /* what the image must read as */
    unsigned char *below; /* what the backing chain reads as */
    enum kind *kinds;     /* per cluster */
    uint64_t nr_clusters;
    unsigned fill_calls;
    unsigned fail_call; /* make fill call number N fail (0: none) */
    uint64_t fill_bytes;
};

static int
model_fill(void *opaque, void *buf, size_t len, uint64_t offset)
{
    struct model *m = opaque;

    m->fill_calls++;
    m->fill_bytes += len;
    if (m->fill_calls == m->fail_call)
        return qcbt_error(EIO, "backing read failed (test)");
    /* The contract: never beyond the virtual size, never a whole cluster,
     * never across a cluster boundary.
     */
    assert_true(len > 0 && len < m->cs);
    assert_true(offset + len <= m->size);
    assert_true(offset / m->cs == (offset + len - 1) / m->cs);
    memcpy(buf, m->below + offset, len);
    return 0;
}

static void
model_init(struct model *m, uint64_t size, uint32_t cs, bool backing)
{
    memset(m, 0, sizeof *m);
    m->size = (size + 511) & ~511ULL;
    m->cs = cs;
    m->nr_clusters = (m->size + cs - 1) / cs;
    m->guest = calloc(m->size ? m->size : 1, 1);
    m->below = calloc(m->size ? m->size : 1, 1);
    m->kinds = calloc(m->nr_clusters ? m->nr_clusters : 1, sizeof *m->kinds);
    assert_non_null(m->guest);
    assert_non_null(m->below);
    assert_non_null(m->kinds);
    if (backing) {
        random_bytes(m->below, m->size);
        /* Some zero stretches below, so that partial zero requests can
         * end up all-zero.
         */
        memset(m->below, 0, m->size / 4);
        memcpy(m->guest, m->below, m->size);
    }
}

static void
model_free(struct model *m)
{
    free(m->guest);
    free(m->below);
    free(m->kinds);
}

static uint64_t
cluster_end(struct model *m, uint64_t c)
{
    uint64_t e = (c + 1) * m->cs;

    return e < m->size ? e : m->size;
}

static void
model_apply(struct model *m,
            const unsigned char *src,
            uint64_t off,
            uint64_t len)
{
    uint64_t c, a, b;

    if (len == 0)
        return;
    if (src)
        memcpy(m->guest + off, src, len);
    else
        memset(m->guest + off, 0, len);
    for (c = off / m->cs; c <= (off + len - 1) / m->cs; c++) {
        a = c * m->cs;
        b = cluster_end(m, c);
        bool whole = off <= a && off + len >= b;

        if (src) {
            m->kinds[c] = K_DATA;
        } else if (whole) {
            m->kinds[c] = K_ZERO;
        } else if (m->kinds[c] == K_UNALLOC) {
            /* Fill + zeros: a zero cluster if it all reads as zero. */
            m->kinds[c] = K_ZERO_OR_DATA;
        } else if (m->kinds[c] == K_ZERO_OR_DATA) {
            m->kinds[c] = K_ZERO_OR_DATA;
        }
    }
}

/* Reopen PATH with our reader and compare with the model: bytes, kinds,
 * no shared host clusters, refcount 1 on every data cluster.
 */
static void
model_verify(struct model *m, const char *path, bool has_backing)
{
    struct chain *c = NULL;
    struct chain_open_opts copts = {.no_backing = false};
    struct qcow2_image *img;
    unsigned char *got;
    uint64_t cl, *hosts, nr_hosts = 0, off, i;
    int r;

    r = chain_open(path, &copts, &c);
    if (r < 0)
        fail_msg("chain_open %s: %s", path, qcbt_error_get());
    assert_int_equal(c->size, m->size);
    assert_int_equal(c->nr_layers, has_backing ? 2 : 1);
    img = c->layers[0].qcow2;
    assert_non_null(img);
    assert_int_equal(img->cluster_size, m->cs);

    got = malloc(m->size ? m->size : 1);
    assert_non_null(got);
    if (m->size) {
        r = chain_read(c, got, m->size, 0);
        if (r < 0)
            fail_msg("chain_read: %s", qcbt_error_get());
    }
    for (off = 0; off < m->size; off++)
        if (got[off] != m->guest[off])
            fail_msg("%s: guest byte %" PRIu64 " (cluster %" PRIu64
                     "): image %#x, model %#x",
                     path,
                     off,
                     off / m->cs,
                     got[off],
                     m->guest[off]);
    free(got);

    hosts = calloc(m->nr_clusters ? m->nr_clusters : 1, sizeof *hosts);
    assert_non_null(hosts);
    for (cl = 0; cl < m->nr_clusters; cl++) {
        struct qcow2_extent ext;
        uint64_t a = cl * m->cs;
        uint64_t refcount = 0;

        r = qcow2_map(img, a, cluster_end(m, cl) - a, &ext);
        if (r < 0)
            fail_msg("qcow2_map: %s", qcbt_error_get());
        switch (m->kinds[cl]) {
        case K_UNALLOC:
            if (ext.kind != QCOW2_UNALLOCATED)
                fail_msg("cluster %" PRIu64 " kind %d, want unallocated",
                         cl,
                         ext.kind);
            break;
        case K_ZERO:
            if (ext.kind != QCOW2_ZERO || ext.offset_valid)
                fail_msg("cluster %" PRIu64 " kind %d, want zero",
                         cl,
                         ext.kind);
            break;
        case K_DATA:
            if (ext.kind != QCOW2_DATA)
                fail_msg("cluster %" PRIu64 " kind %d, want data",
                         cl,
                         ext.kind);
            break;
        case K_ZERO_OR_DATA:
            if (ext.kind != QCOW2_DATA && ext.kind != QCOW2_ZERO)
                fail_msg("cluster %" PRIu64 " kind %d, want zero or data",
                         cl,
                         ext.kind);
            break;
        }
        if (ext.kind == QCOW2_DATA) {
            assert_int_equal(ext.host_offset % m->cs, 0);
            r = qcow2_get_refcount(img, ext.host_offset / m->cs, &refcount);
            assert_int_equal(r, 0);
            if (refcount != 1)
                fail_msg("cluster %" PRIu64 ": host cluster %" PRIu64
                         " has refcount %" PRIu64,
                         cl,
                         ext.host_offset,
                         refcount);
            hosts[nr_hosts++] = ext.host_offset;
        }
    }
    /* Every data cluster has its own host cluster, and none is cluster 0. */
    for (i = 0; i < nr_hosts; i++) {
        uint64_t j;

        assert_true(hosts[i] >= m->cs);
        for (j = i + 1; j < nr_hosts; j++)
            if (hosts[i] == hosts[j])
                fail_msg("two guest clusters share host offset %" PRIu64,
                         hosts[i]);
    }
    free(hosts);
    chain_close(c);
}

/* ------------------------------------------------------------------ */
/* Random runs */

struct run_params {
    uint32_t cs;
    uint64_t size; /* as passed to the writer */
    uint64_t seed;
    unsigned nr_ops;
    size_t buffer;   /* 0 = default */
    int backing;     /* 0 none, 1 raw, 2 qcow2 written by the writer */
    size_t l2_cache; /* 0 = default */
};

/* Write the model's "below" bytes as the backing file. */
static void
make_backing(struct model *m, int kind, const char *path)
{
    if (kind == 1) {
        write_file(path, m->below, m->size);
        return;
    }
    struct qcow2_writer_opts o = {.size = m->size, .cluster_size = m->cs};
    struct qcow2_writer *w;
    uint64_t off, n;

    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    /* Data in uneven chunks, leaving the zero quarter unallocated except
     * for one zero request.
     */
    for (off = m->size / 4; off < m->size; off += n) {
        n = 1 + rng_below(3 * m->cs);
        if (n > m->size - off)
            n = m->size - off;
        if (qcow2_writer_write(w, m->below + off, n, off) < 0)
            fail_msg("%s", qcbt_error_get());
    }
    if (m->size >= 2 * m->cs)
        assert_int_equal(qcow2_writer_zero(w, m->cs / 2, m->cs), 0);
    assert_int_equal(qcow2_writer_close(w), 0);
}

static void
random_run(const struct run_params *p)
{
    struct model m;
    struct qcow2_writer_opts o = {0};
    struct qcow2_writer *w;
    char *path = tmp_path("random.qcow2");
    char *bpath = tmp_path(p->backing == 1 ? "base.raw" : "base.qcow2");
    unsigned char *data;
    unsigned i;

    rng_state = p->seed * 0x9e3779b97f4a7c15ULL + 1;
    model_init(&m, p->size, p->cs, p->backing != 0);
    if (p->backing)
        make_backing(&m, p->backing, bpath);

    o.size = p->size;
    o.cluster_size = p->cs;
    o.buffer_size = p->buffer;
    o.l2_cache_size = p->l2_cache;
    if (p->backing) {
        o.backing_file = p->backing == 1 ? "base.raw" : "base.qcow2";
        o.backing_fmt = p->backing == 1 ? "raw" : "qcow2";
        o.fill = model_fill;
        o.fill_opaque = &m;
    }
    if (qcow2_writer_create(path, &o, &w) < 0)
        fail_msg("%s", qcbt_error_get());
    assert_int_equal(qcow2_writer_size(w), m.size);
    assert_int_equal(qcow2_writer_cluster_size(w), p->cs);

    data = malloc(4 * p->cs);
    assert_non_null(data);
    for (i = 0; i < p->nr_ops; i++) {
        uint64_t op = rng_below(10), off, len, maxlen;

        /* Offsets: aligned, unaligned, near the end. */
        switch (rng_below(4)) {
        case 0:
            off = rng_below(m.nr_clusters) * p->cs;
            break;
        case 1:
            off = m.size > p->cs ? m.size - 1 - rng_below(p->cs) : 0;
            break;
        default:
            off = rng_below(m.size);
            break;
        }
        if (off >= m.size)
            continue;
        maxlen = m.size - off;
        switch (rng_below(4)) {
        case 0:
            len = p->cs;
            break;
        case 1:
            len = 1 + rng_below(p->cs / 2);
            break;
        default:
            len = 1 + rng_below(3 * p->cs);
            break;
        }
        if (len > maxlen)
            len = maxlen;
        if (op < 6) {
            random_bytes(data, len);
            if (qcow2_writer_write(w, data, len, off) < 0)
                fail_msg("write %" PRIu64 "+%" PRIu64 ": %s",
                         off,
                         len,
                         qcbt_error_get());
            model_apply(&m, data, off, len);
        } else if (op < 9) {
            if (qcow2_writer_zero(w, off, len) < 0)
                fail_msg("zero %" PRIu64 "+%" PRIu64 ": %s",
                         off,
                         len,
                         qcbt_error_get());
            model_apply(&m, NULL, off, len);
        } else {
            /* Leave it alone: the range stays as it is. */
        }
    }
    free(data);
    if (p->l2_cache) {
        size_t resident;
        uint64_t loads, stores;

        qcow2_writer_l2_stats(w, &resident, &loads, &stores);
        assert_true(resident <= 4);
        assert_true(loads > 0);
        assert_true(stores > loads);
    }
    if (qcow2_writer_close(w) < 0)
        fail_msg("close: %s", qcbt_error_get());
    model_verify(&m, path, p->backing != 0);

    model_free(&m);
    unlink(path);
    unlink(bpath);
    free(path);
    free(bpath);
}

static void
test_random_512(void **state)
{
    struct run_params p = {512, 150 * 512, 1, 400, 0, 0, 0};

    random_run(&p);
    p.seed = 2;
    p.buffer = 512; /* one cluster: every rewrite hits the file */
    random_run(&p);
}

static void
test_random_4k(void **state)
{
    struct run_params p = {4096, 97 * 4096 + 1536, 3, 400, 0, 0, 0};

    random_run(&p);
    p.seed = 4;
    p.size = 50 * 4096 + 100; /* not a sector multiple: rounded up */
    p.buffer = 3 * 4096;
    random_run(&p);
}

static void
test_random_64k(void **state)
{
    struct run_params p = {65536, 41 * 65536 + 7 * 512, 5, 300, 0, 0, 0};

    random_run(&p);
    p.seed = 6;
    p.buffer = 100000; /* rounded up to two clusters */
    random_run(&p);
}

static void
test_random_2m(void **state)
{
    struct run_params p = {2 * MiB, 9 * 2 * MiB + 4096, 7, 80, 0, 0, 0};

    random_run(&p);
}

/* More L2 tables than the writer keeps in memory, written in random
 * order: tables leave memory, are read back (from the file, or from the
 * write-behind buffer) and rewritten in place.
 */
static void
test_random_l2_evict(void **state)
{
    /* 512-byte clusters: a table maps 32 KiB; 40 of them, 4 in memory. */
    struct run_params p = {512, 40 * 32768 + 1024, 11, 1500, 0, 0, 1};

    random_run(&p);
    p.seed = 12;
    p.buffer = 512; /* every table read back from the file */
    random_run(&p);
    /* 4 KiB clusters: a table maps 2 MiB; 9 of them, 4 in memory, and
     * partial clusters filled from a backing file.
     */
    p = (struct run_params){4096, 17 * MiB + 4096, 13, 1500, 8192, 1, 1};
    random_run(&p);
}

static void
test_random_backing_raw(void **state)
{
    static const uint32_t sizes[] = {512, 4096, 65536};
    size_t i;

    for (i = 0; i < 3; i++) {
        struct run_params p =
            {sizes[i], 33 * sizes[i] + 512, 10 + i, 300, 0, 1, 0};

        random_run(&p);
        p.seed += 100;
        p.buffer = sizes[i];
        random_run(&p);
    }
}

static void
test_random_backing_qcow2(void **state)
{
    static const uint32_t sizes[] = {512, 4096, 65536, 2 * MiB};
    size_t i;

    for (i = 0; i < 4; i++) {
        struct run_params p = {sizes[i],
                               21 * sizes[i] + 1024,
                               20 + i,
                               sizes[i] == 2 * MiB ? 60 : 250,
                               0,
                               2,
                               0};

        random_run(&p);
    }
}

/* ------------------------------------------------------------------ */
/* Targeted cases */

static void
test_empty_image(void **state)
{
    static const uint32_t sizes[] = {512, 4096, 8192, 65536, 2 * MiB};
    size_t i;

    for (i = 0; i < 5; i++) {
        struct qcow2_writer_opts o = {.size = 10 * MiB,
                                      .cluster_size = sizes[i]};
        struct qcow2_writer *w;
        char *path = tmp_path("empty.qcow2");
        unsigned char h[512];
        struct model m;
        struct qcbt_io *io;
        struct qcow2_image *img;

        assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
        assert_int_equal(qcow2_writer_close(w), 0);
        read_header(path, h, sizeof h);
        assert_int_equal(get_be32(h), QCOW2_MAGIC);
        assert_int_equal(get_be32(h + 4), 3);
        assert_int_equal(get_be64(h + 8), 0);  /* no backing */
        assert_int_equal(get_be64(h + 72), 0); /* incompatible */
        assert_int_equal(get_be64(h + 80), 0); /* compatible */
        assert_int_equal(get_be64(h + 88), 0); /* autoclear */
        assert_int_equal(get_be32(h + 96), 4); /* refcount_order */
        assert_int_equal(get_be32(h + 100), 112);
        assert_int_equal(h[104], 0);
        /* Feature table as qemu 7.2: only above 4 KiB clusters. */
        if (sizes[i] > 4096) {
            assert_int_equal(get_be32(h + 112), QCOW2_EXT_FEATURES);
            assert_int_equal(get_be32(h + 116), 8 * 48);
        } else {
            assert_int_equal(get_be32(h + 112), QCOW2_EXT_END);
        }

        assert_int_equal(qcbt_io_open_file(path, &io), 0);
        assert_int_equal(qcow2_open(io, &img), 0);
        assert_int_equal(img->size, 10 * MiB);
        assert_null(img->backing_name);
        if (sizes[i] > 4096) {
            assert_int_equal(img->nr_features, 8);
            assert_string_equal(img->features[4].name, "extended L2 entries");
        }
        qcow2_close(img);

        model_init(&m, 10 * MiB, sizes[i], false);
        model_verify(&m, path, false);
        model_free(&m);
        /* Header, L1, refcount table, one refcount block. */
        uint64_t cs = sizes[i];
        uint64_t l1_entries = (10 * MiB + cs * (cs / 8) - 1) / (cs * (cs / 8));
        uint64_t l1_clusters = (l1_entries * 8 + cs - 1) / cs;
        assert_int_equal(file_size(path), (3 + l1_clusters) * sizes[i]);
        unlink(path);
        free(path);
    }
}

static void
test_zero_size(void **state)
{
    struct qcow2_writer_opts o = {.size = 0};
    struct qcow2_writer *w;
    char *path = tmp_path("zero-size.qcow2");
    struct chain *c;
    char b;

    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    assert_int_equal(qcow2_writer_write(w, &b, 0, 0), 0);
    expect_error(qcow2_writer_write(w, &b, 1, 0), EINVAL, "beyond");
    assert_int_equal(qcow2_writer_close(w), 0);
    assert_int_equal(chain_open(path, NULL, &c), 0);
    assert_int_equal(c->size, 0);
    chain_close(c);
    unlink(path);
    free(path);
}

static void
test_backing_header(void **state)
{
    struct qcow2_writer_opts o = {.size = 1 * MiB,
                                  .cluster_size = 512,
                                  .backing_file = "../dir/base.qcow2",
                                  .backing_fmt = "qcow2"};
    struct qcow2_writer *w;
    char *path = tmp_path("ovl.qcow2");
    char name[1100];
    struct qcbt_io *io;
    struct qcow2_image *img;
    int r;

    /* Stored exactly as given; the backing file need not exist yet. */
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    assert_int_equal(qcbt_io_open_file(path, &io), 0);
    assert_int_equal(qcow2_open(io, &img), 0);
    assert_string_equal(img->backing_name, "../dir/base.qcow2");
    assert_string_equal(img->backing_fmt, "qcow2");
    qcow2_close(img);

    /* 512-byte clusters: 112 + 16 (fmt) + 8 (end) leave 376 bytes. */
    memset(name, 'a', sizeof name);
    name[376] = '\0';
    o.backing_file = name;
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    name[376] = 'a';
    name[377] = '\0';
    r = qcow2_writer_create(path, &o, &w);
    expect_error(r, ENAMETOOLONG, "does not fit");
    assert_null(w);

    /* 64 KiB: up to 1023 bytes, the feature table before the name. */
    o.cluster_size = 65536;
    memset(name, 'a', sizeof name);
    name[1023] = '\0';
    o.backing_fmt = "raw";
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    assert_int_equal(qcbt_io_open_file(path, &io), 0);
    assert_int_equal(qcow2_open(io, &img), 0);
    assert_int_equal(strlen(img->backing_name), 1023);
    assert_string_equal(img->backing_fmt, "raw");
    assert_int_equal(img->nr_features, 8);
    assert_int_equal(img->hdr.backing_file_offset, 112 + 16 + 392 + 8);
    qcow2_close(img);
    name[1023] = 'a';
    name[1024] = '\0';
    expect_error(qcow2_writer_create(path, &o, &w), ENAMETOOLONG, "1024");

    unlink(path);
    free(path);
}

static void
test_bad_opts(void **state)
{
    struct qcow2_writer_opts o = {.size = MiB};
    struct qcow2_writer *w;
    char *path = tmp_path("bad.qcow2");
    static const uint32_t bad_cs[] = {256, 3 * 4096, 4 * MiB, 1};
    size_t i;

    for (i = 0; i < 4; i++) {
        o.cluster_size = bad_cs[i];
        expect_error(qcow2_writer_create(path, &o, &w), EINVAL, "cluster size");
        assert_null(w);
    }
    /* Nothing was created for a refused option. */
    assert_int_equal(access(path, F_OK), -1);

    o.cluster_size = 0;
    o.backing_fmt = "raw";
    expect_error(qcow2_writer_create(path, &o, &w), EINVAL, "without");
    o.backing_file = "base";
    o.backing_fmt = NULL;
    expect_error(qcow2_writer_create(path, &o, &w), EINVAL, "format");
    o.backing_fmt = "abcdefghijklmnop";
    expect_error(qcow2_writer_create(path, &o, &w), EINVAL, "format");

    /* 512-byte clusters: an L1 entry maps 32 KiB, 32 MiB of L1 = 128 GiB. */
    o.backing_file = NULL;
    o.backing_fmt = NULL;
    o.cluster_size = 512;
    o.size = 128 * GiB + 512;
    expect_error(qcow2_writer_create(path, &o, &w), EFBIG, "L1");
    o.size = UINT64_MAX;
    expect_error(qcow2_writer_create(path, &o, &w), EFBIG, "too large");
    free(path);
}

/* Every path through do_cluster() on one image, with exact fill calls. */
static void
test_overwrite_and_fill(void **state)
{
    const uint32_t cs = 4096;
    struct model m;
    struct qcow2_writer_opts o = {.cluster_size = cs,
                                  .backing_file = "base.raw",
                                  .backing_fmt = "raw",
                                  .fill = model_fill,
                                  .fill_opaque = &m};
    struct qcow2_writer *w;
    char *path = tmp_path("ovl.qcow2");
    char *bpath = tmp_path("base.raw");
    unsigned char buf[3 * 4096];
    uint64_t before;

    rng_state = 99;
    model_init(&m, 16 * cs + 1024, cs, true);
    /* Random below, no zero quarter here. */
    random_bytes(m.below, m.size);
    memcpy(m.guest, m.below, m.size);
    write_file(bpath, m.below, m.size);
    o.size = m.size;
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);

#define W(off, len)                                                    \
    do {                                                               \
        random_bytes(buf, (len));                                      \
        assert_int_equal(qcow2_writer_write(w, buf, (len), (off)), 0); \
        model_apply(&m, buf, (off), (len));                            \
    } while (0)
#define Z(off, len)                                              \
    do {                                                         \
        assert_int_equal(qcow2_writer_zero(w, (off), (len)), 0); \
        model_apply(&m, NULL, (off), (len));                     \
    } while (0)

    /* Whole clusters: no fill. */
    W(0, 2 * cs);
    assert_int_equal(m.fill_calls, 0);
    /* Partial, unallocated: head and tail come from below. */
    W(2 * cs + 100, 200);
    assert_int_equal(m.fill_calls, 2);
    assert_int_equal(m.fill_bytes, cs - 200);
    /* Partial at the cluster start: tail only. */
    W(3 * cs, 10);
    assert_int_equal(m.fill_calls, 3);
    /* Partial on a data cluster of this image: in place, no fill. */
    W(2 * cs + 1000, 3000);
    W(0, 1);
    assert_int_equal(m.fill_calls, 3);
    /* Overwrite whole clusters: same host clusters, no growth. */
    W(0, 3 * cs);
    /* Spanning: partial + whole + partial, only the ends are filled. */
    W(5 * cs + 4000, 2 * cs);
    assert_int_equal(m.fill_calls, 5);

    /* Zero a data cluster: released, then reused by the next new one. */
    Z(cs, cs);
    before = m.fill_calls;
    W(8 * cs, cs);
    /* Partial zero on a zero cluster: nothing to do. */
    Z(cs + 5, 10);
    /* Partial write into a zero cluster: the rest is zeros, not below. */
    W(cs + 100, 100);
    assert_int_equal(m.fill_calls, before);
    /* Zero a whole unallocated cluster, then a partial zero on an
     * unallocated one (fill + zeros, data since below is random).
     */
    Z(9 * cs, cs);
    Z(10 * cs + 10, 20);
    assert_int_equal(m.fill_calls, before + 2);
    /* Partial zero on a data cluster: in place. */
    Z(2 * cs + 50, 100);
    /* The last cluster is short (1024 bytes): a write covering it is
     * whole, and fill is never asked for bytes past the end.
     */
    before = m.fill_calls;
    W(16 * cs, 1024);
    assert_int_equal(m.fill_calls, before);
    Z(16 * cs, 1024);
    W(16 * cs + 1000, 24);
    assert_int_equal(m.fill_calls, before);
    W(15 * cs + 4000, 96 + 500);
    /* Unallocated stays so: clusters 11..14 never touched. */

    assert_int_equal(qcow2_writer_close(w), 0);
    model_verify(&m, path, true);
    /* Data: 0,1(rewritten after zero),2,3,5,6,7,8,10,15,16 -> 11 data
     * clusters, cluster 1's old host cluster reused by 8: header + 11
     * data + 1 L2 + 1 L1 + 1 reftable + 1 refblock.
     */
    assert_int_equal(file_size(path), (1 + 11 + 4) * cs);
    model_free(&m);
    unlink(path);
    unlink(bpath);
    free(path);
    free(bpath);
#undef W
#undef Z
}

/* Clusters released by zero requests and not reused: refcount 0, no leak,
 * and the reader still maps everything right.
 */
static void
test_released_clusters(void **state)
{
    const uint32_t cs = 512;
    struct model m;
    struct qcow2_writer_opts o = {.cluster_size = cs, .buffer_size = cs};
    struct qcow2_writer *w;
    char *path = tmp_path("released.qcow2");
    unsigned char buf[8 * 512];
    struct qcbt_io *io;
    struct qcow2_image *img;
    uint64_t rc, i;

    rng_state = 5;
    model_init(&m, 64 * cs, cs, false);
    o.size = m.size;
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    random_bytes(buf, sizeof buf);
    assert_int_equal(qcow2_writer_write(w, buf, sizeof buf, 0), 0);
    model_apply(&m, buf, 0, sizeof buf);
    assert_int_equal(qcow2_writer_zero(w, cs, 3 * cs), 0);
    model_apply(&m, NULL, cs, 3 * cs);
    assert_int_equal(qcow2_writer_close(w), 0);
    model_verify(&m, path, false);

    assert_int_equal(qcbt_io_open_file(path, &io), 0);
    assert_int_equal(qcow2_open(io, &img), 0);
    /* Host clusters 1..8 were data in guest order; 2..4 were released.
     * The L2 table reuses the lowest released one... whichever: exactly
     * two of 2..4 stay free with refcount 0.
     */
    unsigned zero_refs = 0;
    for (i = 2; i <= 4; i++) {
        assert_int_equal(qcow2_get_refcount(img, i, &rc), 0);
        zero_refs += rc == 0;
    }
    assert_int_equal(zero_refs, 2);
    assert_int_equal(qcow2_get_refcount(img, 0, &rc), 0);
    assert_int_equal(rc, 1);
    qcow2_close(img);
    model_free(&m);
    unlink(path);
    free(path);
}

/* A partial zero request on an unallocated cluster that reads as zeros
 * becomes a zero cluster, not data.
 */
static void
test_partial_zero_all_zero(void **state)
{
    struct model m;
    struct qcow2_writer_opts o = {.cluster_size = 65536};
    struct qcow2_writer *w;
    char *path = tmp_path("pz.qcow2");
    struct chain *c;
    struct qcow2_extent ext;

    model_init(&m, 4 * 65536, 65536, false);
    o.size = m.size;
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    assert_int_equal(qcow2_writer_zero(w, 100, 1000), 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    assert_int_equal(chain_open(path, NULL, &c), 0);
    assert_int_equal(qcow2_map(c->layers[0].qcow2, 0, 65536, &ext), 0);
    assert_int_equal(ext.kind, QCOW2_ZERO);
    assert_int_equal(qcow2_map(c->layers[0].qcow2, 65536, 65536, &ext), 0);
    assert_int_equal(ext.kind, QCOW2_UNALLOCATED);
    chain_close(c);
    /* Header, L2, L1, refcount table and block: no data cluster. */
    assert_int_equal(file_size(path), 5 * 65536);
    model_free(&m);
    unlink(path);
    free(path);
}

static void
test_fill_errors(void **state)
{
    const uint32_t cs = 4096;
    struct model m;
    struct qcow2_writer_opts o = {.cluster_size = cs,
                                  .backing_file = "base.raw",
                                  .backing_fmt = "raw",
                                  .fill = model_fill,
                                  .fill_opaque = &m};
    struct qcow2_writer *w;
    char *path = tmp_path("fillerr.qcow2");
    char *bpath = tmp_path("base.raw");
    unsigned char buf[100];
    int r;

    rng_state = 7;
    model_init(&m, 8 * cs, cs, true);
    write_file(bpath, m.below, m.size);
    o.size = m.size;
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    memset(buf, 0x5a, sizeof buf);

    /* The callback's message is kept, with the writer's context. */
    m.fail_call = 1;
    r = qcow2_writer_write(w, buf, sizeof buf, cs + 10);
    expect_error(r, EIO, "fill callback for guest offset 4096 length 10");
    expect_error(r, EIO, "backing read failed (test)");
    /* Not sticky: the writer goes on, the cluster stayed unallocated. */
    assert_int_equal(qcow2_writer_write(w, buf, sizeof buf, 3 * cs + 10), 0);
    model_apply(&m, buf, 3 * cs + 10, sizeof buf);
    /* A failing tail fill after a successful head fill, in a cluster
     * whose host cluster was the last one appended.
     */
    m.fail_call = m.fill_calls + 2;
    r = qcow2_writer_write(w, buf, sizeof buf, 5 * cs + 10);
    expect_error(r, EIO, "guest offset 20590 length 3986");
    /* A zero request whose fill fails. */
    m.fail_call = m.fill_calls + 1;
    expect_error(qcow2_writer_zero(w, 6 * cs + 1, 1), EIO, "fill callback");
    m.fail_call = 0;
    /* The same clusters work afterwards. */
    assert_int_equal(qcow2_writer_write(w, buf, sizeof buf, 5 * cs + 10), 0);
    model_apply(&m, buf, 5 * cs + 10, sizeof buf);
    assert_int_equal(qcow2_writer_zero(w, 6 * cs + 1, 1), 0);
    model_apply(&m, NULL, 6 * cs + 1, 1);
    assert_int_equal(qcow2_writer_close(w), 0);
    model_verify(&m, path, true);

    /* No fill callback with a backing file: a partial write is refused,
     * whole clusters are fine.
     */
    o.fill = NULL;
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    expect_error(qcow2_writer_write(w, buf, sizeof buf, 10),
                 EINVAL,
                 "no fill callback");
    expect_error(qcow2_writer_zero(w, 10, 10), EINVAL, "no fill callback");
    assert_int_equal(qcow2_writer_zero(w, 0, cs), 0);
    assert_int_equal(qcow2_writer_close(w), 0);

    model_free(&m);
    unlink(path);
    unlink(bpath);
    free(path);
    free(bpath);
}

static void
test_range_errors(void **state)
{
    struct qcow2_writer_opts o = {.size = MiB + 1};
    struct qcow2_writer *w;
    char *path = tmp_path("range.qcow2");
    unsigned char buf[1024] = {0};

    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    assert_int_equal(qcow2_writer_size(w), MiB + 512);
    assert_int_equal(qcow2_writer_write(w, buf, 512, MiB), 0);
    expect_error(qcow2_writer_write(w, buf, 513, MiB),
                 EINVAL,
                 "beyond the virtual size");
    expect_error(qcow2_writer_zero(w, UINT64_MAX - 10, 20), EINVAL, "beyond");
    expect_error(qcow2_writer_write(w, NULL, 10, 0), EINVAL, "NULL");
    /* Argument errors are not sticky. */
    assert_int_equal(qcow2_writer_write(w, buf, 10, 0), 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    unlink(path);
    free(path);
}

static void
test_error_no_directory(void **state)
{
    struct qcow2_writer_opts o = {.size = MiB};
    struct qcow2_writer *w;
    char *path = tmp_path("no-such-dir/x.qcow2");

    expect_error(qcow2_writer_create(path, &o, &w), ENOENT, path);
    assert_non_null(strstr(qcbt_error_get(), "No such file"));
    assert_null(w);
    free(path);
}

static void
test_error_exclusive(void **state)
{
    struct qcow2_writer_opts o = {.size = MiB, .exclusive = true};
    struct qcow2_writer *w;
    char *path = tmp_path("excl.qcow2");

    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    qcow2_writer_abort(w);
    expect_error(qcow2_writer_create(path, &o, &w), EEXIST, path);
    unlink(path);
    free(path);
}

/* A write-only descriptor cannot read tables back: the writer keeps every
 * table it touched, whatever the cache size, and the image is right.
 */
static void
test_l2_write_only_fd(void **state)
{
    struct qcow2_writer_opts o = {.size = 40 * 32768,
                                  .cluster_size = 512,
                                  .l2_cache_size = 1};
    struct qcow2_writer *w;
    struct model m;
    char *path = tmp_path("wronly.qcow2");
    unsigned char b[700];
    size_t resident;
    uint64_t loads, stores, i;
    int fd;

    model_init(&m, o.size, o.cluster_size, false);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    assert_true(fd >= 0);
    assert_int_equal(qcow2_writer_create_fd(fd, path, &o, &w), 0);
    /* Two passes over the 40 tables: the second rewrites what the first
     * wrote (a writer that had dropped a table would lose it).
     */
    for (i = 0; i < 80; i++) {
        uint64_t off = (i % 40) * 32768 + (i / 40) * 300;

        memset(b, (int)(i + 1), sizeof b);
        assert_int_equal(qcow2_writer_write(w, b, sizeof b, off), 0);
        model_apply(&m, b, off, sizeof b);
    }
    qcow2_writer_l2_stats(w, &resident, &loads, &stores);
    assert_int_equal(resident, 40);
    assert_int_equal(loads, 0);
    assert_int_equal(stores, 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    model_verify(&m, path, false);
    model_free(&m);
    unlink(path);
    free(path);
}

/* Fed in disk order, the writer writes each L2 table out when it moves on
 * to the next one (not all at close), once; a table written to again
 * after that is written out again, and the image is right.
 */
static void
test_l2_written_when_left(void **state)
{
    struct qcow2_writer_opts o = {.size = 40 * 32768, .cluster_size = 512};
    struct qcow2_writer *w;
    struct model m;
    char *path = tmp_path("inorder.qcow2");
    unsigned char b[700];
    size_t resident;
    uint64_t loads, stores, i;

    model_init(&m, o.size, o.cluster_size, false);
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    /* 512-byte clusters: a table covers 32 KiB of guest. */
    for (i = 0; i < 40; i++) {
        memset(b, (int)(i + 1), sizeof b);
        assert_int_equal(qcow2_writer_write(w, b, sizeof b, i * 32768 + 100),
                         0);
        model_apply(&m, b, i * 32768 + 100, sizeof b);
        qcow2_writer_l2_stats(w, &resident, &loads, &stores);
        assert_int_equal(stores, i);
    }
    /* Back into table 3, then on to table 39 again: 3 is written again. */
    memset(b, 0xee, sizeof b);
    assert_int_equal(qcow2_writer_write(w, b, sizeof b, 3 * 32768 + 5000), 0);
    model_apply(&m, b, 3 * 32768 + 5000, sizeof b);
    assert_int_equal(qcow2_writer_write(w, b, 10, 39 * 32768), 0);
    model_apply(&m, b, 39 * 32768, 10);
    qcow2_writer_l2_stats(w, &resident, &loads, &stores);
    assert_int_equal(stores, 40);
    assert_int_equal(loads, 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    model_verify(&m, path, false);
    model_free(&m);
    unlink(path);
    free(path);
}

static void
test_error_readonly_fd(void **state)
{
    struct qcow2_writer_opts o = {.size = MiB};
    struct qcow2_writer *w;
    char *path = tmp_path("ro.qcow2");
    int fd;

    write_file(path, "x", 1);
    fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    expect_error(qcow2_writer_create_fd(fd, path, &o, &w),
                 EBADF,
                 "not open for writing");
    /* The fd was closed by the writer. */
    assert_int_equal(fcntl(fd, F_GETFD), -1);
    /* And the file was not truncated. */
    assert_int_equal(file_size(path), 1);
    unlink(path);
    free(path);
}

/* Write errors: /dev/full fails every write with ENOSPC.  With a
 * one-cluster buffer the second new cluster flushes the first.
 */
static void
test_error_enospc(void **state)
{
    struct qcow2_writer_opts o = {.size = MiB,
                                  .cluster_size = 4096,
                                  .buffer_size = 4096};
    struct qcow2_writer *w;
    unsigned char buf[4096] = {1};
    int fd, r;

    fd = open("/dev/full", O_WRONLY);
    if (fd < 0)
        skip();
    assert_int_equal(qcow2_writer_create_fd(fd, "full.qcow2", &o, &w), 0);
    assert_int_equal(qcow2_writer_write(w, buf, sizeof buf, 0), 0);
    r = qcow2_writer_write(w, buf, sizeof buf, 4096);
    expect_error(r, ENOSPC, "full.qcow2: writing clusters at host offset 4096");
    assert_non_null(strstr(qcbt_error_get(), "No space left on device"));
    /* Sticky, even after another message on this thread. */
    qcbt_error(EINVAL, "something else");
    expect_error(qcow2_writer_zero(w, 0, 4096), ENOSPC, "host offset 4096");
    expect_error(qcow2_writer_close(w), ENOSPC, "No space left");

    /* An error at close (the first write happens there). */
    fd = open("/dev/full", O_WRONLY);
    assert_true(fd >= 0);
    o.buffer_size = 0;
    assert_int_equal(qcow2_writer_create_fd(fd, "full2.qcow2", &o, &w), 0);
    assert_int_equal(qcow2_writer_write(w, buf, sizeof buf, 0), 0);
    expect_error(qcow2_writer_close(w), ENOSPC, "full2.qcow2");
}

/* The writer writes through the I/O interface: into writable memory it
 * produces, byte for byte, the file it writes through a descriptor, and
 * the reader reads that memory back.
 */
static void
test_io_mem(void **state)
{
    struct qcow2_writer_opts o = {.size = 4 * MiB, .cluster_size = 4096};
    const size_t cap = 2 * MiB;
    char *path = tmp_path("mem-twin.qcow2");
    unsigned char *mem = calloc(1, cap), *file = NULL, data[6000], got[6000];
    struct chain_open_opts copts = {.no_backing = true};
    struct qcow2_writer *w;
    struct qcbt_io *io;
    struct chain *c;
    uint64_t size;
    int fd, pass;

    (void)state;
    assert_non_null(mem);
    random_bytes(data, sizeof data);
    for (pass = 0; pass < 2; pass++) {
        if (pass == 0) {
            assert_int_equal(qcbt_io_open_mem_rw(mem, cap, 0, "mem", &io), 0);
            assert_int_equal(qcow2_writer_create_io(io, &o, &w), 0);
        } else {
            assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
        }
        assert_int_equal(qcow2_writer_write(w, data, sizeof data, 70000), 0);
        assert_int_equal(qcow2_writer_zero(w, MiB, 8192), 0);
        assert_int_equal(qcow2_writer_close(w), 0);
    }

    size = file_size(path);
    assert_true(size > 0 && size <= cap);
    file = malloc(size);
    assert_non_null(file);
    fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    assert_int_equal(pread(fd, file, size, 0), (ssize_t)size);
    close(fd);
    assert_memory_equal(mem, file, size);
    for (uint64_t i = size; i < cap; i++)
        assert_int_equal(mem[i], 0);

    assert_int_equal(qcbt_io_open_mem(mem, size, "mem", &io), 0);
    if (chain_open_io(io, "qcow2", NULL, &copts, &c) < 0)
        fail_msg("chain_open_io: %s", qcbt_error_get());
    assert_int_equal(chain_read(c, got, sizeof got, 70000), 0);
    assert_memory_equal(got, data, sizeof data);
    chain_close(c);

    /* Memory that fills up fails the writer as a full disk does. */
    o.buffer_size = 4096; /* the second cluster writes the first */
    assert_int_equal(qcbt_io_open_mem_rw(mem, 4096, 0, "small", &io), 0);
    assert_int_equal(qcow2_writer_create_io(io, &o, &w), 0);
    expect_error(qcow2_writer_write(w, data, sizeof data, 0),
                 ENOSPC,
                 "small: writing clusters at host offset 4096");
    expect_error(qcow2_writer_close(w), ENOSPC, "No space left");

    /* A read-only io is refused, and released. */
    assert_int_equal(qcbt_io_open_mem(mem, cap, "ro", &io), 0);
    expect_error(qcow2_writer_create_io(io, &o, &w),
                 EBADF,
                 "ro: file is not open for writing");
    unlink(path);
    free(path);
    free(file);
    free(mem);
}

/* A device whose writes are accepted but whose writeback fails (what
 * sync_file_range reports after an I/O error on the disk).
 */
struct bad_disk {
    unsigned writebacks, failed;
    bool header_written;
};

static ssize_t
bad_disk_pwrite(void *opaque, const void *buf, size_t count, uint64_t off)
{
    struct bad_disk *d = opaque;

    (void)buf;
    if (off == 0)
        d->header_written = true;
    return (ssize_t)count;
}

static ssize_t
bad_disk_pread(void *opaque, void *buf, size_t count, uint64_t off)
{
    (void)opaque;
    (void)off;
    memset(buf, 0, count);
    return (ssize_t)count;
}

static int
bad_disk_writeback(void *opaque, uint64_t off, uint64_t len, bool wait)
{
    struct bad_disk *d = opaque;

    (void)off;
    (void)len;
    (void)wait;
    if (d->writebacks++ < 1)
        return 0;
    d->failed++;
    return -EIO;
}

static const struct qcbt_io_ops bad_disk_ops = {
    .pread = bad_disk_pread,
    .pwrite = bad_disk_pwrite,
    .writeback = bad_disk_writeback,
};

static void
test_error_writeback(void **state)
{
    struct qcow2_writer_opts o = {.size = MiB,
                                  .cluster_size = 4096,
                                  .buffer_size = 4096};
    struct bad_disk d = {0};
    unsigned char buf[4096] = {1};
    struct qcow2_writer *w;
    struct qcbt_io *io;
    int r;

    (void)state;
    assert_int_equal(qcbt_io_new(&bad_disk_ops, &d, 0, "bad.qcow2", &io), 0);
    assert_int_equal(qcow2_writer_create_io(io, &o, &w), 0);
    /* One cluster per buffer: each new cluster writes the previous one
     * and starts its writeback; the first writeback succeeds.
     */
    assert_int_equal(qcow2_writer_write(w, buf, sizeof buf, 0), 0);
    assert_int_equal(qcow2_writer_write(w, buf, sizeof buf, 4096), 0);
    r = qcow2_writer_write(w, buf, sizeof buf, 8192);
    expect_error(r,
                 EIO,
                 "bad.qcow2: writeback of host bytes 0x2000..0x3000: "
                 "Input/output error");
    assert_int_equal(d.failed, 1);
    /* Sticky: no later call succeeds, and no header is ever written. */
    expect_error(qcow2_writer_write(w, buf, sizeof buf, 12288),
                 EIO,
                 "writeback");
    expect_error(qcow2_writer_close(w), EIO, "writeback of host bytes");
    assert_false(d.header_written);
}

static void
test_abort(void **state)
{
    struct qcow2_writer_opts o = {.size = 4 * MiB, .buffer_size = 65536};
    struct qcow2_writer *w;
    char *path = tmp_path("abort.qcow2");
    unsigned char *buf = calloc(1, MiB);
    struct qcbt_io *io;
    struct qcow2_image *img;

    assert_non_null(buf);
    qcow2_writer_abort(NULL);
    assert_int_equal(qcow2_writer_close(NULL), 0);
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    assert_int_equal(qcow2_writer_write(w, buf, MiB, 0), 0);
    qcow2_writer_abort(w);
    /* Data went out, but no header: not a qcow2 image. */
    assert_int_equal(qcbt_io_open_file(path, &io), 0);
    assert_true(qcow2_open(io, &img) < 0);
    unlink(path);
    free(path);
    free(buf);
}

/* A 4 TiB image with scattered writes: L2 tables only where written, and
 * fast.
 */
static void
test_large_sparse(void **state)
{
    const uint64_t size = 4096 * GiB;
    struct qcow2_writer_opts o = {.size = size};
    struct qcow2_writer *w;
    char *path = tmp_path("large.qcow2");
    unsigned char buf[70000], got[70000];
    uint64_t offs[32];
    struct chain *c;
    int i;

    rng_state = 11;
    assert_int_equal(qcow2_writer_create(path, &o, &w), 0);
    for (i = 0; i < 32; i++) {
        offs[i] = (size / 32) * i + rng_below(size / 64);
        random_bytes(buf, sizeof buf);
        assert_int_equal(qcow2_writer_write(w, buf, sizeof buf, offs[i]), 0);
    }
    assert_int_equal(qcow2_writer_zero(w, size - 10 * MiB, 10 * MiB), 0);
    assert_int_equal(qcow2_writer_close(w), 0);
    /* Small file: ~64 data clusters, ~33 L2 tables, one L1 cluster. */
    assert_true(file_size(path) < 10 * MiB);

    assert_int_equal(chain_open(path, NULL, &c), 0);
    assert_int_equal(c->size, size);
    rng_state = 11;
    for (i = 0; i < 32; i++) {
        assert_int_equal(offs[i], (size / 32) * i + rng_below(size / 64));
        random_bytes(buf, sizeof buf);
        assert_int_equal(chain_read(c, got, sizeof got, offs[i]), 0);
        assert_memory_equal(buf, got, sizeof buf);
        /* Just before: zeros (unallocated, no backing). */
        if (offs[i] >= sizeof got) {
            unsigned char z[512] = {0};
            assert_int_equal(chain_read(c, got, 512, offs[i] - 512), 0);
            assert_memory_equal(got, z, 512);
        }
    }
    {
        struct chain_status st;
        assert_int_equal(chain_block_status(c, size - 10 * MiB, 10 * MiB, &st),
                         0);
        assert_true(st.zero && st.present && !st.data);
        assert_int_equal(st.len, 10 * MiB);
    }
    chain_close(c);
    unlink(path);
    free(path);
}

/* ------------------------------------------------------------------ */

static int
rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(p);
}

static int
setup(void **state)
{
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int
teardown(void **state)
{
    return nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_l2_evict),
        cmocka_unit_test(test_l2_write_only_fd),
        cmocka_unit_test(test_l2_written_when_left),
        cmocka_unit_test(test_empty_image),
        cmocka_unit_test(test_zero_size),
        cmocka_unit_test(test_backing_header),
        cmocka_unit_test(test_bad_opts),
        cmocka_unit_test(test_overwrite_and_fill),
        cmocka_unit_test(test_released_clusters),
        cmocka_unit_test(test_partial_zero_all_zero),
        cmocka_unit_test(test_fill_errors),
        cmocka_unit_test(test_range_errors),
        cmocka_unit_test(test_error_no_directory),
        cmocka_unit_test(test_error_exclusive),
        cmocka_unit_test(test_error_readonly_fd),
        cmocka_unit_test(test_error_enospc),
        cmocka_unit_test(test_io_mem),
        cmocka_unit_test(test_error_writeback),
        cmocka_unit_test(test_abort),
        cmocka_unit_test(test_large_sparse),
        cmocka_unit_test(test_random_512),
        cmocka_unit_test(test_random_4k),
        cmocka_unit_test(test_random_64k),
        cmocka_unit_test(test_random_2m),
        cmocka_unit_test(test_random_backing_raw),
        cmocka_unit_test(test_random_backing_qcow2),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}

/* qcbt unit tests: a tiny in-memory qcow2 image builder (see the header). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>
#include <zstd.h>

#include "qcow2-builder.h"

#define QB_COPIED      (1ULL << 63)
#define QB_COMPRESSED  (1ULL << 62)
#define QB_OFFSET_MASK 0x00fffffffffffe00ULL

struct qb {
    struct qb_header hdr;
    unsigned cluster_bits;
    uint64_t cs;
    bool extl2;

    unsigned char *buf; /* the file as written so far */
    size_t cap;
    uint64_t end;
    bool file_len_set;
    uint64_t file_len;

    uint64_t reftable_off, refblock_off;
    uint64_t l1_off;
    uint64_t l1_entries;
    uint64_t *l1;        /* host order */
    uint64_t *l2_tables; /* per L1 index, the table the builder allocated */

    unsigned char *ext; /* serialised extensions, in call order */
    size_t ext_len;
    bool no_end_marker;
    char *backing_name;

    /* Clusters referenced besides the header, refcounts, L1 and L2
     * (bitmap directories, tables and data), counted by qb_finish().
     */
    uint64_t *refs;
    size_t nr_refs;

    /* Persistent bitmaps, in directory order. */
    struct qb_bm *bitmaps;
    size_t nr_bitmaps;
    bool bitmaps_stored;
    uint64_t bm_dir_offset, bm_dir_size, bm_ext_pos;
};

struct qb_bm {
    struct qb_bitmap_entry e;
    unsigned char *name_copy, *extra_copy; /* owned */
    uint64_t pos;                          /* file offset after the store */
};

static void
die(const char *msg)
{
    fprintf(stderr, "qcow2-builder: %s\n", msg);
    abort();
}

static void *
xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);

    if (!p)
        die("out of memory");
    return p;
}

void
qb_put_be32(unsigned char *img, uint64_t off, uint32_t v)
{
    int i;

    for (i = 0; i < 4; i++)
        img[off + i] = (unsigned char)(v >> (24 - 8 * i));
}

void
qb_put_be64(unsigned char *img, uint64_t off, uint64_t v)
{
    int i;

    for (i = 0; i < 8; i++)
        img[off + i] = (unsigned char)(v >> (56 - 8 * i));
}

static void
put_be16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

/* Make sure buf holds at least LEN bytes (new bytes zeroed). */
static void
reserve(struct qb *b, uint64_t len)
{
    size_t ncap;

    if (len <= b->cap)
        return;
    if (len > (uint64_t)1 << 30)
        die("image too large for a unit test");
    ncap = b->cap ? b->cap : 65536;
    while (ncap < len)
        ncap *= 2;
    b->buf = realloc(b->buf, ncap);
    if (!b->buf)
        die("out of memory");
    memset(b->buf + b->cap, 0, ncap - b->cap);
    b->cap = ncap;
}

static uint64_t
round_up(uint64_t n, uint64_t a)
{
    return (n + a - 1) / a * a;
}

static uint64_t
l2_entries(const struct qb *b)
{
    return b->cs / (b->extl2 ? 16 : 8);
}

struct qb *
qb_new(unsigned version,
       unsigned cluster_bits,
       uint64_t size,
       bool extl2,
       bool zstd)
{
    struct qb *b;
    uint64_t per_l1, l1_clusters;

    if (cluster_bits < 9 || cluster_bits > 21 || (version != 2 && version != 3))
        die("qb_new: bad version or cluster_bits");
    if ((extl2 || zstd) && version < 3)
        die("qb_new: extended L2 and zstd need v3");
    if (extl2 && cluster_bits < 14)
        die("qb_new: extended L2 needs cluster_bits >= 14");

    b = xcalloc(1, sizeof *b);
    b->cluster_bits = cluster_bits;
    b->cs = 1ULL << cluster_bits;
    b->extl2 = extl2;

    per_l1 = b->cs * l2_entries(b);
    b->l1_entries = (size + per_l1 - 1) / per_l1;
    if (b->l1_entries > 65536)
        die("qb_new: L1 too large for a unit test");
    l1_clusters = round_up(b->l1_entries * 8, b->cs) / b->cs;
    if (l1_clusters == 0)
        l1_clusters = 1;
    b->reftable_off = b->cs;
    b->refblock_off = 2 * b->cs;
    b->l1_off = 3 * b->cs;
    b->l1 = xcalloc(b->l1_entries, sizeof *b->l1);
    b->l2_tables = xcalloc(b->l1_entries, sizeof *b->l2_tables);
    b->end = b->l1_off + l1_clusters * b->cs;
    reserve(b, b->end);

    b->hdr.magic = 0x514649fbU;
    b->hdr.version = version;
    b->hdr.cluster_bits = cluster_bits;
    b->hdr.size = size;
    b->hdr.l1_size = (uint32_t)b->l1_entries;
    b->hdr.l1_table_offset = b->l1_off;
    b->hdr.refcount_table_offset = b->reftable_off;
    b->hdr.refcount_table_clusters = 1;
    b->hdr.refcount_order = 4;
    if (version >= 3) {
        b->hdr.header_length = 112;
        if (extl2)
            b->hdr.incompatible_features |= 1ULL << 4;
        if (zstd) {
            b->hdr.incompatible_features |= 1ULL << 3;
            b->hdr.compression_type = QB_ZSTD;
        }
    } else {
        b->hdr.header_length = 72;
    }
    return b;
}

void
qb_free(struct qb *b)
{
    size_t i;

    if (!b)
        return;
    free(b->buf);
    free(b->l1);
    free(b->l2_tables);
    free(b->ext);
    free(b->backing_name);
    free(b->refs);
    for (i = 0; i < b->nr_bitmaps; i++) {
        free(b->bitmaps[i].name_copy);
        free(b->bitmaps[i].extra_copy);
    }
    free(b->bitmaps);
    free(b);
}

struct qb_header *
qb_hdr(struct qb *b)
{
    return &b->hdr;
}

uint64_t
qb_cluster_size(const struct qb *b)
{
    return b->cs;
}

void
qb_add_ext_len(struct qb *b,
               uint32_t type,
               uint32_t claimed_len,
               const void *data,
               size_t len)
{
    size_t padded = round_up(len, 8);
    unsigned char *p;

    b->ext = realloc(b->ext, b->ext_len + 8 + padded);
    if (!b->ext)
        die("out of memory");
    p = b->ext + b->ext_len;
    memset(p, 0, 8 + padded);
    qb_put_be32(p, 0, type);
    qb_put_be32(p, 4, claimed_len);
    if (len)
        memcpy(p + 8, data, len);
    b->ext_len += 8 + padded;
}

void
qb_add_ext(struct qb *b, uint32_t type, const void *data, size_t len)
{
    qb_add_ext_len(b, type, (uint32_t)len, data, len);
}

void
qb_add_feature_table(struct qb *b, const struct qb_feature *f, size_t n)
{
    unsigned char *t = xcalloc(n, 48);
    size_t i;

    for (i = 0; i < n; i++) {
        size_t l = strlen(f[i].name);

        t[i * 48] = f[i].type;
        t[i * 48 + 1] = f[i].bit;
        memcpy(t + i * 48 + 2, f[i].name, l > 46 ? 46 : l);
    }
    qb_add_ext(b, 0x6803f857U, t, n * 48);
    free(t);
}

void
qb_omit_end_marker(struct qb *b)
{
    b->no_end_marker = true;
}

void
qb_set_backing(struct qb *b, const char *name, const char *fmt)
{
    free(b->backing_name);
    b->backing_name = strdup(name);
    if (!b->backing_name)
        die("out of memory");
    if (fmt)
        qb_add_ext(b, 0xe2792acaU, fmt, strlen(fmt));
}

void
qb_set_l1(struct qb *b, uint64_t idx, uint64_t entry)
{
    if (idx >= b->l1_entries)
        die("qb_set_l1: index past the L1 table");
    b->l1[idx] = entry;
}

uint64_t
qb_get_l1(const struct qb *b, uint64_t idx)
{
    if (idx >= b->l1_entries)
        die("qb_get_l1: index past the L1 table");
    return b->l1[idx];
}

uint64_t
qb_alloc_cluster(struct qb *b, const void *data, size_t len)
{
    uint64_t off = round_up(b->end, b->cs);

    if (len > b->cs)
        die("qb_alloc_cluster: more than one cluster");
    reserve(b, off + b->cs);
    memset(b->buf + off, 0, b->cs);
    if (data && len)
        memcpy(b->buf + off, data, len);
    b->end = off + b->cs;
    return off;
}

uint64_t
qb_l2_table(struct qb *b, uint64_t gc)
{
    uint64_t idx = gc / l2_entries(b);

    if (idx >= b->l1_entries)
        die("qb_l2_table: guest cluster past the L1 table");
    if (!b->l2_tables[idx]) {
        b->l2_tables[idx] = qb_alloc_cluster(b, NULL, 0);
        b->l1[idx] = b->l2_tables[idx] | QB_COPIED;
    }
    return b->l2_tables[idx];
}

void
qb_set_l2(struct qb *b, uint64_t gc, uint64_t entry, uint64_t bitmap)
{
    uint64_t t = qb_l2_table(b, gc);
    uint64_t i = gc % l2_entries(b);

    if (b->extl2) {
        qb_put_be64(b->buf, t + i * 16, entry);
        qb_put_be64(b->buf, t + i * 16 + 8, bitmap);
    } else {
        qb_put_be64(b->buf, t + i * 8, entry);
    }
}

uint64_t
qb_write_cluster(struct qb *b, uint64_t gc, const void *data)
{
    uint64_t off;

    qb_l2_table(b, gc); /* L2 first, so tables precede their data */
    off = qb_alloc_cluster(b, data, b->cs);
    qb_set_l2(b, gc, off | QB_COPIED, b->extl2 ? 0xffffffffULL : 0);
    return off;
}

uint64_t
qb_append(struct qb *b, const void *data, size_t len)
{
    uint64_t off = b->end;

    reserve(b, off + len);
    if (len)
        memcpy(b->buf + off, data, len);
    b->end = off + len;
    return off;
}

void
qb_poke(struct qb *b, uint64_t off, const void *data, size_t len)
{
    reserve(b, off + len);
    memcpy(b->buf + off, data, len);
    if (off + len > b->end)
        b->end = off + len;
}

uint64_t
qb_file_len(const struct qb *b)
{
    return b->file_len_set ? b->file_len : b->end;
}

uint64_t
qb_compressed_entry_raw(const struct qb *b,
                        uint64_t coff,
                        uint64_t extra_sectors)
{
    unsigned shift = 62 - (b->cluster_bits - 8);

    return QB_COMPRESSED | (extra_sectors << shift) | coff;
}

uint64_t
qb_compressed_entry(const struct qb *b, uint64_t coff, size_t len)
{
    /* QEMU: ((coffset + clen - 1) >> 9) - (coffset >> 9) */
    return qb_compressed_entry_raw(b,
                                   coff,
                                   ((coff + len - 1) >> 9) - (coff >> 9));
}

size_t
qb_compress(enum qb_compression method,
            const void *in,
            size_t inlen,
            void **out)
{
    if (method == QB_DEFLATE) {
        z_stream s;
        size_t bound;

        memset(&s, 0, sizeof s);
        if (deflateInit2(&s,
                         Z_DEFAULT_COMPRESSION,
                         Z_DEFLATED,
                         -12,
                         9,
                         Z_DEFAULT_STRATEGY) != Z_OK)
            die("deflateInit2");
        bound = deflateBound(&s, inlen);
        *out = xcalloc(1, bound);
        s.next_in = (Bytef *)in;
        s.avail_in = (uInt)inlen;
        s.next_out = *out;
        s.avail_out = (uInt)bound;
        if (deflate(&s, Z_FINISH) != Z_STREAM_END)
            die("deflate");
        deflateEnd(&s);
        return bound - s.avail_out;
    } else {
        size_t bound = ZSTD_compressBound(inlen);
        size_t n;

        *out = xcalloc(1, bound);
        n = ZSTD_compress(*out, bound, in, inlen, ZSTD_CLEVEL_DEFAULT);
        if (ZSTD_isError(n))
            die("ZSTD_compress");
        return n;
    }
}

uint64_t
qb_write_compressed(struct qb *b,
                    uint64_t gc,
                    const void *data,
                    uint64_t *coff,
                    size_t *clen)
{
    void *z;
    size_t n;
    uint64_t off, entry;

    qb_l2_table(b, gc);
    n = qb_compress(b->hdr.compression_type == QB_ZSTD ? QB_ZSTD : QB_DEFLATE,
                    data,
                    b->cs,
                    &z);
    off = qb_append(b, z, n);
    free(z);
    entry = qb_compressed_entry(b, off, n);
    qb_set_l2(b, gc, entry, 0);
    if (coff)
        *coff = off;
    if (clen)
        *clen = n;
    return entry;
}

void
qb_set_file_len(struct qb *b, uint64_t len)
{
    b->file_len_set = true;
    b->file_len = len;
}

/* 16-bit refcounts in one refcount block, so that good images pass
 * `qemu-img check`.  Skipped when they cannot be represented that way.
 */
static void
write_refcounts(struct qb *b, unsigned char *img, uint64_t len)
{
    uint64_t nclusters = round_up(len, b->cs) / b->cs;
    uint64_t per_block = b->cs / 2;
    uint16_t *rc;
    uint64_t i, j;

    if (b->hdr.refcount_order != 4 || nclusters > per_block ||
        b->refblock_off + b->cs > len)
        return;
    rc = xcalloc(nclusters, sizeof *rc);
    rc[0] = rc[b->reftable_off / b->cs] = rc[b->refblock_off / b->cs] = 1;
    for (i = b->l1_off / b->cs;
         i < (b->l1_off + round_up(b->l1_entries * 8, b->cs)) / b->cs;
         i++)
        rc[i]++;
    for (i = 0; i < b->l1_entries; i++) {
        uint64_t t = b->l2_tables[i];
        uint64_t ents = l2_entries(b), stride = b->extl2 ? 16 : 8;

        if (!t || t + b->cs > len)
            continue;
        rc[t / b->cs]++;
        for (j = 0; j < ents; j++) {
            uint64_t e = 0;
            int k;

            for (k = 0; k < 8; k++)
                e = (e << 8) | b->buf[t + j * stride + k];
            if (e & QB_COMPRESSED) {
                unsigned shift = 62 - (b->cluster_bits - 8);
                uint64_t coff = e & ((1ULL << shift) - 1);
                uint64_t nsec =
                    ((e >> shift) & ((1ULL << (b->cluster_bits - 8)) - 1)) + 1;
                uint64_t last = coff + nsec * 512 - (coff & 511) - 1;
                uint64_t c;

                for (c = coff / b->cs; c <= last / b->cs && c < nclusters; c++)
                    rc[c]++;
            } else if ((e & QB_OFFSET_MASK) &&
                       (e & QB_OFFSET_MASK) / b->cs < nclusters) {
                rc[(e & QB_OFFSET_MASK) / b->cs]++;
            }
        }
    }
    for (i = 0; i < b->nr_refs; i++)
        if (b->refs[i] / b->cs < nclusters)
            rc[b->refs[i] / b->cs]++;
    qb_put_be64(img, b->reftable_off, b->refblock_off);
    for (i = 0; i < nclusters; i++)
        put_be16(img + b->refblock_off + i * 2, rc[i]);
    free(rc);
}

/* Where the extensions start: after a plausible header_length (a hostile
 * one is only a field value here).
 */
static uint64_t
ext_start(const struct qb *b)
{
    const struct qb_header *h = &b->hdr;

    if (h->version < 3)
        return 72;
    if (h->header_length >= 104 && h->header_length % 8 == 0 &&
        h->header_length <= b->cs - 8)
        return h->header_length;
    return 112;
}

unsigned char *
qb_finish(struct qb *b, size_t *lenp)
{
    const struct qb_header *h = &b->hdr;
    uint64_t len = qb_file_len(b);
    unsigned char *img, *c0;
    uint64_t pos, i;
    uint32_t boff_size = 0;
    uint64_t boff = 0;

    c0 = xcalloc(1, b->cs);
    qb_put_be32(c0, QB_OFF_MAGIC, h->magic);
    qb_put_be32(c0, QB_OFF_VERSION, h->version);
    qb_put_be32(c0, QB_OFF_CLUSTER_BITS, h->cluster_bits);
    qb_put_be64(c0, QB_OFF_SIZE, h->size);
    qb_put_be32(c0, QB_OFF_CRYPT_METHOD, h->crypt_method);
    qb_put_be32(c0, QB_OFF_L1_SIZE, h->l1_size);
    qb_put_be64(c0, QB_OFF_L1_OFFSET, h->l1_table_offset);
    qb_put_be64(c0, QB_OFF_REFTABLE_OFFSET, h->refcount_table_offset);
    qb_put_be32(c0, QB_OFF_REFTABLE_CLUSTERS, h->refcount_table_clusters);
    qb_put_be32(c0, QB_OFF_NB_SNAPSHOTS, h->nb_snapshots);
    qb_put_be64(c0, QB_OFF_SNAPSHOTS_OFFSET, h->snapshots_offset);
    if (h->version >= 3) {
        qb_put_be64(c0, QB_OFF_INCOMPAT, h->incompatible_features);
        qb_put_be64(c0, QB_OFF_COMPAT, h->compatible_features);
        qb_put_be64(c0, QB_OFF_AUTOCLEAR, h->autoclear_features);
        qb_put_be32(c0, QB_OFF_REFCOUNT_ORDER, h->refcount_order);
        qb_put_be32(c0, QB_OFF_HEADER_LENGTH, h->header_length);
        if (h->header_length > 104)
            c0[QB_OFF_COMPRESSION_TYPE] = h->compression_type;
    }
    pos = ext_start(b);

    if (pos + b->ext_len + 8 > b->cs)
        die("qb_finish: extensions do not fit in cluster 0");
    if (b->ext_len)
        memcpy(c0 + pos, b->ext, b->ext_len);
    pos += b->ext_len;
    if (!b->no_end_marker)
        pos += 8; /* end marker: type 0, length 0 */
    if (b->backing_name) {
        size_t n = strlen(b->backing_name);

        if (pos + n > b->cs)
            die("qb_finish: backing name does not fit in cluster 0");
        memcpy(c0 + pos, b->backing_name, n);
        boff = pos;
        boff_size = (uint32_t)n;
    }
    if (h->backing_file_offset || h->backing_file_size) {
        boff = h->backing_file_offset;
        boff_size = h->backing_file_size;
    }
    qb_put_be64(c0, QB_OFF_BACKING_OFFSET, boff);
    qb_put_be32(c0, QB_OFF_BACKING_SIZE, boff_size);

    /* Write cluster 0 and the L1 table into the builder's file. */
    reserve(b, b->l1_off + b->l1_entries * 8);
    memcpy(b->buf, c0, b->cs);
    free(c0);
    for (i = 0; i < b->l1_entries; i++)
        qb_put_be64(b->buf, b->l1_off + i * 8, b->l1[i]);

    img = malloc(len ? len : 1);
    if (!img)
        die("out of memory");
    memset(img, 0, len ? len : 1);
    memcpy(img, b->buf, len < b->end ? len : b->end);
    /* The refcount block is rewritten from scratch on every finish. */
    if (b->refblock_off + b->cs <= len) {
        memset(img + b->reftable_off, 0, b->cs);
        memset(img + b->refblock_off, 0, b->cs);
    }
    write_refcounts(b, img, len);
    *lenp = len;
    return img;
}

/* ------------------------------------------------------------------ */
/* Persistent bitmaps */

static void
add_ref(struct qb *b, uint64_t off)
{
    b->refs = realloc(b->refs, (b->nr_refs + 1) * sizeof *b->refs);
    if (!b->refs)
        die("out of memory");
    b->refs[b->nr_refs++] = off;
}

uint64_t
qb_alloc_clusters(struct qb *b, const void *data, size_t len)
{
    uint64_t off = round_up(b->end, b->cs);
    uint64_t n = len ? round_up(len, b->cs) / b->cs : 1;
    uint64_t i;

    reserve(b, off + n * b->cs);
    memset(b->buf + off, 0, n * b->cs);
    if (data && len)
        memcpy(b->buf + off, data, len);
    b->end = off + n * b->cs;
    for (i = 0; i < n; i++)
        add_ref(b, off + i * b->cs);
    return off;
}

size_t
qb_bitmap_entry_append(unsigned char **dir,
                       size_t *len,
                       const struct qb_bitmap_entry *e)
{
    size_t off = *len;
    size_t n = round_up(24 + e->extra_len + e->name_len, 8);
    unsigned char *p;

    *dir = realloc(*dir, off + n);
    if (!*dir)
        die("out of memory");
    p = *dir + off;
    memset(p, 0, n);
    qb_put_be64(p, 0, e->table_offset);
    qb_put_be32(p, 8, e->table_size);
    qb_put_be32(p, 12, e->flags);
    p[16] = e->type;
    p[17] = e->granularity_bits;
    put_be16(p + 18, e->name_size);
    qb_put_be32(p, 20, e->extra_data_size);
    if (e->extra_len)
        memcpy(p + 24, e->extra, e->extra_len);
    if (e->name_len)
        memcpy(p + 24 + e->extra_len, e->name, e->name_len);
    *len = off + n;
    return off;
}

uint64_t
qb_bitmap_table_size(const struct qb *b, unsigned gbits)
{
    uint64_t size = b->hdr.size / 512 * 512;
    uint64_t g = 1ULL << gbits;
    uint64_t nbits = size / g + (size % g != 0);
    uint64_t nbytes = (nbits + 7) / 8;

    return (nbytes + b->cs - 1) / b->cs;
}

static unsigned char *
copy_bytes(const void *p, size_t len)
{
    unsigned char *c = xcalloc(1, len);

    if (len)
        memcpy(c, p, len);
    return c;
}

size_t
qb_add_bitmap_entry(struct qb *b, const struct qb_bitmap_entry *e)
{
    struct qb_bm *m;

    if (b->bitmaps_stored)
        die("qb_add_bitmap_entry: bitmaps already stored");
    b->bitmaps = realloc(b->bitmaps, (b->nr_bitmaps + 1) * sizeof *b->bitmaps);
    if (!b->bitmaps)
        die("out of memory");
    m = &b->bitmaps[b->nr_bitmaps];
    memset(m, 0, sizeof *m);
    m->e = *e;
    m->name_copy = copy_bytes(e->name, e->name_len);
    m->extra_copy = copy_bytes(e->extra, e->extra_len);
    m->e.name = m->name_copy;
    m->e.extra = m->extra_copy;
    return b->nr_bitmaps++;
}

size_t
qb_add_bitmap_table(struct qb *b,
                    const char *name,
                    unsigned gbits,
                    uint32_t flags,
                    const uint64_t *table,
                    size_t n)
{
    struct qb_bitmap_entry e;
    unsigned char *raw = xcalloc(n, 8);
    size_t i;

    for (i = 0; i < n; i++)
        qb_put_be64(raw, i * 8, table[i]);
    memset(&e, 0, sizeof e);
    e.table_offset = qb_alloc_clusters(b, raw, n * 8);
    free(raw);
    e.table_size = (uint32_t)n;
    e.flags = flags;
    e.type = 1;
    e.granularity_bits = (uint8_t)gbits;
    e.name = name;
    e.name_len = strlen(name);
    e.name_size = (uint16_t)e.name_len;
    return qb_add_bitmap_entry(b, &e);
}

size_t
qb_add_bitmap(struct qb *b,
              const char *name,
              unsigned gbits,
              uint32_t flags,
              const void *stream,
              size_t stream_len)
{
    const unsigned char *s = stream;
    uint64_t n = qb_bitmap_table_size(b, gbits);
    uint64_t *table;
    size_t i, j, idx;

    if (n == 0)
        die("qb_add_bitmap: empty disk");
    table = xcalloc(n, sizeof *table);
    for (i = 0; s && i < n; i++) {
        size_t start = i * b->cs, len;
        bool dirty = false;

        if (start >= stream_len)
            break;
        len = stream_len - start < b->cs ? stream_len - start : b->cs;
        for (j = 0; j < len && !dirty; j++)
            dirty = s[start + j] != 0;
        if (dirty)
            table[i] = qb_alloc_clusters(b, s + start, len);
    }
    idx = qb_add_bitmap_table(b, name, gbits, flags, table, n);
    free(table);
    return idx;
}

struct qb_bitmap_entry *
qb_bitmap(struct qb *b, size_t idx)
{
    if (idx >= b->nr_bitmaps)
        die("qb_bitmap: no such bitmap");
    return &b->bitmaps[idx].e;
}

size_t
qb_nr_bitmaps(const struct qb *b)
{
    return b->nr_bitmaps;
}

void
qb_store_bitmaps(struct qb *b)
{
    unsigned char *dir = NULL, ext[24];
    size_t len = 0, i;
    uint64_t *pos;

    if (b->bitmaps_stored || b->nr_bitmaps == 0)
        die("qb_store_bitmaps: stored twice or nothing to store");
    pos = xcalloc(b->nr_bitmaps, sizeof *pos);
    for (i = 0; i < b->nr_bitmaps; i++)
        pos[i] = qb_bitmap_entry_append(&dir, &len, &b->bitmaps[i].e);
    b->bm_dir_offset = qb_alloc_clusters(b, dir, len);
    b->bm_dir_size = len;
    for (i = 0; i < b->nr_bitmaps; i++)
        b->bitmaps[i].pos = b->bm_dir_offset + pos[i];
    free(pos);
    free(dir);

    qb_put_be32(ext, 0, (uint32_t)b->nr_bitmaps);
    qb_put_be32(ext, 4, 0);
    qb_put_be64(ext, 8, b->bm_dir_size);
    qb_put_be64(ext, 16, b->bm_dir_offset);
    b->bm_ext_pos = ext_start(b) + b->ext_len;
    qb_add_ext(b, QB_EXT_BITMAPS, ext, sizeof ext);
    if (b->hdr.version >= 3)
        b->hdr.autoclear_features |= QB_AUTOCLEAR_BITMAPS;
    b->bitmaps_stored = true;
}

uint64_t
qb_bitmap_dir_offset(const struct qb *b)
{
    return b->bm_dir_offset;
}

uint64_t
qb_bitmap_dir_size(const struct qb *b)
{
    return b->bm_dir_size;
}

uint64_t
qb_bitmaps_ext_pos(const struct qb *b)
{
    if (!b->bitmaps_stored)
        die("qb_bitmaps_ext_pos: bitmaps not stored");
    return b->bm_ext_pos;
}

uint64_t
qb_bitmap_entry_pos(const struct qb *b, size_t idx)
{
    if (!b->bitmaps_stored || idx >= b->nr_bitmaps)
        die("qb_bitmap_entry_pos: not stored or no such bitmap");
    return b->bitmaps[idx].pos;
}

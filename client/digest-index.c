/* qcbt: the digest index beside each backup (digest-index.h). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "byteorder.h"
#include "digest-index.h"
#include "digest.h"
#include "error.h"
#include "minmax.h"

#define DGI_MAGIC   "QCBTDGI1"
#define DGI_VERSION 1u
/* Granule numbers fit in 48 bits (a disk of up to 2^64 bytes). */
#define DGI_KEY_MASK ((1ULL << 48) - 1)

static uint64_t
ngranules_of(uint64_t size)
{
    return (size >> DGI_GRANULE_BITS) + !!(size & (DGI_GRANULE - 1));
}

static void
put_u128(unsigned char *p, dgi_u128 v)
{
    put_be64(p, (uint64_t)(v >> 64));
    put_be64(p + 8, (uint64_t)v);
}

static dgi_u128
get_u128(const unsigned char *p)
{
    return ((dgi_u128)get_be64(p) << 64) | get_be64(p + 8);
}

/* The one encoding of the header, and its one check. */
struct dgi_header {
    uint64_t size, nrec;
    dgi_u128 sum;
};

static void
header_encode(unsigned char h[DGI_HEADER_SIZE], const struct dgi_header *d)
{
    memset(h, 0, DGI_HEADER_SIZE);
    memcpy(h, DGI_MAGIC, 8);
    put_be32(h + 8, DGI_VERSION);
    put_be32(h + 12, DGI_GRANULE_BITS);
    put_be64(h + 16, d->size);
    put_be64(h + 24, d->nrec);
    put_u128(h + 32, d->sum);
    put_be64(h + 56, XXH64(h, 56, 0));
}

/* Expected file size of NREC records. */
static uint64_t
file_size_of(uint64_t nrec)
{
    uint64_t nblocks = (nrec + DGI_BLOCK_RECORDS - 1) / DGI_BLOCK_RECORDS;

    return DGI_HEADER_SIZE + nrec * DGI_RECORD_SIZE +
           nblocks * DGI_TRAILER_SIZE;
}

static const char *
header_check(const unsigned char h[DGI_HEADER_SIZE], struct dgi_header *d)
{
    if (memcmp(h, DGI_MAGIC, 8) != 0)
        return "not a digest index";
    if (get_be64(h + 56) != XXH64(h, 56, 0))
        return "header checksum mismatch";
    if (get_be32(h + 8) != DGI_VERSION)
        return "unsupported version";
    if (get_be32(h + 12) != DGI_GRANULE_BITS || get_be64(h + 48) != 0)
        return "unsupported granule size";
    d->size = get_be64(h + 16);
    d->nrec = get_be64(h + 24);
    d->sum = get_u128(h + 32);
    /* At most a record per granule: the file size cannot overflow. */
    if (d->nrec > ngranules_of(d->size))
        return "more records than granules";
    return NULL;
}

static int
pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
    const unsigned char *p = buf;

    while (len) {
        ssize_t n = pwrite(fd, p, len, off);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= n;
        off += n;
    }
    return 0;
}

/* ---- writing ------------------------------------------------------------ */

struct dgi_writer {
    int fd;
    char *path;
    uint64_t size, ngranules;
    uint64_t nrec, nblocks; /* records given, blocks written */
    uint64_t next_g;        /* granules below it were given */
    bool run;               /* a run of zeros is pending */
    uint64_t run_g, run_n;
    unsigned inblk;
    unsigned char blk[DGI_BLOCK_SIZE];
};

int
dgi_writer_open(const char *path, uint64_t size, struct dgi_writer **out)
{
    struct dgi_writer *w = calloc(1, sizeof *w);

    *out = NULL;
    if (!w || !(w->path = strdup(path))) {
        free(w);
        return qcbt_error(ENOMEM, "out of memory");
    }
    w->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (w->fd < 0) {
        int e = errno;

        free(w->path);
        free(w);
        return qcbt_error(e, "%s: %s", path, strerror(e));
    }
    w->size = size;
    w->ngranules = ngranules_of(size);
    *out = w;
    return 0;
}

static int
flush_block(struct dgi_writer *w)
{
    unsigned char *t = w->blk + w->inblk * DGI_RECORD_SIZE;
    int r;

    if (!w->inblk)
        return 0;
    put_be32(t, w->inblk);
    put_be32(t + 4, 0);
    put_be64(t + 8,
             XXH64(w->blk, (size_t)w->inblk * DGI_RECORD_SIZE, w->nblocks));
    r = pwrite_all(w->fd,
                   w->blk,
                   (size_t)w->inblk * DGI_RECORD_SIZE + DGI_TRAILER_SIZE,
                   DGI_HEADER_SIZE + w->nblocks * DGI_BLOCK_SIZE);
    if (r < 0)
        return qcbt_error(-r, "%s: %s", w->path, strerror(-r));
    w->nblocks++;
    w->inblk = 0;
    return 0;
}

static int
put_record(struct dgi_writer *w, uint64_t key, dgi_u128 v)
{
    unsigned char *p = w->blk + w->inblk * DGI_RECORD_SIZE;

    put_be64(p, key);
    put_u128(p + 8, v);
    w->nrec++;
    if (++w->inblk == DGI_BLOCK_RECORDS)
        return flush_block(w);
    return 0;
}

static int
flush_run(struct dgi_writer *w)
{
    if (!w->run)
        return 0;
    w->run = false;
    return put_record(w, w->run_g | DGI_KEY_RUN, w->run_n);
}

int
dgi_writer_add(struct dgi_writer *w, uint64_t g, dgi_u128 v)
{
    int r;

    if (g < w->next_g || g >= w->ngranules)
        return qcbt_error(EINVAL,
                          "%s: granule %" PRIu64 " out of order",
                          w->path,
                          g);
    w->next_g = g + 1;
    if (v == 0) {
        if (w->run && w->run_g + w->run_n == g) {
            w->run_n++;
            return 0;
        }
        r = flush_run(w);
        w->run = true;
        w->run_g = g;
        w->run_n = 1;
        return r;
    }
    r = flush_run(w);
    return r < 0 ? r : put_record(w, g, v);
}

int
dgi_writer_finish(struct dgi_writer *w, dgi_u128 sum)
{
    unsigned char h[DGI_HEADER_SIZE];
    struct dgi_header d = {.size = w->size, .sum = sum};
    int r;

    r = flush_run(w);
    if (r == 0)
        r = flush_block(w);
    if (r == 0) {
        d.nrec = w->nrec;
        header_encode(h, &d);
        r = pwrite_all(w->fd, h, sizeof h, 0);
        if (r == 0 && fdatasync(w->fd) < 0)
            r = -errno;
        if (r < 0)
            r = qcbt_error(-r, "%s: %s", w->path, strerror(-r));
    }
    if (close(w->fd) < 0 && r == 0)
        r = qcbt_error(errno, "%s: %s", w->path, strerror(errno));
    free(w->path);
    free(w);
    return r;
}

void
dgi_writer_abort(struct dgi_writer *w)
{
    if (!w)
        return;
    close(w->fd);
    free(w->path);
    free(w);
}

/* ---- reading ------------------------------------------------------------ */

struct dgi_rec {
    uint64_t g, n; /* granules [g, g+n) */
    dgi_u128 v;    /* each one's contribution (0 for a run) */
};

struct dgi_reader {
    int fd;
    char name[128];
    bool usable, full, reported;
    char why[192];
    uint64_t nrec, nblocks;
    int64_t blk; /* block in recs (-1: none yet) */
    unsigned nr, pos;
    uint64_t floor; /* granules below it are behind the loaded block */
    struct dgi_rec recs[DGI_BLOCK_RECORDS];
};

struct dgi_chain {
    uint64_t size, ngranules;
    struct dgi_reader **r; /* newest first */
    size_t n;
    uint64_t bytes;
};

struct dgi_chain *
dgi_chain_new(uint64_t size)
{
    struct dgi_chain *c = calloc(1, sizeof *c);

    if (!c) {
        qcbt_error(ENOMEM, "out of memory");
        return NULL;
    }
    c->size = size;
    c->ngranules = ngranules_of(size);
    return c;
}

void
dgi_chain_free(struct dgi_chain *c)
{
    size_t i;

    if (!c)
        return;
    for (i = 0; i < c->n; i++) {
        if (c->r[i]->fd >= 0)
            close(c->r[i]->fd);
        free(c->r[i]);
    }
    free(c->r);
    free(c);
}

static void set_broken(struct dgi_reader *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
set_broken(struct dgi_reader *r, const char *fmt, ...)
{
    va_list ap;

    r->usable = false;
    va_start(ap, fmt);
    vsnprintf(r->why, sizeof r->why, fmt, ap);
    va_end(ap);
}

int
dgi_chain_add(struct dgi_chain *c,
              const char *path,
              const char *sumhex,
              bool full,
              char *why,
              size_t why_len)
{
    struct dgi_reader *r = calloc(1, sizeof *r);
    struct dgi_reader **nr;
    unsigned char h[DGI_HEADER_SIZE];
    struct dgi_header d;
    struct gdigest want;
    const char *bad;
    const char *base;
    struct stat st;

    if (!r)
        return qcbt_error(ENOMEM, "out of memory");
    nr = realloc(c->r, (c->n + 1) * sizeof *nr);
    if (!nr) {
        free(r);
        return qcbt_error(ENOMEM, "out of memory");
    }
    c->r = nr;
    c->r[c->n++] = r;
    r->fd = -1;
    r->blk = -1;
    r->full = full;
    r->reported = true; /* problems found here are the caller's to say */
    why[0] = '\0';
    if (!path) {
        snprintf(why, why_len, "none recorded");
        return 0;
    }
    base = strrchr(path, '/');
    base = base ? base + 1 : path;
    qcbt_escape(r->name, sizeof r->name, base, strlen(base));
    r->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd < 0) {
        snprintf(why, why_len, "%s: %s", r->name, strerror(errno));
        return 0;
    }
    if (fstat(r->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(why, why_len, "%s: not a regular file", r->name);
        goto unusable;
    }
    if (pread(r->fd, h, sizeof h, 0) != (ssize_t)sizeof h) {
        snprintf(why, why_len, "%s: truncated header", r->name);
        goto unusable;
    }
    c->bytes += sizeof h;
    bad = header_check(h, &d);
    if (bad) {
        snprintf(why, why_len, "%s: %s", r->name, bad);
        goto unusable;
    }
    if (d.size != c->size) {
        snprintf(why,
                 why_len,
                 "%s: for a disk of %" PRIu64 " bytes, not %" PRIu64,
                 r->name,
                 d.size,
                 c->size);
        goto unusable;
    }
    if ((uint64_t)st.st_size != file_size_of(d.nrec)) {
        snprintf(why,
                 why_len,
                 "%s: %" PRIu64 " bytes, %" PRIu64 " expected (truncated?)",
                 r->name,
                 (uint64_t)st.st_size,
                 file_size_of(d.nrec));
        goto unusable;
    }
    if (!sumhex || !gdigest_sum_parse(&want, sumhex) || want.sum != d.sum) {
        snprintf(why,
                 why_len,
                 "%s: does not match the manifest's digest sum",
                 r->name);
        goto unusable;
    }
    r->nrec = d.nrec;
    r->nblocks = (d.nrec + DGI_BLOCK_RECORDS - 1) / DGI_BLOCK_RECORDS;
    r->usable = true;
    r->reported = false;
    return 0;

unusable:
    close(r->fd);
    r->fd = -1;
    return 0;
}

/* Read, check and decode block B of R into R->recs.  False (R broken)
 * on any inconsistency.
 */
static bool
load_block(struct dgi_chain *c, struct dgi_reader *r, uint64_t b)
{
    unsigned char buf[DGI_BLOCK_SIZE];
    uint64_t nrec =
        MIN((uint64_t)DGI_BLOCK_RECORDS, r->nrec - b * DGI_BLOCK_RECORDS);
    size_t len = nrec * DGI_RECORD_SIZE + DGI_TRAILER_SIZE;
    const unsigned char *t = buf + nrec * DGI_RECORD_SIZE;
    uint64_t end = 0;
    unsigned i;
    ssize_t got;

    got = pread(r->fd, buf, len, DGI_HEADER_SIZE + b * DGI_BLOCK_SIZE);
    if (got != (ssize_t)len) {
        set_broken(r,
                   "%s: block %" PRIu64 ": %s",
                   r->name,
                   b,
                   got < 0 ? strerror(errno) : "short read");
        return false;
    }
    c->bytes += len;
    if (get_be32(t) != nrec || get_be32(t + 4) != 0 ||
        get_be64(t + 8) != XXH64(buf, nrec * DGI_RECORD_SIZE, b)) {
        set_broken(r, "%s: block %" PRIu64 ": checksum mismatch", r->name, b);
        return false;
    }
    for (i = 0; i < nrec; i++) {
        const unsigned char *p = buf + i * DGI_RECORD_SIZE;
        uint64_t key = get_be64(p);
        struct dgi_rec *rec = &r->recs[i];

        rec->g = key & ~DGI_KEY_RUN;
        rec->v = get_u128(p + 8);
        rec->n = 1;
        if (key & DGI_KEY_RUN) {
            if ((rec->v >> 64) != 0 || rec->v == 0)
                goto bad;
            rec->n = (uint64_t)rec->v;
            rec->v = 0;
        }
        if (rec->g > DGI_KEY_MASK || rec->g >= c->ngranules ||
            rec->n > c->ngranules - rec->g || (i && rec->g < end))
            goto bad;
        end = rec->g + rec->n;
    }
    r->blk = (int64_t)b;
    r->nr = (unsigned)nrec;
    r->pos = 0;
    return true;

bad:
    set_broken(r,
               "%s: block %" PRIu64 ": record %u out of order or range",
               r->name,
               b,
               i);
    return false;
}

static uint64_t
block_end(const struct dgi_reader *r)
{
    return r->recs[r->nr - 1].g + r->recs[r->nr - 1].n;
}

/* Load the first block of R past the loaded one that reaches past
 * granule G (the blocks before it end at or before G): found by
 * galloping forward, so that a dense walk reads each block once, a walk
 * to the block after next two, and a sparse one a few.  False: R is
 * exhausted (no such block, R->pos at the end) or broken.
 */
static bool
seek_block(struct dgi_chain *c, struct dgi_reader *r, uint64_t g)
{
    uint64_t lo = (uint64_t)(r->blk + 1), hi, step = 1;
    uint64_t floor = r->floor;

    if (r->blk >= 0 && r->nr)
        floor = block_end(r);
    if (lo >= r->nblocks) {
        r->pos = r->nr;
        return false;
    }
    if (!load_block(c, r, lo))
        return false;
    if (block_end(r) <= g) {
        /* LO ends at or before G: find the first block that does not,
         * in (lo, hi].
         */
        for (;;) {
            hi = lo + step;
            if (hi >= r->nblocks) {
                hi = r->nblocks; /* none may reach past G */
                break;
            }
            if (!load_block(c, r, hi))
                return false;
            if (block_end(r) > g)
                break;
            lo = hi;
            step *= 2;
        }
        while (hi - lo > 1) {
            uint64_t mid = lo + (hi - lo) / 2;

            if (!load_block(c, r, mid))
                return false;
            if (block_end(r) > g)
                hi = mid;
            else
                lo = mid;
        }
        if (hi == r->nblocks) {
            r->blk = (int64_t)r->nblocks - 1;
            r->pos = r->nr = 0; /* exhausted */
            return false;
        }
        if ((uint64_t)r->blk != hi && !load_block(c, r, hi))
            return false;
    }
    if (r->recs[0].g < floor) {
        set_broken(r,
                   "%s: block %" PRIu64 " overlaps the one before",
                   r->name,
                   (uint64_t)r->blk);
        return false;
    }
    r->floor = floor;
    return true;
}

/* 1 and *V: R lists G; 0: it does not; -1: R is broken. */
static int
reader_find(struct dgi_chain *c, struct dgi_reader *r, uint64_t g, dgi_u128 *v)
{
    for (;;) {
        while (r->pos < r->nr && r->recs[r->pos].g + r->recs[r->pos].n <= g)
            r->pos++;
        if (r->blk >= 0 && r->pos < r->nr) {
            if (r->recs[r->pos].g > g)
                return 0;
            *v = r->recs[r->pos].v;
            return 1;
        }
        if (r->blk >= 0 && (uint64_t)r->blk + 1 >= r->nblocks)
            return 0; /* past its last record */
        if (!seek_block(c, r, g))
            return r->usable ? 0 : -1;
    }
}

int
dgi_chain_lookup(struct dgi_chain *c, uint64_t g, dgi_u128 *v)
{
    size_t i;

    for (i = 0; i < c->n; i++) {
        struct dgi_reader *r = c->r[i];
        int k;

        if (!r->usable)
            return 0;
        if (r->nblocks == 0)
            k = 0;
        else
            k = reader_find(c, r, g, v);
        if (k < 0)
            return 0;
        if (k > 0)
            return 1;
        if (r->full) {
            *v = 0; /* a full backup wrote every granule it does not list
                     * as zeros */
            return 1;
        }
    }
    return 0;
}

bool
dgi_chain_broken(struct dgi_chain *c, char *why, size_t why_len)
{
    size_t i;

    for (i = 0; i < c->n; i++) {
        struct dgi_reader *r = c->r[i];

        if (!r->usable && !r->reported) {
            r->reported = true;
            snprintf(why, why_len, "%s", r->why);
            return true;
        }
    }
    return false;
}

uint64_t
dgi_chain_bytes_read(const struct dgi_chain *c)
{
    return c->bytes;
}

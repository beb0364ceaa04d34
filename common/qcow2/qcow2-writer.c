/* qcbt: buffered writer for new qcow2 v3 images (see qcow2-writer.h).
 *
 * State while writing: the L2 tables in use in memory (host byte order,
 * created per L1 entry on first use; at most WRITER_L2_CACHE bytes of
 * them when the file can be read back: the least recently used one is
 * written out to its own host cluster and read back if it is needed
 * again, so a writer of a 1 TiB disk does not hold 128 MiB of tables),
 * the end of the host file (next_host), a
 * list of host clusters released by zero requests (reused first, refcount
 * 0 if still free at close) and a write-behind buffer holding the most
 * recently appended host clusters [buf_off, buf_off + buf_len), with
 * buf_off + buf_len == next_host.  Runs of whole new clusters bypass the
 * buffer: it is flushed and they are appended from the caller's memory
 * (direct_clusters).  Nothing but data clusters and L2 tables is
 * written before close, and cluster 0 (the header) is written last, so a
 * file that was not closed successfully does not start with the qcow2
 * magic.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checked-overflow.h"
#include "error.h"
#include "io.h"
#include "minmax.h"
#include "qcow2.h"
#include "qcow2-writer.h"
#include "rounding.h"

#define WRITER_HEADER_LENGTH  QCOW2_HEADER_LENGTH /* v3 as qemu writes it */
#define WRITER_REFCOUNT_ORDER 4 /* 16-bit refcounts, qemu's default */
#define WRITER_MSG_MAX        512
#define DIRECT_MIN            (64 * 1024) /* smaller writes are gathered */
/* Write-behind: up to WRITER_WB_BYTES in writeback at once.  One buffer
 * (what nbdcopy keeps) left this machine's disk idle between ranges; 256
 * MiB keeps it busy (bench/bench-backup.sh: a full backup 3.9 -> 2.7 s)
 * while the page cache holds at most that much of the backup.
 */
#define WRITER_WB_BYTES  (256u << 20)
#define WRITER_WB_RANGES 64
/* Writeback starts every WRITER_WB_KICK appended, not only every buffer:
 * a backup across a link leaves the disk idle while it waits for reads,
 * and its final fdatasync then waits for the last MiB, not for 8 (a 4 MiB
 * incremental across a 10 ms link: from the last read to durable, 18 ->
 * 12 ms).
 */
#define WRITER_WB_KICK (1u << 20)
/* L2 tables kept in memory (a file that cannot be read back keeps them
 * all): 64 tables of 64 KiB clusters cover 32 GiB of guest, so a writer
 * fed in (nearly) disk order, as a backup is, writes each table once.
 */
#define WRITER_L2_CACHE     (4u << 20)
#define WRITER_L2_CACHE_MIN 4 /* tables: a write spans at most two */
#define WRITER_L2_CACHE_MAX 1024

/* Feature-name table (qcow2.txt "Feature name table"): qcow2_known_features
 * (qcow2.c), the 8 entries qemu 7.2 writes, in its order.  qemu omits the
 * table for clusters of 4 KiB and less to leave room for the backing file
 * name (qcow2_update_header).
 */
#define WRITER_FEATURE_TABLE_MIN_CLUSTER 8192
#define WRITER_NR_FEATURES               qcow2_nr_known_features
#define WRITER_FEATURE_LEN               QCOW2_FEATURE_NAME_SIZE

struct qcow2_writer {
    struct qcbt_io *io; /* the image file; owned */
    char *name;         /* for messages */

    uint64_t size; /* guest bytes, multiple of 512 */
    uint32_t cluster_size;
    unsigned cluster_bits;
    unsigned l2_bits;
    uint32_t l1_size;
    uint64_t **l2; /* l1_size tables of l2_entries, or NULL */
    /* The L2 cache (can_evict): l2_host[i] is where table i was written
     * out (0: never), l2_tick[i] when it was last used; res[] lists the
     * nres tables in memory, at most res_max.
     */
    bool can_evict;
    uint64_t *l2_host;
    uint64_t *l2_tick;
    /* Tables changed since last written out, and the last one used: one
     * the writer moves on from is written out then (l2_entry).
     */
    unsigned char *l2_dirty;
    uint64_t l2_last;
    uint64_t tick;
    uint32_t *res;
    size_t nres, res_max;
    uint64_t l2_loads, l2_stores; /* read back, written out (counters) */

    char *backing_file; /* NULL if none */
    char *backing_fmt;
    qcow2_writer_fill_fn fill;
    void *fill_opaque;

    uint64_t next_host;  /* bytes of host file allocated */
    uint64_t rt_reserve; /* clusters the refcount table must also cover */
    uint64_t *free;      /* released host cluster offsets */
    size_t nr_free, free_cap;

    unsigned char *buf; /* write-behind buffer */
    size_t buf_cap, buf_len;
    uint64_t buf_off;
    uint64_t pend_off, pend_len; /* written, writeback not started yet */
    uint64_t pend_kicked;        /* of which in writeback (WRITER_WB_KICK) */
    struct {
        uint64_t off, len;
    } wb[WRITER_WB_RANGES]; /* being written back, oldest at wb_head */
    unsigned wb_head, wb_nr, wb_max;
    unsigned char *scratch; /* one cluster */

    int error; /* sticky -errno after an I/O error, else 0 */
    char errmsg[WRITER_MSG_MAX];
};

/* ------------------------------------------------------------------ */
/* Errors and raw I/O */

/* Record an I/O failure: the writer is unusable from now on. */
static int writer_fail(struct qcow2_writer *w, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int
writer_fail(struct qcow2_writer *w, int errnum, const char *fmt, ...)
{
    size_t n;
    va_list ap;

    /* Kept in W as well: the thread's last message may be overwritten
     * before the caller's next call on this writer.
     */
    n = strnlen(w->name, sizeof w->errmsg - 3);
    memcpy(w->errmsg, w->name, n);
    memcpy(w->errmsg + n, ": ", 3);
    va_start(ap, fmt);
    vsnprintf(w->errmsg + n + 2, sizeof w->errmsg - n - 2, fmt, ap);
    va_end(ap);
    w->error = -errnum;
    return qcbt_error(errnum, "%s", w->errmsg);
}

/* The sticky error again (the thread's last message may have changed). */
static int
writer_sticky(struct qcow2_writer *w)
{
    return qcbt_error(-w->error, "%s", w->errmsg);
}

static int
pwrite_all(struct qcow2_writer *w,
           const void *p,
           size_t len,
           uint64_t offset,
           const char *what)
{
    int r = qcbt_io_write_exact(w->io, p, len, offset, what);

    if (r < 0)
        return writer_fail(w,
                           -r,
                           "writing %s at host offset %" PRIu64 ": %s",
                           what,
                           offset,
                           strerror(-r));
    return 0;
}

/* Writeback of host bytes [off, off + len), waited for if WAIT.  A
 * failure is the device's (the data may never reach the disk): sticky,
 * as a failed write.
 */
static int
writeback(struct qcow2_writer *w, uint64_t off, uint64_t len, bool wait)
{
    int r = qcbt_io_writeback(w->io, off, len, wait);

    if (r < 0)
        return writer_fail(w,
                           -r,
                           "writeback of host bytes 0x%" PRIx64 "..0x%" PRIx64
                           ": %s",
                           off,
                           off + len,
                           strerror(-r));
    return 0;
}

/* Host bytes [off, off + len) were appended to the file.  Write-behind:
 * every buffer's worth, start writeback of what was appended; once
 * WRITER_WB_BYTES are in writeback, wait for the oldest range and drop it
 * from the page cache, so a backup neither floods the cache nor stalls in
 * dirty-page throttling, and the final fdatasync has little left to do.
 */
static int
appended(struct qcow2_writer *w, uint64_t off, uint64_t len)
{
    unsigned i;
    int r;

    if (w->pend_len == 0) {
        w->pend_off = off;
        w->pend_kicked = 0;
    }
    w->pend_len = off + len - w->pend_off;
    if (w->pend_len < w->buf_cap) {
        if (w->pend_len - w->pend_kicked < WRITER_WB_KICK)
            return 0;
        r = writeback(w,
                      w->pend_off + w->pend_kicked,
                      w->pend_len - w->pend_kicked,
                      false);
        w->pend_kicked = w->pend_len;
        return r;
    }
    r = writeback(w,
                  w->pend_off + w->pend_kicked,
                  w->pend_len - w->pend_kicked,
                  false);
    if (r < 0)
        return r;
    if (w->wb_nr == w->wb_max) {
        i = w->wb_head;
        r = writeback(w, w->wb[i].off, w->wb[i].len, true);
        if (r < 0)
            return r;
        w->wb_head = (w->wb_head + 1) % WRITER_WB_RANGES;
        w->wb_nr--;
    }
    i = (w->wb_head + w->wb_nr) % WRITER_WB_RANGES;
    w->wb[i].off = w->pend_off;
    w->wb[i].len = w->pend_len;
    w->wb_nr++;
    w->pend_len = 0;
    return 0;
}

static int
flush_buffer(struct qcow2_writer *w)
{
    int r;

    if (w->buf_len > 0) {
        r = pwrite_all(w, w->buf, w->buf_len, w->buf_off, "clusters");
        if (r < 0)
            return r;
        r = appended(w, w->buf_off, w->buf_len);
        if (r < 0)
            return r;
    }
    w->buf_off += w->buf_len;
    w->buf_len = 0;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Host cluster allocation */

/* Pointer to host bytes [host, host+len) if they are in the buffer. */
static unsigned char *
in_buffer(struct qcow2_writer *w, uint64_t host, size_t len)
{
    if (host >= w->buf_off && host - w->buf_off + len <= w->buf_len)
        return w->buf + (host - w->buf_off);
    return NULL;
}

/* Append one host cluster at the end of the file; *slot points at its
 * bytes in the buffer (contents undefined).
 */
static int
append_cluster(struct qcow2_writer *w, uint64_t *host, unsigned char **slot)
{
    int r;

    if (w->next_host > QCOW2_MAX_HOST_OFFSET - w->cluster_size)
        return writer_fail(w,
                           EFBIG,
                           "image file would exceed the qcow2 limit of 2^56 "
                           "bytes");
    if (w->buf_len + w->cluster_size > w->buf_cap) {
        r = flush_buffer(w);
        if (r < 0)
            return r;
    }
    *host = w->next_host;
    *slot = w->buf + w->buf_len;
    w->buf_len += w->cluster_size;
    w->next_host += w->cluster_size;
    return 0;
}

/* A host cluster for new contents: a released one if any, else appended.
 * *slot is where to assemble the cluster: in the buffer, or the scratch
 * cluster (then commit_cluster() writes it out).
 */
static int
alloc_cluster(struct qcow2_writer *w, uint64_t *host, unsigned char **slot)
{
    if (w->nr_free > 0) {
        *host = w->free[--w->nr_free];
        *slot = in_buffer(w, *host, w->cluster_size);
        if (*slot == NULL)
            *slot = w->scratch;
        return 0;
    }
    return append_cluster(w, host, slot);
}

static int
release_cluster(struct qcow2_writer *w, uint64_t host)
{
    if (w->nr_free == w->free_cap) {
        size_t cap = w->free_cap ? w->free_cap * 2 : 64;
        uint64_t *p = realloc(w->free, cap * sizeof *p);

        if (p == NULL)
            return qcbt_error(ENOMEM, "%s: out of memory", w->name);
        w->free = p;
        w->free_cap = cap;
    }
    w->free[w->nr_free++] = host;
    return 0;
}

/* Undo alloc_cluster() (nothing references the cluster yet). */
static void
unalloc_cluster(struct qcow2_writer *w, uint64_t host)
{
    if (host + w->cluster_size == w->next_host &&
        w->buf_len >= w->cluster_size &&
        w->buf_off + w->buf_len == w->next_host) {
        w->buf_len -= w->cluster_size;
        w->next_host -= w->cluster_size;
        return;
    }
    /* It came from the free list, which has room for it again. */
    w->free[w->nr_free++] = host;
}

static int
commit_cluster(struct qcow2_writer *w, uint64_t host, unsigned char *slot)
{
    if (slot != w->scratch)
        return 0;
    return pwrite_all(w, slot, w->cluster_size, host, "data cluster");
}

/* Overwrite bytes [a, b) of the data cluster at HOST with SRC (NULL:
 * zeros).
 */
static int
write_in_place(struct qcow2_writer *w,
               uint64_t host,
               size_t a,
               size_t b,
               const unsigned char *src)
{
    unsigned char *p = in_buffer(w, host + a, b - a);

    if (p != NULL) {
        if (src)
            memcpy(p, src, b - a);
        else
            memset(p, 0, b - a);
        return 0;
    }
    if (src == NULL) {
        memset(w->scratch, 0, b - a);
        src = w->scratch;
    }
    return pwrite_all(w, src, b - a, host + a, "data cluster");
}

/* ------------------------------------------------------------------ */
/* Guest clusters */

/* Write L2 table I (in memory) to its host cluster, allocated on its
 * first store.  A table with no entry set and no host cluster yet needs
 * nothing.
 */
static int
l2_store(struct qcow2_writer *w, uint64_t i)
{
    uint64_t entries = 1ULL << w->l2_bits;
    uint64_t *t = w->l2[i], host, j;
    unsigned char *slot;
    /* What the entries are checked against: the header written later. */
    const struct qcow2_header hdr = {
        .version = 3,
        .cluster_bits = w->cluster_bits,
    };
    bool used = false;
    int r;

    host = w->l2_host ? w->l2_host[i] : 0;
    if (host == 0) {
        for (j = 0; j < entries && !used; j++)
            used = t[j] != 0;
        if (!used)
            return 0;
        r = alloc_cluster(w, &host, &slot);
        if (r < 0)
            return r;
    } else {
        slot = in_buffer(w, host, w->cluster_size);
        if (slot == NULL)
            slot = w->scratch;
    }
    for (j = 0; j < entries; j++) {
        r = qcow2_l2_entry_check(t[j], 0, &hdr);
        if (r < 0)
            return qcbt_error_prefix(
                -r,
                "%s: L2 entry 0x%016" PRIx64 " for guest offset 0x%" PRIx64,
                w->name,
                t[j],
                ((i << w->l2_bits) + j) << w->cluster_bits);
        qcow2_table_set(slot, j, t[j]);
    }
    r = commit_cluster(w, host, slot);
    if (r < 0)
        return r;
    if (w->l2_host)
        w->l2_host[i] = host;
    w->l2_stores++;
    return 0;
}

/* Make room for one more table in memory: write out the least recently
 * used one and drop it.
 */
static int
l2_evict(struct qcow2_writer *w)
{
    size_t k, old = 0;
    uint32_t i;
    int r;

    for (k = 1; k < w->nres; k++)
        if (w->l2_tick[w->res[k]] < w->l2_tick[w->res[old]])
            old = k;
    i = w->res[old];
    r = l2_store(w, i);
    if (r < 0)
        return r;
    free(w->l2[i]);
    w->l2[i] = NULL;
    w->res[old] = w->res[--w->nres];
    return 0;
}

/* Bring table I into memory: new (zero), or read back where it was
 * written out.
 */
static int
l2_load(struct qcow2_writer *w, uint64_t i)
{
    uint64_t entries = 1ULL << w->l2_bits, j;
    uint64_t host = w->l2_host ? w->l2_host[i] : 0;
    uint64_t *t;
    int r;

    if (w->can_evict && w->nres == w->res_max) {
        r = l2_evict(w);
        if (r < 0)
            return r;
    }
    t = calloc(entries, sizeof *t);
    if (t == NULL)
        return qcbt_error(ENOMEM, "%s: out of memory for an L2 table", w->name);
    if (host) {
        const unsigned char *p = in_buffer(w, host, w->cluster_size);

        if (p == NULL) {
            r = qcbt_io_read_exact(w->io,
                                   w->scratch,
                                   w->cluster_size,
                                   host,
                                   false,
                                   "L2 table");
            if (r < 0) {
                free(t);
                return writer_fail(w,
                                   -r,
                                   "reading back the L2 table at host "
                                   "offset %" PRIu64 ": %s",
                                   host,
                                   qcbt_error_get());
            }
            p = w->scratch;
        }
        for (j = 0; j < entries; j++)
            t[j] = qcow2_table_get(p, j);
        w->l2_loads++;
    }
    w->l2[i] = t;
    if (w->can_evict)
        w->res[w->nres++] = (uint32_t)i;
    return 0;
}

/* *ENTRY: the L2 entry of guest cluster CLUSTER, valid until the next
 * call (which may write its table out).
 */
static int
l2_entry(struct qcow2_writer *w, uint64_t cluster, uint64_t **entry)
{
    uint64_t l1_idx = cluster >> w->l2_bits;
    uint64_t l2_idx = cluster & ((1ULL << w->l2_bits) - 1);
    int r;

    if (w->l2[l1_idx] == NULL) {
        r = l2_load(w, l1_idx);
        if (r < 0)
            return r;
    }
    /* Moving on to a later table: a backup writes in disk order, so the
     * one it leaves is done.  It is written out now, while the disk would
     * wait for the next reads, not at close (a sparse incremental has a
     * table per dirty run: 4 MiB of them for 4 MiB of data).  It stays in
     * memory; written to again, it is written out again.
     */
    if (w->can_evict && l1_idx != w->l2_last) {
        uint64_t last = w->l2_last;

        if (last < l1_idx && w->l2[last] && w->l2_dirty[last]) {
            r = l2_store(w, last);
            if (r < 0)
                return r;
            w->l2_dirty[last] = 0;
        }
        w->l2_last = l1_idx;
    }
    w->l2_dirty[l1_idx] = 1;
    if (w->l2_tick)
        w->l2_tick[l1_idx] = ++w->tick;
    *entry = &w->l2[l1_idx][l2_idx];
    return 0;
}

/* Guest bytes [a, b) of cluster CSTART that this image does not hold:
 * zeros if ZERO, else the fill callback's answer.
 */
static int
fill_part(struct qcow2_writer *w,
          unsigned char *slot,
          size_t a,
          size_t b,
          uint64_t cstart,
          bool zero)
{
    int r;

    if (a == b)
        return 0;
    if (zero || (w->fill == NULL && w->backing_file == NULL)) {
        memset(slot + a, 0, b - a);
        return 0;
    }
    if (w->fill == NULL)
        return qcbt_error(EINVAL,
                          "%s: partial cluster at guest offset %" PRIu64
                          " needs the backing file's data, but no fill "
                          "callback was given",
                          w->name,
                          cstart + a);
    qcbt_error_clear();
    r = w->fill(w->fill_opaque, slot + a, b - a, cstart + a);
    if (r < 0) {
        if (qcbt_error_get()[0] == '\0')
            qcbt_error(-r, "%s", strerror(-r));
        return qcbt_error_prefix(-r,
                                 "%s: fill callback for guest offset %" PRIu64
                                 " length %zu",
                                 w->name,
                                 cstart + a,
                                 b - a);
    }
    return 0;
}

static bool
is_zero(const unsigned char *p, size_t len)
{
    return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
}

/* Bytes [a, b) of guest cluster C (b <= valid bytes of the cluster) get
 * SRC, or zeros when SRC is NULL (a zero request).
 */
static int
do_cluster(struct qcow2_writer *w,
           uint64_t c,
           size_t a,
           size_t b,
           const unsigned char *src)
{
    uint64_t cstart = c << w->cluster_bits;
    size_t vend = (size_t)MIN((uint64_t)w->cluster_size, w->size - cstart);
    bool whole = a == 0 && b == vend;
    bool zero_req = src == NULL;
    uint64_t *entry, e, host;
    unsigned char *slot = NULL;
    int r;

    r = l2_entry(w, c, &entry);
    if (r < 0)
        return r;
    e = *entry;

    if (e & QCOW2_L2E_OFFSET_MASK) {
        /* Already a data cluster of this image. */
        host = e & QCOW2_L2E_OFFSET_MASK;
        if (zero_req && whole) {
            r = release_cluster(w, host);
            if (r < 0)
                return r;
            *entry = QCOW2_OFLAG_ZERO;
            return 0;
        }
        return write_in_place(w, host, a, b, src);
    }

    if (zero_req && (whole || (e & QCOW2_OFLAG_ZERO))) {
        *entry = QCOW2_OFLAG_ZERO;
        return 0;
    }

    /* A new data cluster: the request's bytes, the rest from this image's
     * zero cluster or from below (fill), zeros past the virtual size.
     */
    r = alloc_cluster(w, &host, &slot);
    if (r < 0)
        return r;
    r = fill_part(w, slot, 0, a, cstart, e & QCOW2_OFLAG_ZERO);
    if (r == 0)
        r = fill_part(w, slot, b, vend, cstart, e & QCOW2_OFLAG_ZERO);
    if (r < 0) {
        unalloc_cluster(w, host);
        return r;
    }
    if (src)
        memcpy(slot + a, src, b - a);
    else
        memset(slot + a, 0, b - a);
    memset(slot + vend, 0, w->cluster_size - vend);

    if (zero_req && is_zero(slot, vend)) {
        /* Nothing below shows through: a zero cluster says it cheaper. */
        unalloc_cluster(w, host);
        *entry = QCOW2_OFLAG_ZERO;
        return 0;
    }
    r = commit_cluster(w, host, slot);
    if (r < 0)
        return r;
    *entry = host | QCOW2_OFLAG_COPIED;
    return 0;
}

static int
check_range(struct qcow2_writer *w,
            uint64_t offset,
            uint64_t len,
            const char *what)
{
    uint64_t end;

    if (w->error)
        return writer_sticky(w);
    if (ADD_OVERFLOW(offset, len, &end) || end > w->size)
        return qcbt_error(EINVAL,
                          "%s: %s at guest offset %" PRIu64 " length %" PRIu64
                          " is beyond the virtual size %" PRIu64,
                          w->name,
                          what,
                          offset,
                          len,
                          w->size);
    return 0;
}

/* The common case of a backup: whole clusters this image does not hold
 * yet, appended straight from the caller's buffer (no copy through the
 * write-behind buffer).  Consumes the leading run of such clusters of
 * [*offset, *offset + *len) and advances the arguments past it.
 */
static int
direct_clusters(struct qcow2_writer *w,
                const unsigned char **src,
                uint64_t *len,
                uint64_t *offset)
{
    uint64_t c = *offset >> w->cluster_bits, n = 0, i, bytes, host;
    int r;

    if (*offset & (w->cluster_size - 1))
        return 0;
    while ((n + 1) * w->cluster_size <= *len) {
        uint64_t *entry;

        r = l2_entry(w, c + n, &entry);
        if (r < 0)
            return r;
        if (*entry & QCOW2_L2E_OFFSET_MASK)
            break;
        n++;
    }
    bytes = n * w->cluster_size;
    if (bytes < DIRECT_MIN)
        return 0;
    if (w->next_host > QCOW2_MAX_HOST_OFFSET - bytes)
        return writer_fail(w,
                           EFBIG,
                           "image file would exceed the qcow2 limit of 2^56 "
                           "bytes");
    r = flush_buffer(w);
    if (r < 0)
        return r;
    host = w->next_host;
    r = pwrite_all(w, *src, bytes, host, "clusters");
    if (r < 0)
        return r;
    r = appended(w, host, bytes);
    if (r < 0)
        return r;
    w->next_host += bytes;
    w->buf_off = w->next_host;
    /* (A table written out on the way goes after the run.) */
    for (i = 0; i < n; i++) {
        uint64_t *entry;

        r = l2_entry(w, c + i, &entry);
        if (r < 0)
            return r;
        *entry = (host + i * w->cluster_size) | QCOW2_OFLAG_COPIED;
    }
    *src += bytes;
    *len -= bytes;
    *offset += bytes;
    return 0;
}

static int
do_range(struct qcow2_writer *w,
         const unsigned char *src,
         uint64_t len,
         uint64_t offset)
{
    uint64_t mask = w->cluster_size - 1;
    int r;

    if (src && w->nr_free == 0) {
        r = direct_clusters(w, &src, &len, &offset);
        if (r < 0)
            return r;
    }
    while (len > 0) {
        size_t a = (size_t)(offset & mask);
        size_t n = (size_t)MIN(len, (uint64_t)w->cluster_size - a);

        r = do_cluster(w, offset >> w->cluster_bits, a, a + n, src);
        if (r < 0)
            return r;
        if (src)
            src += n;
        offset += n;
        len -= n;
    }
    return 0;
}

int
qcow2_writer_write(struct qcow2_writer *w,
                   const void *buf,
                   size_t len,
                   uint64_t offset)
{
    int r = check_range(w, offset, len, "write");

    if (r < 0)
        return r;
    if (len == 0)
        return 0;
    if (buf == NULL)
        return qcbt_error(EINVAL, "%s: write with a NULL buffer", w->name);
    return do_range(w, buf, len, offset);
}

int
qcow2_writer_zero(struct qcow2_writer *w, uint64_t offset, uint64_t len)
{
    int r = check_range(w, offset, len, "zero request");

    if (r < 0)
        return r;
    return do_range(w, NULL, len, offset);
}

uint64_t
qcow2_writer_size(const struct qcow2_writer *w)
{
    return w->size;
}

uint32_t
qcow2_writer_cluster_size(const struct qcow2_writer *w)
{
    return w->cluster_size;
}

void
qcow2_writer_l2_stats(const struct qcow2_writer *w,
                      size_t *resident,
                      uint64_t *loads,
                      uint64_t *stores)
{
    size_t n = 0;
    uint32_t i;

    for (i = 0; i < w->l1_size; i++)
        n += w->l2[i] != NULL;
    *resident = n;
    *loads = w->l2_loads;
    *stores = w->l2_stores;
}

/* ------------------------------------------------------------------ */
/* Create */

static void
writer_free(struct qcow2_writer *w)
{
    uint32_t i;

    if (w == NULL)
        return;
    if (w->l2) {
        for (i = 0; i < w->l1_size; i++)
            free(w->l2[i]);
        free(w->l2);
    }
    free(w->l2_host);
    free(w->l2_tick);
    free(w->l2_dirty);
    free(w->res);
    free(w->free);
    free(w->buf);
    free(w->scratch);
    free(w->backing_file);
    free(w->backing_fmt);
    free(w->name);
    free(w);
}

/* Header bytes up to and including the end-of-extensions marker, before
 * the backing file name (qcow2_update_header's order: backing format,
 * feature table, end).
 */
static size_t
header_ext_end(uint32_t cluster_size, size_t fmt_len)
{
    size_t n = WRITER_HEADER_LENGTH;

    if (fmt_len)
        n += qcow2_header_ext_size((uint32_t)fmt_len);
    if (cluster_size >= WRITER_FEATURE_TABLE_MIN_CLUSTER)
        n += qcow2_header_ext_size(WRITER_NR_FEATURES * WRITER_FEATURE_LEN);
    return n + QCOW2_HEADER_EXT_SIZE;
}

static int
check_opts(const struct qcow2_writer_opts *opts, const char *name)
{
    uint32_t cs = opts->cluster_size ? opts->cluster_size
                                     : QCOW2_WRITER_DEFAULT_CLUSTER_SIZE;
    bool has_backing = opts->backing_file && opts->backing_file[0];
    size_t name_len, fmt_len;

    if (cs < (1u << QCOW2_MIN_CLUSTER_BITS) ||
        cs > (1u << QCOW2_MAX_CLUSTER_BITS) || (cs & (cs - 1)))
        return qcbt_error(EINVAL,
                          "%s: cluster size %" PRIu32
                          " is not a power of two between 512 and 2097152",
                          name,
                          cs);
    if (opts->refcount_reserve > (UINT64_C(1) << 40))
        return qcbt_error(EINVAL,
                          "%s: refcount reserve of %" PRIu64
                          " clusters is too large",
                          name,
                          opts->refcount_reserve);
    if (!has_backing) {
        if (opts->backing_fmt)
            return qcbt_error(EINVAL,
                              "%s: backing format given without a backing "
                              "file",
                              name);
        return 0;
    }
    if (opts->backing_fmt == NULL || opts->backing_fmt[0] == '\0')
        return qcbt_error(EINVAL,
                          "%s: backing file '%s' needs a backing format",
                          name,
                          opts->backing_file);
    fmt_len = strlen(opts->backing_fmt);
    if (fmt_len > QCOW2_MAX_BACKING_FMT)
        return qcbt_error(EINVAL,
                          "%s: backing format name is longer than %d bytes",
                          name,
                          QCOW2_MAX_BACKING_FMT);
    name_len = strlen(opts->backing_file);
    if (name_len > QCOW2_MAX_BACKING_NAME ||
        header_ext_end(cs, fmt_len) + name_len > cs)
        return qcbt_error(ENAMETOOLONG,
                          "%s: backing file name of %zu bytes does not fit "
                          "in the header cluster (at most %zu with %" PRIu32
                          "-byte clusters)",
                          name,
                          name_len,
                          MIN((size_t)QCOW2_MAX_BACKING_NAME,
                              cs - header_ext_end(cs, fmt_len)),
                          cs);
    return 0;
}

/* The virtual size rounded to whole sectors, as qemu-img create rounds
 * it, and the L1 entries it needs.
 */
static int
check_size(const struct qcow2_writer_opts *opts,
           const char *name,
           uint64_t *size,
           uint64_t *l1_size)
{
    uint32_t cs = opts->cluster_size ? opts->cluster_size
                                     : QCOW2_WRITER_DEFAULT_CLUSTER_SIZE;
    uint64_t l2_cover;

    if (opts->size > (uint64_t)INT64_MAX - 511)
        return qcbt_error(EFBIG,
                          "%s: virtual size %" PRIu64 " is too large",
                          name,
                          opts->size);
    *size = ROUND_UP(opts->size, 512);
    /* One L1 entry maps cs/8 clusters; the L1 table is limited to 32 MiB
     * (qcow2-format.md section 4).
     */
    l2_cover = (uint64_t)cs * (cs / 8);
    *l1_size = DIV_ROUND_UP(*size, l2_cover);
    if (*l1_size * 8 > QCOW2_MAX_L1_BYTES)
        return qcbt_error(EFBIG,
                          "%s: virtual size %" PRIu64
                          " needs an L1 table larger than 32 MiB with %" PRIu32
                          "-byte clusters",
                          name,
                          *size,
                          cs);
    return 0;
}

/* CAN_EVICT: IO can be read back (L2 tables may leave memory). */
static int
writer_create_io(struct qcbt_io *io,
                 const struct qcow2_writer_opts *opts,
                 bool can_evict,
                 struct qcow2_writer **out)
{
    struct qcow2_writer *w = NULL;
    const char *name = io->name;
    uint64_t size, l1_size;
    uint32_t cs;
    size_t cap;
    int r;

    *out = NULL;
    r = check_opts(opts, name);
    if (r < 0)
        goto fail;
    if (!io->ops->pwrite) {
        r = qcbt_error(EBADF, "%s: file is not open for writing", name);
        goto fail;
    }
    r = check_size(opts, name, &size, &l1_size);
    if (r < 0)
        goto fail;
    cs = opts->cluster_size ? opts->cluster_size
                            : QCOW2_WRITER_DEFAULT_CLUSTER_SIZE;

    w = calloc(1, sizeof *w);
    if (w == NULL)
        goto enomem;
    w->size = size;
    w->cluster_size = cs;
    w->cluster_bits = (unsigned)__builtin_ctz(cs);
    w->l2_bits = w->cluster_bits - 3;
    w->l1_size = (uint32_t)l1_size;
    w->fill = opts->fill;
    w->fill_opaque = opts->fill_opaque;
    w->rt_reserve = opts->refcount_reserve;
    w->name = strdup(name);
    w->l2 = calloc(l1_size ? l1_size : 1, sizeof *w->l2);
    w->l2_host = calloc(l1_size ? l1_size : 1, sizeof *w->l2_host);
    w->l2_tick = calloc(l1_size ? l1_size : 1, sizeof *w->l2_tick);
    w->l2_dirty = calloc(l1_size ? l1_size : 1, 1);
    w->l2_last = UINT64_MAX;
    w->scratch = malloc(cs);
    if (w->name == NULL || w->l2 == NULL || w->l2_host == NULL ||
        w->l2_tick == NULL || w->l2_dirty == NULL || w->scratch == NULL)
        goto enomem;
    w->can_evict = can_evict;
    w->res_max = MAX((size_t)WRITER_L2_CACHE_MIN,
                     MIN((size_t)WRITER_L2_CACHE_MAX,
                         (opts->l2_cache_size ? opts->l2_cache_size
                                              : (size_t)WRITER_L2_CACHE) /
                             cs));
    if (can_evict) {
        w->res = calloc(w->res_max, sizeof *w->res);
        if (w->res == NULL)
            goto enomem;
    }
    if (opts->backing_file && opts->backing_file[0]) {
        w->backing_file = strdup(opts->backing_file);
        w->backing_fmt = strdup(opts->backing_fmt);
        if (w->backing_file == NULL || w->backing_fmt == NULL)
            goto enomem;
    }
    cap = opts->buffer_size ? opts->buffer_size
                            : QCOW2_WRITER_DEFAULT_BUFFER_SIZE;
    if (cap > SIZE_MAX / 2)
        cap = SIZE_MAX / 2;
    cap = ROUND_UP(cap, (size_t)cs);
    if (cap == 0)
        cap = cs;
    w->buf_cap = cap;
    w->wb_max = (unsigned)MAX(
        (size_t)1,
        MIN((size_t)WRITER_WB_RANGES, (size_t)WRITER_WB_BYTES / cap));
    if (posix_memalign((void **)&w->buf, 4096, cap) != 0) {
        w->buf = NULL;
        goto enomem;
    }
    /* Cluster 0 is the header, written at close. */
    w->next_host = cs;
    w->buf_off = cs;
    w->io = io;
    *out = w;
    return 0;

enomem:
    r = qcbt_error(ENOMEM, "%s: out of memory", name);
fail:
    writer_free(w);
    qcbt_io_free(io);
    return r;
}

int
qcow2_writer_create_io(struct qcbt_io *io,
                       const struct qcow2_writer_opts *opts,
                       struct qcow2_writer **out)
{
    return writer_create_io(io, opts, true, out);
}

int
qcow2_writer_create_fd(int fd,
                       const char *name,
                       const struct qcow2_writer_opts *opts,
                       struct qcow2_writer **out)
{
    struct qcbt_io *io;
    struct stat st;
    uint64_t size, l1_size;
    int flags, r;

    *out = NULL;
    if (name == NULL)
        name = "qcow2 writer";
    /* Validate before touching the file. */
    r = check_opts(opts, name);
    if (r >= 0)
        r = check_size(opts, name, &size, &l1_size);
    if (r < 0)
        goto fail;
    flags = fcntl(fd, F_GETFL);
    if (flags < 0) {
        r = qcbt_error(errno, "%s: %s", name, strerror(errno));
        goto fail;
    }
    if ((flags & O_ACCMODE) == O_RDONLY) {
        r = qcbt_error(EBADF, "%s: file is not open for writing", name);
        goto fail;
    }
    if (fstat(fd, &st) < 0) {
        r = qcbt_error(errno, "%s: fstat: %s", name, strerror(errno));
        goto fail;
    }
    if (S_ISREG(st.st_mode) && st.st_size > 0 && ftruncate(fd, 0) < 0) {
        r = qcbt_error(errno, "%s: truncate: %s", name, strerror(errno));
        goto fail;
    }
    r = qcbt_io_open_fd(fd, name, &io); /* owns fd from here on */
    if (r < 0)
        return r;
    return writer_create_io(io, opts, (flags & O_ACCMODE) == O_RDWR, out);

fail:
    close(fd);
    return r;
}

int
qcow2_writer_create(const char *path,
                    const struct qcow2_writer_opts *opts,
                    struct qcow2_writer **out)
{
    int flags = O_RDWR | O_CREAT | O_CLOEXEC; /* L2 tables are read back */
    int fd, r;

    *out = NULL;
    /* Validate before touching the file system. */
    r = check_opts(opts, path);
    if (r < 0)
        return r;
    flags |= opts->exclusive ? O_EXCL : O_TRUNC;
    fd = open(path, flags, 0666);
    if (fd < 0)
        return qcbt_error(errno, "%s: %s", path, strerror(errno));
    r = qcow2_writer_create_fd(fd, path, opts, out);
    if (r < 0)
        unlink(path); /* ours: created or truncated above */
    return r;
}

/* ------------------------------------------------------------------ */
/* Close */

static int
append_zeroed(struct qcow2_writer *w, uint64_t *host, unsigned char **slot)
{
    int r = append_cluster(w, host, slot);

    if (r == 0)
        memset(*slot, 0, w->cluster_size);
    return r;
}

/* Write every L2 table in memory; fill l1[] (host order) with every
 * table written, now or before.
 */
static int
write_l2_tables(struct qcow2_writer *w, uint64_t *l1)
{
    uint64_t i;
    int r;

    for (i = 0; i < w->l1_size; i++) {
        if (w->l2[i] && (w->l2_dirty[i] || !w->l2_host[i])) {
            r = l2_store(w, i);
            if (r < 0)
                return r;
        }
        if (w->l2_host[i])
            l1[i] = w->l2_host[i] | QCOW2_OFLAG_COPIED;
    }
    return 0;
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/* Append the refcount table and blocks covering every host cluster,
 * themselves included (qcow2-format.md section 6).  Clusters on the free
 * list get refcount 0, all others 1.
 */
static int
write_refcounts(struct qcow2_writer *w,
                uint64_t *reftable_off,
                uint32_t *reftable_clusters)
{
    uint64_t cs = w->cluster_size;
    uint64_t rb_entries = cs * 8 / (1u << WRITER_REFCOUNT_ORDER);
    uint64_t used = w->next_host / cs; /* clusters before the refcounts */
    uint64_t nblocks = 0, ntable = 0, total, nb, nt, i, j, k, host;
    unsigned char *slot = NULL;
    size_t fi = 0;
    int r;

    for (;;) {
        total = used + ntable + nblocks;
        nb = DIV_ROUND_UP(total, rb_entries);
        /* Entries for the blocks of clusters appended after close (the
         * reserve) stay 0 until qcow2_alloc creates those blocks. */
        nt = DIV_ROUND_UP(DIV_ROUND_UP(total + w->rt_reserve, rb_entries) * 8,
                          cs);
        if (nb == nblocks && nt == ntable)
            break;
        nblocks = nb;
        ntable = nt;
    }
    if (ntable * cs > QCOW2_MAX_REFTABLE_BYTES)
        return writer_fail(w,
                           EFBIG,
                           "refcount table of %" PRIu64
                           " clusters exceeds qemu's 8 MiB limit",
                           ntable);

    if (w->nr_free > 1)
        qsort(w->free, w->nr_free, sizeof *w->free, cmp_u64);

    *reftable_off = w->next_host;
    *reftable_clusters = (uint32_t)ntable;
    for (i = 0; i < ntable; i++) {
        r = append_zeroed(w, &host, &slot);
        if (r < 0)
            return r;
        for (j = 0; j < cs / 8; j++) {
            uint64_t b = i * (cs / 8) + j;

            if (b < nblocks)
                qcow2_table_set(slot, j, (used + ntable + b) * cs);
        }
    }
    for (i = 0; i < nblocks; i++) {
        r = append_zeroed(w, &host, &slot);
        if (r < 0)
            return r;
        for (j = 0; j < rb_entries; j++) {
            k = i * rb_entries + j;
            if (k >= total)
                break;
            while (fi < w->nr_free && w->free[fi] < k * cs)
                fi++;
            if (fi < w->nr_free && w->free[fi] == k * cs)
                continue;
            qcow2_refblock_set(slot, WRITER_REFCOUNT_ORDER, j, 1);
        }
    }
    return 0;
}

/* Append the extension TYPE with LEN bytes of DATA (NULL: the caller
 * fills them) at *P of the header cluster H, after checking it against
 * the extension area [*P, END) as the reader will.
 */
static int
put_ext(struct qcow2_writer *w,
        unsigned char *h,
        size_t *p,
        size_t end,
        uint32_t type,
        const void *data,
        uint32_t len)
{
    struct qcow2_header_ext ext = {type, len};

    if (qcow2_header_ext_check(&ext, *p, end) < 0)
        return writer_fail(w, EINVAL, "%s", qcbt_error_get());
    qcow2_header_ext_encode(&ext, h + *p);
    if (data)
        memcpy(h + *p + QCOW2_HEADER_EXT_SIZE, data, len);
    *p += qcow2_header_ext_size(len);
    return 0;
}

static int
write_header(struct qcow2_writer *w,
             uint64_t l1_off,
             uint64_t reftable_off,
             uint32_t reftable_clusters)
{
    unsigned char *h = w->scratch;
    size_t fmt_len = w->backing_fmt ? strlen(w->backing_fmt) : 0;
    size_t name_len = w->backing_file ? strlen(w->backing_file) : 0;
    /* The extension area ends where the backing file name starts. */
    size_t end = w->backing_file ? header_ext_end(w->cluster_size, fmt_len)
                                 : w->cluster_size;
    struct qcow2_header hdr = {
        .magic = QCOW2_MAGIC,
        .version = 3,
        .backing_file_offset = w->backing_file ? end : 0,
        .backing_file_size = (uint32_t)name_len,
        .cluster_bits = w->cluster_bits,
        .size = w->size,
        .crypt_method = 0,
        .l1_size = w->l1_size,
        .l1_table_offset = l1_off,
        .refcount_table_offset = reftable_off,
        .refcount_table_clusters = reftable_clusters,
        /* no snapshots, no feature bits */
        .refcount_order = WRITER_REFCOUNT_ORDER,
        .header_length = WRITER_HEADER_LENGTH,
        .compression_type = QCOW2_COMPRESSION_DEFLATE,
    };
    size_t p, i, len;
    int r;

    /* What we write is what the reader accepts: the same validator, for
     * the file as it will be once the header is in place.
     */
    if (qcow2_header_check(&hdr, w->next_host) < 0)
        return writer_fail(w, EINVAL, "header: %s", qcbt_error_get());
    memset(h, 0, w->cluster_size);
    p = qcow2_header_encode(&hdr, h);

    /* qcow2_update_header's order: backing format, feature table, end. */
    if (fmt_len) {
        r = put_ext(w,
                    h,
                    &p,
                    end,
                    QCOW2_EXT_BACKING_FMT,
                    w->backing_fmt,
                    (uint32_t)fmt_len);
        if (r < 0)
            return r;
    }
    if (w->cluster_size >= WRITER_FEATURE_TABLE_MIN_CLUSTER) {
        size_t table = p + QCOW2_HEADER_EXT_SIZE;

        r = put_ext(w,
                    h,
                    &p,
                    end,
                    QCOW2_EXT_FEATURES,
                    NULL,
                    (uint32_t)(WRITER_NR_FEATURES * WRITER_FEATURE_LEN));
        if (r < 0)
            return r;
        for (i = 0; i < WRITER_NR_FEATURES; i++) {
            if (qcow2_feature_name_check(&qcow2_known_features[i]) < 0)
                return writer_fail(w, EINVAL, "%s", qcbt_error_get());
            qcow2_feature_name_encode(&qcow2_known_features[i],
                                      h + table + i * WRITER_FEATURE_LEN);
        }
    }
    p += QCOW2_HEADER_EXT_SIZE; /* end of extensions: type 0, length 0 */
    if (w->backing_file) {
        memcpy(h + p, w->backing_file, name_len);
        p += name_len;
    }
    /* Sectors, not the whole cluster: the rest of cluster 0 stays a hole
     * and reads as zeros.
     */
    len = MIN(ROUND_UP(p, (size_t)512), (size_t)w->cluster_size);
    return pwrite_all(w, h, len, 0, "header");
}

static int
finalize(struct qcow2_writer *w)
{
    uint64_t *l1 = NULL;
    uint64_t l1_off = 0, reftable_off = 0, host = 0, i, j;
    uint64_t per = w->cluster_size / 8;
    uint32_t reftable_clusters = 0;
    unsigned char *slot = NULL;
    int r;

    l1 = calloc(w->l1_size ? w->l1_size : 1, sizeof *l1);
    if (l1 == NULL)
        return qcbt_error(ENOMEM, "%s: out of memory", w->name);
    r = write_l2_tables(w, l1);
    if (r < 0)
        goto out;

    /* The L1 table: contiguous, appended (qemu-img create leaves it out
     * when l1_size is 0).
     */
    for (i = 0; i < DIV_ROUND_UP((uint64_t)w->l1_size, per); i++) {
        r = append_zeroed(w, &host, &slot);
        if (r < 0)
            goto out;
        if (i == 0)
            l1_off = host;
        for (j = 0; j < per && i * per + j < w->l1_size; j++)
            qcow2_table_set(slot, j, l1[i * per + j]);
    }

    r = write_refcounts(w, &reftable_off, &reftable_clusters);
    if (r < 0)
        goto out;
    r = flush_buffer(w);
    if (r < 0)
        goto out;
    r = write_header(w, l1_off, reftable_off, reftable_clusters);
    if (r < 0)
        goto out;
    r = qcbt_io_flush(w->io);
    if (r < 0)
        r = writer_fail(w, -r, "flush: %s", strerror(-r));
out:
    free(l1);
    return r;
}

int
qcow2_writer_close(struct qcow2_writer *w)
{
    int r, r2;

    if (w == NULL)
        return 0;
    if (w->error)
        r = writer_sticky(w);
    else
        r = finalize(w);
    r2 = qcbt_io_close(w->io);
    w->io = NULL;
    if (r2 < 0 && r == 0)
        r = r2;
    writer_free(w);
    return r;
}

void
qcow2_writer_abort(struct qcow2_writer *w)
{
    if (w == NULL)
        return;
    qcbt_io_free(w->io);
    w->io = NULL;
    writer_free(w);
}

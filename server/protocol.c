/* qcbt-server: the transmission phase (proto.md "Transmission",
 * "Structured replies", "Metadata querying").
 *
 * Each connection runs several workers.  A worker takes the read lock,
 * reads one request (and drains a refused write payload), releases it, and
 * serves the request; replies go out under the write lock, chunk by chunk,
 * so replies to different requests interleave and may complete out of
 * order.  Buffers belong to the worker: no allocation per request while
 * requests keep coming, but a worker keeps at most WORKER_BUF_KEEP after
 * a request and frees all it holds (data buffer, extent arrays, the
 * chain's decompression cache) once it has waited IDLE_RELEASE_MS for
 * work: an idle connection holds little memory.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <time.h>

#include "byteorder.h"
#include "error.h"
#include "internal.h"
#include "minmax.h"
#include "nbd-protocol.h"

#define HOLE_MIN (64u * 1024) /* shorter zero runs are sent as data */

struct extent {
    uint32_t len;
    uint32_t flags;
};

struct worker {
    struct connection *c;
    pthread_t thread;
    unsigned char *buf; /* data buffer */
    size_t bufsize;
    struct extent **ext; /* per selected context, NULL until used */
    size_t *next;        /* extents filled per context */
    uint64_t *ends;      /* coverage end per context */
};

struct request {
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t offset;
    uint32_t len;
};

static int
grow_buf(struct worker *w, size_t size)
{
    unsigned char *nb;

    if (w->bufsize >= size)
        return 0;
    nb = realloc(w->buf, size);
    if (!nb)
        return -1;
    w->buf = nb;
    w->bufsize = size;
    return 0;
}

static void
free_buf(struct worker *w)
{
    free(w->buf);
    w->buf = NULL;
    w->bufsize = 0;
}

/* Give back everything the worker holds for requests; called on the
 * worker's own thread (the decompression cache is per thread).
 */
static void
worker_release(struct worker *w)
{
    size_t i;

    free_buf(w);
    for (i = 0; w->ext && i < w->c->nr_meta; i++) {
        free(w->ext[i]);
        w->ext[i] = NULL;
    }
    chain_release_thread_cache();
}

static int
send_simple(struct connection *c,
            const struct request *rq,
            uint32_t err,
            const void *data,
            size_t len)
{
    unsigned char h[16];
    int r;

    put_be32(h, NBD_SIMPLE_REPLY_MAGIC);
    put_be32(h + 4, err);
    put_be64(h + 8, rq->cookie);
    pthread_mutex_lock(&c->write_lock);
    r = conn_write(c, h, sizeof h, len > 0);
    if (r == 0 && len)
        r = conn_write(c, data, len, false);
    pthread_mutex_unlock(&c->write_lock);
    return r;
}

static void
chunk_header(unsigned char *h,
             const struct request *rq,
             uint16_t flags,
             uint16_t type,
             uint32_t len)
{
    put_be32(h, NBD_STRUCTURED_REPLY_MAGIC);
    put_be16(h + 4, flags);
    put_be16(h + 6, type);
    put_be64(h + 8, rq->cookie);
    put_be32(h + 16, len);
}

static int send_error(struct connection *c,
                      const struct request *rq,
                      uint32_t err,
                      const char *fmt,
                      ...) __attribute__((format(printf, 4, 5)));

/* An error reply: an ERROR chunk (DONE) with a message when structured
 * replies are on, a simple reply otherwise.
 */
static int
send_error(struct connection *c,
           const struct request *rq,
           uint32_t err,
           const char *fmt,
           ...)
{
    unsigned char h[20 + 6 + 256];
    va_list ap;
    int n, r;

    va_start(ap, fmt);
    n = vsnprintf((char *)h + 26, 256, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if (n > 255)
        n = 255;
    srv_log(c->srv,
            LOG_DEBUG,
            "%s: request type %u: error %u: %s",
            c->peer,
            rq->type,
            err,
            (char *)h + 26);
    if (!c->structured)
        return send_simple(c, rq, err, NULL, 0);
    chunk_header(h, rq, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6 + n);
    put_be32(h + 20, err);
    put_be16(h + 24, n);
    pthread_mutex_lock(&c->write_lock);
    r = conn_write(c, h, 26 + n, false);
    pthread_mutex_unlock(&c->write_lock);
    return r;
}

static uint32_t
errno_to_nbd(int e)
{
    switch (e) {
    case EPERM:
    case EROFS:
        return NBD_EPERM;
    case ENOMEM:
        return NBD_ENOMEM;
    case EINVAL:
        return NBD_EINVAL;
    case ENOSPC:
    case EFBIG:
        return NBD_ENOSPC;
    case ENOTSUP:
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    default:
        return NBD_EIO;
    }
}

/* NBD_CMD_READ with simple replies, or with DF: one piece. */
static int
read_whole(struct worker *w, const struct request *rq)
{
    struct connection *c = w->c;
    unsigned char h[20 + 8];
    int r;

    if (grow_buf(w, rq->len ? rq->len : 1) < 0)
        return send_error(c, rq, NBD_ENOMEM, "out of memory");
    if (rq->len && chain_read(c->exp->chain, w->buf, rq->len, rq->offset) < 0)
        return send_error(c,
                          rq,
                          errno_to_nbd(qcbt_error_errno()),
                          "%s",
                          qcbt_error_get());
    if (!c->structured)
        return send_simple(c, rq, 0, w->buf, rq->len);
    chunk_header(h,
                 rq,
                 NBD_REPLY_FLAG_DONE,
                 NBD_REPLY_TYPE_OFFSET_DATA,
                 8 + rq->len);
    put_be64(h + 20, rq->offset);
    pthread_mutex_lock(&c->write_lock);
    r = conn_write(c, h, sizeof h, true);
    if (r == 0)
        r = conn_write(c, w->buf, rq->len, false);
    pthread_mutex_unlock(&c->write_lock);
    return r;
}

/* If guest [pos, pos+n) starts in plain file data, send as much of it as
 * is contiguous in one file as an OFFSET_DATA chunk with sendfile(2): no
 * copy through user space.  Returns the bytes sent, 0 if the range is not
 * plain file data (the caller reads it), -1 if the connection broke.
 */
static int64_t
send_file_chunk(struct connection *c,
                const struct request *rq,
                uint64_t pos,
                uint64_t n,
                uint64_t end)
{
    unsigned char h[28];
    uint64_t host, m;
    off_t o;
    int fd, r;

    /* TLS encrypts in user space: nothing to splice. */
    if (c->tls)
        return 0;
    if (chain_map_file(c->exp->chain, pos, n, &fd, &host, &m) < 0 || m == 0) {
        qcbt_error_clear();
        return 0; /* chain_read() reports any error */
    }
    chunk_header(h,
                 rq,
                 pos + m == end ? NBD_REPLY_FLAG_DONE : 0,
                 NBD_REPLY_TYPE_OFFSET_DATA,
                 8 + m);
    put_be64(h + 20, pos);
    o = (off_t)host;
    pthread_mutex_lock(&c->write_lock);
    r = conn_write(c, h, sizeof h, true);
    while (r == 0 && (uint64_t)(o - (off_t)host) < m) {
        ssize_t k = sendfile(c->fd, fd, &o, m - (uint64_t)(o - (off_t)host));

        if (k < 0 && errno == EINTR)
            continue;
        /* A short file after the header went out: the stream cannot be
         * repaired, hang up. */
        if (k <= 0)
            r = -1;
    }
    pthread_mutex_unlock(&c->write_lock);
    return r < 0 ? -1 : (int64_t)m;
}

/* NBD_CMD_READ with structured replies: data in chunks of at most
 * READ_CHUNK, long zero runs as OFFSET_HOLE chunks (not read at all).
 */
static int
read_structured(struct worker *w, const struct request *rq)
{
    struct connection *c = w->c;
    uint64_t pos = rq->offset, end = rq->offset + rq->len;
    unsigned char h[20 + 12];
    int r;

    if (rq->len == 0) {
        chunk_header(h, rq, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
        pthread_mutex_lock(&c->write_lock);
        r = conn_write(c, h, 20, false);
        pthread_mutex_unlock(&c->write_lock);
        return r;
    }
    if (grow_buf(w, READ_CHUNK) < 0)
        return send_error(c, rq, NBD_ENOMEM, "out of memory");
    while (pos < end) {
        struct chain_status st;
        uint64_t n;
        bool hole;

        if (chain_block_status(c->exp->chain, pos, end - pos, &st) < 0)
            return send_error(c,
                              rq,
                              errno_to_nbd(qcbt_error_errno()),
                              "%s",
                              qcbt_error_get());
        hole =
            st.zero && !st.data && (st.len >= HOLE_MIN || pos + st.len >= end);
        if (hole) {
            n = MIN(st.len, end - pos);
            chunk_header(h,
                         rq,
                         pos + n == end ? NBD_REPLY_FLAG_DONE : 0,
                         NBD_REPLY_TYPE_OFFSET_HOLE,
                         12);
            put_be64(h + 20, pos);
            put_be32(h + 28, (uint32_t)n);
            pthread_mutex_lock(&c->write_lock);
            r = conn_write(c, h, 32, false);
            pthread_mutex_unlock(&c->write_lock);
        } else {
            n = MIN((uint64_t)READ_CHUNK, end - pos);
            /* Stop the data chunk where a long hole starts. */
            if (!st.zero || st.data)
                n = MIN(n, MAX(st.len, (uint64_t)HOLE_MIN));
            n = MIN(n, end - pos);
            r = send_file_chunk(c, rq, pos, n, end);
            if (r < 0)
                return -1;
            if (r > 0) {
                /* Plain file data went out with sendfile. */
                pos += r;
                continue;
            }
            if (chain_read(c->exp->chain, w->buf, n, pos) < 0)
                return send_error(c,
                                  rq,
                                  errno_to_nbd(qcbt_error_errno()),
                                  "%s",
                                  qcbt_error_get());
            chunk_header(h,
                         rq,
                         pos + n == end ? NBD_REPLY_FLAG_DONE : 0,
                         NBD_REPLY_TYPE_OFFSET_DATA,
                         8 + n);
            put_be64(h + 20, pos);
            pthread_mutex_lock(&c->write_lock);
            r = conn_write(c, h, 28, true);
            if (r == 0)
                r = conn_write(c, w->buf, n, false);
            pthread_mutex_unlock(&c->write_lock);
        }
        if (r < 0)
            return -1;
        pos += n;
    }
    return 0;
}

/* Append an extent, merging with the previous one of equal flags.
 * Returns false when the list is full.
 */
static bool
add_extent(struct worker *w,
           size_t ci,
           size_t cap,
           uint64_t len,
           uint32_t flags)
{
    struct extent *e = w->ext[ci];
    size_t n = w->next[ci];

    if (n > 0 && e[n - 1].flags == flags &&
        (uint64_t)e[n - 1].len + len <= UINT32_MAX) {
        e[n - 1].len += len;
    } else {
        if (n == cap)
            return false;
        e[n].len = len;
        e[n].flags = flags;
        w->next[ci] = n + 1;
    }
    w->ends[ci] += len;
    return true;
}

/* qemu:allocation-depth of a range no layer allocates.  As in qemu-nbd
 * (block/io.c bdrv_co_common_block_status_above), the zeros past the end
 * of a shorter backing layer count as allocated in that layer: the answer
 * is 1 + the index of the first backing layer that ends at or before POS,
 * else 0.  *N is clipped where the answer changes.
 */
static uint32_t
depth_past_eof(const struct chain *ch, uint64_t pos, uint64_t *n)
{
    size_t i;

    for (i = 1; i < ch->nr_layers; i++) {
        if (pos >= ch->layers[i].size)
            return i + 1;
        *n = MIN(*n, ch->layers[i].size - pos);
    }
    return 0;
}

/* Fill context CI (id ID) from OFFSET up to END or CAP extents. */
static int
fill_context(struct worker *w,
             size_t ci,
             uint32_t id,
             uint64_t offset,
             uint64_t end,
             size_t cap)
{
    struct connection *c = w->c;
    struct export *exp = c->exp;
    uint64_t pos = offset;

    w->next[ci] = 0;
    w->ends[ci] = offset;
    while (pos < end) {
        uint32_t flags;
        uint64_t n;

        if (id >= CTX_BITMAP_FIRST) {
            struct bitmap_extent be;

            if (merge_result_extent(exp->bitmaps[id - CTX_BITMAP_FIRST].merge,
                                    pos,
                                    end - pos,
                                    &be) < 0)
                return -1;
            n = be.len;
            flags = be.dirty ? NBD_STATE_DIRTY : 0;
        } else {
            struct chain_status st;

            if (chain_block_status(exp->chain, pos, end - pos, &st) < 0)
                return -1;
            n = st.len;
            if (id == CTX_BASE_ALLOCATION)
                flags = (st.data ? 0 : NBD_STATE_HOLE) |
                        (st.zero ? NBD_STATE_ZERO : 0);
            else if (st.present)
                flags = st.depth + 1;
            else
                flags = depth_past_eof(exp->chain, pos, &n);
        }
        n = MIN(n, end - pos);
        if (!add_extent(w, ci, cap, n, flags))
            break;
        pos += n;
    }
    return 0;
}

static int
block_status(struct worker *w, const struct request *rq)
{
    struct connection *c = w->c;
    bool req_one = rq->flags & NBD_CMD_FLAG_REQ_ONE;
    size_t cap = req_one ? 1 : MAX_EXTENTS;
    uint64_t end = rq->offset + rq->len, common;
    size_t ci, i;
    int r = 0;

    for (ci = 0; ci < c->nr_meta; ci++) {
        if (!w->ext[ci] &&
            !(w->ext[ci] = malloc(MAX_EXTENTS * sizeof **w->ext)))
            return send_error(c, rq, NBD_ENOMEM, "out of memory");
        if (fill_context(w, ci, c->meta_ids[ci], rq->offset, end, cap) < 0)
            return send_error(c,
                              rq,
                              errno_to_nbd(qcbt_error_errno()),
                              "%s",
                              qcbt_error_get());
    }
    /* Every context's chunk ends at the same offset: the shortest. */
    common = end;
    for (ci = 0; ci < c->nr_meta; ci++)
        common = MIN(common, w->ends[ci]);
    for (ci = 0; ci < c->nr_meta; ci++) {
        uint64_t pos = rq->offset;

        for (i = 0; i < w->next[ci]; i++) {
            if (pos + w->ext[ci][i].len >= common) {
                w->ext[ci][i].len = common - pos;
                w->next[ci] = i + 1;
                break;
            }
            pos += w->ext[ci][i].len;
        }
    }

    pthread_mutex_lock(&c->write_lock);
    for (ci = 0; ci < c->nr_meta && r == 0; ci++) {
        size_t n = w->next[ci], bytes = 4 + 8 * n;
        unsigned char h[24];
        unsigned char *p;

        chunk_header(h,
                     rq,
                     ci + 1 == c->nr_meta ? NBD_REPLY_FLAG_DONE : 0,
                     NBD_REPLY_TYPE_BLOCK_STATUS,
                     bytes);
        put_be32(h + 20, c->meta_ids[ci]);
        /* Encode in place: struct extent is two u32s. */
        p = (unsigned char *)w->ext[ci];
        for (i = 0; i < n; i++) {
            struct extent e = w->ext[ci][i];
            put_be32(p + 8 * i, e.len);
            put_be32(p + 8 * i + 4, e.flags);
        }
        r = conn_write(c, h, sizeof h, true);
        if (r == 0)
            r = conn_write(c, p, 8 * n, ci + 1 < c->nr_meta);
    }
    pthread_mutex_unlock(&c->write_lock);
    return r;
}

static int
handle(struct worker *w, const struct request *rq)
{
    struct connection *c = w->c;
    uint64_t size = c->exp->size;
    uint16_t allowed;

    switch (rq->type) {
    case NBD_CMD_READ:
        allowed = NBD_CMD_FLAG_FUA | (c->structured ? NBD_CMD_FLAG_DF : 0);
        break;
    case NBD_CMD_BLOCK_STATUS:
        allowed = NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FUA;
        break;
    case NBD_CMD_WRITE:
    case NBD_CMD_TRIM:
    case NBD_CMD_WRITE_ZEROES:
        return send_error(c, rq, NBD_EPERM, "export is read-only");
    case NBD_CMD_FLUSH:
    case NBD_CMD_CACHE:
        allowed = NBD_CMD_FLAG_FUA;
        break;
    default:
        return send_error(c,
                          rq,
                          NBD_EINVAL,
                          "invalid request type (%u)",
                          rq->type);
    }
    if (rq->flags & ~allowed)
        return send_error(c,
                          rq,
                          NBD_EINVAL,
                          "unsupported flags 0x%x for command %u",
                          rq->flags,
                          rq->type);
    if (rq->type == NBD_CMD_FLUSH)
        return send_simple(c, rq, 0, NULL, 0);
    /* Overflow-safe bounds check. */
    if (rq->offset > size || rq->len > size - rq->offset)
        return send_error(c,
                          rq,
                          NBD_EINVAL,
                          "request past the end of the export (offset "
                          "%" PRIu64 ", length %" PRIu32 ", size %" PRIu64 ")",
                          rq->offset,
                          rq->len,
                          size);
    if (rq->type == NBD_CMD_READ) {
        atomic_fetch_add_explicit(&c->nr_reads, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&c->read_bytes,
                                  rq->len,
                                  memory_order_relaxed);
    } else if (rq->type == NBD_CMD_BLOCK_STATUS) {
        atomic_fetch_add_explicit(&c->nr_bs, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&c->bs_bytes, rq->len, memory_order_relaxed);
        if (rq->flags & NBD_CMD_FLAG_REQ_ONE)
            atomic_fetch_add_explicit(&c->nr_bs_one, 1, memory_order_relaxed);
    }
    switch (rq->type) {
    case NBD_CMD_READ:
        if (rq->len > MAX_REQUEST_LENGTH)
            return send_error(c,
                              rq,
                              NBD_EINVAL,
                              "read of %" PRIu32 " bytes exceeds the "
                              "maximum %u",
                              rq->len,
                              MAX_REQUEST_LENGTH);
        if (!c->structured || (rq->flags & NBD_CMD_FLAG_DF))
            return read_whole(w, rq);
        return read_structured(w, rq);
    case NBD_CMD_CACHE:
        return send_simple(c, rq, 0, NULL, 0);
    case NBD_CMD_BLOCK_STATUS:
        if (!c->structured || c->nr_meta == 0)
            return send_error(c,
                              rq,
                              NBD_EINVAL,
                              "block status needs structured replies and a "
                              "negotiated meta context");
        if (rq->len == 0)
            return send_error(c,
                              rq,
                              NBD_EINVAL,
                              "block status needs a non-zero length");
        return block_status(w, rq);
    }
    return send_error(c, rq, NBD_EINVAL, "invalid request");
}

/* Wait until the next request starts to arrive, or the connection ends
 * (the read that follows sees which).  A reader left waiting
 * IDLE_RELEASE_MS gives its buffers back.  With --idle-timeout: -1 once
 * no request has been read or served for that long.
 */
static int
wait_request(struct worker *w)
{
    struct connection *c = w->c;
    int64_t idle_ms = (int64_t)c->srv->idle_timeout * 1000;
    int64_t release_at = now_ms() + IDLE_RELEASE_MS;
    int64_t busy_until = 0; /* a request was still being served then */
    bool released = false;

    /* Under TLS the next request may already have been read from the
     * socket with the previous one (OpenSSL reads ahead).
     */
    if (c->tls && tls_pending(c->tls))
        return 0;
    for (;;) {
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        int64_t now = now_ms(), wake = -1, idle_from;
        int r;

        if (!released)
            wake = release_at;
        if (idle_ms) {
            idle_from = MAX(atomic_load(&c->last_active), busy_until);
            if (wake < 0 || idle_from + idle_ms < wake)
                wake = idle_from + idle_ms;
        }
        r = poll(&p, 1, wake < 0 ? -1 : (int)MIN(MAX(wake - now, 0), 60000));
        if (r > 0)
            return 0;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        now = now_ms();
        if (!released && now >= release_at) {
            worker_release(w);
            released = true;
        }
        if (!idle_ms)
            continue;
        /* Serving a request (last_active is stored before in_flight
         * drops) is not idle.
         */
        if (atomic_load(&c->in_flight) > 0) {
            busy_until = now;
            continue;
        }
        if (now - atomic_load(&c->last_active) >= idle_ms &&
            now - busy_until >= idle_ms) {
            srv_log(c->srv,
                    LOG_INFO,
                    "%s: idle for %u s: disconnecting",
                    c->peer,
                    c->srv->idle_timeout);
            return -1;
        }
    }
}

/* Read the next request.  0: got one; -1: the connection is over. */
static int
next_request(struct worker *w, struct request *rq, bool *skip)
{
    struct connection *c = w->c;
    unsigned char h[28];
    int64_t deadline = -1;

    *skip = false;
    if (atomic_load(&c->closing))
        return -1;
    if (wait_request(w) < 0)
        return -1;
    /* A request that starts must arrive whole within the idle timeout. */
    if (c->srv->idle_timeout)
        deadline = now_ms() + (int64_t)c->srv->idle_timeout * 1000;
    if (conn_read_deadline(c, h, sizeof h, deadline) < 0)
        return -1;
    if (get_be32(h) != NBD_REQUEST_MAGIC) {
        srv_log(c->srv,
                LOG_INFO,
                "%s: bad request magic 0x%08x: "
                "disconnecting",
                c->peer,
                get_be32(h));
        return -1;
    }
    rq->flags = get_be16(h + 4);
    rq->type = get_be16(h + 6);
    rq->cookie = get_be64(h + 8);
    rq->offset = get_be64(h + 16);
    rq->len = get_be32(h + 24);
    if (rq->type == NBD_CMD_DISC) {
        srv_log(c->srv, LOG_DEBUG, "%s: client disconnect", c->peer);
        return -1;
    }
    if (rq->type == NBD_CMD_WRITE) {
        /* The payload follows whatever we answer; keep the stream in
         * step, or hang up if it is too large to be a real request.
         */
        if (rq->len > MAX_WRITE_SKIP)
            return -1;
        if (conn_skip(c, rq->len) < 0)
            return -1;
    }
    if (atomic_load(&c->srv->shutting_down))
        *skip = true;
    return 0;
}

/* Take the read lock.  A worker left waiting IDLE_RELEASE_MS (another
 * worker is reading and the connection is quiet) gives its buffers back
 * first.
 */
static void
lock_reader(struct worker *w)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += IDLE_RELEASE_MS / 1000;
    ts.tv_nsec += (long)(IDLE_RELEASE_MS % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    if (pthread_mutex_clocklock(&w->c->read_lock, CLOCK_MONOTONIC, &ts) == 0)
        return;
    worker_release(w);
    pthread_mutex_lock(&w->c->read_lock);
}

static void *
worker_loop(void *arg)
{
    struct worker *w = arg;
    struct connection *c = w->c;

    for (;;) {
        struct request rq;
        bool shutdown_reply;
        int r;

        lock_reader(w);
        r = next_request(w, &rq, &shutdown_reply);
        if (r < 0)
            atomic_store(&c->closing, true);
        else
            atomic_fetch_add(&c->in_flight, 1);
        pthread_mutex_unlock(&c->read_lock);
        if (r < 0)
            break;
        if (shutdown_reply)
            r = send_error(c, &rq, NBD_ESHUTDOWN, "server shutting down");
        else
            r = handle(w, &rq);
        /* A large plain read's buffer goes at once, not when idle. */
        if (w->bufsize > WORKER_BUF_KEEP)
            free_buf(w);
        atomic_store(&c->last_active, now_ms());
        atomic_fetch_sub(&c->in_flight, 1);
        if (r < 0) {
            atomic_store(&c->closing, true);
            shutdown(c->fd, SHUT_RDWR);
            break;
        }
    }
    return NULL;
}

static int
worker_init(struct worker *w, struct connection *c)
{
    memset(w, 0, sizeof *w);
    w->c = c;
    if (c->nr_meta) {
        w->ext = calloc(c->nr_meta, sizeof *w->ext);
        w->next = calloc(c->nr_meta, sizeof *w->next);
        w->ends = calloc(c->nr_meta, sizeof *w->ends);
        if (!w->ext || !w->next || !w->ends)
            return -1;
    }
    return 0;
}

static void
worker_free(struct worker *w)
{
    size_t i;

    for (i = 0; w->ext && i < w->c->nr_meta; i++)
        free(w->ext[i]);
    free(w->ext);
    free(w->next);
    free(w->ends);
    free(w->buf);
}

void
transmission(struct connection *c)
{
    unsigned n = c->srv->threads ? c->srv->threads : 1;
    struct worker *ws = calloc(n, sizeof *ws);
    unsigned i, started = 0;

    if (!ws)
        return;
    atomic_store(&c->last_active, now_ms());
    for (i = 0; i < n; i++)
        if (worker_init(&ws[i], c) < 0)
            goto out;
    /* Worker 0 runs in this thread. */
    for (i = 1; i < n; i++) {
        if (pthread_create(&ws[i].thread, NULL, worker_loop, &ws[i]) != 0)
            break;
        started = i;
    }
    worker_loop(&ws[0]);
    for (i = 1; i <= started; i++)
        pthread_join(ws[i].thread, NULL);
out:
    for (i = 0; i < n; i++)
        worker_free(&ws[i]);
    free(ws);
}

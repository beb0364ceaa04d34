/* qcbt-server: connection lifecycle and socket I/O. */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

int64_t
now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Read exactly LEN bytes.  0 on success, -1 on EOF, error or deadline
 * (deadline_ms < 0: none).
 */
int
conn_read_deadline(struct connection *c,
                   void *buf,
                   size_t len,
                   int64_t deadline_ms)
{
    char *p = buf;

    if (c->tls)
        return tls_read(c->tls, buf, len, deadline_ms);
    while (len > 0) {
        ssize_t n;

        if (deadline_ms >= 0) {
            struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
            int64_t left = deadline_ms - now_ms();
            int r;

            if (left <= 0)
                return -1;
            r = poll(&pfd, 1, left > 1000 ? 1000 : (int)left);
            if (r < 0 && errno != EINTR)
                return -1;
            if (r <= 0)
                continue;
        }
        n = recv(c->fd, p, len, 0);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -1;
        }
        if (n == 0)
            return -1;
        p += n;
        len -= n;
    }
    return 0;
}

int
conn_read(struct connection *c, void *buf, size_t len)
{
    return conn_read_deadline(c, buf, len, -1);
}

/* Discard LEN bytes of payload. */
int
conn_skip(struct connection *c, uint64_t len)
{
    char buf[16384];

    while (len > 0) {
        size_t n = len < sizeof buf ? len : sizeof buf;

        if (conn_read(c, buf, n) < 0)
            return -1;
        len -= n;
    }
    return 0;
}

int
conn_write(struct connection *c, const void *buf, size_t len, bool more)
{
    const char *p = buf;

    if (c->tls)
        return tls_write(c->tls,
                         buf,
                         len,
                         more,
                         c->write_deadline ? c->write_deadline : -1);
    while (len > 0) {
        int flags = MSG_NOSIGNAL | (more ? MSG_MORE : 0);
        ssize_t n;

        /* During the handshake a client that stops reading cannot keep
         * its slot past the deadline.
         */
        if (c->write_deadline) {
            struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
            int64_t left = c->write_deadline - now_ms();
            int r;

            if (left <= 0)
                return -1;
            r = poll(&pfd, 1, left > 1000 ? 1000 : (int)left);
            if (r < 0 && errno != EINTR)
                return -1;
            if (r <= 0)
                continue;
            flags |= MSG_DONTWAIT;
        }
        n = send(c->fd, p, len, flags);
        if (n < 0) {
            if (errno == EINTR || (errno == EAGAIN && c->write_deadline))
                continue;
            return -1;
        }
        p += n;
        len -= n;
    }
    return 0;
}

static void
unlink_connection(struct connection *c, bool negotiated)
{
    struct server *srv = c->srv;
    struct connection **pp;
    unsigned left;

    pthread_mutex_lock(&srv->lock);
    for (pp = &srv->conns; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    /* Like qemu-nbd, only a client that reached transmission counts:
     * `nbdinfo --list`, a port scan or a failed handshake must not end a
     * server started without --persistent before its real client came.
     */
    if (negotiated)
        srv->served = true;
    left = atomic_fetch_sub(&srv->nr_connections, 1) - 1;
    pthread_mutex_unlock(&srv->lock);
    /* Without --persistent the server ends with its last client. */
    if (left == 0 && !srv->persistent) {
        char b = 'x';
        ssize_t ignored = write(srv->wake_pipe[1], &b, 1);
        (void)ignored;
    }
}

/* A lingering close.  Bytes the client sent that we never read (after
 * DISC, or while we were stopping) would turn close() into a TCP reset,
 * and a reset can make the client's kernel drop replies it has not
 * delivered yet.  So: send our FIN, then read and discard until the
 * client closes too, for at most LINGER_MS and LINGER_BYTES.
 */
#define LINGER_MS    2000
#define LINGER_BYTES (1 << 20)

static void
linger_close(struct connection *c)
{
    int64_t deadline = now_ms() + LINGER_MS;
    size_t total = 0;
    char buf[4096];

    tls_close_notify(c->tls);
    if (shutdown(c->fd, SHUT_WR) < 0)
        return;
    while (total < LINGER_BYTES) {
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        int64_t left = deadline - now_ms();
        ssize_t n;

        if (left <= 0 || poll(&p, 1, (int)left) <= 0)
            break;
        n = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n <= 0)
            break;
        total += (size_t)n;
    }
}

void *
connection_thread(void *arg)
{
    struct connection *c = arg;
    struct server *srv = c->srv;
    int r;

    srv_log(srv, LOG_INFO, "%s: connected", c->peer);
    r = handshake(c);
    if (r == 1) {
        srv_log(srv,
                LOG_INFO,
                "%s: export '%s', %s replies, %zu context(s)",
                c->peer,
                c->exp->name,
                c->structured ? "structured" : "simple",
                c->nr_meta);
        transmission(c);
        if (srv->debug)
            fprintf(stderr,
                    "qcbt-server: debug: %s: served %" PRIuFAST64
                    " reads (%" PRIuFAST64 " bytes), %" PRIuFAST64
                    " block status (%" PRIuFAST64 " bytes asked, %" PRIuFAST64
                    " with REQ_ONE)\n",
                    c->peer,
                    atomic_load(&c->nr_reads),
                    atomic_load(&c->read_bytes),
                    atomic_load(&c->nr_bs),
                    atomic_load(&c->bs_bytes),
                    atomic_load(&c->nr_bs_one));
        linger_close(c);
    } else {
        tls_close_notify(c->tls);
    }
    srv_log(srv, LOG_INFO, "%s: disconnected", c->peer);
    unlink_connection(c, r == 1);
    tls_conn_free(c->tls);
    close(c->fd);
    pthread_mutex_destroy(&c->read_lock);
    pthread_mutex_destroy(&c->write_lock);
    free(c->meta_ids);
    free(c);
    return NULL;
}

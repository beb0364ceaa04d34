/* qcbt: memory backend of the I/O interface (unit tests, fuzzing). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "io.h"

struct io_mem {
    const unsigned char *buf;
    unsigned char *wbuf; /* the same buffer when writable, else NULL */
    size_t len, cap;
};

static ssize_t
mem_pread(void *opaque, void *buf, size_t count, uint64_t offset)
{
    struct io_mem *h = opaque;
    size_t n;

    if (offset >= h->len)
        return 0;
    n = h->len - offset < count ? h->len - offset : count;
    memcpy(buf, h->buf + offset, n);
    return n;
}

static ssize_t
mem_pwrite(void *opaque, const void *buf, size_t count, uint64_t offset)
{
    struct io_mem *h = opaque;

    if (offset > h->cap || count > h->cap - offset)
        return -ENOSPC;
    if (offset > h->len) /* a hole: reads as zeros, as in a file */
        memset(h->wbuf + h->len, 0, offset - h->len);
    memcpy(h->wbuf + offset, buf, count);
    if (offset + count > h->len)
        h->len = offset + count;
    return (ssize_t)count;
}

static int
mem_close(void *opaque)
{
    free(opaque);
    return 0;
}

static const struct qcbt_io_ops mem_ops = {
    .pread = mem_pread,
    .close = mem_close,
};

static const struct qcbt_io_ops mem_rw_ops = {
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .close = mem_close,
};

int
qcbt_io_open_mem(const void *buf,
                 size_t len,
                 const char *name,
                 struct qcbt_io **out)
{
    struct io_mem *h = calloc(1, sizeof *h);

    if (!h)
        return qcbt_error(ENOMEM, "out of memory");
    h->buf = buf;
    h->len = len;
    h->cap = len;
    return qcbt_io_new(&mem_ops, h, len, name, out);
}

int
qcbt_io_open_mem_rw(void *buf,
                    size_t cap,
                    size_t len,
                    const char *name,
                    struct qcbt_io **out)
{
    struct io_mem *h;

    if (len > cap)
        return qcbt_error(EINVAL,
                          "%s: %zu bytes do not fit in %zu",
                          name,
                          len,
                          cap);
    h = calloc(1, sizeof *h);
    if (!h)
        return qcbt_error(ENOMEM, "out of memory");
    h->buf = buf;
    h->wbuf = buf;
    h->len = len;
    h->cap = cap;
    return qcbt_io_new(&mem_rw_ops, h, len, name, out);
}

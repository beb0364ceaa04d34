/* qcbt: memory backend of the I/O interface (unit tests, fuzzing). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "io.h"

struct io_mem {
    const unsigned char *buf;
    size_t len;
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

static void
mem_close(void *opaque)
{
    free(opaque);
}

static const struct qcbt_io_ops mem_ops = {
    .pread = mem_pread,
    .close = mem_close,
};

int
qcbt_io_open_mem(const void *buf,
                 size_t len,
                 const char *name,
                 struct qcbt_io **out)
{
    struct io_mem *h = malloc(sizeof *h);

    if (!h)
        return qcbt_error(ENOMEM, "out of memory");
    h->buf = buf;
    h->len = len;
    return qcbt_io_new(&mem_ops, h, len, name, out);
}

/* qcbt: file descriptor backend of the I/O interface. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "error.h"
#include "io.h"

struct io_fd {
    int fd;
};

static ssize_t
fd_pread(void *opaque, void *buf, size_t count, uint64_t offset)
{
    struct io_fd *h = opaque;
    size_t done = 0;

    if (offset > (uint64_t)INT64_MAX)
        return -EINVAL;
    while (done < count) {
        ssize_t r = pread(h->fd,
                          (char *)buf + done,
                          count - done,
                          (off_t)(offset + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break;
        done += r;
    }
    return done;
}

static int
fd_extent(void *opaque,
          uint64_t offset,
          uint64_t len,
          uint64_t *pnum,
          bool *is_data)
{
    struct io_fd *h = opaque;
    off_t data, hole;

    data = lseek(h->fd, (off_t)offset, SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) {
            /* Trailing hole. */
            *is_data = false;
            *pnum = len;
            return 0;
        }
        /* No information: everything is data. */
        *is_data = true;
        *pnum = len;
        return 0;
    }
    if ((uint64_t)data > offset) {
        *is_data = false;
        *pnum = (uint64_t)data - offset < len ? (uint64_t)data - offset : len;
        return 0;
    }
    hole = lseek(h->fd, (off_t)offset, SEEK_HOLE);
    if (hole < 0 || (uint64_t)hole <= offset) {
        *is_data = true;
        *pnum = len;
        return 0;
    }
    *is_data = true;
    *pnum = (uint64_t)hole - offset < len ? (uint64_t)hole - offset : len;
    return 0;
}

static void
fd_close(void *opaque)
{
    struct io_fd *h = opaque;

    close(h->fd);
    free(h);
}

static const struct qcbt_io_ops fd_ops = {
    .pread = fd_pread,
    .extent = fd_extent,
    .close = fd_close,
};

int
qcbt_io_open_file(const char *path, struct qcbt_io **out)
{
    struct io_fd *h;
    struct stat st;
    int fd, r;

    fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return qcbt_error(errno, "%s: %s", path, strerror(errno));
    if (fstat(fd, &st) < 0) {
        r = qcbt_error(errno, "%s: fstat: %s", path, strerror(errno));
        close(fd);
        return r;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return qcbt_error(EINVAL, "%s: not a regular file", path);
    }
    /* O_NONBLOCK only guarded the open against FIFOs. */
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);

    h = malloc(sizeof *h);
    if (!h) {
        close(fd);
        return qcbt_error(ENOMEM, "%s: out of memory", path);
    }
    h->fd = fd;
    r = qcbt_io_new(&fd_ops, h, (uint64_t)st.st_size, path, out);
    if (r < 0)
        return r;
    (*out)->allocated = (int64_t)st.st_blocks * 512;
    (*out)->fd = fd;
    (*out)->dev = st.st_dev;
    (*out)->ino = st.st_ino;
    return 0;
}

int
qcbt_io_new(const struct qcbt_io_ops *ops,
            void *opaque,
            uint64_t size,
            const char *name,
            struct qcbt_io **out)
{
    struct qcbt_io *io = calloc(1, sizeof *io);

    if (io)
        io->name = strdup(name ? name : "");
    if (!io || !io->name) {
        free(io);
        if (ops->close)
            ops->close(opaque);
        return qcbt_error(ENOMEM, "out of memory");
    }
    io->ops = ops;
    io->opaque = opaque;
    io->allocated = -1;
    io->fd = -1;
    io->size = size;
    *out = io;
    return 0;
}

void
qcbt_io_free(struct qcbt_io *io)
{
    if (!io)
        return;
    if (io->ops->close)
        io->ops->close(io->opaque);
    free(io->name);
    free(io);
}

int
qcbt_io_read_exact(struct qcbt_io *io,
                   void *buf,
                   size_t count,
                   uint64_t offset,
                   bool zero_tail,
                   const char *what)
{
    ssize_t r;

    if (count == 0)
        return 0;
    if (zero_tail && offset >= io->size)
        return qcbt_error(EIO,
                          "%s: %s at offset 0x%llx is past the end of "
                          "the file (0x%llx bytes)",
                          io->name,
                          what,
                          (unsigned long long)offset,
                          (unsigned long long)io->size);
    r = io->ops->pread(io->opaque, buf, count, offset);
    if (r < 0)
        return qcbt_error(-r,
                          "%s: reading %s at offset 0x%llx: %s",
                          io->name,
                          what,
                          (unsigned long long)offset,
                          strerror(-r));
    if ((size_t)r < count) {
        if (!zero_tail)
            return qcbt_error(EIO,
                              "%s: %s at offset 0x%llx (0x%zx bytes) "
                              "runs past the end of the file",
                              io->name,
                              what,
                              (unsigned long long)offset,
                              count);
        memset((char *)buf + r, 0, count - r);
    }
    return 0;
}

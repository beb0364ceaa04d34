/* qcbt: the I/O callback interface every image layer reads through.
 *
 * A layer's bytes come from a file descriptor (io-fd.c), memory (io-mem.c,
 * unit tests and fuzzing) or, later, the next nbdkit plugin (the filter).
 * The reader never touches a file descriptor directly.
 */
#ifndef QCBT_IO_H
#define QCBT_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct qcbt_io;

struct qcbt_io_ops {
    /* Read up to count bytes at offset into buf.  Returns the number of
     * bytes read (short only at end of file, 0 at or past it) or -errno.
     * Must be safe to call from several threads at once.
     */
    ssize_t (*pread)(void *opaque, void *buf, size_t count, uint64_t offset);

    /* Optional: allocation of the underlying storage (SEEK_DATA/SEEK_HOLE).
     * Sets *is_data and *pnum (> 0, <= len) for [offset, offset+len).
     * Returns 0 or -errno.  NULL means "everything is data".
     */
    int (*extent)(void *opaque,
                  uint64_t offset,
                  uint64_t len,
                  uint64_t *pnum,
                  bool *is_data);

    /* Release opaque.  May be NULL. */
    void (*close)(void *opaque);
};

struct qcbt_io {
    const struct qcbt_io_ops *ops;
    void *opaque;
    uint64_t size;     /* bytes in the file when it was opened */
    char *name;        /* for messages; owned */
    int64_t allocated; /* bytes the file occupies on disk, -1 unknown */
    int fd;            /* the file descriptor behind a file io, else -1
                          (for sendfile; never closed by users) */
    dev_t dev;         /* identity for loop detection (0/0 if unknown) */
    ino_t ino;
};

/* Open PATH read-only as a regular file.  Refuses anything that is not a
 * regular file (FIFOs, devices, directories).  Returns 0 and *out (owned by
 * the caller, release with qcbt_io_free) or -errno with a message.
 */
int qcbt_io_open_file(const char *path, struct qcbt_io **out);

/* Wrap BUF[0..LEN) (not copied; must outlive the io).  NAME for messages. */
int qcbt_io_open_mem(const void *buf,
                     size_t len,
                     const char *name,
                     struct qcbt_io **out);

/* Wrap caller-provided ops (the nbdkit filter).  Takes ownership of opaque
 * (ops->close is called by qcbt_io_free).
 */
int qcbt_io_new(const struct qcbt_io_ops *ops,
                void *opaque,
                uint64_t size,
                const char *name,
                struct qcbt_io **out);

void qcbt_io_free(struct qcbt_io *io);

/* Read exactly count bytes at offset.  Bytes at or past the end of the
 * file read as zeros only when zero_tail is true and offset itself lies
 * inside the file (qemu does not pad the last cluster of an image);
 * otherwise a short read is -EIO with a message naming WHAT.
 */
int qcbt_io_read_exact(struct qcbt_io *io,
                       void *buf,
                       size_t count,
                       uint64_t offset,
                       bool zero_tail,
                       const char *what);

#endif /* QCBT_IO_H */

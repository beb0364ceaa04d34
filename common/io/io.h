/* qcbt: the I/O callback interface every image layer reads and writes
 * through.
 *
 * A layer's bytes come from a file descriptor (io-fd.c), memory (io-mem.c,
 * unit tests and fuzzing) or the next nbdkit plugin (the filter).  The
 * reader and the writer never touch a file descriptor directly: they call
 * qcbt_io_read_exact(), qcbt_io_write_exact(), qcbt_io_writeback(),
 * qcbt_io_flush() and qcbt_io_lock(), so a test can put any backend (one
 * that fails on demand) under them.
 */
#ifndef QCBT_IO_H
#define QCBT_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct qcbt_io;

/* QEMU's block permissions (BLK_PERM_* in QEMU's
 * include/block/block-common.h): bit i is the permission whose image lock
 * bytes are QCBT_IO_LOCK_PERM_BASE + i ("I hold it") and
 * QCBT_IO_LOCK_SHARED_BASE + i ("I do not let others hold it"), the
 * bytes QEMU's file-posix driver locks (raw_apply_lock_bytes()).
 */
#define QCBT_PERM_CONSISTENT_READ 0x01u
#define QCBT_PERM_WRITE           0x02u
#define QCBT_PERM_WRITE_UNCHANGED 0x04u
#define QCBT_PERM_RESIZE          0x08u
#define QCBT_PERM_GRAPH_MOD       0x10u
#define QCBT_PERM_ALL             0x1fu
#define QCBT_PERM_BITS            5
#define QCBT_IO_LOCK_PERM_BASE    100
#define QCBT_IO_LOCK_SHARED_BASE  200

struct qcbt_io_ops {
    /* Read up to count bytes at offset into buf.  Returns the number of
     * bytes read (short only at end of file, 0 at or past it) or -errno.
     * Must be safe to call from several threads at once.
     */
    ssize_t (*pread)(void *opaque, void *buf, size_t count, uint64_t offset);

    /* Optional (NULL: the io is read-only): write all count bytes of buf
     * at offset, extending the file if needed.  Returns count or -errno.
     */
    ssize_t (*pwrite)(void *opaque,
                      const void *buf,
                      size_t count,
                      uint64_t offset);

    /* Optional (NULL: nothing to do): make every byte written so far
     * durable (fdatasync).  Returns 0 or -errno.
     */
    int (*flush)(void *opaque);

    /* Optional (NULL: nothing to do): start writeback of bytes written at
     * [offset, offset+len); with wait, also wait until it is done and drop
     * the range from the page cache.  Only a matter of pace: durability is
     * flush's.  An error is an I/O error on the device and fails the
     * caller.  Returns 0 or -errno.
     */
    int (*writeback)(void *opaque, uint64_t offset, uint64_t len, bool wait);

    /* Optional (NULL: the storage has no locks other processes could see:
     * memory, the next nbdkit plugin): hold the image locks of the
     * permissions PERM and of those not in SHARED (QCBT_PERM_*), drop the
     * others, then check that no other holder conflicts (QEMU's
     * raw_apply_lock_bytes() and raw_check_lock_bytes()).  On a conflict
     * the locks held before the call are restored and the result is
     * -EAGAIN with a message naming the permission; other failures are
     * -errno with a message.
     */
    int (*lock)(void *opaque, uint64_t perm, uint64_t shared);

    /* Optional: allocation of the underlying storage (SEEK_DATA/SEEK_HOLE).
     * Sets *is_data and *pnum (> 0, <= len) for [offset, offset+len).
     * Returns 0 or -errno.  NULL means "everything is data".
     */
    int (*extent)(void *opaque,
                  uint64_t offset,
                  uint64_t len,
                  uint64_t *pnum,
                  bool *is_data);

    /* Release opaque (closing a file).  Returns 0 or -errno (a failed
     * close of a file written to).  May be NULL.
     */
    int (*close)(void *opaque);
};

struct qcbt_io {
    const struct qcbt_io_ops *ops;
    void *opaque;
    uint64_t size;     /* bytes in the file when it was opened, grown by
                          qcbt_io_write_exact() */
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

/* The same, open for reading and writing (the file must exist). */
int qcbt_io_open_file_rw(const char *path, struct qcbt_io **out);

/* Wrap the open descriptor FD (any type: a file, a device); the io owns
 * it from the call on, success or not.  NAME for messages.
 */
int qcbt_io_open_fd(int fd, const char *name, struct qcbt_io **out);

/* Wrap BUF[0..LEN) (not copied; must outlive the io).  NAME for messages. */
int qcbt_io_open_mem(const void *buf,
                     size_t len,
                     const char *name,
                     struct qcbt_io **out);

/* Writable memory: BUF[0..CAP) holds a file of LEN bytes (LEN <= CAP);
 * writes may grow it up to CAP bytes, past that they fail with -ENOSPC.
 * BUF is not copied and must outlive the io.
 */
int qcbt_io_open_mem_rw(void *buf,
                        size_t cap,
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

/* Close: release the backend.  Returns 0, or -errno with a message when
 * the backend's close failed (a file written to).  Frees IO in every
 * case; NULL is a no-op.
 */
int qcbt_io_close(struct qcbt_io *io);

/* qcbt_io_close(), for callers that only read (the result is dropped). */
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

/* Write all COUNT bytes of BUF at OFFSET; the io's size grows to cover
 * them.  -EROFS for an io that cannot write; other errors are -errno
 * with a message naming the file, WHAT and the offset.
 */
int qcbt_io_write_exact(struct qcbt_io *io,
                        const void *buf,
                        size_t count,
                        uint64_t offset,
                        const char *what);

/* The backend's flush and writeback (no-ops where it has none); errors
 * are -errno with a message naming the file.
 */
int qcbt_io_flush(struct qcbt_io *io);
int
qcbt_io_writeback(struct qcbt_io *io, uint64_t offset, uint64_t len, bool wait);

/* The image locks QEMU takes (QEMU-compatible locking, DESIGN.md
 * "Loading and storing"), by what the caller does with the image:
 *
 *   NONE    hold nothing.
 *   SHARED  read, letting anyone write (qemu-img's -U/--force-share):
 *           holds "consistent read" only.
 *   READ    read a consistent image, as `qemu-img info` and `qemu-nbd -r`
 *           do: holds "consistent read", shares neither "write" nor
 *           "resize", so it fails while another process writes the image
 *           (qemu-io, qemu-nbd, a running VM) and keeps writers out.
 *   WRITE   write, as `qemu-img bitmap` and qemu-io do: also holds
 *           "write" and "resize"; fails while another process reads
 *           (without -U) or writes the image, and keeps both out.
 *
 * Switching modes drops the bytes the new mode does not need.  On a
 * conflict the previous mode stays and the result is -EAGAIN with the
 * message "FILE: held by another process (failed to get [shared] "PERM"
 * lock)".  A backend without locks (memory, the next nbdkit plugin)
 * succeeds holding nothing.  Locks go with the io (qcbt_io_close()).
 */
enum qcbt_io_lock_mode {
    QCBT_IO_LOCK_NONE,
    QCBT_IO_LOCK_SHARED,
    QCBT_IO_LOCK_READ,
    QCBT_IO_LOCK_WRITE,
};

int qcbt_io_lock(struct qcbt_io *io, enum qcbt_io_lock_mode mode);

/* The permissions a mode holds and shares. */
void qcbt_io_lock_perms(enum qcbt_io_lock_mode mode,
                        uint64_t *perm,
                        uint64_t *shared);

/* QEMU's name of the single permission PERM ("consistent read", "write",
 * "write unchanged", "resize", "change children").
 */
const char *qcbt_perm_name(uint64_t perm);

#endif /* QCBT_IO_H */

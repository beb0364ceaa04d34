/* qcbt: file descriptor backend of the I/O interface. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "error.h"
#include "io.h"

struct io_fd {
    int fd;
    /* Permission bits whose lock bytes this descriptor holds:
     * QCBT_IO_LOCK_PERM_BASE + i and QCBT_IO_LOCK_SHARED_BASE + i.
     */
    uint64_t locked_perm, locked_unshared;
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

static ssize_t
fd_pwrite(void *opaque, const void *buf, size_t count, uint64_t offset)
{
    struct io_fd *h = opaque;
    size_t done = 0;

    while (done < count) {
        ssize_t r = pwrite(h->fd,
                           (const char *)buf + done,
                           count - done,
                           (off_t)(offset + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -ENOSPC; /* no progress: the device is full */
        done += (size_t)r;
    }
    return (ssize_t)done;
}

static int
fd_flush(void *opaque)
{
    struct io_fd *h = opaque;

    return fdatasync(h->fd) < 0 ? -errno : 0;
}

static int
fd_writeback(void *opaque, uint64_t offset, uint64_t len, bool wait)
{
    struct io_fd *h = opaque;
    unsigned flags = SYNC_FILE_RANGE_WRITE;

    if (wait)
        flags |= SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WAIT_AFTER;
    if (sync_file_range(h->fd, (off_t)offset, (off_t)len, flags) < 0) {
        /* A kernel (or sandbox) without the call only loses the pacing;
         * fdatasync still makes the data durable.  Any other error is the
         * device's: writeback failed, the data may not be there.
         */
        if (errno != ENOSYS)
            return -errno;
    }
    if (wait)
        posix_fadvise(h->fd, (off_t)offset, (off_t)len, POSIX_FADV_DONTNEED);
    return 0;
}

/* ------------------------------------------------------------------ */
/* QEMU-compatible image locks: open file description (OFD) read locks on
 * single bytes, as QEMU's file-posix driver takes them (qemu_lock_fd()
 * with exclusive=false, qemu_lock_fd_test() with exclusive=true).  OFD
 * locks belong to the open file description, so they neither conflict
 * with the ones this io holds nor vanish when another descriptor of the
 * same file is closed (POSIX process locks would).
 */

static int
lock_byte(int fd, int cmd, short type, off_t off, short *found)
{
    struct flock fl = {
        .l_type = type,
        .l_whence = SEEK_SET,
        .l_start = off,
        .l_len = 1,
    };

    if (fcntl(fd, cmd, &fl) < 0)
        return -errno;
    if (found)
        *found = fl.l_type;
    return 0;
}

/* Hold the bytes of PERM and UNSHARED, release the other ones held. */
static int
apply_locks(struct io_fd *h, uint64_t perm, uint64_t unshared)
{
    unsigned i;
    int r;

    for (i = 0; i < QCBT_PERM_BITS; i++) {
        uint64_t bit = 1ULL << i;
        struct {
            uint64_t want, *held;
            off_t off;
        } set[2] = {
            {perm, &h->locked_perm, QCBT_IO_LOCK_PERM_BASE + i},
            {unshared, &h->locked_unshared, QCBT_IO_LOCK_SHARED_BASE + i},
        };
        unsigned k;

        for (k = 0; k < 2; k++) {
            bool want = set[k].want & bit, held = *set[k].held & bit;

            if (want == held)
                continue;
            r = lock_byte(h->fd,
                          F_OFD_SETLK,
                          want ? F_RDLCK : F_UNLCK,
                          set[k].off,
                          NULL);
            if (r < 0)
                return qcbt_error(-r,
                                  "%s byte %ld: %s",
                                  want ? "locking" : "unlocking",
                                  (long)set[k].off,
                                  strerror(-r));
            *set[k].held ^= bit;
        }
    }
    return 0;
}

/* Would an exclusive lock of OFF conflict with another holder? */
static int
byte_taken(int fd, off_t off)
{
    short found = F_UNLCK;
    int r = lock_byte(fd, F_OFD_GETLK, F_WRLCK, off, &found);

    if (r < 0)
        return qcbt_error(-r,
                          "testing lock byte %ld: %s",
                          (long)off,
                          strerror(-r));
    return found != F_UNLCK;
}

/* Another process unsharing a permission we hold, or holding one we do
 * not share, conflicts.
 */
static int
check_locks(struct io_fd *h, uint64_t perm, uint64_t shared)
{
    unsigned i;
    int r;

    for (i = 0; i < QCBT_PERM_BITS; i++) {
        uint64_t bit = 1ULL << i;

        if (!(perm & bit))
            continue;
        r = byte_taken(h->fd, QCBT_IO_LOCK_SHARED_BASE + i);
        if (r < 0)
            return r;
        if (r)
            return qcbt_error(EAGAIN,
                              "held by another process (failed to get "
                              "\"%s\" lock)",
                              qcbt_perm_name(bit));
    }
    for (i = 0; i < QCBT_PERM_BITS; i++) {
        uint64_t bit = 1ULL << i;

        if (shared & bit)
            continue;
        r = byte_taken(h->fd, QCBT_IO_LOCK_PERM_BASE + i);
        if (r < 0)
            return r;
        if (r)
            return qcbt_error(EAGAIN,
                              "held by another process (failed to get "
                              "shared \"%s\" lock)",
                              qcbt_perm_name(bit));
    }
    return 0;
}

static int
fd_lock(void *opaque, uint64_t perm, uint64_t shared)
{
    struct io_fd *h = opaque;
    uint64_t old_perm = h->locked_perm, old_unshared = h->locked_unshared;
    uint64_t unshared = QCBT_PERM_ALL & ~shared;
    int r;

    /* Take first, then look (QEMU's order): two processes that both
     * take and then look cannot both miss each other.  Bytes only needed
     * by the old mode are dropped after the check, so a failed switch
     * leaves the old mode intact.
     */
    r = apply_locks(h, perm | old_perm, unshared | old_unshared);
    if (r >= 0)
        r = check_locks(h, perm, shared);
    if (r < 0) {
        int errnum = qcbt_error_errno();
        char msg[512];

        snprintf(msg, sizeof msg, "%s", qcbt_error_get());
        (void)apply_locks(h, old_perm, old_unshared);
        return qcbt_error(errnum, "%s", msg);
    }
    return apply_locks(h, perm, unshared);
}

static int
fd_close(void *opaque)
{
    struct io_fd *h = opaque;
    int r = close(h->fd) < 0 ? -errno : 0;

    free(h);
    return r;
}

static const struct qcbt_io_ops fd_ops = {
    .pread = fd_pread,
    .pwrite = fd_pwrite,
    .flush = fd_flush,
    .writeback = fd_writeback,
    .lock = fd_lock,
    .extent = fd_extent,
    .close = fd_close,
};

/* Wrap FD (owned from here on) after fstat gave ST. */
static int
wrap_fd(int fd, const struct stat *st, const char *name, struct qcbt_io **out)
{
    struct io_fd *h;
    int r;

    h = calloc(1, sizeof *h);
    if (!h) {
        close(fd);
        return qcbt_error(ENOMEM, "%s: out of memory", name);
    }
    h->fd = fd;
    r = qcbt_io_new(&fd_ops, h, (uint64_t)st->st_size, name, out);
    if (r < 0)
        return r;
    (*out)->allocated = (int64_t)st->st_blocks * 512;
    (*out)->fd = fd;
    (*out)->dev = st->st_dev;
    (*out)->ino = st->st_ino;
    return 0;
}

static int
open_regular(const char *path, int mode, struct qcbt_io **out)
{
    struct stat st;
    int fd, r;

    fd = open(path, mode | O_CLOEXEC | O_NONBLOCK);
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
    if (mode == O_RDONLY)
        posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    return wrap_fd(fd, &st, path, out);
}

int
qcbt_io_open_file(const char *path, struct qcbt_io **out)
{
    return open_regular(path, O_RDONLY, out);
}

int
qcbt_io_open_file_rw(const char *path, struct qcbt_io **out)
{
    return open_regular(path, O_RDWR, out);
}

int
qcbt_io_open_fd(int fd, const char *name, struct qcbt_io **out)
{
    struct stat st;
    int r;

    if (fstat(fd, &st) < 0) {
        r = qcbt_error(errno, "%s: fstat: %s", name, strerror(errno));
        close(fd);
        return r;
    }
    return wrap_fd(fd, &st, name, out);
}

/* qcbt: the I/O interface, independent of the backend (see io.h). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "error.h"
#include "io.h"

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

int
qcbt_io_close(struct qcbt_io *io)
{
    int r = 0;

    if (!io)
        return 0;
    if (io->ops->close)
        r = io->ops->close(io->opaque);
    if (r < 0)
        r = qcbt_error(-r, "%s: close: %s", io->name, strerror(-r));
    free(io->name);
    free(io);
    return r;
}

void
qcbt_io_free(struct qcbt_io *io)
{
    (void)qcbt_io_close(io);
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

/* The test hook (crash-safety tests only; docs/qcbt.pod "ENVIRONMENT"):
 * QCBT_TEST_FAIL_AT=[KIND-]OP:N acts at the Nth qcbt_io_write_exact()
 * (OP "write") or qcbt_io_flush() (OP "flush") of the process, counted
 * from 1, before it reaches the backend:
 *
 *   OP:N, eio-OP:N    the Nth and every later one fails with EIO, as if
 *                     the disk had stopped there;
 *   enospc-OP:N       the same with ENOSPC (the file system is full);
 *   kill-OP:N         the process dies of SIGKILL at the Nth: nothing
 *                     after it happens, no cleanup (a crash);
 *   pause-OP:N        at the Nth the process creates the file
 *                     $QCBT_TEST_PAUSE_FILE and waits until the file
 *                     "$QCBT_TEST_PAUSE_FILE.resume" exists, then goes
 *                     on (holding everything it holds: locks, the half
 *                     done change), so a test can act mid-write.
 */
enum fault {
    FAULT_NONE,
    FAULT_EIO,
    FAULT_ENOSPC,
    FAULT_KILL,
    FAULT_PAUSE,
};

static atomic_ulong nr_writes, nr_flushes;

static enum fault
injected_fault(const char *op, atomic_ulong *counter)
{
    static const struct {
        const char *prefix;
        enum fault fault;
    } kinds[] = {
        {"", FAULT_EIO},
        {"eio-", FAULT_EIO},
        {"enospc-", FAULT_ENOSPC},
        {"kill-", FAULT_KILL},
        {"pause-", FAULT_PAUSE},
    };
    const char *env = getenv("QCBT_TEST_FAIL_AT"), *arg = NULL;
    size_t i, plen, olen = strlen(op);
    enum fault f = FAULT_NONE;
    unsigned long n, at;
    char *end;

    if (!env)
        return FAULT_NONE;
    for (i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        plen = strlen(kinds[i].prefix);
        if (strncmp(env, kinds[i].prefix, plen) == 0 &&
            strncmp(env + plen, op, olen) == 0 && env[plen + olen] == ':') {
            f = kinds[i].fault;
            arg = env + plen + olen + 1;
            break;
        }
    }
    if (!arg)
        return FAULT_NONE;
    n = atomic_fetch_add(counter, 1) + 1;
    at = strtoul(arg, &end, 10);
    if (*end != '\0' || at == 0 || n < at)
        return FAULT_NONE;
    if ((f == FAULT_KILL || f == FAULT_PAUSE) && n != at)
        return FAULT_NONE;
    return f;
}

/* pause-OP:N: announce the pause, wait to be resumed. */
static void
pause_here(void)
{
    const char *marker = getenv("QCBT_TEST_PAUSE_FILE");
    struct timespec tick = {0, 10 * 1000 * 1000};
    char *resume;
    int fd;

    if (!marker || asprintf(&resume, "%s.resume", marker) < 0)
        return;
    fd = open(marker, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0)
        close(fd);
    while (access(resume, F_OK) < 0)
        nanosleep(&tick, NULL);
    free(resume);
}

/* Apply the test hook to the Nth write or flush: 0 to go on, or the
 * errno to fail with. */
static int
test_fault(const char *op, atomic_ulong *counter)
{
    switch (injected_fault(op, counter)) {
    case FAULT_NONE:
        return 0;
    case FAULT_EIO:
        return EIO;
    case FAULT_ENOSPC:
        return ENOSPC;
    case FAULT_KILL:
        raise(SIGKILL);
        return EIO; /* not reached */
    case FAULT_PAUSE:
        pause_here();
        return 0;
    }
    return 0;
}

int
qcbt_io_write_exact(struct qcbt_io *io,
                    const void *buf,
                    size_t count,
                    uint64_t offset,
                    const char *what)
{
    ssize_t r;
    int fault;

    if (!io->ops->pwrite)
        return qcbt_error(EROFS,
                          "%s: writing %s: read-only storage",
                          io->name,
                          what);
    if (count == 0)
        return 0;
    if (offset > (uint64_t)INT64_MAX || count > (uint64_t)INT64_MAX - offset)
        return qcbt_error(EFBIG,
                          "%s: writing %s at offset 0x%" PRIx64
                          ": past the largest file offset",
                          io->name,
                          what,
                          offset);
    fault = test_fault("write", &nr_writes);
    if (fault)
        return qcbt_error(fault,
                          "%s: writing %s at offset 0x%" PRIx64
                          ": %s (injected by QCBT_TEST_FAIL_AT)",
                          io->name,
                          what,
                          offset,
                          strerror(fault));
    r = io->ops->pwrite(io->opaque, buf, count, offset);
    if (r >= 0 && (size_t)r != count)
        r = -EIO; /* the backend broke its contract: never a short write */
    if (r < 0)
        return qcbt_error(-r,
                          "%s: writing %s at offset 0x%" PRIx64 ": %s",
                          io->name,
                          what,
                          offset,
                          strerror(-r));
    if (offset + count > io->size)
        io->size = offset + count;
    return 0;
}

int
qcbt_io_flush(struct qcbt_io *io)
{
    int r = test_fault("flush", &nr_flushes);

    if (r)
        return qcbt_error(r,
                          "%s: flush: %s (injected by QCBT_TEST_FAIL_AT)",
                          io->name,
                          strerror(r));
    if (!io->ops->flush)
        return 0;
    r = io->ops->flush(io->opaque);
    if (r < 0)
        return qcbt_error(-r, "%s: flush: %s", io->name, strerror(-r));
    return 0;
}

int
qcbt_io_writeback(struct qcbt_io *io, uint64_t offset, uint64_t len, bool wait)
{
    int r;

    if (!io->ops->writeback || len == 0)
        return 0;
    r = io->ops->writeback(io->opaque, offset, len, wait);
    if (r < 0)
        return qcbt_error(-r,
                          "%s: writeback of 0x%" PRIx64 " bytes at offset "
                          "0x%" PRIx64 ": %s",
                          io->name,
                          len,
                          offset,
                          strerror(-r));
    return 0;
}

/* ------------------------------------------------------------------ */
/* Locks */

void
qcbt_io_lock_perms(enum qcbt_io_lock_mode mode,
                   uint64_t *perm,
                   uint64_t *shared)
{
    /* What QEMU 7.2 holds (/proc/locks): qemu-img info and qemu-nbd -r
     * bytes 100, 201, 203; qemu-io and qemu-nbd read-write 100, 101, 103,
     * 201, 203; qemu-io -r -U byte 100 only.
     */
    switch (mode) {
    case QCBT_IO_LOCK_NONE:
        *perm = 0;
        *shared = QCBT_PERM_ALL;
        return;
    case QCBT_IO_LOCK_SHARED:
        *perm = QCBT_PERM_CONSISTENT_READ;
        *shared = QCBT_PERM_ALL;
        return;
    case QCBT_IO_LOCK_READ:
        *perm = QCBT_PERM_CONSISTENT_READ;
        *shared = QCBT_PERM_ALL & ~(QCBT_PERM_WRITE | QCBT_PERM_RESIZE);
        return;
    case QCBT_IO_LOCK_WRITE:
        *perm = QCBT_PERM_CONSISTENT_READ | QCBT_PERM_WRITE | QCBT_PERM_RESIZE;
        *shared = QCBT_PERM_ALL & ~(QCBT_PERM_WRITE | QCBT_PERM_RESIZE);
        return;
    }
    *perm = 0;
    *shared = QCBT_PERM_ALL;
}

const char *
qcbt_perm_name(uint64_t perm)
{
    switch (perm) {
    case QCBT_PERM_CONSISTENT_READ:
        return "consistent read";
    case QCBT_PERM_WRITE:
        return "write";
    case QCBT_PERM_WRITE_UNCHANGED:
        return "write unchanged";
    case QCBT_PERM_RESIZE:
        return "resize";
    case QCBT_PERM_GRAPH_MOD:
        return "change children";
    }
    return "unknown";
}

int
qcbt_io_lock(struct qcbt_io *io, enum qcbt_io_lock_mode mode)
{
    uint64_t perm, shared;
    int r;

    if (!io->ops->lock)
        return 0;
    qcbt_io_lock_perms(mode, &perm, &shared);
    r = io->ops->lock(io->opaque, perm, shared);
    if (r < 0)
        return qcbt_error_prefix(-r, "%s", io->name);
    return 0;
}

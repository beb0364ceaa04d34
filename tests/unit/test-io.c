/* qcbt unit tests: the I/O interface (common/io): writable memory, writes
 * through any backend, and QEMU-compatible image locks between open file
 * descriptions of one file (OFD locks conflict between two opens in one
 * process just as between two processes).  The same locks against real
 * qemu-img, qemu-io and qemu-nbd: tests/interop/test-locks.sh.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "error.h"
#include "io.h"
#include "test-tmpdir.h"

static void
expect_error(int r, int errnum, const char *needle)
{
    if (r != -errnum || strstr(qcbt_error_get(), needle) == NULL)
        fail_msg("expected -%d with '%s', got %d: %s",
                 errnum,
                 needle,
                 r,
                 qcbt_error_get());
    assert_null(strchr(qcbt_error_get(), '\n'));
}

/* ------------------------------------------------------------------ */
/* Memory */

static void
test_mem_rw(void **state)
{
    unsigned char buf[64], out[16], tail[54] = {0};
    struct qcbt_io *io;

    (void)state;
    memset(buf, 0xee, sizeof buf);
    assert_int_equal(qcbt_io_open_mem_rw(buf, sizeof buf, 4, "m", &io), 0);
    assert_int_equal(io->size, 4);
    /* A write past the end leaves a hole of zeros and grows the file. */
    assert_int_equal(qcbt_io_write_exact(io, "ab", 2, 8, "x"), 0);
    assert_int_equal(io->size, 10);
    assert_int_equal(qcbt_io_read_exact(io, out, 10, 0, false, "x"), 0);
    assert_memory_equal(out, "\xee\xee\xee\xee\0\0\0\0ab", 10);
    /* Up to the capacity, not beyond. */
    assert_int_equal(qcbt_io_write_exact(io, tail, 54, 10, "tail"), 0);
    assert_int_equal(io->size, 64);
    expect_error(qcbt_io_write_exact(io, "z", 1, 64, "more"),
                 ENOSPC,
                 "m: writing more at offset 0x40: No space left on device");
    assert_int_equal(io->size, 64);
    /* Memory has nothing to flush, write back or lock. */
    assert_int_equal(qcbt_io_flush(io), 0);
    assert_int_equal(qcbt_io_writeback(io, 0, 64, true), 0);
    assert_int_equal(qcbt_io_lock(io, QCBT_IO_LOCK_WRITE), 0);
    assert_int_equal(qcbt_io_close(io), 0);

    expect_error(qcbt_io_open_mem_rw(buf, 4, 5, "m", &io),
                 EINVAL,
                 "m: 5 bytes");
}

static void
test_read_only(void **state)
{
    static const unsigned char ro[8];
    struct qcbt_io *io;
    char path[PATH_MAX + 16];
    int fd;

    (void)state;
    assert_int_equal(qcbt_io_open_mem(ro, sizeof ro, "ro", &io), 0);
    expect_error(qcbt_io_write_exact(io, "x", 1, 0, "header"),
                 EROFS,
                 "ro: writing header: read-only storage");
    qcbt_io_free(io);

    /* A file opened read-only: the kernel refuses the write. */
    snprintf(path, sizeof path, "%s/ro.img", test_tmpdir);
    fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0600);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(qcbt_io_open_file(path, &io), 0);
    expect_error(qcbt_io_write_exact(io, "x", 1, 0, "header"),
                 EBADF,
                 "writing header at offset 0x0");
    qcbt_io_free(io);
}

static void
test_file_rw(void **state)
{
    char path[PATH_MAX + 16];
    unsigned char out[4];
    struct qcbt_io *io;
    int fd;

    (void)state;
    snprintf(path, sizeof path, "%s/rw.img", test_tmpdir);
    expect_error(qcbt_io_open_file_rw(path, &io), ENOENT, "rw.img");
    fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0600);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(qcbt_io_open_file_rw(path, &io), 0);
    assert_int_equal(qcbt_io_write_exact(io, "qcbt", 4, 4096, "data"), 0);
    assert_int_equal(io->size, 4100);
    assert_int_equal(qcbt_io_writeback(io, 0, 4100, false), 0);
    assert_int_equal(qcbt_io_writeback(io, 0, 4100, true), 0);
    assert_int_equal(qcbt_io_flush(io), 0);
    assert_int_equal(qcbt_io_close(io), 0);

    assert_int_equal(qcbt_io_open_file(path, &io), 0);
    assert_int_equal(io->size, 4100);
    assert_int_equal(qcbt_io_read_exact(io, out, 4, 4096, false, "data"), 0);
    assert_memory_equal(out, "qcbt", 4);
    qcbt_io_free(io);
}

/* ------------------------------------------------------------------ */
/* A backend that fails on demand: every write, flush and writeback
 * returns its errno once the countdown reaches 0.
 */

struct failing {
    int countdown; /* calls that succeed before the failures start */
    int errnum;
};

static int
failing_step(struct failing *f)
{
    if (f->countdown > 0) {
        f->countdown--;
        return 0;
    }
    return -f->errnum;
}

static ssize_t
failing_pread(void *opaque, void *buf, size_t count, uint64_t offset)
{
    (void)opaque;
    (void)offset;
    memset(buf, 0, count);
    return (ssize_t)count;
}

static ssize_t
failing_pwrite(void *opaque, const void *buf, size_t count, uint64_t offset)
{
    int r = failing_step(opaque);

    (void)buf;
    (void)offset;
    return r < 0 ? r : (ssize_t)count;
}

static int
failing_flush(void *opaque)
{
    return failing_step(opaque);
}

static int
failing_writeback(void *opaque, uint64_t offset, uint64_t len, bool wait)
{
    (void)offset;
    (void)len;
    (void)wait;
    return failing_step(opaque);
}

static const struct qcbt_io_ops failing_ops = {
    .pread = failing_pread,
    .pwrite = failing_pwrite,
    .flush = failing_flush,
    .writeback = failing_writeback,
};

static void
test_backend_errors(void **state)
{
    struct failing f = {.countdown = 1, .errnum = EIO};
    struct qcbt_io *io;

    (void)state;
    assert_int_equal(qcbt_io_new(&failing_ops, &f, 0, "dev", &io), 0);
    assert_int_equal(qcbt_io_write_exact(io, "a", 1, 0, "x"), 0);
    expect_error(qcbt_io_write_exact(io, "a", 1, 512, "header"),
                 EIO,
                 "dev: writing header at offset 0x200: Input/output error");
    assert_int_equal(io->size, 1); /* a failed write does not grow it */
    expect_error(qcbt_io_flush(io), EIO, "dev: flush: Input/output error");
    expect_error(qcbt_io_writeback(io, 4096, 8192, false),
                 EIO,
                 "dev: writeback of 0x2000 bytes at offset 0x1000: "
                 "Input/output error");
    qcbt_io_free(io); /* no close op: nothing to release */
}

/* ------------------------------------------------------------------ */
/* Locks */

static struct qcbt_io *
open_locked(const char *path, bool rw, enum qcbt_io_lock_mode mode)
{
    struct qcbt_io *io;

    if (rw)
        assert_int_equal(qcbt_io_open_file_rw(path, &io), 0);
    else
        assert_int_equal(qcbt_io_open_file(path, &io), 0);
    if (qcbt_io_lock(io, mode) < 0)
        fail_msg("lock mode %d: %s", (int)mode, qcbt_error_get());
    return io;
}

/* Opening PATH in MODE fails as held by another process, the message
 * naming NEEDLE ("\"write\" lock", "shared \"write\" lock").
 */
static void
expect_held(const char *path,
            bool rw,
            enum qcbt_io_lock_mode mode,
            const char *needle)
{
    struct qcbt_io *io;
    char want[256];

    if (rw)
        assert_int_equal(qcbt_io_open_file_rw(path, &io), 0);
    else
        assert_int_equal(qcbt_io_open_file(path, &io), 0);
    snprintf(want,
             sizeof want,
             "%s: held by another process (failed to get %s)",
             path,
             needle);
    expect_error(qcbt_io_lock(io, mode), EAGAIN, want);
    qcbt_io_free(io);
}

static void
test_lock_modes(void **state)
{
    uint64_t perm, shared;

    (void)state;
    /* the bytes QEMU 7.2 holds (see qcbt_io_lock_perms) */
    qcbt_io_lock_perms(QCBT_IO_LOCK_READ, &perm, &shared);
    assert_int_equal(perm, QCBT_PERM_CONSISTENT_READ);
    assert_int_equal(QCBT_PERM_ALL & ~shared,
                     QCBT_PERM_WRITE | QCBT_PERM_RESIZE);
    qcbt_io_lock_perms(QCBT_IO_LOCK_WRITE, &perm, &shared);
    assert_int_equal(perm,
                     QCBT_PERM_CONSISTENT_READ | QCBT_PERM_WRITE |
                         QCBT_PERM_RESIZE);
    assert_int_equal(QCBT_PERM_ALL & ~shared,
                     QCBT_PERM_WRITE | QCBT_PERM_RESIZE);
    qcbt_io_lock_perms(QCBT_IO_LOCK_SHARED, &perm, &shared);
    assert_int_equal(perm, QCBT_PERM_CONSISTENT_READ);
    assert_int_equal(shared, QCBT_PERM_ALL);
    qcbt_io_lock_perms(QCBT_IO_LOCK_NONE, &perm, &shared);
    assert_int_equal(perm, 0);
    assert_int_equal(shared, QCBT_PERM_ALL);
    assert_string_equal(qcbt_perm_name(QCBT_PERM_WRITE), "write");
    assert_string_equal(qcbt_perm_name(QCBT_PERM_GRAPH_MOD), "change children");
}

static void
test_locks(void **state)
{
    struct qcbt_io *a, *b, *c;
    char path[PATH_MAX + 16];
    int fd;

    (void)state;
    snprintf(path, sizeof path, "%s/lock.img", test_tmpdir);
    fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0600);
    assert_true(fd >= 0);
    close(fd);

    /* Readers share; a writer is refused while one reads, and a reader
     * while one writes (qemu-img info vs qemu-io).
     */
    a = open_locked(path, false, QCBT_IO_LOCK_READ);
    b = open_locked(path, false, QCBT_IO_LOCK_READ);
    expect_held(path, true, QCBT_IO_LOCK_WRITE, "\"write\" lock");
    qcbt_io_free(b);
    qcbt_io_free(a);

    a = open_locked(path, true, QCBT_IO_LOCK_WRITE);
    expect_held(path, false, QCBT_IO_LOCK_READ, "shared \"write\" lock");
    expect_held(path, true, QCBT_IO_LOCK_WRITE, "\"write\" lock");
    /* force-share reads next to a writer, and the writer lets it */
    b = open_locked(path, false, QCBT_IO_LOCK_SHARED);
    qcbt_io_free(b);
    /* dropping to NONE releases every byte */
    assert_int_equal(qcbt_io_lock(a, QCBT_IO_LOCK_NONE), 0);
    b = open_locked(path, true, QCBT_IO_LOCK_WRITE);
    qcbt_io_free(b);
    qcbt_io_free(a);

    /* A writer next to a force-share reader. */
    a = open_locked(path, false, QCBT_IO_LOCK_SHARED);
    b = open_locked(path, true, QCBT_IO_LOCK_WRITE);
    qcbt_io_free(b);
    qcbt_io_free(a);

    /* A failed switch keeps the old mode, and nothing more: B reads, its
     * switch to WRITE fails on A; C can still read (B holds no "write"
     * byte), and once A and C are gone a writer still sees B's read.
     */
    a = open_locked(path, false, QCBT_IO_LOCK_READ);
    b = open_locked(path, true, QCBT_IO_LOCK_READ);
    expect_error(qcbt_io_lock(b, QCBT_IO_LOCK_WRITE),
                 EAGAIN,
                 "held by another process (failed to get \"write\" lock)");
    c = open_locked(path, false, QCBT_IO_LOCK_READ);
    qcbt_io_free(c);
    qcbt_io_free(a);
    expect_held(path, true, QCBT_IO_LOCK_WRITE, "\"write\" lock");
    /* with A gone, B's switch succeeds; closing it releases everything */
    assert_int_equal(qcbt_io_lock(b, QCBT_IO_LOCK_WRITE), 0);
    expect_held(path, false, QCBT_IO_LOCK_READ, "shared \"write\" lock");
    assert_int_equal(qcbt_io_close(b), 0);
    a = open_locked(path, true, QCBT_IO_LOCK_WRITE);
    qcbt_io_free(a);
}

/* ------------------------------------------------------------------ */
/* The test hook (QCBT_TEST_FAIL_AT, io.c).  Its counters are per process
 * and count only while the variable names their operation: this test
 * alone sets it, so the numbers below are the process's. */

struct pause_watch {
    const char *marker;
    const unsigned char *buf;
    bool written_while_paused;
    int resumed; /* test_write_file() of the resume file */
};

static void *
resume_when_paused(void *p)
{
    struct pause_watch *w = p;
    struct timespec tick = {0, 1000 * 1000};
    char resume[PATH_MAX + 32];

    while (access(w->marker, F_OK) < 0)
        nanosleep(&tick, NULL);
    /* Paused before the write reaches the backend. */
    w->written_while_paused = w->buf[4096] == 0x99;
    snprintf(resume, sizeof resume, "%s.resume", w->marker);
    w->resumed = test_write_file(resume, "", 0);
    return NULL;
}

/* A child writing (or flushing) FILE under QCBT_TEST_FAIL_AT=SPEC dies of
 * SIGKILL and the file keeps its bytes. */
static void
expect_killed(const char *spec, const char *file, bool flush)
{
    unsigned char got[512], zero[512] = {0};
    int status, fd;
    pid_t pid = fork();

    assert_true(pid >= 0);
    if (pid == 0) {
        struct qcbt_io *io;
        unsigned char b[512];

        memset(b, 0x77, sizeof b);
        setenv("QCBT_TEST_FAIL_AT", spec, 1);
        if (qcbt_io_open_file_rw(file, &io) < 0)
            _exit(3);
        if (flush)
            qcbt_io_flush(io);
        else
            qcbt_io_write_exact(io, b, sizeof b, 0, "data");
        _exit(0);
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGKILL);
    fd = open(file, O_RDONLY);
    assert_true(fd >= 0);
    assert_int_equal(pread(fd, got, sizeof got, 0), (ssize_t)sizeof got);
    close(fd);
    assert_memory_equal(got, zero, sizeof got);
}

static void
test_fault_hook(void **state)
{
    static unsigned char buf[65536];
    unsigned char b[512];
    char marker[PATH_MAX + 16], resume[PATH_MAX + 32], file[PATH_MAX + 16];
    struct pause_watch w = {.buf = buf};
    struct qcbt_io *io;
    pthread_t t;
    int i;

    (void)state;
    memset(b, 0x99, sizeof b);
    assert_int_equal(qcbt_io_open_mem_rw(buf, sizeof buf, 0, "m", &io), 0);

    /* enospc-write:2: the 2nd write and every later one. */
    setenv("QCBT_TEST_FAIL_AT", "enospc-write:2", 1);
    assert_int_equal(qcbt_io_write_exact(io, b, 512, 0, "one"), 0);
    for (i = 0; i < 2; i++)
        expect_error(qcbt_io_write_exact(io, b, 512, 512, "two"),
                     ENOSPC,
                     "m: writing two at offset 0x200: No space left on "
                     "device (injected by QCBT_TEST_FAIL_AT)");
    assert_int_equal(buf[512], 0);
    /* write:5 (EIO): writes 4 and 5. */
    setenv("QCBT_TEST_FAIL_AT", "write:5", 1);
    assert_int_equal(qcbt_io_write_exact(io, b, 512, 1024, "four"), 0);
    expect_error(qcbt_io_write_exact(io, b, 512, 1536, "five"),
                 EIO,
                 "Input/output error");
    /* Flushes count apart. */
    setenv("QCBT_TEST_FAIL_AT", "eio-flush:1", 1);
    expect_error(qcbt_io_flush(io), EIO, "m: flush: Input/output error");
    setenv("QCBT_TEST_FAIL_AT", "enospc-flush:3", 1);
    assert_int_equal(qcbt_io_flush(io), 0);
    expect_error(qcbt_io_flush(io), ENOSPC, "No space left on device");
    /* Nonsense acts nowhere (writes 6 and 7 are counted, the last one
     * not: no known kind). */
    setenv("QCBT_TEST_FAIL_AT", "write:x", 1);
    assert_int_equal(qcbt_io_write_exact(io, b, 512, 2048, "six"), 0);
    setenv("QCBT_TEST_FAIL_AT", "write:0", 1);
    assert_int_equal(qcbt_io_write_exact(io, b, 512, 2048, "seven"), 0);
    setenv("QCBT_TEST_FAIL_AT", "crash-write:1", 1);
    assert_int_equal(qcbt_io_write_exact(io, b, 512, 2048, "uncounted"), 0);

    /* pause-write:9: write 9 waits for the resume file, then happens;
     * write 10 does not wait. */
    snprintf(marker, sizeof marker, "%s/paused", test_tmpdir);
    snprintf(resume, sizeof resume, "%s.resume", marker);
    setenv("QCBT_TEST_PAUSE_FILE", marker, 1);
    setenv("QCBT_TEST_FAIL_AT", "pause-write:9", 1);
    assert_int_equal(qcbt_io_write_exact(io, b, 512, 3072, "eight"), 0);
    assert_int_equal(access(marker, F_OK), -1);
    w.marker = marker;
    assert_int_equal(pthread_create(&t, NULL, resume_when_paused, &w), 0);
    assert_int_equal(qcbt_io_write_exact(io, b, 512, 4096, "nine"), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(w.resumed, 0);
    assert_false(w.written_while_paused);
    assert_int_equal(buf[4096], 0x99);
    assert_int_equal(unlink(marker), 0);
    assert_int_equal(unlink(resume), 0);
    assert_int_equal(qcbt_io_write_exact(io, b, 512, 4608, "ten"), 0);
    assert_int_equal(access(marker, F_OK), -1);
    qcbt_io_free(io);

    /* kill-OP:N: the process dies before the write or flush (the
     * counters are inherited: 10 writes and 3 flushes so far). */
    snprintf(file, sizeof file, "%s/killed", test_tmpdir);
    assert_int_equal(test_write_file(file, buf + 60000, 512), 0);
    expect_killed("kill-write:11", file, false);
    expect_killed("kill-flush:4", file, true);
    unsetenv("QCBT_TEST_FAIL_AT");
    unsetenv("QCBT_TEST_PAUSE_FILE");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mem_rw),
        cmocka_unit_test(test_read_only),
        cmocka_unit_test(test_file_rw),
        cmocka_unit_test(test_backend_errors),
        cmocka_unit_test(test_lock_modes),
        cmocka_unit_test(test_locks),
        cmocka_unit_test(test_fault_hook),
    };

    return cmocka_run_group_tests(tests,
                                  test_tmpdir_setup,
                                  test_tmpdir_teardown);
}

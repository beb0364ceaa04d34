/* qcbt-fail-sync.so: an LD_PRELOAD shim that makes sync_file_range(2)
 * fail, so tests can prove a failed writeback fails the caller
 * (tests/interop/test-restore-writeback.sh).
 *
 *   QCBT_FAIL_SYNC=start:ERRNO  calls that only start writeback fail
 *   QCBT_FAIL_SYNC=wait:ERRNO   calls that wait for it fail
 *   QCBT_FAIL_SYNC=all:ERRNO    every call fails
 *
 * ERRNO is EIO, ENOSPC or ENOSYS.  Without the variable, or for calls it
 * does not select, the call does nothing and succeeds (the data still
 * reaches the disk through fsync; only the pacing is lost).  Each failing
 * call is counted in the file $QCBT_FAIL_SYNC_LOG (one byte per call), so
 * a test knows the path it means was taken.
 */
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int
pick_errno(const char *s)
{
    if (strcmp(s, "EIO") == 0)
        return EIO;
    if (strcmp(s, "ENOSPC") == 0)
        return ENOSPC;
    if (strcmp(s, "ENOSYS") == 0)
        return ENOSYS;
    return 0;
}

static void
count_call(void)
{
    const char *log = getenv("QCBT_FAIL_SYNC_LOG");
    int fd;
    ssize_t ignored;

    if (!log)
        return;
    fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    ignored = write(fd, "x", 1);
    (void)ignored;
    close(fd);
}

int
sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags)
{
    const char *v = getenv("QCBT_FAIL_SYNC");
    const char *colon = v ? strchr(v, ':') : NULL;
    bool waits =
        flags & (SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WAIT_AFTER);
    int e;

    (void)fd;
    (void)offset;
    (void)nbytes;
    if (!colon || !(e = pick_errno(colon + 1)))
        return 0;
    if ((strncmp(v, "start:", 6) == 0 && !waits) ||
        (strncmp(v, "wait:", 5) == 0 && waits) || strncmp(v, "all:", 4) == 0) {
        count_call();
        errno = e;
        return -1;
    }
    return 0;
}

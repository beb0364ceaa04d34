/* qcbt-lock-tool: take qcbt's QEMU-compatible image locks from the command
 * line for the interop tests (tests/interop/test-locks.sh).
 *
 *   qcbt-lock-tool read|shared|write FILE [hold]
 *
 * Opens FILE (read-write for "write"), takes the locks of the mode
 * (qcbt_io_lock) and prints "locked".  With "hold" it keeps them until
 * SIGTERM or SIGINT, then exits 0.  Errors: one line "qcbt-lock-tool:
 * MESSAGE", exit 1.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "error.h"
#include "io.h"

static volatile sig_atomic_t stop;

static void
on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void __attribute__((noreturn)) die(const char *msg)
{
    fprintf(stderr, "qcbt-lock-tool: %s\n", msg);
    exit(1);
}

int
main(int argc, char **argv)
{
    enum qcbt_io_lock_mode mode;
    struct qcbt_io *io;
    bool hold;
    sigset_t mask, old;
    struct sigaction sa = {.sa_handler = on_signal};
    int r;

    if (argc < 3 || argc > 4 || (argc == 4 && strcmp(argv[3], "hold") != 0))
        die("usage: qcbt-lock-tool read|shared|write FILE [hold]");
    hold = argc == 4;
    if (strcmp(argv[1], "read") == 0)
        mode = QCBT_IO_LOCK_READ;
    else if (strcmp(argv[1], "shared") == 0)
        mode = QCBT_IO_LOCK_SHARED;
    else if (strcmp(argv[1], "write") == 0)
        mode = QCBT_IO_LOCK_WRITE;
    else
        die("mode must be read, shared or write");

    /* Block the signals before taking the locks so that none is lost
     * between "locked" and the wait.
     */
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, &old);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    r = mode == QCBT_IO_LOCK_WRITE ? qcbt_io_open_file_rw(argv[2], &io)
                                   : qcbt_io_open_file(argv[2], &io);
    if (r < 0)
        die(qcbt_error_get());
    if (qcbt_io_lock(io, mode) < 0)
        die(qcbt_error_get());
    printf("locked\n");
    fflush(stdout);
    while (hold && !stop)
        sigsuspend(&old);
    if (qcbt_io_close(io) < 0)
        die(qcbt_error_get());
    return 0;
}

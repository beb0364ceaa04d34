/* qcbt unit tests: one scratch directory per test program. */
#define _XOPEN_SOURCE 700
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "test-tmpdir.h"

char test_tmpdir[PATH_MAX];

static int
rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

int
test_tmpdir_setup(void **state)
{
    const char *t = getenv("TMPDIR");

    (void)state;
    snprintf(test_tmpdir,
             sizeof test_tmpdir,
             "%s/qcbt-test-XXXXXX",
             t && t[0] ? t : "/tmp");
    if (!mkdtemp(test_tmpdir)) {
        perror("mkdtemp");
        return -1;
    }
    return 0;
}

int
test_tmpdir_teardown(void **state)
{
    (void)state;
    if (test_tmpdir[0])
        nftw(test_tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

int
test_write_file(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    int r;

    if (!f)
        return -1;
    r = fwrite(buf, 1, len, f) == len ? 0 : -1;
    if (fclose(f) != 0)
        r = -1;
    return r;
}

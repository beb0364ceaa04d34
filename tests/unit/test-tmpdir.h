/* qcbt unit tests: one scratch directory per test program. */
#ifndef QCBT_TEST_TMPDIR_H
#define QCBT_TEST_TMPDIR_H

#include <limits.h>
#include <stddef.h>

/* $TMPDIR/qcbt-test-XXXXXX (or /tmp), made by test_tmpdir_setup. */
extern char test_tmpdir[PATH_MAX];

/* cmocka group setup/teardown: make it; remove it and all it holds. */
int test_tmpdir_setup(void **state);
int test_tmpdir_teardown(void **state);

/* Write LEN bytes of BUF to a new file PATH.  0, or -1 (errno set). */
int test_write_file(const char *path, const void *buf, size_t len);

#endif /* QCBT_TEST_TMPDIR_H */

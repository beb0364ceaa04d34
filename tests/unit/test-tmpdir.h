/* qcbt unit tests: one scratch directory per test program. */
#ifndef QCBT_TEST_TMPDIR_H
#define QCBT_TEST_TMPDIR_H

#include <limits.h>

/* $TMPDIR/qcbt-test-XXXXXX (or /tmp), made by test_tmpdir_setup. */
extern char test_tmpdir[PATH_MAX];

/* cmocka group setup/teardown: make it; remove it and all it holds. */
int test_tmpdir_setup(void **state);
int test_tmpdir_teardown(void **state);

#endif /* QCBT_TEST_TMPDIR_H */

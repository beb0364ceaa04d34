/* qcbt unit tests: common/chainops: the --bitmaps spec of convert
 * (NAME[=ALIAS][,persistent=on|off][,enabled=on|off], ",," escapes) and
 * the backing name a snapshot stores (relative only when both images
 * share a directory and IMAGE was given relative).
 */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "convert.h"
#include "error.h"
#include "snapshot.h"
#include "test-tmpdir.h"

static void
ok(const char *arg,
   const char *name,
   const char *alias,
   bool persistent,
   int enabled)
{
    struct convert_bitmap_spec s;

    if (convert_bitmap_spec_parse(arg, &s) < 0)
        fail_msg("'%s': %s", arg, qcbt_error_get());
    assert_string_equal(s.name, name);
    if (alias)
        assert_string_equal(s.alias, alias);
    else
        assert_null(s.alias);
    assert_int_equal(s.persistent, persistent);
    assert_int_equal(s.enabled, enabled);
    convert_bitmap_spec_free(&s);
}

static void
bad(const char *arg, const char *needle)
{
    struct convert_bitmap_spec s;

    assert_int_equal(convert_bitmap_spec_parse(arg, &s), -EINVAL);
    if (!strstr(qcbt_error_get(), needle))
        fail_msg("'%s': '%s' lacks '%s'", arg, qcbt_error_get(), needle);
    assert_null(s.name);
    assert_null(s.alias);
}

static void
test_spec_parse(void **state)
{
    (void)state;
    ok("X", "X", NULL, true, -1);
    ok("X=Y", "X", "Y", true, -1);
    ok("X=a=b", "X", "a=b", true, -1);
    ok("X,persistent=off", "X", NULL, false, -1);
    ok("X=Y,enabled=off,persistent=on", "X", "Y", true, 0);
    ok("X,enabled=on", "X", NULL, true, 1);
    ok("X,enabled=false", "X", NULL, true, 0);
    ok("a,,b=c,,,,d,enabled=yes", "a,b", "c,,d", true, 1);
    ok("vendorA/daily-7=v", "vendorA/daily-7", "v", true, -1);

    bad("", "invalid bitmap argument");
    bad("=Y", "invalid bitmap argument");
    bad("X=", "invalid bitmap argument");
    bad(",enabled=on", "invalid bitmap argument");
    bad("X,enabled", "needs a value");
    bad("X,enabled=maybe", "enabled=maybe (on or off)");
    bad("X,enabled=on,enabled=off", "'enabled' given twice");
    bad("X,granularity=4k", "unknown option 'granularity'");
    bad("X,enabled=on,persistent=on,enabled=on", "too many options");
    bad("X,", "needs a value");
}

static void
touch(const char *path)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    fclose(f);
}

static void
name_is(const char *image, const char *new_path, const char *want)
{
    char *got = NULL;

    if (snapshot_backing_name(image, new_path, &got) < 0)
        fail_msg("%s over %s: %s", new_path, image, qcbt_error_get());
    assert_string_equal(got, want);
    free(got);
}

static void
test_backing_name(void **state)
{
    char sub[PATH_MAX + 8], img[PATH_MAX + 32], want[PATH_MAX + 32];
    const char *dir = test_tmpdir;
    char *real, *none = NULL;

    (void)state;
    real = realpath(dir, NULL);
    assert_non_null(real);
    snprintf(sub, sizeof sub, "%s/sub", dir);
    assert_int_equal(mkdir(sub, 0700), 0);
    snprintf(img, sizeof img, "%s/base.img", sub);
    touch(img);
    assert_int_equal(chdir(dir), 0);

    /* Same directory, relative: the last component. */
    name_is("sub/base.img", "sub/new.img", "base.img");
    name_is("sub/../sub/base.img", "sub/new.img", "base.img");
    /* Absolute: as given. */
    name_is(img, "sub/new.img", img);
    name_is(img, "new.img", img);
    /* Relative, other directory: absolute. */
    snprintf(want, sizeof want, "%s/sub/base.img", real);
    name_is("sub/base.img", "new.img", want);
    assert_int_equal(chdir(sub), 0);
    name_is("base.img", "../new.img", want);
    name_is("base.img", "new.img", "base.img");
    /* Refused: IMAGE does not exist, or NEW's directory does not. */
    assert_int_equal(snapshot_backing_name("nothing.img", "new.img", &none),
                     -EINVAL);
    assert_non_null(strstr(qcbt_error_get(), "cannot name"));
    assert_int_equal(snapshot_backing_name("base.img", "no/dir/new.img", &none),
                     -ENOENT);
    assert_null(none);
    free(real);
    assert_int_equal(chdir("/"), 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spec_parse),
        cmocka_unit_test(test_backing_name),
    };

    return cmocka_run_group_tests(tests,
                                  test_tmpdir_setup,
                                  test_tmpdir_teardown);
}

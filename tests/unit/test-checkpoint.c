/* qcbt: unit tests for common/checkpoint's rules: which names a
 * checkpoint may be created with, what namespace a name is in (and that
 * namespaces do not nest), and the default granularity QEMU gives a new
 * bitmap.  Listing, create and delete are proven against qemu-img in
 * tests/interop/test-checkpoint.sh.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "checkpoint.h"
#include "error.h"

static void
ok_name(const char *name)
{
    if (checkpoint_name_check(name) != 0)
        fail_msg("'%s' refused: %s", name, qcbt_error_get());
}

static void
bad_name(const char *name, const char *needle)
{
    if (checkpoint_name_check(name) != -EINVAL)
        fail_msg("'%s' accepted", name);
    if (!strstr(qcbt_error_get(), needle))
        fail_msg("'%s': message '%s' lacks '%s'",
                 name,
                 qcbt_error_get(),
                 needle);
}

static void
test_names(void **state)
{
    char big[1100];

    (void)state;
    ok_name("daily");
    ok_name("vendorA/daily-7");
    ok_name("a/b/c");
    ok_name("x y");
    ok_name("caf\xc3\xa9/\xe2\x82\xac");
    memset(big, 'a', 1023);
    big[1023] = '\0';
    ok_name(big);
    big[1023] = 'a';
    big[1024] = '\0';
    bad_name(big, "1 to 1023");
    bad_name("", "1 to 1023");
    bad_name("/x", "empty namespace part");
    bad_name("x/", "empty namespace part");
    bad_name("a//b", "empty namespace part");
    bad_name("/", "empty namespace part");
    bad_name("a\nb", "control characters");
    bad_name("a\tb", "control characters");
    bad_name("a\x7f", "control characters");
    bad_name("a\xc2\x85", "control characters"); /* U+0085 NEL */
    bad_name("a\xff", "UTF-8");
    bad_name("a\xc3", "UTF-8");
    bad_name("\xc0\xaf", "UTF-8"); /* overlong '/' */
}

static void
test_namespace_check(void **state)
{
    (void)state;
    assert_int_equal(checkpoint_namespace_check(""), 0);
    assert_int_equal(checkpoint_namespace_check("vendorA"), 0);
    assert_int_equal(checkpoint_namespace_check("a/b"), 0);
    assert_int_equal(checkpoint_namespace_check("a/"), -EINVAL);
    assert_int_equal(checkpoint_namespace_check("/a"), -EINVAL);
    assert_int_equal(checkpoint_namespace_check("a\x01"), -EINVAL);
}

static void
test_namespaces(void **state)
{
    (void)state;
    assert_int_equal(checkpoint_namespace_len("daily"), 0);
    assert_int_equal(checkpoint_namespace_len("vendorA/daily-7"), 7);
    assert_int_equal(checkpoint_namespace_len("a/b/c"), 3);
    /* Names from images need not follow the rules: still one answer. */
    assert_int_equal(checkpoint_namespace_len("/x"), 0);
    assert_int_equal(checkpoint_namespace_len("x/"), 1);

    assert_true(checkpoint_in_namespace("daily", ""));
    assert_false(checkpoint_in_namespace("vendorA/daily", ""));
    assert_true(checkpoint_in_namespace("vendorA/daily", "vendorA"));
    /* Exactly that namespace: neither nested nor a prefix of the name. */
    assert_false(checkpoint_in_namespace("vendorA/sub/daily", "vendorA"));
    assert_true(checkpoint_in_namespace("vendorA/sub/daily", "vendorA/sub"));
    assert_false(checkpoint_in_namespace("vendorAB/daily", "vendorA"));
    assert_false(checkpoint_in_namespace("vendor/daily", "vendorA"));
    assert_false(checkpoint_in_namespace("daily", "vendorA"));
    assert_false(checkpoint_in_namespace("vendorA", "vendorA"));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_namespace_check),
        cmocka_unit_test(test_namespaces),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* qcbt unit tests: the rules every front end shares: the environment
 * (chain_opts_from_env()).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "chain.h"

/* ------------------------------------------------------------------ */
/* QCBT_ALLOW_DATA_FILE */

static void
test_env_allow_data_file(void **state)
{
    static const char *const yes[] = {"1", "yes"};
    static const char *const no[] = {"0", "no", "", "YES", "1 ", "true", "2"};
    struct chain_open_opts o;
    size_t i;

    (void)state;
    assert_int_equal(unsetenv("QCBT_ALLOW_DATA_FILE"), 0);
    o.allow_data_file = true;
    chain_opts_from_env(&o);
    assert_false(o.allow_data_file);
    for (i = 0; i < sizeof yes / sizeof yes[0]; i++) {
        assert_int_equal(setenv("QCBT_ALLOW_DATA_FILE", yes[i], 1), 0);
        o.allow_data_file = false;
        chain_opts_from_env(&o);
        assert_true(o.allow_data_file);
    }
    for (i = 0; i < sizeof no / sizeof no[0]; i++) {
        assert_int_equal(setenv("QCBT_ALLOW_DATA_FILE", no[i], 1), 0);
        o.allow_data_file = true;
        chain_opts_from_env(&o);
        if (o.allow_data_file)
            fail_msg("QCBT_ALLOW_DATA_FILE='%s' allows data files", no[i]);
    }
    assert_int_equal(unsetenv("QCBT_ALLOW_DATA_FILE"), 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_env_allow_data_file),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}

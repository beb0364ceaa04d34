/* qcbt: unit tests for common/utils/utf8 (RFC 3629).
 *
 * Boundaries of every sequence length, and each way a sequence is not
 * UTF-8: stray continuation bytes, truncation (by the bytes there and by
 * the length given), overlong forms, surrogates, code points past
 * U+10FFFF and lead bytes that no longer exist.  A code point's
 * sequence is built here from its bits, not by the decoder.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "utf8.h"

/* The shortest sequence of CP, into S; its length. */
static size_t
encode(uint32_t cp, unsigned char *s)
{
    if (cp < 0x80) {
        s[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        s[0] = (unsigned char)(0xc0 | (cp >> 6));
        s[1] = (unsigned char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        s[0] = (unsigned char)(0xe0 | (cp >> 12));
        s[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        s[2] = (unsigned char)(0x80 | (cp & 0x3f));
        return 3;
    }
    s[0] = (unsigned char)(0xf0 | (cp >> 18));
    s[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
    s[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
    s[3] = (unsigned char)(0x80 | (cp & 0x3f));
    return 4;
}

static void
test_boundaries(void **state)
{
    static const uint32_t cps[] = {
        0x0,
        0x41,
        0x7f,
        0x80,
        0x9b,
        0x7ff,
        0x800,
        0xd7ff,
        0xe000,
        0xfffd,
        0xffff,
        0x10000,
        0x10ffff,
    };
    unsigned char s[4];
    uint32_t cp;
    size_t i, len;

    (void)state;
    for (i = 0; i < sizeof cps / sizeof cps[0]; i++) {
        len = encode(cps[i], s);
        cp = 0xdeadbeef;
        assert_int_equal(utf8_decode(s, len, &cp), len);
        assert_int_equal(cp, cps[i]);
        assert_true(utf8_valid(s, len));
        /* One byte short of the sequence: never read past N. */
        if (len > 1) {
            assert_int_equal(utf8_decode(s, len - 1, &cp), 0);
            assert_false(utf8_valid(s, len - 1));
        }
    }
}

static void
test_invalid(void **state)
{
    static const struct {
        const char *what;
        unsigned char s[4];
        size_t n;
    } bad[] = {
        {"stray continuation", {0x80}, 1},
        {"stray continuation 0xbf", {0xbf}, 1},
        {"lead without continuation", {0xc3, 0x41}, 2},
        {"overlong NUL", {0xc0, 0x80}, 2},
        {"overlong 2-byte", {0xc1, 0xbf}, 2},
        {"overlong 3-byte", {0xe0, 0x9f, 0xbf}, 3},
        {"overlong 4-byte", {0xf0, 0x8f, 0xbf, 0xbf}, 4},
        {"surrogate D800", {0xed, 0xa0, 0x80}, 3},
        {"surrogate DFFF", {0xed, 0xbf, 0xbf}, 3},
        {"past U+10FFFF", {0xf4, 0x90, 0x80, 0x80}, 4},
        {"lead 0xf5", {0xf5, 0x80, 0x80, 0x80}, 4},
        {"5-byte lead", {0xf8, 0x88, 0x80, 0x80}, 4},
        {"0xff", {0xff}, 1},
        {"truncated 3-byte", {0xe2, 0x82}, 2},
    };
    uint32_t cp = 0;
    size_t i;

    (void)state;
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (utf8_decode(bad[i].s, bad[i].n, &cp) != 0)
            fail_msg("%s: decoded", bad[i].what);
        if (utf8_valid(bad[i].s, bad[i].n))
            fail_msg("%s: valid", bad[i].what);
    }
}

static void
test_strings(void **state)
{
    static const unsigned char mixed[] =
        "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80z";
    static const unsigned char nul[] = {'a', 0, 'b'};
    static const unsigned char late[] = "good\xc3\xa9then\xed\xa0\x80";

    (void)state;
    assert_true(utf8_valid(mixed, sizeof mixed - 1));
    assert_true(utf8_valid(nul, sizeof nul));
    assert_true(utf8_valid(mixed, 0));
    assert_true(utf8_valid(late, 10));
    assert_false(utf8_valid(late, sizeof late - 1));
    /* Cut in the middle of the 4-byte sequence. */
    assert_false(utf8_valid(mixed, 8));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_boundaries),
        cmocka_unit_test(test_invalid),
        cmocka_unit_test(test_strings),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}

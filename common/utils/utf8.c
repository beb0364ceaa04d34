/* qcbt: UTF-8 as RFC 3629 defines it. */
#include "utf8.h"

size_t
utf8_decode(const unsigned char *p, size_t n, uint32_t *cp)
{
    size_t len, i;
    uint32_t c;

    if (p[0] < 0x80) {
        *cp = p[0];
        return 1;
    }
    if ((p[0] & 0xe0) == 0xc0) {
        len = 2;
        c = p[0] & 0x1f;
    } else if ((p[0] & 0xf0) == 0xe0) {
        len = 3;
        c = p[0] & 0x0f;
    } else if ((p[0] & 0xf8) == 0xf0) {
        len = 4;
        c = p[0] & 0x07;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        c = (c << 6) | (p[i] & 0x3f);
    }
    /* Overlong forms, surrogates and code points past Unicode's end. */
    if ((len == 2 && c < 0x80) || (len == 3 && c < 0x800) ||
        (len == 4 && (c < 0x10000 || c > 0x10ffff)) ||
        (c >= 0xd800 && c <= 0xdfff))
        return 0;
    *cp = c;
    return len;
}

bool
utf8_valid(const unsigned char *p, size_t n)
{
    size_t i = 0, len;
    uint32_t cp;

    while (i < n) {
        len = utf8_decode(p + i, n - i, &cp);
        if (len == 0)
            return false;
        i += len;
    }
    return true;
}

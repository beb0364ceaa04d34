/* qcbt: per-thread last error. */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "error.h"
#include "minmax.h"

#define ERROR_MAX 1024

static __thread char last_msg[ERROR_MAX];
static __thread int last_errno;

int
qcbt_error(int errnum, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(last_msg, sizeof last_msg, fmt, ap);
    va_end(ap);
    qcbt_sanitize(last_msg);
    last_errno = errnum;
    return -errnum;
}

int
qcbt_error_prefix(int errnum, const char *fmt, ...)
{
    char prefix[ERROR_MAX];
    char old[ERROR_MAX];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, last_msg, sizeof old);
    /* Truncation is fine: messages are one line for a human. */
    size_t n = strnlen(prefix, sizeof prefix);
    memcpy(last_msg, prefix, n);
    if (n + 2 < sizeof last_msg) {
        memcpy(last_msg + n, ": ", 2);
        n += 2;
    }
    size_t m = strnlen(old, sizeof old);
    if (m > sizeof last_msg - 1 - n)
        m = sizeof last_msg - 1 - n;
    memcpy(last_msg + n, old, m);
    last_msg[n + m] = '\0';
    qcbt_sanitize(last_msg);
    last_errno = errnum;
    return -errnum;
}

const char *
qcbt_error_get(void)
{
    return last_msg;
}

int
qcbt_error_errno(void)
{
    return last_errno;
}

void
qcbt_error_clear(void)
{
    last_msg[0] = '\0';
    last_errno = 0;
}

/* Length of the valid UTF-8 sequence at P (N bytes available), with its
 * code point in *CP, or 0 when P does not start one (RFC 3629: no overlong
 * forms, no surrogates, nothing above U+10FFFF).
 */
static size_t
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
    if ((len == 2 && c < 0x80) || (len == 3 && c < 0x800) ||
        (len == 4 && (c < 0x10000 || c > 0x10ffff)) ||
        (c >= 0xd800 && c <= 0xdfff))
        return 0;
    *cp = c;
    return len;
}

/* The next unit of P (N > 0 bytes available): returns how many bytes it
 * takes and sets *SAFE when they may be copied as they are.  An unsafe
 * unit is written as one '?'.  Unsafe: C0 controls and DEL (ESC starts
 * terminal sequences, CR and LF split lines), C1 controls U+0080..U+009F
 * (CSI is U+009B), and bytes that are not UTF-8 (a lone 0x9b is CSI to a
 * terminal in an 8-bit mode).
 */
static size_t
next_unit(const unsigned char *p, size_t n, bool *safe)
{
    uint32_t cp;
    size_t len = utf8_decode(p, n, &cp);

    if (len == 0) {
        *safe = false;
        return 1;
    }
    *safe = cp >= 0xa0 || (cp >= 0x20 && cp != 0x7f && cp < 0x80);
    return len;
}

char *
qcbt_escape(char *dst, size_t dstlen, const char *src, size_t srclen)
{
    const unsigned char *s = (const unsigned char *)src;
    size_t i, j = 0, total = 0, limit;
    bool safe;

    if (dstlen == 0)
        return dst;
    /* Everything fits, or keep room for "..." after what is kept. */
    for (i = 0; i < srclen;) {
        size_t n = next_unit(s + i, srclen - i, &safe);

        total += safe ? n : 1;
        i += n;
    }
    limit = total <= dstlen - 1 ? total : (dstlen > 4 ? dstlen - 4 : 0);
    for (i = 0; i < srclen;) {
        size_t n = next_unit(s + i, srclen - i, &safe);
        size_t out = safe ? n : 1;

        if (j + out > limit)
            break;
        if (safe)
            memmove(dst + j, s + i, n);
        else
            dst[j] = '?';
        j += out;
        i += n;
    }
    if (total > dstlen - 1) {
        size_t dots = MIN((size_t)3, dstlen - 1 - j);

        memcpy(dst + j, "...", dots);
        j += dots;
    }
    dst[j] = '\0';
    return dst;
}

char *
qcbt_sanitize(char *s)
{
    /* Never longer than its input: safe in place. */
    return qcbt_escape(s, strlen(s) + 1, s, strlen(s));
}

bool
qcbt_utf8_valid(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, n;
    uint32_t cp;

    while (i < len) {
        n = utf8_decode(p + i, len - i, &cp);
        if (n == 0 || cp == 0)
            return false;
        i += n;
    }
    return true;
}

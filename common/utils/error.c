/* qcbt: per-thread last error. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "error.h"

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

char *
qcbt_escape(char *dst, size_t dstlen, const char *src, size_t srclen)
{
    size_t i, j = 0;

    if (dstlen == 0)
        return dst;
    for (i = 0; i < srclen && j + 1 < dstlen; i++) {
        unsigned char c = src[i];
        if (j + 4 >= dstlen && i + 1 < srclen) {
            /* Room for "..." and the NUL only. */
            while (j + 4 > dstlen)
                j--;
            memcpy(dst + j, "...", 3);
            j += 3;
            break;
        }
        /* Control characters never reach a terminal or a log line;
         * other bytes (UTF-8 names) pass. */
        dst[j++] = (c >= 0x20 && c != 0x7f) ? (char)c : '?';
    }
    dst[j] = '\0';
    return dst;
}

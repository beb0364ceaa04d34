/* qcbt: JSON string escaping. */
#include <stdio.h>
#include <string.h>

#include "json-out.h"

/* Length of a valid UTF-8 sequence at p (n bytes left), or 0. */
static size_t
utf8_len(const unsigned char *p, size_t n)
{
    size_t len, i;
    unsigned cp;

    if (p[0] < 0x80)
        return 1;
    if ((p[0] & 0xe0) == 0xc0) {
        len = 2;
        cp = p[0] & 0x1f;
    } else if ((p[0] & 0xf0) == 0xe0) {
        len = 3;
        cp = p[0] & 0x0f;
    } else if ((p[0] & 0xf8) == 0xf0) {
        len = 4;
        cp = p[0] & 0x07;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[i] & 0x3f);
    }
    /* Reject overlong forms, surrogates and out-of-range code points. */
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

void
json_string_n(FILE *fp, const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;

    fputc('"', fp);
    while (i < len) {
        unsigned char c = p[i];
        size_t n;

        switch (c) {
        case '"':
            fputs("\\\"", fp);
            i++;
            continue;
        case '\\':
            fputs("\\\\", fp);
            i++;
            continue;
        case '\n':
            fputs("\\n", fp);
            i++;
            continue;
        case '\t':
            fputs("\\t", fp);
            i++;
            continue;
        case '\r':
            fputs("\\r", fp);
            i++;
            continue;
        }
        if (c < 0x20 || c == 0x7f) {
            fprintf(fp, "\\u%04x", c);
            i++;
            continue;
        }
        n = utf8_len(p + i, len - i);
        if (n == 0) {
            fputs("\\ufffd", fp);
            i++;
            continue;
        }
        fwrite(p + i, 1, n, fp);
        i += n;
    }
    fputc('"', fp);
}

void
json_string(FILE *fp, const char *s)
{
    if (!s)
        fputs("null", fp);
    else
        json_string_n(fp, s, strlen(s));
}

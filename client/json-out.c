/* qcbt: JSON string escaping. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "json-out.h"
#include "utf8.h"

void
json_string_n(FILE *fp, const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;

    fputc('"', fp);
    while (i < len) {
        unsigned char c = p[i];
        uint32_t cp;
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
        n = utf8_decode(p + i, len - i, &cp);
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

/* qcbt: a small JSON reader. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "json.h"

struct parser {
    const char *p, *end, *start;
    int depth;
};

static int
perr(struct parser *ps, const char *what)
{
    const char *q;
    unsigned line = 1, col = 1;

    for (q = ps->start; q < ps->p && q < ps->end; q++) {
        if (*q == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    return qcbt_error(EINVAL, "JSON line %u column %u: %s", line, col, what);
}

static void
skip_ws(struct parser *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' ||
                               *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int parse_value(struct parser *ps, struct json **out);

static int
hex4(struct parser *ps, unsigned *v)
{
    int i;

    *v = 0;
    if (ps->end - ps->p < 4)
        return perr(ps, "truncated \\u escape");
    for (i = 0; i < 4; i++) {
        char c = *ps->p++;
        *v <<= 4;
        if (c >= '0' && c <= '9')
            *v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            *v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            *v |= c - 'A' + 10;
        else
            return perr(ps, "bad \\u escape");
    }
    return 0;
}

static void
put_utf8(char *s, size_t *n, unsigned cp)
{
    if (cp < 0x80) {
        s[(*n)++] = cp;
    } else if (cp < 0x800) {
        s[(*n)++] = 0xc0 | (cp >> 6);
        s[(*n)++] = 0x80 | (cp & 0x3f);
    } else if (cp < 0x10000) {
        s[(*n)++] = 0xe0 | (cp >> 12);
        s[(*n)++] = 0x80 | ((cp >> 6) & 0x3f);
        s[(*n)++] = 0x80 | (cp & 0x3f);
    } else {
        s[(*n)++] = 0xf0 | (cp >> 18);
        s[(*n)++] = 0x80 | ((cp >> 12) & 0x3f);
        s[(*n)++] = 0x80 | ((cp >> 6) & 0x3f);
        s[(*n)++] = 0x80 | (cp & 0x3f);
    }
}

/* A string; *out is malloc'ed.  The output is never longer than the
 * input, so one allocation of the raw length suffices.
 */
static int
parse_string(struct parser *ps, char **out)
{
    const char *q;
    size_t n = 0;
    char *s;
    int r;

    ps->p++; /* opening quote */
    for (q = ps->p; q < ps->end && *q != '"'; q++)
        if (*q == '\\')
            q++;
    if (q >= ps->end)
        return perr(ps, "unterminated string");
    s = malloc(q - ps->p + 1);
    if (!s)
        return qcbt_error(ENOMEM, "out of memory");
    while (ps->p < ps->end && *ps->p != '"') {
        unsigned char c = *ps->p++;

        if (c < 0x20) {
            free(s);
            return perr(ps, "control character in string");
        }
        if (c != '\\') {
            s[n++] = c;
            continue;
        }
        if (ps->p >= ps->end) {
            free(s);
            return perr(ps, "truncated escape");
        }
        c = *ps->p++;
        switch (c) {
        case '"':
            s[n++] = '"';
            break;
        case '\\':
            s[n++] = '\\';
            break;
        case '/':
            s[n++] = '/';
            break;
        case 'b':
            s[n++] = '\b';
            break;
        case 'f':
            s[n++] = '\f';
            break;
        case 'n':
            s[n++] = '\n';
            break;
        case 'r':
            s[n++] = '\r';
            break;
        case 't':
            s[n++] = '\t';
            break;
        case 'u': {
            unsigned cp, lo;

            if ((r = hex4(ps, &cp)) < 0) {
                free(s);
                return r;
            }
            if (cp >= 0xd800 && cp < 0xdc00 && ps->end - ps->p >= 6 &&
                ps->p[0] == '\\' && ps->p[1] == 'u') {
                ps->p += 2;
                if ((r = hex4(ps, &lo)) < 0) {
                    free(s);
                    return r;
                }
                if (lo < 0xdc00 || lo > 0xdfff) {
                    free(s);
                    return perr(ps, "bad surrogate pair");
                }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xd800 && cp <= 0xdfff) {
                free(s);
                return perr(ps, "lone surrogate");
            }
            if (cp == 0) {
                free(s);
                return perr(ps, "NUL in string");
            }
            put_utf8(s, &n, cp);
            break;
        }
        default:
            free(s);
            return perr(ps, "bad escape");
        }
    }
    ps->p++; /* closing quote */
    s[n] = '\0';
    *out = s;
    return 0;
}

static int
parse_number(struct parser *ps, struct json *j)
{
    const char *b = ps->p;
    bool integral = true;
    char buf[64];
    size_t len;
    char *end;

    if (ps->p < ps->end && *ps->p == '-')
        ps->p++;
    if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9')
        return perr(ps, "bad number");
    while (ps->p < ps->end &&
           ((*ps->p >= '0' && *ps->p <= '9') || *ps->p == '.' ||
            *ps->p == 'e' || *ps->p == 'E' || *ps->p == '+' || *ps->p == '-')) {
        if (*ps->p == '.' || *ps->p == 'e' || *ps->p == 'E')
            integral = false;
        ps->p++;
    }
    len = ps->p - b;
    if (len >= sizeof buf)
        return perr(ps, "number too long");
    memcpy(buf, b, len);
    buf[len] = '\0';
    j->type = JSON_NUMBER;
    errno = 0;
    j->number = strtod(buf, &end);
    if (*end)
        return perr(ps, "bad number");
    if (integral) {
        errno = 0;
        j->integer = strtoll(buf, &end, 10);
        j->is_int = errno == 0 && *end == '\0';
    }
    return 0;
}

static int
append(struct json *j, struct json *item, char *key)
{
    struct json **ni = realloc(j->items, (j->len + 1) * sizeof *ni);

    if (!ni)
        return qcbt_error(ENOMEM, "out of memory");
    j->items = ni;
    if (j->type == JSON_OBJECT) {
        char **nk = realloc(j->keys, (j->len + 1) * sizeof *nk);
        if (!nk)
            return qcbt_error(ENOMEM, "out of memory");
        j->keys = nk;
        j->keys[j->len] = key;
    }
    j->items[j->len++] = item;
    return 0;
}

static int
parse_container(struct parser *ps, struct json *j, bool object)
{
    char close = object ? '}' : ']';
    int r;

    if (++ps->depth > JSON_MAX_DEPTH)
        return perr(ps, "nested too deeply");
    j->type = object ? JSON_OBJECT : JSON_ARRAY;
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        ps->depth--;
        return 0;
    }
    for (;;) {
        struct json *item = NULL;
        char *key = NULL;

        skip_ws(ps);
        if (object) {
            if (ps->p >= ps->end || *ps->p != '"')
                return perr(ps, "expected a member name");
            if ((r = parse_string(ps, &key)) < 0)
                return r;
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                free(key);
                return perr(ps, "expected ':'");
            }
            ps->p++;
        }
        if ((r = parse_value(ps, &item)) < 0) {
            free(key);
            return r;
        }
        if ((r = append(j, item, key)) < 0) {
            free(key);
            json_free(item);
            return r;
        }
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == close) {
            ps->p++;
            ps->depth--;
            return 0;
        }
        return perr(ps, object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int
literal(struct parser *ps, const char *word)
{
    size_t n = strlen(word);

    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0)
        return perr(ps, "unexpected token");
    ps->p += n;
    return 0;
}

static int
parse_value(struct parser *ps, struct json **out)
{
    struct json *j = calloc(1, sizeof *j);
    int r;

    if (!j)
        return qcbt_error(ENOMEM, "out of memory");
    skip_ws(ps);
    if (ps->p >= ps->end) {
        free(j);
        return perr(ps, "unexpected end of input");
    }
    switch (*ps->p) {
    case '{':
        r = parse_container(ps, j, true);
        break;
    case '[':
        r = parse_container(ps, j, false);
        break;
    case '"':
        j->type = JSON_STRING;
        r = parse_string(ps, &j->string);
        break;
    case 't':
        j->type = JSON_BOOL;
        j->boolean = true;
        r = literal(ps, "true");
        break;
    case 'f':
        j->type = JSON_BOOL;
        r = literal(ps, "false");
        break;
    case 'n':
        j->type = JSON_NULL;
        r = literal(ps, "null");
        break;
    default:
        r = parse_number(ps, j);
        break;
    }
    if (r < 0) {
        json_free(j);
        return r;
    }
    *out = j;
    return 0;
}

int
json_parse(const char *text, size_t len, struct json **out)
{
    struct parser ps = {text, text + len, text, 0};
    struct json *j;
    int r;

    r = parse_value(&ps, &j);
    if (r < 0)
        return r;
    skip_ws(&ps);
    if (ps.p != ps.end) {
        json_free(j);
        return perr(&ps, "trailing data");
    }
    *out = j;
    return 0;
}

void
json_free(struct json *j)
{
    size_t i;

    if (!j)
        return;
    for (i = 0; i < j->len; i++) {
        json_free(j->items[i]);
        if (j->keys)
            free(j->keys[i]);
    }
    free(j->items);
    free(j->keys);
    free(j->string);
    free(j);
}

const struct json *
json_get(const struct json *obj, const char *key)
{
    size_t i;

    if (!obj || obj->type != JSON_OBJECT)
        return NULL;
    for (i = 0; i < obj->len; i++)
        if (strcmp(obj->keys[i], key) == 0)
            return obj->items[i];
    return NULL;
}

bool
json_get_string(const struct json *obj, const char *key, const char **out)
{
    const struct json *v = json_get(obj, key);

    if (!v || v->type != JSON_STRING)
        return false;
    *out = v->string;
    return true;
}

bool
json_get_int(const struct json *obj, const char *key, int64_t *out)
{
    const struct json *v = json_get(obj, key);

    if (!v || v->type != JSON_NUMBER || !v->is_int)
        return false;
    *out = v->integer;
    return true;
}

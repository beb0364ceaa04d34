/* qcbt: a small JSON reader for our own files (backup manifests).
 *
 * Strict RFC 8259 input; bounded depth; numbers keep their exact integer
 * value when they have no fraction or exponent.  The text comes from disk
 * and is untrusted: every error is a message with line and column.
 */
#ifndef QCBT_JSON_H
#define QCBT_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JSON_MAX_DEPTH 64

enum json_type {
    JSON_NULL,
    JSON_BOOL,
    JSON_NUMBER,
    JSON_STRING,
    JSON_ARRAY,
    JSON_OBJECT,
};

struct json {
    enum json_type type;
    bool boolean;
    bool is_int; /* number without fraction/exponent, fits int64 */
    int64_t integer;
    double number;
    char *string; /* JSON_STRING (NUL-terminated, may hold no NUL) */
    size_t len;   /* items in an array / members in an object */
    struct json **items;
    char **keys; /* JSON_OBJECT: key of items[i] */
};

/* Parse TEXT (LEN bytes).  Returns 0 and *out (free with json_free) or
 * -EINVAL / -ENOMEM with a message.
 */
int json_parse(const char *text, size_t len, struct json **out);
void json_free(struct json *j);

/* Member KEY of an object, or NULL. */
const struct json *json_get(const struct json *obj, const char *key);

/* Typed member access; false if missing or of another type. */
bool json_get_string(const struct json *obj, const char *key, const char **out);
bool json_get_int(const struct json *obj, const char *key, int64_t *out);

#endif /* QCBT_JSON_H */

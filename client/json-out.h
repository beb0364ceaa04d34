/* qcbt: a minimal streaming JSON writer for --json output. */
#ifndef QCBT_CLIENT_JSON_OUT_H
#define QCBT_CLIENT_JSON_OUT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* Write S as a JSON string (quoted, escaped; invalid UTF-8 bytes become
 * U+FFFD so the output always parses).
 */
void json_string(FILE *fp, const char *s);
void json_string_n(FILE *fp, const char *s, size_t len);

#endif /* QCBT_CLIENT_JSON_OUT_H */

/* qcbt: UTF-8 as RFC 3629 defines it.
 *
 * One decoder for every place that checks or escapes text from an image
 * or a socket (bitmap names, error messages, JSON output).
 */
#ifndef QCBT_UTF8_H
#define QCBT_UTF8_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Length (1 to 4) of the valid UTF-8 sequence at P, of which N bytes may
 * be read, with its code point in *CP; or 0 when P does not start one:
 * a stray continuation byte, a truncated sequence, an overlong form, a
 * surrogate or a code point above U+10FFFF.  N must be at least 1.
 */
size_t utf8_decode(const unsigned char *p, size_t n, uint32_t *cp);

/* Are the N bytes at P valid UTF-8 (NUL included)? */
bool utf8_valid(const unsigned char *p, size_t n);

#endif /* QCBT_UTF8_H */

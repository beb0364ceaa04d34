/* qcbt: per-thread last error.
 *
 * common/ never prints and never exits.  A function that fails records a
 * one-line message naming the file, layer, offset or field at fault, and
 * returns -errno.  The caller reports qcbt_error_get() (client: "qcbt: MSG",
 * plugins: nbdkit_error).
 */
#ifndef QCBT_ERROR_H
#define QCBT_ERROR_H

#include <stdbool.h>
#include <stddef.h>

/* Record a message (printf format) and return -errnum, so that error paths
 * read "return qcbt_error(EINVAL, "...", ...);".  errnum must be > 0.
 */
int qcbt_error(int errnum, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Prefix the current message with "PREFIX: " (printf format) and return
 * -errnum.  Used when a caller knows more context, e.g. the layer.
 */
int qcbt_error_prefix(int errnum, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The last message of this thread ("" if none).  Valid until the next
 * qcbt_error*() call on this thread.
 */
const char *qcbt_error_get(void);

/* The errno recorded with the last message (0 if none). */
int qcbt_error_errno(void);

void qcbt_error_clear(void);

/* Names and strings from images (backing and data file names, formats,
 * bitmap and feature names, paths built from them) and from peers must
 * never reach a terminal or a log line raw: an ESC sequence would be run
 * by the terminal, a newline would forge a second line.  Every message
 * recorded by qcbt_error() and qcbt_error_prefix() is made safe as
 * qcbt_sanitize() says; text printed directly uses qcbt_escape().
 */

/* Copy SRCLEN bytes of SRC (untrusted, need not be NUL-terminated) into
 * DST (DSTLEN bytes) for a message: control characters (C0, DEL, C1) and
 * bytes that are not UTF-8 become '?', valid UTF-8 text passes; if it does
 * not fit, "..." marks the truncation (never inside a UTF-8 sequence).
 * DST may be SRC.  Returns DST.
 */
char *qcbt_escape(char *dst, size_t dstlen, const char *src, size_t srclen);

/* qcbt_escape() of the NUL-terminated S onto itself.  Returns S. */
char *qcbt_sanitize(char *s);

/* Whether LEN bytes of S are UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing above U+10FFFF) without a NUL byte.
 */
bool qcbt_utf8_valid(const char *s, size_t len);

#endif /* QCBT_ERROR_H */

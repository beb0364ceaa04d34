/* qcbt: per-thread last error.
 *
 * common/ never prints and never exits.  A function that fails records a
 * one-line message naming the file, layer, offset or field at fault, and
 * returns -errno.  The caller reports qcbt_error_get() (client: "qcbt: MSG",
 * plugins: nbdkit_error).
 */
#ifndef QCBT_ERROR_H
#define QCBT_ERROR_H

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

/* Copy a string from an untrusted source into dst (size dstlen) for a
 * message: control characters become '?', at most maxlen bytes are kept
 * and "..." marks a truncation.  Returns dst.
 */
char *qcbt_escape(char *dst, size_t dstlen, const char *src, size_t srclen);

#endif /* QCBT_ERROR_H */

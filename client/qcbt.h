/* qcbt: the command-line tool's shared declarations. */
#ifndef QCBT_CLIENT_QCBT_H
#define QCBT_CLIENT_QCBT_H

#include <stdbool.h>
#include <stdint.h>

/* Exit codes (documented in qcbt(1)). */
#define QCBT_EXIT_OK    0
#define QCBT_EXIT_ERROR 1 /* any error, including usage errors */
#define QCBT_EXIT_FULL  2 /* bitmap check: a full backup is needed */

int cmd_info(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_cat(int argc, char **argv);
int cmd_bitmap(int argc, char **argv);
int cmd_checkpoint(int argc, char **argv);
int cmd_commit(int argc, char **argv);
int cmd_backup(int argc, char **argv);
int cmd_restore(int argc, char **argv);
int cmd_verify(int argc, char **argv);
int cmd_import(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_convert(int argc, char **argv);

/* Print "qcbt: MSG" (printf format) on stderr, one line. */
void die_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Print the last common/ error as "qcbt: MSG" and return QCBT_EXIT_ERROR. */
int report_error(void);

struct option;

/* A usage error of COMMAND ("info", "bitmap list"): print one line,
 * "qcbt: COMMAND: MSG (see qcbt CMD --help)" where CMD is COMMAND's first
 * word, and return QCBT_EXIT_ERROR.
 */
int usage_error(const char *command, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The usage error for getopt_long() returning '?' (main() clears opterr,
 * so getopt prints nothing): an unrecognized, ambiguous or invalid short
 * option, a missing or unexpected argument, named as the user wrote it.
 * OPTSTRING and LONGOPTS are those given to getopt_long().  Returns
 * QCBT_EXIT_ERROR.
 */
int usage_getopt_error(const char *command,
                       int argc,
                       char **argv,
                       const char *optstring,
                       const struct option *longopts);

/* DIR/NAME, malloc'ed (NULL when out of memory). */
char *path_join(const char *dir, const char *name);

/* Parse a size with an optional K/M/G/T suffix (powers of 1024) or a
 * plain number of bytes.  Returns 0 or -1.
 */
int parse_size(const char *s, uint64_t *out);

#endif /* QCBT_CLIENT_QCBT_H */

/* qcbt: importing a virtnbdbackup backup set (cmd-import.c). */
#ifndef QCBT_CLIENT_VNB_IMPORT_H
#define QCBT_CLIENT_VNB_IMPORT_H

#include <stdbool.h>

enum vnb_import_output {
    VNB_IMPORT_QUIET, /* print nothing, no notices either */
    VNB_IMPORT_TEXT,  /* one line per backup, then a summary */
    VNB_IMPORT_JSON,  /* one JSON object */
};

/* Import the set of disk DISK (NULL: the only disk) in directory SRC into
 * a new qcbt backup directory DEST (which must not exist, or be empty).
 * Returns 0, or -errno with a message; on error DEST is not created.
 */
int vnb_import(const char *src,
               const char *disk,
               const char *dest,
               enum vnb_import_output output);

/* True when DIR has no qcbt manifest and holds virtnbdbackup data files
 * (*.data): restore and verify then read it through vnb_import_temp().
 */
bool vnb_is_set(const char *dir);

/* Import the set in SRC (disk DISK, or the only one) into a new directory
 * under $TMPDIR (default /var/tmp).  Returns 0 and *OUT (the directory,
 * malloc'ed: remove and free it with vnb_temp_free()) or -errno with a
 * message (nothing is left behind).
 */
int vnb_import_temp(const char *src, const char *disk, char **out);

/* Remove the directory vnb_import_temp() made (NULL: no-op) and free
 * DIR.
 */
void vnb_temp_free(char *dir);

/* Remove what an import under way, or vnb_import_temp()'s directory,
 * has put on disk: called from a fatal signal's handler (it is
 * async-signal-safe) before the signal is raised again.
 */
void vnb_signal_cleanup(void);

/* Install a handler for SIGINT, SIGTERM and SIGHUP that calls
 * vnb_signal_cleanup() and dies of the signal.
 */
void vnb_catch_signals(void);

#endif /* QCBT_CLIENT_VNB_IMPORT_H */

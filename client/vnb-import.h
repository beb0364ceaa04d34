/* qcbt: importing a virtnbdbackup backup set (cmd-import.c). */
#ifndef QCBT_CLIENT_VNB_IMPORT_H
#define QCBT_CLIENT_VNB_IMPORT_H

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

#endif /* QCBT_CLIENT_VNB_IMPORT_H */

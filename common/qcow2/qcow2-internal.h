/* qcbt: qcow2 reader internals shared between its source files. */
#ifndef QCBT_QCOW2_INTERNAL_H
#define QCBT_QCOW2_INTERNAL_H

#include "qcow2.h"

int qcow2_l2_cache_new(struct qcow2_image *img);
void qcow2_l2_cache_free(struct qcow2_image *img);

#endif /* QCBT_QCOW2_INTERNAL_H */

/* qcbt: scope-bound cleanup helpers (GNU C cleanup attribute). */
#ifndef QCBT_CLEANUP_H
#define QCBT_CLEANUP_H

#include <stdlib.h>
#include <unistd.h>

static inline void
cleanup_free(void *ptr)
{
    free(*(void **)ptr);
}
#define CLEANUP_FREE __attribute__((cleanup(cleanup_free)))

static inline void
cleanup_close(int *fd)
{
    if (*fd >= 0)
        close(*fd);
}
#define CLEANUP_CLOSE __attribute__((cleanup(cleanup_close)))

#endif /* QCBT_CLEANUP_H */

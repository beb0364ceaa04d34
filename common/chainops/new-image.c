/* qcbt: a new qcow2 image with persistent bitmaps (see new-image.h). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "error.h"
#include "io.h"
#include "new-image.h"
#include "qcow2-bitmaps.h"
#include "qcow2-format.h"
#include "qcow2-store.h"
#include "rounding.h"

struct new_image {
    char *path;
    int fd;                  /* the file as created; -1 once closed */
    struct qcbt_io *lock_io; /* wraps fd, holds the WRITE lock */
    struct qcow2_image *img; /* after new_image_open() */
    dev_t dev;
    ino_t ino;
};

/* A new io on the same open file description (and so the same locks). */
static int
dup_io(struct new_image *ni, struct qcbt_io **out)
{
    int fd = fcntl(ni->fd, F_DUPFD_CLOEXEC, 0);

    if (fd < 0)
        return qcbt_error(errno, "%s: dup: %s", ni->path, strerror(errno));
    return qcbt_io_open_fd(fd, ni->path, out);
}

int
new_image_create(const char *path, struct new_image **out)
{
    struct new_image *ni;
    struct stat st;
    int fd, r;

    *out = NULL;
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) {
        if (errno == EEXIST)
            return qcbt_error(EEXIST,
                              "%s: already exists (qcbt creates a new file "
                              "and never overwrites one)",
                              path);
        return qcbt_error(errno, "%s: %s", path, strerror(errno));
    }
    if (fstat(fd, &st) < 0) {
        r = qcbt_error(errno, "%s: fstat: %s", path, strerror(errno));
        close(fd);
        unlink(path); /* just created by us */
        return r;
    }
    ni = calloc(1, sizeof *ni);
    if (!ni || !(ni->path = strdup(path))) {
        free(ni);
        close(fd);
        unlink(path);
        return qcbt_error(ENOMEM, "out of memory");
    }
    ni->fd = fd;
    ni->dev = st.st_dev;
    ni->ino = st.st_ino;
    r = dup_io(ni, &ni->lock_io);
    if (r == 0)
        r = qcbt_io_lock(ni->lock_io, QCBT_IO_LOCK_WRITE);
    if (r < 0)
        goto fail;
    *out = ni;
    return 0;
fail:
    new_image_discard(ni);
    return r;
}

int
new_image_writer(struct new_image *ni,
                 const struct qcow2_writer_opts *opts,
                 struct qcow2_writer **out)
{
    struct qcbt_io *io;
    int r = dup_io(ni, &io);

    *out = NULL;
    if (r < 0)
        return r;
    return qcow2_writer_create_io(io, opts, out);
}

int
new_image_open(struct new_image *ni)
{
    struct qcbt_io *io;
    int r;

    if (ni->img)
        return qcbt_error(EINVAL, "%s: already open", ni->path);
    r = dup_io(ni, &io);
    if (r == 0)
        r = qcow2_open(io, &ni->img); /* owns io */
    return r;
}

struct qcow2_image *
new_image_qcow2(struct new_image *ni)
{
    return ni->img;
}

int
new_image_add_bitmap(struct new_image *ni,
                     const char *name,
                     unsigned gbits,
                     bool enabled,
                     const struct bitmap *content)
{
    struct bitmap *fit = NULL;
    int r;

    if (!ni->img)
        return qcbt_error(EINVAL, "%s: not open", ni->path);
    r = qcow2_bitmap_modify(ni->img, QCOW2_BITMAP_ADD, name, gbits, !enabled);
    if (r < 0 || !content || bitmap_count(content) == 0)
        return r;
    /* qcow2_bitmap_merge() wants the image's size (QEMU's rule). */
    if (content->size != ni->img->size) {
        r = bitmap_new(ni->img->size, content->granularity, &fit);
        if (r < 0)
            return r;
        bitmap_merge_into(fit, content);
        content = fit;
    }
    r = qcow2_bitmap_merge(ni->img, name, content);
    bitmap_free(fit);
    return r;
}

void
new_image_reserve_bitmap(struct new_image_reserve *rv,
                         const char *name,
                         uint64_t granularity)
{
    struct qcow2_bitmap_dir_entry e = {.name_size = (uint16_t)strlen(name)};
    uint64_t entries =
        qcow2_bitmap_table_size_needed(rv->size,
                                       rv->cluster_size,
                                       (unsigned)__builtin_ctzll(granularity));

    /* add: a table; merge: a new table and the data clusters. */
    rv->clusters += 2 * DIV_ROUND_UP(entries * 8, rv->cluster_size) + entries;
    rv->dir_bytes += qcow2_bitmap_dir_entry_size(&e);
    rv->nr++;
}

uint64_t
new_image_reserve_total(const struct new_image_reserve *rv)
{
    /* Each bitmap's add and merge write the whole directory anew. */
    return rv->clusters +
           rv->nr * 2 * DIV_ROUND_UP(rv->dir_bytes, rv->cluster_size);
}

/* fsync the directory holding PATH, so that its new name is durable. */
static int
sync_dir(const char *path)
{
    char *copy = strdup(path);
    int fd, r = 0;

    if (!copy)
        return qcbt_error(ENOMEM, "out of memory");
    fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) < 0)
        r = qcbt_error(errno,
                       "%s: syncing its directory: %s",
                       path,
                       strerror(errno));
    if (fd >= 0)
        close(fd);
    free(copy);
    return r;
}

int
new_image_finish(struct new_image *ni)
{
    int r = 0;

    if (!ni->img)
        r = qcbt_error(EINVAL, "%s: not open", ni->path);
    if (r == 0)
        r = qcbt_io_flush(ni->img->io);
    if (r == 0 && fsync(ni->fd) < 0)
        r = qcbt_error(errno, "%s: fsync: %s", ni->path, strerror(errno));
    if (r == 0)
        r = sync_dir(ni->path);
    if (r < 0) {
        new_image_discard(ni);
        return r;
    }
    qcow2_close(ni->img);
    qcbt_io_close(ni->lock_io); /* a dup: closing it cannot fail a write */
    close(ni->fd);
    free(ni->path);
    free(ni);
    return 0;
}

void
new_image_discard(struct new_image *ni)
{
    struct stat st;

    if (!ni)
        return;
    qcow2_close(ni->img);
    /* Remove the name only while it is still the file we created. */
    if (stat(ni->path, &st) == 0 && st.st_dev == ni->dev &&
        st.st_ino == ni->ino)
        unlink(ni->path);
    qcbt_io_free(ni->lock_io);
    if (ni->fd >= 0)
        close(ni->fd);
    free(ni->path);
    free(ni);
}

/* nbdkit-qcbt-filter: decode a qcow2 image from the bytes of the
 * underlying plugin (file, curl, ssh, nbd, memory, ...) and serve its guest
 * view read-only, with base:allocation extents or, with bitmap=NAME, the
 * merged dirty view.  Glue between nbdkit's filter API and common/; see
 * nbdkit-qcbt-filter.pod.
 *
 * Contexts into the plugin.  The image metadata (header, L1 table,
 * extensions, bitmap directories and the merged bitmap) is read once, in
 * .after_fork, through a shared context opened with
 * nbdkit_next_context_open() and closed again when done; the result is
 * immutable and shared by every connection.  Afterwards every byte (guest
 * data, L2 tables, compressed clusters) is read through the next context
 * of the connection that asked for it: the request's thread records its
 * next in a thread-local variable that the qcbt_io callbacks use.  So the
 * plugin sees the thread model nbdkit negotiated for it (each connection
 * is its own client of the plugin, e.g. one upstream NBD connection each
 * with the nbd plugin), and nothing is parsed per connection.
 *
 * Both contexts open the plugin's default export (""), whatever export
 * name the client asked for, so that data and metadata always come from
 * the same image.  .prepare checks that the image still has the size it
 * had at start.
 *
 * When the view cannot be built nbdkit exits, except under nbdkit --run,
 * where that would leave the command waiting for ever: connections are
 * refused instead (refuse_instead_of_exit()).
 */
#include <nbdkit-filter.h>

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chain.h"
#include "error.h"
#include "minmax.h"
#include "qcbt-view.h"
#include "qcow2.h"

#ifndef QCBT_VERSION
#define QCBT_VERSION "unknown"
#endif

/* Debug flags: -D qcbt.extents=1 logs every extent reported, -D
 * qcbt.reads=1 every read request, -D qcbt.io=1 every read and cache
 * request sent to the plugin.
 */
NBDKIT_DLL_PUBLIC int qcbt_debug_extents;
NBDKIT_DLL_PUBLIC int qcbt_debug_reads;
NBDKIT_DLL_PUBLIC int qcbt_debug_io;

/* Longest request sent to the plugin (the NBD maximum many servers take). */
#define NEXT_MAX_REQUEST (32u * 1024 * 1024)

/* The name the top layer carries in messages. */
#define NEXT_NAME "the underlying plugin"

/* Parameters. */
static char *backing_dir; /* backing-dir=, absolute; owned; NULL = none */
static struct qcbt_view_opts vopts;

/* Built in .after_fork, immutable until .cleanup. */
static struct qcbt_view view;
static bool view_ready;
static uint64_t next_size; /* size of the plugin's image at start */

/* Set in .after_fork when the view could not be built but nbdkit must keep
 * running to refuse connections (see refuse_instead_of_exit()).
 */
static bool view_failed;

/* The next context the current thread's request reads through. */
static __thread nbdkit_next *cur_next;

static void
qcbt_filter_unload(void)
{
    free(backing_dir);
    backing_dir = NULL;
}

static int
qcbt_filter_config(nbdkit_next_config *next,
                   nbdkit_backend *nxdata,
                   const char *key,
                   const char *value)
{
    int r = qcbt_view_config(&vopts, key, value);

    if (r != 0)
        return r < 0 ? -1 : 0;
    if (strcmp(key, "backing-dir") == 0) {
        free(backing_dir);
        backing_dir = nbdkit_absolute_path(value);
        return backing_dir ? 0 : -1;
    }
    return next(nxdata, key, value);
}

static int
qcbt_filter_config_complete(nbdkit_next_config_complete *next,
                            nbdkit_backend *nxdata)
{
    if (qcbt_view_config_complete(&vopts) < 0)
        return -1;
    return next(nxdata);
}

#define qcbt_filter_config_help                                           \
    QCBT_VIEW_CONFIG_HELP "\n"                                            \
                          "backing-dir=DIR      Open backing files from " \
                          "local DIR (default: none\n"                    \
                          "                     allowed)."

/* --- the top layer's I/O: through the current next context --------------- */

static ssize_t
next_io_pread(void *opaque, void *buf, size_t count, uint64_t offset)
{
    nbdkit_next *next = cur_next;
    size_t done = 0;
    int err = 0;

    if (!next)
        return -EIO; /* not inside a request: cannot happen */
    if (offset >= next_size)
        return 0;
    count = MIN((uint64_t)count, next_size - offset);
    if (qcbt_debug_io)
        nbdkit_debug("next pread count=%zu offset=%" PRIu64, count, offset);
    while (done < count) {
        uint32_t n = (uint32_t)MIN(count - done, (size_t)NEXT_MAX_REQUEST);

        if (next->pread(next, (char *)buf + done, n, offset + done, 0, &err) ==
            -1)
            return -(err ? err : EIO);
        done += n;
    }
    return (ssize_t)done;
}

/* Writes stay inside the plugin's size (a plugin's disk does not grow)
 * and need a plugin that can write: nbdkit asserts can_write before a
 * pwrite reaches the plugin.  No write path of the filter uses them yet
 * (it is read-only); they are here so that the image engine writes
 * through one interface whatever holds the image.
 */
static ssize_t
next_io_pwrite(void *opaque, const void *buf, size_t count, uint64_t offset)
{
    nbdkit_next *next = cur_next;
    size_t done = 0;
    int err = 0;

    if (!next)
        return -EIO;
    if (next->can_write(next) != 1)
        return -EROFS;
    if (offset > next_size || count > next_size - offset)
        return -ENOSPC;
    while (done < count) {
        uint32_t n = (uint32_t)MIN(count - done, (size_t)NEXT_MAX_REQUEST);

        if (next->pwrite(next,
                         (const char *)buf + done,
                         n,
                         offset + done,
                         0,
                         &err) == -1)
            return -(err ? err : EIO);
        done += n;
    }
    return (ssize_t)done;
}

static int
next_io_flush(void *opaque)
{
    nbdkit_next *next = cur_next;
    int err = 0;

    if (!next)
        return -EIO;
    if (next->can_flush(next) != 1)
        return 0; /* nothing the plugin could make more durable */
    if (next->flush(next, 0, &err) == -1)
        return -(err ? err : EIO);
    return 0;
}

/* No lock op: the next plugin's storage is not a file qcbt can lock. */
static const struct qcbt_io_ops next_io_ops = {
    .pread = next_io_pread,
    .pwrite = next_io_pwrite,
    .flush = next_io_flush,
};

/* Send one cache (prefetch) request for host bytes [offset, offset+len). */
static int
next_cache(nbdkit_next *next, uint64_t offset, uint64_t len, int *err)
{
    if (offset >= next_size)
        return 0;
    len = MIN(len, next_size - offset);
    while (len > 0) {
        uint32_t n = (uint32_t)MIN(len, (uint64_t)NEXT_MAX_REQUEST);

        if (qcbt_debug_io)
            nbdkit_debug("next cache count=%" PRIu32 " offset=%" PRIu64,
                         n,
                         offset);
        if (next->cache(next, n, offset, 0, err) == -1)
            return -1;
        offset += n;
        len -= n;
    }
    return 0;
}

/* --- building the view once ------------------------------------------------
 */

/* Listening sockets we look for; nbdkit binds one or two (IPv4, IPv6). */
#define MAX_LISTEN_SOCKETS 16

/* Should a failed .after_fork refuse connections rather than exit?
 *
 * nbdkit --run forks after binding its socket: the parent runs the
 * command, the child (this process) serves.  Both hold the listening
 * socket, and the parent never closes its copy.  If the child exits
 * (nbdkit exits when .after_fork fails) the command's connections are
 * queued on the parent's copy, which nobody accepts: the command, and so
 * nbdkit --run, waits forever.  The same holds for any parent that shares
 * the socket with us (socket activation).
 * So when our parent holds one of our listening sockets we stay and refuse
 * every connection, which ends the command with an error; otherwise
 * (-f, a daemon, -s) nbdkit exits as it always did.
 *
 * Linux /proc; where the parent's descriptors cannot be read, false.
 */
static bool
refuse_instead_of_exit(void)
{
    struct stat mine[MAX_LISTEN_SOCKETS], st;
    size_t n = 0, i;
    bool shared = false;
    struct dirent *de;
    char path[64];
    DIR *d;

    d = opendir("/proc/self/fd");
    if (!d)
        return false;
    while (n < MAX_LISTEN_SOCKETS && (de = readdir(d)) != NULL) {
        int acc = 0, fd;
        socklen_t len = sizeof acc;
        char *end;

        errno = 0;
        fd = (int)strtol(de->d_name, &end, 10);
        if (de->d_name[0] < '0' || de->d_name[0] > '9' || *end || errno ||
            fd == dirfd(d))
            continue;
        if (fstat(fd, &st) == -1 || !S_ISSOCK(st.st_mode) ||
            getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &len) == -1 || !acc)
            continue;
        mine[n++] = st;
    }
    closedir(d);
    if (n == 0)
        return false;

    snprintf(path, sizeof path, "/proc/%ld/fd", (long)getppid());
    d = opendir(path);
    if (!d)
        return false;
    while (!shared && (de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' ||
            fstatat(dirfd(d), de->d_name, &st, 0) == -1 ||
            !S_ISSOCK(st.st_mode))
            continue;
        for (i = 0; i < n; i++)
            if (st.st_dev == mine[i].st_dev && st.st_ino == mine[i].st_ino)
                shared = true;
    }
    closedir(d);
    return shared;
}

/* Read the metadata through a context of its own and build the view.
 * 0, or -1 with the reason reported.
 */
static int
build_view(nbdkit_backend *backend)
{
    struct chain_open_opts copts = {.format = "qcow2"};
    nbdkit_next *next;
    struct qcbt_io *io = NULL;
    struct chain *c = NULL;
    int64_t size;
    int r = -1;

    next = nbdkit_next_context_open(backend, 1, "", 1);
    if (!next) {
        nbdkit_error("qcbt: cannot open the underlying plugin");
        return -1;
    }
    if (next->prepare(next) == -1) {
        nbdkit_next_context_close(next);
        return -1;
    }
    size = next->get_size(next);
    if (size == -1)
        goto out;
    next_size = (uint64_t)size;

    cur_next = next;
    if (qcbt_io_new(&next_io_ops, NULL, next_size, NEXT_NAME, &io) < 0 ||
        chain_open_io(io,
                      "qcow2",
                      backing_dir ? backing_dir : NULL,
                      &copts,
                      &c) < 0) {
        /* chain_open_io owns io from the call on, success or not. */
        nbdkit_error("qcbt: %s%s",
                     qcbt_error_get(),
                     qcbt_error_errno() == EPERM && !backing_dir
                         ? " (give backing-dir=DIR to open backing files "
                           "from a local directory)"
                         : "");
        goto out;
    }
    if (qcbt_view_init(&view, c, &vopts, NEXT_NAME) < 0)
        goto out;
    view_ready = true;
    r = 0;
out:
    cur_next = NULL;
    next->finalize(next);
    nbdkit_next_context_close(next);
    return r;
}

static int
qcbt_filter_after_fork(nbdkit_backend *backend)
{
    if (build_view(backend) == 0)
        return 0;
    if (!refuse_instead_of_exit())
        return -1;
    nbdkit_debug("qcbt: our parent (nbdkit --run) shares the listening "
                 "socket: refusing connections instead of exiting");
    view_failed = true;
    return 0;
}

static void
qcbt_filter_cleanup(nbdkit_backend *backend)
{
    if (view_ready)
        qcbt_view_free(&view);
    view_ready = false;
}

/* --- per connection ------------------------------------------------------- */

static void *
qcbt_filter_open(nbdkit_next_open *next,
                 nbdkit_context *context,
                 int readonly,
                 const char *exportname,
                 int is_tls)
{
    /* The reason was logged when nbdkit started: one line per client. */
    if (view_failed) {
        nbdkit_error("qcbt: the image could not be opened when nbdkit "
                     "started (see the first error): refusing the "
                     "connection");
        return NULL;
    }
    /* Read-only, and the default export: see the top of the file. */
    if (next(context, 1, "") == -1)
        return NULL;
    return NBDKIT_HANDLE_NOT_NEEDED;
}

static int
qcbt_filter_prepare(nbdkit_next *next, void *handle, int readonly)
{
    int64_t size = next->get_size(next);

    if (size == -1)
        return -1;
    if (!view_ready) {
        nbdkit_error("qcbt: the image was not opened");
        return -1;
    }
    if ((uint64_t)size != next_size) {
        nbdkit_error("qcbt: the underlying image changed size since nbdkit "
                     "started (%" PRIu64 " -> %" PRId64 " bytes); restart "
                     "nbdkit",
                     next_size,
                     size);
        return -1;
    }
    return 0;
}

static int64_t
qcbt_filter_get_size(nbdkit_next *next, void *handle)
{
    return (int64_t)view.size;
}

static const char *
qcbt_filter_export_description(nbdkit_next *next, void *handle)
{
    return view.description;
}

static int
qcbt_filter_block_size(nbdkit_next *next,
                       void *handle,
                       uint32_t *minimum,
                       uint32_t *preferred,
                       uint32_t *maximum)
{
    qcbt_view_block_size(&view, minimum, preferred, maximum);
    return 0;
}

/* Read-only: no write, flush, trim, zero or FUA, whatever the plugin can. */
static int
qcbt_filter_can_write(nbdkit_next *next, void *handle)
{
    return 0;
}

static int
qcbt_filter_can_flush(nbdkit_next *next, void *handle)
{
    return 0;
}

static int
qcbt_filter_can_trim(nbdkit_next *next, void *handle)
{
    return 0;
}

static int
qcbt_filter_can_zero(nbdkit_next *next, void *handle)
{
    return NBDKIT_ZERO_NONE;
}

static int
qcbt_filter_can_fast_zero(nbdkit_next *next, void *handle)
{
    return 0;
}

static int
qcbt_filter_can_fua(nbdkit_next *next, void *handle)
{
    return NBDKIT_FUA_NONE;
}

static int
qcbt_filter_can_extents(nbdkit_next *next, void *handle)
{
    return 1;
}

/* Immutable view, read-only: every connection sees the same bytes. */
static int
qcbt_filter_can_multi_conn(nbdkit_next *next, void *handle)
{
    return 1;
}

/* A guest prefetch becomes prefetches of the host ranges behind it in the
 * top layer, so we can cache natively exactly when the plugin can cache
 * at all (natively or by its own emulation).
 */
static int
qcbt_filter_can_cache(nbdkit_next *next, void *handle)
{
    int r = next->can_cache(next);

    if (r == -1)
        return -1;
    return r == NBDKIT_CACHE_NONE ? NBDKIT_CACHE_NONE : NBDKIT_CACHE_NATIVE;
}

static int
qcbt_filter_pread(nbdkit_next *next,
                  void *handle,
                  void *buf,
                  uint32_t count,
                  uint64_t offset,
                  uint32_t flags,
                  int *err)
{
    int r;

    cur_next = next;
    r = qcbt_view_pread(&view, buf, count, offset);
    cur_next = NULL;
    if (r < 0) {
        *err = -r;
        return -1;
    }
    return 0;
}

static int
qcbt_filter_extents(nbdkit_next *next,
                    void *handle,
                    uint32_t count,
                    uint64_t offset,
                    uint32_t flags,
                    struct nbdkit_extents *ex,
                    int *err)
{
    int r;

    cur_next = next; /* L2 tables are read on demand */
    r = qcbt_view_extents(&view,
                          count,
                          offset,
                          flags & NBDKIT_FLAG_REQ_ONE,
                          ex);
    cur_next = NULL;
    if (r < 0) {
        *err = -r;
        return -1;
    }
    return 0;
}

/* Prefetch the host bytes of the top layer behind guest [offset, +count):
 * data clusters and compressed clusters, adjacent host ranges coalesced.
 * Zero and unallocated ranges have nothing to fetch here; backing layers
 * are local files.  Mapping reads the L2 tables, which warms them too.
 */
static int
qcbt_filter_cache(nbdkit_next *next,
                  void *handle,
                  uint32_t count,
                  uint64_t offset,
                  uint32_t flags,
                  int *err)
{
    struct qcow2_image *img = view.chain->layers[0].qcow2;
    uint64_t end = MIN(offset + count, img->size);
    uint64_t run_start = 0, run_end = 0; /* pending host range */
    int r = 0;

    cur_next = next;
    while (offset < end) {
        struct qcow2_extent e;
        uint64_t host = 0, len = 0;

        if (qcow2_map(img, offset, end - offset, &e) < 0) {
            nbdkit_error("%s", qcbt_error_get());
            *err = qcbt_error_errno() ? qcbt_error_errno() : EIO;
            r = -1;
            break;
        }
        if (e.kind == QCOW2_DATA) {
            host = e.host_offset;
            len = e.len;
        } else if (e.kind == QCOW2_COMPRESSED) {
            if (qcow2_decode_compressed(img, e.l2_entry, &host, &len) < 0) {
                nbdkit_error("%s", qcbt_error_get());
                *err = EIO;
                r = -1;
                break;
            }
        }
        if (len > 0) {
            if (run_end > run_start && host == run_end) {
                run_end += len;
            } else {
                if (run_end > run_start &&
                    next_cache(next, run_start, run_end - run_start, err) ==
                        -1) {
                    r = -1;
                    break;
                }
                run_start = host;
                run_end = host + len;
            }
        }
        offset += e.len;
    }
    if (r == 0 && run_end > run_start)
        r = next_cache(next, run_start, run_end - run_start, err);
    cur_next = NULL;
    return r;
}

static struct nbdkit_filter filter = {
    .name = "qcbt",
    .longname = "qcbt qcow2 decoding filter",
    .description = "Decode a qcow2 image from the underlying plugin's bytes "
                   "and serve its guest view read-only, with its merged "
                   "dirty bitmap as extents",
    .unload = qcbt_filter_unload,
    .config = qcbt_filter_config,
    .config_complete = qcbt_filter_config_complete,
    .config_help = qcbt_filter_config_help,
    .after_fork = qcbt_filter_after_fork,
    .cleanup = qcbt_filter_cleanup,
    .open = qcbt_filter_open,
    .prepare = qcbt_filter_prepare,
    .get_size = qcbt_filter_get_size,
    .export_description = qcbt_filter_export_description,
    .block_size = qcbt_filter_block_size,
    .can_write = qcbt_filter_can_write,
    .can_flush = qcbt_filter_can_flush,
    .can_trim = qcbt_filter_can_trim,
    .can_zero = qcbt_filter_can_zero,
    .can_fast_zero = qcbt_filter_can_fast_zero,
    .can_fua = qcbt_filter_can_fua,
    .can_extents = qcbt_filter_can_extents,
    .can_multi_conn = qcbt_filter_can_multi_conn,
    .can_cache = qcbt_filter_can_cache,
    .pread = qcbt_filter_pread,
    .extents = qcbt_filter_extents,
    .cache = qcbt_filter_cache,
};

NBDKIT_REGISTER_FILTER(filter)

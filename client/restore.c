/* qcbt restore and qcbt verify: read a backup chain back, to a raw file, a
 * qcow2 file or an NBD export, and prove it equals what was backed up.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libnbd.h>

#include "chain.h"
#include "digest.h"
#include "error.h"
#include "manifest.h"
#include "minmax.h"
#include "nbd-connect.h"
#include "qcbt.h"
#include "qcow2-writer.h"
#include "rounding.h"
#include "vnb-import.h"

#define RCHUNK   (4u * 1024 * 1024) /* multiple of DIGEST_BLOCK */
#define RTHREADS 2

static int
parse_index(const char *s, long *out)
{
    char *end;

    errno = 0;
    *out = strtol(s, &end, 10);
    return (errno || end == s || *end || *out < 0) ? -1 : 0;
}

/* DIR's manifest.  A missing manifest is an empty one for backup (a new
 * DIR); here DIR must exist, and its absence is the system's error.
 */
static int
load_dir(const char *dir, struct manifest *m)
{
    struct stat st;

    if (stat(dir, &st) < 0)
        return qcbt_error(errno, "%s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return qcbt_error(ENOTDIR, "%s: %s", dir, strerror(ENOTDIR));
    return manifest_load(dir, m);
}

/* Open backup N of DIR (N < 0: the newest). */
static int
open_backup(const char *dir,
            struct manifest *m,
            long at,
            struct chain **c,
            const struct backup_entry **e)
{
    struct chain_open_opts co = {.format = "qcow2"};
    char *path;
    int r;

    if (load_dir(dir, m) < 0)
        return -1;
    if (m->nr == 0) {
        qcbt_error(ENOENT, "%s: no backups (no %s)", dir, MANIFEST_NAME);
        return -1;
    }
    if (at < 0)
        at = m->nr - 1;
    if ((size_t)at >= m->nr) {
        qcbt_error(EINVAL, "%s: no backup %ld (there are %zu)", dir, at, m->nr);
        return -1;
    }
    *e = &m->backups[at];
    path = path_join(dir, (*e)->file);
    if (!path) {
        qcbt_error(ENOMEM, "out of memory");
        return -1;
    }
    r = chain_open(path, &co, c);
    free(path);
    return r < 0 ? -1 : 0;
}

/* ---- restore ------------------------------------------------------------ */

/* Where the disk goes.  A file (raw or qcow2) is written under a temporary
 * name in OUT's directory and renamed to OUT only when it is complete,
 * durable and equal to the backup's digest: a failed restore leaves
 * nothing behind and never touches an existing OUT (which only --force
 * replaces, and only on success).  A block device or an NBD export cannot
 * be renamed: it is written in place, zeros included, and a failure leaves
 * it partly written.
 */
enum target { T_FILE_RAW, T_FILE_QCOW2, T_BLOCK, T_NBD };

/* Zero detection: all-zero aligned blocks of a data extent are holes in a
 * new raw file (4 KiB, as qemu-img convert's default -S), unallocated
 * clusters in a new qcow2 (a cluster), write-zeroes requests on a device
 * or an export (64 KiB, so they do not fragment the writes).
 */
#define ZBLOCK_FILE    4096u
#define ZBLOCK_INPLACE (64u * 1024)

/* Writeback: each worker starts writeback of every chunk it writes and
 * waits for the oldest once WB_CHUNKS are in flight (2 x 32 x 4 MiB), so
 * the final fsync has little left and the page cache does not fill with
 * the restore.
 */
#define WB_CHUNKS 32

struct rjob {
    struct chain *c;
    enum target t;
    const char *out; /* as the user named it, for messages */
    uint32_t zblock;
    int fd;                 /* T_FILE_RAW (the temporary file), T_BLOCK */
    struct qcow2_writer *w; /* T_FILE_QCOW2 */
    struct nbd_handle *nbd; /* T_NBD */
    pthread_mutex_t lock;   /* the writer, the NBD handle and what follows */
    uint64_t next;          /* next chunk to take */
    struct gdigest dg;
    uint64_t data_bytes; /* written as data */
    bool touched;        /* an in-place target has been written to */
    int err;
    char msg[512];
};

struct wbring {
    uint64_t off[WB_CHUNKS], len[WB_CHUNKS];
    unsigned head, nr;
};

/* The temporary file while it exists, for the signal handler. */
static char *volatile restore_tmp;

static void
restore_on_signal(int sig)
{
    char *p = restore_tmp;

    if (p)
        unlink(p);
    vnb_signal_cleanup();
    signal(sig, SIG_DFL);
    raise(sig);
}

static void
job_fail(struct rjob *j, const char *msg)
{
    pthread_mutex_lock(&j->lock);
    if (!j->err) {
        j->err = 1;
        snprintf(j->msg, sizeof j->msg, "%s", msg);
    }
    pthread_mutex_unlock(&j->lock);
}

static void
job_touched(struct rjob *j)
{
    pthread_mutex_lock(&j->lock);
    j->touched = true;
    pthread_mutex_unlock(&j->lock);
}

static bool
is_zero(const unsigned char *p, size_t len)
{
    return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
}

static int
pwrite_all(struct rjob *j, const unsigned char *buf, size_t n, uint64_t off)
{
    size_t done = 0;

    while (done < n) {
        ssize_t w = pwrite(j->fd, buf + done, n - done, off + done);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return qcbt_error(errno,
                              "%s: write at offset %" PRIu64 ": %s",
                              j->out,
                              off + done,
                              strerror(errno));
        }
        done += w;
    }
    return 0;
}

static int
put_data(struct rjob *j, const unsigned char *buf, size_t n, uint64_t off)
{
    int r = 0;

    switch (j->t) {
    case T_FILE_RAW:
        return pwrite_all(j, buf, n, off);
    case T_BLOCK:
        job_touched(j);
        return pwrite_all(j, buf, n, off);
    case T_FILE_QCOW2:
        pthread_mutex_lock(&j->lock);
        r = qcow2_writer_write(j->w, buf, n, off);
        pthread_mutex_unlock(&j->lock);
        return r;
    case T_NBD:
        pthread_mutex_lock(&j->lock);
        j->touched = true;
        if (nbd_pwrite(j->nbd, buf, n, off, 0) < 0)
            r = qcbt_error(EIO,
                           "%s: NBD write at offset %" PRIu64 ": %s",
                           j->out,
                           off,
                           nbd_get_error());
        pthread_mutex_unlock(&j->lock);
        return r;
    }
    return 0;
}

/* Zeros on a block device: the kernel's zeroout when it has one, else
 * written.
 */
static int
zero_block(struct rjob *j, uint64_t off, uint64_t n)
{
    static unsigned char zeros[1024 * 1024]; /* .bss, never written */
    int r;

    job_touched(j);
    if (fallocate(j->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, n) ==
        0)
        return 0;
    while (n > 0) {
        size_t k = MIN((uint64_t)sizeof zeros, n);

        if ((r = pwrite_all(j, zeros, k, off)) < 0)
            return r;
        off += k;
        n -= k;
    }
    return 0;
}

static int
put_zero(struct rjob *j, uint64_t off, uint64_t n)
{
    int r = 0;

    switch (j->t) {
    case T_FILE_RAW:
    case T_FILE_QCOW2:
        /* A new file: a hole, or a cluster never written, reads as zeros
         * (the qcow2 has no backing file). */
        return 0;
    case T_BLOCK:
        return zero_block(j, off, n);
    case T_NBD:
        /* An export holds old data: zero it explicitly. */
        pthread_mutex_lock(&j->lock);
        j->touched = true;
        if (nbd_zero(j->nbd, n, off, 0) < 0)
            r = qcbt_error(EIO,
                           "%s: NBD write-zeroes at offset %" PRIu64 ": %s",
                           j->out,
                           off,
                           nbd_get_error());
        pthread_mutex_unlock(&j->lock);
        return r;
    }
    return 0;
}

/* Guest bytes BUF[0..len) at OFF, cut into runs of all-zero and other
 * blocks of j->zblock (aligned to the disk): the zero runs go to
 * put_zero(), the rest to put_data().
 */
static int
put_runs(struct rjob *j,
         const unsigned char *buf,
         uint64_t off,
         uint64_t len,
         uint64_t *written)
{
    uint64_t pos = off, end = off + len, start = off;
    bool zero = false;
    int r;

    while (pos <= end) {
        uint64_t next =
            MIN(ROUND_DOWN(pos, (uint64_t)j->zblock) + j->zblock, end);
        bool z = pos < end && is_zero(buf + (pos - off), next - pos);

        if (pos > start && (pos == end || z != zero)) {
            if (zero)
                r = put_zero(j, start, pos - start);
            else {
                r = put_data(j, buf + (start - off), pos - start, start);
                *written += pos - start;
            }
            if (r < 0)
                return r;
            start = pos;
        }
        if (pos == end)
            break;
        zero = z;
        pos = next;
    }
    return 0;
}

/* Guest range [off, off+n) of the chain (OFF sector aligned), read into
 * BUF where it holds data: zero extents become put_zero(), data extents
 * are read, added to the digest D and written by put_runs().  Extents are
 * cut on sector boundaries so that the digest sees whole sectors: a zero
 * extent keeps its whole sectors, the rest is read as data.
 */
static int
restore_range(struct rjob *j,
              unsigned char *buf,
              uint64_t off,
              uint64_t n,
              struct gdigest *d,
              uint64_t *written)
{
    uint64_t pos = off, end = off + n;
    int r;

    while (pos < end) {
        struct chain_status st;
        uint64_t len;

        if ((r = chain_block_status(j->c, pos, end - pos, &st)) < 0)
            return r;
        if (st.len == 0)
            return qcbt_error(EIO,
                              "block status at offset %" PRIu64
                              " returned nothing",
                              pos);
        len = MIN(st.len, end - pos);
        if (st.zero) {
            uint64_t z =
                pos + len == end
                    ? len
                    : ROUND_DOWN(pos + len, (uint64_t)DIGEST_BLOCK) - pos;

            if (z > 0) {
                if ((r = put_zero(j, pos, z)) < 0)
                    return r;
                pos += z;
                continue;
            }
            len = MIN((uint64_t)DIGEST_BLOCK, end - pos);
        } else {
            len = MIN(ROUND_UP(pos + len, (uint64_t)DIGEST_BLOCK), end) - pos;
        }
        if ((r = chain_read(j->c, buf + (pos - off), len, pos)) < 0)
            return r;
        gdigest_add(d, pos, buf + (pos - off), len);
        if ((r = put_runs(j, buf + (pos - off), pos, len, written)) < 0)
            return r;
        pos += len;
    }
    return 0;
}

/* sync_file_range() of the output: 0, or -errno with a message.  The
 * output is a regular file or a block device, which support the call; a
 * kernel (or sandbox) without it (ENOSYS) only loses the pacing, fsync
 * still makes the data durable.  Any other error is the device's: the
 * writeback failed, and the kernel reports it once, here, so the restore
 * fails rather than trusting a later fsync to see it.
 */
static int
sync_range(struct rjob *j, uint64_t off, uint64_t n, unsigned flags)
{
    if (sync_file_range(j->fd, (off_t)off, (off_t)n, flags) < 0 &&
        errno != ENOSYS)
        return qcbt_error(errno,
                          "%s: writing back offset %" PRIu64 ": %s",
                          j->out,
                          off,
                          strerror(errno));
    return 0;
}

/* Start writeback of [off, off+n) of the output; once WB_CHUNKS ranges
 * are in flight, wait for the oldest and drop it from the page cache.
 */
static int
writeback(struct rjob *j, struct wbring *wb, uint64_t off, uint64_t n)
{
    unsigned i;
    int r;

    if ((r = sync_range(j, off, n, SYNC_FILE_RANGE_WRITE)) < 0)
        return r;
    if (wb->nr == WB_CHUNKS) {
        i = wb->head;
        r = sync_range(j,
                       wb->off[i],
                       wb->len[i],
                       SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                           SYNC_FILE_RANGE_WAIT_AFTER);
        if (r < 0)
            return r;
        posix_fadvise(j->fd, wb->off[i], wb->len[i], POSIX_FADV_DONTNEED);
        wb->head = (wb->head + 1) % WB_CHUNKS;
        wb->nr--;
    }
    i = (wb->head + wb->nr) % WB_CHUNKS;
    wb->off[i] = off;
    wb->len[i] = n;
    wb->nr++;
    return 0;
}

static void *
restore_worker(void *arg)
{
    struct rjob *j = arg;
    unsigned char *buf = malloc(RCHUNK);
    struct wbring wb = {.nr = 0};
    struct gdigest local;
    uint64_t written = 0;

    gdigest_init(&local, 0);
    if (!buf) {
        job_fail(j, "out of memory");
        return NULL;
    }
    for (;;) {
        uint64_t off, n;
        bool stop;

        pthread_mutex_lock(&j->lock);
        off = j->next;
        j->next += RCHUNK;
        stop = j->err != 0;
        pthread_mutex_unlock(&j->lock);
        if (off >= j->c->size || stop)
            break;
        n = MIN((uint64_t)RCHUNK, j->c->size - off);
        if (restore_range(j, buf, off, n, &local, &written) < 0 ||
            ((j->t == T_FILE_RAW || j->t == T_BLOCK) &&
             writeback(j, &wb, off, n) < 0)) {
            job_fail(j, qcbt_error_get());
            break;
        }
    }
    pthread_mutex_lock(&j->lock);
    j->dg.sum += local.sum;
    j->data_bytes += written;
    pthread_mutex_unlock(&j->lock);
    free(buf);
    return NULL;
}

/* The file restore writes and then renames. */
struct rfile {
    char *final;  /* OUT, or the file an existing symlink OUT points to */
    char *dir;    /* its directory */
    char *tmp;    /* the temporary file while it exists */
    bool replace; /* --force over an existing file */
    struct stat old;
};

static void
rfile_free(struct rfile *f)
{
    if (f->tmp) {
        restore_tmp = NULL;
        unlink(f->tmp);
        free(f->tmp);
    }
    free(f->final);
    free(f->dir);
}

/* Create the temporary file next to f->final: same directory (so the
 * rename cannot cross file systems), a hidden name, and the mode (and,
 * when replacing, the owner) the finished file should have.  Returns the
 * descriptor or -1 with a message.
 */
static int
rfile_create(struct rfile *f, const char *out)
{
    const char *slash = strrchr(f->final, '/'), *base;
    size_t n;
    mode_t mask;
    int fd;

    f->dir = slash ? strndup(f->final, slash == f->final ? 1 : slash - f->final)
                   : strdup(".");
    base = slash ? slash + 1 : f->final;
    n = strlen(f->dir) + strlen(base) + 32;
    f->tmp = f->dir ? malloc(n) : NULL;
    if (!f->tmp) {
        qcbt_error(ENOMEM, "out of memory");
        return -1;
    }
    /* At most 200 bytes of the name: the temporary name must stay within
     * NAME_MAX. */
    snprintf(f->tmp, n, "%s/.%.200s.qcbt-XXXXXX", f->dir, base);
    fd = mkostemp(f->tmp, O_CLOEXEC);
    if (fd < 0) {
        qcbt_error(errno,
                   "%s: cannot create a temporary file in %s: %s",
                   out,
                   f->dir,
                   strerror(errno));
        free(f->tmp);
        f->tmp = NULL;
        return -1;
    }
    restore_tmp = f->tmp;
    if (f->replace) {
        if (f->old.st_uid != geteuid() || f->old.st_gid != getegid())
            (void)!fchown(fd, f->old.st_uid, f->old.st_gid);
        fchmod(fd, f->old.st_mode & 07777);
    } else {
        mask = umask(0);
        umask(mask);
        fchmod(fd, 0666 & ~mask);
    }
    return fd;
}

/* The commit point: rename the finished file to its name (refusing to
 * replace a file that appeared meanwhile, unless --force), then make the
 * name durable.
 */
static int
rfile_commit(struct rfile *f, const char *out)
{
    int r, dfd;

    if (f->replace)
        r = rename(f->tmp, f->final);
    else {
        r = renameat2(AT_FDCWD, f->tmp, AT_FDCWD, f->final, RENAME_NOREPLACE);
        if (r < 0 && (errno == EINVAL || errno == ENOSYS)) {
            /* A file system without RENAME_NOREPLACE: link(2) does not
             * replace either. */
            r = link(f->tmp, f->final);
            if (r == 0)
                unlink(f->tmp);
        }
    }
    if (r < 0) {
        if (errno == EEXIST)
            return qcbt_error(EEXIST,
                              "%s: created by someone else during the "
                              "restore; left as it is (--force replaces it)",
                              out);
        return qcbt_error(errno, "%s: rename: %s", out, strerror(errno));
    }
    restore_tmp = NULL;
    free(f->tmp);
    f->tmp = NULL;
    dfd = open(f->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 || fsync(dfd) < 0) {
        r = qcbt_error(errno,
                       "%s: restored, but syncing its directory %s failed: "
                       "%s",
                       out,
                       f->dir,
                       strerror(errno));
        if (dfd >= 0)
            close(dfd);
        return r;
    }
    close(dfd);
    return 0;
}

/* Decide what OUT is and open it: a new file (or, with FORCE, an existing
 * one to replace) is created under a temporary name; a block device
 * (FORCE) and an NBD URI (connected as CO says) are opened to be written
 * in place.  Returns 0 or -1 with a message.
 */
static int
restore_open(struct rjob *j,
             struct rfile *f,
             const char *out,
             const char *fmt,
             bool force,
             const struct nbd_connect_opts *co)
{
    size_t len = strlen(out);
    bool qcow2 = fmt ? strcmp(fmt, "qcow2") == 0
                     : len > 6 && strcmp(out + len - 6, ".qcow2") == 0;
    struct stat st;
    int64_t tsize;

    if (strstr(out, "://")) {
        if (fmt && qcow2) {
            qcbt_error(EINVAL,
                       "%s: an NBD export is written raw (-O qcow2 needs a "
                       "file)",
                       out);
            return -1;
        }
        j->t = T_NBD;
        j->zblock = ZBLOCK_INPLACE;
        j->nbd = nbd_create();
        if (!j->nbd || nbd_connect_with(j->nbd, out, co) < 0) {
            qcbt_error(EIO, "%s: %s", out, nbd_get_error());
            return -1;
        }
        tsize = nbd_get_size(j->nbd);
        if (tsize < 0) {
            qcbt_error(EIO, "%s: %s", out, nbd_get_error());
            return -1;
        }
        if ((uint64_t)tsize < j->c->size) {
            qcbt_error(ENOSPC,
                       "%s: the export is smaller than the disk (%" PRId64
                       " bytes, the disk %" PRIu64 " bytes)",
                       out,
                       tsize,
                       j->c->size);
            return -1;
        }
        if (nbd_is_read_only(j->nbd) > 0) {
            qcbt_error(EROFS, "%s: the export is read-only", out);
            return -1;
        }
        return 0;
    }

    if (stat(out, &st) == 0) {
        if (S_ISBLK(st.st_mode)) {
            if (!force) {
                qcbt_error(EEXIST,
                           "%s: a block device; --force writes the disk "
                           "into it",
                           out);
                return -1;
            }
            if (qcow2) {
                qcbt_error(EINVAL,
                           "%s: a block device is written raw (-O qcow2 "
                           "needs a file)",
                           out);
                return -1;
            }
            j->t = T_BLOCK;
            j->zblock = ZBLOCK_INPLACE;
            /* O_EXCL: refused while the device is mounted or claimed. */
            j->fd = open(out, O_WRONLY | O_EXCL | O_CLOEXEC);
            if (j->fd < 0) {
                qcbt_error(errno, "%s: %s", out, strerror(errno));
                return -1;
            }
            tsize = lseek(j->fd, 0, SEEK_END);
            if (tsize < 0) {
                qcbt_error(errno, "%s: %s", out, strerror(errno));
                return -1;
            }
            if ((uint64_t)tsize < j->c->size) {
                qcbt_error(ENOSPC,
                           "%s: the block device is smaller than the disk "
                           "(%" PRId64 " bytes, the disk %" PRIu64 " bytes)",
                           out,
                           tsize,
                           j->c->size);
                return -1;
            }
            return 0;
        }
        if (!S_ISREG(st.st_mode)) {
            qcbt_error(EINVAL, "%s: not a regular file or a block device", out);
            return -1;
        }
        if (!force) {
            qcbt_error(EEXIST,
                       "%s: exists; --force replaces it (once the restore "
                       "is complete and verified)",
                       out);
            return -1;
        }
        f->replace = true;
        f->old = st;
        f->final = realpath(out, NULL);
    } else if (errno == ENOENT) {
        f->final = strdup(out);
    } else {
        qcbt_error(errno, "%s: %s", out, strerror(errno));
        return -1;
    }
    if (!f->final) {
        qcbt_error(errno, "%s: %s", out, strerror(errno));
        return -1;
    }

    j->fd = rfile_create(f, out);
    if (j->fd < 0)
        return -1;
    if (qcow2) {
        struct qcow2_writer_opts wo = {.size = j->c->size};
        int fd = j->fd;

        j->t = T_FILE_QCOW2;
        j->fd = -1;
        if (qcow2_writer_create_fd(fd, out, &wo, &j->w) < 0)
            return -1;
        j->zblock = qcow2_writer_cluster_size(j->w);
    } else {
        j->t = T_FILE_RAW;
        j->zblock = ZBLOCK_FILE;
    }
    return 0;
}

/* Make the output complete and durable (before the digest decides). */
static int
restore_finish(struct rjob *j)
{
    int r;

    switch (j->t) {
    case T_FILE_RAW:
        /* The size last: a write past a file size limit fails in the
         * middle, not at the start; holes at the end read as zeros. */
        if (ftruncate(j->fd, (off_t)j->c->size) < 0 || fsync(j->fd) < 0)
            return qcbt_error(errno, "%s: %s", j->out, strerror(errno));
        return 0;
    case T_BLOCK:
        if (fsync(j->fd) < 0)
            return qcbt_error(errno, "%s: %s", j->out, strerror(errno));
        return 0;
    case T_FILE_QCOW2:
        r = qcow2_writer_close(j->w);
        j->w = NULL;
        return r;
    case T_NBD:
        if (nbd_flush(j->nbd, 0) < 0)
            return qcbt_error(EIO, "%s: flush: %s", j->out, nbd_get_error());
        return 0;
    }
    return 0;
}

static void
restore_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt restore [--at N] [-O raw|qcow2] [--force] DIR OUT\n"
            "\n"
            "Restore the disk as it was at backup N of DIR (default: the "
            "newest)\n"
            "into OUT: a new raw file (sparse), a new qcow2 file (-O qcow2 "
            "or a\n"
            ".qcow2 name), a block device, or an NBD URI (nbd://, "
            "nbds://, ...)\n"
            "at least as large as the disk.  The data is checked against "
            "the\n"
            "backup's guest digest.  A file is written under a temporary "
            "name\n"
            "and renamed to OUT only when it is complete and verified: a "
            "failed\n"
            "restore leaves nothing.  A device or an export is written in "
            "place.\n"
            "DIR may be a virtnbdbackup backup directory: it is imported "
            "(as by\n"
            "qcbt import) into $TMPDIR (default /var/tmp) first, and N "
            "counts its\n"
            "backups in the order qcbt import gives them.\n"
            "\n"
            "      --at N        backup N of DIR (0 = the first)\n"
            "  -O, --output-format raw|qcow2\n"
            "                    format of a file OUT (default: raw, or "
            "qcow2\n"
            "                    for a name ending in .qcow2)\n"
            "      --force       replace an existing file OUT, or write into "
            "a\n"
            "                    block device\n"
            "      --disk NAME   DIR is a virtnbdbackup directory: restore "
            "disk NAME\n"
            "                    (needed when it holds several)\n"
            "  -h, --help        show this help\n");
    nbd_connect_usage(fp);
}

int
cmd_restore(int argc, char **argv)
{
    static const struct option opts[] = {
        {"at", required_argument, NULL, 'a'},
        {"output-format", required_argument, NULL, 'O'},
        {"force", no_argument, NULL, 'F'},
        {"disk", required_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},
        NBD_CONNECT_LONG_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    struct nbd_connect_opts nco = NBD_CONNECT_OPTS_INIT;
    static const char optstring[] = "O:h";
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
    struct sigaction sa = {.sa_handler = restore_on_signal}, old[3];
    struct manifest m = {0};
    const struct backup_entry *e;
    struct rjob j = {0};
    struct rfile f = {0};
    pthread_t th[RTHREADS];
    const char *fmt = NULL, *dir, *out, *disk = NULL;
    char hex[DIGEST_HEX_LEN + 1];
    char *vtmp = NULL;
    bool force = false;
    long at = -1;
    int opt, i, started = 0, ret = QCBT_EXIT_ERROR;

    while ((opt = getopt_long(argc, argv, optstring, opts, NULL)) != -1) {
        switch (opt) {
        case 'a':
            if (parse_index(optarg, &at) < 0)
                return usage_error("restore", "invalid --at '%s'", optarg);
            break;
        case 'O':
            if (strcmp(optarg, "raw") != 0 && strcmp(optarg, "qcow2") != 0)
                return usage_error("restore",
                                   "output format '%s' is not raw or qcow2",
                                   optarg);
            fmt = optarg;
            break;
        case 'F':
            force = true;
            break;
        case 'd':
            disk = optarg;
            break;
        case 'h':
            restore_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            if (opt >= NBD_CONNECT_OPT_TLS && opt <= NBD_CONNECT_OPT_LAST) {
                if (nbd_connect_option(&nco, "restore", opt, optarg) < 0)
                    return QCBT_EXIT_ERROR;
                break;
            }
            return usage_getopt_error("restore", argc, argv, optstring, opts);
        }
    }
    if (argc - optind != 2)
        return usage_error("restore", "expected DIR OUT");
    dir = argv[optind];
    out = argv[optind + 1];
    if (vnb_is_set(dir)) {
        /* A virtnbdbackup set: read (and check) it whole into a
         * temporary backup directory first. */
        vnb_catch_signals();
        if (vnb_import_temp(dir, disk, &vtmp) < 0)
            return report_error();
        dir = vtmp;
    } else if (disk) {
        return usage_error("restore",
                           "--disk applies to a virtnbdbackup directory, "
                           "and %s is none",
                           dir);
    }
    j.fd = -1;
    j.out = out;
    pthread_mutex_init(&j.lock, NULL);
    /* A file size limit is an error to report (and clean up after), not
     * a signal that kills; a fatal signal removes the temporary file. */
    signal(SIGXFSZ, SIG_IGN);
    sigemptyset(&sa.sa_mask);
    for (i = 0; i < 3; i++)
        sigaction(sigs[i], &sa, &old[i]);
    if (open_backup(dir, &m, at, &j.c, &e) < 0)
        goto fail;
    if (restore_open(&j, &f, out, fmt, force, &nco) < 0)
        goto fail;

    gdigest_init(&j.dg, j.c->size);
    for (i = 0; i < RTHREADS; i++) {
        if (pthread_create(&th[i], NULL, restore_worker, &j) != 0) {
            job_fail(&j, "cannot start a thread");
            break;
        }
        started++;
    }
    for (i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    if (j.err) {
        qcbt_error(EIO, "%s", j.msg);
        goto fail;
    }
    if (restore_finish(&j) < 0)
        goto fail;
    gdigest_final(&j.dg, hex);
    if (e->guest_digest && strcmp(hex, e->guest_digest) != 0) {
        qcbt_error(EIO,
                   "restored data does not match backup %s: digest %s, "
                   "manifest says %s",
                   e->file,
                   hex,
                   e->guest_digest);
        goto fail;
    }
    if (f.tmp && rfile_commit(&f, out) < 0)
        goto fail;
    printf("restored %s (%" PRIu64 " bytes, %" PRIu64 " of data) to %s%s\n",
           e->file,
           j.c->size,
           j.data_bytes,
           out,
           e->guest_digest ? ", digest verified" : "");
    ret = QCBT_EXIT_OK;
    goto out;
fail:
    if (j.touched) {
        /* A device or an export cannot be left as it was: say so. */
        char msg[600];

        snprintf(msg, sizeof msg, "%s", qcbt_error_get());
        qcbt_error(EIO,
                   "%s (%s has been written to and does not hold a "
                   "verified restore)",
                   msg,
                   out);
    }
    report_error();
out:
    if (j.w)
        qcow2_writer_abort(j.w);
    if (j.fd >= 0)
        close(j.fd);
    rfile_free(&f); /* removes the temporary file unless it was renamed */
    if (j.nbd) {
        nbd_shutdown(j.nbd, 0);
        nbd_close(j.nbd);
    }
    for (i = 0; i < 3; i++)
        sigaction(sigs[i], &old[i], NULL);
    chain_close(j.c);
    manifest_free(&m);
    pthread_mutex_destroy(&j.lock);
    vnb_temp_free(vtmp);
    return ret;
}

/* ---- verify ------------------------------------------------------------- */

static void
verify_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt verify [--against URI] [--at N] DIR\n"
            "\n"
            "Check DIR: the manifest, every backup file (present, a valid "
            "qcow2,\n"
            "backing file and size as recorded) and every backup's guest "
            "digest.\n"
            "With --against, also compare backup N (default: the newest) "
            "with\n"
            "the live source URI byte for byte.  Exit 0 when everything "
            "holds.\n"
            "DIR may be a virtnbdbackup backup directory: every stream is "
            "read\n"
            "whole and checked, then the chain it makes is verified (in "
            "$TMPDIR).\n"
            "\n"
            "      --against URI compare backup N with the NBD export URI\n"
            "      --at N        the backup --against compares (default: "
            "the newest)\n"
            "      --disk NAME   the disk of a virtnbdbackup directory "
            "(needed when\n"
            "                    it holds several)\n"
            "  -h, --help        show this help\n");
    nbd_connect_usage(fp);
}

/* libnbd 1.14 does not check that a read's chunks cover the request. */
static int
count_chunk(void *opaque,
            const void *subbuf,
            size_t count,
            uint64_t offset,
            unsigned status,
            int *error)
{
    uint64_t *seen = opaque;

    (void)subbuf;
    (void)offset;
    (void)error;
    if (status == LIBNBD_READ_DATA || status == LIBNBD_READ_HOLE)
        *seen += count;
    return 0;
}

/* Compare the chain with an NBD export, byte for byte. */
static int
compare_nbd(struct chain *c, const char *uri, const struct nbd_connect_opts *co)
{
    struct nbd_handle *h = nbd_create();
    unsigned char *a = malloc(RCHUNK), *b = malloc(RCHUNK);
    uint64_t pos, seen;
    int64_t size;
    int r = 0;

    if (!h || !a || !b) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    if (nbd_connect_with(h, uri, co) < 0) {
        r = qcbt_error(EIO, "%s: %s", uri, nbd_get_error());
        goto out;
    }
    size = nbd_get_size(h);
    if (size < 0 || (uint64_t)size != c->size) {
        r = qcbt_error(EINVAL,
                       "%s: size %" PRId64 " differs from the "
                       "backup's %" PRIu64,
                       uri,
                       size,
                       c->size);
        goto out;
    }
    for (pos = 0; pos < c->size; pos += RCHUNK) {
        uint64_t n = MIN((uint64_t)RCHUNK, c->size - pos), i;

        seen = 0;
        if (nbd_pread_structured(h,
                                 a,
                                 n,
                                 pos,
                                 (nbd_chunk_callback){.callback = count_chunk,
                                                      .user_data = &seen},
                                 0) < 0) {
            r = qcbt_error(EIO,
                           "%s: read at %" PRIu64 ": %s",
                           uri,
                           pos,
                           nbd_get_error());
            goto out;
        }
        if (seen != n) {
            r = qcbt_error(EPROTO,
                           "%s: server sent %" PRIu64 " of %" PRIu64
                           " bytes for the read at %" PRIu64,
                           uri,
                           seen,
                           n,
                           pos);
            goto out;
        }
        if ((r = chain_read(c, b, n, pos)) < 0)
            goto out;
        if (memcmp(a, b, n) != 0) {
            for (i = 0; i < n && a[i] == b[i]; i++)
                ;
            r = qcbt_error(EIO,
                           "the backup differs from %s at offset "
                           "%" PRIu64,
                           uri,
                           pos + i);
            goto out;
        }
    }
out:
    if (h) {
        nbd_shutdown(h, 0);
        nbd_close(h);
    }
    free(a);
    free(b);
    return r;
}

int
cmd_verify(int argc, char **argv)
{
    static const struct option opts[] = {
        {"against", required_argument, NULL, 'A'},
        {"at", required_argument, NULL, 'a'},
        {"disk", required_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},
        NBD_CONNECT_LONG_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "h";
    struct nbd_connect_opts nco = NBD_CONNECT_OPTS_INIT;
    const char *against = NULL, *dir, *disk = NULL, *shown;
    char *vtmp = NULL;
    struct manifest m = {0};
    long at = -1;
    int opt, bad = 0;
    size_t i;

    while ((opt = getopt_long(argc, argv, optstring, opts, NULL)) != -1) {
        switch (opt) {
        case 'A':
            against = optarg;
            break;
        case 'a':
            if (parse_index(optarg, &at) < 0)
                return usage_error("verify", "invalid --at '%s'", optarg);
            break;
        case 'd':
            disk = optarg;
            break;
        case 'h':
            verify_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            if (opt >= NBD_CONNECT_OPT_TLS && opt <= NBD_CONNECT_OPT_LAST) {
                if (nbd_connect_option(&nco, "verify", opt, optarg) < 0)
                    return QCBT_EXIT_ERROR;
                break;
            }
            return usage_getopt_error("verify", argc, argv, optstring, opts);
        }
    }
    if (argc - optind != 1)
        return usage_error("verify", "expected DIR");
    dir = shown = argv[optind];
    if (vnb_is_set(dir)) {
        /* Reading the set whole checks every stream; the chain it makes
         * is then checked as any backup directory. */
        vnb_catch_signals();
        if (vnb_import_temp(dir, disk, &vtmp) < 0)
            return report_error();
        dir = vtmp;
        printf("%s: a virtnbdbackup set: every stream is well formed "
               "(frames, lengths, checksums, data sizes)\n",
               shown);
    } else if (disk) {
        return usage_error("verify",
                           "--disk applies to a virtnbdbackup directory, "
                           "and %s is none",
                           dir);
    }
    if (load_dir(dir, &m) < 0) {
        vnb_temp_free(vtmp);
        return report_error();
    }
    if (m.nr == 0) {
        die_msg("verify: %s has no backups (no %s)", dir, MANIFEST_NAME);
        return QCBT_EXIT_ERROR;
    }
    for (i = 0; i < m.nr; i++) {
        const struct backup_entry *e = &m.backups[i];
        struct chain_open_opts co = {.format = "qcow2"};
        struct chain *c = NULL;
        char *path = path_join(dir, e->file);
        char hex[DIGEST_HEX_LEN + 1];
        const char *problem = NULL;
        char buf[600];

        if (!path || chain_open(path, &co, &c) < 0) {
            snprintf(buf, sizeof buf, "%s", qcbt_error_get());
            problem = buf;
        } else if (c->size != e->size) {
            problem = "virtual size differs from the manifest";
        } else if (!e->backing != !c->layers[0].qcow2->backing_name ||
                   (e->backing &&
                    strcmp(e->backing, c->layers[0].qcow2->backing_name))) {
            problem = "backing file differs from the manifest";
        } else if (e->backing && i > 0 &&
                   strcmp(e->backing, m.backups[i - 1].file) != 0 &&
                   strcmp(e->type, "incremental") == 0) {
            problem = "incremental backup does not build on the previous "
                      "one";
        } else if (e->guest_digest) {
            if (chain_guest_digest(c, NULL, hex) < 0) {
                snprintf(buf, sizeof buf, "%s", qcbt_error_get());
                problem = buf;
            } else if (strcmp(hex, e->guest_digest) != 0) {
                snprintf(buf,
                         sizeof buf,
                         "guest digest %s, manifest says %s",
                         hex,
                         e->guest_digest);
                problem = buf;
            }
        }
        if (problem) {
            printf("%s: FAILED: %s\n", e->file, problem);
            bad++;
        } else {
            printf("%s: ok (%s%s)\n",
                   e->file,
                   e->type,
                   e->guest_digest ? ", digest matches" : ", no digest");
        }
        if (!problem && against && (at < 0 ? i + 1 == m.nr : (long)i == at)) {
            if (compare_nbd(c, against, &nco) < 0) {
                printf("%s: FAILED against %s: %s\n",
                       e->file,
                       against,
                       qcbt_error_get());
                bad++;
            } else {
                printf("%s: identical to %s\n", e->file, against);
            }
        }
        chain_close(c);
        free(path);
    }
    manifest_free(&m);
    vnb_temp_free(vtmp);
    if (bad) {
        die_msg("verify: %d problem(s) in %s", bad, shown);
        return QCBT_EXIT_ERROR;
    }
    return QCBT_EXIT_OK;
}

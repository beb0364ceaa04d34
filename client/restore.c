/* qcbt restore and qcbt verify: read a backup chain back, to a raw file, a
 * qcow2 file or an NBD export, and prove it equals what was backed up.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
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
#include "qcbt.h"
#include "qcow2-writer.h"

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

enum target { T_RAW, T_QCOW2, T_NBD };

struct rjob {
    struct chain *c;
    enum target t;
    int fd;
    struct qcow2_writer *w;
    struct nbd_handle *nbd;
    pthread_mutex_t lock; /* the writer and the NBD handle */
    uint64_t next;        /* next chunk to take (under lock) */
    struct gdigest dg;    /* summed under lock */
    uint64_t data_bytes;
    int err;
    char msg[512];
};

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

static int
put_data(struct rjob *j, const unsigned char *buf, size_t n, uint64_t off)
{
    size_t done = 0;
    int r = 0;

    switch (j->t) {
    case T_RAW:
        while (done < n) {
            ssize_t w = pwrite(j->fd, buf + done, n - done, off + done);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                return qcbt_error(errno,
                                  "write at %" PRIu64 ": %s",
                                  off + done,
                                  strerror(errno));
            }
            done += w;
        }
        return 0;
    case T_QCOW2:
        pthread_mutex_lock(&j->lock);
        r = qcow2_writer_write(j->w, buf, n, off);
        pthread_mutex_unlock(&j->lock);
        return r;
    case T_NBD:
        pthread_mutex_lock(&j->lock);
        if (nbd_pwrite(j->nbd, buf, n, off, 0) < 0)
            r = qcbt_error(EIO,
                           "NBD write at %" PRIu64 ": %s",
                           off,
                           nbd_get_error());
        pthread_mutex_unlock(&j->lock);
        return r;
    }
    return 0;
}

static int
put_zero(struct rjob *j, uint64_t off, uint64_t n)
{
    int r = 0;

    switch (j->t) {
    case T_RAW:
        return 0; /* the file was created empty: holes read as zero */
    case T_QCOW2:
        return 0; /* a standalone qcow2 reads unallocated as zero */
    case T_NBD:
        /* An NBD target may hold old data: zero it explicitly. */
        pthread_mutex_lock(&j->lock);
        if (nbd_zero(j->nbd, n, off, 0) < 0)
            r = qcbt_error(EIO,
                           "NBD write-zeroes at %" PRIu64 ": %s",
                           off,
                           nbd_get_error());
        pthread_mutex_unlock(&j->lock);
        return r;
    }
    return 0;
}

static void *
restore_worker(void *arg)
{
    struct rjob *j = arg;
    unsigned char *buf = malloc(RCHUNK);
    struct gdigest local;

    gdigest_init(&local, 0);
    if (!buf) {
        job_fail(j, "out of memory");
        return NULL;
    }
    for (;;) {
        uint64_t off, n;
        struct chain_status st;

        pthread_mutex_lock(&j->lock);
        off = j->next;
        j->next += RCHUNK;
        pthread_mutex_unlock(&j->lock);
        if (off >= j->c->size || j->err)
            break;
        n = MIN((uint64_t)RCHUNK, j->c->size - off);
        if (chain_block_status(j->c, off, n, &st) < 0) {
            job_fail(j, qcbt_error_get());
            break;
        }
        if (st.zero && !st.data && st.len >= n) {
            if (put_zero(j, off, n) < 0) {
                job_fail(j, qcbt_error_get());
                break;
            }
            continue;
        }
        if (chain_read(j->c, buf, n, off) < 0 || put_data(j, buf, n, off) < 0) {
            job_fail(j, qcbt_error_get());
            break;
        }
        gdigest_add(&local, off, buf, n);
        pthread_mutex_lock(&j->lock);
        j->data_bytes += n;
        pthread_mutex_unlock(&j->lock);
    }
    pthread_mutex_lock(&j->lock);
    j->dg.sum += local.sum;
    pthread_mutex_unlock(&j->lock);
    free(buf);
    return NULL;
}

static void
restore_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt restore [--at N] [-O raw|qcow2] DIR OUT\n"
            "\n"
            "Restore the disk as it was at backup N of DIR (default: the "
            "newest)\n"
            "into OUT: a raw file (sparse), a qcow2 file (-O qcow2 or a "
            ".qcow2\n"
            "name), or an NBD URI (nbd://, nbd+unix://) at least as large as "
            "the\n"
            "disk.  The restored data is checked against the backup's guest\n"
            "digest.\n");
}

int
cmd_restore(int argc, char **argv)
{
    static const struct option opts[] = {
        {"at", required_argument, NULL, 'a'},
        {"output-format", required_argument, NULL, 'O'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct manifest m = {0};
    const struct backup_entry *e;
    struct rjob j = {0};
    pthread_t th[RTHREADS];
    const char *fmt = NULL, *dir, *out;
    char hex[DIGEST_HEX_LEN + 1];
    long at = -1;
    int opt, i, ret = QCBT_EXIT_ERROR;
    size_t len;

    while ((opt = getopt_long(argc, argv, "O:h", opts, NULL)) != -1) {
        switch (opt) {
        case 'a':
            if (parse_index(optarg, &at) < 0) {
                die_msg("restore: invalid --at '%s'", optarg);
                return QCBT_EXIT_ERROR;
            }
            break;
        case 'O':
            fmt = optarg;
            break;
        case 'h':
            restore_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            restore_usage(stderr);
            return QCBT_EXIT_ERROR;
        }
    }
    if (argc - optind != 2) {
        die_msg("restore: expected DIR OUT (see 'qcbt restore --help')");
        return QCBT_EXIT_ERROR;
    }
    dir = argv[optind];
    out = argv[optind + 1];
    len = strlen(out);
    j.fd = -1;
    pthread_mutex_init(&j.lock, NULL);
    if (open_backup(dir, &m, at, &j.c, &e) < 0)
        goto fail;

    if (strstr(out, "://"))
        j.t = T_NBD;
    else if ((fmt && strcmp(fmt, "qcow2") == 0) ||
             (!fmt && len > 6 && strcmp(out + len - 6, ".qcow2") == 0))
        j.t = T_QCOW2;
    else if (!fmt || strcmp(fmt, "raw") == 0)
        j.t = T_RAW;
    else {
        qcbt_error(EINVAL, "restore: unknown output format '%s'", fmt);
        goto fail;
    }

    if (j.t == T_RAW) {
        j.fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
        if (j.fd < 0 || ftruncate(j.fd, (off_t)j.c->size) < 0) {
            qcbt_error(errno, "%s: %s", out, strerror(errno));
            goto fail;
        }
    } else if (j.t == T_QCOW2) {
        struct qcow2_writer_opts wo = {.size = j.c->size};

        if (qcow2_writer_create(out, &wo, &j.w) < 0)
            goto fail;
    } else {
        int64_t tsize;

        j.nbd = nbd_create();
        if (!j.nbd || nbd_connect_uri(j.nbd, out) < 0) {
            qcbt_error(EIO, "%s: %s", out, nbd_get_error());
            goto fail;
        }
        tsize = nbd_get_size(j.nbd);
        if (tsize < 0 || (uint64_t)tsize < j.c->size) {
            qcbt_error(ENOSPC,
                       "%s: export is smaller than the disk (%" PRIu64
                       " bytes)",
                       out,
                       j.c->size);
            goto fail;
        }
        if (nbd_is_read_only(j.nbd) > 0) {
            qcbt_error(EROFS, "%s: export is read-only", out);
            goto fail;
        }
    }

    gdigest_init(&j.dg, j.c->size);
    for (i = 0; i < RTHREADS; i++)
        pthread_create(&th[i], NULL, restore_worker, &j);
    for (i = 0; i < RTHREADS; i++)
        pthread_join(th[i], NULL);
    if (j.err) {
        qcbt_error(EIO, "%s", j.msg);
        goto fail;
    }
    if (j.t == T_RAW && fsync(j.fd) < 0) {
        qcbt_error(errno, "%s: %s", out, strerror(errno));
        goto fail;
    }
    if (j.t == T_QCOW2) {
        int r = qcow2_writer_close(j.w);
        j.w = NULL;
        if (r < 0)
            goto fail;
    }
    if (j.t == T_NBD && nbd_flush(j.nbd, 0) < 0) {
        qcbt_error(EIO, "%s: flush: %s", out, nbd_get_error());
        goto fail;
    }
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
    printf("restored %s (%" PRIu64 " bytes, %" PRIu64 " of data) to %s%s\n",
           e->file,
           j.c->size,
           j.data_bytes,
           out,
           e->guest_digest ? ", digest verified" : "");
    ret = QCBT_EXIT_OK;
    goto out;
fail:
    report_error();
out:
    if (j.w)
        qcow2_writer_abort(j.w);
    if (j.fd >= 0)
        close(j.fd);
    if (j.nbd) {
        nbd_shutdown(j.nbd, 0);
        nbd_close(j.nbd);
    }
    chain_close(j.c);
    manifest_free(&m);
    pthread_mutex_destroy(&j.lock);
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
            "holds.\n");
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
compare_nbd(struct chain *c, const char *uri)
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
    if (nbd_connect_uri(h, uri) < 0) {
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
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "h";
    const char *against = NULL, *dir;
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
        case 'h':
            verify_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            return usage_getopt_error("verify", argc, argv, optstring, opts);
        }
    }
    if (argc - optind != 1)
        return usage_error("verify", "expected DIR");
    dir = argv[optind];
    if (load_dir(dir, &m) < 0)
        return report_error();
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
            if (compare_nbd(c, against) < 0) {
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
    if (bad) {
        die_msg("verify: %d problem(s) in %s", bad, dir);
        return QCBT_EXIT_ERROR;
    }
    return QCBT_EXIT_OK;
}

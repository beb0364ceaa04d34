/* qcbt: backing chains and the guest view. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "byteorder.h"
#include "chain.h"
#include "error.h"
#include "minmax.h"
#include "rounding.h"

static atomic_uint_fast64_t next_chain_id = 1;

const char *
chain_fmt_name(enum chain_fmt fmt)
{
    return fmt == CHAIN_FMT_QCOW2 ? "qcow2" : "raw";
}

void
chain_opts_from_env(struct chain_open_opts *o)
{
    const char *v = getenv("QCBT_ALLOW_DATA_FILE");

    o->allow_data_file = v && (strcmp(v, "1") == 0 || strcmp(v, "yes") == 0);
}

/* A backing or data file name "has a protocol" when a ':' comes before
 * any '/' (QEMU's path_has_protocol()): nbd:, json:, http: ...  We only
 * open local files.
 */
static bool
has_protocol(const char *name)
{
    const char *colon = strchr(name, ':');
    const char *slash = strchr(name, '/');

    return colon && (!slash || colon < slash);
}

/* Resolve NAME relative to the directory of the image at BASE_PATH (or to
 * DIR when BASE_PATH is NULL), without normalising "..", as QEMU does.
 */
static char *
resolve_name(const char *base_path, const char *dir, const char *name)
{
    const char *slash;
    size_t dirlen;
    char *r;

    if (name[0] == '/')
        return strdup(name);
    if (base_path) {
        slash = strrchr(base_path, '/');
        dirlen = slash ? (size_t)(slash - base_path + 1) : 0;
        dir = base_path;
    } else {
        dirlen = strlen(dir);
    }
    r = malloc(dirlen + 1 + strlen(name) + 1);
    if (!r)
        return NULL;
    memcpy(r, dir, dirlen);
    if (!base_path && dirlen && dir[dirlen - 1] != '/')
        r[dirlen++] = '/';
    strcpy(r + dirlen, name);
    return r;
}

/* Format probing, as QEMU does it (block.c find_image_format(): each
 * driver's .bdrv_probe scores the first BLOCK_PROBE_BUF_SIZE bytes of the
 * file, zero-filled past its end; the best score wins; an empty file is
 * raw).  Every format QEMU would recognise and that qcbt does not decode
 * is refused by name: read as raw, a VMDK, VHDX, QED ... container would
 * be served as the disk (wrong data, wrong size).
 */
#define PROBE_BUF_SIZE 2048

enum probed { PROBED_RAW, PROBED_QCOW2, PROBED_OTHER };

/* The little-endian u32 at P (VDI, Bochs and Parallels headers). */
static uint32_t
probe_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static bool
probe_bytes(const unsigned char *buf, size_t off, const char *s, size_t len)
{
    return memcmp(buf + off, s, len) == 0;
}

/* vmdk_probe(): binary sparse extents ("KDMV", VMFS "COWD"), or a text
 * descriptor whose first line that is neither a '#' comment nor blank
 * (spaces only) is "version=1", "2" or "3".
 */
static bool
probe_vmdk(const unsigned char *buf)
{
    const unsigned char *p = buf, *end = buf + PROBE_BUF_SIZE;

    if (probe_bytes(buf, 0, "KDMV", 4) || probe_bytes(buf, 0, "COWD", 4))
        return true;
    while (p < end) {
        if (*p == '#') {
            while (p < end && *p != '\n')
                p++;
            p++;
            continue;
        }
        if (*p == ' ') {
            while (p < end && *p == ' ')
                p++;
            if (p < end && *p == '\r')
                p++;
            if (p == end || *p != '\n')
                return false;
            p++;
            continue;
        }
        if ((size_t)(end - p) >= 10 && memcmp(p, "version=", 8) == 0 &&
            p[8] >= '1' && p[8] <= '3' &&
            (p[9] == '\n' ||
             ((size_t)(end - p) >= 11 && p[9] == '\r' && p[10] == '\n')))
            return true;
        return false;
    }
    return false;
}

/* What BUF (PROBE_BUF_SIZE bytes) holds.  FILENAME (may be NULL) is only
 * for the one probe QEMU makes by name (dmg).  *OTHER names a format we do
 * not decode, as QEMU names its driver.
 */
static enum probed
probe_buffer(const unsigned char *buf, const char *filename, const char **other)
{
    static const char cloop[] =
        "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t "
        "iso9660 /dev/cloop $1\n";
    struct qcow2_header h;
    size_t fl;

    *other = NULL;
    if (qcow2_probe(buf, PROBE_BUF_SIZE)) {
        /* qcow_probe(): version 1 is the old qcow format.  Other versions
         * stay qcow2 and qcow2_open() refuses them (QEMU would fall back
         * to raw for version 0: a damaged qcow2 is not a disk).  The
         * version is decoded by the format layer, as every qcow2 field.
         */
        if (qcow2_header_decode(buf, PROBE_BUF_SIZE, &h) == 0 && h.version == 1)
            *other = "qcow";
        return *other ? PROBED_OTHER : PROBED_QCOW2;
    }
    if (probe_vmdk(buf))
        *other = "vmdk";
    else if (probe_bytes(buf, 0, "QED\0", 4))
        *other = "qed";
    else if (probe_le32(buf + 0x40) == 0xbeda107f)
        *other = "vdi";
    else if (probe_bytes(buf, 0, "vhdxfile", 8))
        *other = "vhdx";
    else if (probe_bytes(buf, 0, "conectix", 8))
        *other = "vpc";
    else if (probe_bytes(buf, 0, "LUKS\xba\xbe", 6) && get_be16(buf + 6) == 1)
        *other = "luks";
    else if (probe_bytes(buf, 0, "Bochs Virtual HD Image", 23) &&
             probe_bytes(buf, 32, "Redolog", 8) &&
             probe_bytes(buf, 48, "Growing", 8) &&
             (probe_le32(buf + 64) == 0x00020000 ||
              probe_le32(buf + 64) == 0x00010000))
        *other = "bochs";
    else if ((probe_bytes(buf, 0, "WithoutFreeSpace", 16) ||
              probe_bytes(buf, 0, "WithouFreSpacExt", 16)) &&
             probe_le32(buf + 16) == 2)
        *other = "parallels";
    else if (probe_bytes(buf, 0, cloop, sizeof cloop - 1))
        *other = "cloop";
    else if (filename && (fl = strlen(filename)) > 4 &&
             strcmp(filename + fl - 4, ".dmg") == 0)
        *other = "dmg";
    return *other ? PROBED_OTHER : PROBED_RAW;
}

/* The format of layer IDX (file PATH, read through IO).  NAME is the
 * format the user gave (top) or the overlay recorded (backing), NULL to
 * probe; an unknown NAME for the top was refused by the caller.  "raw" is
 * taken as given, as QEMU does (the bytes are the disk, whatever they
 * look like).  "qcow2" is checked for another known format only to say
 * which one it is; qcow2_open() does the rest.  Sets *FMT and *PROBED.
 */
static int
layer_format(struct qcbt_io *io,
             size_t idx,
             const char *path,
             const char *name,
             enum chain_fmt *fmt,
             bool *probed)
{
    unsigned char buf[PROBE_BUF_SIZE] = {0};
    const char *other;
    enum probed kind;
    int r;

    *probed = name == NULL;
    if (name && strcmp(name, "raw") == 0) {
        *fmt = CHAIN_FMT_RAW;
        return 0;
    }
    if (name && strcmp(name, "qcow2") != 0)
        return qcbt_error(ENOTSUP,
                          "layer %zu (%s): unsupported backing format '%s' "
                          "(qcbt reads qcow2 and raw)",
                          idx,
                          path,
                          name);
    if (io->size == 0 && !name) {
        *fmt = CHAIN_FMT_RAW;
        return 0;
    }
    if (io->size > 0) {
        r = qcbt_io_read_exact(io, buf, sizeof buf, 0, true, "header");
        if (r < 0)
            return qcbt_error_prefix(-r, "layer %zu (%s)", idx, path);
    }
    kind = probe_buffer(buf, name ? NULL : path, &other);
    if (kind == PROBED_OTHER)
        return qcbt_error(ENOTSUP,
                          "layer %zu (%s): image format %s is not supported "
                          "(qcbt reads qcow2 and raw)",
                          idx,
                          path,
                          other);
    *fmt = name || kind == PROBED_QCOW2 ? CHAIN_FMT_QCOW2 : CHAIN_FMT_RAW;
    return 0;
}

static int
parse_format(const char *s, enum chain_fmt *fmt)
{
    if (strcmp(s, "qcow2") == 0)
        *fmt = CHAIN_FMT_QCOW2;
    else if (strcmp(s, "raw") == 0)
        *fmt = CHAIN_FMT_RAW;
    else
        return -ENOTSUP;
    return 0;
}

/* Take OPTS->lock on IO.  A READ lock refused because another process
 * holds the file (-EAGAIN) says which option reads it anyway.
 */
static int
lock_file(struct qcbt_io *io, const struct chain_open_opts *opts)
{
    char msg[1024];
    int r = qcbt_io_lock(io, opts->lock);

    if (r != -EAGAIN || opts->lock != QCBT_IO_LOCK_READ ||
        !opts->force_share_option)
        return r;
    snprintf(msg, sizeof msg, "%s", qcbt_error_get());
    return qcbt_error(EAGAIN,
                      "%s; %s reads it anyway, but its data may be "
                      "inconsistent",
                      msg,
                      opts->force_share_option);
}

/* Set up layer L from IO (ownership passes to the layer). */
static int
init_layer(struct chain_layer *l,
           struct qcbt_io *io,
           enum chain_fmt fmt,
           const char *data_dir,
           const struct chain_open_opts *opts)
{
    bool allow_any = opts->allow_data_file;
    int r;

    l->fmt = fmt;
    if (fmt == CHAIN_FMT_RAW) {
        l->io = io;
        /* QEMU sizes a raw file in whole sectors, rounding up. */
        l->size = ROUND_UP(io->size, 512);
        return 0;
    }
    r = qcow2_open(io, &l->qcow2);
    if (r < 0)
        return r;
    l->io = l->qcow2->io;
    l->size = l->qcow2->size;

    if (l->qcow2->hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
        struct qcbt_io *dio;
        const char *name = l->qcow2->data_file_name;

        if (!name)
            return qcbt_error(EINVAL,
                              "external data file required but its "
                              "name is not recorded in the image");
        if (has_protocol(name))
            return qcbt_error(ENOTSUP,
                              "external data file '%s' uses a "
                              "protocol; only local files are supported",
                              name);
        if (data_dir && !data_dir[0])
            return qcbt_error(EPERM,
                              "external data file '%s' not allowed (no "
                              "backing directory given)",
                              name);
        /* An image names the file its guest data is read from: a hostile
         * image could name any file on the host (CVE-2024-32498 class).
         * By default only files in the image's own directory (or below)
         * are opened; opts->allow_data_file lifts that.
         */
        if (!allow_any &&
            (name[0] == '/' || strcmp(name, "..") == 0 ||
             strncmp(name, "../", 3) == 0 || strstr(name, "/../") ||
             (strlen(name) >= 3 &&
              strcmp(name + strlen(name) - 3, "/..") == 0)))
            return qcbt_error(EPERM,
                              "external data file '%s' is outside the "
                              "image's directory; set QCBT_ALLOW_DATA_FILE=1 "
                              "to trust it",
                              name);
        /* Decision: relative data file names are relative to the image's
         * directory, like backing files (QEMU 7.2 uses its CWD instead).
         */
        l->data_file_path =
            resolve_name(data_dir ? NULL : l->path, data_dir, name);
        if (!l->data_file_path)
            return qcbt_error(ENOMEM, "out of memory");
        r = qcbt_io_open_file(l->data_file_path, &dio);
        if (r < 0)
            return qcbt_error_prefix(-r, "external data file");
        r = lock_file(dio, opts);
        if (r < 0) {
            qcbt_io_free(dio);
            return qcbt_error_prefix(-r, "external data file");
        }
        qcow2_set_data_file(l->qcow2, dio);
    }
    return 0;
}

static void
free_layer(struct chain_layer *l)
{
    if (l->qcow2)
        qcow2_close(l->qcow2);
    else
        qcbt_io_free(l->io);
    free(l->path);
    free(l->data_file_path);
}

/* Open the chain from TOP_IO (owned from here on, success or not) whose
 * format is TOP_FORMAT ("qcow2", "raw", or NULL to probe).
 */
static int
add_layers(struct chain *c,
           struct qcbt_io *top_io,
           const char *top_format,
           const char *top_path,
           const char *backing_dir,
           const struct chain_open_opts *opts)
{
    unsigned max_depth =
        opts && opts->max_depth ? opts->max_depth : CHAIN_MAX_DEPTH_DEFAULT;
    struct qcbt_io *io = top_io;
    const char *fmt_name = top_format;
    enum chain_fmt fmt = CHAIN_FMT_RAW;
    bool probed = false;
    char *path = strdup(top_path);
    int r;

    if (!path) {
        qcbt_io_free(io);
        return qcbt_error(ENOMEM, "out of memory");
    }
    for (;;) {
        struct chain_layer *l;
        struct chain_layer *nl;
        const char *bname, *bfmt;
        size_t idx = c->nr_layers, i;

        nl = realloc(c->layers, (idx + 1) * sizeof *nl);
        if (!nl) {
            qcbt_io_free(io);
            free(path);
            return qcbt_error(ENOMEM, "out of memory");
        }
        c->layers = nl;
        l = &c->layers[idx];
        memset(l, 0, sizeof *l);
        l->path = path;
        c->nr_layers++;

        /* Loops are detected by file identity, not by name. */
        for (i = 0; i < idx; i++) {
            if (io->dev == c->layers[i].io->dev &&
                io->ino == c->layers[i].io->ino && (io->dev || io->ino)) {
                qcbt_io_free(io);
                return qcbt_error(ELOOP,
                                  "layer %zu (%s): backing chain loop: "
                                  "same file as layer %zu",
                                  idx,
                                  l->path,
                                  i);
            }
        }
        /* Locked before a byte is read, as QEMU locks at open. */
        r = lock_file(io, opts);
        if (r < 0) {
            qcbt_io_free(io);
            return qcbt_error_prefix(-r, "layer %zu", idx);
        }
        r = layer_format(io, idx, l->path, fmt_name, &fmt, &probed);
        if (r < 0) {
            qcbt_io_free(io);
            return r;
        }
        l->fmt_probed = probed;
        /* init_layer owns io from here on, success or not. */
        /* BACKING_DIR stands in for the directory of the top layer only
         * (opened through an io, it has no path); deeper layers are files
         * and their names resolve against their own directory.
         */
        r = init_layer(l, io, fmt, idx == 0 ? backing_dir : NULL, opts);
        if (r < 0)
            return qcbt_error_prefix(-r, "layer %zu (%s)", idx, l->path);

        if (!l->qcow2 || !l->qcow2->backing_name || opts->no_backing)
            return 0;
        bname = l->qcow2->backing_name;
        bfmt = l->qcow2->backing_fmt;

        if (idx + 1 >= max_depth)
            return qcbt_error(EMLINK,
                              "layer %zu (%s): backing chain deeper "
                              "than %u layers",
                              idx,
                              l->path,
                              max_depth);
        if (backing_dir && !backing_dir[0])
            return qcbt_error(EPERM,
                              "layer %zu (%s): backing file '%s' not "
                              "allowed (no backing directory given)",
                              idx,
                              l->path,
                              bname);
        if (has_protocol(bname))
            return qcbt_error(ENOTSUP,
                              "layer %zu (%s): backing file '%s' "
                              "uses a protocol; only local files are "
                              "supported",
                              idx,
                              l->path,
                              bname);
        if (!backing_dir && !l->path[0])
            return qcbt_error(EINVAL,
                              "layer %zu: cannot resolve relative "
                              "backing file '%s'",
                              idx,
                              bname);
        path = resolve_name((backing_dir && idx == 0) ? NULL : l->path,
                            backing_dir,
                            bname);
        if (!path)
            return qcbt_error(ENOMEM, "out of memory");
        r = qcbt_io_open_file(path, &io);
        if (r < 0) {
            /* The open's own message starts with the path (made safe
             * like every message): keep the rest ("No such file or
             * directory", "not a regular file", ...).
             */
            char detail[512], shown[1024];
            const char *m = qcbt_error_get();
            size_t pl;

            qcbt_escape(shown, sizeof shown, path, strlen(path));
            pl = strlen(shown);
            if (strncmp(m, shown, pl) == 0 && strncmp(m + pl, ": ", 2) == 0)
                m += pl + 2;
            snprintf(detail, sizeof detail, "%s", m);
            r = qcbt_error(-r,
                           "layer %zu (%s): cannot open backing file '%s' "
                           "of %s: %s",
                           idx + 1,
                           path,
                           bname,
                           l->path,
                           detail);
            free(path);
            return r;
        }
        /* The next layer's format: recorded, or probed (layer_format). */
        fmt_name = bfmt;
    }
}

static int
finish_open(struct chain *c, int r, struct chain **out)
{
    if (r < 0) {
        chain_close(c);
        return r;
    }
    c->size = c->layers[0].size;
    c->id = atomic_fetch_add(&next_chain_id, 1);
    *out = c;
    return 0;
}

int
chain_open(const char *path,
           const struct chain_open_opts *opts,
           struct chain **out)
{
    static const struct chain_open_opts defaults;
    struct chain *c;
    struct qcbt_io *io;
    enum chain_fmt fmt;
    int r;

    if (!opts)
        opts = &defaults;
    if (opts->format && parse_format(opts->format, &fmt) < 0)
        return qcbt_error(ENOTSUP,
                          "unsupported format '%s' (qcow2 or "
                          "raw)",
                          opts->format);
    c = calloc(1, sizeof *c);
    if (!c)
        return qcbt_error(ENOMEM, "out of memory");
    r = qcbt_io_open_file(path, &io);
    if (r < 0) {
        free(c);
        return r;
    }
    r = add_layers(c, io, opts->format, path, NULL, opts);
    return finish_open(c, r, out);
}

int
chain_open_io(struct qcbt_io *io,
              const char *format,
              const char *backing_dir,
              const struct chain_open_opts *opts,
              struct chain **out)
{
    struct chain_open_opts o = opts ? *opts : (struct chain_open_opts){0};

    struct chain *c;
    enum chain_fmt fmt;
    int r;

    if (format && parse_format(format, &fmt) < 0) {
        qcbt_io_free(io);
        return qcbt_error(ENOTSUP, "unsupported format '%s'", format);
    }
    c = calloc(1, sizeof *c);
    if (!c) {
        qcbt_io_free(io);
        return qcbt_error(ENOMEM, "out of memory");
    }
    r = add_layers(c, io, format, io->name, backing_dir ? backing_dir : "", &o);
    return finish_open(c, r, out);
}

void
chain_close(struct chain *c)
{
    size_t i;

    if (!c)
        return;
    for (i = 0; i < c->nr_layers; i++)
        free_layer(&c->layers[i]);
    free(c->layers);
    free(c);
}

/* Per-thread cache of the last decompressed cluster, so that small reads
 * inside one compressed cluster decompress it once.  It holds up to a
 * cluster (2 MiB) plus the compressed scratch (4 MiB) on the heap, and
 * servers start threads per connection: the thread-specific key's
 * destructor frees it when its thread exits (STYLE.md), and a thread that
 * goes idle gives it back with chain_release_thread_cache().  zc_tls is
 * only the fast way to the same pointer the key holds.
 */
struct zcache {
    uint64_t chain_id;
    size_t layer;
    uint64_t entry;
    size_t cluster_size;
    size_t scratch_size;
    unsigned char *cluster;
    unsigned char *scratch;
};
static __thread struct zcache *zc_tls;
static pthread_key_t zcache_key;
static pthread_once_t zcache_once = PTHREAD_ONCE_INIT;
static atomic_bool zcache_key_ok;

static void
zcache_free(void *p)
{
    struct zcache *z = p;

    if (!z)
        return;
    /* Called from the exiting (or releasing) thread itself. */
    if (zc_tls == z)
        zc_tls = NULL;
    free(z->cluster);
    free(z->scratch);
    free(z);
}

static void
zcache_key_create(void)
{
    if (pthread_key_create(&zcache_key, zcache_free) == 0)
        atomic_store(&zcache_key_ok, true);
}

/* When this code is unloaded (dlclose of the nbdkit plugin or filter),
 * threads that exit later must not call a destructor that is gone.
 */
__attribute__((destructor)) static void
zcache_key_delete(void)
{
    if (atomic_exchange(&zcache_key_ok, false))
        pthread_key_delete(zcache_key);
}

/* The calling thread's cache, made on first use.  NULL: out of memory
 * (or no key), with the error set.
 */
static struct zcache *
zcache_get(void)
{
    struct zcache *z = zc_tls;

    if (z)
        return z;
    pthread_once(&zcache_once, zcache_key_create);
    if (!atomic_load(&zcache_key_ok)) {
        qcbt_error(EAGAIN, "cannot create the decompression cache key");
        return NULL;
    }
    z = calloc(1, sizeof *z);
    if (!z) {
        qcbt_error(ENOMEM, "out of memory");
        return NULL;
    }
    if (pthread_setspecific(zcache_key, z) != 0) {
        free(z);
        qcbt_error(ENOMEM, "out of memory");
        return NULL;
    }
    zc_tls = z;
    return z;
}

void
chain_release_thread_cache(void)
{
    struct zcache *z = zc_tls;

    if (!z)
        return;
    pthread_setspecific(zcache_key, NULL);
    zcache_free(z);
}

static int
read_compressed(struct chain *c,
                size_t li,
                uint64_t entry,
                uint64_t off,
                void *buf,
                size_t n)
{
    struct qcow2_image *img = c->layers[li].qcow2;
    size_t need_s = qcow2_compressed_scratch_size(img);
    struct zcache *zc = zcache_get();
    int r;

    if (!zc)
        return -qcbt_error_errno();
    if (!(zc->chain_id == c->id && zc->layer == li && zc->entry == entry &&
          zc->cluster)) {
        if (zc->cluster_size < img->cluster_size) {
            free(zc->cluster);
            zc->cluster = malloc(img->cluster_size);
            zc->cluster_size = zc->cluster ? img->cluster_size : 0;
        }
        if (zc->scratch_size < need_s) {
            free(zc->scratch);
            zc->scratch = malloc(need_s);
            zc->scratch_size = zc->scratch ? need_s : 0;
        }
        zc->chain_id = 0;
        if (!zc->cluster || !zc->scratch)
            return qcbt_error(ENOMEM, "out of memory");
        r = qcow2_read_compressed(img, entry, zc->cluster, zc->scratch);
        if (r < 0)
            return r;
        zc->chain_id = c->id;
        zc->layer = li;
        zc->entry = entry;
    }
    memcpy(buf, zc->cluster + (off & (img->cluster_size - 1)), n);
    return 0;
}

static int
read_layer(struct chain *c,
           size_t li,
           unsigned char *buf,
           size_t len,
           uint64_t off)
{
    struct chain_layer *l = &c->layers[li];
    int r;

    /* Bytes past this layer's end read as zeros. */
    if (off >= l->size) {
        memset(buf, 0, len);
        return 0;
    }
    if (len > l->size - off) {
        size_t inside = l->size - off;
        memset(buf + inside, 0, len - inside);
        len = inside;
    }

    if (!l->qcow2) {
        ssize_t n = l->io->ops->pread(l->io->opaque, buf, len, off);
        if (n < 0)
            return qcbt_error(-n,
                              "%s: read at 0x%" PRIx64 ": %s",
                              l->path,
                              off,
                              strerror(-n));
        memset(buf + n, 0, len - n); /* short raw file: sector tail */
        return 0;
    }

    while (len > 0) {
        struct qcow2_extent e;
        size_t n;

        r = qcow2_map(l->qcow2, off, len, &e);
        if (r < 0)
            return r;
        n = MIN((uint64_t)len, e.len);
        switch (e.kind) {
        case QCOW2_DATA: {
            struct qcbt_io *dio = l->qcow2->data_io;
            ssize_t got;

            if (!dio)
                return qcbt_error(EIO,
                                  "%s: external data file not open",
                                  l->path);
            got = dio->ops->pread(dio->opaque, buf, n, e.host_offset);
            if (got < 0)
                return qcbt_error(-got,
                                  "%s: read at host offset 0x%" PRIx64 ": %s",
                                  dio->name,
                                  e.host_offset,
                                  strerror(-got));
            /* QEMU does not pad the last cluster: the tail reads as zero. */
            memset(buf + got, 0, n - got);
            break;
        }
        case QCOW2_COMPRESSED:
            r = read_compressed(c, li, e.l2_entry, off, buf, n);
            if (r < 0)
                return r;
            break;
        case QCOW2_ZERO:
            memset(buf, 0, n);
            break;
        case QCOW2_UNALLOCATED:
            if (li + 1 < c->nr_layers) {
                r = read_layer(c, li + 1, buf, n, off);
                if (r < 0)
                    return r;
            } else {
                memset(buf, 0, n);
            }
            break;
        }
        buf += n;
        off += n;
        len -= n;
    }
    return 0;
}

int
chain_read(struct chain *c, void *buf, size_t len, uint64_t offset)
{
    if (offset > c->size || len > c->size - offset)
        return qcbt_error(EINVAL,
                          "read of %zu bytes at 0x%" PRIx64
                          " is outside the image (%" PRIu64 " bytes)",
                          len,
                          offset,
                          c->size);
    return read_layer(c, 0, buf, len, offset);
}

/* QEMU's block layer, for an image it deems metadata-preallocated, asks
 * the file system about the host range of a data cluster (bdrv_co_block_
 * status with BDRV_BLOCK_RECURSE): a hole there, or a range at or past
 * the end of the file, reads as zero.  Data stays data.
 */
static void
prealloc_zero(struct qcow2_image *img,
              uint64_t host,
              uint64_t *pnum,
              bool *zero)
{
    struct qcbt_io *dio = img->data_io;
    uint64_t fsize, n;
    bool is_data;

    if (!dio || !dio->ops->extent)
        return;
    fsize = (dio->size + 511) & ~511ULL;
    if (host >= fsize) {
        *zero = true;
        return;
    }
    if (dio->ops->extent(dio->opaque,
                         host,
                         MIN(*pnum, fsize - host),
                         &n,
                         &is_data) < 0)
        return; /* errors only lose the extra information */
    if (!is_data && host + n >= fsize) {
        /* A hole up to the end of the file: the rest reads as zero too. */
        *zero = true;
        return;
    }
    *pnum = n;
    *zero = !is_data;
}

/* Status of one layer: DATA/ZERO (allocated) or unallocated, as QEMU's
 * driver-level block status.
 */
static int
layer_status(struct chain *c,
             size_t li,
             uint64_t off,
             uint64_t len,
             uint64_t *pnum,
             bool *data,
             bool *zero,
             bool *compressed)
{
    struct chain_layer *l = &c->layers[li];
    int r;

    *data = *zero = *compressed = false;
    if (!l->qcow2) {
        bool is_data = true;

        *pnum = len;
        if (l->io->ops->extent) {
            r = l->io->ops->extent(l->io->opaque, off, len, pnum, &is_data);
            if (r < 0)
                return qcbt_error(-r, "%s: %s", l->path, strerror(-r));
        }
        *data = is_data;
        *zero = !is_data;
        return 0;
    }
    {
        struct qcow2_extent e;

        r = qcow2_map(l->qcow2, off, len, &e);
        if (r < 0)
            return r;
        *pnum = e.len;
        switch (e.kind) {
        case QCOW2_DATA:
            *data = true;
            if (e.offset_valid && qcow2_metadata_preallocated(l->qcow2))
                prealloc_zero(l->qcow2, e.host_offset, pnum, zero);
            break;
        case QCOW2_COMPRESSED:
            *data = *compressed = true;
            break;
        case QCOW2_ZERO:
            *zero = true;
            break;
        case QCOW2_UNALLOCATED:
            break;
        }
    }
    return 0;
}

int
chain_block_status(struct chain *c,
                   uint64_t offset,
                   uint64_t len,
                   struct chain_status *st)
{
    size_t li;
    int r;

    if (len == 0 || offset >= c->size)
        return qcbt_error(EINVAL,
                          "block status at 0x%" PRIx64 " is outside the image",
                          offset);
    len = MIN(len, c->size - offset);
    memset(st, 0, sizeof *st);

    /* Mirrors qemu-img map's walk: descend while the layer does not
     * allocate the range; a range past the next layer's end, or below the
     * base, reads as zero and is reported at the current depth.
     */
    for (li = 0;; li++) {
        uint64_t n;
        bool data, zero, compressed;

        r = layer_status(c, li, offset, len, &n, &data, &zero, &compressed);
        if (r < 0)
            return r;
        len = n;
        st->depth = li;
        if (data || zero) {
            st->present = true;
            st->data = data;
            st->zero = zero;
            st->compressed = compressed;
            break;
        }
        if (li + 1 >= c->nr_layers || offset >= c->layers[li + 1].size) {
            st->zero = true;
            break;
        }
        len = MIN(len, c->layers[li + 1].size - offset);
    }
    st->len = len;
    return 0;
}

int
chain_layer_allocated(struct chain *c,
                      size_t li,
                      uint64_t offset,
                      uint64_t len,
                      uint64_t *pnum,
                      bool *allocated)
{
    bool data, zero, compressed;
    int r;

    if (li >= c->nr_layers)
        return qcbt_error(EINVAL, "no layer %zu", li);
    if (offset >= c->layers[li].size) {
        *pnum = len;
        *allocated = false;
        return 0;
    }
    len = MIN(len, c->layers[li].size - offset);
    if (!c->layers[li].qcow2) {
        *pnum = len;
        *allocated = true;
        return 0;
    }
    r = layer_status(c, li, offset, len, pnum, &data, &zero, &compressed);
    *allocated = data || zero;
    return r;
}

int
chain_map_file(struct chain *c,
               uint64_t offset,
               uint64_t len,
               int *fd,
               uint64_t *host,
               uint64_t *n)
{
    size_t li;

    *n = 0;
    for (li = 0; li < c->nr_layers; li++) {
        struct chain_layer *l = &c->layers[li];
        struct qcbt_io *io;
        struct qcow2_extent e;
        int r;

        if (offset >= l->size)
            return 0; /* zeros past this layer's end */
        len = MIN(len, l->size - offset);
        if (!l->qcow2) {
            io = l->io;
            *host = offset;
        } else {
            r = qcow2_map(l->qcow2, offset, len, &e);
            if (r < 0)
                return r;
            if (e.kind == QCOW2_UNALLOCATED) {
                len = MIN(len, e.len);
                continue;
            }
            if (e.kind != QCOW2_DATA || !l->qcow2->data_io)
                return 0;
            io = l->qcow2->data_io;
            *host = e.host_offset;
            len = MIN(len, e.len);
        }
        if (io->fd < 0 || *host >= io->size)
            return 0;
        *fd = io->fd;
        *n = MIN(len, io->size - *host);
        return 0;
    }
    return 0;
}

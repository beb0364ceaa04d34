/* qcbt: backing chains and the guest view (DESIGN.md "Chain and guest
 * view").
 *
 * A chain is L0 (top, the image the user named) ... Ln (base).  The guest
 * byte at offset o comes from the first layer that allocates o (a zero
 * cluster counts as allocated); past a layer's end, or below the base, it
 * reads as zero.  Allocation answers are those of `qemu-img map
 * --output=json`: depth, present, zero, data.
 */
#ifndef QCBT_CHAIN_H
#define QCBT_CHAIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io.h"
#include "qcow2.h"

#define CHAIN_MAX_DEPTH_DEFAULT 64

enum chain_fmt { CHAIN_FMT_RAW, CHAIN_FMT_QCOW2 };

struct chain_layer {
    char *path; /* resolved path, as opened */
    enum chain_fmt fmt;
    bool fmt_probed;           /* format was not recorded: found by probing */
    struct qcbt_io *io;        /* the layer's file (qcow2: == qcow2->io) */
    struct qcow2_image *qcow2; /* NULL for raw */
    uint64_t size;             /* guest size of this layer */
    char *data_file_path;      /* resolved external data file, or NULL */
};

struct chain {
    size_t nr_layers;
    struct chain_layer *layers; /* [0] = top */
    uint64_t size;              /* guest size = layers[0].size */
    uint64_t id;                /* unique per open, for per-thread caches */
};

struct chain_open_opts {
    const char *format;   /* top format: "qcow2", "raw" or NULL (probe) */
    unsigned max_depth;   /* 0 = CHAIN_MAX_DEPTH_DEFAULT */
    bool no_backing;      /* open the top layer only */
    bool allow_data_file; /* open external data files anywhere (default:
                             only in the image's directory or below) */
    /* QEMU's image locks on every file the chain opens (each layer and
     * external data file, io.h qcbt_io_lock): READ refuses a chain a
     * running QEMU writes, as qemu-img info does, SHARED is
     * -U/--force-share.  NONE (the default) takes none.  The locks are
     * held until chain_close().  A file held by another process is
     * -EAGAIN, "layer N: FILE: held by another process (...)".
     */
    enum qcbt_io_lock_mode lock;
    /* The front end's spelling of SHARED ("-U/--force-share",
     * "force-share=true"), or NULL.  Given, a conflict of READ locks ends
     * its message with "; OPTION reads it anyway, but its data may be
     * inconsistent", so the one line says how to go on and at what cost.
     */
    const char *force_share_option;
};

/* The options every front end takes from the environment:
 * QCBT_ALLOW_DATA_FILE=1 (or "yes") sets O->allow_data_file; anything
 * else, or no variable, clears it.  The one parser of that variable.
 */
void chain_opts_from_env(struct chain_open_opts *o);

/* Open PATH and its whole backing chain, read-only.  Returns 0 and *out, or
 * -errno with a message naming the layer (index and file).
 */
int chain_open(const char *path,
               const struct chain_open_opts *opts,
               struct chain **out);

/* Build a one-layer chain from an already opened io (the nbdkit filter).
 * FORMAT as for chain_open; backing files are opened from local paths
 * relative to BACKING_DIR (NULL: no backing or data files allowed).
 */
int chain_open_io(struct qcbt_io *io,
                  const char *format,
                  const char *backing_dir,
                  const struct chain_open_opts *opts,
                  struct chain **out);

void chain_close(struct chain *c);

/* Read guest bytes [offset, offset+len) (must lie within c->size).
 * Returns 0 or -errno with a message.  Thread-safe.
 */
int chain_read(struct chain *c, void *buf, size_t len, uint64_t offset);

/* chain_read() keeps, per thread, the last decompressed cluster of a
 * compressed image (up to 6 MiB with 2 MiB clusters).  It is freed when
 * the thread exits; a long-lived thread that goes idle calls this to free
 * it now.  Thread-safe (it touches the calling thread's cache only).
 */
void chain_release_thread_cache(void);

/* Where guest range [offset, offset+len) lives, if it starts in plain
 * file data of one layer (a qcow2 data cluster run, a raw layer): *fd, the
 * host offset and *n > 0 bytes, so the caller may sendfile(2) them.  *n ==
 * 0 when the range starts in anything else (zeros, compressed data, a
 * tail past the end of a file, an io without a file descriptor): use
 * chain_read() then.  Returns 0 or -errno.  Thread-safe.
 */
int chain_map_file(struct chain *c,
                   uint64_t offset,
                   uint64_t len,
                   int *fd,
                   uint64_t *host,
                   uint64_t *n);

struct chain_status {
    uint64_t len;   /* bytes from offset with this status */
    unsigned depth; /* layer that answers (qemu-img map "depth") */
    bool present;   /* allocated in some layer ("present") */
    bool zero;      /* reads as zeros ("zero") */
    bool data;      /* "data" */
    bool compressed;
};

/* Status of the guest range starting at offset (len > 0, within the
 * image): the facts `qemu-img map --output=json` reports.
 */
int chain_block_status(struct chain *c,
                       uint64_t offset,
                       uint64_t len,
                       struct chain_status *st);

/* The allocation of one layer alone (for the merge engine: alloc(Li)).
 * *allocated is true where the layer itself holds data or zeros.
 */
int chain_layer_allocated(struct chain *c,
                          size_t layer,
                          uint64_t offset,
                          uint64_t len,
                          uint64_t *pnum,
                          bool *allocated);

const char *chain_fmt_name(enum chain_fmt fmt);

#endif /* QCBT_CHAIN_H */

/* nbdkit-qcbt-plugin: serve a qcow2 image and its whole backing chain
 * (the guest view), read-only, with base:allocation extents or, with
 * bitmap=NAME, the merged dirty view.  Glue between nbdkit's plugin API
 * and common/; see nbdkit-qcbt-plugin.pod.
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"
#include "error.h"
#include "qcbt-view.h"

#ifndef QCBT_VERSION
#define QCBT_VERSION "unknown"
#endif

/* Debug flags: -D qcbt.extents=1 logs every extent reported, -D
 * qcbt.reads=1 every read request.
 */
NBDKIT_DLL_PUBLIC int qcbt_debug_extents;
NBDKIT_DLL_PUBLIC int qcbt_debug_reads;

/* Parameters (strings owned by nbdkit, or by us when noted). */
static char *image;                  /* file=, absolute; owned */
static const char *format = "qcow2"; /* qcow2, raw or NULL (auto) */
static struct qcbt_view_opts vopts;
static bool force_share; /* force-share=true: SHARED locks */

/* Built in .get_ready, immutable until .unload. */
static struct qcbt_view view;
static bool view_ready;

static void
qcbt_unload(void)
{
    if (view_ready)
        qcbt_view_free(&view);
    view_ready = false;
    free(image);
    image = NULL;
}

static void
qcbt_dump_plugin(void)
{
    printf("qcbt_version=%s\n", QCBT_VERSION);
    printf("qcbt_formats=qcow2,raw\n");
    printf("qcbt_compression=deflate,zstd\n");
    printf("qcbt_backing_chains=yes\n");
    printf("qcbt_bitmap=yes\n");
    printf("qcbt_dirty_only=yes\n");
    printf("qcbt_meta_contexts=base:allocation\n");
}

static int
qcbt_config(const char *key, const char *value)
{
    int r = qcbt_view_config(&vopts, key, value);

    if (r != 0)
        return r < 0 ? -1 : 0;
    if (strcmp(key, "file") == 0) {
        free(image);
        /* Absolute (nbdkit changes directory when it daemonizes), but
         * symlinks are kept: backing files resolve relative to the
         * directory of the name the user gave, as QEMU does.
         */
        image = nbdkit_absolute_path(value);
        return image ? 0 : -1;
    }
    if (strcmp(key, "force-share") == 0) {
        int b = nbdkit_parse_bool(value);

        if (b < 0)
            return -1;
        force_share = b;
        return 0;
    }
    if (strcmp(key, "format") == 0) {
        if (strcmp(value, "qcow2") == 0 || strcmp(value, "raw") == 0)
            format = value;
        else if (strcmp(value, "auto") == 0)
            format = NULL;
        else {
            nbdkit_error("format: expected qcow2, raw or auto, not '%s'",
                         value);
            return -1;
        }
        return 0;
    }
    nbdkit_error("unknown parameter '%s'", key);
    return -1;
}

static int
qcbt_config_complete(void)
{
    if (!image) {
        nbdkit_error("you must give the image: file=IMAGE");
        return -1;
    }
    return qcbt_view_config_complete(&vopts);
}

#define qcbt_config_help                                                    \
    "[file=]IMAGE         (required) The qcow2 image (top of the chain).\n" \
    "format=qcow2|raw|auto  Format of IMAGE (default: "                     \
    "qcow2).\n"                                                             \
    "force-share=true     Serve an image another process writes (its\n"     \
    "                     data may be inconsistent).\n" QCBT_VIEW_CONFIG_HELP

/* Open the chain and merge the bitmap before nbdkit forks, so that a bad
 * image stops nbdkit with the reason on stderr.  The image locks (those
 * of qemu-nbd -r, or with force-share=true those of -U) are taken here,
 * where the image is opened: they are OFD locks, owned by the open file
 * description, so the daemon nbdkit forks off holds them on.
 */
static int
qcbt_get_ready(void)
{
    struct chain_open_opts copts = {
        .format = format,
        .lock = force_share ? QCBT_IO_LOCK_SHARED : QCBT_IO_LOCK_READ,
        .force_share_option = "force-share=true",
    };
    struct chain *c = NULL;
    int r;

    chain_opts_from_env(&copts);
    r = chain_open(image, &copts, &c);
    if (r < 0) {
        nbdkit_error("qcbt: %s", qcbt_error_get());
        return -1;
    }
    if (qcbt_view_init(&view, c, &vopts, image) < 0)
        return -1;
    view_ready = true;
    return 0;
}

static void *
qcbt_open(int readonly)
{
    return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
qcbt_get_size(void *handle)
{
    return (int64_t)view.size;
}

static const char *
qcbt_export_description(void *handle)
{
    return view.description;
}

static int
qcbt_block_size(void *handle,
                uint32_t *minimum,
                uint32_t *preferred,
                uint32_t *maximum)
{
    qcbt_view_block_size(&view, minimum, preferred, maximum);
    return 0;
}

static int
qcbt_can_write(void *handle)
{
    return 0;
}

/* Zeroing needs writing: neither zero nor fast zero is ever possible. */
static int
qcbt_can_zero(void *handle)
{
    return 0;
}

static int
qcbt_can_fast_zero(void *handle)
{
    return 0;
}

/* The view is immutable: every connection sees the same bytes. */
static int
qcbt_can_multi_conn(void *handle)
{
    return 1;
}

static int
qcbt_can_extents(void *handle)
{
    return 1;
}

/* A prefetch is worth what a read is (it warms the page cache and the L2
 * cache); the layers are local files that the kernel reads ahead anyway,
 * so nbdkit's emulation (a read whose data is dropped) is the honest
 * answer rather than a native callback that would do the same.
 */
static int
qcbt_can_cache(void *handle)
{
    return NBDKIT_CACHE_EMULATE;
}

static int
qcbt_pread(void *handle,
           void *buf,
           uint32_t count,
           uint64_t offset,
           uint32_t flags)
{
    int r = qcbt_view_pread(&view, buf, count, offset);

    if (r < 0) {
        nbdkit_set_error(-r);
        return -1;
    }
    return 0;
}

static int
qcbt_extents(void *handle,
             uint32_t count,
             uint64_t offset,
             uint32_t flags,
             struct nbdkit_extents *ex)
{
    int r = qcbt_view_extents(&view,
                              count,
                              offset,
                              flags & NBDKIT_FLAG_REQ_ONE,
                              ex);

    if (r < 0) {
        nbdkit_set_error(-r);
        return -1;
    }
    return 0;
}

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static struct nbdkit_plugin plugin = {
    .name = "qcbt",
    .longname = "qcbt qcow2 chain and dirty bitmap plugin",
    .version = QCBT_VERSION,
    .description = "Serve the guest view of a qcow2 backing chain, "
                   "read-only, with its merged dirty bitmap as extents",
    .unload = qcbt_unload,
    .dump_plugin = qcbt_dump_plugin,
    .config = qcbt_config,
    .config_complete = qcbt_config_complete,
    .config_help = qcbt_config_help,
    .magic_config_key = "file",
    .get_ready = qcbt_get_ready,
    .open = qcbt_open,
    .get_size = qcbt_get_size,
    .export_description = qcbt_export_description,
    .block_size = qcbt_block_size,
    .can_write = qcbt_can_write,
    .can_zero = qcbt_can_zero,
    .can_fast_zero = qcbt_can_fast_zero,
    .can_multi_conn = qcbt_can_multi_conn,
    .can_extents = qcbt_can_extents,
    .can_cache = qcbt_can_cache,
    .pread = qcbt_pread,
    .extents = qcbt_extents,
    .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN(plugin)

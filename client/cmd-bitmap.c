/* qcbt bitmap: list, check, dump and digest persistent bitmaps, merged
 * across the backing chain (DESIGN.md "The merge engine").
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap-digest.h"
#include "bitmap.h"
#include "chain.h"
#include "error.h"
#include "json-out.h"
#include "merge.h"
#include "io.h"
#include "qcbt.h"
#include "qcow2-store.h"

static void
bitmap_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt bitmap list   [--json] IMAGE\n"
            "       qcbt bitmap check  [--json] [--strict] IMAGE NAME\n"
            "       qcbt bitmap dump   [--json] [--strict] IMAGE NAME\n"
            "       qcbt bitmap sha256 [--strict] [--layer N] IMAGE NAME\n"
            "       qcbt bitmap add [-g SIZE] [--disabled] IMAGE NAME\n"
            "       qcbt bitmap remove|clear|enable|disable IMAGE NAME\n"
            "       qcbt bitmap merge [-b FILE] IMAGE NAME SOURCE\n"
            "\n"
            "Persistent dirty bitmaps of IMAGE's backing chain.  NAME is a\n"
            "checkpoint: one bitmap per checkpoint, same-named bitmaps in\n"
            "overlays created after it (libvirt's model).\n"
            "\n"
            "  list    every layer's bitmaps: granularity, flags, dirty "
            "bytes,\n"
            "          status\n"
            "  check   can a backup since NAME be incremental?  Which layers\n"
            "          contribute their bitmap and which their allocation,\n"
            "          and why.  Exit 0 usable, 2 a full backup is needed\n"
            "  dump    the merged dirty extents over the whole disk (the "
            "shape\n"
            "          of 'nbdinfo --map' for qemu:dirty-bitmap:NAME)\n"
            "  sha256  QEMU's x-debug-block-dirty-bitmap-sha256 of the "
            "merged\n"
            "          bitmap, or of layer N's stored bitmap with --layer\n"
            "\n"
            "Changing the bitmaps of the qcow2 file IMAGE itself (not its\n"
            "backing files), as 'qemu-img bitmap' does; the image is locked\n"
            "as qemu-img locks it:\n"
            "  add     a new empty persistent bitmap NAME, enabled unless\n"
            "          --disabled, granularity SIZE (-g)\n"
            "  remove  delete NAME and free its clusters\n"
            "  clear   make NAME empty\n"
            "  enable  NAME records guest writes (flag auto)\n"
            "  disable NAME stops recording\n"
            "  merge   add the bits of bitmap SOURCE (of IMAGE, or of the\n"
            "          qcow2 FILE with -b; same virtual size) to NAME\n"
            "\n"
            "  --strict     libvirt's rules: NAME in every layer from the top\n"
            "               down to the deepest that holds it, none in use.\n"
            "               Default (tolerant): layers without a usable NAME\n"
            "               contribute everything they allocate\n"
            "  --json       JSON output\n"
            "  --layer N    sha256 of layer N's own bitmap (0 = top)\n"
            "  -g, --granularity SIZE  add: bytes per bit, a power of two\n"
            "               from 512 to 2G (K, M, G suffixes); default as\n"
            "               QEMU: the cluster size, at least 4K, at most 64K\n"
            "  --disabled   add: create the bitmap disabled\n"
            "  -b FILE      merge: SOURCE is a bitmap of FILE\n"
            "  -f FORMAT    format of IMAGE (qcow2 or raw; default probe)\n"
            "  -U, --force-share\n"
            "               read an image another process writes (a running\n"
            "               VM): the bitmaps may be inconsistent\n"
            "  -h, --help   show this help\n");
}

struct bopts {
    bool json, strict;
    long layer; /* -1: merged */
    const char *format;
    const char *image;
    const char *name;
};

static const char *
status_name(enum qcow2_bitmap_status s)
{
    return s == QCOW2_BITMAP_OK       ? "ok"
           : s == QCOW2_BITMAP_IN_USE ? "in-use"
                                      : "invalid";
}

static int
do_list(struct chain *c, struct merge_ctx *ctx, const struct bopts *o)
{
    size_t li, k;
    int r;

    if (o->json)
        printf("{\n  \"layers\": [");
    for (li = 0; li < c->nr_layers; li++) {
        const struct qcow2_bitmap_list *bl;
        char esc[1100];

        r = merge_ctx_layer_bitmaps(ctx, li, &bl);
        if (r < 0)
            return report_error();
        if (o->json) {
            printf("%s\n    {\"depth\": %zu, \"filename\": ",
                   li ? "," : "",
                   li);
            json_string(stdout, c->layers[li].path);
            printf(", \"usable\": %s", bl->usable ? "true" : "false");
            if (bl->reason[0]) {
                printf(", \"error\": ");
                json_string(stdout, bl->reason);
            }
            printf(", \"bitmaps\": [");
        } else {
            printf("layer %zu: %s",
                   li,
                   qcbt_escape(esc,
                               sizeof esc,
                               c->layers[li].path,
                               strlen(c->layers[li].path)));
            if (bl->reason[0])
                printf(" (bitmaps unusable: %s)",
                       qcbt_escape(esc,
                                   sizeof esc,
                                   bl->reason,
                                   strlen(bl->reason)));
            printf("%s\n", bl->nr ? "" : "\n  (no bitmaps)");
        }
        for (k = 0; k < bl->nr; k++) {
            const struct qcow2_bitmap_info *bi = &bl->bitmaps[k];
            enum qcow2_bitmap_status st = bi->status;
            const char *reason = bi->reason;
            struct bitmap *bm = NULL;
            char load_err[400];
            bool have_bytes = false;
            uint64_t bytes = 0;

            if (st == QCOW2_BITMAP_OK) {
                r = qcow2_bitmap_load_data(c->layers[li].qcow2, bi, 0, &bm);
                if (r == -ENOMEM)
                    return report_error();
                if (r < 0) {
                    st = QCOW2_BITMAP_INVALID;
                    snprintf(load_err, sizeof load_err, "%s", qcbt_error_get());
                    reason = load_err;
                } else {
                    bytes = bitmap_dirty_bytes(bm);
                    have_bytes = true;
                    bitmap_free(bm);
                }
            }
            if (o->json) {
                printf("%s\n      {\"name\": ", k ? "," : "");
                json_string(stdout, bi->name);
                printf(", \"granularity\": %llu, \"in-use\": %s, "
                       "\"enabled\": %s, \"dirty-bytes\": ",
                       bi->granularity_bits < 64 ? 1ULL << bi->granularity_bits
                                                 : 0ULL,
                       (bi->flags & QCOW2_BME_FLAG_IN_USE) ? "true" : "false",
                       (bi->flags & QCOW2_BME_FLAG_AUTO) ? "true" : "false");
                if (have_bytes)
                    printf("%" PRIu64, bytes);
                else
                    printf("null");
                printf(", \"status\": \"%s\"", status_name(st));
                if (st != QCOW2_BITMAP_OK) {
                    printf(", \"reason\": ");
                    json_string(stdout, reason);
                }
                printf("}");
            } else {
                printf("  %-24s granularity %-10llu %-8s %-8s ",
                       qcbt_escape(esc, sizeof esc, bi->name, strlen(bi->name)),
                       bi->granularity_bits < 64 ? 1ULL << bi->granularity_bits
                                                 : 0ULL,
                       (bi->flags & QCOW2_BME_FLAG_AUTO) ? "enabled"
                                                         : "disabled",
                       (bi->flags & QCOW2_BME_FLAG_IN_USE) ? "in-use" : "");
                if (have_bytes)
                    printf("dirty %" PRIu64 " bytes\n", bytes);
                else
                    printf(
                        "%s: %s\n",
                        status_name(st),
                        qcbt_escape(esc, sizeof esc, reason, strlen(reason)));
            }
        }
        if (o->json)
            printf("%s]}", bl->nr ? "\n    " : "");
    }
    if (o->json)
        printf("\n  ]\n}\n");
    return QCBT_EXIT_OK;
}

static const char *
source_name(enum merge_source s)
{
    return s == MERGE_SRC_BITMAP       ? "bitmap"
           : s == MERGE_SRC_ALLOCATION ? "allocation"
                                       : "none";
}

static int
run_merge(struct chain *c,
          struct merge_ctx *ctx,
          const struct bopts *o,
          struct merge_result **res)
{
    struct merge_opts mo = {.mode = o->strict ? MERGE_STRICT : MERGE_TOLERANT};
    int r = merge_run(ctx, o->name, &mo, res);

    if (r < 0)
        return report_error();
    return QCBT_EXIT_OK;
}

static int
do_check(struct chain *c, struct merge_ctx *ctx, const struct bopts *o)
{
    struct merge_result *res = NULL;
    size_t i;
    int ret = run_merge(c, ctx, o, &res);

    if (ret != QCBT_EXIT_OK)
        return ret;
    if (o->json) {
        printf("{\n  \"name\": ");
        json_string(stdout, o->name);
        printf(",\n  \"mode\": \"%s\",\n  \"usable\": %s",
               o->strict ? "strict" : "tolerant",
               res->usable ? "true" : "false");
        if (!res->usable) {
            printf(",\n  \"error\": ");
            json_string(stdout, res->error);
        } else {
            printf(",\n  \"granularity\": %" PRIu64
                   ",\n  \"deepest-layer\": %zu,\n  \"fallbacks\": %zu,"
                   "\n  \"dirty-bytes\": %" PRIu64,
                   res->bm->granularity,
                   res->deepest,
                   res->nr_fallbacks,
                   bitmap_dirty_bytes(res->bm));
        }
        printf(",\n  \"layers\": [");
        for (i = 0; i < c->nr_layers; i++) {
            const struct merge_layer *ml = &res->layers[i];

            printf("%s\n    {\"depth\": %zu, \"filename\": ", i ? "," : "", i);
            json_string(stdout, c->layers[i].path);
            printf(", \"source\": \"%s\"",
                   res->usable ? source_name(ml->source) : "none");
            if (res->usable && ml->source == MERGE_SRC_BITMAP)
                printf(", \"granularity\": %" PRIu64 ", \"enabled\": %s",
                       ml->granularity,
                       ml->enabled ? "true" : "false");
            if (res->usable && ml->reason[0]) {
                printf(", \"reason\": ");
                json_string(stdout, ml->reason);
            }
            printf("}");
        }
        printf("\n  ]\n}\n");
    } else if (res->usable) {
        printf("bitmap '%s': usable for an incremental backup (%s mode)\n",
               o->name,
               o->strict ? "strict" : "tolerant");
        printf("granularity %" PRIu64 ", %" PRIu64 " dirty bytes, deepest "
               "layer %zu\n",
               res->bm->granularity,
               bitmap_dirty_bytes(res->bm),
               res->deepest);
        for (i = 0; i < c->nr_layers; i++) {
            const struct merge_layer *ml = &res->layers[i];

            printf("  layer %zu (%s): ", i, c->layers[i].path);
            if (ml->source == MERGE_SRC_BITMAP)
                printf("bitmap, granularity %" PRIu64 "%s\n",
                       ml->granularity,
                       ml->enabled ? "" : ", disabled");
            else if (ml->source == MERGE_SRC_ALLOCATION)
                printf("allocation map (%s)\n", ml->reason);
            else
                printf("not needed (below the deepest layer holding it)\n");
        }
    }
    if (!res->usable) {
        fflush(stdout);
        die_msg("a full backup is needed: %s", res->error);
        ret = QCBT_EXIT_FULL;
    } else if (res->nr_fallbacks && !o->json) {
        /* Each fallback is reported; the result stays sound. */
        for (i = 0; i < c->nr_layers; i++)
            if (res->layers[i].source == MERGE_SRC_ALLOCATION)
                fprintf(stderr,
                        "qcbt: warning: layer %zu contributes its "
                        "allocation map: %s\n",
                        i,
                        res->layers[i].reason);
    }
    merge_result_free(res);
    return ret;
}

static int
do_dump(struct chain *c, struct merge_ctx *ctx, const struct bopts *o)
{
    struct merge_result *res = NULL;
    struct bitmap_extent e;
    uint64_t pos;
    bool first = true;
    int ret = run_merge(c, ctx, o, &res);

    if (ret != QCBT_EXIT_OK)
        return ret;
    if (!res->usable) {
        die_msg("a full backup is needed: %s", res->error);
        merge_result_free(res);
        return QCBT_EXIT_FULL;
    }
    if (o->json)
        printf("[\n");
    for (pos = 0; pos < c->size; pos += e.len) {
        if (merge_result_extent(res, pos, UINT64_MAX, &e) < 0) {
            merge_result_free(res);
            return report_error();
        }
        if (o->json)
            printf("%s{ \"offset\": %" PRIu64 ", \"length\": %" PRIu64
                   ", \"type\": %d, \"description\": \"%s\"}",
                   first ? "" : ",\n",
                   e.offset,
                   e.len,
                   e.dirty ? 1 : 0,
                   e.dirty ? "dirty" : "clean");
        else
            printf("%10" PRIu64 "  %10" PRIu64 "  %3d  %s\n",
                   e.offset,
                   e.len,
                   e.dirty ? 1 : 0,
                   e.dirty ? "dirty" : "clean");
        first = false;
    }
    if (o->json)
        printf("%s]\n", first ? "" : "\n");
    merge_result_free(res);
    return QCBT_EXIT_OK;
}

static int
do_sha256(struct chain *c, struct merge_ctx *ctx, const struct bopts *o)
{
    char hex[BITMAP_SHA256_HEX_LEN + 1];
    int r;

    if (o->layer >= 0) {
        const struct qcow2_bitmap_list *bl;
        const struct qcow2_bitmap_info *bi = NULL;
        struct bitmap *bm;
        size_t k;

        if ((size_t)o->layer >= c->nr_layers) {
            die_msg("bitmap sha256: no layer %ld (the chain has %zu)",
                    o->layer,
                    c->nr_layers);
            return QCBT_EXIT_ERROR;
        }
        if (merge_ctx_layer_bitmaps(ctx, o->layer, &bl) < 0)
            return report_error();
        for (k = 0; k < bl->nr; k++)
            if (strcmp(bl->bitmaps[k].name, o->name) == 0)
                bi = &bl->bitmaps[k];
        if (!bi) {
            die_msg("bitmap '%s' not found in layer %ld (%s)",
                    o->name,
                    o->layer,
                    c->layers[o->layer].path);
            return QCBT_EXIT_ERROR;
        }
        if (bi->status == QCOW2_BITMAP_IN_USE) {
            /* QEMU never loads an in-use bitmap: it hashes all zeros. */
            r = bitmap_sha256_zero(c->layers[o->layer].size,
                                   1ULL << bi->granularity_bits,
                                   hex);
        } else {
            r = qcow2_bitmap_load_data(c->layers[o->layer].qcow2,
                                       bi,
                                       BITMAP_RAW,
                                       &bm);
            if (r < 0)
                return report_error();
            r = bitmap_sha256(bm, hex);
            bitmap_free(bm);
        }
        if (r < 0)
            return report_error();
    } else {
        struct merge_result *res = NULL;
        int ret = run_merge(c, ctx, o, &res);

        if (ret != QCBT_EXIT_OK)
            return ret;
        if (!res->usable) {
            die_msg("a full backup is needed: %s", res->error);
            merge_result_free(res);
            return QCBT_EXIT_FULL;
        }
        r = bitmap_sha256(res->bm, hex);
        merge_result_free(res);
        if (r < 0)
            return report_error();
    }
    printf("%s\n", hex);
    return QCBT_EXIT_OK;
}

static const struct {
    const char *name;
    enum qcow2_bitmap_op op;
} modify_subs[] = {
    {"add", QCOW2_BITMAP_ADD},
    {"remove", QCOW2_BITMAP_REMOVE},
    {"clear", QCOW2_BITMAP_CLEAR},
    {"enable", QCOW2_BITMAP_ENABLE},
    {"disable", QCOW2_BITMAP_DISABLE},
    {"merge", QCOW2_BITMAP_MERGE},
};

/* The consistent bitmap NAME of the qcow2 FILE, opened read-only and
 * locked as qemu-img locks a source.  0 and *out NULL when FILE is NULL
 * or the target IMG's own file: qcow2_bitmap_merge_named() reads it
 * through IMG (a second open would conflict with our own lock). */
static int
load_source(struct qcow2_image *img,
            const char *file,
            const char *name,
            struct bitmap **out)
{
    struct qcbt_io *io = NULL;
    struct qcow2_image *src = NULL;
    int r;

    *out = NULL;
    if (!file)
        return 0;
    r = qcbt_io_open_file(file, &io);
    if (r < 0)
        return r;
    if (io->dev == img->io->dev && io->ino == img->io->ino) {
        qcbt_io_free(io);
        return 0;
    }
    r = qcbt_io_lock(io, QCBT_IO_LOCK_READ);
    if (r < 0) {
        qcbt_io_free(io);
        return r;
    }
    r = qcow2_open(io, &src);
    if (r < 0)
        return r;
    r = qcow2_bitmap_load_named(src, name, out);
    qcow2_close(src);
    return r;
}

/* add/remove/clear/enable/disable/merge: the qcow2 file IMAGE,
 * read-write, holding the image locks qemu-img bitmap holds.  SOURCE
 * (merge): a bitmap of FILE, or of IMAGE when FILE is NULL. */
static int
do_modify(enum qcow2_bitmap_op op,
          const char *image,
          const char *name,
          unsigned gbits,
          bool disabled,
          const char *source,
          const char *file)
{
    struct qcbt_io *io = NULL;
    struct qcow2_image *img = NULL;
    struct bitmap *src = NULL;
    int r;

    r = qcbt_io_open_file_rw(image, &io);
    if (r < 0)
        return report_error();
    r = qcbt_io_lock(io, QCBT_IO_LOCK_WRITE);
    if (r < 0) {
        qcbt_io_free(io);
        return report_error();
    }
    r = qcow2_open(io, &img); /* owns io from here */
    if (r < 0)
        return report_error();
    if (op == QCOW2_BITMAP_MERGE) {
        r = load_source(img, file, source, &src);
        if (r == 0)
            r = src ? qcow2_bitmap_merge(img, name, src)
                    : qcow2_bitmap_merge_named(img, name, source);
        bitmap_free(src);
    } else {
        r = qcow2_bitmap_modify(img, op, name, gbits, disabled);
    }
    qcow2_close(img);
    return r < 0 ? report_error() : QCBT_EXIT_OK;
}

int
cmd_bitmap(int argc, char **argv)
{
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'},
        {"strict", no_argument, NULL, 's'},
        {"layer", required_argument, NULL, 'L'},
        {"format", required_argument, NULL, 'f'},
        {"granularity", required_argument, NULL, 'g'},
        {"disabled", no_argument, NULL, 'D'},
        {"source-file", required_argument, NULL, 'b'},
        {"force-share", no_argument, NULL, 'U'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "b:f:g:hU";
    struct bopts o = {.layer = -1};
    struct chain_open_opts copts = {
        .lock = QCBT_IO_LOCK_READ,
        .force_share_option = "-U/--force-share",
    };
    struct chain *c = NULL;
    struct merge_ctx *ctx = NULL;
    static const char *const subs[] = {"list",
                                       "check",
                                       "dump",
                                       "sha256",
                                       "add",
                                       "remove",
                                       "clear",
                                       "enable",
                                       "disable",
                                       "merge"};
    const char *granularity = NULL, *file = NULL;
    bool disabled = false;
    uint64_t gran = 0; /* 0: QEMU's default for the image */
    const char *sub = NULL;
    char cmd[16] = "bitmap";
    int opt, ret, nargs;
    size_t i;
    char *end;

    /* Options may come before or after the subcommand (getopt permutes);
     * messages name the subcommand when it comes first.
     */
    for (i = 0; argc > 1 && i < sizeof subs / sizeof subs[0]; i++)
        if (strcmp(argv[1], subs[i]) == 0)
            snprintf(cmd, sizeof cmd, "bitmap %s", subs[i]);
    while ((opt = getopt_long(argc, argv, optstring, opts, NULL)) != -1) {
        switch (opt) {
        case 'j':
            o.json = true;
            break;
        case 's':
            o.strict = true;
            break;
        case 'L':
            errno = 0;
            o.layer = strtol(optarg, &end, 10);
            if (errno || *end || end == optarg || o.layer < 0)
                return usage_error(cmd, "invalid --layer '%s'", optarg);
            break;
        case 'f':
            copts.format = optarg;
            break;
        case 'g':
            granularity = optarg;
            break;
        case 'D':
            disabled = true;
            break;
        case 'b':
            file = optarg;
            break;
        case 'U':
            copts.lock = QCBT_IO_LOCK_SHARED;
            break;
        case 'h':
            bitmap_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            return usage_getopt_error(cmd, argc, argv, optstring, opts);
        }
    }
    if (optind >= argc)
        return usage_error("bitmap",
                           "expected a subcommand: list, check, dump, "
                           "sha256, add, remove, clear, enable, "
                           "disable or merge");
    for (i = 0; i < sizeof subs / sizeof subs[0]; i++)
        if (strcmp(argv[optind], subs[i]) == 0)
            sub = subs[i];
    if (!sub)
        return usage_error(
            "bitmap",
            "unknown subcommand '%s': list, check, dump, sha256, add, "
            "remove, clear, enable, disable or merge",
            argv[optind]);
    snprintf(cmd, sizeof cmd, "bitmap %s", sub);
    optind++;
    nargs = strcmp(sub, "list") == 0 ? 1 : strcmp(sub, "merge") == 0 ? 3 : 2;
    if (argc - optind != nargs)
        return usage_error(cmd,
                           "expected %s",
                           nargs == 1   ? "IMAGE"
                           : nargs == 3 ? "IMAGE NAME SOURCE"
                                        : "IMAGE NAME");
    if (file && strcmp(sub, "merge") != 0)
        return usage_error(cmd, "-b is only for merge");
    if (o.layer >= 0 && strcmp(sub, "sha256") != 0)
        return usage_error(cmd, "--layer is only for sha256");
    for (i = 0; i < sizeof modify_subs / sizeof modify_subs[0]; i++) {
        if (strcmp(sub, modify_subs[i].name) != 0)
            continue;
        if (o.json || o.strict || copts.format)
            return usage_error(cmd,
                               "--json, --strict and -f are not for %s",
                               sub);
        if (copts.lock == QCBT_IO_LOCK_SHARED)
            return usage_error(cmd,
                               "-U/--force-share is not for %s: it writes "
                               "the image, which needs it to itself",
                               sub);
        if ((granularity || disabled) && modify_subs[i].op != QCOW2_BITMAP_ADD)
            return usage_error(cmd, "-g and --disabled are only for add");
        if (granularity && (parse_size(granularity, &gran) < 0 || gran < 512 ||
                            gran > (1ULL << 31) || (gran & (gran - 1))))
            return usage_error(cmd,
                               "invalid granularity '%s': a power of two "
                               "from 512 to 2G",
                               granularity);
        return do_modify(modify_subs[i].op,
                         argv[optind],
                         argv[optind + 1],
                         gran ? (unsigned)__builtin_ctzll(gran) : 0,
                         disabled,
                         nargs == 3 ? argv[optind + 2] : NULL,
                         file);
    }
    if (granularity || disabled)
        return usage_error(cmd, "-g and --disabled are only for add");
    o.format = copts.format;
    o.image = argv[optind];
    o.name = nargs == 2 ? argv[optind + 1] : NULL;

    chain_opts_from_env(&copts);

    if (chain_open(o.image, &copts, &c) < 0)
        return report_error();
    if (merge_ctx_new(c, &ctx) < 0) {
        chain_close(c);
        return report_error();
    }
    if (strcmp(sub, "list") == 0)
        ret = do_list(c, ctx, &o);
    else if (strcmp(sub, "check") == 0)
        ret = do_check(c, ctx, &o);
    else if (strcmp(sub, "dump") == 0)
        ret = do_dump(c, ctx, &o);
    else
        ret = do_sha256(c, ctx, &o);
    merge_ctx_free(ctx);
    chain_close(c);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        die_msg("writing to standard output failed");
        ret = QCBT_EXIT_ERROR;
    }
    return ret;
}

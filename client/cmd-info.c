/* qcbt info: an image's backing chain and each layer. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"
#include "error.h"
#include "json-out.h"
#include "qcbt.h"
#include "qcow2-bitmaps.h"

static void
info_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt info [--json] [-f FORMAT] [-U] IMAGE\n"
            "\n"
            "Show the backing chain of IMAGE and, per layer: file, format,\n"
            "version, virtual size, cluster size, features, backing file "
            "(as\n"
            "stored and as resolved), external data file and bitmaps.\n"
            "\n"
            "  -f, --format FMT  format of IMAGE: qcow2 or raw (default: "
            "probe)\n"
            "      --json        JSON output\n"
            "  -U, --force-share read an image another process writes (a\n"
            "                    running VM): its data may be inconsistent\n"
            "  -h, --help        show this help\n");
}

static const char *
human_size(uint64_t n, char *buf, size_t len)
{
    static const char *units[] =
        {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    double v = n;
    unsigned u = 0;

    while (v >= 1024 && u < 6) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%" PRIu64 " B", n);
    else
        snprintf(buf, len, "%.3g %s", v, units[u]);
    return buf;
}

/* The named bits of one feature word, as a JSON array or a list. */
static void
print_features(const struct qcow2_image *img,
               uint8_t type,
               uint64_t bits,
               bool json)
{
    bool first = true;
    unsigned b;

    if (json)
        putchar('[');
    for (b = 0; b < 64; b++) {
        const char *name;
        char unk[32];

        if (!(bits & (1ULL << b)))
            continue;
        name = qcow2_feature_name(img, type, b);
        if (!name) {
            snprintf(unk, sizeof unk, "bit %u", b);
            name = unk;
        }
        if (json) {
            printf("%s", first ? "" : ", ");
            json_string(stdout, name);
        } else {
            char esc[64];
            printf("%s%s",
                   first ? "" : ", ",
                   qcbt_escape(esc, sizeof esc, name, strlen(name)));
        }
        first = false;
    }
    if (json)
        putchar(']');
    else if (first)
        printf("none");
}

static const char *
compat_name(const struct qcow2_image *img)
{
    return img->hdr.version == 2 ? "0.10" : "1.1";
}

static const char *
status_name(enum qcow2_bitmap_status s)
{
    switch (s) {
    case QCOW2_BITMAP_OK:
        return "ok";
    case QCOW2_BITMAP_IN_USE:
        return "in-use";
    case QCOW2_BITMAP_INVALID:
        break;
    }
    return "invalid";
}

/* The layer's bitmaps (names, flags, granularity, status). */
static void
print_bitmaps_json(struct qcow2_image *q)
{
    struct qcow2_bitmap_list *bl = NULL;
    size_t k;

    if (qcow2_bitmaps_load(q, &bl) < 0) {
        printf(",\n      \"bitmaps\": null");
        return;
    }
    printf(",\n      \"bitmaps-usable\": %s", bl->usable ? "true" : "false");
    if (bl->reason[0]) {
        printf(",\n      \"bitmaps-error\": ");
        json_string(stdout, bl->reason);
    }
    printf(",\n      \"bitmaps\": [");
    for (k = 0; k < bl->nr; k++) {
        const struct qcow2_bitmap_info *b = &bl->bitmaps[k];

        printf("%s\n        {\"name\": ", k ? "," : "");
        json_string(stdout, b->name);
        printf(", \"granularity\": %llu, \"flags\": [%s%s%s], "
               "\"status\": \"%s\"",
               b->granularity_bits < 64 ? 1ULL << b->granularity_bits : 0,
               (b->flags & QCOW2_BME_FLAG_IN_USE) ? "\"in-use\"" : "",
               (b->flags & QCOW2_BME_FLAG_IN_USE) &&
                       (b->flags & QCOW2_BME_FLAG_AUTO)
                   ? ", "
                   : "",
               (b->flags & QCOW2_BME_FLAG_AUTO) ? "\"auto\"" : "",
               status_name(b->status));
        if (b->status != QCOW2_BITMAP_OK) {
            printf(", \"reason\": ");
            json_string(stdout, b->reason);
        }
        printf("}");
    }
    printf("%s]", bl->nr ? "\n      " : "");
    qcow2_bitmap_list_free(bl);
}

static void
print_bitmaps_human(struct qcow2_image *q)
{
    struct qcow2_bitmap_list *bl = NULL;
    char esc[1100];
    size_t k;

    if (qcow2_bitmaps_load(q, &bl) < 0 || (!bl->present && !bl->reason[0])) {
        qcow2_bitmap_list_free(bl);
        return;
    }
    printf("  bitmaps:       %zu", bl->nr);
    if (!bl->usable)
        printf(" (unusable: %s)",
               qcbt_escape(esc, sizeof esc, bl->reason, strlen(bl->reason)));
    printf("\n");
    for (k = 0; k < bl->nr; k++) {
        const struct qcow2_bitmap_info *b = &bl->bitmaps[k];

        printf("    %s: granularity %llu, flags [%s%s%s], %s\n",
               qcbt_escape(esc, sizeof esc, b->name, strlen(b->name)),
               b->granularity_bits < 64 ? 1ULL << b->granularity_bits : 0,
               (b->flags & QCOW2_BME_FLAG_IN_USE) ? "in-use" : "",
               (b->flags & QCOW2_BME_FLAG_IN_USE) &&
                       (b->flags & QCOW2_BME_FLAG_AUTO)
                   ? ", "
                   : "",
               (b->flags & QCOW2_BME_FLAG_AUTO) ? "auto" : "",
               status_name(b->status));
    }
    qcow2_bitmap_list_free(bl);
}

static void
print_layer_json(const struct chain *c, size_t i)
{
    const struct chain_layer *l = &c->layers[i];
    const struct qcow2_image *q = l->qcow2;

    printf("    {\n      \"depth\": %zu,\n      \"filename\": ", i);
    json_string(stdout, l->path);
    printf(",\n      \"format\": \"%s\",\n      \"format-probed\": %s,\n"
           "      \"virtual-size\": %" PRIu64 ",\n"
           "      \"file-size\": %" PRIu64,
           chain_fmt_name(l->fmt),
           l->fmt_probed ? "true" : "false",
           l->size,
           l->io->size);
    if (q) {
        size_t k;

        printf(",\n      \"version\": %" PRIu32 ",\n      \"compat\": \"%s\","
               "\n      \"cluster-size\": %" PRIu64 ","
               "\n      \"refcount-bits\": %u,"
               "\n      \"extended-l2\": %s,"
               "\n      \"compression-type\": \"%s\","
               "\n      \"dirty-flag\": %s,\n      \"corrupt\": %s,"
               "\n      \"snapshots\": %" PRIu32 ",",
               q->hdr.version,
               compat_name(q),
               q->cluster_size,
               1u << q->hdr.refcount_order,
               q->extended_l2 ? "true" : "false",
               q->hdr.compression_type ? "zstd" : "zlib",
               (q->hdr.incompatible_features & QCOW2_INCOMPAT_DIRTY) ? "true"
                                                                     : "false",
               (q->hdr.incompatible_features & QCOW2_INCOMPAT_CORRUPT)
                   ? "true"
                   : "false",
               q->hdr.nb_snapshots);
        printf("\n      \"incompatible-features\": ");
        print_features(q, 0, q->hdr.incompatible_features, true);
        printf(",\n      \"compatible-features\": ");
        print_features(q, 1, q->hdr.compatible_features, true);
        printf(",\n      \"autoclear-features\": ");
        print_features(q, 2, q->hdr.autoclear_features, true);
        printf(",\n      \"backing-filename\": ");
        json_string(stdout, q->backing_name);
        printf(",\n      \"full-backing-filename\": ");
        json_string(stdout,
                    i + 1 < c->nr_layers && q->backing_name
                        ? c->layers[i + 1].path
                        : NULL);
        printf(",\n      \"backing-filename-format\": ");
        json_string(stdout, q->backing_fmt);
        printf(",\n      \"data-file\": ");
        json_string(stdout, q->data_file_name);
        printf(",\n      \"full-data-file\": ");
        json_string(stdout, l->data_file_path);
        print_bitmaps_json(l->qcow2);
        printf(",\n      \"unknown-extensions\": [");
        for (k = 0; k < q->nr_unknown_exts; k++)
            printf("%s{\"type\": \"0x%08" PRIx32 "\", \"length\": %" PRIu32 "}",
                   k ? ", " : "",
                   q->unknown_exts[k].type,
                   q->unknown_exts[k].len);
        printf("]");
    }
    printf("\n    }");
}

static void
print_layer_human(const struct chain *c, size_t i)
{
    const struct chain_layer *l = &c->layers[i];
    const struct qcow2_image *q = l->qcow2;
    char sz[32], esc[1100];

    printf("layer %zu: %s\n",
           i,
           qcbt_escape(esc, sizeof esc, l->path, strlen(l->path)));
    printf("  format:        %s%s",
           chain_fmt_name(l->fmt),
           l->fmt_probed && i > 0 ? " (not recorded, probed)" : "");
    if (q)
        printf(", version %" PRIu32 " (compat %s)",
               q->hdr.version,
               compat_name(q));
    printf("\n  virtual size:  %s (%" PRIu64 " bytes)\n",
           human_size(l->size, sz, sizeof sz),
           l->size);
    printf("  file size:     %" PRIu64 " bytes\n", l->io->size);
    if (!q)
        return;
    printf("  cluster size:  %" PRIu64 "%s\n",
           q->cluster_size,
           q->extended_l2 ? " (extended L2, 32 subclusters)" : "");
    printf("  compression:   %s\n",
           q->hdr.compression_type ? "zstd" : "zlib (deflate)");
    printf("  refcount bits: %u\n", 1u << q->hdr.refcount_order);
    printf("  incompatible:  ");
    print_features(q, 0, q->hdr.incompatible_features, false);
    printf("\n  compatible:    ");
    print_features(q, 1, q->hdr.compatible_features, false);
    printf("\n  autoclear:     ");
    print_features(q, 2, q->hdr.autoclear_features, false);
    printf("\n");
    if (q->hdr.nb_snapshots)
        printf("  snapshots:     %" PRIu32 "\n", q->hdr.nb_snapshots);
    if (q->backing_name) {
        printf("  backing file:  %s",
               qcbt_escape(esc,
                           sizeof esc,
                           q->backing_name,
                           strlen(q->backing_name)));
        if (i + 1 < c->nr_layers)
            printf(" (resolved: %s)",
                   qcbt_escape(esc,
                               sizeof esc,
                               c->layers[i + 1].path,
                               strlen(c->layers[i + 1].path)));
        printf("\n  backing fmt:   %s\n",
               q->backing_fmt ? q->backing_fmt : "(not recorded)");
    }
    if (q->data_file_name)
        printf("  data file:     %s (resolved: %s)\n",
               q->data_file_name,
               l->data_file_path ? l->data_file_path : "-");
    print_bitmaps_human(l->qcow2);
}

int
cmd_info(int argc, char **argv)
{
    static const struct option opts[] = {
        {"format", required_argument, NULL, 'f'},
        {"force-share", no_argument, NULL, 'U'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "f:hU";
    struct chain_open_opts copts = {
        .lock = QCBT_IO_LOCK_READ,
        .force_share_option = "-U/--force-share",
    };
    struct chain *c = NULL;
    bool json = false;
    size_t i;
    int opt;
    char sz[32];

    while ((opt = getopt_long(argc, argv, optstring, opts, NULL)) != -1) {
        switch (opt) {
        case 'f':
            copts.format = optarg;
            break;
        case 'U':
            copts.lock = QCBT_IO_LOCK_SHARED;
            break;
        case 'j':
            json = true;
            break;
        case 'h':
            info_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            return usage_getopt_error("info", argc, argv, optstring, opts);
        }
    }
    if (optind != argc - 1)
        return usage_error("info", "expected exactly one IMAGE");
    chain_opts_from_env(&copts);
    if (chain_open(argv[optind], &copts, &c) < 0)
        return report_error();

    if (json) {
        printf("{\n  \"filename\": ");
        json_string(stdout, argv[optind]);
        printf(",\n  \"virtual-size\": %" PRIu64 ",\n  \"layers\": [\n",
               c->size);
        for (i = 0; i < c->nr_layers; i++) {
            print_layer_json(c, i);
            printf("%s\n", i + 1 < c->nr_layers ? "," : "");
        }
        printf("  ]\n}\n");
    } else {
        printf("image:         %s\nvirtual size:  %s (%" PRIu64 " bytes)\n"
               "chain:         %zu layer%s\n",
               argv[optind],
               human_size(c->size, sz, sizeof sz),
               c->size,
               c->nr_layers,
               c->nr_layers == 1 ? "" : "s");
        for (i = 0; i < c->nr_layers; i++)
            print_layer_human(c, i);
    }
    chain_close(c);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        die_msg("writing to standard output failed");
        return QCBT_EXIT_ERROR;
    }
    return QCBT_EXIT_OK;
}

/* qcbt snapshot: an external snapshot of an offline disk, with an empty
 * enabled bitmap for every healthy enabled checkpoint of the old top
 * (common/chainops/snapshot.h).  Arguments and output only.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "chain.h"
#include "error.h"
#include "json-out.h"
#include "qcbt.h"
#include "snapshot.h"

static void
snapshot_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt snapshot [--json] [-f FORMAT] IMAGE NEW\n"
            "\n"
            "Create NEW, a qcow2 overlay backed by IMAGE (an external "
            "snapshot of\n"
            "a disk no VM is running on): the same virtual size, IMAGE's "
            "cluster\n"
            "size, no data.  Every enabled bitmap of IMAGE that is not in "
            "use or\n"
            "invalid gets an empty enabled bitmap of the same name and\n"
            "granularity in NEW (libvirt's rule for checkpoints), so merges "
            "over\n"
            "the chain stay valid in strict mode; the others are named on "
            "stderr.\n"
            "NEW must not exist.  The backing file is stored as IMAGE's "
            "name when\n"
            "both are in the same directory and IMAGE was given relative, "
            "else as\n"
            "an absolute path.  IMAGE's chain is locked as qemu-img info "
            "locks it:\n"
            "an image a running VM writes is refused.\n"
            "\n"
            "  -f, --format FMT  format of IMAGE: qcow2 or raw (default: "
            "probe)\n"
            "      --json        JSON output\n"
            "  -h, --help        show this help\n");
}

static void
print_json(const char *image,
           const char *new_path,
           const struct snapshot_result *res)
{
    size_t i;
    bool first = true;

    printf("{\n  \"image\": ");
    json_string(stdout, image);
    printf(",\n  \"filename\": ");
    json_string(stdout, new_path);
    printf(",\n  \"backing-filename\": ");
    json_string(stdout, res->backing_name);
    printf(",\n  \"backing-filename-format\": \"%s\",\n"
           "  \"virtual-size\": %" PRIu64 ",\n  \"cluster-size\": %" PRIu32
           ",\n  \"bitmaps\": [",
           res->backing_fmt,
           res->size,
           res->cluster_size);
    for (i = 0; i < res->nr_bitmaps; i++) {
        if (!res->bitmaps[i].carried)
            continue;
        printf("%s\n    {\"name\": ", first ? "" : ",");
        json_string(stdout, res->bitmaps[i].name);
        printf(", \"granularity\": %" PRIu64 "}", res->bitmaps[i].granularity);
        first = false;
    }
    printf("%s],\n  \"skipped\": [", first ? "" : "\n  ");
    first = true;
    for (i = 0; i < res->nr_bitmaps; i++) {
        if (res->bitmaps[i].carried)
            continue;
        printf("%s\n    {\"name\": ", first ? "" : ",");
        json_string(stdout, res->bitmaps[i].name);
        printf(", \"reason\": ");
        json_string(stdout, res->bitmaps[i].reason);
        printf("}");
        first = false;
    }
    printf("%s]\n}\n", first ? "" : "\n  ");
}

int
cmd_snapshot(int argc, char **argv)
{
    static const struct option opts[] = {
        {"format", required_argument, NULL, 'f'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "f:h";
    struct chain_open_opts copts = {.lock = QCBT_IO_LOCK_READ};
    struct snapshot_result *res = NULL;
    struct chain *c = NULL;
    const char *image, *new_path;
    bool json = false;
    char esc[1100];
    size_t i;
    int opt, r;

    while ((opt = getopt_long(argc, argv, optstring, opts, NULL)) != -1) {
        switch (opt) {
        case 'f':
            copts.format = optarg;
            break;
        case 'j':
            json = true;
            break;
        case 'h':
            snapshot_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            return usage_getopt_error("snapshot", argc, argv, optstring, opts);
        }
    }
    if (argc - optind != 2)
        return usage_error("snapshot", "expected IMAGE NEW");
    image = argv[optind];
    new_path = argv[optind + 1];
    chain_opts_from_env(&copts);
    if (chain_open(image, &copts, &c) < 0)
        return report_error();
    r = snapshot_create(c, image, new_path, &res);
    chain_close(c);
    if (r < 0)
        return report_error();
    for (i = 0; i < res->nr_bitmaps; i++)
        if (!res->bitmaps[i].carried)
            die_msg("warning: bitmap '%s' is not carried into %s: %s",
                    qcbt_escape(esc,
                                sizeof esc,
                                res->bitmaps[i].name,
                                strlen(res->bitmaps[i].name)),
                    new_path,
                    res->bitmaps[i].reason);
    if (json) {
        print_json(image, new_path, res);
    } else {
        printf("%s: overlay of %s (backing file '%s', %s), %" PRIu64
               " bytes, cluster size %" PRIu32 "\n",
               new_path,
               image,
               qcbt_escape(esc,
                           sizeof esc,
                           res->backing_name,
                           strlen(res->backing_name)),
               res->backing_fmt,
               res->size,
               res->cluster_size);
        for (i = 0; i < res->nr_bitmaps; i++)
            if (res->bitmaps[i].carried)
                printf("  bitmap %s: granularity %" PRIu64 ", enabled, "
                       "empty\n",
                       qcbt_escape(esc,
                                   sizeof esc,
                                   res->bitmaps[i].name,
                                   strlen(res->bitmaps[i].name)),
                       res->bitmaps[i].granularity);
    }
    snapshot_result_free(res);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        die_msg("writing to standard output failed");
        return QCBT_EXIT_ERROR;
    }
    return QCBT_EXIT_OK;
}

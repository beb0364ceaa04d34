/* qcbt convert: squash a backing chain into one new qcow2 image with its
 * merged bitmaps (common/chainops/convert.h).  Arguments and output only.
 */
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"
#include "convert.h"
#include "error.h"
#include "json-out.h"
#include "qcbt.h"

static void
convert_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt convert [--bitmaps SPEC]... [--no-bitmaps] "
            "[--strict]\n"
            "                    [--json] [-f FORMAT] [-U] SRC DST\n"
            "\n"
            "Write SRC's whole backing chain into DST, a new qcow2 image "
            "without a\n"
            "backing file (the guest data of SRC; zero and unallocated "
            "ranges stay\n"
            "unallocated), with the chain's bitmaps merged as 'qcbt bitmap "
            "dump'\n"
            "merges them.  DST must not exist; it is removed on failure.\n"
            "\n"
            "Bitmaps: by default every bitmap of the chain that can be "
            "merged,\n"
            "under its own name, enabled if the topmost bitmap used is; "
            "the others\n"
            "are named on stderr.  With --bitmaps, only those given:\n"
            "  SPEC = NAME[=ALIAS][,persistent=on|off][,enabled=on|off]\n"
            "  NAME=ALIAS       store bitmap NAME of SRC as ALIAS\n"
            "  enabled=on|off   record guest writes or not (default: as in "
            "SRC)\n"
            "  persistent=off   merge it but do not store it (a qcow2 file "
            "holds\n"
            "                   persistent bitmaps only)\n"
            "  ',,' is a ',' in NAME or ALIAS.  A bitmap given that cannot "
            "be\n"
            "  merged fails the command (exit 1) and DST is not created.\n"
            "\n"
            "      --bitmaps SPEC  a bitmap to convert (repeat for more)\n"
            "      --no-bitmaps    no bitmaps in DST\n"
            "      --strict        merge with libvirt's rules (see qcbt "
            "bitmap)\n"
            "      --json          JSON output\n"
            "  -f, --format FMT    format of SRC: qcow2 or raw (default: "
            "probe)\n"
            "  -U, --force-share   read a chain another process writes: "
            "DST may be\n"
            "                      inconsistent\n"
            "  -h, --help          show this help\n");
}

/* The signal that stopped the conversion (0: none).  convert_run()
 * polls it, removes DST and returns; then the signal is raised again. */
static volatile sig_atomic_t convert_signal;

static void
convert_on_signal(int sig)
{
    convert_signal = sig;
}

static void
print_result(const char *dst, const struct convert_result *res, bool json)
{
    char esc[1100], esc2[1100];
    size_t i;

    if (json) {
        printf("{\n  \"filename\": ");
        json_string(stdout, dst);
        printf(",\n  \"virtual-size\": %" PRIu64 ",\n  \"cluster-size\": "
               "%" PRIu32 ",\n  \"data-bytes\": %" PRIu64 ",\n  \"bitmaps\": [",
               res->size,
               res->cluster_size,
               res->data_bytes);
        for (i = 0; i < res->nr_bitmaps; i++) {
            const struct convert_bitmap *b = &res->bitmaps[i];

            printf("%s\n    {\"name\": ", i ? "," : "");
            json_string(stdout, b->name);
            printf(", \"alias\": ");
            json_string(stdout, b->alias);
            printf(", \"granularity\": %" PRIu64 ", \"enabled\": %s, "
                   "\"persistent\": %s, \"dirty-bytes\": %" PRIu64 "}",
                   b->granularity,
                   b->enabled ? "true" : "false",
                   b->persistent ? "true" : "false",
                   b->dirty_bytes);
        }
        printf("%s]\n}\n", res->nr_bitmaps ? "\n  " : "");
        return;
    }
    printf("%s: %" PRIu64 " bytes, cluster size %" PRIu32 ", %" PRIu64
           " bytes of data\n",
           dst,
           res->size,
           res->cluster_size,
           res->data_bytes);
    for (i = 0; i < res->nr_bitmaps; i++) {
        const struct convert_bitmap *b = &res->bitmaps[i];

        printf("  bitmap %s",
               qcbt_escape(esc, sizeof esc, b->alias, strlen(b->alias)));
        if (strcmp(b->name, b->alias) != 0)
            printf(" (from %s)",
                   qcbt_escape(esc2, sizeof esc2, b->name, strlen(b->name)));
        printf(": granularity %" PRIu64 ", %s, %" PRIu64 " dirty bytes%s\n",
               b->granularity,
               b->enabled ? "enabled" : "disabled",
               b->dirty_bytes,
               b->persistent ? "" : ", not stored (persistent=off)");
    }
}

int
cmd_convert(int argc, char **argv)
{
    static const struct option opts[] = {
        {"bitmaps", required_argument, NULL, 'B'},
        {"no-bitmaps", no_argument, NULL, 'N'},
        {"strict", no_argument, NULL, 's'},
        {"json", no_argument, NULL, 'j'},
        {"format", required_argument, NULL, 'f'},
        {"force-share", no_argument, NULL, 'U'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "f:hU";
    struct chain_open_opts copts = {
        .lock = QCBT_IO_LOCK_READ,
        .force_share_option = "-U/--force-share",
    };
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
    struct sigaction sa = {.sa_handler = convert_on_signal}, old[3];
    struct convert_opts co = {.mode = MERGE_TOLERANT};
    struct convert_bitmap_spec *specs = NULL;
    struct convert_result *res = NULL;
    struct chain *c = NULL;
    bool json = false;
    int opt, ret = QCBT_EXIT_ERROR, r;
    size_t i, nr = 0;

    specs = calloc((size_t)argc, sizeof *specs);
    if (!specs) {
        die_msg("out of memory");
        return QCBT_EXIT_ERROR;
    }
    while ((opt = getopt_long(argc, argv, optstring, opts, NULL)) != -1) {
        switch (opt) {
        case 'B':
            if (convert_bitmap_spec_parse(optarg, &specs[nr]) < 0) {
                ret = usage_error("convert", "%s", qcbt_error_get());
                goto out;
            }
            nr++;
            break;
        case 'N':
            co.no_bitmaps = true;
            break;
        case 's':
            co.mode = MERGE_STRICT;
            break;
        case 'j':
            json = true;
            break;
        case 'f':
            copts.format = optarg;
            break;
        case 'U':
            copts.lock = QCBT_IO_LOCK_SHARED;
            break;
        case 'h':
            convert_usage(stdout);
            ret = QCBT_EXIT_OK;
            goto out;
        default:
            ret = usage_getopt_error("convert", argc, argv, optstring, opts);
            goto out;
        }
    }
    if (argc - optind != 2) {
        ret = usage_error("convert", "expected SRC DST");
        goto out;
    }
    if (co.no_bitmaps && nr) {
        ret = usage_error("convert", "--bitmaps and --no-bitmaps conflict");
        goto out;
    }
    co.specs = specs;
    co.nr_specs = nr;
    chain_opts_from_env(&copts);
    if (chain_open(argv[optind], &copts, &c) < 0) {
        ret = report_error();
        goto out;
    }
    co.stop = &convert_signal;
    for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaction(sigs[i], &sa, &old[i]);
    r = convert_run(c, argv[optind + 1], &co, &res);
    for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaction(sigs[i], &old[i], NULL);
    chain_close(c);
    if (r < 0) {
        ret = report_error();
        if (convert_signal) {
            /* DST is gone: die of the signal, as without the handler. */
            signal(convert_signal, SIG_DFL);
            raise(convert_signal);
        }
        goto out;
    }
    for (i = 0; i < res->nr_notices; i++)
        die_msg("warning: %s", res->notices[i]);
    print_result(argv[optind + 1], res, json);
    ret = QCBT_EXIT_OK;
    if (fflush(stdout) != 0 || ferror(stdout)) {
        die_msg("writing to standard output failed");
        ret = QCBT_EXIT_ERROR;
    }
out:
    convert_result_free(res);
    for (i = 0; i < nr; i++)
        convert_bitmap_spec_free(&specs[i]);
    free(specs);
    return ret;
}

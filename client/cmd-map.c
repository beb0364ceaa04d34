/* qcbt map: guest allocation of an image, as qemu-img map reports it. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"
#include "error.h"
#include "qcbt.h"

static void
map_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt map [--json] [-f FORMAT] [-U] IMAGE\n"
            "\n"
            "Show which layer of the backing chain provides each guest "
            "range.\n"
            "Columns mean what they mean in 'qemu-img map --output=json':\n"
            "  depth    the layer (0 = IMAGE) that answers for the range\n"
            "  present  some layer allocates the range\n"
            "  zero     the range reads as zeros\n"
            "  data     the range holds data\n"
            "Adjacent ranges with equal columns are merged.\n"
            "\n"
            "  -f, --format FMT  format of IMAGE: qcow2 or raw (default: "
            "probe)\n"
            "      --json        JSON output (an array, like qemu-img)\n"
            "  -U, --force-share read an image another process writes (a\n"
            "                    running VM): its data may be inconsistent\n"
            "  -h, --help        show this help\n");
}

struct run {
    uint64_t start, length;
    unsigned depth;
    bool present, zero, data;
};

static void
print_run(const struct run *r, bool json, bool first)
{
    if (json)
        printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
               ", \"depth\": %u, \"present\": %s, \"zero\": %s, "
               "\"data\": %s}",
               first ? "[" : ",\n",
               r->start,
               r->length,
               r->depth,
               r->present ? "true" : "false",
               r->zero ? "true" : "false",
               r->data ? "true" : "false");
    else
        printf("%20" PRIu64 " %20" PRIu64 " %5u %-7s %-5s %-5s\n",
               r->start,
               r->length,
               r->depth,
               r->present ? "true" : "false",
               r->zero ? "true" : "false",
               r->data ? "true" : "false");
}

int
cmd_map(int argc, char **argv)
{
    static const struct option opts[] = {
        {"format", required_argument, NULL, 'f'},
        {"force-share", no_argument, NULL, 'U'},
        {"json", no_argument, NULL, 'j'},
        {"output", required_argument, NULL, 'O'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "f:hU";
    struct chain_open_opts copts = {
        .lock = QCBT_IO_LOCK_READ,
        .force_share_option = "-U/--force-share",
    };
    struct chain *c = NULL;
    bool json = false, have = false, first = true;
    struct run cur = {0};
    uint64_t pos;
    int opt, ret = QCBT_EXIT_ERROR;

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
        case 'O':
            /* Accept qemu-img's spelling too. */
            if (strcmp(optarg, "json") == 0)
                json = true;
            else if (strcmp(optarg, "human") != 0) {
                return usage_error("map",
                                   "--output '%s' is not json or human",
                                   optarg);
            }
            break;
        case 'h':
            map_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            return usage_getopt_error("map", argc, argv, optstring, opts);
        }
    }
    if (optind != argc - 1)
        return usage_error("map", "expected exactly one IMAGE");
    chain_opts_from_env(&copts);
    if (chain_open(argv[optind], &copts, &c) < 0)
        return report_error();

    if (!json)
        printf("%20s %20s %5s %-7s %-5s %-5s\n",
               "start",
               "length",
               "depth",
               "present",
               "zero",
               "data");
    for (pos = 0; pos < c->size;) {
        struct chain_status st;

        if (chain_block_status(c, pos, c->size - pos, &st) < 0) {
            fflush(stdout);
            report_error();
            goto out;
        }
        if (have && cur.depth == st.depth && cur.present == st.present &&
            cur.zero == st.zero && cur.data == st.data) {
            cur.length += st.len;
        } else {
            if (have) {
                print_run(&cur, json, first);
                first = false;
            }
            cur = (struct run){pos,
                               st.len,
                               st.depth,
                               st.present,
                               st.zero,
                               st.data};
            have = true;
        }
        pos += st.len;
    }
    if (have)
        print_run(&cur, json, first);
    if (json)
        printf("%s]\n", have ? "" : "[");
    ret = QCBT_EXIT_OK;
out:
    chain_close(c);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        die_msg("writing to standard output failed");
        ret = QCBT_EXIT_ERROR;
    }
    return ret;
}

/* qcbt commit: the layers above a base committed into it, in place, with
 * their bitmaps merged (common/commit/commit.h).  Parses and prints only.
 */
#include <getopt.h>
#include <stdbool.h>
#include <inttypes.h>
#include <stdio.h>

#include "commit.h"
#include "qcbt.h"

static void
commit_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt commit [-b BASE] [-q] IMAGE\n"
            "\n"
            "Write the guest data of the layers of IMAGE's backing chain\n"
            "above BASE into BASE, in place (as 'qemu-img commit -d'), and\n"
            "merge their persistent bitmaps into BASE's: each bitmap of\n"
            "BASE then describes every change since its checkpoint, layers\n"
            "without the bitmap counting everything they hold.  Bitmaps\n"
            "missing in BASE are created there (granularity and recording\n"
            "state of the top-most layer holding them).  A bitmap that no\n"
            "merge can describe (in use or invalid where it starts) is not\n"
            "made up: it is reported as not committed and BASE's stays as\n"
            "it is.\n"
            "\n"
            "IMAGE and the layers above BASE are left unchanged and still\n"
            "read the same.  Afterwards use BASE directly (the upper layers\n"
            "can be deleted), or keep the chain.\n"
            "\n"
            "BASE is held with qemu-img's write lock, the other layers with\n"
            "its read lock: an image a running VM or qemu-img uses is\n"
            "refused.  Not supported (refused before anything is written): a\n"
            "raw base, layers of different sizes, version 2, external data\n"
            "files, subclusters, internal snapshots in BASE.\n"
            "\n"
            "  -b, --base BASE  the layer to commit into (a file of IMAGE's\n"
            "                   backing chain; default: IMAGE's backing "
            "file)\n"
            "  -q, --quiet      print nothing on success\n"
            "  -h, --help       show this help\n");
}

static const char *const actions[] = {
    [COMMIT_BITMAP_MERGED] = "merged",
    [COMMIT_BITMAP_CREATED] = "created",
    [COMMIT_BITMAP_SKIPPED] = "not committed",
};

int
cmd_commit(int argc, char **argv)
{
    static const struct option opts[] = {
        {"base", required_argument, NULL, 'b'},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "b:hq";
    struct commit_opts co = {0};
    struct commit_report *rep = NULL;
    bool quiet = false;
    size_t i;
    int opt;

    while ((opt = getopt_long(argc, argv, optstring, opts, NULL)) != -1) {
        switch (opt) {
        case 'b':
            co.base = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'h':
            commit_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            return usage_getopt_error("commit", argc, argv, optstring, opts);
        }
    }
    if (optind != argc - 1)
        return usage_error("commit", "expected exactly one IMAGE");
    if (commit_run(argv[optind], &co, &rep) < 0)
        return report_error();
    if (!quiet) {
        printf("committed %zu layer(s) into %s: %" PRIu64 " data and %" PRIu64
               " zero clusters of %" PRIu64 " bytes\n",
               rep->base_layer,
               rep->base_path,
               rep->data_clusters,
               rep->zero_clusters,
               rep->cluster_size);
        for (i = 0; i < rep->nr_bitmaps; i++) {
            const struct commit_bitmap *b = &rep->bitmaps[i];

            if (b->action == COMMIT_BITMAP_SKIPPED)
                printf("bitmap %s: %s: %s\n",
                       b->name,
                       actions[b->action],
                       b->reason);
            else
                printf("bitmap %s: %s (granularity %" PRIu64 ")\n",
                       b->name,
                       actions[b->action],
                       b->granularity);
        }
    }
    commit_report_free(rep);
    return QCBT_EXIT_OK;
}

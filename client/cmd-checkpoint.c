/* qcbt checkpoint: create, list and delete checkpoints of a backing chain
 * (common/checkpoint: one persistent bitmap per checkpoint).  Arguments
 * and printing only; the rules live in common/.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"
#include "checkpoint.h"
#include "error.h"
#include "json-out.h"
#include "qcbt.h"

static void
checkpoint_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt checkpoint create [-g SIZE] [--keep N] IMAGE NAME\n"
            "       qcbt checkpoint list [--json] [--namespace NS] [-U] "
            "IMAGE\n"
            "       qcbt checkpoint delete IMAGE NAME\n"
            "\n"
            "Checkpoints of IMAGE's backing chain, one persistent bitmap per\n"
            "checkpoint as libvirt keeps them: every checkpoint records at\n"
            "once, and the changes since checkpoint X are bitmap X merged\n"
            "over the chain.  A NAME may carry a namespace, everything\n"
            "before its last '/' ('vendorA/daily-7' is in 'vendorA'), so\n"
            "several consumers share a disk; a NAME without '/' is in the\n"
            "default namespace ''.\n"
            "\n"
            "  create  an empty, enabled persistent bitmap NAME in IMAGE, the\n"
            "          top layer; refused when any layer holds NAME\n"
            "  list    every checkpoint, oldest first, with its health (can\n"
            "          a backup since it be incremental, and why not) and\n"
            "          the bytes written since it\n"
            "  delete  remove bitmap NAME from every layer that holds it\n"
            "\n"
            "create and delete write the files they change, locked as\n"
            "qemu-img locks them: an image a running QEMU holds is refused.\n"
            "\n"
            "  -g, --granularity SIZE  create: bytes per bit, a power of two\n"
            "               from 512 to 2G (K, M, G suffixes); default as\n"
            "               QEMU and libvirt: the cluster size, at least 4K\n"
            "               and at most 64K\n"
            "  --keep N     create: then delete the oldest checkpoints of\n"
            "               NAME's namespace (that one only) until N remain\n"
            "  --namespace NS\n"
            "               list: only the checkpoints of namespace NS\n"
            "               ('' = the default namespace)\n"
            "  --json       list: JSON output\n"
            "  -U, --force-share\n"
            "               list: read an image another process writes\n"
            "  -h, --help   show this help\n"
            "\n"
            "Exit status: 0 success, 1 error (including usage errors).\n");
}

static void
print_list_json(struct chain *c, const struct checkpoint_list *l)
{
    size_t i, j;
    bool first;

    printf("{\n  \"layers\": [");
    for (i = 0; i < c->nr_layers; i++) {
        printf("%s\n    {\"depth\": %zu, \"filename\": ", i ? "," : "", i);
        json_string(stdout, c->layers[i].path);
        if (l->layer_errors[i][0]) {
            printf(", \"error\": ");
            json_string(stdout, l->layer_errors[i]);
        }
        printf("}");
    }
    printf("\n  ],\n  \"checkpoints\": [");
    for (i = 0; i < l->nr; i++) {
        const struct checkpoint_info *ci = &l->cps[i];

        printf("%s\n    {\"name\": ", i ? "," : "");
        json_string(stdout, ci->name);
        printf(", \"namespace\": ");
        json_string_n(stdout, ci->name, ci->ns_len);
        printf(", \"created-in-layer\": %zu, \"layers\": [", ci->created);
        first = true;
        for (j = 0; j < c->nr_layers; j++)
            if (ci->held[j]) {
                printf("%s%zu", first ? "" : ", ", j);
                first = false;
            }
        printf("], \"granularity\": %" PRIu64 ", \"enabled\": %s"
               ", \"usable\": %s",
               ci->granularity,
               ci->in_top && ci->enabled ? "true" : "false",
               ci->usable ? "true" : "false");
        if (ci->usable)
            printf(", \"dirty-bytes\": %" PRIu64, ci->dirty_bytes);
        else {
            printf(", \"dirty-bytes\": null, \"reason\": ");
            json_string(stdout, ci->reason);
        }
        printf(", \"strict\": %s", ci->strict ? "true" : "false");
        if (!ci->strict) {
            printf(", \"strict-reason\": ");
            json_string(stdout, ci->strict_reason);
        }
        printf(", \"notes\": [");
        for (j = 0; j < ci->nr_notes; j++) {
            printf("%s", j ? ", " : "");
            json_string(stdout, ci->notes[j]);
        }
        printf("]}");
    }
    printf("%s]\n}\n", l->nr ? "\n  " : "");
}

static void
print_list_text(struct chain *c, const struct checkpoint_list *l)
{
    char esc[1100], esc2[1100];
    size_t i, j;

    for (i = 0; i < c->nr_layers; i++)
        if (l->layer_errors[i][0])
            printf("layer %zu (%s): bitmaps unusable: %s\n",
                   i,
                   qcbt_escape(esc,
                               sizeof esc,
                               c->layers[i].path,
                               strlen(c->layers[i].path)),
                   l->layer_errors[i]);
    if (l->nr == 0) {
        printf("(no checkpoints)\n");
        return;
    }
    for (i = 0; i < l->nr; i++) {
        const struct checkpoint_info *ci = &l->cps[i];

        printf("%s: ",
               qcbt_escape(esc, sizeof esc, ci->name, strlen(ci->name)));
        if (ci->usable)
            printf("usable%s, dirty %" PRIu64 " bytes",
                   ci->strict ? "" : " (tolerant only)",
                   ci->dirty_bytes);
        else
            printf(
                "not usable: %s",
                qcbt_escape(esc2, sizeof esc2, ci->reason, strlen(ci->reason)));
        printf(" (granularity %" PRIu64 ", created in layer %zu, held by "
               "%zu of %zu layers)\n",
               ci->granularity,
               ci->created,
               ci->nr_holding,
               c->nr_layers);
        for (j = 0; j < ci->nr_notes; j++)
            printf("    note: %s\n", ci->notes[j]);
    }
}

static int
do_list(const char *image,
        const char *ns,
        bool json,
        const struct chain_open_opts *copts)
{
    struct chain *c = NULL;
    struct checkpoint_list *l = NULL;

    if (chain_open(image, copts, &c) < 0)
        return report_error();
    if (checkpoint_list(c, ns, true, &l) < 0) {
        chain_close(c);
        return report_error();
    }
    if (json)
        print_list_json(c, l);
    else
        print_list_text(c, l);
    checkpoint_list_free(l);
    chain_close(c);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        die_msg("writing to standard output failed");
        return QCBT_EXIT_ERROR;
    }
    return QCBT_EXIT_OK;
}

int
cmd_checkpoint(int argc, char **argv)
{
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'},
        {"namespace", required_argument, NULL, 'n'},
        {"granularity", required_argument, NULL, 'g'},
        {"keep", required_argument, NULL, 'k'},
        {"force-share", no_argument, NULL, 'U'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "g:hU";
    static const char *const subs[] = {"create", "list", "delete"};
    struct chain_open_opts copts = {
        .lock = QCBT_IO_LOCK_READ,
        .force_share_option = "-U/--force-share",
    };
    struct checkpoint_result res = {0};
    const char *granularity = NULL, *keep_arg = NULL, *ns = NULL;
    const char *sub = NULL;
    bool json = false, force_share = false;
    char cmd[24] = "checkpoint";
    uint64_t gran = 0;
    unsigned long long keep = 0;
    int opt, r, nargs;
    size_t i;
    char *end;

    for (i = 0; argc > 1 && i < sizeof subs / sizeof subs[0]; i++)
        if (strcmp(argv[1], subs[i]) == 0)
            snprintf(cmd, sizeof cmd, "checkpoint %s", subs[i]);
    while ((opt = getopt_long(argc, argv, optstring, opts, NULL)) != -1) {
        switch (opt) {
        case 'j':
            json = true;
            break;
        case 'n':
            ns = optarg;
            break;
        case 'g':
            granularity = optarg;
            break;
        case 'k':
            keep_arg = optarg;
            break;
        case 'U':
            force_share = true;
            break;
        case 'h':
            checkpoint_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            return usage_getopt_error(cmd, argc, argv, optstring, opts);
        }
    }
    if (optind >= argc)
        return usage_error("checkpoint",
                           "expected a subcommand: create, list or delete");
    for (i = 0; i < sizeof subs / sizeof subs[0]; i++)
        if (strcmp(argv[optind], subs[i]) == 0)
            sub = subs[i];
    if (!sub)
        return usage_error("checkpoint",
                           "unknown subcommand '%s': create, list or delete",
                           argv[optind]);
    snprintf(cmd, sizeof cmd, "checkpoint %s", sub);
    optind++;
    nargs = strcmp(sub, "list") == 0 ? 1 : 2;
    if (argc - optind != nargs)
        return usage_error(cmd,
                           "expected %s",
                           nargs == 1 ? "IMAGE" : "IMAGE NAME");
    if ((granularity || keep_arg) && strcmp(sub, "create") != 0)
        return usage_error(cmd, "-g and --keep are only for create");
    if ((json || ns || force_share) && strcmp(sub, "list") != 0)
        return usage_error(cmd, "--json, --namespace and -U are only for list");
    if (granularity && (parse_size(granularity, &gran) < 0 || gran < 512 ||
                        gran > (1ULL << 31) || (gran & (gran - 1))))
        return usage_error(cmd,
                           "invalid granularity '%s': a power of two from "
                           "512 to 2G",
                           granularity);
    if (keep_arg) {
        errno = 0;
        keep = strtoull(keep_arg, &end, 10);
        if (errno || *end || end == keep_arg || keep_arg[0] == '-' ||
            keep < 1 || keep > 65535)
            return usage_error(cmd,
                               "invalid --keep '%s': a count from 1 to 65535",
                               keep_arg);
    }
    if (ns && checkpoint_namespace_check(ns) < 0)
        return usage_error(cmd, "%s", qcbt_error_get());
    if (force_share)
        copts.lock = QCBT_IO_LOCK_SHARED;
    chain_opts_from_env(&copts);

    if (strcmp(sub, "list") == 0)
        return do_list(argv[optind], ns, json, &copts);
    if (strcmp(sub, "create") == 0) {
        if (checkpoint_name_check(argv[optind + 1]) < 0)
            return usage_error(cmd, "%s", qcbt_error_get());
        r = checkpoint_create(argv[optind],
                              argv[optind + 1],
                              gran ? (unsigned)__builtin_ctzll(gran) : 0,
                              (size_t)keep,
                              &copts,
                              &res);
        for (i = 0; i < res.nr_deleted; i++) {
            char esc[1100];

            printf("rotated out: %s\n",
                   qcbt_escape(esc,
                               sizeof esc,
                               res.deleted[i],
                               strlen(res.deleted[i])));
        }
    } else {
        r = checkpoint_delete(argv[optind], argv[optind + 1], &copts, &res);
    }
    checkpoint_result_free(&res);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        die_msg("writing to standard output failed");
        return QCBT_EXIT_ERROR;
    }
    return r < 0 ? report_error() : QCBT_EXIT_OK;
}

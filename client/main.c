/* qcbt: command-line tool entry point and subcommand dispatch. */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"
#include "error.h"
#include "qcbt.h"

#ifndef QCBT_VERSION
#define QCBT_VERSION "0.1.0"
#endif

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *summary;
} commands[] = {
    {"info", cmd_info, "show an image's backing chain and each layer"},
    {"map", cmd_map, "show guest allocation (like qemu-img map)"},
    {"cat", cmd_cat, "write guest bytes to stdout"},
    {"bitmap", cmd_bitmap, "list, check, dump and change persistent bitmaps"},
    {"checkpoint", cmd_checkpoint, "create, list and delete checkpoints"},
    {"snapshot", cmd_snapshot, "new overlay keeping the checkpoints (offline)"},
    {"convert", cmd_convert, "squash a chain into one qcow2 with its bitmaps"},
    {"commit", cmd_commit, "commit upper layers into a base, merging bitmaps"},
    {"backup", cmd_backup, "full or incremental backup (NBD export or image)"},
    {"restore", cmd_restore, "restore a backup to a file or NBD export"},
    {"verify", cmd_verify, "check a backup directory (and against a source)"},
    {"import", cmd_import, "turn a virtnbdbackup backup set into a backup dir"},
};

static void
usage(FILE *fp)
{
    size_t i;

    fprintf(fp,
            "Usage: qcbt COMMAND [OPTIONS] ARGS...\n"
            "\n"
            "qcow2 changed-block tracking: inspect images and chains.\n"
            "\n"
            "Commands:\n");
    for (i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(fp, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(fp,
            "\n"
            "Run 'qcbt COMMAND --help' for a command's options.\n"
            "Exit status: 0 success, 1 error, 2 a full backup is "
            "needed (bitmap check, backup --since).\n");
}

void
die_msg(const char *fmt, ...)
{
    va_list ap;

    fputs("qcbt: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

int
report_error(void)
{
    const char *msg = qcbt_error_get();

    die_msg("%s", msg[0] ? msg : "unknown error");
    return QCBT_EXIT_ERROR;
}

int
usage_error(const char *command, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "qcbt: %s: ", command);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr,
            " (see qcbt %.*s --help)\n",
            (int)strcspn(command, " "),
            command);
    return QCBT_EXIT_ERROR;
}

/* The long option the user's "--NAME[=...]" (NLEN bytes of NAME) means:
 * an exact match or the only one NAME abbreviates, as getopt_long() takes
 * it.  *nmatch counts the abbreviated candidates.
 */
static const struct option *
find_long(const struct option *lo, const char *name, size_t nlen, int *nmatch)
{
    const struct option *found = NULL;

    *nmatch = 0;
    for (; lo && lo->name; lo++) {
        if (strncmp(lo->name, name, nlen) != 0)
            continue;
        if (strlen(lo->name) == nlen) {
            *nmatch = 1;
            return lo;
        }
        found = lo;
        (*nmatch)++;
    }
    return *nmatch == 1 ? found : NULL;
}

int
usage_getopt_error(const char *command,
                   int argc,
                   char **argv,
                   const char *optstring,
                   const struct option *longopts)
{
    const char *arg = optind > 0 && optind <= argc ? argv[optind - 1] : "";
    const char *p;

    /* A long option: getopt_long() leaves optopt 0 when it does not know
     * the name, or the option's value when its argument is wrong.  (In a
     * cluster of short options argv[optind - 1] may be an earlier long
     * option: then optopt names the short one.)
     */
    if (strncmp(arg, "--", 2) == 0 && arg[2]) {
        const char *name = arg + 2;
        size_t nlen = strcspn(name, "=");
        int nmatch;
        const struct option *lo = find_long(longopts, name, nlen, &nmatch);

        if (optopt == 0 && nmatch > 1)
            return usage_error(command,
                               "option '--%.*s' is ambiguous",
                               (int)nlen,
                               name);
        if (optopt == 0)
            return usage_error(command,
                               "unrecognized option '--%.*s'",
                               (int)nlen,
                               name);
        if (lo && lo->val == optopt && lo->has_arg == no_argument &&
            name[nlen] == '=')
            return usage_error(command,
                               "option '--%s' doesn't allow an argument",
                               lo->name);
        if (lo && lo->val == optopt && lo->has_arg == required_argument &&
            name[nlen] != '=')
            return usage_error(command,
                               "option '--%s' requires an argument",
                               lo->name);
    }
    if (optopt > 0 && optopt < 256) {
        p = strchr(optstring, optopt);
        if (p && optopt != ':' && p[1] == ':')
            return usage_error(command,
                               "option requires an argument -- '%c'",
                               optopt);
        if (optopt >= 0x20 && optopt < 0x7f)
            return usage_error(command, "invalid option -- '%c'", optopt);
        return usage_error(command, "invalid option -- 0x%02x", optopt);
    }
    return usage_error(command, "invalid option");
}

char *
path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);

    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int
parse_size(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v;
    unsigned shift = 0;

    if (!s || !*s || *s == '-')
        return -1;
    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s)
        return -1;
    switch (*end) {
    case '\0':
        break;
    case 'k':
    case 'K':
        shift = 10;
        end++;
        break;
    case 'm':
    case 'M':
        shift = 20;
        end++;
        break;
    case 'g':
    case 'G':
        shift = 30;
        end++;
        break;
    case 't':
    case 'T':
        shift = 40;
        end++;
        break;
    default:
        return -1;
    }
    if (*end != '\0')
        return -1;
    if (shift && v > (UINT64_MAX >> shift))
        return -1;
    *out = (uint64_t)v << shift;
    return 0;
}

int
main(int argc, char **argv)
{
    size_t i;

    /* Subcommands report option errors themselves, on one line. */
    opterr = 0;
    if (argc < 2) {
        die_msg("missing command (see qcbt --help)");
        return QCBT_EXIT_ERROR;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        if (argc > 2 && strcmp(argv[1], "help") == 0) {
            for (i = 0; i < sizeof commands / sizeof commands[0]; i++)
                if (strcmp(argv[2], commands[i].name) == 0) {
                    char *a[] = {argv[2], (char *)"--help", NULL};
                    return commands[i].fn(2, a);
                }
            die_msg("help: unknown command '%s' (see qcbt --help)", argv[2]);
            return QCBT_EXIT_ERROR;
        }
        usage(stdout);
        return QCBT_EXIT_OK;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
        printf("qcbt %s\n", QCBT_VERSION);
        return QCBT_EXIT_OK;
    }
    for (i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].fn(argc - 1, argv + 1);
    if (argv[1][0] == '-')
        die_msg("unrecognized option '%s' (see qcbt --help)", argv[1]);
    else
        die_msg("unknown command '%s' (see qcbt --help)", argv[1]);
    return QCBT_EXIT_ERROR;
}

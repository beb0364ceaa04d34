/* qcbt: command-line tool entry point and subcommand dispatch. */
#include <errno.h>
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
    {"bitmap", cmd_bitmap, "list, check, dump and digest persistent bitmaps"},
    {"backup", cmd_backup, "full or incremental backup of an NBD export"},
    {"restore", cmd_restore, "restore a backup to a file or NBD export"},
    {"verify", cmd_verify, "check a backup directory (and against a source)"},
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
        fprintf(fp, "  %-8s %s\n", commands[i].name, commands[i].summary);
    fprintf(fp,
            "\n"
            "Run 'qcbt COMMAND --help' for a command's options.\n"
            "Exit status: 0 success, 1 error, 2 a full backup is "
            "needed (bitmap check).\n");
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

void
env_chain_opts(struct chain_open_opts *o)
{
    const char *v = getenv("QCBT_ALLOW_DATA_FILE");

    o->allow_data_file = v && (strcmp(v, "1") == 0 || strcmp(v, "yes") == 0);
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

    if (argc < 2) {
        usage(stderr);
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
    die_msg("unknown command '%s' (see 'qcbt --help')", argv[1]);
    return QCBT_EXIT_ERROR;
}

/* qcbt cat: guest bytes of an image (the whole chain) to stdout. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chain.h"
#include "error.h"
#include "minmax.h"
#include "qcbt.h"

#define CAT_BUF_SIZE (4u * 1024 * 1024)
#define ZERO_RUN_MIN (256u * 1024)

static void
cat_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt cat [-f FORMAT] [-U] [--offset N] [--length N] IMAGE\n"
            "\n"
            "Write the guest view of IMAGE (the whole backing chain) to\n"
            "standard output.  Sizes take K, M, G, T suffixes.  When stdout\n"
            "is a new empty regular file, zero ranges are left as holes.\n"
            "\n"
            "  -f, --format FMT  format of IMAGE: qcow2 or raw (default: "
            "probe)\n"
            "      --offset N    start at guest offset N (default 0)\n"
            "      --length N    write N bytes (default: to the end)\n"
            "  -U, --force-share read an image another process writes (a\n"
            "                    running VM): its data may be inconsistent\n"
            "  -h, --help        show this help\n");
}

static int
write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;

    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return qcbt_error(errno,
                              "writing to standard output: %s",
                              strerror(errno));
        }
        p += n;
        len -= n;
    }
    return 0;
}

int
cmd_cat(int argc, char **argv)
{
    static const struct option opts[] = {
        {"format", required_argument, NULL, 'f'},
        {"force-share", no_argument, NULL, 'U'},
        {"offset", required_argument, NULL, 'o'},
        {"length", required_argument, NULL, 'l'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "f:hU";
    struct chain_open_opts copts = {
        .lock = QCBT_IO_LOCK_READ,
        .force_share_option = "-U/--force-share",
    };
    struct chain *c = NULL;
    uint64_t offset = 0, length = UINT64_MAX, end, pos;
    bool have_length = false, sparse = false;
    unsigned char *buf = NULL;
    struct stat st;
    int opt, r, ret = QCBT_EXIT_ERROR;

    while ((opt = getopt_long(argc, argv, optstring, opts, NULL)) != -1) {
        switch (opt) {
        case 'f':
            copts.format = optarg;
            break;
        case 'U':
            copts.lock = QCBT_IO_LOCK_SHARED;
            break;
        case 'o':
            if (parse_size(optarg, &offset) < 0)
                return usage_error("cat", "invalid --offset '%s'", optarg);
            break;
        case 'l':
            if (parse_size(optarg, &length) < 0)
                return usage_error("cat", "invalid --length '%s'", optarg);
            have_length = true;
            break;
        case 'h':
            cat_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            return usage_getopt_error("cat", argc, argv, optstring, opts);
        }
    }
    if (optind != argc - 1)
        return usage_error("cat", "expected exactly one IMAGE");

    chain_opts_from_env(&copts);

    if (chain_open(argv[optind], &copts, &c) < 0)
        return report_error();
    if (offset > c->size) {
        die_msg("cat: --offset %" PRIu64 " is past the end of the image "
                "(%" PRIu64 " bytes)",
                offset,
                c->size);
        goto out;
    }
    if (!have_length)
        length = c->size - offset;
    if (length > c->size - offset) {
        die_msg("cat: --offset + --length is past the end of the image "
                "(%" PRIu64 " bytes)",
                c->size);
        goto out;
    }
    end = offset + length;

    /* Only a brand-new empty file can be written sparsely: its holes read
     * as zeros.  Anything else gets every byte.
     */
    if (fstat(STDOUT_FILENO, &st) == 0 && S_ISREG(st.st_mode) &&
        st.st_size == 0 && lseek(STDOUT_FILENO, 0, SEEK_CUR) == 0)
        sparse = true;

    buf = malloc(CAT_BUF_SIZE);
    if (!buf) {
        die_msg("out of memory");
        goto out;
    }
    memset(buf, 0, CAT_BUF_SIZE);

    pos = offset;
    while (pos < end) {
        size_t n = MIN((uint64_t)CAT_BUF_SIZE, end - pos);
        struct chain_status cs;

        /* Long ranges that read as zero are not read at all; short ones
         * are cheaper to read with their neighbours.
         */
        r = chain_block_status(c, pos, n, &cs);
        if (r < 0) {
            report_error();
            goto out;
        }
        if (cs.zero && !cs.data && cs.len >= MIN((uint64_t)n, ZERO_RUN_MIN)) {
            n = MIN((uint64_t)n, cs.len);
            if (sparse) {
                if (lseek(STDOUT_FILENO, (off_t)n, SEEK_CUR) < 0) {
                    die_msg("seeking in standard output: %s", strerror(errno));
                    goto out;
                }
            } else {
                memset(buf, 0, n);
                if (write_all(STDOUT_FILENO, buf, n) < 0) {
                    report_error();
                    goto out;
                }
            }
        } else {
            r = chain_read(c, buf, n, pos);
            if (r < 0 || write_all(STDOUT_FILENO, buf, n) < 0) {
                report_error();
                goto out;
            }
        }
        pos += n;
    }
    if (sparse && ftruncate(STDOUT_FILENO, (off_t)length) < 0) {
        die_msg("truncating standard output: %s", strerror(errno));
        goto out;
    }
    ret = QCBT_EXIT_OK;

out:
    free(buf);
    chain_close(c);
    return ret;
}

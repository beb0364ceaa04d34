/* qcbt-writer-tool: drive the qcow2 writer from the command line for the
 * interop tests (tests/interop/test-qcow2-writer.sh).
 *
 *   qcbt-writer-tool [-c CLUSTER] [-b BACKING -F FMT] [-B BUFFER] OUT SIZE
 *                    [CMD...]
 *
 * Each CMD is one argument in qemu-io syntax, so the test can replay the
 * same list with `qemu-io -c CMD ...` for a reference image:
 *   "write [-P PATTERN] OFFSET LENGTH"   (pattern byte, default 0xcd)
 *   "write -z OFFSET LENGTH"             (zero range)
 * Numbers are decimal or 0x hex with an optional k/M/G/T suffix.  With a
 * backing file, partial clusters are completed from the backing chain
 * (chain_open + chain_read), exactly as the backup agent does.  Errors:
 * one line "qcbt-writer-tool: MESSAGE", exit 1.
 */
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "chain.h"
#include "error.h"
#include "qcow2-writer.h"

#define MAX_TOKENS 8

static struct chain *backing;

static void __attribute__((noreturn)) die(const char *msg)
{
    fprintf(stderr, "qcbt-writer-tool: %s\n", msg);
    exit(1);
}

static uint64_t
parse_num(const char *s)
{
    char *end;
    uint64_t v, mult = 1;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s)
        goto bad;
    switch (*end) {
    case '\0':
        break;
    case 'k':
    case 'K':
        mult = 1ULL << 10;
        break;
    case 'm':
    case 'M':
        mult = 1ULL << 20;
        break;
    case 'g':
    case 'G':
        mult = 1ULL << 30;
        break;
    case 't':
    case 'T':
        mult = 1ULL << 40;
        break;
    default:
        goto bad;
    }
    if (*end && end[1])
        goto bad;
    if (v > UINT64_MAX / mult)
        goto bad;
    return v * mult;
bad:
    qcbt_error(EINVAL, "bad number '%s'", s);
    die(qcbt_error_get());
}

/* The backup agent's fill: what the backing chain reads, zeros past it. */
static int
fill_from_backing(void *opaque, void *buf, size_t len, uint64_t offset)
{
    struct chain *c = *(struct chain **)opaque;
    size_t n = 0;

    if (offset < c->size)
        n = (size_t)(c->size - offset < len ? c->size - offset : len);
    memset((char *)buf + n, 0, len - n);
    if (n == 0)
        return 0;
    return chain_read(c, buf, n, offset);
}

static void
run_cmd(struct qcow2_writer *w,
        const char *cmd,
        unsigned char **buf,
        size_t *buf_len)
{
    char *copy = strdup(cmd), *save = NULL, *tok;
    char *tv[MAX_TOKENS];
    int tc = 0, i, r;
    int pattern = 0xcd;
    bool zero = false;
    uint64_t off, len;

    if (copy == NULL)
        die("out of memory");
    for (tok = strtok_r(copy, " \t", &save); tok && tc < MAX_TOKENS;
         tok = strtok_r(NULL, " \t", &save))
        tv[tc++] = tok;
    if (tc < 3 || strcmp(tv[0], "write") != 0)
        goto bad;
    for (i = 1; i < tc - 2; i++) {
        if (strcmp(tv[i], "-z") == 0)
            zero = true;
        else if (strcmp(tv[i], "-P") == 0 && i + 1 < tc - 2)
            pattern = (int)parse_num(tv[++i]) & 0xff;
        else
            goto bad;
    }
    off = parse_num(tv[tc - 2]);
    len = parse_num(tv[tc - 1]);
    if (zero) {
        r = qcow2_writer_zero(w, off, len);
    } else {
        if (len > SIZE_MAX)
            goto bad;
        if (*buf_len < len) {
            free(*buf);
            *buf = malloc(len);
            if (*buf == NULL)
                die("out of memory");
            *buf_len = len;
        }
        memset(*buf, pattern, len);
        r = qcow2_writer_write(w, *buf, len, off);
    }
    if (r < 0) {
        qcow2_writer_abort(w);
        die(qcbt_error_get());
    }
    free(copy);
    return;
bad:
    qcbt_error(EINVAL, "bad command '%s'", cmd);
    qcow2_writer_abort(w);
    die(qcbt_error_get());
}

int
main(int argc, char **argv)
{
    struct qcow2_writer_opts opts = {0};
    struct chain_open_opts copts = {0};
    struct qcow2_writer *w;
    unsigned char *buf = NULL;
    size_t buf_len = 0;
    char path[4096];
    int c, i;

    while ((c = getopt(argc, argv, "c:b:F:B:")) != -1) {
        switch (c) {
        case 'c':
            opts.cluster_size = (uint32_t)parse_num(optarg);
            break;
        case 'b':
            opts.backing_file = optarg;
            break;
        case 'F':
            opts.backing_fmt = optarg;
            break;
        case 'B':
            opts.buffer_size = (size_t)parse_num(optarg);
            break;
        default:
            die("usage: qcbt-writer-tool [-c CLUSTER] [-b BACKING -F FMT] "
                "[-B BUFFER] OUT SIZE [CMD...]");
        }
    }
    if (argc - optind < 2)
        die("usage: qcbt-writer-tool [-c CLUSTER] [-b BACKING -F FMT] "
            "[-B BUFFER] OUT SIZE [CMD...]");
    opts.size = parse_num(argv[optind + 1]);

    if (opts.backing_file) {
        /* Relative names are relative to the new image's directory. */
        if (opts.backing_file[0] == '/') {
            snprintf(path, sizeof path, "%s", opts.backing_file);
        } else {
            char *d = strdup(argv[optind]);

            if (d == NULL)
                die("out of memory");
            snprintf(path, sizeof path, "%s/%s", dirname(d), opts.backing_file);
            free(d);
        }
        opts.fill = fill_from_backing;
        opts.fill_opaque = &backing;
    }

    /* The writer first: it validates the options before any file is
     * touched.
     */
    if (qcow2_writer_create(argv[optind], &opts, &w) < 0)
        die(qcbt_error_get());
    if (opts.backing_file) {
        copts.format = opts.backing_fmt;
        if (chain_open(path, &copts, &backing) < 0) {
            qcow2_writer_abort(w);
            die(qcbt_error_get());
        }
    }
    for (i = optind + 2; i < argc; i++)
        run_cmd(w, argv[i], &buf, &buf_len);
    if (qcow2_writer_close(w) < 0)
        die(qcbt_error_get());
    free(buf);
    chain_close(backing);
    return 0;
}

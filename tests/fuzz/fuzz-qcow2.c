/* qcbt: fuzz target for the qcow2 reader and the bitmap directory.
 *
 * LLVMFuzzerTestOneInput() opens the input as a one-layer qcow2 image from
 * memory (no backing or data files), maps it, reads from it, and loads
 * every bitmap it lists.  Built with clang -fsanitize=fuzzer it is a
 * libFuzzer target; otherwise main() below replays files, or mutates seed
 * files deterministically (QCBT_FUZZ_ITERS, QCBT_FUZZ_SEED) so CI runs it
 * under ASan+UBSan with gcc.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bitmap.h"
#include "chain.h"
#include "error.h"
#include "io.h"
#include "qcow2-bitmaps.h"

#define MAX_MAP_STEPS 4096
#define READ_BUF      (256 * 1024)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static unsigned char buf[READ_BUF];
    struct qcbt_io *io;
    struct chain *c;
    struct chain_open_opts opts = {.format = "qcow2"};
    uint64_t pos;
    unsigned steps;

    if (qcbt_io_open_mem(data, size, "fuzz", &io) < 0)
        return 0;
    if (chain_open_io(io, "qcow2", NULL, &opts, &c) < 0)
        return 0;

    /* Map the start of the disk, read what is mapped. */
    for (pos = 0, steps = 0; pos < c->size && steps < MAX_MAP_STEPS; steps++) {
        struct chain_status st;
        size_t n;

        if (chain_block_status(c, pos, c->size - pos, &st) < 0)
            break;
        n = st.len < READ_BUF ? st.len : READ_BUF;
        (void)chain_read(c, buf, n, pos);
        pos += st.len;
    }
    /* The last bytes of the disk. */
    if (c->size >= 4096)
        (void)chain_read(c, buf, 4096, c->size - 4096);

    if (c->layers[0].qcow2) {
        struct qcow2_bitmap_list *bl = NULL;
        size_t i;

        if (qcow2_bitmaps_load(c->layers[0].qcow2, &bl) == 0) {
            for (i = 0; i < bl->nr; i++) {
                struct bitmap *bm = NULL;

                if (bl->bitmaps[i].status != QCOW2_BITMAP_OK)
                    continue;
                if (qcow2_bitmap_load_data(c->layers[0].qcow2,
                                           &bl->bitmaps[i],
                                           BITMAP_RAW,
                                           &bm) == 0) {
                    struct bitmap_extent e;
                    uint64_t o;
                    unsigned k = 0;

                    for (o = 0; o < bm->size && k < MAX_MAP_STEPS;
                         o += e.len, k++)
                        if (bitmap_extent(bm, o, UINT64_MAX, &e) < 0)
                            break;
                    bitmap_free(bm);
                }
            }
        }
        qcow2_bitmap_list_free(bl);
    }
    chain_close(c);
    return 0;
}

#ifndef QCBT_LIBFUZZER
static uint64_t rng_state;

static uint64_t
rng(void)
{
    /* xorshift64*: deterministic for a given seed. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

/* Structure-aware-ish mutations: header fields, extension area, tables. */
static void
mutate(unsigned char *d, size_t n)
{
    static const uint64_t interesting[] = {0,
                                           1,
                                           7,
                                           8,
                                           9,
                                           21,
                                           22,
                                           31,
                                           32,
                                           63,
                                           64,
                                           104,
                                           105,
                                           511,
                                           512,
                                           4096,
                                           65535,
                                           65536,
                                           0x7fffffff,
                                           0x80000000,
                                           0xffffffff,
                                           0x8000000,
                                           0xffffffffffffffffULL,
                                           0x8000000000000000ULL,
                                           0x00fffffffffffe00ULL,
                                           0x4000000000000000ULL,
                                           0x8000000000000001ULL};
    unsigned k, rounds = 1 + rng() % 4;

    if (n == 0)
        return;
    for (k = 0; k < rounds; k++) {
        /* Bias towards the first cluster (header, extensions). */
        size_t off = (rng() % 2) ? rng() % (n < 4096 ? n : 4096) : rng() % n;
        unsigned width = 1u << (rng() % 4); /* 1, 2, 4, 8 bytes */
        uint64_t v;
        unsigned b;

        switch (rng() % 4) {
        case 0: /* flip a bit */
            d[off] ^= 1u << (rng() % 8);
            break;
        case 1: /* random bytes */
            for (b = 0; b < width && off + b < n; b++)
                d[off + b] = rng();
            break;
        default: /* an interesting value, big-endian */
            v = interesting[rng() %
                            (sizeof interesting / sizeof interesting[0])];
            off &= ~(size_t)(width - 1);
            for (b = 0; b < width && off + b < n; b++)
                d[off + b] = v >> (8 * (width - 1 - b));
            break;
        }
    }
}

static unsigned char *
slurp(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    unsigned char *d;
    struct stat st;

    if (!fp || fstat(fileno(fp), &st) < 0) {
        perror(path);
        exit(1);
    }
    d = malloc(st.st_size ? st.st_size : 1);
    if (!d || fread(d, 1, st.st_size, fp) != (size_t)st.st_size) {
        perror(path);
        exit(1);
    }
    fclose(fp);
    *len = st.st_size;
    return d;
}

int
main(int argc, char **argv)
{
    const char *it = getenv("QCBT_FUZZ_ITERS");
    const char *seed = getenv("QCBT_FUZZ_SEED");
    unsigned long iters = it ? strtoul(it, NULL, 10) : 0;
    int i;

    rng_state = seed ? strtoull(seed, NULL, 0) : 0x9e3779b97f4a7c15ULL;
    if (rng_state == 0)
        rng_state = 1;
    if (argc < 2) {
        fprintf(stderr,
                "usage: %s SEED_FILE...  (QCBT_FUZZ_ITERS=N mutates "
                "each N times)\n",
                argv[0]);
        return 1;
    }
    for (i = 1; i < argc; i++) {
        size_t n;
        unsigned char *orig = slurp(argv[i], &n);
        unsigned long k;

        LLVMFuzzerTestOneInput(orig, n);
        for (k = 0; k < iters; k++) {
            /* An exact-size copy so ASan sees any read past the input. */
            unsigned char *d = malloc(n ? n : 1);

            memcpy(d, orig, n);
            mutate(d, n);
            LLVMFuzzerTestOneInput(d, n);
            free(d);
        }
        printf("%s: %lu mutations\n", argv[i], iters);
        free(orig);
    }
    return 0;
}
#endif

/* qcbt: the guest digest of a backup. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>
#if defined(__x86_64__) && __has_include(<xxh_x86dispatch.h>)
/* libxxhash's run-time dispatch: the same hashes, with AVX2 or AVX-512
 * when the CPU has them (twice the speed of the SSE2 code a plain build
 * gets on 512-byte blocks).
 */
#include <xxh_x86dispatch.h>
#endif

#include "byteorder.h"
#include "digest.h"
#include "error.h"
#include "minmax.h"

#define SCAN_CHUNK (4u * 1024 * 1024) /* a multiple of DIGEST_BLOCK */

void
gdigest_init(struct gdigest *d, uint64_t size)
{
    d->sum = 0;
    d->size = size;
}

static bool
all_zero(const unsigned char *p, size_t len)
{
    uint64_t acc = 0, w;
    size_t i = 0;

    for (; i + 64 <= len; i += 64) {
        uint64_t a, b, c, e, f, g, h, k;

        memcpy(&a, p + i, 8);
        memcpy(&b, p + i + 8, 8);
        memcpy(&c, p + i + 16, 8);
        memcpy(&e, p + i + 24, 8);
        memcpy(&f, p + i + 32, 8);
        memcpy(&g, p + i + 40, 8);
        memcpy(&h, p + i + 48, 8);
        memcpy(&k, p + i + 56, 8);
        acc |= a | b | c | e | f | g | h | k;
        if (acc)
            return false;
    }
    for (; i + 8 <= len; i += 8) {
        memcpy(&w, p + i, 8);
        acc |= w;
    }
    for (; i < len; i++)
        acc |= p[i];
    return acc == 0;
}

static void
accumulate(struct gdigest *d,
           uint64_t offset,
           const void *buf,
           size_t len,
           bool add)
{
    const unsigned char *p = buf;
    size_t pos;

    for (pos = 0; pos < len; pos += DIGEST_BLOCK) {
        size_t n = MIN((size_t)DIGEST_BLOCK, len - pos);
        XXH128_hash_t h;
        unsigned __int128 v;

        if (all_zero(p + pos, n))
            continue;
        /* The sector's offset seeds its hash: equal sectors at different
         * offsets never cancel out. */
        h = XXH3_128bits_withSeed(p + pos, n, offset + pos);
        v = ((unsigned __int128)h.high64 << 64) | h.low64;
        if (add)
            d->sum += v;
        else
            d->sum -= v;
    }
}

void
gdigest_add(struct gdigest *d, uint64_t offset, const void *buf, size_t len)
{
    accumulate(d, offset, buf, len, true);
}

void
gdigest_sub(struct gdigest *d, uint64_t offset, const void *buf, size_t len)
{
    accumulate(d, offset, buf, len, false);
}

unsigned __int128
gdigest_contrib(uint64_t offset, const void *buf, size_t len)
{
    struct gdigest d = {0};

    accumulate(&d, offset, buf, len, true);
    return d.sum;
}

void
gdigest_sum_hex(const struct gdigest *d, char hex[DIGEST_HEX_LEN + 1])
{
    snprintf(hex,
             DIGEST_HEX_LEN + 1,
             "%016llx%016llx",
             (unsigned long long)(d->sum >> 64),
             (unsigned long long)d->sum);
}

bool
gdigest_sum_parse(struct gdigest *d, const char *hex)
{
    unsigned __int128 v = 0;
    int i;

    if (!hex || strlen(hex) != DIGEST_HEX_LEN)
        return false;
    for (i = 0; i < DIGEST_HEX_LEN; i++) {
        char c = hex[i];
        unsigned x;

        if (c >= '0' && c <= '9')
            x = c - '0';
        else if (c >= 'a' && c <= 'f')
            x = c - 'a' + 10;
        else
            return false;
        v = (v << 4) | x;
    }
    d->sum = v;
    return true;
}

int
gdigest_sub_chain(struct gdigest *d,
                  struct chain *c,
                  uint64_t offset,
                  uint64_t len,
                  void *scratch,
                  size_t scratch_len)
{
    uint64_t end = MIN(offset + len, c->size), pos = offset;
    int r;

    while (pos < end) {
        uint64_t n = MIN((uint64_t)scratch_len, end - pos);
        struct chain_status st;

        r = chain_block_status(c, pos, n, &st);
        if (r < 0)
            return r;
        if (st.zero && !st.data) {
            pos += MIN(n, st.len); /* zeros contributed nothing */
            continue;
        }
        r = chain_read(c, scratch, n, pos);
        if (r < 0)
            return r;
        gdigest_sub(d, pos, scratch, n);
        pos += n;
    }
    return 0;
}

void
gdigest_final(const struct gdigest *d, char hex[DIGEST_HEX_LEN + 1])
{
    unsigned char b[24];
    XXH128_hash_t h;

    put_be64(b, (uint64_t)(d->sum >> 64));
    put_be64(b + 8, (uint64_t)d->sum);
    put_be64(b + 16, d->size);
    h = XXH3_128bits(b, sizeof b);
    snprintf(hex,
             DIGEST_HEX_LEN + 1,
             "%016llx%016llx",
             (unsigned long long)h.high64,
             (unsigned long long)h.low64);
}

int
chain_guest_digest(struct chain *c,
                   struct gdigest *out,
                   char hex[DIGEST_HEX_LEN + 1])
{
    struct gdigest d;
    unsigned char *buf = malloc(SCAN_CHUNK);
    uint64_t pos = 0;
    int r = 0;

    if (!buf)
        return qcbt_error(ENOMEM, "out of memory");
    gdigest_init(&d, c->size);
    while (pos < c->size) {
        uint64_t n = MIN((uint64_t)SCAN_CHUNK, c->size - pos);
        struct chain_status st;

        /* Whole chunks that read as zero are not read. */
        r = chain_block_status(c, pos, n, &st);
        if (r < 0)
            break;
        if (st.zero && !st.data && st.len >= n) {
            pos += n;
            continue;
        }
        r = chain_read(c, buf, n, pos);
        if (r < 0)
            break;
        gdigest_add(&d, pos, buf, n);
        pos += n;
    }
    free(buf);
    if (r == 0) {
        gdigest_final(&d, hex);
        if (out)
            *out = d;
    }
    return r;
}

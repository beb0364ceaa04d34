/* qcbt: QEMU-compatible SHA-256 digest of a dirty bitmap
 * (qcow2-format.md section 14.9: hbitmap_sha256 hashes the last level of
 * the HBitmap, i.e. the words of the bitmap on a 64-bit host).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include <openssl/evp.h>

#include "bitmap-digest.h"
#include "error.h"
#include "minmax.h"

#define DIGEST_CHUNK (1u << 20)

static void
to_hex(const unsigned char *md, char *hex)
{
    static const char digits[] = "0123456789abcdef";
    int i;

    for (i = 0; i < 32; i++) {
        hex[2 * i] = digits[md[i] >> 4];
        hex[2 * i + 1] = digits[md[i] & 15];
    }
    hex[64] = '\0';
}

int
bitmap_sha256(const struct bitmap *bm, char hex[BITMAP_SHA256_HEX_LEN + 1])
{
    unsigned char md[32];
    unsigned char *buf;
    uint64_t total = bitmap_raw_size(bm), pos;
    EVP_MD_CTX *ctx;
    int r = 0;

    buf = malloc(DIGEST_CHUNK);
    ctx = EVP_MD_CTX_new();
    if (!buf || !ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        r = qcbt_error(ENOMEM, "cannot set up SHA-256");
        goto out;
    }
    for (pos = 0; pos < total;) {
        uint64_t n = MIN((uint64_t)DIGEST_CHUNK, total - pos);

        r = bitmap_export(bm, pos, buf, n, BITMAP_RAW);
        if (r < 0)
            goto out;
        EVP_DigestUpdate(ctx, buf, n);
        pos += n;
    }
    EVP_DigestFinal_ex(ctx, md, NULL);
    to_hex(md, hex);
out:
    EVP_MD_CTX_free(ctx);
    free(buf);
    return r;
}

int
bitmap_sha256_zero(uint64_t size,
                   uint64_t granularity,
                   char hex[BITMAP_SHA256_HEX_LEN + 1])
{
    struct bitmap *bm;
    int r = bitmap_new(size, granularity, &bm);

    if (r < 0)
        return r;
    r = bitmap_sha256(bm, hex);
    bitmap_free(bm);
    return r;
}

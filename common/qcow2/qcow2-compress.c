/* qcbt: compressed clusters, deflate and zstd (qcow2.txt "Compressed
 * Clusters Descriptor", qcow2-format.md section 9).
 *
 * The descriptor gives the data's host byte offset and a 512-byte-granular
 * upper bound of its length, which may include the next cluster's bytes:
 * both decoders stop once exactly one cluster has been produced, and
 * anything that would produce more or less is an error (zip bombs cannot
 * grow past the caller's cluster-sized buffer).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>
#include <zstd.h>

#include "error.h"
#include "minmax.h"
#include "qcow2.h"

int
qcow2_decode_compressed(const struct qcow2_image *img,
                        uint64_t entry,
                        uint64_t *coffset,
                        uint64_t *csize)
{
    struct qcow2_compressed_desc d;

    if (!(entry & QCOW2_OFLAG_COMPRESSED) || (entry & QCOW2_OFLAG_COPIED))
        return qcbt_error(EIO,
                          "invalid compressed cluster descriptor 0x%016" PRIx64,
                          entry);
    qcow2_compressed_desc_decode(entry, img->hdr.cluster_bits, &d);
    if (qcow2_compressed_desc_check(&d, img->hdr.cluster_bits) < 0)
        return qcbt_error_prefix(EIO,
                                 "compressed cluster descriptor 0x%016" PRIx64,
                                 entry);
    *coffset = d.host_offset;
    *csize = qcow2_compressed_desc_len(&d);
    return 0;
}

size_t
qcow2_compressed_scratch_size(const struct qcow2_image *img)
{
    return (size_t)qcow2_compressed_max_len(img->hdr.cluster_bits);
}

static int
inflate_cluster(const void *in, size_t inlen, void *out, size_t outlen)
{
    z_stream s;
    int zr;

    memset(&s, 0, sizeof s);
    /* Raw deflate, no zlib header; a 32 KiB window decodes QEMU's 4 KiB. */
    if (inflateInit2(&s, -15) != Z_OK)
        return qcbt_error(ENOMEM, "inflateInit2 failed");
    s.next_in = (Bytef *)in;
    s.avail_in = inlen;
    s.next_out = out;
    s.avail_out = outlen;
    zr = inflate(&s, Z_FINISH);
    if (zr != Z_STREAM_END && s.avail_out == 0) {
        /* The cluster is full but the stream goes on: one more byte of
         * output tells a stream that merely has not seen its end marker
         * yet from one that decompresses to more than a cluster.
         */
        unsigned char extra;

        s.next_out = &extra;
        s.avail_out = 1;
        zr = inflate(&s, Z_FINISH);
        if (s.avail_out == 0) {
            inflateEnd(&s);
            return qcbt_error(EIO,
                              "compressed cluster decompresses to more "
                              "than a cluster (%zu bytes)",
                              outlen);
        }
        s.avail_out = 0;
    }
    inflateEnd(&s);
    /* The input length is only known to 512 bytes, so running out of
     * output before the stream ends is fine as long as the cluster is
     * complete (QEMU: Z_STREAM_END or Z_BUF_ERROR with avail_out == 0).
     */
    if ((zr == Z_STREAM_END || zr == Z_BUF_ERROR || zr == Z_OK) &&
        s.avail_out == 0)
        return 0;
    if (zr == Z_STREAM_END)
        return qcbt_error(EIO,
                          "compressed cluster decompresses to %zu bytes, "
                          "not a whole cluster (%zu)",
                          outlen - s.avail_out,
                          outlen);
    return qcbt_error(EIO,
                      "corrupt deflate data in compressed cluster (%s)",
                      s.msg ? s.msg : zError(zr));
}

/* One decompression context per thread, freed at thread exit. */
static pthread_key_t zstd_key;
static pthread_once_t zstd_once = PTHREAD_ONCE_INIT;

static void
zstd_free_dctx(void *p)
{
    ZSTD_freeDCtx(p);
}

static void
zstd_key_init(void)
{
    pthread_key_create(&zstd_key, zstd_free_dctx);
}

static int
zstd_cluster(const void *in, size_t inlen, void *out, size_t outlen)
{
    ZSTD_DCtx *dctx;
    ZSTD_inBuffer ib = {in, inlen, 0};
    ZSTD_outBuffer ob = {out, outlen, 0};
    size_t zr = 0;

    pthread_once(&zstd_once, zstd_key_init);
    dctx = pthread_getspecific(zstd_key);
    if (!dctx) {
        dctx = ZSTD_createDCtx();
        if (!dctx)
            return qcbt_error(ENOMEM, "ZSTD_createDCtx failed");
        pthread_setspecific(zstd_key, dctx);
    }
    ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only);
    /* Several frames are allowed; the cluster must end on a frame end. */
    while (ob.pos < ob.size) {
        size_t in_pos = ib.pos, out_pos = ob.pos;

        zr = ZSTD_decompressStream(dctx, &ob, &ib);
        if (ZSTD_isError(zr))
            return qcbt_error(EIO,
                              "corrupt zstd data in compressed cluster "
                              "(%s)",
                              ZSTD_getErrorName(zr));
        if (ib.pos == in_pos && ob.pos == out_pos)
            return qcbt_error(EIO,
                              "truncated zstd data in compressed cluster "
                              "(%zu of %zu bytes produced)",
                              ob.pos,
                              outlen);
    }
    if (zr > 0)
        return qcbt_error(EIO,
                          "zstd data in compressed cluster is larger "
                          "than a cluster");
    return 0;
}

int
qcow2_decompress(enum qcow2_compression type,
                 const void *in,
                 size_t inlen,
                 void *out,
                 size_t outlen)
{
    switch (type) {
    case QCOW2_COMPRESSION_DEFLATE:
        return inflate_cluster(in, inlen, out, outlen);
    case QCOW2_COMPRESSION_ZSTD:
        return zstd_cluster(in, inlen, out, outlen);
    }
    return qcbt_error(ENOTSUP, "unknown compression type %d", (int)type);
}

int
qcow2_read_compressed(struct qcow2_image *img,
                      uint64_t entry,
                      void *out,
                      void *scratch)
{
    uint64_t coffset, csize;
    ssize_t n;
    int r;

    r = qcow2_decode_compressed(img, entry, &coffset, &csize);
    if (r < 0)
        return qcbt_error_prefix(EIO, "%s", img->io->name);
    if (coffset >= img->io->size)
        return qcbt_error(EIO,
                          "%s: compressed cluster at 0x%" PRIx64
                          " is past the end of the file",
                          img->io->name,
                          coffset);
    /* The bound may run past the end of the file for the last cluster. */
    csize = MIN(csize, img->io->size - coffset);
    n = img->io->ops->pread(img->io->opaque, scratch, csize, coffset);
    if (n < 0)
        return qcbt_error(-n,
                          "%s: reading compressed cluster at 0x%" PRIx64 ": %s",
                          img->io->name,
                          coffset,
                          strerror(-n));
    r = qcow2_decompress(img->hdr.compression_type,
                         scratch,
                         n,
                         out,
                         img->cluster_size);
    if (r < 0)
        return qcbt_error_prefix(-r,
                                 "%s: compressed cluster at 0x%" PRIx64,
                                 img->io->name,
                                 coffset);
    return 0;
}

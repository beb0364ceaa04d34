/* qcbt: reader for virtnbdbackup's sparse stream files (see vnb.h). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lz4frame.h>

#include "error.h"
#include "json.h"
#include "minmax.h"
#include "vnb.h"

/* Compressed input is read in pieces of this size. */
#define VNB_LZ4_IN (1u << 20)

/* One data frame's LZ4 frames, from the trailer. */
struct vnb_citem {
    size_t nr;
    uint64_t *sizes;
};

struct vnb_stream {
    char *path;
    int fd;
    uint64_t file_size;
    uint64_t pos;      /* next byte to read */
    uint64_t body_end; /* where "stop" must end: the trailer's start */
    struct vnb_meta meta;
    size_t nr_citems;
    struct vnb_citem *citems;
};

const struct vnb_meta *
vnb_get_meta(const struct vnb_stream *s)
{
    return &s->meta;
}

void
vnb_close(struct vnb_stream *s)
{
    size_t i;

    if (!s)
        return;
    if (s->fd >= 0)
        close(s->fd);
    for (i = 0; i < s->nr_citems; i++)
        free(s->citems[i].sizes);
    free(s->citems);
    free(s->meta.date);
    free(s->meta.disk_name);
    free(s->meta.disk_format);
    free(s->meta.checkpoint);
    free(s->meta.parent);
    free(s->path);
    free(s);
}

/* Exactly N bytes at OFF, or an error naming what was being read. */
static int
read_at(struct vnb_stream *s,
        void *buf,
        size_t n,
        uint64_t off,
        const char *what)
{
    size_t done = 0;

    if (off > s->file_size || n > s->file_size - off)
        return qcbt_error(EINVAL,
                          "%s: truncated: %s at byte %" PRIu64
                          " needs %zu bytes, the file has %" PRIu64,
                          s->path,
                          what,
                          off,
                          n,
                          s->file_size);
    while (done < n) {
        ssize_t r = pread(s->fd, (char *)buf + done, n - done, off + done);

        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return qcbt_error(errno, "%s: %s", s->path, strerror(errno));
        if (r == 0)
            return qcbt_error(EIO,
                              "%s: truncated while being read (at byte "
                              "%" PRIu64 ")",
                              s->path,
                              off + done);
        done += r;
    }
    return 0;
}

static int
hex16(const char *p, uint64_t *out)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < 16; i++) {
        int c = p[i], d;

        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -1;
        v = v << 4 | (uint64_t)d;
    }
    *out = v;
    return 0;
}

/* A frame header at OFF: KIND (4 bytes, NUL-terminated), START, LENGTH. */
static int
read_header(struct vnb_stream *s,
            uint64_t off,
            char kind[5],
            uint64_t *start,
            uint64_t *len)
{
    char h[VNB_FRAME_LEN];
    char shown[VNB_FRAME_LEN * 4 + 1];
    int r, i;

    if ((r = read_at(s, h, sizeof h, off, "a frame header")) < 0)
        return r;
    for (i = 0; i < 4; i++)
        if (h[i] < 'a' || h[i] > 'z')
            goto bad;
    if (h[4] != ' ' || h[21] != ' ' || h[38] != '\r' || h[39] != '\n' ||
        hex16(h + 5, start) < 0 || hex16(h + 22, len) < 0)
        goto bad;
    memcpy(kind, h, 4);
    kind[4] = '\0';
    return 0;
bad:
    qcbt_escape(shown, sizeof shown, h, 24);
    return qcbt_error(EINVAL,
                      "%s: bad frame header at byte %" PRIu64
                      " (\"%s...\"): not a virtnbdbackup stream, or "
                      "corrupt",
                      s->path,
                      off,
                      shown);
}

static int
expect_term(struct vnb_stream *s, uint64_t off, const char *after)
{
    char t[2];
    int r;

    if ((r = read_at(s, t, 2, off, "a frame terminator")) < 0)
        return r;
    if (t[0] != '\r' || t[1] != '\n')
        return qcbt_error(EINVAL,
                          "%s: no \\r\\n after %s at byte %" PRIu64,
                          s->path,
                          after,
                          off);
    return 0;
}

static int
meta_str(struct vnb_stream *s,
         const struct json *o,
         const char *key,
         bool required,
         char **out)
{
    const struct json *v = json_get(o, key);

    if (!v || v->type == JSON_NULL) {
        if (required)
            return qcbt_error(EINVAL,
                              "%s: metadata has no \"%s\"",
                              s->path,
                              key);
        *out = strdup("");
    } else if (v->type != JSON_STRING) {
        return qcbt_error(EINVAL,
                          "%s: metadata \"%s\" is not a string",
                          s->path,
                          key);
    } else {
        *out = strdup(v->string);
    }
    return *out ? 0 : qcbt_error(ENOMEM, "out of memory");
}

/* virtualSize / dataSize (older streams spell them virtual-size, ...). */
static int
meta_u64(struct vnb_stream *s,
         const struct json *o,
         const char *key,
         const char *alt,
         uint64_t *out)
{
    int64_t v;

    if (!json_get_int(o, key, &v) && !json_get_int(o, alt, &v))
        return qcbt_error(EINVAL,
                          "%s: metadata \"%s\" missing or not an integer",
                          s->path,
                          key);
    if (v < 0)
        return qcbt_error(EINVAL,
                          "%s: metadata \"%s\" is negative",
                          s->path,
                          key);
    *out = (uint64_t)v;
    return 0;
}

static int
parse_meta(struct vnb_stream *s, const char *text, size_t len)
{
    struct vnb_meta *m = &s->meta;
    const struct json *v;
    struct json *root = NULL;
    int r;

    if ((r = json_parse(text, len, &root)) < 0)
        return qcbt_error_prefix(-r, "%s: metadata", s->path);
    if (root->type != JSON_OBJECT) {
        r = qcbt_error(EINVAL, "%s: metadata is not a JSON object", s->path);
        goto out;
    }
    if ((r = meta_u64(s,
                      root,
                      "virtualSize",
                      "virtual-size",
                      &m->virtual_size)) < 0 ||
        (r = meta_u64(s, root, "dataSize", "data-size", &m->data_size)) < 0 ||
        (r = meta_str(s, root, "date", false, &m->date)) < 0 ||
        (r = meta_str(s, root, "diskName", true, &m->disk_name)) < 0 ||
        (r = meta_str(s, root, "diskFormat", false, &m->disk_format)) < 0 ||
        (r = meta_str(s, root, "checkpointName", false, &m->checkpoint)) < 0 ||
        (r = meta_str(s, root, "parentCheckpoint", false, &m->parent)) < 0)
        goto out;
    if (!json_get_int(root, "streamVersion", &m->stream_version) &&
        !json_get_int(root, "stream-version", &m->stream_version))
        m->stream_version = 1;
    if (m->stream_version != 1 && m->stream_version != 2) {
        r = qcbt_error(ENOTSUP,
                       "%s: stream version %" PRId64 " is not supported "
                       "(this qcbt reads versions 1 and 2)",
                       s->path,
                       m->stream_version);
        goto out;
    }
    v = json_get(root, "incremental");
    m->incremental = v && v->type == JSON_BOOL && v->boolean;
    /* As virtnbdbackup decides: version 2 and "compressed" not false (it
     * holds the lz4 level). */
    v = json_get(root, "compressed");
    m->compressed = m->stream_version == 2 && v &&
                    !(v->type == JSON_BOOL && !v->boolean) &&
                    v->type != JSON_NULL;
    if (m->compressed) {
        const char *method;

        if (json_get_string(root, "compressionMethod", &method) &&
            strcmp(method, "lz4") != 0) {
            char shown[64];

            qcbt_escape(shown, sizeof shown, method, strlen(method));
            r = qcbt_error(ENOTSUP,
                           "%s: compression method \"%s\" is not supported "
                           "(only lz4)",
                           s->path,
                           shown);
            goto out;
        }
    }
    if (m->virtual_size == 0 || m->virtual_size > INT64_MAX ||
        m->virtual_size % 512 != 0) {
        r = qcbt_error(EINVAL,
                       "%s: metadata virtualSize %" PRIu64
                       " is not a positive multiple of 512",
                       s->path,
                       m->virtual_size);
        goto out;
    }
    if (m->data_size > m->virtual_size) {
        r = qcbt_error(EINVAL,
                       "%s: metadata dataSize %" PRIu64
                       " is larger than the disk (%" PRIu64 ")",
                       s->path,
                       m->data_size,
                       m->virtual_size);
        goto out;
    }
    r = 0;
out:
    json_free(root);
    return r;
}

static int
trailer_size(struct vnb_stream *s, const struct json *v, uint64_t *out)
{
    if (v->type != JSON_NUMBER || !v->is_int || v->integer <= 0 ||
        (uint64_t)v->integer > s->file_size)
        return qcbt_error(EINVAL,
                          "%s: compression trailer: a size is not a "
                          "positive integer within the file",
                          s->path);
    *out = (uint64_t)v->integer;
    return 0;
}

/* The compression trailer at the end of the file: "...stop" JSON "\r\n"
 * "comp 0 LEN\r\n".
 */
static int
read_trailer(struct vnb_stream *s)
{
    struct json *root = NULL;
    uint64_t start, len, off;
    char kind[5];
    char *text = NULL;
    size_t i, j;
    int r;

    if (s->file_size < s->pos + 2 * VNB_FRAME_LEN + 2)
        return qcbt_error(EINVAL,
                          "%s: truncated: a compressed stream ends with a "
                          "\"comp\" frame, and the file is too short for one",
                          s->path);
    off = s->file_size - VNB_FRAME_LEN;
    if (read_header(s, off, kind, &start, &len) < 0 ||
        strcmp(kind, "comp") != 0 || start != 0)
        return qcbt_error(EINVAL,
                          "%s: truncated or corrupt: a compressed stream must "
                          "end with a \"comp\" frame",
                          s->path);
    if (len == 0 || len > VNB_TRAILER_MAX ||
        len > off - 2 - VNB_FRAME_LEN - s->pos)
        return qcbt_error(EINVAL,
                          "%s: compression trailer length %" PRIu64
                          " does not fit in the file",
                          s->path,
                          len);
    if ((r = expect_term(s, off - 2, "the compression trailer")) < 0)
        return r;
    s->body_end = off - 2 - len;
    text = malloc(len);
    if (!text)
        return qcbt_error(ENOMEM, "out of memory");
    if ((r = read_at(s, text, len, s->body_end, "the compression trailer")) < 0)
        goto out;
    if ((r = json_parse(text, len, &root)) < 0) {
        r = qcbt_error_prefix(-r, "%s: compression trailer", s->path);
        goto out;
    }
    if (root->type != JSON_ARRAY) {
        r = qcbt_error(EINVAL,
                       "%s: compression trailer is not a JSON list",
                       s->path);
        goto out;
    }
    s->citems = calloc(root->len ? root->len : 1, sizeof *s->citems);
    if (!s->citems) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    s->nr_citems = root->len;
    for (i = 0; i < root->len; i++) {
        const struct json *it = root->items[i];
        struct vnb_citem *c = &s->citems[i];
        uint64_t total, sum = 0;
        char *end;

        if (it->type == JSON_NUMBER) {
            c->sizes = malloc(sizeof *c->sizes);
            if (!c->sizes) {
                r = qcbt_error(ENOMEM, "out of memory");
                goto out;
            }
            c->nr = 1;
            if ((r = trailer_size(s, it, &c->sizes[0])) < 0)
                goto out;
            continue;
        }
        if (it->type != JSON_OBJECT || it->len != 1 ||
            it->items[0]->type != JSON_ARRAY || it->items[0]->len == 0) {
            r = qcbt_error(EINVAL,
                           "%s: compression trailer item %zu is neither a "
                           "size nor {total: [sizes]}",
                           s->path,
                           i);
            goto out;
        }
        errno = 0;
        total = strtoull(it->keys[0], &end, 10);
        if (errno || end == it->keys[0] || *end) {
            r = qcbt_error(EINVAL,
                           "%s: compression trailer item %zu: total is not "
                           "a number",
                           s->path,
                           i);
            goto out;
        }
        c->sizes = calloc(it->items[0]->len, sizeof *c->sizes);
        if (!c->sizes) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        c->nr = it->items[0]->len;
        for (j = 0; j < c->nr; j++) {
            if ((r = trailer_size(s, it->items[0]->items[j], &c->sizes[j])) < 0)
                goto out;
            sum += c->sizes[j]; /* each <= file size: cannot overflow */
        }
        if (sum != total) {
            r = qcbt_error(EINVAL,
                           "%s: compression trailer item %zu: sizes add up "
                           "to %" PRIu64 ", not %" PRIu64,
                           s->path,
                           i,
                           sum,
                           total);
            goto out;
        }
    }
    r = 0;
out:
    json_free(root);
    free(text);
    return r;
}

int
vnb_open(const char *path, struct vnb_stream **out)
{
    struct vnb_stream *s = calloc(1, sizeof *s);
    uint64_t start, len;
    char kind[5];
    char *text = NULL;
    struct stat st;
    int r;

    *out = NULL;
    if (!s || !(s->path = strdup(path))) {
        free(s);
        return qcbt_error(ENOMEM, "out of memory");
    }
    s->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (s->fd < 0) {
        r = qcbt_error(errno, "%s: %s", path, strerror(errno));
        goto fail;
    }
    if (fstat(s->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        r = qcbt_error(EINVAL, "%s: not a regular file", path);
        goto fail;
    }
    s->file_size = st.st_size;
    if (s->file_size < VNB_FRAME_LEN) {
        r = qcbt_error(EINVAL,
                       "%s: truncated, or not a virtnbdbackup stream "
                       "(%" PRIu64 " bytes, shorter than a frame header)",
                       path,
                       s->file_size);
        goto fail;
    }
    if ((r = read_header(s, 0, kind, &start, &len)) < 0)
        goto fail;
    if (strcmp(kind, "meta") != 0) {
        r = qcbt_error(EINVAL,
                       "%s: not a virtnbdbackup stream (it starts with "
                       "\"%s\", not \"meta\"; a raw copy is a disk image "
                       "itself)",
                       path,
                       kind);
        goto fail;
    }
    if (start != 0 || len == 0 || len > VNB_META_MAX) {
        r = qcbt_error(EINVAL,
                       "%s: metadata frame of %" PRIu64 " bytes at %" PRIu64
                       " (expected 1 byte to 1 MiB "
                       "at 0)",
                       path,
                       len,
                       start);
        goto fail;
    }
    text = malloc(len);
    if (!text) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto fail;
    }
    if ((r = read_at(s, text, len, VNB_FRAME_LEN, "the metadata")) < 0 ||
        (r = expect_term(s, VNB_FRAME_LEN + len, "the metadata")) < 0 ||
        (r = parse_meta(s, text, len)) < 0)
        goto fail;
    s->pos = VNB_FRAME_LEN + len + 2;
    s->body_end = s->file_size;
    if (s->meta.compressed && (r = read_trailer(s)) < 0)
        goto fail;
    free(text);
    *out = s;
    return 0;
fail:
    free(text);
    vnb_close(s);
    return r;
}

/* An uncompressed data frame's payload: LEN bytes at s->pos. */
static int
read_plain(struct vnb_stream *s,
           const struct vnb_sink *sink,
           unsigned char *buf,
           uint64_t start,
           uint64_t len)
{
    uint64_t done = 0;
    int r;

    if (len > s->body_end - s->pos)
        return qcbt_error(EINVAL,
                          "%s: truncated: the data frame at byte %" PRIu64
                          " holds %" PRIu64 " bytes, the file has %" PRIu64
                          " left",
                          s->path,
                          s->pos - VNB_FRAME_LEN,
                          len,
                          s->body_end - s->pos);
    while (done < len) {
        size_t n = MIN((uint64_t)VNB_CHUNK, len - done);

        if ((r = read_at(s, buf, n, s->pos + done, "data")) < 0 ||
            (r = sink->data(sink->opaque, buf, n, start + done)) < 0)
            return r;
        done += n;
    }
    s->pos += len;
    return 0;
}

/* OUTSZ more decoded bytes of the LZ4 frame at FPOS sit in BUF after
 * *HAVE: count them (never past the data frame's LEN bytes), and pass BUF
 * on to SINK when full.  0 or -errno.
 */
static int
lz4_take(struct vnb_stream *s,
         const struct vnb_sink *sink,
         unsigned char *buf,
         size_t outsz,
         size_t *have,
         uint64_t *produced,
         uint64_t start,
         uint64_t len,
         uint64_t fpos)
{
    int r;

    if (outsz > len - *produced)
        return qcbt_error(EINVAL,
                          "%s: LZ4 data at byte %" PRIu64
                          " decompresses to more than the frame's "
                          "%" PRIu64 " bytes",
                          s->path,
                          fpos,
                          len);
    *produced += outsz;
    *have += outsz;
    if (*have == VNB_CHUNK) {
        r = sink->data(sink->opaque, buf, *have, start + *produced - *have);
        if (r < 0)
            return r;
        *have = 0;
    }
    return 0;
}

/* A compressed data frame's payload: the LZ4 frames of trailer item
 * CIDX, which must decompress to exactly LEN bytes.
 */
static int
read_lz4(struct vnb_stream *s,
         const struct vnb_sink *sink,
         unsigned char *buf,
         unsigned char *in,
         size_t cidx,
         uint64_t start,
         uint64_t len)
{
    const struct vnb_citem *c = &s->citems[cidx];
    LZ4F_dctx *dctx = NULL;
    uint64_t produced = 0; /* bytes of the frame passed on or in BUF */
    size_t have = 0;       /* bytes in BUF */
    size_t k;
    int r = 0;

    if (LZ4F_isError(LZ4F_createDecompressionContext(&dctx, LZ4F_VERSION)))
        return qcbt_error(ENOMEM, "out of memory");
    for (k = 0; k < c->nr; k++) {
        uint64_t csize = c->sizes[k], cdone = 0;
        uint64_t fpos = s->pos;
        size_t hint = 1;

        if (csize > s->body_end - s->pos) {
            r = qcbt_error(EINVAL,
                           "%s: truncated: LZ4 frame of %" PRIu64
                           " bytes at byte %" PRIu64 " runs past the data",
                           s->path,
                           csize,
                           s->pos);
            goto out;
        }
        LZ4F_resetDecompressionContext(dctx);
        while (cdone < csize) {
            size_t n = MIN((uint64_t)VNB_LZ4_IN, csize - cdone), used = 0;

            if ((r = read_at(s, in, n, s->pos + cdone, "compressed data")) < 0)
                goto out;
            while (used < n) {
                size_t insz = n - used, outsz = VNB_CHUNK - have;

                hint = LZ4F_decompress(dctx,
                                       buf + have,
                                       &outsz,
                                       in + used,
                                       &insz,
                                       NULL);
                if (LZ4F_isError(hint)) {
                    r = qcbt_error(EINVAL,
                                   "%s: LZ4 frame at byte %" PRIu64
                                   " (data for guest offset %" PRIu64 "): %s",
                                   s->path,
                                   fpos,
                                   start,
                                   LZ4F_getErrorName(hint));
                    goto out;
                }
                used += insz;
                r = lz4_take(s,
                             sink,
                             buf,
                             outsz,
                             &have,
                             &produced,
                             start,
                             len,
                             fpos);
                if (r < 0)
                    goto out;
                if (hint == 0 && (used < n || cdone + n < csize)) {
                    r = qcbt_error(EINVAL,
                                   "%s: LZ4 frame at byte %" PRIu64
                                   " ends before its compressed size "
                                   "%" PRIu64 " in the trailer",
                                   s->path,
                                   fpos,
                                   csize);
                    goto out;
                }
                if (insz == 0 && outsz == 0 && used < n) {
                    r = qcbt_error(EIO,
                                   "%s: LZ4 frame at byte %" PRIu64
                                   ": the decoder made no progress",
                                   s->path,
                                   fpos);
                    goto out;
                }
            }
            cdone += n;
        }
        /* The output may still hold decoded bytes (it was full). */
        while (hint != 0) {
            size_t insz = 0, outsz = VNB_CHUNK - have;

            hint = LZ4F_decompress(dctx, buf + have, &outsz, in, &insz, NULL);
            if (LZ4F_isError(hint) || outsz == 0)
                break;
            r = lz4_take(s,
                         sink,
                         buf,
                         outsz,
                         &have,
                         &produced,
                         start,
                         len,
                         fpos);
            if (r < 0)
                goto out;
        }
        if (hint != 0) {
            r = qcbt_error(EINVAL,
                           "%s: LZ4 frame at byte %" PRIu64
                           " is incomplete (truncated or wrong size in the "
                           "trailer)",
                           s->path,
                           fpos);
            goto out;
        }
        s->pos += csize;
    }
    if (produced != len) {
        r = qcbt_error(EINVAL,
                       "%s: compressed data frame for guest offset %" PRIu64
                       " decompresses to %" PRIu64 " bytes, the frame says "
                       "%" PRIu64,
                       s->path,
                       start,
                       produced,
                       len);
        goto out;
    }
    if (have > 0)
        r = sink->data(sink->opaque, buf, have, start + produced - have);
out:
    LZ4F_freeDecompressionContext(dctx);
    return r;
}

int
vnb_read(struct vnb_stream *s, const struct vnb_sink *sink)
{
    const struct vnb_meta *m = &s->meta;
    unsigned char *buf = malloc(VNB_CHUNK);
    unsigned char *in = m->compressed ? malloc(VNB_LZ4_IN) : NULL;
    uint64_t next = 0, data = 0; /* lowest offset allowed; data bytes */
    size_t ndata = 0;
    int r = 0;

    if (!buf || (m->compressed && !in)) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    for (;;) {
        uint64_t hoff = s->pos, start, len;
        char kind[5];

        if (s->pos >= s->body_end) {
            r = qcbt_error(EINVAL,
                           "%s: truncated: the stream ends at byte %" PRIu64
                           " without a \"stop\" frame",
                           s->path,
                           s->pos);
            goto out;
        }
        if ((r = read_header(s, s->pos, kind, &start, &len)) < 0)
            goto out;
        if (s->body_end - s->pos < VNB_FRAME_LEN) {
            r = qcbt_error(EINVAL,
                           "%s: truncated: the frame header at byte %" PRIu64
                           " runs into the compression trailer",
                           s->path,
                           s->pos);
            goto out;
        }
        s->pos += VNB_FRAME_LEN;
        if (strcmp(kind, "stop") == 0) {
            if (start != 0 || len != 0) {
                r = qcbt_error(EINVAL,
                               "%s: \"stop\" frame at byte %" PRIu64
                               " is not (0, 0)",
                               s->path,
                               hoff);
                goto out;
            }
            break;
        }
        if (strcmp(kind, "data") != 0 && strcmp(kind, "zero") != 0) {
            r = qcbt_error(EINVAL,
                           "%s: unexpected \"%s\" frame at byte %" PRIu64,
                           s->path,
                           kind,
                           hoff);
            goto out;
        }
        if (len == 0 || start > m->virtual_size ||
            len > m->virtual_size - start) {
            r = qcbt_error(EINVAL,
                           "%s: %s frame at byte %" PRIu64 " covers [%" PRIu64
                           ", +%" PRIu64 "), outside the %" PRIu64 "-byte disk",
                           s->path,
                           kind,
                           hoff,
                           start,
                           len,
                           m->virtual_size);
            goto out;
        }
        if (start < next) {
            r = qcbt_error(EINVAL,
                           "%s: %s frame at byte %" PRIu64 " (guest offset "
                           "%" PRIu64 ") overlaps or precedes the previous "
                           "frame",
                           s->path,
                           kind,
                           hoff,
                           start);
            goto out;
        }
        if (start % 512 != 0 ||
            (len % 512 != 0 && start + len != m->virtual_size)) {
            r = qcbt_error(ENOTSUP,
                           "%s: %s frame at byte %" PRIu64 " ([%" PRIu64
                           ", +%" PRIu64 ")) is not sector aligned; qcbt "
                           "imports streams in whole 512-byte sectors",
                           s->path,
                           kind,
                           hoff,
                           start,
                           len);
            goto out;
        }
        next = start + len;
        if (kind[0] == 'z') {
            if ((r = sink->zero(sink->opaque, start, len)) < 0)
                goto out;
            continue;
        }
        if (m->compressed) {
            if (ndata >= s->nr_citems) {
                r = qcbt_error(EINVAL,
                               "%s: data frame %zu at byte %" PRIu64
                               " has no entry in the compression trailer "
                               "(it lists %zu)",
                               s->path,
                               ndata,
                               hoff,
                               s->nr_citems);
                goto out;
            }
            r = read_lz4(s, sink, buf, in, ndata, start, len);
        } else {
            r = read_plain(s, sink, buf, start, len);
        }
        if (r < 0)
            goto out;
        if (s->body_end - s->pos < 2) {
            r = qcbt_error(EINVAL,
                           "%s: truncated: no \\r\\n after the data frame at "
                           "byte %" PRIu64,
                           s->path,
                           hoff);
            goto out;
        }
        if ((r = expect_term(s, s->pos, "a data frame")) < 0)
            goto out;
        s->pos += 2;
        data += len;
        ndata++;
    }
    if (s->pos != s->body_end) {
        r = qcbt_error(EINVAL,
                       "%s: %" PRIu64 " unexpected bytes after the \"stop\" "
                       "frame at byte %" PRIu64,
                       s->path,
                       s->body_end - s->pos,
                       s->pos - VNB_FRAME_LEN);
        goto out;
    }
    if (m->compressed && ndata != s->nr_citems) {
        r = qcbt_error(EINVAL,
                       "%s: the compression trailer lists %zu data frames, "
                       "the stream holds %zu",
                       s->path,
                       s->nr_citems,
                       ndata);
        goto out;
    }
    if (data != m->data_size) {
        r = qcbt_error(EINVAL,
                       "%s: the data frames hold %" PRIu64 " bytes, the "
                       "metadata says dataSize %" PRIu64,
                       s->path,
                       data,
                       m->data_size);
        goto out;
    }
out:
    free(buf);
    free(in);
    return r;
}

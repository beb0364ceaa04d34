/* qcbt: reader for virtnbdbackup's sparse stream files (*.data).
 *
 * Format (virtnbdbackup 1.9.15, libvirtnbdbackup/sparsestream): a sequence
 * of frames, each introduced by a 40-byte header
 *
 *     KIND " " START " " LENGTH "\r\n"
 *
 * KIND four letters, START and LENGTH 16 hex digits.  The first frame is
 * "meta" (start 0, LENGTH bytes of JSON, "\r\n"); then "data" frames
 * (guest bytes [START, START+LENGTH), the payload, "\r\n") and "zero"
 * frames (no payload), in increasing order; then "stop" (0, 0).  A
 * compressed stream (metadata streamVersion 2, "compressed" not false,
 * compressionMethod "lz4") stores each data frame's payload as one or more
 * LZ4 frames (lz4frame format, with their own block and content
 * checksums) and ends, after "stop", with a JSON trailer listing the
 * compressed sizes per data frame, "\r\n" and a "comp" header (0, trailer
 * length).  A trailer item is an integer (one LZ4 frame) or an object
 * {"TOTAL": [size, ...]} (several).
 *
 * Every field is untrusted: lengths are checked against the file and the
 * disk, frames must not overlap or go backwards, the data size must match
 * the metadata, the stream must end exactly where its format says, and
 * every LZ4 checksum must hold.  Errors are one line naming the file and
 * the byte offset in it.
 */
#ifndef QCBT_CLIENT_VNB_H
#define QCBT_CLIENT_VNB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VNB_FRAME_LEN 40
/* Limits on what we accept (virtnbdbackup writes a few hundred bytes of
 * metadata, and one trailer item per data frame: 16 MiB is some two
 * million extents, and bounds what parsing the trailer costs). */
#define VNB_META_MAX    (1u << 20)
#define VNB_TRAILER_MAX (16u << 20)
/* Payloads are passed on in pieces of at most this many bytes. */
#define VNB_CHUNK (4u << 20)

struct vnb_meta {
    uint64_t virtual_size;
    uint64_t data_size;
    char *date;        /* ISO 8601, local time of the backup host */
    char *disk_name;   /* "vda" */
    char *disk_format; /* "qcow2", "raw" */
    char *checkpoint;  /* checkpointName */
    char *parent;      /* parentCheckpoint, "" for a full backup */
    bool incremental;
    bool compressed;
    int64_t stream_version;
};

struct vnb_stream;

/* Open PATH and read its metadata (and, when compressed, its trailer).
 * Returns 0 and *out (free with vnb_close) or -errno with a message.
 */
int vnb_open(const char *path, struct vnb_stream **out);
void vnb_close(struct vnb_stream *s);

const struct vnb_meta *vnb_get_meta(const struct vnb_stream *s);

/* Receivers of the stream's contents.  DATA gets guest bytes BUF[0..len)
 * at OFFSET (pieces of one data frame arrive in order, each at most
 * VNB_CHUNK); ZERO a zero frame.  Return 0 or -errno with a message.
 */
struct vnb_sink {
    int (*data)(void *opaque, const void *buf, size_t len, uint64_t offset);
    int (*zero)(void *opaque, uint64_t offset, uint64_t len);
    void *opaque;
};

/* Read every frame from the first after the metadata to the end of the
 * file, validating as it goes, and pass the contents to SINK.  Returns 0
 * only when the whole stream is well formed; on an error part of it may
 * have been passed on already.
 */
int vnb_read(struct vnb_stream *s, const struct vnb_sink *sink);

#endif /* QCBT_CLIENT_VNB_H */

/* qcbt backup: full and incremental backups from any server that honours
 * the NBD contract (qcbt-server, qemu-nbd -B, libvirt pull mode), written
 * as a chain of qcow2 files (DESIGN.md "The backup agent").
 *
 * The disk is mapped in bounded windows of block status (base:allocation
 * together with the dirty-bitmap context), never as a whole list; dirty
 * data is read with many requests in flight over several connections and
 * written through the buffered qcow2 writer; dirty ranges that read as
 * zero become zero clusters, never skipped; clean ranges stay unallocated
 * and read through to the previous backup.  Any doubt means a full
 * backup (--auto, --fallback-full) or exit 2 (--since), never "nothing
 * changed".
 *
 * DIR changes in one step: the finished file is renamed from its
 * temporary name to backup-NNNN.qcow2, which nothing refers to until the
 * manifest that records it (already written to its temporary name)
 * replaces the old one (the commit point).  What a run that failed or
 * died before that leaves (the temporary files, an unrecorded
 * backup-NNNN.qcow2 with the next number beside the temporary manifest)
 * is removed by the failing run itself when it can, else by the next run,
 * under the lock.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "chain.h"
#include "digest-index.h"
#include "digest.h"
#include "error.h"
#include "json-out.h"
#include "json.h"
#include "local-source.h"
#include "manifest.h"
#include "minmax.h"
#include "nbd-connect.h"
#include "pace.h"
#include "qcbt.h"
#include "qcow2-writer.h"

/* Bytes per read request.  qemu-nbd spends about twice the CPU per byte
 * on 2 MiB reads as on 256 KiB ones (nbdcopy's size); our server and
 * nbdkit do not care.
 *
 * Reads in flight: at least DEFAULT_DEPTH per connection asked for (8 MiB
 * each, what a local server wants for its own parallelism, and more than
 * a 10 ms, 1 Gbit/s link holds: 1.25 MB).  A server costs less CPU per
 * byte with more requests queued on a connection: its threads find the
 * next request already in the socket instead of sleeping for it (16
 * reads per connection cost nbdkit's file plugin 12 % more CPU per byte
 * than 32, 24 % more than 64: bench/results/server-cpu.md).  More
 * when the link measures longer (pace.h: twice its bandwidth-delay
 * product), up to WINDOW_MAX bytes (or MAX_REQS reads) over all
 * connections: the read buffers are allocated as the window grows, so
 * they never take more than WINDOW_MAX x 1.25.
 */
#define CHUNK         (256u << 10)
#define DEFAULT_DEPTH 32
#define MAX_CONNS     16
#define WINDOW_MAX    (32u << 20)
#define MAX_REQS      1024u
#define MAP_WINDOW    (1ULL << 30) /* bytes of block status per request */
/* Block status requests in flight ahead of the reads: a map request costs
 * a round trip, and a 1 TiB disk is 1024 windows of MAP_WINDOW.  Each
 * request keeps at most the extents it reserved per context (the rest of
 * its range is asked again), and all those in flight reserve at most
 * MAP_BUDGET: 16 MiB for both contexts' lists, whatever the map.
 *
 * Dense: the map starts with MAP_AHEAD requests of MAP_WINDOW reserving
 * MAP_MAX_EXTENTS each, enough for a whole window of 64 KiB granules
 * alternating (never a reply cut short and recomputed by the server).
 * Sparse: once a reply comes back with few extents (at its density a
 * MAP_WINDOW_MAX window would need at most half of MAP_SPARSE_EXTENTS),
 * requests grow to MAP_WINDOW_MAX (the largest 64 KiB-aligned 32-bit
 * length, what nbdinfo and virtnbdbackup ask for) and reserve
 * MAP_SPARSE_EXTENTS, so up to MAP_SLOTS of them (1 TiB) fit the budget:
 * a sparse 1 TiB disk is mapped in two round trips, not 32.  A dense
 * reply turns new requests (and the rest of a cut one) back to 1 GiB.
 */
#define MAP_AHEAD          32
#define MAP_MAX_EXTENTS    32768
#define MAP_BUDGET         ((size_t)MAP_AHEAD * MAP_MAX_EXTENTS)
#define MAP_WINDOW_MAX     0xffff0000ULL
#define MAP_SPARSE_EXTENTS 1024
#define MAP_SLOTS          256

enum run_kind { RUN_COPY, RUN_ZERO };

struct run {
    uint64_t off, len;
    enum run_kind kind;
};

struct ext_list {
    uint32_t *e; /* (length, flags) pairs */
    size_t n, cap;
    bool got;
};

struct engine;
struct slot;

/* A block status request for [off, off + len), answered into alloc (and
 * dirty, for the dirty-bitmap context).
 */
struct mapreq {
    struct engine *eng;
    struct ext_list alloc, dirty;
    uint64_t off, len;
    uint64_t stop;   /* the slot maps [off, stop), asking again if short */
    size_t max_ext;  /* extents kept per context, reserved in MAP_BUDGET */
    unsigned rounds; /* round trips of the map up to this reply */
    bool done;       /* completed; err is its error (0: none) */
    int err;
    int map_err; /* a reply we refuse, with map_msg */
    char map_msg[256];
};

/* A thread that takes every slot in turn (struct engine). */
struct stage {
    const char *name;
    int (*fn)(struct engine *eng, struct slot *s);
    struct engine *eng;
    pthread_t t;
    bool running;
    /* mu guards q, q_head, q_len, next_seq and stop; the loop waits on
     * cv.  A lock per stage: the stages never wait for each other.
     */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    /* nslots entries: a slot is queued at most once.  An ordered stage
     * takes the slots in the order they were issued (disk order): q is
     * then indexed by seq % nslots (the slots it has not taken have
     * consecutive seqs from next_seq on, at most nslots of them).
     */
    struct slot **q;
    size_t q_head, q_len;
    struct slot **take; /* nslots entries: the batch being processed */
    bool ordered;
    uint64_t next_seq;
    int err;
    char msg[512];
};

/* A unit of work: a read in flight, then (queued) for the stages; or a
 * run of zeros for them.  Slots not in use are on the free list.
 */
struct slot {
    struct engine *eng;
    struct slot *next; /* on the free list */
    unsigned char *buf;
    enum run_kind kind;
    uint64_t off;
    uint64_t len;
    uint64_t seen; /* bytes covered by the reply's data and hole chunks */
    uint64_t seq;  /* issue order */
    size_t conn;
    int64_t issued_us; /* when the read was sent (pace.h) */
    unsigned refs;     /* stages not done with it (atomic) */
};

/* A connection: the first is opened before the engine starts; the others
 * connect in the background and join as they become ready, so a server
 * that refuses or never answers connection k (qemu-nbd -e N keeps it in
 * its listen queue) leaves the backup with the k it has.
 */
enum conn_state { CONN_OFF, CONN_CONNECTING, CONN_READY };

struct engine {
    struct nbd_handle *h[MAX_CONNS];
    enum conn_state cst[MAX_CONNS];
    size_t nconn;           /* handles opened */
    size_t nready;          /* of which ready: they carry the reads */
    size_t refused;         /* connections the server refused or closed */
    bool extras_started;    /* open_first opened the other connections */
    size_t early, early_ok; /* for QCBT_DEBUG: how many, and how many had
                               negotiated when the first one was ready */
    unsigned depth;         /* reads in flight per ready connection, at most */
    /* The window of reads in flight over all connections (pace.h), and
     * its bounds in reads.
     */
    struct pace pace;
    unsigned min_reqs, max_reqs, peak_in_flight;
    unsigned reqs;      /* the window now, in reads */
    struct slot *slots; /* nslots: room for max_reqs in flight */
    size_t nslots;
    size_t nbufs; /* slots[0..nbufs) have buffers: the others are unused */
    unsigned in_flight[MAX_CONNS];
    uint32_t chunk;
    uint64_t seq; /* slots issued */

    /* Stages, each a thread: the event loop only moves bytes between the
     * sockets and the slots; the qcow2 writer and the digest run on the
     * other CPU(s).  A slot read (or a run of zeros) goes to every stage
     * and back to the free list when the last one is done with it.
     * Under mu: the free list, errors, main_waiting; each stage's queue
     * is under the stage's own lock.
     */
    pthread_mutex_t mu;
    struct stage stages[2];
    size_t nstages;
    struct slot *free_list;
    bool main_waiting;
    /* Slots the event loop has for the stages but not handed on yet: it
     * hands them on in one go before it waits (queue_flush), not one
     * lock and one wakeup per read (issue 13: 194,879 futex calls for
     * 32,768 extents).  The loop's own.
     */
    struct slot **batch;
    size_t nbatch;
    /* Free slots the loop took from free_list in one go (its own). */
    struct slot *own_free;
    /* Set (atomically) once a stage has failed: the loop checks it
     * without the lock.
     */
    int stage_failed;
    int efd; /* eventfd: a slot came back while the loop was waiting */

    const char *ctx; /* dirty-bitmap context, NULL for a full backup */
    uint64_t size;
    struct qcow2_writer *w;

    /* Mapping: mq_n requests in flight from mq[mq_head] on, for
     * consecutive ranges from map_pos (mapped into runs up to there) to
     * map_issue.
     */
    uint64_t map_pos, map_issue;
    struct mapreq mq[MAP_SLOTS];
    unsigned mq_head, mq_n;
    size_t map_reserved; /* extents the requests in flight reserved */
    bool map_sparse;     /* the last reply was sparse: large windows */
    unsigned map_rounds; /* the last reply taken: its rounds */
    unsigned map_requests, map_peak, map_max_rounds; /* for QCBT_DEBUG */
    size_t map_held, map_held_peak; /* extents the lists hold room for */

    /* Work from the last mapped window. */
    struct run *runs;
    size_t nruns, cap_runs, run_idx;
    uint64_t run_done;

    /* Results. */
    uint64_t data_bytes, zero_bytes, extents, requests, copied;
    int io_err;
    char io_msg[512];
    /* Reads cut short by a dead connection (ENOTCONN), per connection:
     * how many, and the lowest offset.
     */
    unsigned cut_n[MAX_CONNS];
    uint64_t cut_off[MAX_CONNS];

    /* The server closed connection lost_conn (-1: none did) while the
     * engine was doing lost_what.
     */
    int lost_conn;
    char lost_what[160];

    bool progress;
    int64_t last_progress;

    /* Guest digest, kept as data streams in (digest.h), granule by
     * granule of the digest index (digest-index.h) in disk order, by the
     * digest stage (it takes the slots in issue order): each granule
     * written adds its new contribution and removes its old one, found
     * in the earlier backups' indexes (or read back from PREV where they
     * cannot tell), and goes into this backup's index.  Off when a range
     * is not sector aligned: the digest is then computed by reading the
     * backup back, without an index.
     */
    bool digest_stream;
    struct gdigest dg;  /* the previous sum, less the old, plus the new */
    struct chain *prev; /* the previous backup (incremental) */
    struct dgi_chain *dgi_prev; /* the earlier backups' indexes */
    struct dgi_writer *dgi;     /* this backup's index, or NULL */
    bool g_open;                /* a granule partly covered so far */
    uint64_t g_idx;
    unsigned __int128 g_new; /* its new contribution so far */
    uint64_t g_cov[DGI_GRANULE / DIGEST_BLOCK / 64]; /* sectors covered */
    unsigned char *gbuf; /* DGI_GRANULE bytes, a granule read back */
    uint64_t readback, readback_granules; /* by the digest */
    uint64_t fill_bytes; /* read by the writer for partial clusters */
};

static int64_t
mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t
mono_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* QCBT_DEBUG: when each stage of the run ended, from the start (a
 * timeline of the round trips a link costs).
 */
static struct debug_mark {
    const char *what;
    int64_t us;
} debug_marks[16];
static size_t debug_nmarks;

static void
debug_mark(const char *what)
{
    if (debug_nmarks < sizeof debug_marks / sizeof debug_marks[0])
        debug_marks[debug_nmarks++] =
            (struct debug_mark){.what = what, .us = mono_us()};
}

static void
debug_timeline(void)
{
    size_t i;

    if (!getenv("QCBT_DEBUG") || !debug_nmarks)
        return;
    fprintf(stderr, "qcbt backup: debug: timeline (ms):");
    for (i = 1; i < debug_nmarks; i++)
        fprintf(stderr,
                " %s %.1f",
                debug_marks[i].what,
                (debug_marks[i].us - debug_marks[0].us) / 1000.0);
    fprintf(stderr, "\n");
}

/* ---- notices ---------------------------------------------------------- */

/* A notice (why a backup is full, fewer connections than asked) is not an
 * error, so it never starts with "qcbt: ": a failure prints exactly one
 * such line.  Notices are "qcbt backup: ..." lines, printed at once on a
 * terminal (or with --progress), otherwise kept and printed once the
 * backup is recorded, so that a failed run's stderr is its error line.
 */
static bool notice_now;
static char notice_buf[4096];
static size_t notice_len;

static void notice(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void
notice(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (notice_now) {
        fprintf(stderr, "qcbt backup: %s\n", line);
        return;
    }
    n = snprintf(notice_buf + notice_len,
                 sizeof notice_buf - notice_len,
                 "qcbt backup: %s\n",
                 line);
    if (n > 0 && (size_t)n < sizeof notice_buf - notice_len)
        notice_len += n;
    else
        notice_buf[notice_len] = '\0'; /* no room: drop this one */
}

static void
notices_flush(void)
{
    fputs(notice_buf, stderr);
    notice_len = 0;
    notice_buf[0] = '\0';
}

static void
backup_usage(FILE *fp)
{
    fputs(
        "Usage: qcbt backup [--full | --since NAME | --auto] "
        "[--fallback-full]\n"
        "                   [--checkpoint NEW] [--bitmap CONTEXT] "
        "[--connections N]\n"
        "                   [--progress|--no-progress] [--no-digest] [--json]\n"
        "                   URI|IMAGE DIR\n"
        "\n"
        "Back up the NBD export URI (nbd://, nbds://, nbd+unix://, ...) or\n"
        "the local image IMAGE (any argument without SCHEME://; its whole\n"
        "backing chain, served by a qcbt-server that qcbt starts and stops)\n"
        "into DIR, one disk per directory.  Each backup is a qcow2 file; an\n"
        "incremental one has the previous backup as its backing file, so\n"
        "the newest file is the disk at that time for qemu-img, qemu-nbd\n"
        "and a VM.\n"
        "\n"
        "  --full            copy everything allocated\n"
        "  --since NAME      copy what changed since checkpoint NAME (context\n"
        "                    qemu:dirty-bitmap:NAME); the first backup in DIR\n"
        "                    is full; exit 2 if an incremental is not "
        "possible\n"
        "                    (context not offered, size changed, previous\n"
        "                    backup unreadable)\n"
        "  --auto            like --since with the checkpoint of the previous\n"
        "                    backup; full when in doubt (the default)\n"
        "  --fallback-full   with --since or --bitmap: full instead of exit 2\n"
        "  --checkpoint NEW  IMAGE only: once the backup is recorded,\n"
        "                    create checkpoint NEW (an enabled persistent\n"
        "                    bitmap in IMAGE, the top layer) holding the\n"
        "                    changes after the backup; the manifest records\n"
        "                    it for the next --auto.  IMAGE stays locked\n"
        "                    against writers throughout.  NEW must be new\n"
        "  --bitmap CONTEXT  the dirty-bitmap context to use, e.g. backup-vda\n"
        "                    (qemu:dirty-bitmap:CONTEXT) or a full context "
        "name\n"
        "  --connections N   parallel connections when the server allows\n"
        "                    multi-conn (default: one per CPU, at most 4); "
        "the\n"
        "                    ones the server accepts\n"
        "  --no-digest       do not compute the guest digest\n"
        "  --json            print the result as JSON\n"
        "\n"
        "Notices (why a backup is full, fewer connections) are lines\n"
        "\"qcbt backup: ...\" on stderr, once the backup is recorded (at once\n"
        "on a terminal); an error is one line \"qcbt: ...\".\n"
        "\n"
        "For IMAGE, qcbt-server is $QCBT_SERVER, else the one beside qcbt\n"
        "(or in ../server/ of a build tree), else the first on PATH.  A\n"
        "running VM's disk (an image another process writes) is refused:\n"
        "back it up through libvirt (URI), which creates its checkpoints.\n"
        "\n"
        "Exit status: 0 backup written and recorded (and NEW created); 1\n"
        "error (if NEW could not be created after the backup was recorded,\n"
        "the message says so: the next run uses --since OLD again); 2 a\n"
        "full backup is needed (--since, --bitmap).  On error DIR is left as\n"
        "it was.\n",
        fp);
    nbd_connect_usage(fp);
}

/* ---- block status ---------------------------------------------------- */

static int
ext_push(struct engine *eng,
         struct ext_list *l,
         uint32_t len,
         uint32_t flags,
         size_t max_ext)
{
    if (l->n + 2 > l->cap) {
        size_t nc = MIN(l->cap ? l->cap * 2 : 1024, 2 * max_ext);
        uint32_t *ne = realloc(l->e, nc * sizeof *ne);

        if (!ne)
            return -1;
        eng->map_held += (nc - l->cap) / 2;
        eng->map_held_peak = MAX(eng->map_held_peak, eng->map_held);
        l->e = ne;
        l->cap = nc;
    }
    l->e[l->n++] = len;
    l->e[l->n++] = flags;
    return 0;
}

static int
extent_cb(void *opaque,
          const char *metacontext,
          uint64_t offset,
          uint32_t *entries,
          size_t nr,
          int *error)
{
    struct mapreq *mr = opaque;
    struct engine *eng = mr->eng;
    struct ext_list *l;
    uint32_t maxflag;
    uint64_t sum = 0;
    size_t i;

    if (*error || mr->map_err)
        return 0;
    if (strcmp(metacontext, "base:allocation") == 0) {
        l = &mr->alloc;
        maxflag = 3;
    } else if (eng->ctx && strcmp(metacontext, eng->ctx) == 0) {
        l = &mr->dirty;
        maxflag = 1;
    } else {
        return 0; /* a context we did not ask for: ignore it */
    }
    if (l->got || offset != mr->off || nr < 2 || nr % 2) {
        mr->map_err = EPROTO;
        snprintf(mr->map_msg,
                 sizeof mr->map_msg,
                 "server sent a bad block status reply for %s at %" PRIu64,
                 metacontext,
                 offset);
        return 0;
    }
    l->got = true;
    /* libnbd passes extents unchecked: the server is not trusted. */
    /* (Past max_ext the rest is asked again.) */
    for (i = 0; i < nr && sum < mr->len && l->n / 2 < mr->max_ext; i += 2) {
        uint32_t len = entries[i], flags = entries[i + 1];

        if (len == 0 || flags > maxflag) {
            mr->map_err = EPROTO;
            snprintf(mr->map_msg,
                     sizeof mr->map_msg,
                     "server sent an extent with length %" PRIu32
                     " and flags 0x%" PRIx32 " for %s at %" PRIu64,
                     len,
                     flags,
                     metacontext,
                     offset + sum);
            return 0;
        }
        if (i + 2 < nr && sum + len > mr->len) {
            mr->map_err = EPROTO;
            snprintf(mr->map_msg,
                     sizeof mr->map_msg,
                     "server sent extents past the end of the request for %s",
                     metacontext);
            return 0;
        }
        if (sum + len > mr->len)
            len = mr->len - sum; /* only the last may run past */
        if (ext_push(eng, l, len, flags, mr->max_ext) < 0) {
            mr->map_err = ENOMEM;
            snprintf(mr->map_msg, sizeof mr->map_msg, "out of memory");
            return 0;
        }
        sum += len;
    }
    return 0;
}

static int
push_run(struct engine *eng, uint64_t off, uint64_t len, enum run_kind kind)
{
    struct run *r;

    if (eng->nruns && eng->runs[eng->nruns - 1].kind == kind &&
        eng->runs[eng->nruns - 1].off + eng->runs[eng->nruns - 1].len == off) {
        eng->runs[eng->nruns - 1].len += len;
        return 0;
    }
    if (eng->nruns == eng->cap_runs) {
        size_t nc = eng->cap_runs ? eng->cap_runs * 2 : 1024;

        r = realloc(eng->runs, nc * sizeof *r);
        if (!r)
            return qcbt_error(ENOMEM, "out of memory");
        eng->runs = r;
        eng->cap_runs = nc;
    }
    eng->runs[eng->nruns++] = (struct run){off, len, kind};
    if (kind == RUN_COPY)
        eng->extents++;
    return 0;
}

/* libnbd (1.14) reports a server that went away as a recv/send error
 * (ECONNRESET, EPIPE, or "server disconnected unexpectedly" at EOF) and
 * completes the commands in flight with ENOTCONN.  A protocol violation
 * also kills the handle, but keeps its own message.
 */
static bool
peer_closed(int err, const char *msg)
{
    return err == ECONNRESET || err == EPIPE || err == ENOTCONN ||
           err == ESHUTDOWN ||
           (msg && strstr(msg, "disconnected unexpectedly"));
}

static bool
conn_dead(const struct engine *eng, size_t ci)
{
    return eng->h[ci] &&
           (nbd_aio_is_dead(eng->h[ci]) || nbd_aio_is_closed(eng->h[ci]));
}

/* The server closed connection CI: remember it, and what the engine was
 * doing (the reads it cut short, else WHAT).
 */
static void
mark_lost(struct engine *eng, size_t ci, const char *what)
{
    if (eng->lost_conn >= 0)
        return;
    eng->lost_conn = (int)ci;
    if (eng->cut_n[ci])
        snprintf(eng->lost_what,
                 sizeof eng->lost_what,
                 "reading at offset %" PRIu64 " (%u read%s in flight)",
                 eng->cut_off[ci],
                 eng->cut_n[ci],
                 eng->cut_n[ci] == 1 ? "" : "s");
    else
        snprintf(eng->lost_what, sizeof eng->lost_what, "%s", what);
}

/* A libnbd call on connection CI failed: record its error as "PREFIX:
 * libnbd's message", and note whether the server closed the connection.
 */
static int
nbd_fail(struct engine *eng, size_t ci, const char *prefix, const char *what)
{
    int err = nbd_get_errno();
    const char *msg = nbd_get_error();

    /* A call refused with EINVAL ("invalid state: DEAD") on a handle whose
     * reads were retired with ENOTCONN: the socket failed inside an
     * earlier call that queued a read, which succeeded (see run_loop()).
     */
    if ((peer_closed(err, msg) || (err == EINVAL && eng->cut_n[ci])) &&
        conn_dead(eng, ci))
        mark_lost(eng, ci, what);
    return qcbt_error(err ? err : EIO,
                      "%s: %s",
                      prefix,
                      msg ? msg : "unknown error");
}

static int
map_done(void *opaque, int *error)
{
    struct mapreq *mr = opaque;

    mr->done = true;
    mr->err = *error;
    return 1;
}

/* Ask for block status of [off, off + len) into MR, keeping at most
 * MAX_EXT extents per context (reserved by the caller).
 */
static int
map_request(struct engine *eng,
            struct mapreq *mr,
            uint64_t off,
            uint64_t len,
            size_t max_ext)
{
    mr->eng = eng;
    mr->off = off;
    mr->len = len;
    mr->max_ext = max_ext;
    mr->rounds++;
    eng->map_max_rounds = MAX(eng->map_max_rounds, mr->rounds);
    mr->alloc.n = mr->dirty.n = 0;
    mr->alloc.got = mr->dirty.got = false;
    mr->done = false;
    mr->err = mr->map_err = 0;
    if (nbd_aio_block_status(
            eng->h[0],
            len,
            off,
            (nbd_extent_callback){.callback = extent_cb, .user_data = mr},
            (nbd_completion_callback){.callback = map_done, .user_data = mr},
            0) < 0) {
        char prefix[64], what[96];

        snprintf(prefix, sizeof prefix, "block status at %" PRIu64, off);
        snprintf(what, sizeof what, "mapping the disk at offset %" PRIu64, off);
        return nbd_fail(eng, 0, prefix, what);
    }
    eng->map_requests++;
    return 0;
}

/* Keep block status requests in flight (on the first connection, which
 * negotiated the contexts), as many as MAP_SLOTS and MAP_BUDGET allow.
 */
static int
map_ahead(struct engine *eng)
{
    while (eng->mq_n < MAP_SLOTS && eng->map_issue < eng->size) {
        struct mapreq *mr = &eng->mq[(eng->mq_head + eng->mq_n) % MAP_SLOTS];
        size_t max_ext = eng->map_sparse ? MAP_SPARSE_EXTENTS : MAP_MAX_EXTENTS;
        uint64_t len = MIN(eng->map_sparse ? MAP_WINDOW_MAX : MAP_WINDOW,
                           eng->size - eng->map_issue);
        int r;

        if (eng->map_reserved + max_ext > MAP_BUDGET)
            break;
        /* Asked now: one round trip after the last reply taken. */
        mr->rounds = eng->map_rounds;
        mr->stop = eng->map_issue + len;
        r = map_request(eng, mr, eng->map_issue, len, max_ext);
        if (r < 0)
            return r;
        eng->map_reserved += max_ext;
        eng->map_issue += len;
        eng->mq_n++;
        eng->map_peak = MAX(eng->map_peak, eng->mq_n);
    }
    return 0;
}

/* The oldest block status request has completed: map its answer into
 * runs, from map_pos on.
 */
static int
map_take(struct engine *eng)
{
    struct mapreq *mr = &eng->mq[eng->mq_head];
    uint64_t pos = mr->off, end, a_end, d_end;
    size_t ai = 0, di = 0, max_ext;
    uint64_t a_pos, d_pos;
    int r;

    eng->nruns = eng->run_idx = 0;
    eng->run_done = 0;
    if (mr->err) {
        char what[96];

        snprintf(what, sizeof what, "mapping the disk at offset %" PRIu64, pos);
        if (peer_closed(mr->err, NULL) && conn_dead(eng, 0))
            mark_lost(eng, 0, what);
        return qcbt_error(mr->err,
                          "block status at %" PRIu64 ": %s",
                          pos,
                          strerror(mr->err));
    }
    if (mr->map_err)
        return qcbt_error(mr->map_err, "%s", mr->map_msg);
    if (!mr->alloc.got || (eng->ctx && !mr->dirty.got))
        return qcbt_error(EPROTO,
                          "server omitted a context from its block "
                          "status reply at %" PRIu64,
                          pos);

    /* Both contexts cover [pos, their end); use the common part. */
    a_end = pos;
    for (ai = 0; ai < mr->alloc.n; ai += 2)
        a_end += mr->alloc.e[ai];
    end = a_end;
    if (eng->ctx) {
        d_end = pos;
        for (di = 0; di < mr->dirty.n; di += 2)
            d_end += mr->dirty.e[di];
        end = MIN(end, d_end);
    }
    if (end <= pos)
        return qcbt_error(EPROTO,
                          "server returned no extents at %" PRIu64,
                          pos);

    ai = di = 0;
    a_pos = d_pos = pos;
    while (pos < end) {
        uint64_t a_stop = a_pos + mr->alloc.e[ai];
        uint32_t aflags = mr->alloc.e[ai + 1];
        bool reads_zero = aflags & 2; /* NBD_STATE_ZERO */
        bool dirty = true;
        uint64_t stop = MIN(a_stop, end);

        if (eng->ctx) {
            uint64_t d_stop = d_pos + mr->dirty.e[di];
            dirty = mr->dirty.e[di + 1] & 1;
            stop = MIN(stop, d_stop);
            if (stop == d_stop) {
                d_pos = d_stop;
                di += 2;
            }
        }
        if (dirty) {
            if (!reads_zero)
                r = push_run(eng, pos, stop - pos, RUN_COPY);
            else if (eng->ctx)
                /* Dirty but zero now: record the zeros (never skip, or a
                 * restore would resurrect the old data). */
                r = push_run(eng, pos, stop - pos, RUN_ZERO);
            else
                r = 0; /* full backup: unallocated reads as zero */
            if (r < 0)
                return r;
        }
        if (stop == a_stop) {
            a_pos = a_stop;
            ai += 2;
        }
        pos = stop;
    }
    if (eng->map_pos == 0)
        debug_mark("map-reply");
    eng->map_pos = end;
    if (end == eng->size)
        debug_mark("mapped");
    eng->map_rounds = mr->rounds;
    /* Sparse if a MAP_WINDOW_MAX window at this density would keep at
     * most half of MAP_SPARSE_EXTENTS (no overflow: at most 2^15
     * extents times 2^32).
     */
    eng->map_sparse =
        (uint64_t)MAX(mr->alloc.n, mr->dirty.n) / 2 * MAP_WINDOW_MAX <=
        (uint64_t)MAP_SPARSE_EXTENTS / 2 * (end - mr->off);
    eng->map_reserved -= mr->max_ext;
    if (end < mr->stop) {
        /* A short reply: ask again for the rest, before the windows
         * ahead, in a window and with extents as for a new request
         * (more extents if the budget has them: never fewer than this
         * request had, which is still free).
         */
        max_ext = eng->map_sparse ? MAP_SPARSE_EXTENTS : MAP_MAX_EXTENTS;
        max_ext = MIN(max_ext, MAP_BUDGET - eng->map_reserved);
        eng->map_reserved += max_ext;
        return map_request(
            eng,
            mr,
            end,
            MIN(mr->stop - end, eng->map_sparse ? MAP_WINDOW_MAX : MAP_WINDOW),
            max_ext);
    }
    /* Give the lists back: a slot keeps only what is reserved. */
    eng->map_held -= (mr->alloc.cap + mr->dirty.cap) / 2;
    free(mr->alloc.e);
    free(mr->dirty.e);
    mr->alloc = mr->dirty = (struct ext_list){0};
    eng->mq_head = (eng->mq_head + 1) % MAP_SLOTS;
    eng->mq_n--;
    return 0;
}

/* ---- digest ----------------------------------------------------------- */

static bool
digest_aligned(const struct engine *eng, uint64_t off, uint64_t len)
{
    return !((off | len) & (DIGEST_BLOCK - 1)) || off + len == eng->size;
}

/* Read granule G of the previous backup into eng->gbuf (LEN bytes);
 * what reads as zero is not read.
 */
static int
granule_read_prev(struct engine *eng, uint64_t g, size_t len)
{
    uint64_t off = g << DGI_GRANULE_BITS;
    struct chain_status st;
    int r;

    r = chain_block_status(eng->prev, off, len, &st);
    if (r < 0)
        return r;
    if (st.zero && !st.data && st.len >= len) {
        memset(eng->gbuf, 0, len);
        return 0;
    }
    r = chain_read(eng->prev, eng->gbuf, len, off);
    if (r < 0)
        return r;
    eng->readback += len;
    eng->readback_granules++;
    return 0;
}

/* Granule G (LEN bytes) now contributes NEWV: take its old contribution
 * out of the sum (from the indexes, else from PREVBUF, the granule read
 * back, else read back now), put the new one in, and into the index.
 */
static int
granule_done(struct engine *eng,
             uint64_t g,
             size_t len,
             unsigned __int128 newv,
             const unsigned char *prevbuf)
{
    unsigned __int128 old = 0;
    int r;

    if (eng->prev &&
        !(eng->dgi_prev && dgi_chain_lookup(eng->dgi_prev, g, &old))) {
        if (!prevbuf) {
            r = granule_read_prev(eng, g, len);
            if (r < 0)
                return r;
            prevbuf = eng->gbuf;
        }
        old = gdigest_contrib(g << DGI_GRANULE_BITS, prevbuf, len);
    }
    eng->dg.sum += newv - old;
    return eng->dgi ? dgi_writer_add(eng->dgi, g, newv) : 0;
}

static bool
granule_covered(const struct engine *eng, size_t i)
{
    return eng->g_cov[i / 64] & (1ULL << (i % 64));
}

/* The partly covered granule is complete: what this backup did not write
 * there (a partial cluster) is the previous backup's, read back.
 */
static int
granule_close(struct engine *eng)
{
    uint64_t g = eng->g_idx, off = g << DGI_GRANULE_BITS;
    size_t len = (size_t)MIN((uint64_t)DGI_GRANULE, eng->size - off);
    const unsigned char *prevbuf = NULL;
    size_t i;
    int r;

    eng->g_open = false;
    for (i = 0; i * DIGEST_BLOCK < len && granule_covered(eng, i); i++)
        ;
    if (eng->prev && i * DIGEST_BLOCK < len) {
        r = granule_read_prev(eng, g, len);
        if (r < 0)
            return r;
        prevbuf = eng->gbuf;
        for (i = 0; i * DIGEST_BLOCK < len; i++)
            if (!granule_covered(eng, i))
                eng->g_new += gdigest_contrib(
                    off + i * DIGEST_BLOCK,
                    prevbuf + i * DIGEST_BLOCK,
                    MIN((size_t)DIGEST_BLOCK, len - i * DIGEST_BLOCK));
    }
    /* (A full backup has nothing below: what it did not write is zero.) */
    return granule_done(eng, g, len, eng->g_new, prevbuf);
}

/* This backup writes DATA (NULL: zeros) at [off, off+len), in disk order
 * after what came before: the digest stage's work.
 */
static int
digest_feed(struct engine *eng,
            uint64_t off,
            uint64_t len,
            const unsigned char *data)
{
    int r;

    if (!eng->digest_stream)
        return 0;
    if (!digest_aligned(eng, off, len)) {
        eng->digest_stream = false; /* read it back at the end instead */
        return 0;
    }
    while (len) {
        uint64_t g = off >> DGI_GRANULE_BITS, gs = g << DGI_GRANULE_BITS;
        uint64_t glen = MIN((uint64_t)DGI_GRANULE, eng->size - gs);
        uint64_t n = MIN(len, gs + glen - off), i;

        if (eng->g_open && eng->g_idx != g) {
            r = granule_close(eng);
            if (r < 0)
                return r;
        }
        if (!eng->g_open && off == gs && n == glen) {
            r = granule_done(eng,
                             g,
                             glen,
                             data ? gdigest_contrib(off, data, n) : 0,
                             NULL);
            if (r < 0)
                return r;
        } else {
            if (!eng->g_open) {
                eng->g_open = true;
                eng->g_idx = g;
                eng->g_new = 0;
                memset(eng->g_cov, 0, sizeof eng->g_cov);
            }
            if (data)
                eng->g_new += gdigest_contrib(off, data, n);
            for (i = (off - gs) / DIGEST_BLOCK; i * DIGEST_BLOCK < off - gs + n;
                 i++)
                eng->g_cov[i / 64] |= 1ULL << (i % 64);
            for (i = 0; i * DIGEST_BLOCK < glen && granule_covered(eng, i); i++)
                ;
            if (i * DIGEST_BLOCK >= glen) {
                r = granule_close(eng);
                if (r < 0)
                    return r;
            }
        }
        off += n;
        len -= n;
        if (data)
            data += n;
    }
    return 0;
}

/* After the last slot (the stages stopped): close the last granule. */
static int
digest_end(struct engine *eng)
{
    if (eng->digest_stream && eng->g_open)
        return granule_close(eng);
    return 0;
}

/* ---- the stages: writer and digest threads ----------------------------- */

static void
slot_put_locked(struct engine *eng, struct slot *s, bool *wake)
{
    s->next = eng->free_list;
    eng->free_list = s;
    *wake |= eng->main_waiting;
    eng->main_waiting = false;
}

static void
wake_main(struct engine *eng)
{
    uint64_t one = 1;
    ssize_t n = write(eng->efd, &one, sizeof one);

    (void)n; /* the counter cannot overflow here */
}

static void
slot_put(struct engine *eng, struct slot *s)
{
    bool wake = false;

    pthread_mutex_lock(&eng->mu);
    slot_put_locked(eng, s, &wake);
    pthread_mutex_unlock(&eng->mu);
    if (wake)
        wake_main(eng);
}

/* A free slot, or NULL (and the loop is woken when one comes back). */
static struct slot *
slot_get(struct engine *eng)
{
    struct slot *s = eng->own_free;

    if (!s) {
        /* Take the whole free list: one lock for many reads. */
        pthread_mutex_lock(&eng->mu);
        s = eng->free_list;
        eng->free_list = NULL;
        if (!s)
            eng->main_waiting = true;
        pthread_mutex_unlock(&eng->mu);
    }
    if (s)
        eng->own_free = s->next;
    return s;
}

/* S is ready for the stages: handed on at the next queue_flush(). */
static void
queue_slot(struct engine *eng, struct slot *s)
{
    eng->batch[eng->nbatch++] = s;
}

/* Hand every slot in the batch to every stage, with one lock and one
 * wakeup per stage.
 */
static void
queue_flush(struct engine *eng)
{
    size_t i, k;

    if (!eng->nbatch)
        return;
    for (k = 0; k < eng->nbatch; k++)
        __atomic_store_n(&eng->batch[k]->refs, eng->nstages, __ATOMIC_RELAXED);
    for (i = 0; i < eng->nstages; i++) {
        struct stage *st = &eng->stages[i];

        pthread_mutex_lock(&st->mu);
        for (k = 0; k < eng->nbatch; k++) {
            struct slot *s = eng->batch[k];

            if (st->ordered)
                st->q[s->seq % eng->nslots] = s;
            else
                st->q[(st->q_head + st->q_len) % eng->nslots] = s;
            st->q_len++;
        }
        pthread_mutex_unlock(&st->mu);
        /* Signalled after the unlock, the stage does not wake up only to
         * wait for the lock. */
        pthread_cond_signal(&st->cv);
    }
    eng->nbatch = 0;
}

/* The first stage error (0 if none). */
static int
stage_error(struct engine *eng)
{
    int e = 0;
    size_t i;

    if (!__atomic_load_n(&eng->stage_failed, __ATOMIC_ACQUIRE))
        return 0;
    pthread_mutex_lock(&eng->mu);
    for (i = 0; i < eng->nstages && !e; i++)
        e = eng->stages[i].err;
    pthread_mutex_unlock(&eng->mu);
    return e;
}

/* The writer stage.  (In a full backup it used to keep the digest too,
 * to hash each piece just before copying it; the digest now follows the
 * disk in order, and an ordered writer would wait for the slowest read:
 * bench-backup.sh's full backup took 20-40 % longer that way, with a
 * digest stage as long as before.)
 */
static int
write_slot(struct engine *eng, struct slot *s)
{
    if (s->kind == RUN_ZERO)
        return qcow2_writer_zero(eng->w, s->off, s->len);
    return qcow2_writer_write(eng->w, s->buf, s->len, s->off);
}

static int
digest_slot(struct engine *eng, struct slot *s)
{
    return digest_feed(eng,
                       s->off,
                       s->len,
                       s->kind == RUN_ZERO ? NULL : s->buf);
}

/* Take what ST may process now into TAKE (at most nslots): all it has
 * queued, or for an ordered stage the slots that follow in order.
 * Under mu.
 */
static size_t
stage_take_locked(struct engine *eng, struct stage *st, struct slot **take)
{
    size_t n = 0;

    if (st->ordered) {
        struct slot *s;

        while ((s = st->q[st->next_seq % eng->nslots])) {
            st->q[st->next_seq % eng->nslots] = NULL;
            st->next_seq++;
            take[n++] = s;
        }
    } else {
        for (; n < st->q_len; n++)
            take[n] = st->q[(st->q_head + n) % eng->nslots];
        st->q_head = (st->q_head + n) % eng->nslots;
    }
    st->q_len -= n;
    return n;
}

/* A stage thread: it takes the slots in batches, and hands the batch
 * back (those the other stages are done with to the free list) with one
 * lock and at most one wakeup of the event loop.
 */
static void *
stage_main(void *opaque)
{
    struct stage *st = opaque;
    struct engine *eng = st->eng;
    bool failed = false;

    for (;;) {
        struct slot *done = NULL;
        bool wake = false;
        size_t n, k;
        int r = 0;

        pthread_mutex_lock(&st->mu);
        while (!(n = stage_take_locked(eng, st, st->take)) && !st->stop)
            pthread_cond_wait(&st->cv, &st->mu);
        pthread_mutex_unlock(&st->mu);
        if (!n)
            break; /* Stopped.  (An ordered stage may be left waiting for
                    * a slot whose read failed: the run is failing then.) */

        /* After an error the rest is only handed back. */
        for (k = 0; k < n && !failed; k++) {
            r = st->fn(eng, st->take[k]);
            if (r < 0)
                failed = true;
        }

        /* The last stage done with a slot frees it. */
        for (k = 0; k < n; k++)
            if (__atomic_sub_fetch(&st->take[k]->refs, 1, __ATOMIC_ACQ_REL) ==
                0) {
                st->take[k]->next = done;
                done = st->take[k];
            }
        if (!done && r >= 0)
            continue;
        pthread_mutex_lock(&eng->mu);
        if (r < 0) {
            st->err = -r;
            snprintf(st->msg, sizeof st->msg, "%s", qcbt_error_get());
            __atomic_store_n(&eng->stage_failed, 1, __ATOMIC_RELEASE);
        }
        while (done) {
            struct slot *s = done;

            done = s->next;
            slot_put_locked(eng, s, &wake);
        }
        pthread_mutex_unlock(&eng->mu);
        if (wake)
            wake_main(eng);
    }
    return NULL;
}

/* The writer, and with DIGEST a digest stage, which takes the slots in
 * disk order.
 */
static int
stages_start(struct engine *eng, bool digest)
{
    static const struct {
        const char *name;
        int (*fn)(struct engine *, struct slot *);
    } kinds[] = {{"writer", write_slot}, {"digest", digest_slot}};
    size_t i;
    int r;

    eng->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (eng->efd < 0)
        return qcbt_error(errno, "eventfd: %s", strerror(errno));
    eng->nstages = digest ? 2 : 1;
    for (i = 0; i < eng->nstages; i++) {
        struct stage *st = &eng->stages[i];

        st->name = kinds[i].name;
        st->fn = kinds[i].fn;
        st->eng = eng;
        st->ordered = i == 1;
        st->q = calloc(eng->nslots, sizeof *st->q);
        st->take = calloc(eng->nslots, sizeof *st->take);
        if (!st->q || !st->take)
            return qcbt_error(ENOMEM, "out of memory");
        r = pthread_create(&st->t, NULL, stage_main, st);
        if (r)
            return qcbt_error(r,
                              "cannot start the %s thread: %s",
                              st->name,
                              strerror(r));
        st->running = true;
    }
    return 0;
}

/* Let the stages finish what is queued, and wait for them.  Returns the
 * first stage error (set as the last error), or 0.
 */
static int
stages_stop(struct engine *eng)
{
    size_t i;

    for (i = 0; i < eng->nstages; i++) {
        struct stage *st = &eng->stages[i];

        pthread_mutex_lock(&st->mu);
        st->stop = true;
        pthread_cond_signal(&st->cv);
        pthread_mutex_unlock(&st->mu);
    }
    for (i = 0; i < eng->nstages; i++)
        if (eng->stages[i].running) {
            pthread_join(eng->stages[i].t, NULL);
            eng->stages[i].running = false;
        }
    for (i = 0; i < eng->nstages; i++)
        if (eng->stages[i].err)
            return qcbt_error(eng->stages[i].err, "%s", eng->stages[i].msg);
    return 0;
}

/* ---- reads ------------------------------------------------------------ */

/* libnbd (1.14) does not check that a structured read reply covers the
 * whole request: count what the chunks cover, check it at completion.
 */
static int
read_chunk(void *opaque,
           const void *subbuf,
           size_t count,
           uint64_t offset,
           unsigned status,
           int *error)
{
    struct slot *s = opaque;

    (void)subbuf;
    (void)offset;
    (void)error;
    if (status == LIBNBD_READ_DATA || status == LIBNBD_READ_HOLE)
        s->seen += count;
    return 0;
}

static int
read_done(void *opaque, int *error)
{
    struct slot *s = opaque;
    struct engine *eng = s->eng;

    eng->in_flight[s->conn]--;
    if (*error == ENOTCONN) {
        if (!eng->cut_n[s->conn]++ || s->off < eng->cut_off[s->conn])
            eng->cut_off[s->conn] = s->off;
    }
    if (*error) {
        if (!eng->io_err) {
            eng->io_err = *error;
            snprintf(eng->io_msg,
                     sizeof eng->io_msg,
                     "read of %" PRIu64 " bytes at %" PRIu64 " failed: %s",
                     s->len,
                     s->off,
                     strerror(*error));
        }
    } else if (!eng->io_err && s->seen != s->len) {
        eng->io_err = EPROTO;
        snprintf(eng->io_msg,
                 sizeof eng->io_msg,
                 "server sent %" PRIu64 " of %" PRIu64
                 " bytes for the read at %" PRIu64,
                 s->seen,
                 s->len,
                 s->off);
    }
    if (eng->io_err) {
        slot_put(eng, s);
        return 1;
    }
    pace_done(&eng->pace, mono_us(), s->issued_us, s->len);
    eng->data_bytes += s->len;
    eng->copied += s->len;
    queue_slot(eng, s);
    return 1;
}

/* Issue the next piece of work on connection CI.  Returns 1 if something
 * was issued or queued, 0 if there is no work in this window or no free
 * slot, -1 on error.
 */
static int
next_work(struct engine *eng, size_t ci)
{
    struct run *run;
    struct slot *s;
    uint64_t n;

    while (eng->run_idx < eng->nruns &&
           eng->run_done == eng->runs[eng->run_idx].len) {
        eng->run_idx++;
        eng->run_done = 0;
    }
    if (eng->run_idx >= eng->nruns)
        return 0;
    s = slot_get(eng);
    if (!s)
        return 0;
    run = &eng->runs[eng->run_idx];
    s->kind = run->kind;
    if (run->kind == RUN_ZERO) {
        s->off = run->off;
        s->len = run->len;
        eng->zero_bytes += run->len;
        eng->copied += run->len;
        eng->run_done = run->len;
        s->seq = eng->seq++;
        queue_slot(eng, s);
        return 1;
    }
    n = MIN((uint64_t)eng->chunk, run->len - eng->run_done);
    s->off = run->off + eng->run_done;
    s->len = n;
    s->seen = 0;
    s->conn = ci;
    s->seq = eng->seq;
    s->issued_us = mono_us();
    if (nbd_aio_pread_structured(
            eng->h[ci],
            s->buf,
            n,
            s->off,
            (nbd_chunk_callback){.callback = read_chunk, .user_data = s},
            (nbd_completion_callback){.callback = read_done, .user_data = s},
            0) < 0) {
        char prefix[64], what[96];

        snprintf(prefix, sizeof prefix, "read at %" PRIu64, s->off);
        snprintf(what,
                 sizeof what,
                 "reading %" PRIu64 " bytes at offset %" PRIu64,
                 s->len,
                 s->off);
        slot_put(eng, s);
        return nbd_fail(eng, ci, prefix, what);
    }
    eng->seq++;
    eng->in_flight[ci]++;
    eng->requests++;
    eng->run_done += n;
    return 1;
}

static unsigned
total_in_flight(const struct engine *eng)
{
    unsigned t = 0;
    size_t i;

    for (i = 0; i < eng->nconn; i++)
        t += eng->in_flight[i];
    return t;
}

/* Slots for N reads in flight: as many more again by a quarter for data
 * waiting for the writer and digest threads (and for runs of zeros).
 */
static size_t
slots_for(unsigned n)
{
    return (size_t)n + n / 4;
}

/* Follow the window (pace.h): the reads each ready connection may have in
 * flight, and buffers for them.  The window is shared by the connections
 * the server granted: with fewer, each carries more.
 */
static int
window_follow(struct engine *eng)
{
    uint64_t w = pace_window(&eng->pace) / eng->chunk;
    unsigned reqs =
        (unsigned)MAX(MIN(w, (uint64_t)eng->max_reqs), (uint64_t)eng->min_reqs);
    size_t want = MIN(slots_for(reqs), eng->nslots);

    eng->reqs = reqs;
    eng->depth =
        (unsigned)((reqs + eng->nready - 1) / MAX(eng->nready, (size_t)1));
    for (; eng->nbufs < want; eng->nbufs++) {
        struct slot *s = &eng->slots[eng->nbufs];

        s->buf = malloc(eng->chunk);
        if (!s->buf)
            return qcbt_error(ENOMEM, "out of memory");
        s->next = eng->own_free;
        eng->own_free = s;
    }
    return 0;
}

/* Connection CI finished or failed its handshake: it joins the engine, or
 * is dropped (the server accepted fewer connections).  An export that
 * looks different from the first connection's is an error.
 */
static int
conn_settle(struct engine *eng, size_t ci)
{
    struct nbd_handle *h = eng->h[ci];
    int64_t size;

    if (nbd_aio_is_connecting(h))
        return 0;
    /* Opened in option mode (open_extra): it opens the export only now
     * that the first connection has, so that a server that counts its
     * clients as they open the export (nbdkit's limit filter) never
     * gives an extra one the first one's place.
     */
    if (nbd_aio_is_negotiating(h) &&
        nbd_aio_opt_go(h, NBD_NULL_COMPLETION) == 0)
        return 0;
    if (!nbd_aio_is_ready(h)) {
        if (getenv("QCBT_DEBUG"))
            fprintf(stderr,
                    "qcbt backup: debug: connection %zu not opened: %s\n",
                    ci,
                    nbd_get_error() ? nbd_get_error() : "closed");
        nbd_close(h);
        eng->h[ci] = NULL;
        eng->cst[ci] = CONN_OFF;
        eng->refused++;
        return 0;
    }
    size = nbd_get_size(h);
    if (size != (int64_t)eng->size)
        return qcbt_error(EPROTO,
                          "connection %zu: the export's size is %" PRId64
                          ", the first connection's %" PRIu64,
                          ci,
                          size,
                          eng->size);
    eng->cst[ci] = CONN_READY;
    eng->nready++;
    return 0;
}

static int
wait_some(struct engine *eng)
{
    struct pollfd pfd[MAX_CONNS + 1];
    size_t idx[MAX_CONNS];
    size_t i, n = 0;

    for (i = 0; i < eng->nconn; i++) {
        unsigned dir;

        /* (One that failed at once has no socket left to poll.) */
        if (eng->cst[i] == CONN_CONNECTING && conn_settle(eng, i) < 0)
            return -1;
        if (eng->cst[i] == CONN_OFF)
            continue;
        dir = nbd_aio_get_direction(eng->h[i]);
        pfd[n].fd = nbd_aio_get_fd(eng->h[i]);
        pfd[n].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                        ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
        pfd[n].revents = 0;
        idx[n++] = i;
    }
    pfd[n].fd = eng->efd;
    pfd[n].events = POLLIN;
    pfd[n].revents = 0;
    if (poll(pfd, n + 1, 30000) < 0 && errno != EINTR)
        return qcbt_error(errno, "poll: %s", strerror(errno));
    if (pfd[n].revents & POLLIN) {
        uint64_t v;
        ssize_t nr = read(eng->efd, &v, sizeof v);

        (void)nr;
    }
    for (i = 0; i < n; i++) {
        size_t ci = idx[i];
        short ev = pfd[i].events, rev = pfd[i].revents;
        int r = 0;

        /* A hang-up or error goes to the direction libnbd waits for: a
         * connection still connecting waits to write (the connect), and
         * notify_read would not move it on.
         */
        if ((ev & POLLIN) && (rev & (POLLIN | POLLHUP | POLLERR)))
            r = nbd_aio_notify_read(eng->h[ci]);
        else if ((ev & POLLOUT) && (rev & (POLLOUT | POLLHUP | POLLERR)))
            r = nbd_aio_notify_write(eng->h[ci]);
        if (eng->cst[ci] == CONN_CONNECTING) {
            if (conn_settle(eng, ci) < 0)
                return -1;
        } else if (r < 0) {
            char prefix[32], what[96] = "waiting for read replies";

            snprintf(prefix, sizeof prefix, "connection %zu", ci);
            if (ci == 0 && eng->mq_n && !eng->in_flight[0])
                snprintf(what,
                         sizeof what,
                         "mapping the disk at offset %" PRIu64,
                         eng->mq[eng->mq_head].off);
            return nbd_fail(eng, ci, prefix, what);
        }
    }
    return 0;
}

static void
show_progress(struct engine *eng, bool final)
{
    int64_t now = mono_ms();

    if (!eng->progress || (!final && now - eng->last_progress < 500))
        return;
    eng->last_progress = now;
    fprintf(stderr,
            "\rqcbt backup: %3d%% mapped, %.1f MiB copied%s",
            (int)(eng->size ? eng->map_pos * 100 / eng->size : 100),
            eng->copied / 1048576.0,
            final ? "\n" : "  ");
}

static int
run_loop(struct engine *eng)
{
    bool window_done = true;

    for (;;) {
        bool issued = false;
        size_t ci;
        int r;

        if (eng->io_err) {
            /* Reads cut short (ENOTCONN) with no libnbd call failing: the
             * socket failed inside a call that queued a request (a send
             * to a server that is gone), never a protocol error, which
             * the call that meets it reports.
             */
            for (ci = 0; ci < eng->nconn && eng->io_err == ENOTCONN; ci++)
                if (eng->cut_n[ci] && conn_dead(eng, ci))
                    mark_lost(eng, ci, "reading");
            return qcbt_error(eng->io_err, "%s", eng->io_msg);
        }
        if (stage_error(eng))
            return -1; /* stages_stop() reports it */
        r = window_follow(eng);
        if (r < 0)
            return r;
        /* Fill every ready connection's queue from the current window. */
        for (ci = 0; ci < eng->nconn; ci++) {
            /* (A connection that joins late finds the others with
             * more than their share in flight: the total is the
             * window.) */
            while (eng->cst[ci] == CONN_READY &&
                   eng->in_flight[ci] < eng->depth &&
                   total_in_flight(eng) < eng->reqs) {
                r = next_work(eng, ci);
                if (r < 0)
                    return r;
                if (r == 0)
                    break;
                issued = true;
            }
        }
        eng->peak_in_flight = MAX(eng->peak_in_flight, total_in_flight(eng));
        /* Before anything that may block: mapping, waiting, the end. */
        queue_flush(eng);
        r = map_ahead(eng);
        if (r < 0)
            return r;
        window_done = eng->run_idx >= eng->nruns;
        if (window_done && eng->map_pos < eng->size) {
            if (eng->mq[eng->mq_head].done)
                r = map_take(eng);
            else
                r = wait_some(eng);
            if (r < 0)
                return r;
            show_progress(eng, false);
            continue;
        }
        if (window_done && total_in_flight(eng) == 0)
            break;
        if (!issued || total_in_flight(eng) >= eng->nready * eng->depth ||
            window_done) {
            r = wait_some(eng);
            if (r < 0)
                return r;
        }
        show_progress(eng, false);
    }
    return 0;
}

/* Copy everything; the stages are done with it all when this returns 0.
 */
static int
run_engine(struct engine *eng, bool digest)
{
    int r = stages_start(eng, digest);

    if (r == 0)
        r = run_loop(eng);
    if (r < 0 && !stage_error(eng)) {
        /* Keep this error, not one a stage may add while stopping. */
        char msg[512];
        int e = qcbt_error_errno();

        snprintf(msg, sizeof msg, "%s", qcbt_error_get());
        stages_stop(eng);
        return qcbt_error(e ? e : EIO, "%s", msg);
    }
    if (stages_stop(eng) < 0)
        return -1;
    if (r == 0)
        r = digest_end(eng);
    if (r == 0)
        show_progress(eng, true);
    return r;
}

/* ---- the command ------------------------------------------------------- */

struct prev_chain {
    struct chain *c;
    uint64_t bytes; /* read (by the writer thread) */
};

/* Partial clusters of an incremental backup keep the previous backup's
 * bytes.
 */
static int
fill_from_prev(void *opaque, void *buf, size_t len, uint64_t offset)
{
    struct prev_chain *p = opaque;

    if (!p->c) {
        memset(buf, 0, len);
        return 0;
    }
    p->bytes += len;
    return chain_read(p->c, buf, len, offset);
}

static void
now_iso(char *buf, size_t len)
{
    time_t t = time(NULL);
    struct tm tm;

    gmtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* A handle for connection IDX, set up (TLS) as CO says. */
static struct nbd_handle *
handle_new(const struct nbd_connect_opts *co, int idx)
{
    struct nbd_handle *h = nbd_create();
    char name[32];

    if (!h) {
        qcbt_error(ENOMEM, "%s", nbd_get_error());
        return NULL;
    }
    snprintf(name, sizeof name, "qcbt-backup-%d", idx);
    nbd_set_handle_name(h, name);
    /* Every read's coverage is checked (read_chunk), so libnbd need not
     * zero the buffers first. */
    nbd_set_pread_initialize(h, false);
    if (nbd_connect_setup(h, co) < 0) {
        qcbt_error(nbd_get_errno() ? nbd_get_errno() : EINVAL,
                   "%s",
                   nbd_get_error());
        nbd_close(h);
        return NULL;
    }
    return h;
}

/* What the server lists for "qemu:dirty-bitmap:", for a message. */
struct offers {
    const char *want;
    char list[768];
    size_t used;
    unsigned n;
    bool full, has_want;
};

static int
offer_cb(void *opaque, const char *name)
{
    struct offers *o = opaque;
    char esc[256];
    int k;

    o->n++;
    if (o->want && strcmp(name, o->want) == 0)
        o->has_want = true;
    if (o->full)
        return 0;
    qcbt_escape(esc, sizeof esc, name, strlen(name));
    /* Keep room for ", ..." */
    k = snprintf(o->list + o->used,
                 sizeof o->list - o->used,
                 "%s%s",
                 o->used ? ", " : "",
                 esc);
    if (k < 0 || (size_t)k + 6 >= sizeof o->list - o->used) {
        o->list[o->used] = '\0';
        o->full = true;
    } else {
        o->used += k;
    }
    return 0;
}

/* Connection IDX > 0, connecting in the background: it joins the engine
 * when ready (wait_some, conn_settle opens its export), or is dropped.
 * Only the first connection asks for block status, so no meta context is
 * requested.
 */
static struct nbd_handle *
open_extra(const char *uri, const struct nbd_connect_opts *co, int idx)
{
    struct nbd_handle *h = handle_new(co, idx);

    if (h &&
        (nbd_set_opt_mode(h, true) < 0 || nbd_aio_connect_uri(h, uri) < 0)) {
        if (getenv("QCBT_DEBUG"))
            fprintf(stderr,
                    "qcbt backup: debug: connection %d not opened: %s\n",
                    idx,
                    nbd_get_error());
        nbd_close(h);
        h = NULL;
    }
    return h;
}

/* An option of the first connection in flight (libnbd's aio option
 * calls): its completion, and the error libnbd set for it.
 */
struct opt_wait {
    bool done;
    int err;
    char msg[512];
};

static int
opt_done(void *opaque, int *error)
{
    struct opt_wait *w = opaque;

    w->done = true;
    w->err = *error;
    if (*error)
        snprintf(w->msg,
                 sizeof w->msg,
                 "%s",
                 nbd_get_error() ? nbd_get_error() : strerror(*error));
    return 1;
}

/* Drive H until its option W completes, and meanwhile the other
 * connections' handshakes (they are settled later, by wait_some).
 */
static int
pump_option(struct engine *eng, struct nbd_handle *h, struct opt_wait *w)
{
    while (!w->done) {
        struct pollfd pfd[MAX_CONNS];
        struct nbd_handle *hs[MAX_CONNS];
        size_t i, n = 0;

        for (i = 0; i < MAX_CONNS; i++) {
            struct nbd_handle *x = i ? eng->h[i] : h;
            unsigned dir;

            if (!x || (i && !nbd_aio_is_connecting(x)))
                continue;
            dir = nbd_aio_get_direction(x);
            pfd[n].fd = nbd_aio_get_fd(x);
            pfd[n].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                            ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
            pfd[n].revents = 0;
            hs[n++] = x;
        }
        if (pfd[0].fd < 0)
            return -1; /* (h is dead: libnbd said why) */
        if (poll(pfd, n, -1) < 0) {
            if (errno == EINTR)
                continue;
            return qcbt_error(errno, "poll: %s", strerror(errno));
        }
        for (i = 0; i < n; i++) {
            short ev = pfd[i].events, rev = pfd[i].revents;
            int r = 0;

            if ((ev & POLLIN) && (rev & (POLLIN | POLLHUP | POLLERR)))
                r = nbd_aio_notify_read(hs[i]);
            else if ((ev & POLLOUT) && (rev & (POLLOUT | POLLHUP | POLLERR)))
                r = nbd_aio_notify_write(hs[i]);
            /* (An extra connection that fails is dropped by conn_settle.) */
            if (r < 0 && i == 0)
                return -1;
        }
    }
    return 0;
}

/* The first connection.  It is negotiated in libnbd's option mode so that
 * with a context CTX the server's dirty-bitmap contexts can be listed
 * (for the message when CTX is missing) before base:allocation and CTX
 * are requested and the export opened.  OFFERS says what the server
 * listed ("it offers: A, B", or why there is no list); *LISTED whether
 * CTX was among them.
 *
 * Connections 1 .. WANT - 1 start once the server has accepted this one
 * (it is negotiating: a server that takes one client at a time cannot
 * take an extra one instead).  They connect and negotiate structured
 * replies while it lists and opens the export, and open theirs after it
 * (conn_settle): on a long link they are ready one round trip after it,
 * not three (four with TCP's).  They join the engine in wait_some, or are
 * dropped if the export does not allow multi-conn.
 */
static struct nbd_handle *
open_first(const char *uri,
           const struct nbd_connect_opts *co,
           const char *ctx,
           struct engine *eng,
           size_t want,
           char *offers,
           size_t len,
           bool *listed)
{
    struct nbd_handle *h = handle_new(co, 0);
    struct offers *o = NULL;
    struct opt_wait w = {0};
    size_t i;

    snprintf(offers, len, "it did not list its contexts");
    *listed = false;
    if (!h)
        return NULL;
    if (nbd_set_opt_mode(h, true) < 0 || nbd_connect_uri(h, uri) < 0)
        goto fail;
    if (!nbd_aio_is_negotiating(h))
        return h; /* (an oldstyle server: no options) */
    eng->extras_started = true;
    for (i = 1; i < want && i < MAX_CONNS; i++) {
        eng->h[i] = open_extra(uri, co, (int)i);
        eng->cst[i] = eng->h[i] ? CONN_CONNECTING : CONN_OFF;
        eng->refused += !eng->h[i];
    }
    if (ctx) {
        o = calloc(1, sizeof *o);
        if (!o) {
            qcbt_error(ENOMEM, "out of memory");
            nbd_close(h);
            return NULL;
        }
        o->want = ctx;
        if (nbd_add_meta_context(h, "qemu:dirty-bitmap:") < 0 ||
            nbd_aio_opt_list_meta_context(
                h,
                (nbd_context_callback){.callback = offer_cb, .user_data = o},
                (nbd_completion_callback){.callback = opt_done,
                                          .user_data = &w}) < 0 ||
            pump_option(eng, h, &w) < 0)
            goto fail;
        if (!w.err) {
            *listed = o->has_want;
            if (o->n == 0)
                snprintf(offers, len, "it offers no dirty bitmap");
            else
                snprintf(offers,
                         len,
                         "it offers: %s%s",
                         o->list,
                         o->full ? ", ..." : "");
        } else if (!nbd_aio_is_negotiating(h)) {
            goto fail;
        }
        if (nbd_clear_meta_contexts(h) < 0)
            goto fail;
    }
    w = (struct opt_wait){0};
    if (nbd_add_meta_context(h, "base:allocation") < 0 ||
        (ctx && nbd_add_meta_context(h, ctx) < 0) ||
        nbd_aio_opt_go(h,
                       (nbd_completion_callback){.callback = opt_done,
                                                 .user_data = &w}) < 0 ||
        pump_option(eng, h, &w) < 0)
        goto fail;
    if (w.err) {
        qcbt_error(w.err, "%s: %s", uri, w.msg);
        goto out;
    }
    for (i = 1; i < MAX_CONNS; i++)
        if (eng->h[i]) {
            eng->early++;
            eng->early_ok += nbd_aio_is_negotiating(eng->h[i]) > 0;
        }
    free(o);
    return h;

fail:
    qcbt_error(nbd_get_errno() ? nbd_get_errno() : EIO,
               "%s: %s",
               uri,
               nbd_get_error());
out:
    free(o);
    nbd_close(h);
    return NULL;
}

static void
fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

static bool
manifest_has(const struct manifest *m, const char *file)
{
    size_t i;

    for (i = 0; i < m->nr; i++)
        if (strcmp(m->backups[i].file, file) == 0)
            return true;
    return false;
}

static bool
ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);

    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* rename(2) that never replaces an existing NEWPATH (EEXIST). */
static int
rename_noreplace(const char *oldpath, const char *newpath)
{
    if (renameat2(AT_FDCWD, oldpath, AT_FDCWD, newpath, RENAME_NOREPLACE) == 0)
        return 0;
    if (errno != EINVAL && errno != ENOSYS)
        return -1;
    /* A file system without RENAME_NOREPLACE: link fails on EEXIST. */
    if (link(oldpath, newpath) < 0)
        return -1;
    unlink(oldpath);
    return 0;
}

/* Remove what a backup that failed or died before its commit point left
 * in DIR (the caller holds the lock, so no run is writing them): partial
 * files ".backup-*.qcow2.part", the manifest's temporary file, and
 * backup-NNNN.qcow2 with the next number when the manifest does not
 * record it and the temporary manifest is there too (renamed, then killed
 * before the manifest was committed: see the commit in cmd_backup).
 * Without the temporary manifest such a file is not ours to remove.
 */
static void
clean_leftovers(const char *dir, const struct manifest *m)
{
    char next[64], next_dgi[64], gone[256] = "";
    size_t used = 0;
    struct dirent *de;
    struct stat st;
    bool pending;
    DIR *d = opendir(dir);

    if (!d)
        return;
    pending =
        fstatat(dirfd(d), MANIFEST_TMP_NAME, &st, AT_SYMLINK_NOFOLLOW) == 0;
    snprintf(next, sizeof next, "backup-%04zu.qcow2", m->nr);
    snprintf(next_dgi, sizeof next_dgi, "backup-%04zu" DGI_SUFFIX, m->nr);
    while ((de = readdir(d))) {
        const char *n = de->d_name;
        int k;

        if (!((strncmp(n, ".backup-", 8) == 0 &&
               (ends_with(n, ".qcow2.part") ||
                ends_with(n, DGI_SUFFIX ".part"))) ||
              strcmp(n, MANIFEST_TMP_NAME) == 0 ||
              (pending && strcmp(n, next) == 0 && !manifest_has(m, n)) ||
              (pending && strcmp(n, next_dgi) == 0)))
            continue;
        if (unlinkat(dirfd(d), n, 0) < 0)
            continue;
        k = snprintf(gone + used,
                     sizeof gone - used,
                     "%s%s",
                     used ? ", " : "",
                     n);
        if (k > 0 && (size_t)k < sizeof gone - used)
            used += k;
    }
    closedir(d);
    if (used) {
        fsync_dir(dir);
        notice("removed what an unfinished backup left: %s", gone);
    }
}

/* The indexes of the backups the incremental builds on, newest first
 * down to the full backup, as far as they can be used (digest-index.h).
 */
static int
open_prev_indexes(struct engine *eng, const char *dir, const struct manifest *m)
{
    const struct backup_entry *e = &m->backups[m->nr - 1];
    size_t steps, i;

    eng->dgi_prev = dgi_chain_new(eng->size);
    if (!eng->dgi_prev)
        return -1;
    for (steps = 0; e && steps < m->nr; steps++) {
        bool full = strcmp(e->type, "full") == 0;
        char why[256], name[256];
        char *path = NULL;
        int r;

        if (e->digest_index && !(path = path_join(dir, e->digest_index)))
            return qcbt_error(ENOMEM, "out of memory");
        r = dgi_chain_add(eng->dgi_prev,
                          path,
                          e->digest_sum,
                          full,
                          why,
                          sizeof why);
        free(path);
        if (r < 0)
            return r;
        if (why[0]) {
            qcbt_escape(name, sizeof name, e->file, strlen(e->file));
            notice("the digest index of %s is not used (%s): the digest "
                   "reads back what it would have answered for",
                   name,
                   why);
            return 0;
        }
        if (full)
            return 0;
        for (i = 0; i < m->nr; i++)
            if (strcmp(m->backups[i].file, e->backing) == 0)
                break;
        e = i < m->nr ? &m->backups[i] : NULL;
    }
    return 0;
}

/* The server closed a connection: say so in the user's terms, with what
 * the engine was doing and what DIR kept (replaces libnbd's message).
 */
static void
explain_lost(const struct engine *eng,
             const char *dir,
             const char *ctx,
             const struct backup_entry *prev)
{
    char conn[64] = "", kept[400], name[256];

    if (eng->nready > 1)
        snprintf(conn, sizeof conn, " (one of %zu connections)", eng->nready);
    if (ctx) {
        if (strncmp(ctx, "qemu:dirty-bitmap:", 18) == 0)
            ctx += 18;
        qcbt_escape(name, sizeof name, ctx, strlen(ctx));
        snprintf(kept,
                 sizeof kept,
                 "the next backup starts again from checkpoint %s",
                 name);
    } else if (prev) {
        qcbt_escape(name, sizeof name, prev->file, strlen(prev->file));
        snprintf(kept, sizeof kept, "its newest backup is still %s", name);
    } else {
        snprintf(kept, sizeof kept, "it holds no backup yet");
    }
    qcbt_error(ECONNRESET,
               "the server closed the connection%s while %s, %" PRIu64
               " bytes copied; %s is unchanged: %s",
               conn,
               eng->lost_what,
               eng->copied,
               dir,
               kept);
}

/* Make the newest backup of M record checkpoint context CTX (NULL:
 * none) instead, and commit the manifest again.  Returns 0 or -errno.
 */
static int
manifest_set_checkpoint(const char *dir, struct manifest *m, const char *ctx)
{
    struct backup_entry *last = &m->backups[m->nr - 1];
    char *nctx = ctx ? strdup(ctx) : NULL, *nck = NULL;
    int r;

    if (nctx && strncmp(nctx, "qemu:dirty-bitmap:", 18) == 0)
        nck = strdup(nctx + 18);
    if ((ctx && !nctx) ||
        (nctx && !strncmp(nctx, "qemu:dirty-bitmap:", 18) && !nck)) {
        free(nctx);
        free(nck);
        return qcbt_error(ENOMEM, "out of memory");
    }
    free(last->context);
    free(last->checkpoint);
    last->context = nctx;
    last->checkpoint = nck;
    if (manifest_test_fault("checkpoint-eio-manifest"))
        return qcbt_error(ENOSPC,
                          "%s: %s",
                          MANIFEST_TMP_NAME,
                          strerror(ENOSPC));
    r = manifest_prepare(dir, m);
    return r < 0 ? r : manifest_commit(dir);
}

/* Close every connection (the server ends with its last client).  Each
 * says goodbye (NBD_CMD_DISC) without waiting for the server to hang up:
 * nbd_shutdown() waits for that, a round trip per connection, one after
 * the other.  Connections started but not used go first: a server that
 * takes one client at a time may only now accept them.
 */
static void
close_handles(struct engine *eng)
{
    size_t i;

    for (i = MAX_CONNS; i-- > 0;)
        if (eng->h[i] && eng->cst[i] == CONN_READY)
            nbd_aio_disconnect(eng->h[i], 0);
    for (i = MAX_CONNS; i-- > 0;)
        if (eng->h[i]) {
            nbd_close(eng->h[i]);
            eng->h[i] = NULL;
            eng->cst[i] = CONN_OFF;
        }
}

/* Connections to open: CONNS, or by default one per CPU, up to 4 (as
 * nbdcopy): on a 2-CPU machine 4 connections cost more in wakeups than
 * they gain (bench-backup.sh: the fragmented incremental 1.9 -> 1.75 s,
 * the full 2.85 -> 2.65 s).
 */
static size_t
backup_connections(int conns)
{
    long ncpu;

    if (conns)
        return (size_t)conns;
    ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    return ncpu < 1 ? 1 : ncpu > 4 ? 4 : (size_t)ncpu;
}

/* A merge notice of a local image's bitmap (a layer contributes its
 * allocation map).
 */
static void
local_note(const char *text)
{
    notice("%s", text);
}

int
cmd_backup(int argc, char **argv)
{
    enum {
        OPT_FULL = 256,
        OPT_SINCE,
        OPT_AUTO,
        OPT_FALLBACK,
        OPT_BITMAP,
        OPT_CONNS,
        OPT_PROGRESS,
        OPT_NOPROGRESS,
        OPT_JSON,
        OPT_NODIGEST,
        OPT_CHECKPOINT
    };
    static const struct option opts[] = {
        {"full", no_argument, NULL, OPT_FULL},
        {"since", required_argument, NULL, OPT_SINCE},
        {"auto", no_argument, NULL, OPT_AUTO},
        {"fallback-full", no_argument, NULL, OPT_FALLBACK},
        {"bitmap", required_argument, NULL, OPT_BITMAP},
        {"connections", required_argument, NULL, OPT_CONNS},
        {"progress", no_argument, NULL, OPT_PROGRESS},
        {"no-progress", no_argument, NULL, OPT_NOPROGRESS},
        {"no-digest", no_argument, NULL, OPT_NODIGEST},
        {"json", no_argument, NULL, OPT_JSON},
        {"checkpoint", required_argument, NULL, OPT_CHECKPOINT},
        {"help", no_argument, NULL, 'h'},
        NBD_CONNECT_LONG_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    struct nbd_connect_opts nco = NBD_CONNECT_OPTS_INIT;
    const char *since = NULL, *bitmap = NULL, *uri, *dir;
    const char *new_ckpt = NULL;
    struct local_source *ls = NULL;
    char local_why[1024] = "";
    char new_ctx[1100];
    bool local = false, ckpt_made = false;
    bool want_full = false, json = false, digest = true;
    bool auto_given = false, fallback_full = false, strict;
    bool part_made = false, final_made = false, listed = false;
    bool tmp_manifest_made = false;
    bool dgi_part_made = false, dgi_final_made = false;
    int progress = -1, conns = 0, opt, ret = QCBT_EXIT_ERROR, r;
    int fail_rc = QCBT_EXIT_ERROR;
    struct manifest m = {0};
    struct backup_entry *prev = NULL;
    struct backup_entry e = {0};
    struct engine eng = {0};
    struct prev_chain pc = {0};
    struct qcow2_writer_opts wo = {0};
    char ctxbuf[4200], fname[64], tmpname[80], timebuf[32];
    char hex[DIGEST_HEX_LEN + 1], sumhex[DIGEST_HEX_LEN + 1];
    char offers[1024], why_buf[1400];
    char *tmppath = NULL, *finalpath = NULL, *prevpath = NULL;
    char dginame[64], dgitmp[80];
    char *dgipath = NULL, *dgifinal = NULL;
    const char *ctx = NULL, *why_full = NULL, *granted_ctx = NULL;
    int lockfd = -1;
    int64_t size, t0 = mono_ms();
    size_t i;

    eng.efd = -1;
    eng.lost_conn = -1;
    debug_mark("start");
    pthread_mutex_init(&eng.mu, NULL);
    for (i = 0; i < 2; i++) {
        pthread_cond_init(&eng.stages[i].cv, NULL);
        pthread_mutex_init(&eng.stages[i].mu, NULL);
    }
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case OPT_FULL:
            want_full = true;
            break;
        case OPT_SINCE:
            since = optarg;
            break;
        case OPT_AUTO:
            auto_given = true;
            break;
        case OPT_FALLBACK:
            fallback_full = true;
            break;
        case OPT_BITMAP:
            bitmap = optarg;
            break;
        case OPT_CONNS:
            conns = atoi(optarg);
            if (conns < 1 || conns > MAX_CONNS) {
                die_msg("backup: --connections must be 1..%d", MAX_CONNS);
                return QCBT_EXIT_ERROR;
            }
            break;
        case OPT_PROGRESS:
            progress = 1;
            break;
        case OPT_NOPROGRESS:
            progress = 0;
            break;
        case OPT_NODIGEST:
            digest = false;
            break;
        case OPT_JSON:
            json = true;
            break;
        case OPT_CHECKPOINT:
            new_ckpt = optarg;
            break;
        case 'h':
            backup_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            if (opt >= NBD_CONNECT_OPT_TLS && opt <= NBD_CONNECT_OPT_LAST) {
                if (nbd_connect_option(&nco, "backup", opt, optarg) < 0)
                    return QCBT_EXIT_ERROR;
                break;
            }
            return usage_getopt_error("backup", argc, argv, "h", opts);
        }
    }
    if (argc - optind != 2)
        return usage_error("backup", "expected URI DIR or IMAGE DIR");
    if (want_full && (since || bitmap)) {
        die_msg("backup: --full cannot be combined with --since/--bitmap");
        return QCBT_EXIT_ERROR;
    }
    /* A checkpoint the user named must be usable; only --auto and
     * --fallback-full turn doubt into a full backup.
     */
    strict = (since || bitmap) && !auto_given && !fallback_full;
    uri = argv[optind];
    dir = argv[optind + 1];
    local = !local_source_is_uri(uri);
    if (local && (nco.tls >= 0 || nco.certificates || nco.psk_file ||
                  nco.username || nco.no_verify_peer)) {
        die_msg("backup: the TLS options are for a URI, not a local IMAGE");
        return QCBT_EXIT_ERROR;
    }
    if (new_ckpt && !local) {
        /* A running VM writes its disk: only QEMU can start a checkpoint
         * at the backup's point in time.
         */
        die_msg("backup: --checkpoint needs a local IMAGE, not a URI: for "
                "a running VM, libvirt or QEMU create the checkpoint with "
                "the backup job (virsh backup-begin with a checkpoint)");
        return QCBT_EXIT_ERROR;
    }
    eng.progress = progress < 0 ? isatty(STDERR_FILENO) : progress;
    notice_now = eng.progress;
    if (mkdir(dir, 0777) < 0 && errno != EEXIST) {
        die_msg("backup: %s: %s", dir, strerror(errno));
        return QCBT_EXIT_ERROR;
    }
    /* One backup at a time per directory. */
    {
        char *lp = path_join(dir, ".lock");

        lockfd = lp ? open(lp, O_RDWR | O_CREAT | O_CLOEXEC, 0666) : -1;
        free(lp);
        if (lockfd < 0 || flock(lockfd, LOCK_EX | LOCK_NB) < 0) {
            die_msg("backup: %s: %s",
                    dir,
                    errno == EWOULDBLOCK ? "another backup is running there"
                                         : strerror(errno));
            if (lockfd >= 0)
                close(lockfd);
            return QCBT_EXIT_ERROR;
        }
    }
    if (manifest_load(dir, &m) < 0) {
        close(lockfd);
        return report_error();
    }
    clean_leftovers(dir, &m);
    if (m.nr)
        prev = &m.backups[m.nr - 1];

    /* Which context?  --bitmap wins, then --since, then (auto) the
     * previous backup's.
     */
    if (!want_full) {
        if (bitmap) {
            if (strncmp(bitmap, "qemu:", 5) == 0 ||
                strncmp(bitmap, "base:", 5) == 0)
                snprintf(ctxbuf, sizeof ctxbuf, "%s", bitmap);
            else
                snprintf(ctxbuf, sizeof ctxbuf, "qemu:dirty-bitmap:%s", bitmap);
            ctx = ctxbuf;
        } else if (since) {
            snprintf(ctxbuf, sizeof ctxbuf, "qemu:dirty-bitmap:%s", since);
            ctx = ctxbuf;
        } else if (prev && prev->context) {
            snprintf(ctxbuf, sizeof ctxbuf, "%s", prev->context);
            ctx = ctxbuf;
        }
    }

    if (local) {
        /* The image is locked (READ) before the server starts and stays
         * locked until NEW exists: no writer in between.
         */
        const char *bm = NULL;

        if (ctx && strncmp(ctx, "qemu:dirty-bitmap:", 18) == 0)
            bm = ctx + 18;
        if (local_source_open(uri, new_ckpt != NULL, &ls) < 0 ||
            (new_ckpt && local_source_check_new(ls, new_ckpt) < 0))
            goto fail;
        if (bm) {
            r = local_source_bitmap_usable(ls,
                                           bm,
                                           local_why,
                                           sizeof local_why,
                                           local_note);
            if (r < 0)
                goto fail;
            if (r == 0 && strict) {
                /* Named: exit 2, before any server is started. */
                qcbt_error(ENOENT, "%s: %s", local_source_image(ls), local_why);
                fail_rc = QCBT_EXIT_FULL;
                goto fail;
            }
            if (r == 0)
                bm = NULL;
        }
        if (local_source_start(ls, bm, backup_connections(conns)) < 0)
            goto fail;
        uri = local_source_uri(ls);
    }
    eng.h[0] = open_first(uri,
                          &nco,
                          ctx,
                          &eng,
                          backup_connections(conns),
                          offers,
                          sizeof offers,
                          &listed);
    if (!eng.h[0])
        goto fail;
    debug_mark("negotiated");
    if (ls && manifest_test_fault("kill-server"))
        local_source_kill_server(ls);
    if (ls && manifest_test_fault("stop-after-connect"))
        raise(SIGSTOP); /* the test signals it meanwhile */
    eng.cst[0] = CONN_READY;
    eng.nconn = eng.nready = 1;
    size = nbd_get_size(eng.h[0]);
    if (size < 0) {
        qcbt_error(EIO, "%s: %s", uri, nbd_get_error());
        goto fail;
    }
    eng.size = size;
    if (size % 512) {
        qcbt_error(ENOTSUP,
                   "%s: export size %" PRId64 " is not a multiple "
                   "of 512 bytes (qcow2 backups hold whole sectors)",
                   uri,
                   size);
        goto fail;
    }
    /* A granted context is recorded even in a full backup: it covers
     * everything after it, so the next --auto run can be incremental.
     */
    if (ctx && nbd_can_meta_context(eng.h[0], ctx) > 0)
        granted_ctx = ctx;

    /* Any doubt means a full backup (or, for a named checkpoint, exit 2). */
    if (want_full) {
        why_full = "--full";
    } else if (!ctx) {
        why_full = "no checkpoint given and none recorded";
    } else if (!granted_ctx && local_why[0]) {
        /* A local image: the bitmap was checked before the server
         * started (strict runs ended there), and is not published.
         */
        why_full = local_why;
    } else if (!granted_ctx) {
        char ectx[256];

        qcbt_escape(ectx, sizeof ectx, ctx, strlen(ctx));
        if (strict) {
            qcbt_error(ENOENT,
                       listed ? "the server did not grant %s (%s)"
                              : "the server offers no %s (%s)",
                       ectx,
                       offers);
            fail_rc = QCBT_EXIT_FULL;
            goto fail;
        }
        snprintf(why_buf,
                 sizeof why_buf,
                 "the server did not grant %s (%s)",
                 ectx,
                 offers);
        why_full = why_buf;
    } else if (!prev) {
        why_full = "no previous backup";
    } else if (prev->size != (uint64_t)size) {
        why_full = "the disk size changed";
    } else {
        struct chain_open_opts co = {.format = "qcow2"};

        prevpath = path_join(dir, prev->file);
        if (!prevpath || chain_open(prevpath, &co, &pc.c) < 0 ||
            pc.c->size != (uint64_t)size) {
            why_full = "the previous backup cannot be read back";
            qcbt_error_clear();
        }
    }
    if (why_full && strict && prev && ctx) {
        /* Size changed or the previous backup is unreadable: the
         * incremental asked for cannot be made.
         */
        qcbt_error(EINVAL,
                   "no incremental backup since %s is possible: %s "
                   "(--auto or --fallback-full make a full backup)",
                   strncmp(ctx, "qemu:dirty-bitmap:", 18) == 0 ? ctx + 18 : ctx,
                   why_full);
        fail_rc = QCBT_EXIT_FULL;
        goto fail;
    }
    if (why_full) {
        ctx = NULL;
        chain_close(pc.c);
        pc.c = NULL;
        if (!want_full)
            notice("full backup: %s", why_full);
    }
    eng.ctx = ctx;

    /* The file this run writes: it must not be a recorded one. */
    snprintf(fname, sizeof fname, "backup-%04zu.qcow2", m.nr);
    if (manifest_has(&m, fname)) {
        qcbt_error(EEXIST,
                   "%s: %s is already recorded in the manifest, as an "
                   "older backup",
                   dir,
                   fname);
        goto fail;
    }

    /* Connections: several only when the server says they are coherent
     * (backup_connections()).  The others connect while the first one
     * negotiates (open_first) or works, and join when ready; a server may
     * accept fewer (qemu-nbd -e N, nbdkit's limit filter).
     */
    {
        size_t want = backup_connections(conns);

        if (want > 1 && nbd_can_multi_conn(eng.h[0]) <= 0) {
            if (conns > 1)
                notice("the server does not allow multi-conn: using one "
                       "connection");
            want = 1;
        }
        for (i = MAX_CONNS - 1; i >= want; i--)
            if (eng.h[i]) {
                /* Started before multi-conn was known: not used. */
                nbd_close(eng.h[i]);
                eng.h[i] = NULL;
                eng.cst[i] = CONN_OFF;
            }
        for (i = 1; i < want; i++)
            if (!eng.h[i] && eng.cst[i] == CONN_OFF && !eng.extras_started) {
                eng.h[i] = open_extra(uri, &nco, (int)i);
                eng.cst[i] = eng.h[i] ? CONN_CONNECTING : CONN_OFF;
                eng.refused += !eng.h[i];
            }
        eng.nconn = want;
    }
    eng.chunk = CHUNK;
    {
        int64_t mx = nbd_get_block_size(eng.h[0], LIBNBD_SIZE_MAXIMUM);
        if (mx > 0 && (uint64_t)mx < eng.chunk)
            eng.chunk = mx;
    }
    /* The window of reads in flight: DEFAULT_DEPTH per connection asked
     * for at first, grown as the link measures (window_follow()).
     */
    eng.min_reqs = (unsigned)eng.nconn * DEFAULT_DEPTH;
    eng.max_reqs = MAX(eng.min_reqs, MIN(WINDOW_MAX / eng.chunk, MAX_REQS));
    pace_init(&eng.pace,
              (uint64_t)eng.min_reqs * eng.chunk,
              (uint64_t)eng.max_reqs * eng.chunk);
    eng.nslots = slots_for(eng.max_reqs);
    eng.slots = calloc(eng.nslots, sizeof *eng.slots);
    eng.batch = calloc(eng.nslots, sizeof *eng.batch);
    if (!eng.slots || !eng.batch) {
        qcbt_error(ENOMEM, "out of memory");
        goto fail;
    }
    for (i = 0; i < eng.nslots; i++)
        eng.slots[i].eng = &eng;
    if (window_follow(&eng) < 0)
        goto fail;

    /* The digest follows the transfer: a full backup starts from an empty
     * disk, an incremental from the previous backup's running sum.
     */
    gdigest_init(&eng.dg, eng.size);
    eng.digest_stream = digest;
    if (digest && ctx) {
        eng.prev = pc.c;
        if (!gdigest_sum_parse(&eng.dg, prev->digest_sum))
            eng.digest_stream = false;
    }
    snprintf(dginame, sizeof dginame, "backup-%04zu" DGI_SUFFIX, m.nr);
    snprintf(dgitmp, sizeof dgitmp, ".%s.part", dginame);
    dgipath = path_join(dir, dgitmp);
    dgifinal = path_join(dir, dginame);
    if (!dgipath || !dgifinal) {
        qcbt_error(ENOMEM, "out of memory");
        goto fail;
    }
    if (eng.digest_stream) {
        eng.gbuf = malloc(DGI_GRANULE);
        if (!eng.gbuf) {
            qcbt_error(ENOMEM, "out of memory");
            goto fail;
        }
        if (eng.prev && open_prev_indexes(&eng, dir, &m) < 0)
            goto fail;
        if (dgi_writer_open(dgipath, eng.size, &eng.dgi) < 0)
            goto fail;
        dgi_part_made = true;
    }

    /* Write to a temporary name (never recorded); the finished file gets
     * its real name only just before the manifest that records it.
     */
    snprintf(tmpname, sizeof tmpname, ".%s.part", fname);
    tmppath = path_join(dir, tmpname);
    finalpath = path_join(dir, fname);
    if (!tmppath || !finalpath) {
        qcbt_error(ENOMEM, "out of memory");
        goto fail;
    }
    wo.size = eng.size;
    wo.cluster_size = QCOW2_WRITER_DEFAULT_CLUSTER_SIZE;
    if (ctx) {
        wo.backing_file = prev->file;
        wo.backing_fmt = "qcow2";
        wo.fill = fill_from_prev;
        wo.fill_opaque = &pc;
    }
    if (qcow2_writer_create(tmppath, &wo, &eng.w) < 0)
        goto fail;
    part_made = true;

    debug_mark("started");
    r = run_engine(&eng, eng.digest_stream);
    debug_mark("copied");
    if (eng.dgi_prev) {
        char why[256];

        while (dgi_chain_broken(eng.dgi_prev, why, sizeof why))
            notice("a digest index is not used from here on (%s): the digest "
                   "reads back what it would have answered for",
                   why);
    }
    if (getenv("QCBT_DEBUG"))
        fprintf(stderr,
                "qcbt backup: debug: digest read back %" PRIu64
                " bytes of earlier backups (%" PRIu64 " granules) and %" PRIu64
                " bytes of digest index; partial clusters read %" PRIu64
                " bytes\n"
                "qcbt backup: debug: window %" PRIu64
                " bytes (%u to %u reads of %u bytes), peak %u reads in "
                "flight, smallest round trip %.3f ms, best rate %.1f MB/s\n"
                "qcbt backup: debug: map: %u block status requests, at most "
                "%u in flight, %u round trips, room for at most %zu extents\n"
                "qcbt backup: debug: connections: %zu opened while the first "
                "negotiated, %zu had negotiated when it was ready\n",
                eng.readback,
                eng.readback_granules,
                eng.dgi_prev ? dgi_chain_bytes_read(eng.dgi_prev) : 0,
                pc.bytes,
                pace_window(&eng.pace),
                eng.min_reqs,
                eng.max_reqs,
                eng.chunk,
                eng.peak_in_flight,
                eng.pace.min_rtt_us / 1000.0,
                eng.pace.max_rate,
                eng.map_requests,
                eng.map_peak,
                eng.map_max_rounds,
                eng.map_held_peak,
                eng.early,
                eng.early_ok);
    if (r < 0) {
        if (eng.lost_conn >= 0 && !stage_error(&eng))
            explain_lost(&eng, dir, ctx, prev);
        goto fail;
    }
    /* Everything is read: the server can go while the files are made
     * durable.
     */
    e.export_name = nbd_get_export_name(eng.h[0]);
    close_handles(&eng);
    r = qcow2_writer_close(eng.w);
    eng.w = NULL;
    if (r < 0) {
        free(e.export_name);
        goto fail;
    }
    debug_mark("synced");

    e.file = fname;
    e.type = ctx ? "incremental" : "full";
    e.backing = ctx ? prev->file : NULL;
    e.context = (char *)(ctx ? ctx : granted_ctx);
    e.since = (char *)ctx;
    if (new_ckpt) {
        /* Recorded before it exists: the checkpoint can only be made
         * once the backup is recorded (else a failed backup would leave
         * a checkpoint the next run takes for a base it does not have).
         */
        snprintf(new_ctx, sizeof new_ctx, "qemu:dirty-bitmap:%s", new_ckpt);
        e.context = new_ctx;
    }
    e.checkpoint = NULL;
    if (e.context && strncmp(e.context, "qemu:dirty-bitmap:", 18) == 0)
        e.checkpoint = e.context + 18;
    e.uri = ls ? NULL : (char *)uri;
    e.source_image = ls ? (char *)local_source_abspath(ls) : NULL;
    now_iso(timebuf, sizeof timebuf);
    e.time = timebuf;
    e.size = eng.size;
    e.data_bytes = eng.data_bytes;
    e.zero_bytes = eng.zero_bytes;
    e.extents = eng.extents;
    e.requests = eng.requests;
    e.guest_digest = NULL;
    e.digest_sum = NULL;
    e.digest_index = NULL;
    if (digest && eng.digest_stream) {
        gdigest_final(&eng.dg, hex);
        gdigest_sum_hex(&eng.dg, sumhex);
        e.guest_digest = hex;
        e.digest_sum = sumhex;
        if (manifest_test_fault("index-enospc")) {
            /* As when the file system is full. */
            dgi_writer_abort(eng.dgi);
            r = qcbt_error(ENOSPC, "%s: %s", dgipath, strerror(ENOSPC));
        } else {
            r = dgi_writer_finish(eng.dgi, eng.dg.sum);
        }
        eng.dgi = NULL;
        if (r < 0) {
            free(e.export_name);
            goto fail;
        }
        e.digest_index = dginame;
    } else if (digest) {
        /* The digest could not follow the transfer: read it back (the
         * backing file name resolves in DIR, as for the final name).
         */
        struct chain *nc = NULL;
        struct chain_open_opts co = {.format = "qcow2"};
        struct gdigest d;

        if (chain_open(tmppath, &co, &nc) < 0 ||
            chain_guest_digest(nc, &d, hex) < 0) {
            chain_close(nc);
            free(e.export_name);
            goto fail;
        }
        chain_close(nc);
        /* (No index: the granules were not followed in disk order.) */
        dgi_writer_abort(eng.dgi);
        eng.dgi = NULL;
        if (dgi_part_made)
            unlink(dgipath);
        dgi_part_made = false;
        gdigest_sum_hex(&d, sumhex);
        e.guest_digest = hex;
        e.digest_sum = sumhex;
    }
    e.seconds = (mono_ms() - t0) / 1000.0;
    r = manifest_append(&m, &e);
    if (r < 0) {
        free(e.export_name);
        goto fail;
    }

    /* Commit: the new manifest is written to its temporary name first,
     * then the finished file gets its name (nothing refers to it yet, and
     * an existing file of that name is never replaced), then the manifest
     * replaces the old one.  Killed in between, the run leaves an
     * unrecorded backup-NNNN.qcow2 beside the temporary manifest, which
     * proves it is this kind of leftover: the next run removes both
     * (clean_leftovers).  An unrecorded backup-NNNN.qcow2 without it
     * (a lost manifest) is never removed.
     */
    r = manifest_prepare(dir, &m);
    if (r < 0) {
        free(e.export_name);
        goto fail;
    }
    tmp_manifest_made = true;
    if (manifest_test_fault("kill-before-rename"))
        raise(SIGKILL);
    if (rename_noreplace(tmppath, finalpath) < 0) {
        if (errno == EEXIST)
            qcbt_error(EEXIST,
                       "%s exists but %s does not record it (a lost "
                       "manifest?): move it away to back up into %s",
                       finalpath,
                       MANIFEST_NAME,
                       dir);
        else
            qcbt_error(errno, "%s: %s", finalpath, strerror(errno));
        free(e.export_name);
        goto fail;
    }
    part_made = false;
    final_made = true;
    if (e.digest_index) {
        if (manifest_test_fault("kill-before-index-rename"))
            raise(SIGKILL);
        if (rename(dgipath, dgifinal) < 0) {
            qcbt_error(errno, "%s: %s", dgifinal, strerror(errno));
            free(e.export_name);
            goto fail;
        }
        dgi_part_made = false;
        dgi_final_made = true;
    }
    fsync_dir(dir);
    if (manifest_test_fault("kill-before-commit"))
        raise(SIGKILL);
    r = manifest_commit(dir);
    if (r < 0) {
        free(e.export_name);
        goto fail;
    }
    tmp_manifest_made = false;
    final_made = false;
    dgi_final_made = false;
    debug_mark("recorded");

    /* The backup is recorded.  The server goes first (it holds the
     * image too), then the new checkpoint.
     */
    if (ls) {
        close_handles(&eng);
        local_source_stop(ls);
        if (new_ckpt) {
            if (local_source_create_checkpoint(ls, new_ckpt) < 0) {
                char ename[256], why[1400], again[4300];
                const char *old = ctx ? ctx : granted_ctx;
                bool rewritten;

                snprintf(why, sizeof why, "%s", qcbt_error_get());
                qcbt_escape(ename, sizeof ename, new_ckpt, strlen(new_ckpt));
                /* The checkpoint this backup started from is still there
                 * and covers everything after it: the manifest names it
                 * again, so that --auto starts from it.  (Should this
                 * fail too, --auto finds no NEW and makes a full backup.)
                 */
                rewritten = manifest_set_checkpoint(dir, &m, old) == 0;
                if (!old)
                    snprintf(again, sizeof again, "full");
                else if (strncmp(old, "qemu:dirty-bitmap:", 18) == 0)
                    snprintf(again, sizeof again, "--since %s", old + 18);
                else
                    snprintf(again, sizeof again, "--bitmap %s", old);
                qcbt_error(EIO,
                           "%s is recorded in %s, but checkpoint '%s' was "
                           "not created (%s): the next backup must be %s "
                           "again%s",
                           fname,
                           dir,
                           ename,
                           why,
                           again,
                           rewritten ? " (--auto does so)"
                                     : "; --auto would make a full backup");
            } else {
                ckpt_made = true;
            }
        }
    }

    /* Fewer connections than asked for: say why, unless the backup was
     * over before the others could have helped.
     */
    if (conns > 1 && eng.nready < eng.nconn &&
        (eng.refused || eng.requests > eng.depth))
        notice("%zu of %zu connections used: the server %s the others",
               eng.nready,
               eng.nconn,
               eng.refused ? "refused" : "did not answer");
    notices_flush();
    if (json) {
        printf("{\"file\": \"%s\", \"type\": \"%s\", \"reason\": ",
               fname,
               e.type);
        if (why_full)
            json_string(stdout, why_full);
        else
            printf("null");
        printf(", \"virtual-size\": %" PRIu64 ", \"data-bytes\": %" PRIu64
               ", \"zero-bytes\": %" PRIu64 ", \"extents\": %" PRIu64
               ", \"requests\": %" PRIu64 ", \"connections\": %zu, "
               "\"seconds\": %.3f, \"guest-digest\": %s%s%s, "
               "\"checkpoint-created\": ",
               e.size,
               e.data_bytes,
               e.zero_bytes,
               e.extents,
               e.requests,
               eng.nready,
               e.seconds,
               digest ? "\"" : "",
               digest ? hex : "null",
               digest ? "\"" : "");
        if (ckpt_made)
            json_string(stdout, new_ckpt);
        else
            printf("null");
        printf("}\n");
    } else {
        printf("%s: %s backup, %" PRIu64 " bytes of data and %" PRIu64
               " bytes of zeros in %" PRIu64 " extents, %.2f s\n",
               fname,
               e.type,
               e.data_bytes,
               e.zero_bytes,
               e.extents,
               e.seconds);
        if (ckpt_made) {
            char ename[256];

            qcbt_escape(ename, sizeof ename, new_ckpt, strlen(new_ckpt));
            printf("checkpoint %s created in %s\n",
                   ename,
                   local_source_image(ls));
        }
    }
    free(e.export_name);
    if (new_ckpt && !ckpt_made) {
        /* Recorded, but without its checkpoint: one line says so. */
        report_error();
        ret = QCBT_EXIT_ERROR;
        goto out;
    }
    ret = QCBT_EXIT_OK;
    goto out;

fail:
    /* Nothing is recorded: remove what this run made. */
    if (eng.w) {
        qcow2_writer_abort(eng.w);
        eng.w = NULL;
    }
    dgi_writer_abort(eng.dgi);
    eng.dgi = NULL;
    if (part_made)
        unlink(tmppath);
    if (final_made)
        unlink(finalpath);
    if (dgi_part_made)
        unlink(dgipath);
    if (dgi_final_made)
        unlink(dgifinal);
    if (tmp_manifest_made) {
        char *tm = path_join(dir, MANIFEST_TMP_NAME);

        if (tm)
            unlink(tm);
        free(tm);
    }
    if (final_made || tmp_manifest_made || dgi_final_made)
        fsync_dir(dir);
    if (eng.progress && eng.last_progress)
        fputc('\n', stderr); /* end the progress line */
    if (ls) {
        /* Did the server end by itself?  Then that is part of the story. */
        close_handles(&eng);
        local_source_explain(ls);
    }
    report_error();
    ret = fail_rc;
out:
    close_handles(&eng);
    debug_mark("closed");
    debug_timeline();
    local_source_free(ls);
    if (eng.slots)
        for (i = 0; i < eng.nslots; i++)
            free(eng.slots[i].buf);
    free(eng.slots);
    free(eng.batch);
    for (i = 0; i < 2; i++) {
        free(eng.stages[i].q);
        free(eng.stages[i].take);
        pthread_cond_destroy(&eng.stages[i].cv);
        pthread_mutex_destroy(&eng.stages[i].mu);
    }
    if (eng.efd >= 0)
        close(eng.efd);
    pthread_mutex_destroy(&eng.mu);
    free(eng.runs);
    free(eng.gbuf);
    dgi_chain_free(eng.dgi_prev);
    free(dgipath);
    free(dgifinal);
    for (i = 0; i < MAP_SLOTS; i++) {
        free(eng.mq[i].alloc.e);
        free(eng.mq[i].dirty.e);
    }
    chain_close(pc.c);
    free(tmppath);
    free(finalpath);
    free(prevpath);
    manifest_free(&m);
    if (lockfd >= 0)
        close(lockfd);
    return ret;
}

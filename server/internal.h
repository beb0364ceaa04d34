/* qcbt-server: private declarations. */
#ifndef QCBT_SERVER_INTERNAL_H
#define QCBT_SERVER_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bitmap.h"
#include "chain.h"
#include "merge.h"
#include "tls.h"

struct publish_set;

/* Context ids are fixed per export: 0 base:allocation, 1
 * qemu:allocation-depth, 2+i the i-th published bitmap (as qemu-nbd).
 */
#define CTX_BASE_ALLOCATION  0
#define CTX_ALLOCATION_DEPTH 1
#define CTX_BITMAP_FIRST     2

/* Limits: what a client can make us hold or do. */
#define MAX_OPTION_LENGTH    (1u << 20)  /* larger: disconnect */
#define MAX_OPTIONS          256         /* per handshake */
#define MAX_REQUEST_LENGTH   (32u << 20) /* READ/CACHE/BLOCK_STATUS data */
#define MAX_WRITE_SKIP       (32u << 20) /* refused WRITE payload we drain */
#define MAX_EXTENTS          131072      /* per block-status chunk (qemu) */
#define READ_CHUNK           (2u << 20)  /* structured read chunk size */
#define BLOCK_SIZE_MIN       1
#define BLOCK_SIZE_PREFERRED 4096
#define BLOCK_SIZE_MAX       (32u << 20)
#define WORKER_BUF_KEEP      READ_CHUNK /* kept between requests */
#define IDLE_RELEASE_MS      1000 /* a worker idle this long frees buffers */

struct export_bitmap {
    char *context;                    /* "qemu:dirty-bitmap:ALIAS" */
    const struct merge_result *merge; /* usable, immutable; the set's */
};

struct export
{
    char *name;
    char *description; /* may be NULL */
    char *image;
    char *format;     /* NULL: probe */
    bool alloc_depth; /* publish qemu:allocation-depth */
    bool strict;
    bool all_bitmaps;
    bool force_share;   /* -U: SHARED image locks, not READ */
    char **bitmap_args; /* "NAME" or "NAME=ALIAS" as given */
    size_t nr_bitmap_args;

    /* Built at start, immutable after. */
    struct chain *chain;
    uint64_t size;
    struct publish_set *published; /* what common/publish decided */
    size_t nr_bitmaps;
    struct export_bitmap *bitmaps; /* published->bitmaps, as contexts */
};

struct server {
    struct export *exports;
    size_t nr_exports;
    unsigned max_connections;
    unsigned threads;           /* workers per connection */
    unsigned handshake_timeout; /* seconds to reach transmission */
    unsigned idle_timeout;      /* seconds without requests; 0: none */
    bool persistent;
    int verbose;
    bool debug; /* QCBT_DEBUG: a request summary per connection */
    enum tls_mode tls_mode;
    struct tls_server *tls; /* NULL: TLS off */

    atomic_uint nr_connections;
    atomic_bool shutting_down;
    pthread_mutex_t lock; /* protects conns list and served */
    struct connection *conns;
    bool served;      /* at least one client came and went */
    int wake_pipe[2]; /* wakes the accept loop */
};

struct connection {
    struct server *srv;
    int fd;
    char peer[64];
    struct connection *next;
    int64_t write_deadline; /* now_ms() clock; 0: none (handshake) */
    struct tls_conn *tls;   /* after STARTTLS: all I/O goes through it */

    /* Negotiated state (handshake thread only, read-only afterwards). */
    bool structured;
    bool no_zeroes;
    struct export *exp;         /* chosen by GO / EXPORT_NAME */
    struct export *meta_export; /* export the SET named */
    uint32_t *meta_ids;         /* selected ids, unique, in order */
    size_t nr_meta;

    /* Transmission. */
    pthread_mutex_t read_lock;  /* one worker reads a request at a time */
    pthread_mutex_t write_lock; /* one reply (or chunk) at a time */
    atomic_bool closing;        /* stop reading new requests */
    atomic_uint in_flight;
    _Atomic int64_t last_active; /* now_ms() when a request last ended */

    /* What the client asked for (QCBT_DEBUG: logged at disconnect, so a
     * bench or a test sees a client's request pattern from the server's
     * side).  Any worker adds, relaxed: only the totals matter.
     */
    atomic_uint_fast64_t nr_reads, read_bytes;
    atomic_uint_fast64_t nr_bs, bs_bytes, nr_bs_one;
};

/* log.c-ish helpers (main.c). */
void srv_log(const struct server *srv, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#define LOG_ERROR 0
#define LOG_INFO  1
#define LOG_DEBUG 2

/* export.c */
int export_open(struct export *exp, int verbose);
void export_close(struct export *exp);
struct export *
server_find_export(struct server *srv, const char *name, size_t len);
/* Name of context ID of EXP, or NULL. */
const char *export_context_name(const struct export *exp, uint32_t id);
uint32_t export_nr_contexts(const struct export *exp);

/* connection.c */
int conn_read(struct connection *c, void *buf, size_t len);
int conn_read_deadline(struct connection *c,
                       void *buf,
                       size_t len,
                       int64_t deadline_ms);
int conn_skip(struct connection *c, uint64_t len);
int conn_write(struct connection *c, const void *buf, size_t len, bool more);
int64_t now_ms(void);
void *connection_thread(void *arg);

/* handshake.c: returns 1 when transmission starts, 0 when the client
 * ended the handshake cleanly, -1 on error / disconnect.
 */
int handshake(struct connection *c);

/* protocol.c: serve requests until the client disconnects. */
void transmission(struct connection *c);

#endif /* QCBT_SERVER_INTERNAL_H */

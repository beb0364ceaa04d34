/* qcbt: how many bytes of reads the backup keeps in flight (issue 13).
 *
 * A link holds rate x round trip bytes (its bandwidth-delay product): a
 * client with less in flight leaves it idle part of each round trip, one
 * with much more only queues bytes at the sender and holds memory.  The
 * backup measures both as it reads: the round trip is the smallest
 * latency of a read (issue to completion; its own transfer included),
 * the rate the best delivery rate over an interval of at least one round
 * trip.  The window is twice their product (a link not yet full doubles
 * the window each round trip, as TCP's slow start does; a full one stops
 * growing), never below the floor the caller gives (what a local server
 * wants for its own parallelism) nor above the ceiling (the memory the
 * read buffers may take).  It only grows: a slower phase (a map request,
 * a slow writer) does not make the link shorter.
 *
 * Times are microseconds on any monotonic clock; the caller owns the
 * struct, no allocation.
 */
#ifndef QCBT_CLIENT_PACE_H
#define QCBT_CLIENT_PACE_H

#include <stdint.h>

/* Rate samples cover at least this long, however short the round trip. */
#define PACE_MIN_INTERVAL_US 2000

struct pace {
    uint64_t floor, ceiling; /* bytes */
    uint64_t window;         /* bytes, floor..ceiling */
    int64_t min_rtt_us;      /* -1 until the first completion */
    double max_rate;         /* bytes per microsecond */
    uint64_t delivered;      /* bytes completed */
    int64_t mark_us;         /* start of the current sample, -1: none */
    uint64_t mark_bytes;     /* delivered at mark_us */
};

/* FLOOR <= CEILING, bytes. */
void pace_init(struct pace *p, uint64_t floor, uint64_t ceiling);

/* A read of LEN bytes issued at ISSUED_US completed at NOW_US. */
void pace_done(struct pace *p, int64_t now_us, int64_t issued_us, uint64_t len);

static inline uint64_t
pace_window(const struct pace *p)
{
    return p->window;
}

#endif

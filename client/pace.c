/* qcbt: the backup's window of reads in flight (pace.h). */
#include "pace.h"

void
pace_init(struct pace *p, uint64_t floor, uint64_t ceiling)
{
    *p = (struct pace){
        .floor = floor,
        .ceiling = ceiling < floor ? floor : ceiling,
        .window = floor,
        .min_rtt_us = -1,
        .mark_us = -1,
    };
}

void
pace_done(struct pace *p, int64_t now_us, int64_t issued_us, uint64_t len)
{
    int64_t lat = now_us - issued_us, interval;
    double target;

    if (lat < 1)
        lat = 1;
    if (p->min_rtt_us < 0 || lat < p->min_rtt_us)
        p->min_rtt_us = lat;
    p->delivered += len;
    if (p->mark_us < 0) {
        /* The first completion starts the first sample. */
        p->mark_us = now_us;
        p->mark_bytes = p->delivered;
        return;
    }
    interval = now_us - p->mark_us;
    if (interval < p->min_rtt_us || interval < PACE_MIN_INTERVAL_US)
        return;
    {
        double rate = (double)(p->delivered - p->mark_bytes) / (double)interval;

        if (rate > p->max_rate)
            p->max_rate = rate;
    }
    p->mark_us = now_us;
    p->mark_bytes = p->delivered;
    target = 2.0 * p->max_rate * (double)p->min_rtt_us;
    if (target >= (double)p->ceiling)
        p->window = p->ceiling;
    else if (target > (double)p->window)
        p->window = (uint64_t)target;
}

/* Unit tests for client/pace.c: the backup's window of reads in flight,
 * against a simulated link (a FIFO of one rate, a fixed round trip).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "pace.h"

#define KiB   1024ULL
#define MiB   (1024 * KiB)
#define CHUNK (256 * KiB)
#define MAXQ  4096

struct sim {
    struct pace p;
    double rate;      /* bytes per microsecond */
    double rtt;       /* microseconds */
    double link_free; /* when the link has sent all it was given */
    double done[MAXQ], issued[MAXQ];
    unsigned head, n;
    double t;
    uint64_t bytes_after; /* delivered after `after` */
    double after;
    uint64_t peak_window;
};

/* Reads of CHUNK bytes cross half the round trip, queue for the link,
 * take CHUNK / rate on it and cross the other half: completions come in
 * issue order.  Run until T_END (microseconds).
 */
static void
sim_run(struct sim *s, double t_end)
{
    while (s->t < t_end) {
        while ((uint64_t)s->n * CHUNK < pace_window(&s->p)) {
            unsigned k = (s->head + s->n) % MAXQ;
            double start = s->t + s->rtt / 2;

            assert_true(s->n < MAXQ);
            if (start < s->link_free)
                start = s->link_free;
            s->link_free = start + CHUNK / s->rate;
            s->done[k] = s->link_free + s->rtt / 2;
            s->issued[k] = s->t;
            s->n++;
        }
        s->t = s->done[s->head];
        pace_done(&s->p, (int64_t)s->t, (int64_t)s->issued[s->head], CHUNK);
        if (s->t >= s->after)
            s->bytes_after += CHUNK;
        if (pace_window(&s->p) > s->peak_window)
            s->peak_window = pace_window(&s->p);
        s->head = (s->head + 1) % MAXQ;
        s->n--;
    }
}

static void
sim_init(struct sim *s,
         double mbit,
         double rtt_ms,
         uint64_t floor,
         uint64_t ceiling)
{
    *s = (struct sim){.rate = mbit / 8, .rtt = rtt_ms * 1000};
    pace_init(&s->p, floor, ceiling);
}

/* A local server (0.1 ms, 16 Gbit/s): the floor is already more than
 * twice what is in transit; the window stays there.
 */
static void
test_local_stays_at_floor(void **state)
{
    struct sim s;

    (void)state;
    sim_init(&s, 16000, 0.1, 4 * MiB, 32 * MiB);
    sim_run(&s, 2e6);
    assert_int_equal(pace_window(&s.p), 4 * MiB);
}

/* 10 ms, 1 Gbit/s from a 1 MiB floor: the window grows to twice the
 * bandwidth-delay product (1.25 MB plus one read's 2 ms on the link) and
 * stops there; the link is kept full.
 */
static void
test_link_grows_to_bdp(void **state)
{
    struct sim s;
    double bdp = 125.0 * (10000 + CHUNK / 125.0);

    (void)state;
    sim_init(&s, 1000, 10, 1 * MiB, 32 * MiB);
    s.after = 1e6;
    sim_run(&s, 3e6);
    assert_true((double)pace_window(&s.p) >= 1.5 * bdp);
    assert_true((double)pace_window(&s.p) <= 2.5 * bdp);
    /* The last 2 s at the link's rate (within one read). */
    assert_true((double)s.bytes_after >= 125.0 * 2e6 - CHUNK);
}

/* 50 ms, 10 Gbit/s holds 62.5 MB: the window stops at the ceiling. */
static void
test_long_fat_link_hits_ceiling(void **state)
{
    struct sim s;

    (void)state;
    sim_init(&s, 10000, 50, 4 * MiB, 32 * MiB);
    sim_run(&s, 2e6);
    assert_int_equal(pace_window(&s.p), 32 * MiB);
    assert_int_equal(s.peak_window, 32 * MiB);
}

/* A slower phase later (the link shared, the writer slow) does not
 * shrink the window; a faster one grows it.
 */
static void
test_grows_only(void **state)
{
    struct sim s;
    uint64_t w;

    (void)state;
    sim_init(&s, 1000, 10, 1 * MiB, 32 * MiB);
    sim_run(&s, 2e6);
    w = pace_window(&s.p);
    s.rate = 100.0 / 8;
    sim_run(&s, 4e6);
    assert_int_equal(pace_window(&s.p), w);
    s.rate = 4000.0 / 8;
    sim_run(&s, 6e6);
    assert_true(pace_window(&s.p) > 3 * w);
}

/* Odd inputs: a completion before its issue (a clock step), a ceiling
 * below the floor.
 */
static void
test_odd_inputs(void **state)
{
    struct pace p;

    (void)state;
    pace_init(&p, 8 * MiB, 1 * MiB);
    assert_int_equal(pace_window(&p), 8 * MiB);
    pace_done(&p, 100, 200, CHUNK);
    pace_done(&p, 1000000, 999999, 1ULL << 40);
    assert_int_equal(pace_window(&p), 8 * MiB);
    assert_int_equal(p.min_rtt_us, 1);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_local_stays_at_floor),
        cmocka_unit_test(test_link_grows_to_bdp),
        cmocka_unit_test(test_long_fat_link_hits_ceiling),
        cmocka_unit_test(test_grows_only),
        cmocka_unit_test(test_odd_inputs),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* qcbt: dense dirty bitmaps.  See bitmap.h for the model.
 *
 * Invariant: in bm->words, every bit at index >= nbits is zero (the last
 * word is masked after every write; raw tail bits live in bm->tail).  The
 * searches rely on it for set bits and clip to nbits for clear bits.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "checked-overflow.h"
#include "error.h"
#include "minmax.h"

#define WORD_BITS 64

/* Mask of the bits of the last word that lie below nbits. */
static uint64_t
last_word_mask(const struct bitmap *bm)
{
    if (bm->nbits == 0)
        return 0;
    if (bm->nbits % WORD_BITS == 0)
        return ~UINT64_C(0);
    return (UINT64_C(1) << (bm->nbits % WORD_BITS)) - 1;
}

/* Bits [0, n) of a word, n in 0..64. */
static uint64_t
low_bits(unsigned n)
{
    return n >= WORD_BITS ? ~UINT64_C(0) : (UINT64_C(1) << n) - 1;
}

/* Byte lanes [a, b) of a word in stream order (byte 0 = bits 0..7). */
static uint64_t
byte_lanes(unsigned a, unsigned b)
{
    return low_bits(8 * b) & ~low_bits(8 * a);
}

/* Set or clear bits [start, end) of W; start < end. */
static void
fill_range(uint64_t *w, uint64_t start, uint64_t end, bool set)
{
    size_t i = start / WORD_BITS;
    size_t j = (end - 1) / WORD_BITS;
    uint64_t first = ~UINT64_C(0) << (start % WORD_BITS);
    uint64_t last = ~UINT64_C(0) >> (WORD_BITS - 1 - (end - 1) % WORD_BITS);

    if (i == j) {
        first &= last;
        last = 0;
    }
    if (set) {
        w[i] |= first;
        if (i != j) {
            memset(&w[i + 1], 0xff, (j - i - 1) * sizeof *w);
            w[j] |= last;
        }
    } else {
        w[i] &= ~first;
        if (i != j) {
            memset(&w[i + 1], 0, (j - i - 1) * sizeof *w);
            w[j] &= ~last;
        }
    }
}

/* Bit BIT, bit < nbits.  (Internal callers use this rather than
 * bitmap_test(): with -fPIC a public function is not inlined.)
 */
static inline bool
get_bit(const struct bitmap *bm, uint64_t bit)
{
    return (bm->words[bit / WORD_BITS] >> (bit % WORD_BITS)) & 1;
}

/* First index in [bit, end) whose value is WANT, or END.  end <= nbits. */
static inline uint64_t
find_next(const struct bitmap *bm, uint64_t bit, uint64_t end, bool want)
{
    const uint64_t flip = want ? 0 : ~UINT64_C(0);
    size_t i, last;
    uint64_t w;

    if (bit >= end)
        return end;
    i = bit / WORD_BITS;
    last = (end - 1) / WORD_BITS;
    w = (bm->words[i] ^ flip) & (~UINT64_C(0) << (bit % WORD_BITS));
    while (w == 0) {
        if (++i > last)
            return end;
        w = bm->words[i] ^ flip;
    }
    return MIN((uint64_t)i * WORD_BITS + __builtin_ctzll(w), end);
}

/* Set bits in [start, end); end <= nbits. */
static uint64_t
count_bits(const struct bitmap *bm, uint64_t start, uint64_t end)
{
    size_t i, j;
    uint64_t first, last, n = 0;

    if (start >= end)
        return 0;
    i = start / WORD_BITS;
    j = (end - 1) / WORD_BITS;
    first = ~UINT64_C(0) << (start % WORD_BITS);
    last = ~UINT64_C(0) >> (WORD_BITS - 1 - (end - 1) % WORD_BITS);
    if (i == j)
        return __builtin_popcountll(bm->words[i] & first & last);
    n = __builtin_popcountll(bm->words[i] & first);
    for (size_t k = i + 1; k < j; k++)
        n += __builtin_popcountll(bm->words[k]);
    n += __builtin_popcountll(bm->words[j] & last);
    return n;
}

/* ceil(a / 2^shift) without overflow. */
static uint64_t
div_round_up_shift(uint64_t a, unsigned shift)
{
    return (a >> shift) + ((a & low_bits(shift)) != 0);
}

int
bitmap_new(uint64_t size, uint64_t granularity, struct bitmap **out)
{
    struct bitmap *bm;
    uint64_t nbits;
    unsigned gran_bits;

    *out = NULL;
    if (granularity < (UINT64_C(1) << BITMAP_MIN_GRANULARITY_BITS) ||
        granularity > (UINT64_C(1) << BITMAP_MAX_GRANULARITY_BITS) ||
        (granularity & (granularity - 1)) != 0)
        return qcbt_error(EINVAL,
                          "bitmap granularity %" PRIu64
                          " is not a power of two from %u to %" PRIu64,
                          granularity,
                          1u << BITMAP_MIN_GRANULARITY_BITS,
                          UINT64_C(1) << BITMAP_MAX_GRANULARITY_BITS);
    gran_bits = __builtin_ctzll(granularity);
    nbits = div_round_up_shift(size, gran_bits);
    if (nbits > BITMAP_MAX_BITS)
        return qcbt_error(EFBIG,
                          "bitmap for a disk of %" PRIu64
                          " bytes at granularity %" PRIu64 " needs %" PRIu64
                          " bits, more than the limit of %" PRIu64,
                          size,
                          granularity,
                          nbits,
                          BITMAP_MAX_BITS);

    bm = calloc(1, sizeof *bm);
    if (bm == NULL)
        return qcbt_error(ENOMEM, "bitmap: out of memory");
    bm->size = size;
    bm->granularity = granularity;
    bm->gran_bits = gran_bits;
    bm->nbits = nbits;
    bm->nwords = MAX((size_t)((nbits + WORD_BITS - 1) / WORD_BITS), (size_t)1);
    bm->words = calloc(bm->nwords, sizeof *bm->words);
    if (bm->words == NULL) {
        size_t bytes = bm->nwords * sizeof(uint64_t);
        free(bm);
        return qcbt_error(ENOMEM,
                          "bitmap: cannot allocate %zu bytes for %" PRIu64
                          " bits",
                          bytes,
                          nbits);
    }
    *out = bm;
    return 0;
}

void
bitmap_free(struct bitmap *bm)
{
    if (bm == NULL)
        return;
    free(bm->words);
    free(bm);
}

static int
check_bits(const struct bitmap *bm, const char *what, uint64_t bit, uint64_t n)
{
    uint64_t end;

    if (ADD_OVERFLOW(bit, n, &end) || end > bm->nbits)
        return qcbt_error(EINVAL,
                          "bitmap %s: bits [%" PRIu64 ", +%" PRIu64
                          ") outside the %" PRIu64 " bits",
                          what,
                          bit,
                          n,
                          bm->nbits);
    return 0;
}

static int
check_bytes(const struct bitmap *bm,
            const char *what,
            uint64_t offset,
            uint64_t len)
{
    uint64_t end;

    if (ADD_OVERFLOW(offset, len, &end) || end > bm->size)
        return qcbt_error(EINVAL,
                          "bitmap %s: bytes [%" PRIu64 ", +%" PRIu64
                          ") outside the disk size %" PRIu64,
                          what,
                          offset,
                          len,
                          bm->size);
    return 0;
}

int
bitmap_set(struct bitmap *bm, uint64_t bit, uint64_t n)
{
    int r = check_bits(bm, "set", bit, n);

    if (r < 0)
        return r;
    if (n > 0)
        fill_range(bm->words, bit, bit + n, true);
    return 0;
}

int
bitmap_clear(struct bitmap *bm, uint64_t bit, uint64_t n)
{
    int r = check_bits(bm, "clear", bit, n);

    if (r < 0)
        return r;
    if (n > 0)
        fill_range(bm->words, bit, bit + n, false);
    return 0;
}

int
bitmap_set_bytes(struct bitmap *bm, uint64_t offset, uint64_t len)
{
    int r = check_bytes(bm, "set", offset, len);

    if (r < 0)
        return r;
    if (len > 0)
        fill_range(bm->words,
                   offset >> bm->gran_bits,
                   ((offset + len - 1) >> bm->gran_bits) + 1,
                   true);
    return 0;
}

int
bitmap_clear_bytes(struct bitmap *bm, uint64_t offset, uint64_t len)
{
    uint64_t start, end;
    int r = check_bytes(bm, "clear", offset, len);

    if (r < 0)
        return r;
    if (len == 0)
        return 0;
    start = div_round_up_shift(offset, bm->gran_bits);
    end =
        offset + len == bm->size ? bm->nbits : (offset + len) >> bm->gran_bits;
    if (start < end)
        fill_range(bm->words, start, end, false);
    return 0;
}

bool
bitmap_test(const struct bitmap *bm, uint64_t bit)
{
    if (bit >= bm->nbits)
        return false;
    return get_bit(bm, bit);
}

uint64_t
bitmap_next_dirty(const struct bitmap *bm, uint64_t bit)
{
    return find_next(bm, bit, bm->nbits, true);
}

uint64_t
bitmap_next_clean(const struct bitmap *bm, uint64_t bit)
{
    return find_next(bm, bit, bm->nbits, false);
}

uint64_t
bitmap_count(const struct bitmap *bm)
{
    uint64_t n = 0;

    for (size_t i = 0; i < bm->nwords; i++)
        n += __builtin_popcountll(bm->words[i]);
    return n;
}

uint64_t
bitmap_dirty_bytes(const struct bitmap *bm)
{
    uint64_t n = bitmap_count(bm) * bm->granularity;

    if (bm->nbits && bitmap_test(bm, bm->nbits - 1))
        n -= bm->nbits * bm->granularity - bm->size;
    return n;
}

uint64_t
bitmap_count_range(const struct bitmap *bm, uint64_t bit, uint64_t n)
{
    uint64_t end;

    if (ADD_OVERFLOW(bit, n, &end) || end > bm->nbits)
        end = bm->nbits;
    return count_bits(bm, bit, end);
}

static int
check_same_shape(const struct bitmap *dst,
                 const struct bitmap *src,
                 const char *what)
{
    if (dst->size != src->size || dst->granularity != src->granularity)
        return qcbt_error(EINVAL,
                          "bitmap %s: shapes differ (size %" PRIu64
                          " granularity %" PRIu64 " vs size %" PRIu64
                          " granularity %" PRIu64 ")",
                          what,
                          dst->size,
                          dst->granularity,
                          src->size,
                          src->granularity);
    return 0;
}

int
bitmap_or(struct bitmap *dst, const struct bitmap *src)
{
    int r = check_same_shape(dst, src, "or");

    if (r < 0)
        return r;
    for (size_t i = 0; i < dst->nwords; i++)
        dst->words[i] |= src->words[i];
    return 0;
}

int
bitmap_andnot(struct bitmap *dst, const struct bitmap *src)
{
    int r = check_same_shape(dst, src, "and-not");

    if (r < 0)
        return r;
    if (dst == src) {
        memset(dst->words, 0, dst->nwords * sizeof *dst->words);
        return 0;
    }
    for (size_t i = 0; i < dst->nwords; i++)
        dst->words[i] &= ~src->words[i];
    return 0;
}

/* Granularity conversion helpers.  For a ratio r = 2^k (k = 1..5) between
 * granularities, one fine word of 64 bits maps to n = 64/r coarse bits.
 *
 * The n coarse bits are moved between "packed" (bits 0..n-1) and "strided"
 * (bit q at position q*r) layouts in log2(n) shift-and-mask steps: at
 * step e the bits travel in blocks of b = 2^e, block q sitting at q*b*r.
 * masks[e] selects that layout; masks[log2 n] is the packed one.
 */
struct stride_masks {
    unsigned k, steps; /* steps = log2(n) = 6 - k */
    uint64_t m[7];
};

static void
stride_masks_init(struct stride_masks *sm, unsigned k)
{
    const unsigned r = 1u << k, n = WORD_BITS >> k;

    sm->k = k;
    sm->steps = 6 - k;
    for (unsigned e = 0; e <= sm->steps; e++) {
        unsigned b = 1u << e;
        uint64_t m = 0;
        for (unsigned q = 0; q < n / b; q++)
            m |= low_bits(b) << (q * b * r);
        sm->m[e] = m;
    }
}

/* Bit q of the result = OR of bits [q*r, (q+1)*r) of X. */
static inline uint64_t
shrink_word(uint64_t x, const struct stride_masks *sm)
{
    const unsigned r = 1u << sm->k;

    for (unsigned s = 1; s < r; s <<= 1)
        x |= x >> s; /* bit q*r now holds the OR of its group */
    x &= sm->m[0];
    for (unsigned e = 0; e < sm->steps; e++)
        x = (x | x >> ((r - 1) << e)) & sm->m[e + 1];
    return x;
}

/* Bits [q*r, (q+1)*r) of the result = bit q of X, q < n. */
static inline uint64_t
grow_word(uint64_t x, const struct stride_masks *sm)
{
    const unsigned r = 1u << sm->k;

    x &= sm->m[sm->steps];
    for (unsigned e = sm->steps; e-- > 0;)
        x = (x | x << ((r - 1) << e)) & sm->m[e];
    /* Each bit 2^(q*r) becomes 2^((q+1)*r) - 2^(q*r): r ones.  The blocks
     * are disjoint, so there are no carries, and for the top block the
     * arithmetic wraps modulo 2^64 to the same ones.
     */
    return (x << r) - x;
}

int
bitmap_merge_into(struct bitmap *dst, const struct bitmap *src)
{
    const unsigned gs = src->gran_bits, gd = dst->gran_bits;
    const uint64_t common = MIN(src->size, dst->size);
    /* Bits that cover at least one byte of both disks. */
    const uint64_t slimit = div_round_up_shift(common, gs);
    const uint64_t dlimit = div_round_up_shift(common, gd);
    const uint64_t dwords = (dlimit + WORD_BITS - 1) / WORD_BITS;
    uint64_t *const dw = dst->words;

    if (dwords == 0)
        return 0;

    /* Every word but the last, by ratio of granularities.  All the bits
     * of destination words [0, dwords-1) lie below dlimit-1, so they cover
     * whole bytes of both disks: the source bits they read lie below
     * slimit (<= src->nbits) and need no clipping.
     */

    if (gs == gd) {
        /* Same granularity: slimit == dlimit, plain word OR. */
        for (uint64_t i = 0; i < dwords - 1; i++)
            dw[i] |= src->words[i];
    } else if (gs < gd && gd - gs < 6) {
        /* Fine source: 2^k source words per destination word. */
        const unsigned k = gd - gs;
        const unsigned per = WORD_BITS >> k;
        struct stride_masks sm;

        stride_masks_init(&sm, k);
        for (uint64_t i = 0; i < dwords - 1; i++) {
            uint64_t v = 0;
            for (uint64_t t = 0; t < (UINT64_C(1) << k); t++) {
                uint64_t w = src->words[(i << k) + t];
                if (w != 0)
                    v |= shrink_word(w, &sm) << (t * per);
            }
            dw[i] |= v;
        }
    } else if (gs < gd) {
        /* Very fine source: each destination bit covers 2^(k-6) whole
         * source words; search them word-wise.
         */
        const unsigned k = gd - gs;

        for (uint64_t j = 0; j < (dwords - 1) * WORD_BITS; j++) {
            uint64_t first = j << k;
            uint64_t end = MIN(first + (UINT64_C(1) << k), slimit);
            if (find_next(src, first, end, true) < end)
                dw[j / WORD_BITS] |= UINT64_C(1) << (j % WORD_BITS);
        }
    } else if (gs - gd < 6) {
        /* Coarse source: 64>>k source bits per destination word, never
         * straddling a source word.
         */
        const unsigned k = gs - gd;
        const unsigned per = WORD_BITS >> k;
        struct stride_masks sm;

        stride_masks_init(&sm, k);
        for (uint64_t i = 0; i < dwords - 1; i++) {
            const uint64_t s0 = i * per;
            uint64_t w = src->words[s0 / WORD_BITS] >> (s0 % WORD_BITS);
            if ((w & low_bits(per)) != 0)
                dw[i] |= grow_word(w, &sm);
        }
    } else {
        /* Very coarse source: one source bit per destination word. */
        const unsigned k = gs - gd;

        for (uint64_t i = 0; i < dwords - 1; i++) {
            if (get_bit(src, (i * WORD_BITS) >> k))
                dw[i] = ~UINT64_C(0);
        }
    }

    /* The last destination word: the general slow path, bit by bit in
     * the worst case (at most 64 bits), with every index clipped.
     */
    {
        const uint64_t i = dwords - 1;
        uint64_t v = 0;

        for (uint64_t j = i * WORD_BITS; j < dlimit; j++) {
            /* Dst bit j covers bytes [j*gd, min((j+1)*gd, common)). */
            uint64_t lo = j << gd;
            uint64_t hi = MIN(lo + (UINT64_C(1) << gd), common);
            uint64_t first = lo >> gs;
            uint64_t end = div_round_up_shift(hi, gs);
            if (find_next(src, first, MIN(end, slimit), true) <
                MIN(end, slimit))
                v |= UINT64_C(1) << (j % WORD_BITS);
        }
        dw[i] |= v;
    }
    return 0;
}

uint64_t
bitmap_serialized_size(const struct bitmap *bm)
{
    return (bm->nbits + 7) / 8;
}

uint64_t
bitmap_raw_size(const struct bitmap *bm)
{
    return (uint64_t)bm->nwords * sizeof(uint64_t);
}

/* Overwrite byte lanes [a, b) of *W from SRC, or with FILL if SRC is
 * NULL.
 */
static void
put_lanes(uint64_t *w, unsigned a, unsigned b, const uint8_t *src, int fill)
{
    uint8_t tmp[8];
    uint64_t le = htole64(*w);

    memcpy(tmp, &le, 8);
    if (src != NULL)
        memcpy(tmp + a, src, b - a);
    else
        memset(tmp + a, fill, b - a);
    memcpy(&le, tmp, 8);
    *w = le64toh(le);
}

static int
import_bytes(struct bitmap *bm,
             uint64_t offset,
             const uint8_t *buf,
             int fill,
             uint64_t len,
             unsigned flags)
{
    const uint64_t raw = bitmap_raw_size(bm);
    const size_t last = bm->nwords - 1;
    const uint64_t vmask = last_word_mask(bm);
    uint64_t end, o;
    bool touches_last;

    if (flags & ~BITMAP_RAW)
        return qcbt_error(EINVAL, "bitmap import: unknown flags 0x%x", flags);
    if (offset > raw || ADD_OVERFLOW(offset, len, &end))
        return qcbt_error(EINVAL,
                          "bitmap import: bytes [%" PRIu64 ", +%" PRIu64
                          ") start past the %" PRIu64 " bytes of the bitmap",
                          offset,
                          len,
                          raw);
    end = MIN(end, raw);
    if (offset == end)
        return 0;

    /* Merge the raw tail in, so the last word reads as QEMU's would. */
    touches_last = end > (uint64_t)last * 8;
    if (touches_last)
        bm->words[last] |= bm->tail;

    o = offset;
    while (o < end) {
        size_t i = o / 8;
        unsigned a = o % 8;
        unsigned b = MIN(end - (uint64_t)i * 8, (uint64_t)8);

        if (a == 0 && b == 8) {
            /* Whole words. */
            size_t n = (end - o) / 8;
            if (buf != NULL) {
                memcpy(&bm->words[i], buf + (o - offset), n * 8);
#if __BYTE_ORDER == __BIG_ENDIAN
                for (size_t k = i; k < i + n; k++)
                    bm->words[k] = le64toh(bm->words[k]);
#endif
            } else {
                memset(&bm->words[i], fill, n * 8);
            }
            o += n * 8;
        } else {
            put_lanes(&bm->words[i],
                      a,
                      b,
                      buf != NULL ? buf + (o - offset) : NULL,
                      fill);
            o += b - a;
        }
    }

    if (touches_last) {
        uint64_t w = bm->words[last];
        if (!(flags & BITMAP_RAW)) {
            uint64_t lo = MAX(offset, (uint64_t)last * 8) - (uint64_t)last * 8;
            w &= ~(byte_lanes(lo, end - (uint64_t)last * 8) & ~vmask);
        }
        bm->tail = w & ~vmask;
        bm->words[last] = w & vmask;
    }
    return 0;
}

int
bitmap_import(struct bitmap *bm,
              uint64_t offset,
              const void *buf,
              uint64_t len,
              unsigned flags)
{
    if (buf == NULL && len > 0)
        return qcbt_error(EINVAL, "bitmap import: NULL buffer");
    return import_bytes(bm,
                        offset,
                        buf == NULL ? (const uint8_t *)"" : buf,
                        0,
                        len,
                        flags);
}

int
bitmap_import_fill(struct bitmap *bm,
                   uint64_t offset,
                   uint64_t len,
                   bool ones,
                   unsigned flags)
{
    return import_bytes(bm, offset, NULL, ones ? 0xff : 0, len, flags);
}

int
bitmap_export(const struct bitmap *bm,
              uint64_t offset,
              void *buf,
              uint64_t len,
              unsigned flags)
{
    const uint64_t raw = bitmap_raw_size(bm);
    const size_t last = bm->nwords - 1;
    uint8_t *out = buf;
    uint64_t end, cend, o;

    if (flags & ~BITMAP_RAW)
        return qcbt_error(EINVAL, "bitmap export: unknown flags 0x%x", flags);
    if (ADD_OVERFLOW(offset, len, &end))
        return qcbt_error(EINVAL,
                          "bitmap export: bytes [%" PRIu64 ", +%" PRIu64
                          ") overflow",
                          offset,
                          len);
    if (len > 0 && buf == NULL)
        return qcbt_error(EINVAL, "bitmap export: NULL buffer");
    cend = MIN(end, raw);

    o = offset;
    while (o < cend) {
        size_t i = o / 8;
        unsigned a = o % 8;
        unsigned b = MIN(cend - (uint64_t)i * 8, (uint64_t)8);

        if (a == 0 && b == 8 && i != last) {
            /* Whole words before the last one. */
            size_t n = MIN((cend - o) / 8, (uint64_t)(last - i));
            memcpy(out + (o - offset), &bm->words[i], n * 8);
#if __BYTE_ORDER == __BIG_ENDIAN
            for (size_t k = 0; k < n; k++) {
                uint64_t le = htole64(bm->words[i + k]);
                memcpy(out + (o - offset) + k * 8, &le, 8);
            }
#endif
            o += n * 8;
        } else {
            uint64_t w = bm->words[i];
            uint64_t le;
            if (i == last && (flags & BITMAP_RAW))
                w |= bm->tail;
            le = htole64(w);
            memcpy(out + (o - offset), (uint8_t *)&le + a, b - a);
            o += b - a;
        }
    }
    if (end > MAX(cend, offset))
        memset(out + (MAX(cend, offset) - offset), 0, end - MAX(cend, offset));
    return 0;
}

int
bitmap_extent(const struct bitmap *bm,
              uint64_t offset,
              uint64_t max_len,
              struct bitmap_extent *ext)
{
    uint64_t end, bit, ebit, next;
    bool dirty;

    if (offset >= bm->size || max_len == 0)
        return qcbt_error(EINVAL,
                          "bitmap extent: offset %" PRIu64 " length %" PRIu64
                          " outside the disk size %" PRIu64,
                          offset,
                          max_len,
                          bm->size);
    if (ADD_OVERFLOW(offset, max_len, &end) || end > bm->size)
        end = bm->size;
    bit = offset >> bm->gran_bits;
    ebit = div_round_up_shift(end, bm->gran_bits);
    dirty = get_bit(bm, bit);
    next = find_next(bm, bit + 1, ebit, !dirty);
    ext->offset = offset;
    ext->len = MIN(next << bm->gran_bits, end) - offset;
    ext->dirty = dirty;
    return 0;
}

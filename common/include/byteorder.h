/* qcbt: big-endian field access for on-disk structures.
 *
 * Every multi-byte integer in qcow2 metadata is big-endian (qcow2.txt
 * "Header").  Fields are read from unaligned byte buffers, so these go
 * through memcpy and let the compiler emit a single load + bswap.
 */
#ifndef QCBT_BYTEORDER_H
#define QCBT_BYTEORDER_H

#include <stdint.h>
#include <string.h>
#include <endian.h>

static inline uint16_t
get_be16(const void *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return be16toh(v);
}

static inline uint32_t
get_be32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return be32toh(v);
}

static inline uint64_t
get_be64(const void *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return be64toh(v);
}

static inline void
put_be16(void *p, uint16_t v)
{
    v = htobe16(v);
    memcpy(p, &v, sizeof v);
}

static inline void
put_be32(void *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, sizeof v);
}

static inline void
put_be64(void *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, sizeof v);
}

#endif /* QCBT_BYTEORDER_H */

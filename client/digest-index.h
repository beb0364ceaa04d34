/* qcbt: the digest index beside each backup (backup-NNNN.dgi).
 *
 * The guest digest (digest.h) is a sum over sectors, so the disk cut into
 * 64 KiB granules has a contribution per granule, and an incremental
 * backup's new sum is the previous one plus, for every granule it writes,
 * the granule's new contribution less its old one.  The index of a backup
 * lists the contribution of every granule that backup wrote; the old
 * contribution of a granule is then found as qcow2 finds a cluster: in the
 * newest backup of the chain whose index lists it, or zero when the chain
 * reaches its full backup without one listing it.  So an incremental
 * reads the earlier backups' indexes, not their data.
 *
 * Layout (big-endian), DGI_HEADER_SIZE bytes of header then blocks of
 * DGI_BLOCK_SIZE bytes (the last one shorter):
 *
 *   header: magic "QCBTDGI1", be32 version (1), be32 granule bits (16),
 *           be64 virtual size, be64 record count, 16 bytes: the backup's
 *           running digest sum (binds the index to its manifest entry),
 *           be64 0, be64 XXH64 of the 56 bytes before it;
 *   block:  up to DGI_BLOCK_RECORDS records, then be32 records in it,
 *           be32 0, be64 XXH64 of the records (seed: the block's index);
 *   record: be64 key, 16 bytes value.  Key bit 63 clear: granule KEY has
 *           contribution VALUE (high 64 bits first).  Key bit 63 set: the
 *           VALUE's low 64 bits of granules from KEY's granule on all
 *           contribute zero (a run).  Records ascend and never overlap.
 *
 * 24 bytes per granule of data written (0.037 % of it), less for runs of
 * zeros; a file is at least the header and one block trailer.  An index
 * is written beside the backup's partial file, made durable, renamed and
 * recorded in the manifest with the backup (the same commit point); one
 * that is missing, truncated, of another size or sum, or fails a checksum
 * is not used: the granules it would have answered for are read back.
 */
#ifndef QCBT_CLIENT_DIGEST_INDEX_H
#define QCBT_CLIENT_DIGEST_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define DGI_GRANULE_BITS  16
#define DGI_GRANULE       (1u << DGI_GRANULE_BITS)
#define DGI_HEADER_SIZE   64u
#define DGI_RECORD_SIZE   24u
#define DGI_TRAILER_SIZE  16u
#define DGI_BLOCK_RECORDS 170u
#define DGI_BLOCK_SIZE    (DGI_BLOCK_RECORDS * DGI_RECORD_SIZE + DGI_TRAILER_SIZE)
#define DGI_SUFFIX        ".dgi"
#define DGI_KEY_RUN       (1ULL << 63)

typedef unsigned __int128 dgi_u128;

/* ---- writing ------------------------------------------------------------ */

struct dgi_writer;

/* Create PATH (replacing it) for a disk of SIZE bytes.  Returns 0 or
 * -errno with a message.
 */
int dgi_writer_open(const char *path, uint64_t size, struct dgi_writer **out);

/* Granule G (greater than any given before) contributes V.  Runs of zero
 * contributions become one record.  Returns 0 or -errno.
 */
int dgi_writer_add(struct dgi_writer *w, uint64_t g, dgi_u128 v);

/* Write what is buffered and the header with SUM, fdatasync and close.
 * The writer is freed either way.  Returns 0 or -errno.
 */
int dgi_writer_finish(struct dgi_writer *w, dgi_u128 sum);

/* Close and free without finishing (the caller removes the file). */
void dgi_writer_abort(struct dgi_writer *w);

/* ---- reading through a chain of backups --------------------------------- */

struct dgi_chain;

/* An empty chain for a disk of SIZE bytes; backups are added newest
 * first.  Returns NULL (with a message) when out of memory.
 */
struct dgi_chain *dgi_chain_new(uint64_t size);

/* Add the index PATH of the next older backup, whose manifest records the
 * running sum SUMHEX (NULL: none) and which is a full backup when FULL.
 * PATH NULL, or an index that cannot be used, makes every granule not
 * found in a newer backup unknown; WHY (WHY_LEN bytes) then says why, and
 * the function returns 0; otherwise WHY is "".  Returns -ENOMEM only.
 */
int dgi_chain_add(struct dgi_chain *c,
                  const char *path,
                  const char *sumhex,
                  bool full,
                  char *why,
                  size_t why_len);

/* The old contribution of granule G, which must be greater than any
 * asked before: 1 and *V when the indexes know it, 0 when the granule must
 * be read back (an index missing or found broken: the first time one is,
 * dgi_chain_broken() says so).
 */
int dgi_chain_lookup(struct dgi_chain *c, uint64_t g, dgi_u128 *v);

/* An index found broken by a lookup and not reported yet: its file and
 * what is wrong, in WHY; false when there is none.
 */
bool dgi_chain_broken(struct dgi_chain *c, char *why, size_t why_len);

/* Bytes of index read so far. */
uint64_t dgi_chain_bytes_read(const struct dgi_chain *c);

void dgi_chain_free(struct dgi_chain *c);

#endif /* QCBT_CLIENT_DIGEST_INDEX_H */

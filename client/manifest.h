/* qcbt: the backup directory's manifest.json.
 *
 * One disk per directory.  Each backup is a qcow2 file; a full one stands
 * alone, an incremental one has the previous backup as its backing file
 * (relative name), so the newest file is the disk at that time.  The
 * manifest is replaced atomically (write, fsync, rename, fsync dir) and
 * only after the backup file itself is complete and durable.
 */
#ifndef QCBT_CLIENT_MANIFEST_H
#define QCBT_CLIENT_MANIFEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MANIFEST_NAME    "manifest.json"
#define MANIFEST_FORMAT  "qcbt-backup-manifest"
#define MANIFEST_VERSION 1

struct backup_entry {
    char *file; /* "backup-0003.qcow2" */
    char *type; /* "full" / "incremental" / "differential" (its
                   backing file is an older backup than the
                   previous one: qcbt import of virtnbdbackup
                   differentials) */
    /* The checkpoint of this backup: the one whose bitmap holds the
     * changes after it, which the next --auto run starts from (the
     * bitmap it copied changes since, a full backup's granted one, or
     * the checkpoint --checkpoint created), and its meta context.
     */
    char *checkpoint;   /* bitmap name, or NULL */
    char *context;      /* meta context, or NULL */
    char *since;        /* an incremental's meta context of the changes it
                           copied, or NULL (manifests before it: NULL) */
    char *uri;          /* source URI, or NULL for a local image */
    char *source_image; /* the local image backed up (absolute), or NULL */
    char *export_name;
    char *time;         /* ISO 8601 UTC */
    char *backing;      /* previous file, or NULL */
    char *guest_digest; /* see digest.h, or NULL */
    char *digest_sum;   /* its running sum (hex), for the next backup */
    char *digest_index; /* its digest index file (digest-index.h), or NULL */
    uint64_t size;      /* virtual size */
    uint64_t data_bytes, zero_bytes, extents, requests;
    double seconds;
};

struct manifest {
    size_t nr;
    struct backup_entry *backups;
};

/* Load DIR/manifest.json.  A missing manifest is an empty one.  Returns 0
 * or -errno with a message (a corrupt manifest is an error, not "empty").
 */
int manifest_load(const char *dir, struct manifest *m);

/* The manifest's temporary file, written before a backup's commit point. */
#define MANIFEST_TMP_NAME "." MANIFEST_NAME ".tmp"

/* Write M to DIR/.manifest.json.tmp and fsync it.  On failure the
 * temporary file is removed.  The old manifest is untouched either way.
 */
int manifest_prepare(const char *dir, const struct manifest *m);

/* Rename DIR/.manifest.json.tmp over DIR/manifest.json and fsync DIR:
 * the commit point of a backup.
 */
int manifest_commit(const char *dir);

/* Test-only fault injection, for tests/interop/test-backup-errors.sh:
 * true when the environment variable QCBT_TEST_FAIL_AT equals POINT.
 * The points (see docs/semantics.md): "manifest-enospc" (manifest_prepare
 * fails as on a file system without free inodes), "kill-before-rename"
 * and "kill-before-commit" (backup raises SIGKILL just before renaming
 * the finished file, and just before saving the manifest),
 * "kill-before-index-rename" (after renaming the finished file, before
 * renaming its digest index), "index-enospc" (the digest index cannot be
 * made durable); for a local image (local-source.h): "kill-server",
 * "stop-after-connect", "stop-before-checkpoint", "checkpoint-eio",
 * "checkpoint-eio-manifest".
 */
bool manifest_test_fault(const char *point);

/* Append a copy of E (strings duplicated). */
int manifest_append(struct manifest *m, const struct backup_entry *e);

void manifest_free(struct manifest *m);

#endif /* QCBT_CLIENT_MANIFEST_H */

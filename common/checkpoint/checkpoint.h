/* qcbt: checkpoints over a backing chain (DESIGN.md "The merge engine";
 * the decisions in docs/semantics.md "Checkpoints").
 *
 * One persistent bitmap per checkpoint, as libvirt models them: checkpoint
 * X is a bitmap named X created enabled in the top layer, and every
 * checkpoint records at once; "the changes since X" are X merged over the
 * chain by the merge engine.  Overlays created after X hold a same-named
 * bitmap (snapshot propagation), so X may live in several layers.
 *
 * Namespaces let several consumers share a disk: the namespace of a name
 * is everything before its last '/' ("vendorA/daily-7" is in "vendorA",
 * "a/b/c" in "a/b"), a name without '/' is in the default namespace "".
 * Namespaces do not nest: rotating "a" never touches "a/b/x".
 *
 * The command-line front end (client/cmd-checkpoint.c) only parses and
 * prints; everything that decides is here, for backup --checkpoint and
 * snapshot to share.
 */
#ifndef QCBT_CHECKPOINT_H
#define QCBT_CHECKPOINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chain.h"

/* ------------------------------------------------------------------ */
/* Names and namespaces */

/* A name a checkpoint may be created with: a qcow2 bitmap name (1..1023
 * bytes of UTF-8, no NUL), no control characters, and when it has a
 * namespace, no empty part: no leading or trailing '/', no "//".
 * Returns 0 or -EINVAL with a message ("checkpoint name '...': ...").
 */
int checkpoint_name_check(const char *name);

/* A namespace as --namespace takes it: "" (the default namespace), or
 * what checkpoint_name_check() allows before a name's last '/'.  Returns
 * 0 or -EINVAL with a message.
 */
int checkpoint_namespace_check(const char *ns);

/* The length of NAME's namespace: the bytes before its last '/' (0: the
 * default namespace).  Any string has one, valid or not.
 */
size_t checkpoint_namespace_len(const char *name);

/* NAME is in exactly namespace NS (not in one nested below it). */
bool checkpoint_in_namespace(const char *name, const char *ns);

/* ------------------------------------------------------------------ */
/* Listing */

struct checkpoint_info {
    char *name;           /* as stored in the image (untrusted text) */
    size_t ns_len;        /* name[0..ns_len) is its namespace */
    size_t created;       /* the oldest (deepest) layer that holds it */
    size_t nr_holding;    /* how many layers hold it */
    bool *held;           /* [layer]: the layer holds it */
    bool in_top, enabled; /* held by layer 0; recording there (auto) */
    uint64_t granularity; /* of the merged bitmap (usable), else of the
                             topmost bitmap named so */
    /* The merge engine's answer for publishing (tolerant mode, the
     * default of every front end): a usable checkpoint gives an
     * incremental backup.  A checkpoint disabled in the top layer does not
     * record writes any more and is not usable either.
     */
    bool usable;
    char reason[480];     /* why not usable */
    uint64_t dirty_bytes; /* usable: set bits x granularity, clipped to
                             the disk */
    bool strict;          /* libvirt's rules hold (strict merge usable) */
    char strict_reason[480];
    size_t nr_notes; /* sound but worth knowing: layers that contribute
                        their allocation map, bitmaps disabled below
                        the top, granularities that differ */
    char **notes;
};

struct checkpoint_list {
    size_t nr; /* in creation order: by the layer of creation, oldest
                  first, then in that layer's bitmap directory order */
    struct checkpoint_info *cps;
    size_t nr_layers;
    /* Per layer: why its bitmaps cannot be used ("" when they can): an
     * unreadable directory, bitmaps written by a program unaware of them.
     */
    char (*layer_errors)[320];
};

/* The checkpoints of chain C (only those of namespace NS unless NULL),
 * each with its health; with HEALTH false only names and layers (no
 * merge: fast, for rotation).  Returns 0 and *out (checkpoint_list_free)
 * or -errno with a message.
 */
int checkpoint_list(struct chain *c,
                    const char *ns,
                    bool health,
                    struct checkpoint_list **out);
void checkpoint_list_free(struct checkpoint_list *l);

/* ------------------------------------------------------------------ */
/* Changing checkpoints */

/* What a change did, for the caller to report. */
struct checkpoint_result {
    size_t nr_layers_changed; /* delete: layers NAME was removed from */
    size_t nr_deleted;        /* create with keep: checkpoints rotated */
    char **deleted;           /* their names, oldest first */
};

void checkpoint_result_free(struct checkpoint_result *r);

/* What creating checkpoint NAME in the top layer of the open chain C
 * needs: a valid NAME, a qcow2 version 3 top, and no layer of C holding
 * NAME (a layer whose bitmap directory cannot be read is an error: it
 * might).  Returns 0 or -errno with a one-line message.
 */
int checkpoint_check_new(struct chain *c, const char *name);

/* Add checkpoint NAME to the top layer of C, which the caller opened
 * read-write and holds with the WRITE lock, after checkpoint_check_new():
 * an empty, enabled persistent bitmap of granularity 2^GBITS (0: the
 * default).  For callers that keep the chain open and locked across other
 * work (backup --checkpoint).  Returns 0 or -errno with a message.
 */
int checkpoint_add(struct chain *c, const char *name, unsigned gbits);

/* Create checkpoint NAME in IMAGE (a qcow2 file, the top of its chain): an
 * empty, enabled persistent bitmap of granularity 2^GBITS (0: QEMU's
 * default for IMAGE's cluster size, qcow2_bitmap_default_gbits()).  IMAGE
 * is opened read-write with QEMU's WRITE lock before anything is read (a
 * running QEMU holding it is refused); NAME must be valid and held by no
 * layer of the chain.  With KEEP > 0, then delete the oldest checkpoints
 * of NAME's namespace until KEEP remain (rotation; a failure there says
 * the new checkpoint exists).
 * COPTS: allow_data_file and max_depth are used; locks as above.
 * Returns 0 or -errno with a one-line message.
 */
int checkpoint_create(const char *image,
                      const char *name,
                      unsigned gbits,
                      size_t keep,
                      const struct chain_open_opts *copts,
                      struct checkpoint_result *res);

/* Delete checkpoint NAME from every layer of IMAGE's chain that holds it,
 * the top first (a partial delete leaves a sound, if coarser, checkpoint:
 * the layers above the deepest still holding it contribute their
 * allocation).  Each layer is opened read-write with the WRITE lock; a
 * failure names the layer.  A layer that no longer holds NAME is skipped,
 * so a rerun finishes an interrupted delete; NAME in no layer is -ENOENT.
 */
int checkpoint_delete(const char *image,
                      const char *name,
                      const struct chain_open_opts *copts,
                      struct checkpoint_result *res);

#endif /* QCBT_CHECKPOINT_H */

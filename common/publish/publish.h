/* qcbt: publishing a chain's merged bitmaps (DESIGN.md "The merge
 * engine", "Persistence transform and aliases").
 *
 * The rules every front end that hands bitmaps on shares (qcbt-server's
 * qemu:dirty-bitmap:ALIAS contexts, the nbdkit plugin's and filter's
 * dirty view, qcbt convert, backup of a local image): which bitmaps are
 * asked for (NAME or NAME=ALIAS), how each is merged (strict or tolerant),
 * when one
 * that cannot be used refuses the whole request and when it is only
 * skipped (with every bitmap of the chain), and the text of every notice
 * the user is shown.  Front ends parse their arguments, call
 * publish_run() and print what it returns; none of them decides.
 *
 * Every text here is one line with no control characters: names from
 * images and from the command line are escaped (qcbt_sanitize()).
 */
#ifndef QCBT_PUBLISH_H
#define QCBT_PUBLISH_H

#include <stdbool.h>
#include <stddef.h>

#include "chain.h"
#include "merge.h"

/* The longest bitmap name in a qcow2 image (qcow2.txt "Bitmap directory":
 * name_size <= 1023), hence the longest NAME that can be found.
 */
#define PUBLISH_NAME_MAX 1023

/* One requested bitmap: NAME in the chain, published as ALIAS. */
struct publish_spec {
    const char *name;
    const char *alias; /* NULL: published as NAME */
    char *buf;         /* owned storage of a parsed spec, or NULL */
};

/* Parse ARG, "NAME" or "NAME=ALIAS": the first '=' ends NAME, so NAME has
 * none and ALIAS may hold more.  Neither part may be empty.  On success
 * OUT owns a copy (free with publish_spec_free()).  Returns 0, -EINVAL
 * with "invalid bitmap argument 'ARG' (NAME or NAME=ALIAS)" or -ENOMEM.
 */
int publish_spec_parse(const char *arg, struct publish_spec *out);
void publish_spec_free(struct publish_spec *s);

struct publish_opts {
    enum merge_mode mode;
    /* Also publish every bitmap of the chain, once, under its own name
     * (layer by layer from the top, in directory order) after the
     * requested ones.  Then a bitmap that cannot be used is skipped with
     * a notice instead of refusing the request.
     */
    bool all_bitmaps;
    size_t alias_max; /* longest alias in bytes; 0: PUBLISH_NAME_MAX */
};

struct publish_bitmap {
    char *name;                 /* the bitmap in the chain */
    char *alias;                /* the name it is published under */
    struct merge_result *merge; /* usable; owned */
};

enum publish_notice_kind {
    /* Tolerant mode: a layer contributes its allocation map.  Text:
     * "bitmap 'X': layer N (PATH) contributes its allocation map: WHY".
     */
    PUBLISH_NOTICE_FALLBACK,
    /* all_bitmaps: a bitmap left out, and why. */
    PUBLISH_NOTICE_SKIPPED,
};

struct publish_notice {
    enum publish_notice_kind kind;
    char *text; /* one line, no prefix, no trailing newline */
};

struct publish_set {
    size_t nr_bitmaps; /* in publishing order: as requested, then all */
    struct publish_bitmap *bitmaps;
    size_t nr_notices; /* in the order they arose */
    struct publish_notice *notices;
    /* Why the request is refused ("bitmap 'X' cannot be used (MODE
     * mode): WHY"), or NULL when everything requested is published.
     * Bitmaps after the refused one were not tried.
     */
    char *error;
};

/* Publish SPECS[0..NR) (and, with all_bitmaps, the rest of CHAIN's
 * bitmaps).  The specs are checked first, before any merge: NAME at most
 * PUBLISH_NAME_MAX bytes, ALIAS at most O->alias_max, both UTF-8 and not
 * empty, no alias twice; a bad one is -EINVAL with its message.  Then
 * returns 0 and *OUT, whose error says whether the request stands; the
 * notices gathered up to a refusal are in *OUT too, to be shown before it.
 * -ENOMEM (message set, *OUT NULL).  The chain must outlive the set.
 */
int publish_run(struct chain *chain,
                const struct publish_spec *specs,
                size_t nr,
                const struct publish_opts *o,
                struct publish_set **out);

void publish_set_free(struct publish_set *set);

#endif /* QCBT_PUBLISH_H */

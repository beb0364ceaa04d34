/* qcbt-server: exports (a chain and its published bitmaps), built once at
 * start and immutable afterwards, so connections share them without locks.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "internal.h"
#include "nbd-protocol.h"
#include "publish.h"

/* The bitmaps' meta contexts: qemu:dirty-bitmap:ALIAS, each an NBD
 * string (at most NBD_MAX_STRING bytes).
 */
#define CONTEXT_PREFIX "qemu:dirty-bitmap:"

static int
publish_bitmaps(struct export *exp)
{
    struct publish_opts po = {
        .mode = exp->strict ? MERGE_STRICT : MERGE_TOLERANT,
        .all_bitmaps = exp->all_bitmaps,
        .alias_max = NBD_MAX_STRING - strlen(CONTEXT_PREFIX),
    };
    struct publish_spec *specs;
    struct publish_set *set = NULL;
    size_t i, n = 0;
    int r = 0;

    specs = calloc(exp->nr_bitmap_args + 1, sizeof *specs);
    if (!specs)
        return qcbt_error(ENOMEM, "out of memory");
    for (; n < exp->nr_bitmap_args && r == 0; n++)
        r = publish_spec_parse(exp->bitmap_args[n], &specs[n]);
    if (r == 0) {
        r = publish_run(exp->chain, specs, n, &po, &set);
        if (r < 0 && r != -ENOMEM)
            r = qcbt_error_prefix(-r, "export '%s'", exp->name);
    }
    for (i = 0; i < n; i++)
        publish_spec_free(&specs[i]);
    free(specs);
    if (r < 0)
        return r;

    for (i = 0; i < set->nr_notices; i++)
        fprintf(stderr,
                set->notices[i].kind == PUBLISH_NOTICE_FALLBACK
                    ? "qcbt-server: warning: export '%s', %s\n"
                    : "qcbt-server: warning: export '%s': %s (skipped)\n",
                exp->name,
                set->notices[i].text);
    exp->published = set;
    if (set->error)
        return qcbt_error(EINVAL, "export '%s': %s", exp->name, set->error);

    exp->bitmaps = calloc(set->nr_bitmaps + 1, sizeof *exp->bitmaps);
    if (!exp->bitmaps)
        return qcbt_error(ENOMEM, "out of memory");
    for (i = 0; i < set->nr_bitmaps; i++) {
        struct export_bitmap *b = &exp->bitmaps[i];

        if (asprintf(&b->context, CONTEXT_PREFIX "%s", set->bitmaps[i].alias) <
            0) {
            b->context = NULL;
            return qcbt_error(ENOMEM, "out of memory");
        }
        b->merge = set->bitmaps[i].merge;
        exp->nr_bitmaps++;
    }
    return 0;
}

int
export_open(struct export *exp, int verbose)
{
    /* The image locks qemu-nbd -r takes: a chain another process writes
     * (a running VM) is refused, since a backup of it would be
     * inconsistent, and writers are kept out while it is served.
     */
    struct chain_open_opts copts = {
        .format = exp->format,
        .lock = exp->force_share ? QCBT_IO_LOCK_SHARED : QCBT_IO_LOCK_READ,
        .force_share_option = "-U/--force-share",
    };
    int r;

    chain_opts_from_env(&copts);
    r = chain_open(exp->image, &copts, &exp->chain);
    if (r < 0)
        return r;
    /* QEMU exports whole sectors. */
    exp->size = exp->chain->size & ~511ULL;

    r = publish_bitmaps(exp);
    if (r == 0 && verbose)
        fprintf(stderr,
                "qcbt-server: export '%s': %s, %llu bytes, %zu "
                "bitmap context(s)\n",
                exp->name,
                exp->image,
                (unsigned long long)exp->size,
                exp->nr_bitmaps);
    return r;
}

void
export_close(struct export *exp)
{
    size_t i;

    for (i = 0; i < exp->nr_bitmaps; i++)
        free(exp->bitmaps[i].context);
    free(exp->bitmaps);
    exp->bitmaps = NULL;
    exp->nr_bitmaps = 0;
    publish_set_free(exp->published);
    exp->published = NULL;
    chain_close(exp->chain);
    exp->chain = NULL;
}

struct export *
server_find_export(struct server *srv, const char *name, size_t len)
{
    size_t i;

    for (i = 0; i < srv->nr_exports; i++)
        if (strlen(srv->exports[i].name) == len &&
            memcmp(srv->exports[i].name, name, len) == 0)
            return &srv->exports[i];
    return NULL;
}

uint32_t
export_nr_contexts(const struct export *exp)
{
    return CTX_BITMAP_FIRST + exp->nr_bitmaps;
}

const char *
export_context_name(const struct export *exp, uint32_t id)
{
    if (id == CTX_BASE_ALLOCATION)
        return "base:allocation";
    if (id == CTX_ALLOCATION_DEPTH)
        return exp->alloc_depth ? "qemu:allocation-depth" : NULL;
    if (id - CTX_BITMAP_FIRST < exp->nr_bitmaps)
        return exp->bitmaps[id - CTX_BITMAP_FIRST].context;
    return NULL;
}

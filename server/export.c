/* qcbt-server: exports (a chain and its published bitmaps), built once at
 * start and immutable afterwards, so connections share them without locks.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "internal.h"

static int
add_bitmap(struct export *exp,
           struct merge_ctx *ctx,
           const char *source,
           const char *alias,
           bool skip_bad)
{
    struct merge_opts mo = {.mode =
                                exp->strict ? MERGE_STRICT : MERGE_TOLERANT};
    struct merge_result *res = NULL;
    struct export_bitmap *b;
    size_t i, len;
    char *context;
    int r;

    len = strlen("qemu:dirty-bitmap:") + strlen(alias);
    if (len > 4096)
        return qcbt_error(EINVAL, "bitmap alias '%.40s...' too long", alias);
    context = malloc(len + 1);
    if (!context)
        return qcbt_error(ENOMEM, "out of memory");
    snprintf(context, len + 1, "qemu:dirty-bitmap:%s", alias);
    for (i = 0; i < exp->nr_bitmaps; i++) {
        if (strcmp(exp->bitmaps[i].context, context) == 0) {
            int r2 = skip_bad ? 0
                              : qcbt_error(EINVAL,
                                           "export '%s': context %s "
                                           "published twice",
                                           exp->name,
                                           context);
            free(context);
            return r2;
        }
    }

    r = merge_run(ctx, source, &mo, &res);
    if (r < 0) {
        free(context);
        return r;
    }
    if (!res->usable) {
        r = qcbt_error(EINVAL,
                       "export '%s': bitmap '%s' cannot be "
                       "published: %s",
                       exp->name,
                       source,
                       res->error);
        merge_result_free(res);
        free(context);
        return r;
    }
    for (i = 0; i < res->nr_layers; i++) {
        const char *path = exp->chain->layers[i].path;
        char esc[1024]; /* the path comes from a backing file name */

        if (res->layers[i].source == MERGE_SRC_ALLOCATION)
            fprintf(stderr,
                    "qcbt-server: warning: export '%s', bitmap "
                    "'%s': layer %zu (%s) contributes its allocation map: "
                    "%s\n",
                    exp->name,
                    source,
                    i,
                    qcbt_escape(esc, sizeof esc, path, strlen(path)),
                    res->layers[i].reason);
    }

    b = realloc(exp->bitmaps, (exp->nr_bitmaps + 1) * sizeof *b);
    if (!b) {
        merge_result_free(res);
        free(context);
        return qcbt_error(ENOMEM, "out of memory");
    }
    exp->bitmaps = b;
    b = &exp->bitmaps[exp->nr_bitmaps++];
    b->source = strdup(source);
    b->context = context;
    b->merge = res;
    if (!b->source)
        return qcbt_error(ENOMEM, "out of memory");
    return 0;
}

/* Every bitmap name found in any layer of the chain, once. */
static int
add_all_bitmaps(struct export *exp, struct merge_ctx *ctx)
{
    size_t li, k, j;
    int r;

    for (li = 0; li < exp->chain->nr_layers; li++) {
        const struct qcow2_bitmap_list *bl;

        r = merge_ctx_layer_bitmaps(ctx, li, &bl);
        if (r < 0)
            return r;
        for (k = 0; k < bl->nr; k++) {
            const char *name = bl->bitmaps[k].name;
            bool seen = false;

            for (j = 0; j < exp->nr_bitmaps; j++)
                if (strcmp(exp->bitmaps[j].source, name) == 0)
                    seen = true;
            if (seen)
                continue;
            r = add_bitmap(exp, ctx, name, name, true);
            if (r == -ENOMEM)
                return r;
            if (r < 0)
                fprintf(stderr,
                        "qcbt-server: warning: %s (skipped)\n",
                        qcbt_error_get());
        }
    }
    return 0;
}

int
export_open(struct export *exp, int verbose)
{
    struct chain_open_opts copts = {.format = exp->format};
    struct merge_ctx *ctx = NULL;
    size_t i;
    int r;

    chain_opts_from_env(&copts);
    r = chain_open(exp->image, &copts, &exp->chain);
    if (r < 0)
        return r;
    /* QEMU exports whole sectors. */
    exp->size = exp->chain->size & ~511ULL;

    r = merge_ctx_new(exp->chain, &ctx);
    if (r < 0)
        return r;
    for (i = 0; i < exp->nr_bitmap_args; i++) {
        char *arg = strdup(exp->bitmap_args[i]);
        char *eq;

        if (!arg) {
            r = qcbt_error(ENOMEM, "out of memory");
            break;
        }
        eq = strchr(arg, '=');
        if (eq)
            *eq++ = '\0';
        if (!arg[0] || (eq && !eq[0])) {
            r = qcbt_error(EINVAL,
                           "invalid bitmap argument '%s' (NAME or "
                           "NAME=ALIAS)",
                           exp->bitmap_args[i]);
            free(arg);
            break;
        }
        r = add_bitmap(exp, ctx, arg, eq ? eq : arg, exp->all_bitmaps);
        free(arg);
        if (r < 0 && (r == -ENOMEM || !exp->all_bitmaps))
            break;
        if (r < 0)
            fprintf(stderr,
                    "qcbt-server: warning: %s (skipped)\n",
                    qcbt_error_get());
        r = 0;
    }
    if (r == 0 && exp->all_bitmaps)
        r = add_all_bitmaps(exp, ctx);
    merge_ctx_free(ctx);
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

    for (i = 0; i < exp->nr_bitmaps; i++) {
        free(exp->bitmaps[i].source);
        free(exp->bitmaps[i].context);
        merge_result_free(exp->bitmaps[i].merge);
    }
    free(exp->bitmaps);
    exp->bitmaps = NULL;
    exp->nr_bitmaps = 0;
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

/* qcbt: publishing a chain's merged bitmaps. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "publish.h"
#include "utf8.h"

int
publish_spec_parse(const char *arg, struct publish_spec *out)
{
    char *buf, *eq;

    memset(out, 0, sizeof *out);
    buf = strdup(arg);
    if (!buf)
        return qcbt_error(ENOMEM, "out of memory");
    eq = strchr(buf, '=');
    if (eq)
        *eq++ = '\0';
    if (!buf[0] || (eq && !eq[0])) {
        free(buf);
        return qcbt_error(EINVAL,
                          "invalid bitmap argument '%s' (NAME or "
                          "NAME=ALIAS)",
                          arg);
    }
    out->buf = buf;
    out->name = buf;
    out->alias = eq;
    return 0;
}

void
publish_spec_free(struct publish_spec *s)
{
    if (s) {
        free(s->buf);
        memset(s, 0, sizeof *s);
    }
}

/* A set of names: a sorted array of pointers (the strings belong to
 * others), so that a chain with many bitmaps costs O(n log n) lookups.
 */
struct nameset {
    const char **v;
    size_t n, cap;
};

/* Where NAME is or would go in S; *found says which. */
static size_t
nameset_pos(const struct nameset *s, const char *name, bool *found)
{
    size_t lo = 0, hi = s->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(s->v[mid], name);

        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

static bool
nameset_has(const struct nameset *s, const char *name)
{
    bool found;

    nameset_pos(s, name, &found);
    return found;
}

/* Add NAME (kept by pointer) unless it is there.  0 or -ENOMEM. */
static int
nameset_add(struct nameset *s, const char *name)
{
    bool found;
    size_t pos = nameset_pos(s, name, &found);

    if (found)
        return 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 16;
        const char **v = realloc(s->v, cap * sizeof *v);

        if (!v)
            return qcbt_error(ENOMEM, "out of memory");
        s->v = v;
        s->cap = cap;
    }
    memmove(s->v + pos + 1, s->v + pos, (s->n - pos) * sizeof *s->v);
    s->v[pos] = name;
    s->n++;
    return 0;
}

static void
nameset_free(struct nameset *s)
{
    free(s->v);
    memset(s, 0, sizeof *s);
}

static const char *
spec_alias(const struct publish_spec *s)
{
    return s->alias ? s->alias : s->name;
}

/* The specs as a whole, before anything is merged. */
static int
check_specs(const struct publish_spec *specs,
            size_t nr,
            const struct publish_opts *o)
{
    size_t alias_max = o->alias_max ? o->alias_max : PUBLISH_NAME_MAX;
    struct nameset aliases = {0};
    size_t i, j;
    int r = 0;

    for (i = 0; i < nr && r == 0; i++) {
        const char *name = specs[i].name, *alias = spec_alias(&specs[i]);

        if (!name || !name[0])
            r = qcbt_error(EINVAL, "empty bitmap name");
        else if (!alias[0])
            r = qcbt_error(EINVAL, "empty alias for bitmap '%s'", name);
        else if (strlen(name) > PUBLISH_NAME_MAX)
            r = qcbt_error(EINVAL, "bitmap name '%.40s...' too long", name);
        else if (strlen(alias) > alias_max)
            r = qcbt_error(EINVAL, "bitmap alias '%.40s...' too long", alias);
        else if (!utf8_valid((const unsigned char *)name, strlen(name)))
            r = qcbt_error(EINVAL, "bitmap name '%s' is not UTF-8", name);
        else if (!utf8_valid((const unsigned char *)alias, strlen(alias)))
            r = qcbt_error(EINVAL, "bitmap alias '%s' is not UTF-8", alias);
        else if (nameset_has(&aliases, alias)) {
            for (j = 0; strcmp(spec_alias(&specs[j]), alias) != 0; j++)
                ;
            if (strcmp(specs[j].name, name) == 0)
                r = qcbt_error(EINVAL,
                               "bitmap '%s' is published twice as '%s'",
                               name,
                               alias);
            else
                r = qcbt_error(EINVAL,
                               "bitmaps '%s' and '%s' are both published "
                               "as '%s'",
                               specs[j].name,
                               name,
                               alias);
        } else
            r = nameset_add(&aliases, alias);
    }
    nameset_free(&aliases);
    return r;
}

/* The state of one publish_run(). */
struct run {
    struct chain *chain;
    const struct publish_opts *o;
    struct merge_ctx *ctx;
    struct publish_set *set;
    struct nameset tried;     /* names merged (or skipped) so far */
    struct nameset published; /* aliases published so far */
};

static char *vformat(const char *fmt, va_list ap)
    __attribute__((format(printf, 1, 0)));

/* A one-line text without control characters, or NULL (out of memory). */
static char *
vformat(const char *fmt, va_list ap)
{
    char *s;

    if (vasprintf(&s, fmt, ap) < 0)
        return NULL;
    return qcbt_sanitize(s);
}

/* Append a notice of TEXT (owned from now on, freed on error; NULL: out
 * of memory).  0 or -ENOMEM.
 */
static int
push_notice(struct run *run, enum publish_notice_kind kind, char *text)
{
    struct publish_set *set = run->set;
    struct publish_notice *n;

    n = text ? realloc(set->notices, (set->nr_notices + 1) * sizeof *n) : NULL;
    if (!n) {
        free(text);
        return qcbt_error(ENOMEM, "out of memory");
    }
    set->notices = n;
    n[set->nr_notices].kind = kind;
    n[set->nr_notices].text = text;
    set->nr_notices++;
    return 0;
}

static int
add_notice(struct run *run, enum publish_notice_kind kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int
add_notice(struct run *run, enum publish_notice_kind kind, const char *fmt, ...)
{
    va_list ap;
    char *text;

    va_start(ap, fmt);
    text = vformat(fmt, ap);
    va_end(ap);
    return push_notice(run, kind, text);
}

static int refuse_or_skip(struct run *run, bool skip, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A bitmap that cannot be published: with SKIP a notice, otherwise the
 * refusal of the whole request.  0 or -ENOMEM.
 */
static int
refuse_or_skip(struct run *run, bool skip, const char *fmt, ...)
{
    va_list ap;
    char *text;

    va_start(ap, fmt);
    text = vformat(fmt, ap);
    va_end(ap);
    if (skip)
        return push_notice(run, PUBLISH_NOTICE_SKIPPED, text);
    run->set->error = text;
    return text ? 0 : qcbt_error(ENOMEM, "out of memory");
}

static const char *
mode_name(enum merge_mode mode)
{
    return mode == MERGE_STRICT ? "strict" : "tolerant";
}

/* Merge NAME and publish it as ALIAS, or refuse (skip) it.  0 or
 * -ENOMEM.
 */
static int
publish_one(struct run *run, const char *name, const char *alias, bool skip)
{
    struct merge_opts mo = {.mode = run->o->mode};
    struct publish_set *set = run->set;
    struct merge_result *res = NULL;
    struct publish_bitmap *b;
    size_t i;
    int r;

    r = merge_run(run->ctx, name, &mo, &res);
    if (r == -ENOMEM)
        return r;
    if (r < 0)
        return refuse_or_skip(run, skip, "%s", qcbt_error_get());
    if (!res->usable) {
        r = refuse_or_skip(run,
                           skip,
                           "bitmap '%s' cannot be used (%s mode): %s",
                           name,
                           mode_name(mo.mode),
                           res->error);
        merge_result_free(res);
        return r;
    }
    for (i = 0; i < res->nr_layers; i++) {
        if (res->layers[i].source != MERGE_SRC_ALLOCATION)
            continue;
        r = add_notice(run,
                       PUBLISH_NOTICE_FALLBACK,
                       "bitmap '%s': layer %zu (%s) contributes its "
                       "allocation map: %s",
                       name,
                       i,
                       run->chain->layers[i].path,
                       res->layers[i].reason);
        if (r < 0) {
            merge_result_free(res);
            return r;
        }
    }

    b = realloc(set->bitmaps, (set->nr_bitmaps + 1) * sizeof *b);
    if (!b) {
        merge_result_free(res);
        return qcbt_error(ENOMEM, "out of memory");
    }
    set->bitmaps = b;
    b = &set->bitmaps[set->nr_bitmaps];
    b->name = strdup(name);
    b->alias = strdup(alias);
    b->merge = res;
    set->nr_bitmaps++;
    if (!b->name || !b->alias)
        return qcbt_error(ENOMEM, "out of memory");
    return nameset_add(&run->published, b->alias);
}

/* Every bitmap name of the chain not tried yet, under its own name. */
static int
publish_all(struct run *run)
{
    size_t li, k, j;
    int r;

    for (li = 0; li < run->chain->nr_layers; li++) {
        const struct qcow2_bitmap_list *bl;

        r = merge_ctx_layer_bitmaps(run->ctx, li, &bl);
        if (r < 0)
            return r;
        for (k = 0; k < bl->nr; k++) {
            const char *name = bl->bitmaps[k].name;

            if (nameset_has(&run->tried, name))
                continue;
            r = nameset_add(&run->tried, name);
            if (r < 0)
                return r;
            if (nameset_has(&run->published, name)) {
                for (j = 0; strcmp(run->set->bitmaps[j].alias, name); j++)
                    ;
                r = add_notice(run,
                               PUBLISH_NOTICE_SKIPPED,
                               "bitmap '%s': its name is taken by the "
                               "alias of bitmap '%s'",
                               name,
                               run->set->bitmaps[j].name);
            } else
                r = publish_one(run, name, name, true);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

int
publish_run(struct chain *chain,
            const struct publish_spec *specs,
            size_t nr,
            const struct publish_opts *o,
            struct publish_set **out)
{
    struct run run = {.chain = chain, .o = o};
    size_t i;
    int r;

    *out = NULL;
    r = check_specs(specs, nr, o);
    if (r < 0)
        return r;
    run.set = calloc(1, sizeof *run.set);
    if (!run.set)
        return qcbt_error(ENOMEM, "out of memory");
    r = merge_ctx_new(chain, &run.ctx);
    for (i = 0; r == 0 && i < nr && !run.set->error; i++) {
        r = nameset_add(&run.tried, specs[i].name);
        if (r == 0)
            r = publish_one(&run,
                            specs[i].name,
                            spec_alias(&specs[i]),
                            o->all_bitmaps);
    }
    if (r == 0 && !run.set->error && o->all_bitmaps)
        r = publish_all(&run);
    merge_ctx_free(run.ctx);
    nameset_free(&run.tried);
    nameset_free(&run.published);
    if (r < 0) {
        publish_set_free(run.set);
        return r;
    }
    *out = run.set;
    return 0;
}

void
publish_set_free(struct publish_set *set)
{
    size_t i;

    if (!set)
        return;
    for (i = 0; i < set->nr_bitmaps; i++) {
        free(set->bitmaps[i].name);
        free(set->bitmaps[i].alias);
        merge_result_free(set->bitmaps[i].merge);
    }
    for (i = 0; i < set->nr_notices; i++)
        free(set->notices[i].text);
    free(set->bitmaps);
    free(set->notices);
    free(set->error);
    free(set);
}

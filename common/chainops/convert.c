/* qcbt: squash a chain into one new qcow2 image (see convert.h). */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "convert.h"
#include "error.h"
#include "minmax.h"
#include "new-image.h"
#include "publish.h"
#include "rounding.h"

/* Guest bytes copied per step (a whole number of clusters). */
#define CONVERT_CHUNK (4u * 1024 * 1024)

static int
parse_bool(const char *arg, const char *key, const char *v, bool *out)
{
    if (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "yes"))
        *out = true;
    else if (!strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "no"))
        *out = false;
    else
        return qcbt_error(EINVAL,
                          "invalid bitmap argument '%s': %s=%s (on or off)",
                          arg,
                          key,
                          v);
    return 0;
}

int
convert_bitmap_spec_parse(const char *arg, struct convert_bitmap_spec *out)
{
    size_t len = strlen(arg), i, n = 0, nf = 0;
    char *buf = malloc(len + 2), *fields[4], *eq;
    bool seen_p = false, seen_e = false, v;
    int r = 0;

    memset(out, 0, sizeof *out);
    out->persistent = true;
    out->enabled = -1;
    if (!buf)
        return qcbt_error(ENOMEM, "out of memory");
    /* Unescape ",," and cut at single commas. */
    fields[nf++] = buf;
    for (i = 0; i < len; i++) {
        if (arg[i] == ',' && arg[i + 1] == ',') {
            buf[n++] = ',';
            i++;
        } else if (arg[i] == ',') {
            buf[n++] = '\0';
            if (nf == 3) {
                r = qcbt_error(EINVAL,
                               "invalid bitmap argument '%s': too many "
                               "options",
                               arg);
                goto out;
            }
            fields[nf++] = buf + n;
        } else
            buf[n++] = arg[i];
    }
    buf[n] = '\0';
    eq = strchr(fields[0], '=');
    if (eq)
        *eq++ = '\0';
    if (!fields[0][0] || (eq && !eq[0])) {
        r = qcbt_error(EINVAL,
                       "invalid bitmap argument '%s' "
                       "(NAME[=ALIAS][,persistent=on|off][,enabled=on|off])",
                       arg);
        goto out;
    }
    for (i = 1; i < nf; i++) {
        char *key = fields[i], *val = strchr(key, '=');

        if (!val) {
            r = qcbt_error(EINVAL,
                           "invalid bitmap argument '%s': option '%s' "
                           "needs a value (on or off)",
                           arg,
                           key);
            goto out;
        }
        *val++ = '\0';
        if (!strcmp(key, "persistent") && !seen_p) {
            seen_p = true;
            r = parse_bool(arg, key, val, &out->persistent);
        } else if (!strcmp(key, "enabled") && !seen_e) {
            seen_e = true;
            r = parse_bool(arg, key, val, &v);
            out->enabled = v;
        } else if (!strcmp(key, "persistent") || !strcmp(key, "enabled"))
            r = qcbt_error(EINVAL,
                           "invalid bitmap argument '%s': '%s' given twice",
                           arg,
                           key);
        else
            r = qcbt_error(EINVAL,
                           "invalid bitmap argument '%s': unknown option "
                           "'%s' (persistent or enabled)",
                           arg,
                           key);
        if (r < 0)
            goto out;
    }
    out->name = strdup(fields[0]);
    out->alias = eq ? strdup(eq) : NULL;
    if (!out->name || (eq && !out->alias))
        r = qcbt_error(ENOMEM, "out of memory");
out:
    free(buf);
    if (r < 0)
        convert_bitmap_spec_free(out);
    return r;
}

void
convert_bitmap_spec_free(struct convert_bitmap_spec *s)
{
    if (!s)
        return;
    free(s->name);
    free(s->alias);
    s->name = s->alias = NULL;
}

void
convert_result_free(struct convert_result *res)
{
    size_t i;

    if (!res)
        return;
    for (i = 0; i < res->nr_bitmaps; i++) {
        free(res->bitmaps[i].name);
        free(res->bitmaps[i].alias);
    }
    for (i = 0; i < res->nr_notices; i++)
        free(res->notices[i]);
    free(res->bitmaps);
    free(res->notices);
    free(res);
}

/* The recording state the merge keeps: the topmost bitmap used. */
static bool
merged_enabled(const struct merge_result *m)
{
    size_t i;

    for (i = m->top; i < m->nr_layers; i++)
        if (m->layers[i].source == MERGE_SRC_BITMAP)
            return m->layers[i].enabled;
    return true;
}

/* Merge the bitmaps asked for: RES gets the list and the notices, *SET
 * the merged bitmaps (in RES's order).  A refusal is -EINVAL with its
 * text.
 */
static int
merge_bitmaps(struct chain *src,
              const struct convert_opts *o,
              struct convert_result *res,
              struct publish_set **setp)
{
    struct publish_opts po = {.mode = o->mode,
                              .all_bitmaps = o->nr_specs == 0,
                              .alias_max = PUBLISH_NAME_MAX};
    struct publish_spec *specs = NULL;
    struct publish_set *set = NULL;
    size_t i;
    int r;

    *setp = NULL;
    if (o->no_bitmaps)
        return 0;
    specs = calloc(o->nr_specs ? o->nr_specs : 1, sizeof *specs);
    if (!specs)
        return qcbt_error(ENOMEM, "out of memory");
    for (i = 0; i < o->nr_specs; i++) {
        specs[i].name = o->specs[i].name;
        specs[i].alias = o->specs[i].alias;
    }
    r = publish_run(src, specs, o->nr_specs, &po, &set);
    free(specs);
    if (r < 0)
        return r;
    res->notices =
        calloc(set->nr_notices ? set->nr_notices : 1, sizeof *res->notices);
    res->bitmaps =
        calloc(set->nr_bitmaps ? set->nr_bitmaps : 1, sizeof *res->bitmaps);
    if (!res->notices || !res->bitmaps) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    for (i = 0; i < set->nr_notices; i++) {
        res->notices[i] = strdup(set->notices[i].text);
        if (!res->notices[i]) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        res->nr_notices++;
    }
    if (set->error) {
        r = qcbt_error(EINVAL, "%s", set->error);
        goto out;
    }
    for (i = 0; i < set->nr_bitmaps; i++) {
        const struct publish_bitmap *pb = &set->bitmaps[i];
        struct convert_bitmap *b = &res->bitmaps[i];
        const struct convert_bitmap_spec *sp =
            i < o->nr_specs ? &o->specs[i] : NULL;

        res->nr_bitmaps++;
        b->name = strdup(pb->name);
        b->alias = strdup(pb->alias);
        if (!b->name || !b->alias) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        b->granularity = pb->merge->bm->granularity;
        b->enabled =
            sp && sp->enabled >= 0 ? sp->enabled : merged_enabled(pb->merge);
        b->persistent = sp ? sp->persistent : true;
        b->dirty_bytes = bitmap_dirty_bytes(pb->merge->bm);
    }
    *setp = set;
    set = NULL;
out:
    publish_set_free(set);
    return r;
}

static bool
all_zero(const unsigned char *p, size_t len)
{
    return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
}

/* Copy the guest data: per chunk, the ranges the chain holds as data are
 * read, and each run of clusters that is not all zeros is written.
 */
static int
stopped(const struct convert_opts *o, const char *dst)
{
    if (o->stop && *o->stop)
        return qcbt_error(EINTR, "%s: interrupted: removed", dst);
    return 0;
}

static int
copy_data(struct chain *src,
          struct qcow2_writer *w,
          uint32_t cs,
          const struct convert_opts *o,
          const char *dst,
          struct convert_result *res)
{
    size_t chunk = MAX((size_t)cs, (size_t)CONVERT_CHUNK);
    unsigned char *buf = malloc(chunk);
    uint64_t off, size = src->size;
    int r = 0;

    if (!buf)
        return qcbt_error(ENOMEM, "out of memory");
    for (off = 0; r == 0 && off < size; off += chunk) {
        uint64_t len = MIN((uint64_t)chunk, size - off), pos, c, run;
        bool any = false;

        r = stopped(o, dst);

        for (pos = 0; r == 0 && pos < len;) {
            struct chain_status st;

            r = chain_block_status(src, off + pos, len - pos, &st);
            if (r < 0)
                break;
            if (st.len == 0 || st.len > len - pos)
                st.len = len - pos;
            if (st.present && !st.zero) {
                r = chain_read(src, buf + pos, st.len, off + pos);
                any = true;
            } else
                memset(buf + pos, 0, st.len);
            pos += st.len;
        }
        if (r < 0 || !any)
            continue;
        /* Runs of clusters holding a non-zero byte. */
        for (c = 0; r == 0 && c < len; c += run) {
            uint64_t n = MIN((uint64_t)cs, len - c);

            run = n;
            if (all_zero(buf + c, n))
                continue;
            while (c + run < len &&
                   !all_zero(buf + c + run, MIN((uint64_t)cs, len - c - run)))
                run += MIN((uint64_t)cs, len - c - run);
            r = qcow2_writer_write(w, buf + c, run, off + c);
            res->data_bytes += run;
        }
    }
    free(buf);
    return r;
}

int
convert_run(struct chain *src,
            const char *dst_path,
            const struct convert_opts *o,
            struct convert_result **out)
{
    struct chain_layer *top = &src->layers[0];
    struct qcow2_writer_opts wo = {0};
    struct convert_result *res;
    struct publish_set *set = NULL;
    struct new_image *ni = NULL;
    struct qcow2_writer *w = NULL;
    struct new_image_reserve rv = {0};
    size_t i;
    int r;

    *out = NULL;
    if (o->no_bitmaps && o->nr_specs)
        return qcbt_error(EINVAL, "bitmap specs given with no bitmaps");
    res = calloc(1, sizeof *res);
    if (!res)
        return qcbt_error(ENOMEM, "out of memory");
    res->size = src->size;
    res->cluster_size = top->qcow2 ? (uint32_t)top->qcow2->cluster_size
                                   : QCOW2_WRITER_DEFAULT_CLUSTER_SIZE;
    /* Merge first: a refusal leaves no file behind. */
    r = merge_bitmaps(src, o, res, &set);
    if (r < 0)
        goto fail;

    rv.size = res->size;
    rv.cluster_size = res->cluster_size;
    for (i = 0; i < res->nr_bitmaps; i++)
        if (res->bitmaps[i].persistent)
            new_image_reserve_bitmap(&rv,
                                     res->bitmaps[i].alias,
                                     res->bitmaps[i].granularity);
    wo.size = res->size;
    wo.cluster_size = res->cluster_size;
    wo.refcount_reserve = new_image_reserve_total(&rv);

    r = new_image_create(dst_path, &ni);
    if (r < 0)
        goto fail;
    r = new_image_writer(ni, &wo, &w);
    if (r == 0) {
        r = copy_data(src, w, res->cluster_size, o, dst_path, res);
        if (r < 0)
            qcow2_writer_abort(w);
        else
            r = qcow2_writer_close(w);
    }
    if (r == 0)
        r = new_image_open(ni);
    for (i = 0; r == 0 && i < res->nr_bitmaps; i++) {
        const struct convert_bitmap *b = &res->bitmaps[i];

        r = stopped(o, dst_path);
        if (r == 0 && b->persistent)
            r = new_image_add_bitmap(ni,
                                     b->alias,
                                     (unsigned)__builtin_ctzll(b->granularity),
                                     b->enabled,
                                     set->bitmaps[i].merge->bm);
    }
    if (r < 0) {
        new_image_discard(ni);
        goto fail;
    }
    r = new_image_finish(ni);
    if (r < 0)
        goto fail;
    publish_set_free(set);
    *out = res;
    return 0;
fail:
    publish_set_free(set);
    convert_result_free(res);
    return r;
}

/* qcbt: checkpoints over a backing chain. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "error.h"
#include "merge.h"
#include "minmax.h"
#include "qcow2-bitmaps.h"
#include "qcow2-format.h"
#include "qcow2-store.h"
#include "utf8.h"

/* ------------------------------------------------------------------ */
/* Names and namespaces */

/* The '/'-separated parts of S[0..LEN) are not empty, and S holds no
 * control character (C0, DEL, C1): a checkpoint name ends up in logs,
 * file names and XML of the tools around us.
 */
static int
check_text(const char *what, const char *s, size_t len)
{
    char shown[80];
    size_t i = 0, n;
    uint32_t cp;

    qcbt_escape(shown, sizeof shown, s, len);
    while (i < len) {
        n = utf8_decode((const unsigned char *)s + i, len - i, &cp);
        if (n == 0 || cp == 0)
            return qcbt_error(EINVAL,
                              "%s '%s': not valid UTF-8 without NUL bytes",
                              what,
                              shown);
        if (cp < 0x20 || (cp >= 0x7f && cp < 0xa0))
            return qcbt_error(EINVAL,
                              "%s '%s': control characters are not allowed",
                              what,
                              shown);
        i += n;
    }
    if (len && (s[0] == '/' || s[len - 1] == '/' || memmem(s, len, "//", 2)))
        return qcbt_error(EINVAL,
                          "%s '%s': an empty namespace part (a leading or "
                          "trailing '/', or '//')",
                          what,
                          shown);
    return 0;
}

int
checkpoint_name_check(const char *name)
{
    size_t len = strlen(name);

    if (len == 0 || len > QCOW2_BME_MAX_NAME_SIZE)
        return qcbt_error(EINVAL,
                          "checkpoint name of %zu bytes: 1 to %d allowed",
                          len,
                          QCOW2_BME_MAX_NAME_SIZE);
    return check_text("checkpoint name", name, len);
}

int
checkpoint_namespace_check(const char *ns)
{
    size_t len = strlen(ns);

    if (len >= QCOW2_BME_MAX_NAME_SIZE)
        return qcbt_error(EINVAL,
                          "namespace of %zu bytes: at most %d allowed",
                          len,
                          QCOW2_BME_MAX_NAME_SIZE - 2);
    return check_text("namespace", ns, len);
}

size_t
checkpoint_namespace_len(const char *name)
{
    const char *slash = strrchr(name, '/');

    return slash ? (size_t)(slash - name) : 0;
}

bool
checkpoint_in_namespace(const char *name, const char *ns)
{
    size_t n = checkpoint_namespace_len(name);

    return strlen(ns) == n && memcmp(name, ns, n) == 0;
}

/* ------------------------------------------------------------------ */
/* Listing */

void
checkpoint_list_free(struct checkpoint_list *l)
{
    size_t i, j;

    if (!l)
        return;
    for (i = 0; i < l->nr; i++) {
        free(l->cps[i].name);
        free(l->cps[i].held);
        for (j = 0; j < l->cps[i].nr_notes; j++)
            free(l->cps[i].notes[j]);
        free(l->cps[i].notes);
    }
    free(l->cps);
    free(l->layer_errors);
    free(l);
}

/* One bitmap of one layer, for grouping the chain's bitmaps by name. */
struct entry {
    const char *name;
    size_t layer, idx;
    const struct qcow2_bitmap_info *bi;
    size_t start, count; /* the name's group in the sorted entries */
};

static int
cmp_entry_name(const void *pa, const void *pb)
{
    const struct entry *a = pa, *b = pb;
    int c = strcmp(a->name, b->name);

    if (c)
        return c;
    /* The oldest layer first: its entry says where the name was created. */
    if (a->layer != b->layer)
        return a->layer > b->layer ? -1 : 1;
    return a->idx < b->idx ? -1 : a->idx > b->idx;
}

/* Creation order: the oldest layer of creation first, then its
 * directory order.
 */
static int
cmp_entry_created(const void *pa, const void *pb)
{
    const struct entry *a = pa, *b = pb;

    if (a->layer != b->layer)
        return a->layer > b->layer ? -1 : 1;
    return a->idx < b->idx ? -1 : a->idx > b->idx;
}

static int add_note(struct checkpoint_info *ci, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int
add_note(struct checkpoint_info *ci, const char *fmt, ...)
{
    char buf[600];
    char **n;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    qcbt_sanitize(buf);
    n = realloc(ci->notes, (ci->nr_notes + 1) * sizeof *n);
    if (!n)
        return qcbt_error(ENOMEM, "out of memory");
    ci->notes = n;
    n[ci->nr_notes] = strdup(buf);
    if (!n[ci->nr_notes])
        return qcbt_error(ENOMEM, "out of memory");
    ci->nr_notes++;
    return 0;
}

static const struct qcow2_bitmap_info *
find_in(const struct qcow2_bitmap_list *bl, const char *name)
{
    size_t k;

    for (k = 0; k < bl->nr; k++)
        if (strcmp(bl->bitmaps[k].name, name) == 0)
            return &bl->bitmaps[k];
    return NULL;
}

/* The health of CI: the merge engine's tolerant answer (what every front
 * end publishes), strict derived from it (strict refuses exactly where
 * tolerant falls back), then the checkpoint's own rule: it must record in
 * the top layer.
 */
static int
judge(struct chain *c, struct merge_ctx *ctx, struct checkpoint_info *ci)
{
    struct merge_opts mo = {.mode = MERGE_TOLERANT};
    struct merge_result *res = NULL;
    const struct qcow2_bitmap_list *bl;
    const struct qcow2_bitmap_info *bi;
    size_t i;
    int r;

    r = merge_run(ctx, ci->name, &mo, &res);
    if (r < 0)
        return r;
    ci->usable = res->usable;
    if (!res->usable) {
        snprintf(ci->reason, sizeof ci->reason, "%s", res->error);
        snprintf(ci->strict_reason, sizeof ci->strict_reason, "%s", res->error);
        merge_result_free(res);
        return 0;
    }
    ci->granularity = res->bm->granularity;
    ci->dirty_bytes = bitmap_dirty_bytes(res->bm);
    ci->strict = res->nr_fallbacks == 0;
    for (i = 0; i <= res->deepest && r == 0; i++) {
        const struct merge_layer *ml = &res->layers[i];

        if (ml->source == MERGE_SRC_ALLOCATION) {
            r = add_note(ci,
                         "layer %zu (%s) contributes its allocation map: %s",
                         i,
                         c->layers[i].path,
                         ml->reason);
            if (ci->strict_reason[0] == '\0')
                snprintf(ci->strict_reason,
                         sizeof ci->strict_reason,
                         "layer %zu (%s): %s",
                         i,
                         c->layers[i].path,
                         ml->reason);
        } else if (ml->source == MERGE_SRC_BITMAP) {
            if (ml->granularity != ci->granularity)
                r = add_note(ci,
                             "layer %zu (%s) has granularity %" PRIu64
                             ", merged conservatively into %" PRIu64,
                             i,
                             c->layers[i].path,
                             ml->granularity,
                             ci->granularity);
            if (r == 0 && !ml->enabled && i > 0)
                r = add_note(ci,
                             "disabled in layer %zu (%s): writes made "
                             "there after it was disabled are missing",
                             i,
                             c->layers[i].path);
        }
    }
    merge_result_free(res);
    if (r < 0)
        return r;
    qcbt_sanitize(ci->strict_reason);
    if (ci->in_top && !ci->enabled) {
        ci->usable = false;
        snprintf(ci->reason,
                 sizeof ci->reason,
                 "disabled in the top layer (%s): it does not record "
                 "writes",
                 c->layers[0].path);
        qcbt_sanitize(ci->reason);
    }
    if (!ci->usable) {
        /* The granularity it would have: its topmost bitmap's. */
        for (i = 0; i < c->nr_layers; i++) {
            if (!ci->held[i] || merge_ctx_layer_bitmaps(ctx, i, &bl) < 0)
                continue;
            bi = find_in(bl, ci->name);
            if (bi && bi->granularity_bits < 64) {
                ci->granularity = 1ULL << bi->granularity_bits;
                break;
            }
        }
    }
    return 0;
}

static int
list_in(struct chain *c,
        struct merge_ctx *ctx,
        const char *ns,
        bool health,
        struct checkpoint_list *out)
{
    struct entry *all = NULL, *firsts = NULL;
    size_t nr_all = 0, nr_first = 0, li, k, i, j;
    const struct qcow2_bitmap_list *bl;
    int r = 0;

    for (li = 0; li < c->nr_layers; li++) {
        r = merge_ctx_layer_bitmaps(ctx, li, &bl);
        if (r < 0)
            return r;
        if (bl->reason[0]) {
            snprintf(out->layer_errors[li],
                     sizeof out->layer_errors[li],
                     "%s",
                     bl->reason);
            qcbt_sanitize(out->layer_errors[li]);
        }
        nr_all += bl->nr;
    }
    all = calloc(nr_all ? nr_all : 1, sizeof *all);
    firsts = calloc(nr_all ? nr_all : 1, sizeof *firsts);
    if (!all || !firsts) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    nr_all = 0;
    for (li = 0; li < c->nr_layers; li++) {
        merge_ctx_layer_bitmaps(ctx, li, &bl);
        for (k = 0; k < bl->nr; k++)
            if (!ns || checkpoint_in_namespace(bl->bitmaps[k].name, ns))
                all[nr_all++] = (struct entry){.name = bl->bitmaps[k].name,
                                               .layer = li,
                                               .idx = k,
                                               .bi = &bl->bitmaps[k]};
    }
    /* Group by name (never a quadratic search: a hostile chain may hold
     * 65535 bitmaps per layer); each group's first entry is its oldest.
     */
    qsort(all, nr_all, sizeof *all, cmp_entry_name);
    for (i = 0; i < nr_all; i++) {
        if (i == 0 || strcmp(all[i].name, all[i - 1].name) != 0) {
            firsts[nr_first] = all[i];
            firsts[nr_first++].start = i;
        }
        firsts[nr_first - 1].count++;
    }
    qsort(firsts, nr_first, sizeof *firsts, cmp_entry_created);

    out->cps = calloc(nr_first ? nr_first : 1, sizeof *out->cps);
    if (!out->cps) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    for (i = 0; i < nr_first; i++) {
        struct checkpoint_info *ci = &out->cps[i];
        const struct qcow2_bitmap_info *bi;

        ci->name = strdup(firsts[i].name);
        ci->held = calloc(c->nr_layers, sizeof *ci->held);
        out->nr++;
        if (!ci->name || !ci->held) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        ci->ns_len = checkpoint_namespace_len(ci->name);
        ci->created = firsts[i].layer;
        /* The group runs from the oldest layer up: its last entry is the
         * topmost copy.
         */
        for (j = firsts[i].start; j < firsts[i].start + firsts[i].count; j++) {
            bi = all[j].bi;
            if (!ci->held[all[j].layer])
                ci->nr_holding++;
            ci->held[all[j].layer] = true;
            if (all[j].layer == 0) {
                ci->in_top = true;
                ci->enabled = bi->flags & QCOW2_BME_FLAG_AUTO;
            }
            if (bi->granularity_bits < 64)
                ci->granularity = 1ULL << bi->granularity_bits;
        }
        if (health) {
            r = judge(c, ctx, ci);
            if (r < 0)
                goto out;
        }
    }
out:
    free(all);
    free(firsts);
    return r;
}

int
checkpoint_list(struct chain *c,
                const char *ns,
                bool health,
                struct checkpoint_list **out)
{
    struct checkpoint_list *l = calloc(1, sizeof *l);
    struct merge_ctx *ctx = NULL;
    int r;

    *out = NULL;
    if (l)
        l->layer_errors = calloc(c->nr_layers, sizeof *l->layer_errors);
    if (!l || !l->layer_errors) {
        checkpoint_list_free(l);
        return qcbt_error(ENOMEM, "out of memory");
    }
    l->nr_layers = c->nr_layers;
    r = merge_ctx_new(c, &ctx);
    if (r == 0)
        r = list_in(c, ctx, ns, health, l);
    merge_ctx_free(ctx);
    if (r < 0) {
        checkpoint_list_free(l);
        return r;
    }
    *out = l;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Changing checkpoints */

void
checkpoint_result_free(struct checkpoint_result *r)
{
    size_t i;

    if (!r)
        return;
    for (i = 0; i < r->nr_deleted; i++)
        free(r->deleted[i]);
    free(r->deleted);
    memset(r, 0, sizeof *r);
}

/* IMAGE's chain for reading bitmap directories, without locks: the
 * writes that follow take QEMU's WRITE lock on the files they change, and
 * this process may already hold it on the top (a second lock of ours on
 * another descriptor would conflict with it).
 */
static int
open_scan(const char *image,
          const struct chain_open_opts *copts,
          struct chain **c)
{
    struct chain_open_opts o = {0};

    if (copts) {
        o.max_depth = copts->max_depth;
        o.allow_data_file = copts->allow_data_file;
    }
    o.lock = QCBT_IO_LOCK_NONE;
    return chain_open(image, &o, c);
}

/* Does IMG's bitmap directory name NAME?  1, 0, or -errno with WHY set
 * when the directory cannot be walked (a bitmap of that name may hide
 * there).  Names only, through the format layer: unlike
 * qcow2_bitmaps_load() it does not check where the bitmaps' clusters lie
 * against every L2 table, which on a large image costs more than the
 * change itself (bench/bench-bitmap-write.sh); the change that follows
 * loads and checks the layer it writes.
 */
static int
dir_holds(struct qcow2_image *img, const char *name, char *why, size_t whylen)
{
    struct qcow2_bitmaps_found found;
    const struct qcow2_bitmaps_ext *ext = &found.ext;
    struct qcow2_bitmap_dir_entry e;
    size_t len = strlen(name);
    uint64_t pos = 0;
    unsigned char *dir;
    uint32_t i;
    int r;

    qcow2_get_bitmaps_found(img, &found);
    if (!found.present)
        return 0;
    if (found.ext_len != QCOW2_BITMAPS_EXT_SIZE) {
        snprintf(why, whylen, "bitmaps extension of the wrong length");
        return -EINVAL;
    }
    r = qcow2_bitmaps_ext_check(ext, img->cluster_size, img->io->size);
    if (r < 0) {
        snprintf(why, whylen, "%s", qcbt_error_get());
        return r;
    }
    /* The check bounds the directory (64 MiB at most). */
    dir = malloc(ext->bitmap_directory_size);
    if (!dir)
        return qcbt_error(ENOMEM, "out of memory");
    r = qcbt_io_read_exact(img->io,
                           dir,
                           ext->bitmap_directory_size,
                           ext->bitmap_directory_offset,
                           false,
                           "bitmap directory");
    for (i = 0; r == 0 && i < ext->nb_bitmaps; i++) {
        r = qcow2_bitmap_dir_entry_decode(dir + pos,
                                          ext->bitmap_directory_size - pos,
                                          &e);
        if (r < 0)
            break;
        if (e.name_size == len && memcmp(e.name, name, len) == 0) {
            free(dir);
            return 1;
        }
        pos += qcow2_bitmap_dir_entry_size(&e);
        if (pos > ext->bitmap_directory_size) {
            r = qcbt_error(EINVAL, "bitmap directory entries overrun it");
            break;
        }
    }
    free(dir);
    if (r < 0) {
        snprintf(why, whylen, "%s", qcbt_error_get());
        return r;
    }
    return 0;
}

/* Layer LI of C holds NAME: 1, 0, or -errno naming the layer. */
static int
layer_holds(struct chain *c, size_t li, const char *name)
{
    char why[400];
    int r;

    if (!c->layers[li].qcow2)
        return 0;
    why[0] = '\0';
    r = dir_holds(c->layers[li].qcow2, name, why, sizeof why);
    if (r == -ENOMEM)
        return r;
    if (r < 0)
        return qcbt_error(-r,
                          "layer %zu (%s): bitmap directory unreadable (%s): "
                          "cannot tell whether it holds '%s'",
                          li,
                          c->layers[li].path,
                          why,
                          name);
    return r;
}

struct held_layer {
    size_t layer;
    char *path;
    dev_t dev;
    ino_t ino;
};

/* Remove NAME from one layer: opened read-write, WRITE-locked, the same
 * file the scan saw.  Returns 1 removed, 0 not there (any more), -errno.
 */
static int
remove_from(const struct held_layer *h, const char *name)
{
    struct qcbt_io *io = NULL;
    struct qcow2_image *img = NULL;
    int r;

    r = qcbt_io_open_file_rw(h->path, &io);
    if (r < 0)
        return r;
    r = qcbt_io_lock(io, QCBT_IO_LOCK_WRITE);
    if (r < 0) {
        qcbt_io_free(io);
        return r;
    }
    if (io->dev != h->dev || io->ino != h->ino) {
        qcbt_io_free(io);
        return qcbt_error(ESTALE,
                          "%s: replaced by another file while deleting",
                          h->path);
    }
    r = qcow2_open(io, &img); /* owns io */
    if (r < 0)
        return r;
    r = qcow2_bitmap_modify(img, QCOW2_BITMAP_REMOVE, name, 0, false);
    qcow2_close(img);
    if (r == -ENOENT) {
        /* Not there any more: a rerun after an interrupted delete. */
        qcbt_error_clear();
        return 0;
    }
    return r < 0 ? r : 1;
}

int
checkpoint_delete(const char *image,
                  const char *name,
                  const struct chain_open_opts *copts,
                  struct checkpoint_result *res)
{
    struct chain *c = NULL;
    struct held_layer *held = NULL;
    size_t nr_held = 0, li, i;
    int r;

    r = open_scan(image, copts, &c);
    if (r < 0)
        return r;
    held = calloc(c->nr_layers, sizeof *held);
    if (!held)
        r = qcbt_error(ENOMEM, "out of memory");
    /* Every layer is looked at before any is changed: a directory that
     * cannot be read refuses the delete with nothing done.
     */
    for (li = 0; r == 0 && li < c->nr_layers; li++) {
        if (!c->layers[li].qcow2)
            continue;
        r = layer_holds(c, li, name);
        if (r == 1) {
            held[nr_held] = (struct held_layer){li,
                                                strdup(c->layers[li].path),
                                                c->layers[li].io->dev,
                                                c->layers[li].io->ino};
            if (!held[nr_held++].path)
                r = qcbt_error(ENOMEM, "out of memory");
            else
                r = 0;
        }
    }
    chain_close(c);
    if (r == 0 && nr_held == 0)
        r = qcbt_error(ENOENT,
                       "checkpoint '%s' not found in any layer of %s",
                       name,
                       image);
    /* Top first: whatever is left after a failure is a sound
     * checkpoint (the layers above contribute their allocation).
     */
    for (i = 0; r == 0 && i < nr_held; i++) {
        r = remove_from(&held[i], name);
        if (r < 0)
            r = qcbt_error_prefix(-r,
                                  "layer %zu (%s)%s",
                                  held[i].layer,
                                  held[i].path,
                                  i ? " (the layers above no longer hold "
                                      "the checkpoint; run delete again)"
                                    : "");
        else if (r == 1) {
            res->nr_layers_changed++;
            r = 0;
        }
    }
    for (i = 0; i < nr_held; i++)
        free(held[i].path);
    free(held);
    return r < 0 ? r : 0;
}

/* Delete the oldest checkpoints of namespace NS of IMAGE until KEEP
 * remain; their names go to RES.
 */
static int
rotate(const char *image,
       const char *ns,
       size_t keep,
       const struct chain_open_opts *copts,
       struct checkpoint_result *res)
{
    struct chain *c = NULL;
    struct checkpoint_list *l = NULL;
    size_t i;
    int r;

    r = open_scan(image, copts, &c);
    if (r < 0)
        return r;
    r = checkpoint_list(c, ns, false, &l);
    chain_close(c);
    if (r < 0)
        return r;
    if (l->nr > keep) {
        res->deleted = calloc(l->nr - keep, sizeof *res->deleted);
        if (!res->deleted)
            r = qcbt_error(ENOMEM, "out of memory");
    }
    for (i = 0; r == 0 && i + keep < l->nr; i++) {
        struct checkpoint_result one = {0};

        r = checkpoint_delete(image, l->cps[i].name, copts, &one);
        if (r < 0)
            break;
        res->deleted[res->nr_deleted] = strdup(l->cps[i].name);
        if (!res->deleted[res->nr_deleted])
            r = qcbt_error(ENOMEM, "out of memory");
        else
            res->nr_deleted++;
    }
    checkpoint_list_free(l);
    return r;
}

int
checkpoint_check_new(struct chain *c, const char *name)
{
    size_t li;
    int r;

    r = checkpoint_name_check(name);
    if (r < 0)
        return r;
    if (!c->layers[0].qcow2)
        return qcbt_error(ENOTSUP,
                          "%s: a %s image cannot hold checkpoints (qcow2 "
                          "only)",
                          c->layers[0].path,
                          chain_fmt_name(c->layers[0].fmt));
    if (c->layers[0].qcow2->hdr.version < 3)
        return qcbt_error(ENOTSUP,
                          "%s: a qcow2 version 2 image cannot hold "
                          "checkpoints (bitmaps need version 3)",
                          c->layers[0].path);
    for (li = 0; li < c->nr_layers; li++) {
        r = layer_holds(c, li, name);
        if (r == 1)
            return qcbt_error(EEXIST,
                              "checkpoint '%s' already exists (layer %zu: %s)",
                              name,
                              li,
                              c->layers[li].path);
        if (r < 0)
            return r;
    }
    return 0;
}

int
checkpoint_add(struct chain *c, const char *name, unsigned gbits)
{
    struct qcow2_image *top = c->layers[0].qcow2;
    int r;

    if (!top)
        return qcbt_error(ENOTSUP,
                          "%s: not a qcow2 image: cannot hold checkpoints",
                          c->layers[0].path);
    /* gbits 0: qcow2_bitmap_default_gbits() */
    r = qcow2_bitmap_modify(top, QCOW2_BITMAP_ADD, name, gbits, false);
    if (r == -EEXIST)
        r = qcbt_error(EEXIST,
                       "checkpoint '%s' already exists (layer 0: %s)",
                       name,
                       c->layers[0].path);
    return r;
}

int
checkpoint_create(const char *image,
                  const char *name,
                  unsigned gbits,
                  size_t keep,
                  const struct chain_open_opts *copts,
                  struct checkpoint_result *res)
{
    struct qcbt_io *io = NULL;
    struct qcow2_image *img = NULL;
    struct chain *c = NULL;
    char *ns = NULL;
    int r;

    r = checkpoint_name_check(name);
    if (r < 0)
        return r;
    ns = strndup(name, checkpoint_namespace_len(name));
    if (!ns)
        return qcbt_error(ENOMEM, "out of memory");

    /* The WRITE lock before a byte is read: a running QEMU is refused
     * first, and nothing changes the top between the checks and the add.
     */
    r = qcbt_io_open_file_rw(image, &io);
    if (r == 0)
        r = qcbt_io_lock(io, QCBT_IO_LOCK_WRITE);
    if (r == 0)
        r = open_scan(image, copts, &c);
    if (r == 0)
        r = checkpoint_check_new(c, name);
    chain_close(c);
    if (r < 0) {
        qcbt_io_free(io);
        free(ns);
        return r;
    }
    r = qcow2_open(io, &img); /* owns io */
    if (r == 0)
        r = qcow2_bitmap_modify(img,
                                QCOW2_BITMAP_ADD,
                                name,
                                gbits, /* 0: qcow2_bitmap_default_gbits */
                                false);
    qcow2_close(img);
    if (r == -EEXIST)
        r = qcbt_error(EEXIST,
                       "checkpoint '%s' already exists (layer 0: %s)",
                       name,
                       image);
    if (r == 0 && keep > 0) {
        r = rotate(image, ns, keep, copts, res);
        if (r < 0)
            r = qcbt_error_prefix(-r,
                                  "checkpoint '%s' created, but rotating "
                                  "namespace '%s' failed",
                                  name,
                                  ns);
    }
    free(ns);
    return r;
}

/* qcbt import: turn a virtnbdbackup backup set into a qcbt backup
 * directory (a chain of qcow2 files and a manifest), so the history a user
 * made with virtnbdbackup carries over.
 *
 * What a set holds (virtnbdbackup 1.9.15): per disk one full backup,
 * DISK.full.data (or DISK.copy.data, made from a shut-off domain without a
 * checkpoint), incrementals DISK.inc.CHECKPOINT.data and differentials
 * DISK.diff.TIMESTAMP.data (sparse streams, see vnb.h), the checkpoint
 * list DOMAIN.cpt (a JSON list of checkpoint names, oldest first) and
 * checkpoints/CHECKPOINT.xml.  A full backup creates checkpoint
 * virtnbdbackup.0, each incremental the next one and holds what changed
 * since its parentCheckpoint; a differential holds what changed since its
 * parentCheckpoint and creates none.  An incremental made while the domain
 * was shut off has checkpointName == parentCheckpoint: it too holds the
 * changes since that checkpoint and creates none.
 *
 * So every backup but the full one has a base: the backup that created
 * its parentCheckpoint.  Each becomes a qcow2 file whose backing file is
 * its base's file; the manifest lists them by time.
 *
 * Nothing is left behind on failure: the directory is built under a
 * temporary name beside DIR and renamed to DIR only when every stream has
 * been read whole (every frame, length and LZ4 checksum checked) and every
 * file written, closed and checked against the digest of the stream's
 * data.
 */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "chain.h"
#include "digest.h"
#include "error.h"
#include "json.h"
#include "json-out.h"
#include "manifest.h"
#include "qcbt.h"
#include "qcow2-writer.h"
#include "vnb.h"
#include "vnb-import.h"

/* A set with more files than this is not one we were made for. */
#define IMPORT_MAX_FILES 100000
#define CPT_MAX_BYTES    (16u << 20)

/* What a fatal signal must remove (vnb_signal_cleanup()): the directory
 * being built (or the temporary one restore and verify read), the first
 * sig_nr backup files in it, its manifests, and with sig_parent its
 * parent too.  Set before each file is created; sig_nr < 0: nothing.
 */
static char sig_dir[4096];
static volatile sig_atomic_t sig_nr = -1;
static volatile sig_atomic_t sig_parent;

static void
sig_track(const char *dir, long nr, bool parent)
{
    sig_nr = -1;
    if (!dir || strlen(dir) >= sizeof sig_dir - 32)
        return; /* too long to clean up from a handler */
    strcpy(sig_dir, dir);
    sig_parent = parent;
    sig_nr = nr;
}

/* Async-signal-safe: unlink, rmdir and plain byte copies only. */
void
vnb_signal_cleanup(void)
{
    static const char *const names[] = {MANIFEST_NAME, MANIFEST_TMP_NAME};
    char p[sizeof sig_dir + 32];
    size_t n, k;
    long i, nr = sig_nr;

    if (nr < 0)
        return;
    sig_nr = -1;
    n = strlen(sig_dir);
    memcpy(p, sig_dir, n);
    p[n] = '/';
    for (i = 0; i < nr; i++) {
        /* backup-%04ld.qcow2 */
        char d[24];
        long v = i;
        int nd = 0;

        do {
            d[nd++] = (char)('0' + v % 10);
            v /= 10;
        } while (v > 0);
        while (nd < 4)
            d[nd++] = '0';
        memcpy(p + n + 1, "backup-", 7);
        for (k = 0; k < (size_t)nd; k++)
            p[n + 8 + k] = d[nd - 1 - k];
        memcpy(p + n + 8 + nd, ".qcow2", 7);
        unlink(p);
    }
    for (k = 0; k < 2; k++) {
        size_t ln = strlen(names[k]);

        memcpy(p + n + 1, names[k], ln + 1);
        unlink(p);
    }
    p[n] = '\0';
    rmdir(p);
    if (sig_parent) {
        while (n > 0 && p[n] != '/')
            n--;
        p[n] = '\0';
        if (n > 0)
            rmdir(p);
    }
}

enum level { L_FULL, L_COPY, L_INC, L_DIFF };

static const char *const level_name[] = {"full", "copy", "inc", "diff"};

struct item {
    char *name; /* file name in the set */
    enum level level;
    char *ident; /* from the name: checkpoint (inc) or timestamp (diff) */
    struct vnb_stream *s;
    long base;    /* index in the ordered list, -1 for the full backup */
    bool creates; /* creates meta.checkpoint */
    char out[48]; /* backup-NNNN.qcow2 */
    struct gdigest dg;
    uint64_t data_bytes, zero_bytes, frames;
};

struct set {
    size_t nr;
    struct item *it;
};

static void
set_free(struct set *st)
{
    size_t i;

    for (i = 0; i < st->nr; i++) {
        free(st->it[i].name);
        free(st->it[i].ident);
        vnb_close(st->it[i].s);
    }
    free(st->it);
    st->it = NULL;
    st->nr = 0;
}

/* DISK.LEVEL[.IDENT].data: the disk name and the level.  Returns false
 * for a name that is not a virtnbdbackup data file.
 */
static bool
parse_name(const char *name, char **disk, enum level *lv, char **ident)
{
    const char *dot = strchr(name, '.'), *rest, *end;
    size_t n = strlen(name);
    int i;

    if (!dot || dot == name || n < 5 || strcmp(name + n - 5, ".data") != 0)
        return false;
    rest = dot + 1;
    end = name + n - 5;
    for (i = 0; i < 4; i++) {
        size_t ln = strlen(level_name[i]);

        if ((size_t)(end - rest) < ln || strncmp(rest, level_name[i], ln))
            continue;
        if (rest + ln == end && (i == L_FULL || i == L_COPY)) {
            *ident = NULL;
        } else if (rest[ln] == '.' && rest + ln + 1 < end &&
                   (i == L_INC || i == L_DIFF)) {
            *ident = strndup(rest + ln + 1, end - (rest + ln + 1));
            if (!*ident)
                return false;
        } else {
            continue;
        }
        *disk = strndup(name, dot - name);
        if (!*disk) {
            free(*ident);
            return false;
        }
        *lv = (enum level)i;
        return true;
    }
    return false;
}

static int
cmp_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The data files of SRC, sorted; *cpt the checkpoint list's name (NULL
 * when there is none).
 */
static int
scan_dir(const char *src, char ***names, size_t *nr, char **cpt, bool quiet)
{
    DIR *d = opendir(src);
    struct dirent *de;
    char **v = NULL;
    size_t n = 0;
    int r = 0;

    *names = NULL;
    *nr = 0;
    *cpt = NULL;
    if (!d)
        return qcbt_error(errno, "%s: %s", src, strerror(errno));
    while ((de = readdir(d))) {
        size_t ln = strlen(de->d_name);
        char **nv;

        if (ln > 4 && strcmp(de->d_name + ln - 4, ".cpt") == 0) {
            if (*cpt) {
                r = qcbt_error(EINVAL,
                               "%s: more than one checkpoint list (%s, %s)",
                               src,
                               *cpt,
                               de->d_name);
                goto out;
            }
            if (!(*cpt = strdup(de->d_name))) {
                r = qcbt_error(ENOMEM, "out of memory");
                goto out;
            }
            continue;
        }
        if (ln > 13 && strcmp(de->d_name + ln - 13, ".data.partial") == 0) {
            if (!quiet)
                fprintf(stderr,
                        "qcbt: import: notice: ignoring %s (a backup that "
                        "did not finish)\n",
                        de->d_name);
            continue;
        }
        if (ln < 5 || strcmp(de->d_name + ln - 5, ".data") != 0)
            continue;
        if (n >= IMPORT_MAX_FILES) {
            r = qcbt_error(E2BIG,
                           "%s: more than %d data files",
                           src,
                           IMPORT_MAX_FILES);
            goto out;
        }
        nv = realloc(v, (n + 1) * sizeof *v);
        if (!nv || !(nv[n] = strdup(de->d_name))) {
            v = nv ? nv : v;
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        v = nv;
        n++;
    }
    qsort(v, n, sizeof *v, cmp_name);
out:
    closedir(d);
    if (r < 0) {
        while (n > 0)
            free(v[--n]);
        free(v);
        free(*cpt);
        *cpt = NULL;
        return r;
    }
    *names = v;
    *nr = n;
    return 0;
}

/* The checkpoint list: a JSON list of names. */
static int
load_cpt(const char *src, const char *name, struct json **out)
{
    char *path = path_join(src, name), *text = NULL;
    struct stat st;
    ssize_t got;
    int fd = -1, r;

    *out = NULL;
    if (!path)
        return qcbt_error(ENOMEM, "out of memory");
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) < 0) {
        r = qcbt_error(errno, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode) || st.st_size > CPT_MAX_BYTES) {
        r = qcbt_error(EINVAL,
                       "%s: not a regular file of at most 16 MiB",
                       path);
        goto out;
    }
    text = malloc(st.st_size + 1);
    if (!text) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    got = read(fd, text, st.st_size);
    if (got != st.st_size) {
        r = qcbt_error(EIO, "%s: short read", path);
        goto out;
    }
    if ((r = json_parse(text, st.st_size, out)) < 0) {
        r = qcbt_error_prefix(-r, "%s", path);
        goto out;
    }
    if ((*out)->type != JSON_ARRAY) {
        r = qcbt_error(EINVAL, "%s: not a list of checkpoint names", path);
        goto out;
    }
    for (size_t i = 0; i < (*out)->len; i++)
        if ((*out)->items[i]->type != JSON_STRING) {
            r = qcbt_error(EINVAL,
                           "%s: item %zu is not a checkpoint name",
                           path,
                           i);
            goto out;
        }
    r = 0;
out:
    if (r < 0) {
        json_free(*out);
        *out = NULL;
    }
    if (fd >= 0)
        close(fd);
    free(text);
    free(path);
    return r;
}

static int
cmp_item(const void *a, const void *b)
{
    const struct item *x = a, *y = b;
    int c;

    /* The full backup first, then by the time of the backup. */
    if ((x->level <= L_COPY) != (y->level <= L_COPY))
        return x->level <= L_COPY ? -1 : 1;
    c = strcmp(vnb_get_meta(x->s)->date, vnb_get_meta(y->s)->date);
    return c ? c : strcmp(x->name, y->name);
}

/* Read the set's metadata for DISK (NULL: the only disk), order it and
 * find each backup's base.  Checks everything that can be checked before
 * data is read.
 */
static int
load_set(const char *src, const char *disk, struct set *st, bool quiet)
{
    char **names = NULL, *cpt = NULL, *chosen = NULL;
    struct json *cl = NULL;
    size_t nr = 0, i, j, nfull = 0;
    int r = 0;

    memset(st, 0, sizeof *st);
    if ((r = scan_dir(src, &names, &nr, &cpt, quiet)) < 0)
        return r;
    st->it = calloc(nr ? nr : 1, sizeof *st->it);
    if (!st->it) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    for (i = 0; i < nr; i++) {
        struct item *it = &st->it[st->nr];
        char *dname = NULL, *path;

        if (!parse_name(names[i], &dname, &it->level, &it->ident)) {
            char shown[256];

            qcbt_escape(shown, sizeof shown, names[i], strlen(names[i]));
            r = qcbt_error(EINVAL,
                           "%s: %s is not named as virtnbdbackup names its "
                           "data files (DISK.full.data, DISK.copy.data, "
                           "DISK.inc.CHECKPOINT.data, DISK.diff.TIME.data)",
                           src,
                           shown);
            goto out;
        }
        if (disk ? strcmp(dname, disk) != 0
                 : chosen && strcmp(dname, chosen) != 0) {
            if (!disk) {
                r = qcbt_error(EINVAL,
                               "%s: holds backups of disks %s and %s: choose "
                               "one with --disk",
                               src,
                               chosen,
                               dname);
                free(dname);
                free(it->ident);
                it->ident = NULL;
                goto out;
            }
            free(dname);
            free(it->ident);
            it->ident = NULL;
            continue;
        }
        if (!chosen)
            chosen = dname;
        else
            free(dname);
        it->name = names[i];
        names[i] = NULL;
        st->nr++;
        it->base = -1;
        path = path_join(src, it->name);
        if (!path) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        r = vnb_open(path, &it->s);
        free(path);
        if (r < 0)
            goto out;
    }
    if (st->nr == 0) {
        r = disk ? qcbt_error(ENOENT, "%s: no backup of disk %s", src, disk)
                 : qcbt_error(ENOENT,
                              "%s: no virtnbdbackup data files "
                              "(*.data)",
                              src);
        goto out;
    }

    /* Each file against its name and the others. */
    for (i = 0; i < st->nr; i++) {
        struct item *it = &st->it[i];
        const struct vnb_meta *m = vnb_get_meta(it->s);

        if (strcmp(m->disk_name, chosen) != 0) {
            char shown[64];

            qcbt_escape(shown,
                        sizeof shown,
                        m->disk_name,
                        strlen(m->disk_name));
            r = qcbt_error(EINVAL,
                           "%s: its metadata names disk \"%s\", its file "
                           "name %s",
                           it->name,
                           shown,
                           chosen);
            goto out;
        }
        if (m->incremental != (it->level >= L_INC)) {
            r = qcbt_error(EINVAL,
                           "%s: metadata says %s backup, the file name "
                           "%s",
                           it->name,
                           m->incremental ? "an incremental" : "a full",
                           level_name[it->level]);
            goto out;
        }
        if (it->level == L_INC && strcmp(m->checkpoint, it->ident) != 0) {
            r = qcbt_error(EINVAL,
                           "%s: metadata names checkpoint \"%.64s\", not "
                           "the one in the file name",
                           it->name,
                           m->checkpoint);
            goto out;
        }
        if (m->virtual_size != vnb_get_meta(st->it[0].s)->virtual_size) {
            r = qcbt_error(ENOTSUP,
                           "%s: disk size %" PRIu64 " differs from %s's "
                           "%" PRIu64 " (a resized disk is not imported)",
                           it->name,
                           m->virtual_size,
                           st->it[0].name,
                           vnb_get_meta(st->it[0].s)->virtual_size);
            goto out;
        }
        if (it->level <= L_COPY)
            nfull++;
        /* A full backup creates its checkpoint, an online incremental
         * the next one; a copy, a differential and an offline
         * incremental none. */
        it->creates =
            (it->level == L_FULL && m->checkpoint[0]) ||
            (it->level == L_INC && strcmp(m->checkpoint, m->parent) != 0);
    }
    if (nfull != 1) {
        r = qcbt_error(EINVAL,
                       "%s: %s of disk %s (%s.full.data or "
                       "%s.copy.data)",
                       src,
                       nfull ? "more than one full backup" : "no full backup",
                       chosen,
                       chosen,
                       chosen);
        goto out;
    }
    qsort(st->it, st->nr, sizeof *st->it, cmp_item);

    /* Bases: the backup that created each one's parent checkpoint. */
    for (i = 1; i < st->nr; i++) {
        struct item *it = &st->it[i];
        const char *parent = vnb_get_meta(it->s)->parent;

        for (j = 0; j < st->nr; j++) {
            if (j == i || !st->it[j].creates ||
                strcmp(vnb_get_meta(st->it[j].s)->checkpoint, parent) != 0)
                continue;
            if (it->base >= 0) {
                r = qcbt_error(EINVAL,
                               "%s: two backups (%s, %s) created its parent "
                               "checkpoint \"%.64s\"",
                               it->name,
                               st->it[it->base].name,
                               st->it[j].name,
                               parent);
                goto out;
            }
            it->base = (long)j;
        }
        if (it->base < 0) {
            r = qcbt_error(ENOENT,
                           "%s: it builds on checkpoint \"%.64s\", which no "
                           "backup in %s created (a missing incremental?)",
                           it->name,
                           parent,
                           src);
            goto out;
        }
        if ((size_t)it->base > i) {
            r = qcbt_error(EINVAL,
                           "%s: its base %s is dated after it",
                           it->name,
                           st->it[it->base].name);
            goto out;
        }
    }

    /* The checkpoint list, when there is one, must be complete. */
    if (cpt) {
        if ((r = load_cpt(src, cpt, &cl)) < 0)
            goto out;
        for (j = 0; j < cl->len; j++) {
            const char *name = cl->items[j]->string;
            bool found = false;

            for (i = 0; i < st->nr && !found; i++)
                found =
                    st->it[i].creates &&
                    strcmp(vnb_get_meta(st->it[i].s)->checkpoint, name) == 0;
            if (!found) {
                r = qcbt_error(ENOENT,
                               "%s: checkpoint \"%.64s\" in %s has no backup "
                               "of disk %s (a missing incremental?)",
                               src,
                               name,
                               cpt,
                               chosen);
                goto out;
            }
        }
        for (i = 0; i < st->nr; i++) {
            const char *name = vnb_get_meta(st->it[i].s)->checkpoint;
            bool found = !st->it[i].creates;

            for (j = 0; j < cl->len && !found; j++)
                found = strcmp(cl->items[j]->string, name) == 0;
            if (!found) {
                r = qcbt_error(EINVAL,
                               "%s: its checkpoint \"%.64s\" is not in %s",
                               st->it[i].name,
                               name,
                               cpt);
                goto out;
            }
        }
    }
    for (i = 0; i < st->nr; i++)
        snprintf(st->it[i].out, sizeof st->it[i].out, "backup-%04zu.qcow2", i);
out:
    for (i = 0; i < nr; i++)
        free(names[i]);
    free(names);
    free(cpt);
    free(chosen);
    json_free(cl);
    if (r < 0)
        set_free(st);
    return r;
}

/* ---- writing one backup ------------------------------------------------- */

struct wctx {
    const struct item *it;
    struct qcow2_writer *w;
    struct chain *base; /* NULL for the full backup */
    struct gdigest *dg;
    unsigned char *scratch;
    uint64_t *data_bytes, *zero_bytes, *frames;
    uint64_t next; /* end of the last data piece: contiguous pieces are
                      one extent */
};

#define SCRATCH_LEN (1u << 20)

static int
fill_base(void *opaque, void *buf, size_t len, uint64_t offset)
{
    struct wctx *w = opaque;

    if (!w->base) {
        memset(buf, 0, len);
        return 0;
    }
    return chain_read(w->base, buf, len, offset);
}

static int
sink_data(void *opaque, const void *buf, size_t len, uint64_t offset)
{
    struct wctx *w = opaque;
    int r;

    if (w->base && (r = gdigest_sub_chain(w->dg,
                                          w->base,
                                          offset,
                                          len,
                                          w->scratch,
                                          SCRATCH_LEN)) < 0)
        return r;
    gdigest_add(w->dg, offset, buf, len);
    *w->data_bytes += len;
    if (offset != w->next || *w->frames == 0)
        (*w->frames)++;
    w->next = offset + len;
    return qcow2_writer_write(w->w, buf, len, offset);
}

static int
sink_zero(void *opaque, uint64_t offset, uint64_t len)
{
    struct wctx *w = opaque;
    int r;

    *w->zero_bytes += len;
    (*w->frames)++;
    if (!w->base)
        return 0; /* a new image without backing file reads zeros */
    if ((r = gdigest_sub_chain(w->dg,
                               w->base,
                               offset,
                               len,
                               w->scratch,
                               SCRATCH_LEN)) < 0)
        return r;
    return qcow2_writer_zero(w->w, offset, len);
}

static int
write_item(const char *tmpdir, struct set *st, size_t idx)
{
    struct item *it = &st->it[idx];
    const struct vnb_meta *m = vnb_get_meta(it->s);
    struct qcow2_writer_opts wo = {.size = m->virtual_size, .exclusive = true};
    struct chain_open_opts co = {.format = "qcow2"};
    struct wctx w = {.it = it};
    struct vnb_sink sink = {.data = sink_data, .zero = sink_zero, .opaque = &w};
    struct chain *c = NULL;
    struct gdigest check;
    char *path = path_join(tmpdir, it->out), *bpath = NULL;
    char a[DIGEST_HEX_LEN + 1], b[DIGEST_HEX_LEN + 1];
    int r;

    w.scratch = malloc(SCRATCH_LEN);
    if (!path || !w.scratch) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    if (it->base >= 0) {
        const struct item *base = &st->it[it->base];

        it->dg = base->dg;
        wo.backing_file = base->out;
        wo.backing_fmt = "qcow2";
        bpath = path_join(tmpdir, base->out);
        if (!bpath) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        if ((r = chain_open(bpath, &co, &w.base)) < 0)
            goto out;
    } else {
        gdigest_init(&it->dg, m->virtual_size);
    }
    wo.fill = fill_base;
    wo.fill_opaque = &w;
    w.dg = &it->dg;
    w.data_bytes = &it->data_bytes;
    w.zero_bytes = &it->zero_bytes;
    w.frames = &it->frames;
    if ((r = qcow2_writer_create(path, &wo, &w.w)) < 0)
        goto out;
    r = vnb_read(it->s, &sink);
    if (r < 0) {
        qcow2_writer_abort(w.w);
        goto out;
    }
    if ((r = qcow2_writer_close(w.w)) < 0)
        goto out;

    /* What we wrote must read back as what the stream said. */
    if ((r = chain_open(path, &co, &c)) < 0 ||
        (r = chain_guest_digest(c, &check, a)) < 0)
        goto out;
    gdigest_final(&it->dg, b);
    if (strcmp(a, b) != 0)
        r = qcbt_error(EIO,
                       "%s: the image written for %s reads back with digest "
                       "%s, its data has %s",
                       it->out,
                       it->name,
                       a,
                       b);
out:
    chain_close(c);
    chain_close(w.base);
    free(w.scratch);
    free(path);
    free(bpath);
    return r;
}

/* Remove TMPDIR and what we put there. */
static void
remove_tmpdir(const char *tmpdir, const struct set *st)
{
    char *p;
    size_t i;

    for (i = 0; i < st->nr; i++)
        if ((p = path_join(tmpdir, st->it[i].out))) {
            unlink(p);
            free(p);
        }
    if ((p = path_join(tmpdir, MANIFEST_NAME))) {
        unlink(p);
        free(p);
    }
    if ((p = path_join(tmpdir, MANIFEST_TMP_NAME))) {
        unlink(p);
        free(p);
    }
    rmdir(tmpdir);
}

static void
fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* The manifest's source of an imported backup: file://ABSOLUTE-PATH of
 * its stream (malloc'ed, NULL when out of memory).
 */
static char *
uri_of(const char *src, const char *name)
{
    char *abs = realpath(src, NULL), *p;
    size_t n;

    n = strlen(abs ? abs : src) + strlen(name) + 16;
    p = malloc(n);
    if (p)
        snprintf(p, n, "file://%s/%s", abs ? abs : src, name);
    free(abs);
    return p;
}

static const char *
item_type(const struct set *st, size_t i)
{
    if (st->it[i].base < 0)
        return "full";
    return (size_t)st->it[i].base + 1 == i ? "incremental" : "differential";
}

static void
print_json(const char *src, const char *dest, const struct set *st)
{
    size_t i;

    printf("{\"source\": ");
    json_string(stdout, src);
    printf(", \"directory\": ");
    json_string(stdout, dest);
    printf(", \"backups\": [");
    for (i = 0; i < st->nr; i++) {
        const struct item *it = &st->it[i];
        const struct vnb_meta *m = vnb_get_meta(it->s);

        printf("%s\n  {\"file\": ", i ? "," : "");
        json_string(stdout, it->out);
        printf(", \"type\": \"%s\", \"backing-file\": ", item_type(st, i));
        if (it->base >= 0)
            json_string(stdout, st->it[it->base].out);
        else
            printf("null");
        printf(", \"from\": ");
        json_string(stdout, it->name);
        printf(", \"checkpoint\": ");
        if (it->creates)
            json_string(stdout, m->checkpoint);
        else
            printf("null");
        printf(", \"compressed\": %s, \"virtual-size\": %" PRIu64
               ", \"data-bytes\": %" PRIu64 ", \"zero-bytes\": %" PRIu64 "}",
               m->compressed ? "true" : "false",
               m->virtual_size,
               it->data_bytes,
               it->zero_bytes);
    }
    printf("\n]}\n");
}

/* vnb_import(); with KEEP_TRACK the finished DEST stays tracked for a
 * signal (its parent too: vnb_import_temp()'s).
 */
static int
import_set(const char *src,
           const char *disk,
           const char *dest,
           enum vnb_import_output output,
           bool keep_track)
{
    struct set st = {0};
    struct manifest man = {0};
    char *tmpdir = NULL, *slash, *parent = NULL;
    struct stat sb;
    size_t i, n;
    int r;

    if (stat(src, &sb) < 0)
        return qcbt_error(errno, "%s: %s", src, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return qcbt_error(ENOTDIR, "%s: %s", src, strerror(ENOTDIR));
    if (lstat(dest, &sb) == 0) {
        DIR *d = S_ISDIR(sb.st_mode) ? opendir(dest) : NULL;
        struct dirent *de;
        bool empty = d != NULL;

        while (d && (de = readdir(d)))
            if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
                empty = false;
        if (d)
            closedir(d);
        if (!empty)
            return qcbt_error(EEXIST,
                              "%s: exists (import makes a new directory, or "
                              "fills an empty one)",
                              dest);
    }
    if ((r = load_set(src, disk, &st, output == VNB_IMPORT_QUIET)) < 0)
        return r;

    /* The temporary directory beside DEST. */
    n = strlen(dest) + 32;
    tmpdir = malloc(n);
    parent = strdup(dest);
    if (!tmpdir || !parent) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    while ((slash = strrchr(parent, '/')) && slash[1] == '\0' &&
           slash != parent)
        *slash = '\0';
    slash = strrchr(parent, '/');
    if (slash) {
        slash[slash == parent ? 1 : 0] = '\0';
        snprintf(tmpdir, n, "%s/.qcbt-import-XXXXXX", parent);
    } else {
        snprintf(tmpdir, n, ".qcbt-import-XXXXXX");
        strcpy(parent, ".");
    }
    if (!mkdtemp(tmpdir)) {
        r = qcbt_error(errno,
                       "%s: cannot create a temporary directory in "
                       "%s: %s",
                       dest,
                       parent,
                       strerror(errno));
        free(tmpdir);
        tmpdir = NULL;
        goto out;
    }
    {
        /* As mkdir would make DEST (mkdtemp makes it 0700). */
        mode_t mask = umask(0);

        umask(mask);
        chmod(tmpdir, 0777 & ~mask);
    }

    sig_track(tmpdir, 0, keep_track);
    for (i = 0; i < st.nr; i++) {
        struct item *it = &st.it[i];
        const struct vnb_meta *m = vnb_get_meta(it->s);
        struct backup_entry e = {0};

        sig_nr = (sig_atomic_t)(i + 1);
        char hex[DIGEST_HEX_LEN + 1], sumhex[DIGEST_HEX_LEN + 1];
        struct timespec t0, t1;

        clock_gettime(CLOCK_MONOTONIC, &t0);
        if ((r = write_item(tmpdir, &st, i)) < 0)
            goto out;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        gdigest_final(&it->dg, hex);
        gdigest_sum_hex(&it->dg, sumhex);
        e.file = it->out;
        e.type = (char *)item_type(&st, i);
        e.backing = it->base >= 0 ? st.it[it->base].out : NULL;
        e.checkpoint = it->creates ? m->checkpoint : NULL;
        e.uri = uri_of(src, it->name);
        if (!e.uri) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        e.export_name = m->disk_name;
        e.time = m->date[0] ? m->date : NULL;
        e.guest_digest = hex;
        e.digest_sum = sumhex;
        e.size = m->virtual_size;
        e.data_bytes = it->data_bytes;
        e.zero_bytes = it->zero_bytes;
        e.extents = it->frames;
        e.seconds = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        r = manifest_append(&man, &e);
        free(e.uri);
        if (r < 0)
            goto out;
    }
    if ((r = manifest_prepare(tmpdir, &man)) < 0 ||
        (r = manifest_commit(tmpdir)) < 0)
        goto out;
    if (rename(tmpdir, dest) < 0) {
        r = qcbt_error(errno,
                       "%s: %s",
                       dest,
                       errno == ENOTEMPTY || errno == EEXIST
                           ? "exists and is not empty"
                           : strerror(errno));
        goto out;
    }
    sig_track(keep_track ? dest : NULL, (long)st.nr, true);
    free(tmpdir);
    tmpdir = NULL;
    fsync_dir(parent);
    if (output == VNB_IMPORT_JSON)
        print_json(src, dest, &st);
    else if (output == VNB_IMPORT_TEXT) {
        for (i = 0; i < st.nr; i++)
            printf("%s -> %s (%s%s%s, %" PRIu64 " bytes of data)\n",
                   st.it[i].name,
                   st.it[i].out,
                   man.backups[i].type,
                   man.backups[i].backing ? " on " : "",
                   man.backups[i].backing ? man.backups[i].backing : "",
                   st.it[i].data_bytes);
        printf("imported %zu backup(s) of disk %s into %s\n",
               st.nr,
               vnb_get_meta(st.it[0].s)->disk_name,
               dest);
    }
    r = 0;
out:
    if (tmpdir) {
        sig_nr = -1;
        remove_tmpdir(tmpdir, &st);
        free(tmpdir);
    }
    free(parent);
    manifest_free(&man);
    set_free(&st);
    return r;
}

int
vnb_import(const char *src,
           const char *disk,
           const char *dest,
           enum vnb_import_output output)
{
    return import_set(src, disk, dest, output, false);
}

static void
import_on_signal(int sig)
{
    vnb_signal_cleanup();
    signal(sig, SIG_DFL);
    raise(sig);
}

void
vnb_catch_signals(void)
{
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
    struct sigaction sa = {.sa_handler = import_on_signal};
    size_t i;

    sigemptyset(&sa.sa_mask);
    for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaction(sigs[i], &sa, NULL);
}

static void
import_usage(FILE *fp)
{
    fprintf(fp,
            "Usage: qcbt import [--disk NAME] [--json] VNBDIR DIR\n"
            "\n"
            "Turn the virtnbdbackup backup set in VNBDIR (full, incremental "
            "and\n"
            "differential stream files, compressed or not, with its "
            "checkpoint\n"
            "list) into a qcbt backup directory DIR: one qcow2 file per "
            "backup,\n"
            "each backed by the backup it builds on, and a manifest with "
            "each\n"
            "one's guest digest, so qcbt restore, verify and backup --since "
            "carry\n"
            "on from it.  Every stream is checked whole (frames, lengths, "
            "LZ4\n"
            "checksums, data size); on any error nothing is left behind.  "
            "DIR\n"
            "must not exist or be an empty directory.\n"
            "\n"
            "      --disk NAME   the disk to import (needed when VNBDIR "
            "holds several)\n"
            "      --json        print what was imported as JSON\n"
            "  -h, --help        show this help\n");
}

int
cmd_import(int argc, char **argv)
{
    static const struct option opts[] = {
        {"disk", required_argument, NULL, 'd'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const char optstring[] = "h";
    const char *disk = NULL;
    bool json = false;
    int opt;

    while ((opt = getopt_long(argc, argv, optstring, opts, NULL)) != -1) {
        switch (opt) {
        case 'd':
            disk = optarg;
            break;
        case 'j':
            json = true;
            break;
        case 'h':
            import_usage(stdout);
            return QCBT_EXIT_OK;
        default:
            return usage_getopt_error("import", argc, argv, optstring, opts);
        }
    }
    if (argc - optind != 2)
        return usage_error("import", "expected VNBDIR DIR");
    vnb_catch_signals();
    if (vnb_import(argv[optind],
                   disk,
                   argv[optind + 1],
                   json ? VNB_IMPORT_JSON : VNB_IMPORT_TEXT) < 0)
        return report_error();
    return QCBT_EXIT_OK;
}

bool
vnb_is_set(const char *dir)
{
    char *m = path_join(dir, MANIFEST_NAME);
    struct stat sb;
    struct dirent *de;
    bool found = false;
    DIR *d;

    if (!m)
        return false;
    if (stat(m, &sb) == 0 || errno != ENOENT) {
        free(m);
        return false;
    }
    free(m);
    d = opendir(dir);
    while (d && !found && (de = readdir(d))) {
        size_t ln = strlen(de->d_name);

        found = ln > 5 && strcmp(de->d_name + ln - 5, ".data") == 0;
    }
    if (d)
        closedir(d);
    return found;
}

int
vnb_import_temp(const char *src, const char *disk, char **out)
{
    const char *base = getenv("TMPDIR");
    char *top, *dest;
    size_t n;
    int r;

    *out = NULL;
    if (!base || !*base)
        base = "/var/tmp";
    n = strlen(base) + 32;
    top = malloc(n);
    if (!top)
        return qcbt_error(ENOMEM, "out of memory");
    snprintf(top, n, "%s/qcbt-vnb-XXXXXX", base);
    if (!mkdtemp(top)) {
        r = qcbt_error(errno,
                       "cannot create a temporary directory in %s: %s",
                       base,
                       strerror(errno));
        free(top);
        return r;
    }
    dest = path_join(top, "set");
    if (!dest) {
        rmdir(top);
        free(top);
        return qcbt_error(ENOMEM, "out of memory");
    }
    free(top);
    r = import_set(src, disk, dest, VNB_IMPORT_QUIET, true);
    if (r < 0) {
        vnb_temp_free(dest);
        return r;
    }
    *out = dest;
    return 0;
}

void
vnb_temp_free(char *dir)
{
    struct manifest m = {0};
    char *p, *slash;
    size_t i;

    if (!dir)
        return;
    sig_nr = -1;
    if (manifest_load(dir, &m) == 0) {
        for (i = 0; i < m.nr; i++)
            if ((p = path_join(dir, m.backups[i].file))) {
                unlink(p);
                free(p);
            }
        manifest_free(&m);
    }
    if ((p = path_join(dir, MANIFEST_NAME))) {
        unlink(p);
        free(p);
    }
    rmdir(dir);
    slash = strrchr(dir, '/');
    if (slash) {
        *slash = '\0';
        rmdir(dir);
    }
    free(dir);
}

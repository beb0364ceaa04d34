/* qcbt: the backup directory's manifest.json. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "error.h"
#include "json.h"
#include "digest.h"
#include "manifest.h"
#include "qcbt.h"

#define MANIFEST_MAX_BYTES (64u * 1024 * 1024)

static char *
dup_opt(const char *s)
{
    return s ? strdup(s) : NULL;
}

static void
entry_free(struct backup_entry *e)
{
    free(e->file);
    free(e->type);
    free(e->checkpoint);
    free(e->context);
    free(e->since);
    free(e->uri);
    free(e->source_image);
    free(e->export_name);
    free(e->time);
    free(e->backing);
    free(e->guest_digest);
    free(e->digest_sum);
    free(e->digest_index);
}

void
manifest_free(struct manifest *m)
{
    size_t i;

    for (i = 0; i < m->nr; i++)
        entry_free(&m->backups[i]);
    free(m->backups);
    m->backups = NULL;
    m->nr = 0;
}

int
manifest_append(struct manifest *m, const struct backup_entry *e)
{
    struct backup_entry *n = realloc(m->backups, (m->nr + 1) * sizeof *n);
    struct backup_entry *c;

    if (!n)
        return qcbt_error(ENOMEM, "out of memory");
    m->backups = n;
    c = &n[m->nr];
    *c = *e;
    c->file = dup_opt(e->file);
    c->type = dup_opt(e->type);
    c->checkpoint = dup_opt(e->checkpoint);
    c->context = dup_opt(e->context);
    c->since = dup_opt(e->since);
    c->uri = dup_opt(e->uri);
    c->source_image = dup_opt(e->source_image);
    c->export_name = dup_opt(e->export_name);
    c->time = dup_opt(e->time);
    c->backing = dup_opt(e->backing);
    c->guest_digest = dup_opt(e->guest_digest);
    c->digest_sum = dup_opt(e->digest_sum);
    c->digest_index = dup_opt(e->digest_index);
    m->nr++;
    return 0;
}

static int
get_str(const struct json *o,
        const char *key,
        bool required,
        char **out,
        size_t idx)
{
    const struct json *v = json_get(o, key);

    *out = NULL;
    if (!v || v->type == JSON_NULL) {
        if (required)
            return qcbt_error(EINVAL,
                              "manifest: backup %zu has no '%s'",
                              idx,
                              key);
        return 0;
    }
    if (v->type != JSON_STRING)
        return qcbt_error(EINVAL,
                          "manifest: backup %zu: '%s' is not a "
                          "string",
                          idx,
                          key);
    *out = strdup(v->string);
    return *out ? 0 : qcbt_error(ENOMEM, "out of memory");
}

static int
get_u64(const struct json *o, const char *key, uint64_t *out, size_t idx)
{
    int64_t v;

    if (!json_get_int(o, key, &v) || v < 0)
        return qcbt_error(EINVAL,
                          "manifest: backup %zu: '%s' missing or "
                          "not a non-negative integer",
                          idx,
                          key);
    *out = v;
    return 0;
}

/* A file name in the manifest must name a file in DIR: no path. */
static bool
plain_name(const char *s)
{
    return s && s[0] && s[0] != '.' && !strchr(s, '/');
}

int
manifest_load(const char *dir, struct manifest *m)
{
    char *path = path_join(dir, MANIFEST_NAME);
    struct json *root = NULL;
    const struct json *list;
    const char *fmt;
    char *text = NULL;
    struct stat st;
    size_t i;
    int fd = -1, r = 0;
    int64_t version;

    memset(m, 0, sizeof *m);
    if (!path)
        return qcbt_error(ENOMEM, "out of memory");
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) {
            free(path);
            return 0;
        }
        r = qcbt_error(errno, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
        st.st_size > MANIFEST_MAX_BYTES) {
        r = qcbt_error(EINVAL,
                       "%s: not a regular file of at most 64 MiB",
                       path);
        goto out;
    }
    text = malloc(st.st_size + 1);
    if (!text) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    if (read(fd, text, st.st_size) != st.st_size) {
        r = qcbt_error(EIO, "%s: short read", path);
        goto out;
    }
    r = json_parse(text, st.st_size, &root);
    if (r < 0) {
        r = qcbt_error_prefix(-r, "%s", path);
        goto out;
    }
    if (!json_get_string(root, "format", &fmt) ||
        strcmp(fmt, MANIFEST_FORMAT) != 0 ||
        !json_get_int(root, "version", &version)) {
        r = qcbt_error(EINVAL, "%s: not a qcbt backup manifest", path);
        goto out;
    }
    if (version != MANIFEST_VERSION) {
        r = qcbt_error(ENOTSUP,
                       "%s: manifest version %" PRId64 " is not supported",
                       path,
                       version);
        goto out;
    }
    list = json_get(root, "backups");
    if (!list || list->type != JSON_ARRAY) {
        r = qcbt_error(EINVAL, "%s: no 'backups' list", path);
        goto out;
    }
    for (i = 0; i < list->len; i++) {
        const struct json *o = list->items[i];
        struct backup_entry e = {0};
        const struct json *sec;

        if (o->type != JSON_OBJECT) {
            r = qcbt_error(EINVAL, "%s: backup %zu is not an object", path, i);
            goto out;
        }
        if ((r = get_str(o, "file", true, &e.file, i)) < 0 ||
            (r = get_str(o, "type", true, &e.type, i)) < 0 ||
            (r = get_str(o, "checkpoint", false, &e.checkpoint, i)) < 0 ||
            (r = get_str(o, "context", false, &e.context, i)) < 0 ||
            (r = get_str(o, "since", false, &e.since, i)) < 0 ||
            (r = get_str(o, "source-uri", false, &e.uri, i)) < 0 ||
            (r = get_str(o, "source-image", false, &e.source_image, i)) < 0 ||
            (r = get_str(o, "export", false, &e.export_name, i)) < 0 ||
            (r = get_str(o, "time", false, &e.time, i)) < 0 ||
            (r = get_str(o, "backing-file", false, &e.backing, i)) < 0 ||
            (r = get_str(o, "guest-digest", false, &e.guest_digest, i)) < 0 ||
            (r = get_str(o, "guest-digest-sum", false, &e.digest_sum, i)) < 0 ||
            (r = get_str(o, "digest-index", false, &e.digest_index, i)) < 0 ||
            (r = get_u64(o, "virtual-size", &e.size, i)) < 0 ||
            (r = get_u64(o, "data-bytes", &e.data_bytes, i)) < 0 ||
            (r = get_u64(o, "zero-bytes", &e.zero_bytes, i)) < 0 ||
            (r = get_u64(o, "extents", &e.extents, i)) < 0) {
            entry_free(&e);
            r = qcbt_error_prefix(-r, "%s", path);
            goto out;
        }
        {
            /* A digest of another algorithm (a newer qcbt's) must neither
             * be checked as ours nor continued by an incremental.
             */
            const struct json *alg = json_get(o, "digest-algorithm");

            if ((e.guest_digest || e.digest_sum) && alg &&
                (alg->type != JSON_STRING ||
                 strcmp(alg->string, DIGEST_ALGORITHM) != 0)) {
                char what[64];

                qcbt_escape(what,
                            sizeof what,
                            alg->type == JSON_STRING ? alg->string : "?",
                            alg->type == JSON_STRING ? strlen(alg->string) : 1);
                entry_free(&e);
                r = qcbt_error(ENOTSUP,
                               "%s: backup %zu: digest algorithm \"%s\" is "
                               "not supported (this qcbt knows \"%s\")",
                               path,
                               i,
                               what,
                               DIGEST_ALGORITHM);
                goto out;
            }
        }
        json_get_int(o, "requests", (int64_t *)&e.requests);
        sec = json_get(o, "seconds");
        if (sec && sec->type == JSON_NUMBER)
            e.seconds = sec->number;
        if (!plain_name(e.file) || (e.backing && !plain_name(e.backing)) ||
            (e.digest_index && !plain_name(e.digest_index)) ||
            (strcmp(e.type, "full") != 0 &&
             strcmp(e.type, "incremental") != 0 &&
             strcmp(e.type, "differential") != 0) ||
            (strcmp(e.type, "full") == 0) != (e.backing == NULL)) {
            entry_free(&e);
            r = qcbt_error(EINVAL,
                           "%s: backup %zu: bad file, type, "
                           "backing file or digest index",
                           path,
                           i);
            goto out;
        }
        r = manifest_append(m, &e);
        entry_free(&e);
        if (r < 0)
            goto out;
    }
out:
    if (fd >= 0)
        close(fd);
    json_free(root);
    free(text);
    free(path);
    if (r < 0)
        manifest_free(m);
    return r;
}

static void
put_str(FILE *fp, const char *key, const char *v, bool comma)
{
    const unsigned char *p;

    fprintf(fp, "      \"%s\": ", key);
    if (!v) {
        fputs("null", fp);
    } else {
        fputc('"', fp);
        for (p = (const unsigned char *)v; *p; p++) {
            if (*p == '"' || *p == '\\')
                fprintf(fp, "\\%c", *p);
            else if (*p < 0x20)
                fprintf(fp, "\\u%04x", *p);
            else
                fputc(*p, fp);
        }
        fputc('"', fp);
    }
    fputs(comma ? ",\n" : "\n", fp);
}

bool
manifest_test_fault(const char *point)
{
    const char *v = getenv("QCBT_TEST_FAIL_AT");

    return v && strcmp(v, point) == 0;
}

int
manifest_prepare(const char *dir, const struct manifest *m)
{
    char *tmp = path_join(dir, MANIFEST_TMP_NAME);
    FILE *fp = NULL;
    size_t i;
    int r = 0;

    if (!tmp) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    if (manifest_test_fault("manifest-enospc")) {
        /* As when the file system has no free inode left. */
        errno = ENOSPC;
        fp = NULL;
    } else {
        fp = fopen(tmp, "w");
    }
    if (!fp) {
        r = qcbt_error(errno, "%s: %s", tmp, strerror(errno));
        goto out;
    }
    fprintf(fp,
            "{\n  \"format\": \"%s\",\n  \"version\": %d,\n"
            "  \"backups\": [\n",
            MANIFEST_FORMAT,
            MANIFEST_VERSION);
    for (i = 0; i < m->nr; i++) {
        const struct backup_entry *e = &m->backups[i];

        fprintf(fp, "    {\n");
        put_str(fp, "file", e->file, true);
        put_str(fp, "type", e->type, true);
        put_str(fp, "backing-file", e->backing, true);
        put_str(fp, "checkpoint", e->checkpoint, true);
        put_str(fp, "context", e->context, true);
        put_str(fp, "since", e->since, true);
        put_str(fp, "source-uri", e->uri, true);
        put_str(fp, "source-image", e->source_image, true);
        put_str(fp, "export", e->export_name, true);
        put_str(fp, "time", e->time, true);
        put_str(fp, "guest-digest", e->guest_digest, true);
        put_str(fp, "guest-digest-sum", e->digest_sum, true);
        put_str(fp, "digest-index", e->digest_index, true);
        fprintf(fp, "      \"digest-algorithm\": \"%s\",\n", DIGEST_ALGORITHM);
        fprintf(fp, "      \"virtual-size\": %" PRIu64 ",\n", e->size);
        fprintf(fp, "      \"data-bytes\": %" PRIu64 ",\n", e->data_bytes);
        fprintf(fp, "      \"zero-bytes\": %" PRIu64 ",\n", e->zero_bytes);
        fprintf(fp, "      \"extents\": %" PRIu64 ",\n", e->extents);
        fprintf(fp, "      \"requests\": %" PRIu64 ",\n", e->requests);
        fprintf(fp, "      \"seconds\": %.3f\n", e->seconds);
        fprintf(fp, "    }%s\n", i + 1 < m->nr ? "," : "");
    }
    fprintf(fp, "  ]\n}\n");
    if (fflush(fp) != 0 || fsync(fileno(fp)) != 0) {
        r = qcbt_error(errno, "%s: %s", tmp, strerror(errno));
        goto out;
    }
    if (fclose(fp) != 0) {
        fp = NULL;
        r = qcbt_error(errno, "%s: %s", tmp, strerror(errno));
        goto out;
    }
    fp = NULL;
out:
    if (fp)
        fclose(fp);
    if (r < 0 && tmp)
        unlink(tmp);
    free(tmp);
    return r;
}

int
manifest_commit(const char *dir)
{
    char *path = path_join(dir, MANIFEST_NAME);
    char *tmp = path_join(dir, MANIFEST_TMP_NAME);
    int r = 0, dfd;

    if (!path || !tmp) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    if (rename(tmp, path) < 0) {
        r = qcbt_error(errno, "%s: %s", path, strerror(errno));
        unlink(tmp);
        goto out;
    }
    /* The rename is the commit point; make it durable. */
    dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
out:
    free(path);
    free(tmp);
    return r;
}

/* qcbt unit tests: the rules every front end shares (common/publish and
 * chain_opts_from_env()): NAME=ALIAS parsing, the checks made before any
 * merge, refuse versus fallback versus skip, --all-bitmaps, and the exact
 * text of the notices the front ends print.
 *
 * The chains are small qcow2 files written with qcow2-builder into a
 * private directory:
 *
 *   base.qcow2: ck (bit 1), b0 (bit 2), inuse (in_use), "c<ESC>k" (bit 3)
 *   top.qcow2 (backing base): b0 (bit 4), t (bit 5), inuse (in_use),
 *                             data in guest cluster 6
 *
 * so ck and "c<ESC>k" fall back to top's allocation in tolerant mode and
 * are refused in strict mode, b0 merges cleanly, and inuse is refused
 * (in use at the deepest layer that holds it) in both modes.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cmocka.h>

#include "chain.h"
#include "error.h"
#include "merge.h"
#include "publish.h"
#include "qcow2-builder.h"
#include "test-tmpdir.h"

#define MiB          (1024ULL * 1024)
#define CLUSTER_BITS 16 /* 64 KiB clusters and bitmap granularity */

static char top_path[PATH_MAX + 32];
static struct chain *chain;

/* ------------------------------------------------------------------ */
/* Helpers */

struct tbitmap {
    const char *name;
    uint32_t flags;
    unsigned bit; /* the one dirty bit */
};

/* A 16 MiB qcow2 layer at PATH with BITMAPS (NULL name ends them) and,
 * when DATA_CLUSTER >= 0, that guest cluster allocated.
 */
static void
write_layer(const char *path,
            const char *backing,
            const struct tbitmap *bitmaps,
            int data_cluster)
{
    struct qb *b = qb_new(3, CLUSTER_BITS, 16 * MiB, false, false);
    unsigned char stream[32], *img, data[1u << CLUSTER_BITS];
    size_t len;

    if (backing)
        qb_set_backing(b, backing, "qcow2");
    if (data_cluster >= 0) {
        memset(data, 0x5a, sizeof data);
        qb_write_cluster(b, (uint64_t)data_cluster, data);
    }
    for (; bitmaps && bitmaps->name; bitmaps++) {
        memset(stream, 0, sizeof stream);
        stream[bitmaps->bit / 8] |= 1u << (bitmaps->bit % 8);
        qb_add_bitmap(b,
                      bitmaps->name,
                      CLUSTER_BITS,
                      bitmaps->flags,
                      stream,
                      sizeof stream);
    }
    qb_store_bitmaps(b);
    img = qb_finish(b, &len);
    if (test_write_file(path, img, len) < 0)
        fail_msg("cannot write %s", path);
    free(img);
    qb_free(b);
}

static int
setup(void **state)
{
    static const struct tbitmap base_bm[] = {
        {"ck", QB_BME_AUTO, 1},
        {"b0", QB_BME_AUTO, 2},
        {"inuse", QB_BME_AUTO | QB_BME_IN_USE, 0},
        {"c\x1bk", QB_BME_AUTO, 3},
        {NULL, 0, 0},
    };
    static const struct tbitmap top_bm[] = {
        {"b0", QB_BME_AUTO, 4},
        {"t", QB_BME_AUTO, 5},
        {"inuse", QB_BME_AUTO | QB_BME_IN_USE, 0},
        {NULL, 0, 0},
    };
    struct chain_open_opts o = {.format = "qcow2"};
    char path[PATH_MAX + 32];

    if (test_tmpdir_setup(state) < 0)
        return -1;
    snprintf(path, sizeof path, "%s/base.qcow2", test_tmpdir);
    write_layer(path, NULL, base_bm, -1);
    /* A control character in the top's file name: notices quote it. */
    snprintf(top_path, sizeof top_path, "%s/t\x1bop.qcow2", test_tmpdir);
    write_layer(top_path, "base.qcow2", top_bm, 6);
    if (chain_open(top_path, &o, &chain) < 0) {
        fprintf(stderr, "chain_open: %s\n", qcbt_error_get());
        return -1;
    }
    return chain->nr_layers == 2 ? 0 : -1;
}

static int
teardown(void **state)
{
    chain_close(chain);
    return test_tmpdir_teardown(state);
}

/* TEXT is one line without control characters. */
static void
check_clean(const char *text)
{
    const unsigned char *p;

    assert_non_null(text);
    for (p = (const unsigned char *)text; *p; p++)
        if (*p < 0x20 || *p == 0x7f)
            fail_msg("control character 0x%02x in \"%s\"", *p, text);
}

static void
check_contains(const char *text, const char *needle)
{
    if (!strstr(text, needle))
        fail_msg("\"%s\" does not contain \"%s\"", text, needle);
}

/* publish_run over the test chain with specs parsed from ARGS. */
static int
run_args(const char *const *args,
         size_t n,
         enum merge_mode mode,
         bool all,
         size_t alias_max,
         struct publish_set **out)
{
    struct publish_spec specs[8];
    struct publish_opts po = {
        .mode = mode,
        .all_bitmaps = all,
        .alias_max = alias_max,
    };
    size_t i;
    int r;

    assert_true(n <= 8);
    for (i = 0; i < n; i++)
        assert_int_equal(publish_spec_parse(args[i], &specs[i]), 0);
    qcbt_error_clear();
    r = publish_run(chain, specs, n, &po, out);
    for (i = 0; i < n; i++)
        publish_spec_free(&specs[i]);
    return r;
}

/* The published aliases of SET, space-separated, in order. */
static const char *
aliases(const struct publish_set *set)
{
    static char buf[512];
    size_t i;

    buf[0] = '\0';
    for (i = 0; i < set->nr_bitmaps; i++)
        snprintf(buf + strlen(buf),
                 sizeof buf - strlen(buf),
                 "%s%s=%s",
                 i ? " " : "",
                 set->bitmaps[i].name,
                 set->bitmaps[i].alias);
    return buf;
}

/* The text a fallback of the top layer carries for bitmap NAME (as the
 * notice escapes it).
 */
static const char *
top_fallback(const char *name)
{
    static char buf[PATH_MAX + 512];
    char path[PATH_MAX + 32];

    snprintf(path, sizeof path, "%s", top_path);
    qcbt_sanitize(path);
    snprintf(buf,
             sizeof buf,
             "bitmap '%s': layer 0 (%s) contributes its allocation map: "
             "bitmap '%s' missing: the layer was created without it",
             name,
             path,
             name);
    return buf;
}

/* ------------------------------------------------------------------ */
/* QCBT_ALLOW_DATA_FILE */

static void
test_env_allow_data_file(void **state)
{
    static const char *const yes[] = {"1", "yes"};
    static const char *const no[] = {"0", "no", "", "YES", "1 ", "true", "2"};
    struct chain_open_opts o;
    size_t i;

    (void)state;
    assert_int_equal(unsetenv("QCBT_ALLOW_DATA_FILE"), 0);
    o.allow_data_file = true;
    chain_opts_from_env(&o);
    assert_false(o.allow_data_file);
    for (i = 0; i < sizeof yes / sizeof yes[0]; i++) {
        assert_int_equal(setenv("QCBT_ALLOW_DATA_FILE", yes[i], 1), 0);
        o.allow_data_file = false;
        chain_opts_from_env(&o);
        assert_true(o.allow_data_file);
    }
    for (i = 0; i < sizeof no / sizeof no[0]; i++) {
        assert_int_equal(setenv("QCBT_ALLOW_DATA_FILE", no[i], 1), 0);
        o.allow_data_file = true;
        chain_opts_from_env(&o);
        if (o.allow_data_file)
            fail_msg("QCBT_ALLOW_DATA_FILE='%s' allows data files", no[i]);
    }
    assert_int_equal(unsetenv("QCBT_ALLOW_DATA_FILE"), 0);
}

/* ------------------------------------------------------------------ */
/* NAME[=ALIAS] */

static void
test_parse(void **state)
{
    static const struct {
        const char *arg, *name, *alias;
    } good[] = {
        {"a", "a", NULL},
        {"a=b", "a", "b"},
        {"a=b=c", "a", "b=c"}, /* the first '=' ends NAME */
        {"a==b", "a", "=b"},
        {"a=b=", "a", "b="},
        {"vendorA/daily-7=backup-vda", "vendorA/daily-7", "backup-vda"},
        {"c\x1bk=a\tb", "c\x1bk", "a\tb"}, /* bytes kept as they are */
    };
    static const char *const bad[] = {"", "=", "=a", "a=", "==", "=a=b"};
    struct publish_spec s;
    size_t i;

    (void)state;
    for (i = 0; i < sizeof good / sizeof good[0]; i++) {
        assert_int_equal(publish_spec_parse(good[i].arg, &s), 0);
        assert_string_equal(s.name, good[i].name);
        if (good[i].alias)
            assert_string_equal(s.alias, good[i].alias);
        else
            assert_null(s.alias);
        publish_spec_free(&s);
        assert_null(s.buf);
    }
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char want[128];

        qcbt_error_clear();
        assert_int_equal(publish_spec_parse(bad[i], &s), -EINVAL);
        assert_null(s.buf);
        snprintf(want,
                 sizeof want,
                 "invalid bitmap argument '%s' (NAME or NAME=ALIAS)",
                 bad[i]);
        assert_string_equal(qcbt_error_get(), want);
    }
    /* The message quotes the argument without its control characters. */
    assert_int_equal(publish_spec_parse("\x1b[2J=", &s), -EINVAL);
    assert_string_equal(qcbt_error_get(),
                        "invalid bitmap argument '?[2J=' (NAME or "
                        "NAME=ALIAS)");
    publish_spec_free(NULL);
}

/* ------------------------------------------------------------------ */
/* What is checked before any merge */

static void
test_check_lengths(void **state)
{
    char name[PUBLISH_NAME_MAX + 2], arg[2 * PUBLISH_NAME_MAX + 8];
    const char *args[1] = {arg};
    struct publish_set *set;

    (void)state;
    /* NAME: PUBLISH_NAME_MAX bytes are looked for, one more is refused. */
    memset(name, 'n', sizeof name - 1);
    name[PUBLISH_NAME_MAX] = '\0';
    snprintf(arg, sizeof arg, "%s=x", name);
    assert_int_equal(run_args(args, 1, MERGE_TOLERANT, false, 0, &set), 0);
    check_contains(set->error, "cannot be used (tolerant mode): bitmap 'nnn");
    publish_set_free(set);
    name[PUBLISH_NAME_MAX] = 'n';
    name[PUBLISH_NAME_MAX + 1] = '\0';
    snprintf(arg, sizeof arg, "%s=x", name);
    assert_int_equal(run_args(args, 1, MERGE_TOLERANT, false, 0, &set),
                     -EINVAL);
    assert_null(set);
    assert_string_equal(qcbt_error_get(),
                        "bitmap name 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn"
                        "...' too long");

    /* ALIAS: at most alias_max bytes (default PUBLISH_NAME_MAX). */
    snprintf(arg, sizeof arg, "b0=%.*s", 10, "aaaaaaaaaaaaaaaa");
    assert_int_equal(run_args(args, 1, MERGE_TOLERANT, false, 10, &set), 0);
    assert_null(set->error);
    assert_string_equal(aliases(set), "b0=aaaaaaaaaa");
    publish_set_free(set);
    snprintf(arg, sizeof arg, "b0=%.*s", 11, "aaaaaaaaaaaaaaaa");
    assert_int_equal(run_args(args, 1, MERGE_TOLERANT, false, 10, &set),
                     -EINVAL);
    assert_string_equal(qcbt_error_get(),
                        "bitmap alias 'aaaaaaaaaaa...' too long");
    name[PUBLISH_NAME_MAX] = '\0';
    snprintf(arg, sizeof arg, "b0=%sa", name);
    assert_int_equal(run_args(args, 1, MERGE_TOLERANT, false, 0, &set),
                     -EINVAL);
    check_contains(qcbt_error_get(), "bitmap alias 'nnnn");
    /* The implied alias (NAME) is held to the same limit. */
    snprintf(arg, sizeof arg, "b0");
    assert_int_equal(run_args(args, 1, MERGE_TOLERANT, false, 1, &set),
                     -EINVAL);
    assert_string_equal(qcbt_error_get(), "bitmap alias 'b0...' too long");
}

static void
test_check_names(void **state)
{
    struct publish_opts po = {.mode = MERGE_TOLERANT};
    struct publish_set *set = NULL;
    struct publish_spec s[2] = {{.name = ""}, {.name = "b0"}};

    (void)state;
    /* Specs built without publish_spec_parse() (the plugins'). */
    assert_int_equal(publish_run(chain, s, 1, &po, &set), -EINVAL);
    assert_string_equal(qcbt_error_get(), "empty bitmap name");
    s[0] = (struct publish_spec){.name = "b0", .alias = ""};
    assert_int_equal(publish_run(chain, s, 1, &po, &set), -EINVAL);
    assert_string_equal(qcbt_error_get(), "empty alias for bitmap 'b0'");

    /* Bytes that are not UTF-8 can name no qcow2 bitmap nor NBD context. */
    s[0] = (struct publish_spec){.name = "b\xff"};
    assert_int_equal(publish_run(chain, s, 1, &po, &set), -EINVAL);
    assert_string_equal(qcbt_error_get(), "bitmap name 'b?' is not UTF-8");
    s[0] = (struct publish_spec){.name = "b0", .alias = "x\xc0\xaf"};
    assert_int_equal(publish_run(chain, s, 1, &po, &set), -EINVAL);
    assert_string_equal(qcbt_error_get(),
                        "bitmap alias 'x?"
                        "?' is not UTF-8");
    assert_null(set);

    /* Control characters are bitmap-name bytes like any other (QEMU
     * takes them): looked for, and quoted escaped.
     */
    s[0] = (struct publish_spec){.name = "c\x1bk", .alias = "ck\tesc"};
    s[1] = (struct publish_spec){.name = "x\x1b[2Jy"};
    assert_int_equal(publish_run(chain, s, 2, &po, &set), 0);
    assert_int_equal(set->nr_bitmaps, 1);
    assert_string_equal(set->bitmaps[0].name, "c\x1bk");
    assert_string_equal(set->bitmaps[0].alias, "ck\tesc");
    assert_int_equal(set->nr_notices, 1);
    check_clean(set->notices[0].text);
    assert_string_equal(set->notices[0].text, top_fallback("c?k"));
    check_clean(set->error);
    assert_string_equal(set->error,
                        "bitmap 'x?[2Jy' cannot be used (tolerant mode): "
                        "bitmap 'x?[2Jy' not found in any layer of the "
                        "chain");
    publish_set_free(set);
}

static void
test_duplicate_alias(void **state)
{
    static const char *const twice[] = {"b0", "b0"};
    static const char *const both[] = {"b0=x", "ck", "t=x"};
    static const char *const named[] = {"b0", "t=b0"};
    static const char *const unknown[] = {"nosuch=x", "gone=x"};
    static const char *const fine[] = {"b0", "b0=y", "t=b0x"};
    struct publish_set *set = NULL;

    (void)state;
    assert_int_equal(run_args(twice, 2, MERGE_TOLERANT, false, 0, &set),
                     -EINVAL);
    assert_string_equal(qcbt_error_get(),
                        "bitmap 'b0' is published twice as 'b0'");
    assert_int_equal(run_args(both, 3, MERGE_TOLERANT, false, 0, &set),
                     -EINVAL);
    assert_string_equal(qcbt_error_get(),
                        "bitmaps 'b0' and 't' are both published as 'x'");
    assert_int_equal(run_args(named, 2, MERGE_TOLERANT, false, 0, &set),
                     -EINVAL);
    assert_string_equal(qcbt_error_get(),
                        "bitmaps 'b0' and 't' are both published as 'b0'");
    /* Found before any merge, and whatever --all-bitmaps says. */
    assert_int_equal(run_args(unknown, 2, MERGE_STRICT, true, 0, &set),
                     -EINVAL);
    assert_string_equal(qcbt_error_get(),
                        "bitmaps 'nosuch' and 'gone' are both published "
                        "as 'x'");
    assert_null(set);

    /* One name under two aliases is two contexts. */
    assert_int_equal(run_args(fine, 3, MERGE_TOLERANT, false, 0, &set), 0);
    assert_null(set->error);
    assert_string_equal(aliases(set), "b0=b0 b0=y t=b0x");
    assert_int_equal(set->nr_notices, 0);
    publish_set_free(set);
}

/* ------------------------------------------------------------------ */
/* Refuse, fall back, skip */

static void
test_tolerant_fallback(void **state)
{
    static const char *const args[] = {"ck=backup-vda", "b0"};
    struct merge_opts mo = {.mode = MERGE_TOLERANT};
    struct publish_set *set = NULL;
    struct merge_result *direct = NULL;
    struct merge_ctx *ctx = NULL;
    uint64_t pos;

    (void)state;
    assert_int_equal(run_args(args, 2, MERGE_TOLERANT, false, 0, &set), 0);
    assert_null(set->error);
    assert_string_equal(aliases(set), "ck=backup-vda b0=b0");
    assert_int_equal(set->nr_notices, 1);
    assert_int_equal(set->notices[0].kind, PUBLISH_NOTICE_FALLBACK);
    check_clean(set->notices[0].text);
    assert_string_equal(set->notices[0].text, top_fallback("ck"));

    /* What is published is the merge engine's answer, unchanged. */
    assert_int_equal(merge_ctx_new(chain, &ctx), 0);
    assert_int_equal(merge_run(ctx, "ck", &mo, &direct), 0);
    assert_true(set->bitmaps[0].merge->usable);
    assert_int_equal(set->bitmaps[0].merge->nr_fallbacks, 1);
    for (pos = 0; pos < chain->size;) {
        struct bitmap_extent a, b;

        assert_int_equal(merge_result_extent(direct, pos, UINT64_MAX, &a), 0);
        assert_int_equal(
            merge_result_extent(set->bitmaps[0].merge, pos, UINT64_MAX, &b),
            0);
        assert_int_equal(a.len, b.len);
        assert_int_equal(a.dirty, b.dirty);
        pos += a.len;
    }
    /* bit 1 from the base, cluster 6 from the top's allocation */
    assert_int_equal(bitmap_count(set->bitmaps[0].merge->bm), 2);
    merge_result_free(direct);
    merge_ctx_free(ctx);
    publish_set_free(set);
}

static void
test_strict_refusal(void **state)
{
    static const char *const args[] = {"b0", "ck", "t"};
    char path[PATH_MAX + 32], want[PATH_MAX + 512];
    struct publish_set *set = NULL;

    (void)state;
    assert_int_equal(run_args(args, 3, MERGE_STRICT, false, 0, &set), 0);
    snprintf(path, sizeof path, "%s", top_path);
    qcbt_sanitize(path);
    snprintf(want,
             sizeof want,
             "bitmap 'ck' cannot be used (strict mode): bitmap 'ck' is "
             "missing in the top layer 0 (%s) but present in layer 1 "
             "(strict mode)",
             path);
    assert_string_equal(set->error, want);
    /* b0 came before and stays in the set; t, after, was not tried. */
    assert_string_equal(aliases(set), "b0=b0");
    assert_int_equal(set->nr_notices, 0);
    publish_set_free(set);
}

static void
test_refusal_keeps_earlier_notices(void **state)
{
    static const char *const args[] = {"ck", "inuse", "b0"};
    struct publish_set *set = NULL;

    (void)state;
    assert_int_equal(run_args(args, 3, MERGE_TOLERANT, false, 0, &set), 0);
    assert_string_equal(aliases(set), "ck=ck");
    assert_int_equal(set->nr_notices, 1);
    assert_string_equal(set->notices[0].text, top_fallback("ck"));
    check_clean(set->error);
    check_contains(set->error,
                   "bitmap 'inuse' cannot be used (tolerant mode): bitmap "
                   "'inuse' is in use at layer 1 (");
    check_contains(set->error, "the image was not closed cleanly");
    publish_set_free(set);
}

static void
test_all_bitmaps(void **state)
{
    struct publish_set *set = NULL;
    size_t i;

    (void)state;
    /* Every name once, top layer first, in directory order; inuse is
     * skipped once although both layers hold it.
     */
    assert_int_equal(run_args(NULL, 0, MERGE_TOLERANT, true, 0, &set), 0);
    assert_null(set->error);
    assert_string_equal(aliases(set), "b0=b0 t=t ck=ck c\x1bk=c\x1bk");
    assert_int_equal(set->nr_notices, 3);
    assert_int_equal(set->notices[0].kind, PUBLISH_NOTICE_SKIPPED);
    check_contains(set->notices[0].text,
                   "bitmap 'inuse' cannot be used (tolerant mode): bitmap "
                   "'inuse' is in use at layer 1");
    assert_int_equal(set->notices[1].kind, PUBLISH_NOTICE_FALLBACK);
    assert_string_equal(set->notices[1].text, top_fallback("ck"));
    assert_int_equal(set->notices[2].kind, PUBLISH_NOTICE_FALLBACK);
    assert_string_equal(set->notices[2].text, top_fallback("c?k"));
    for (i = 0; i < set->nr_notices; i++)
        check_clean(set->notices[i].text);
    publish_set_free(set);

    /* Strict: what cannot be used is skipped, never refused. */
    assert_int_equal(run_args(NULL, 0, MERGE_STRICT, true, 0, &set), 0);
    assert_null(set->error);
    assert_string_equal(aliases(set), "b0=b0 t=t");
    assert_int_equal(set->nr_notices, 3);
    for (i = 0; i < set->nr_notices; i++) {
        assert_int_equal(set->notices[i].kind, PUBLISH_NOTICE_SKIPPED);
        check_clean(set->notices[i].text);
        check_contains(set->notices[i].text, "(strict mode)");
    }
    check_contains(set->notices[1].text, "bitmap 'ck' cannot be used");
    check_contains(set->notices[2].text, "bitmap 'c?k' cannot be used");
    publish_set_free(set);
}

static void
test_all_bitmaps_with_requests(void **state)
{
    static const char *const args[] = {"inuse", "t=b0", "ck=ck2", "nosuch"};
    struct publish_set *set = NULL;

    (void)state;
    /* Requested ones first; a requested one that cannot be used is
     * skipped (once), a name already tried is not tried again, and a
     * name taken by an alias is left out with a notice.
     */
    assert_int_equal(run_args(args, 4, MERGE_TOLERANT, true, 0, &set), 0);
    assert_null(set->error);
    assert_string_equal(aliases(set), "t=b0 ck=ck2 c\x1bk=c\x1bk");
    assert_int_equal(set->nr_notices, 5);
    assert_int_equal(set->notices[0].kind, PUBLISH_NOTICE_SKIPPED);
    check_contains(set->notices[0].text, "bitmap 'inuse' cannot be used");
    assert_int_equal(set->notices[1].kind, PUBLISH_NOTICE_FALLBACK);
    assert_string_equal(set->notices[1].text, top_fallback("ck"));
    assert_int_equal(set->notices[2].kind, PUBLISH_NOTICE_SKIPPED);
    assert_string_equal(set->notices[2].text,
                        "bitmap 'nosuch' cannot be used (tolerant mode): "
                        "bitmap 'nosuch' not found in any layer of the "
                        "chain");
    assert_int_equal(set->notices[3].kind, PUBLISH_NOTICE_SKIPPED);
    assert_string_equal(set->notices[3].text,
                        "bitmap 'b0': its name is taken by the alias of "
                        "bitmap 't'");
    assert_int_equal(set->notices[4].kind, PUBLISH_NOTICE_FALLBACK);
    assert_string_equal(set->notices[4].text, top_fallback("c?k"));
    publish_set_free(set);
}

/* One front end's use: a single bitmap, no alias, as the plugins call it. */
static void
test_single_spec(void **state)
{
    struct publish_spec s = {.name = "b0"};
    struct publish_opts po = {.mode = MERGE_STRICT};
    struct publish_set *set = NULL;

    (void)state;
    assert_int_equal(publish_run(chain, &s, 1, &po, &set), 0);
    assert_null(set->error);
    assert_int_equal(set->nr_bitmaps, 1);
    assert_string_equal(set->bitmaps[0].alias, "b0");
    /* bit 2 (base) and bit 4 (top) */
    assert_int_equal(bitmap_count(set->bitmaps[0].merge->bm), 2);
    assert_int_equal(set->nr_notices, 0);
    publish_set_free(set);
    publish_set_free(NULL);

    /* No spec, no all-bitmaps: an empty set. */
    assert_int_equal(publish_run(chain, NULL, 0, &po, &set), 0);
    assert_int_equal(set->nr_bitmaps, 0);
    assert_null(set->error);
    publish_set_free(set);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_env_allow_data_file),
        cmocka_unit_test(test_parse),
        cmocka_unit_test(test_check_lengths),
        cmocka_unit_test(test_check_names),
        cmocka_unit_test(test_duplicate_alias),
        cmocka_unit_test(test_tolerant_fallback),
        cmocka_unit_test(test_strict_refusal),
        cmocka_unit_test(test_refusal_keeps_earlier_notices),
        cmocka_unit_test(test_all_bitmaps),
        cmocka_unit_test(test_all_bitmaps_with_requests),
        cmocka_unit_test(test_single_spec),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}

/* qcbt-server: fixed newstyle handshake and option haggling
 * (proto.md "Newstyle negotiation", "Option types", "Metadata querying").
 *
 * Everything the client sends is bounded before it is read: option
 * lengths, nested name and query lengths, the number of options.  An
 * unknown option is answered NBD_REP_ERR_UNSUP after its payload is
 * consumed; only a broken frame (bad magic, oversized option) or the
 * handshake deadline ends the connection.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "byteorder.h"
#include "error.h"
#include "internal.h"
#include "nbd-protocol.h"

struct hs {
    struct connection *c;
    int64_t deadline;
};

static int
send_reply(struct hs *h,
           uint32_t opt,
           uint32_t type,
           const void *data,
           uint32_t len)
{
    unsigned char hdr[20];

    put_be64(hdr, NBD_REP_MAGIC);
    put_be32(hdr + 8, opt);
    put_be32(hdr + 12, type);
    put_be32(hdr + 16, len);
    if (conn_write(h->c, hdr, sizeof hdr, len > 0) < 0)
        return -1;
    if (len && conn_write(h->c, data, len, false) < 0)
        return -1;
    return 0;
}

static int
send_error(struct hs *h, uint32_t opt, uint32_t type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int
send_error(struct hs *h, uint32_t opt, uint32_t type, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    srv_log(h->c->srv, LOG_DEBUG, "%s: option %u: %s", h->c->peer, opt, msg);
    return send_reply(h, opt, type, msg, n);
}

/* A name from the client, for messages: escaped and truncated (never echo
 * 4 KiB back: CVE-2020-10761).
 */
static const char *
show(char *buf, size_t size, const char *s, size_t len)
{
    return qcbt_escape(buf, size, s, len);
}

static uint16_t
transmission_flags(const struct connection *c)
{
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH |
                 NBD_FLAG_SEND_CACHE;

    /* Multi-conn invites more connections (nbdcopy opens 4): only when
     * -e lets a second one in.
     */
    if (c->srv->max_connections > 1)
        f |= NBD_FLAG_CAN_MULTI_CONN;
    if (c->structured)
        f |= NBD_FLAG_SEND_DF;
    return f;
}

static int
send_info_export(struct hs *h, uint32_t opt, const struct export *exp)
{
    unsigned char b[12];

    put_be16(b, NBD_INFO_EXPORT);
    put_be64(b + 2, exp->size);
    put_be16(b + 10, transmission_flags(h->c));
    return send_reply(h, opt, NBD_REP_INFO, b, sizeof b);
}

/* An NBD_REP_INFO carrying a string (name, description). */
static int
send_info_string(struct hs *h, uint32_t opt, uint16_t type, const char *str)
{
    size_t n = strlen(str);
    unsigned char *b = malloc(2 + n);
    int r;

    if (!b)
        return -1;
    put_be16(b, type);
    memcpy(b + 2, str, n);
    r = send_reply(h, opt, NBD_REP_INFO, b, 2 + n);
    free(b);
    return r;
}

/* The export name that starts INFO, GO, LIST_META_CONTEXT and
 * SET_META_CONTEXT payloads, followed by at least TAIL bytes.  Returns 0
 * with *namelen set, 1 after an error reply (the option is consumed), -1
 * when the connection broke.
 */
static int
parse_export_name(struct hs *h,
                  uint32_t opt,
                  const unsigned char *p,
                  uint32_t len,
                  uint32_t tail,
                  uint32_t *namelen)
{
    int r;

    if (len < 4 + tail) {
        r = send_error(h, opt, NBD_REP_ERR_INVALID, "option too short");
        return r < 0 ? -1 : 1;
    }
    *namelen = get_be32(p);
    if (*namelen > len - 4 - tail) {
        r = send_error(h,
                       opt,
                       NBD_REP_ERR_INVALID,
                       "export name length %u exceeds the option",
                       *namelen);
        return r < 0 ? -1 : 1;
    }
    if (*namelen > NBD_MAX_STRING) {
        r = send_error(h,
                       opt,
                       NBD_REP_ERR_INVALID,
                       "export name longer than %d bytes",
                       NBD_MAX_STRING);
        return r < 0 ? -1 : 1;
    }
    return 0;
}

/* NBD_OPT_INFO / NBD_OPT_GO.  Returns 1 to start transmission (GO), 0 to
 * continue, -1 to disconnect.
 */
static int
opt_info_go(struct hs *h, uint32_t opt, const unsigned char *p, uint32_t len)
{
    struct connection *c = h->c;
    uint32_t namelen;
    uint16_t nreq, i;
    bool want_name = false, want_desc = false;
    struct export *exp;
    char shown[100];
    int r;

    r = parse_export_name(h, opt, p, len, 2, &namelen);
    if (r != 0)
        return r < 0 ? -1 : 0;
    nreq = get_be16(p + 4 + namelen);
    if ((uint64_t)len != 6 + (uint64_t)namelen + 2 * (uint64_t)nreq)
        return send_error(h,
                          opt,
                          NBD_REP_ERR_INVALID,
                          "information request count %u does not match the "
                          "option length",
                          nreq);
    for (i = 0; i < nreq; i++) {
        uint16_t t = get_be16(p + 6 + namelen + 2 * i);
        if (t == NBD_INFO_NAME)
            want_name = true;
        else if (t == NBD_INFO_DESCRIPTION)
            want_desc = true;
    }
    exp = server_find_export(c->srv, (const char *)p + 4, namelen);
    if (!exp)
        return send_error(h,
                          opt,
                          NBD_REP_ERR_UNKNOWN,
                          "export '%s' not available",
                          show(shown, 64, (const char *)p + 4, namelen));

    if (want_name && send_info_string(h, opt, NBD_INFO_NAME, exp->name) < 0)
        return -1;
    if (exp->description && (want_desc || opt == NBD_OPT_GO) &&
        send_info_string(h, opt, NBD_INFO_DESCRIPTION, exp->description) < 0)
        return -1;
    {
        unsigned char b[14];

        put_be16(b, NBD_INFO_BLOCK_SIZE);
        put_be32(b + 2, BLOCK_SIZE_MIN);
        put_be32(b + 6, BLOCK_SIZE_PREFERRED);
        put_be32(b + 10, BLOCK_SIZE_MAX);
        if (send_reply(h, opt, NBD_REP_INFO, b, sizeof b) < 0)
            return -1;
    }
    if (send_info_export(h, opt, exp) < 0 ||
        send_reply(h, opt, NBD_REP_ACK, NULL, 0) < 0)
        return -1;
    if (opt == NBD_OPT_GO) {
        c->exp = exp;
        return 1;
    }
    return 0;
}

static int
opt_list(struct hs *h, uint32_t opt, uint32_t len)
{
    struct server *srv = h->c->srv;
    size_t i;

    if (len != 0)
        return send_error(h,
                          opt,
                          NBD_REP_ERR_INVALID,
                          "NBD_OPT_LIST takes no data");
    for (i = 0; i < srv->nr_exports; i++) {
        const struct export *exp = &srv->exports[i];
        size_t n = strlen(exp->name);
        size_t d = exp->description ? strlen(exp->description) : 0;
        unsigned char *b = malloc(4 + n + d);
        int r;

        if (!b)
            return -1;
        put_be32(b, n);
        memcpy(b + 4, exp->name, n);
        if (d)
            memcpy(b + 4 + n, exp->description, d);
        r = send_reply(h, opt, NBD_REP_SERVER, b, 4 + n + d);
        free(b);
        if (r < 0)
            return -1;
    }
    return send_reply(h, opt, NBD_REP_ACK, NULL, 0);
}

static bool
starts_with(const char *q, size_t qlen, const char *prefix)
{
    size_t n = strlen(prefix);

    return qlen >= n && memcmp(q, prefix, n) == 0;
}

static bool
equals(const char *q, size_t qlen, const char *s)
{
    return s && strlen(s) == qlen && memcmp(q, s, qlen) == 0;
}

/* Mark in SEL the contexts of EXP that query Q selects. */
static void
match_query(const struct export *exp,
            const char *q,
            size_t qlen,
            bool list,
            bool *sel)
{
    uint32_t id, n = export_nr_contexts(exp);

    if (list && equals(q, qlen, "base:")) {
        sel[CTX_BASE_ALLOCATION] = true;
        return;
    }
    if (list && equals(q, qlen, "qemu:")) {
        for (id = CTX_ALLOCATION_DEPTH; id < n; id++)
            if (export_context_name(exp, id))
                sel[id] = true;
        return;
    }
    if (list && equals(q, qlen, "qemu:dirty-bitmap:")) {
        for (id = CTX_BITMAP_FIRST; id < n; id++)
            sel[id] = true;
        return;
    }
    if (!starts_with(q, qlen, "base:") && !starts_with(q, qlen, "qemu:"))
        return; /* unknown namespaces are ignored */
    for (id = 0; id < n; id++)
        if (equals(q, qlen, export_context_name(exp, id)))
            sel[id] = true;
}

static int
opt_meta_context(struct hs *h,
                 uint32_t opt,
                 const unsigned char *p,
                 uint32_t len)
{
    struct connection *c = h->c;
    bool list = opt == NBD_OPT_LIST_META_CONTEXT;
    uint32_t namelen, nq, i, id, n, count = 0;
    uint64_t pos;
    struct export *exp;
    bool *sel;
    char shown[100];
    int r = 0;

    if (!list) {
        /* SET replaces the selection even when it fails (proto.md
         * "NBD_OPT_SET_META_CONTEXT"; qemu-nbd does the same).
         */
        free(c->meta_ids);
        c->meta_ids = NULL;
        c->nr_meta = 0;
        c->meta_export = NULL;
    }
    if (!list && !c->structured)
        return send_error(h,
                          opt,
                          NBD_REP_ERR_INVALID,
                          "request option 'set meta context' when "
                          "structured reply is not negotiated");
    r = parse_export_name(h, opt, p, len, 4, &namelen);
    if (r != 0)
        return r < 0 ? -1 : 0;
    nq = get_be32(p + 4 + namelen);
    pos = 8 + (uint64_t)namelen;
    if (nq > (len - pos) / 4)
        return send_error(h,
                          opt,
                          NBD_REP_ERR_INVALID,
                          "%u queries cannot fit in the option",
                          nq);
    exp = server_find_export(c->srv, (const char *)p + 4, namelen);
    if (!exp)
        return send_error(h,
                          opt,
                          NBD_REP_ERR_UNKNOWN,
                          "export '%s' not available",
                          show(shown, 64, (const char *)p + 4, namelen));

    n = export_nr_contexts(exp);
    sel = calloc(n, sizeof *sel);
    if (!sel)
        return -1;
    /* Validate every query before answering anything. */
    for (i = 0; i < nq; i++) {
        uint32_t qlen;

        if (len - pos < 4) {
            free(sel);
            return send_error(h,
                              opt,
                              NBD_REP_ERR_INVALID,
                              "query %u is truncated",
                              i);
        }
        qlen = get_be32(p + pos);
        pos += 4;
        if (qlen > len - pos) {
            free(sel);
            return send_error(h,
                              opt,
                              NBD_REP_ERR_INVALID,
                              "query %u length %u exceeds the option",
                              i,
                              qlen);
        }
        if (qlen > NBD_MAX_STRING) {
            free(sel);
            return send_error(h,
                              opt,
                              NBD_REP_ERR_INVALID,
                              "query %u longer than %d bytes",
                              i,
                              NBD_MAX_STRING);
        }
        if (memchr(p + pos, '\0', qlen)) {
            free(sel);
            return send_error(h,
                              opt,
                              NBD_REP_ERR_INVALID,
                              "query %u contains a NUL byte",
                              i);
        }
        match_query(exp, (const char *)p + pos, qlen, list, sel);
        pos += qlen;
    }
    if (pos != len) {
        free(sel);
        return send_error(h,
                          opt,
                          NBD_REP_ERR_INVALID,
                          "%llu trailing bytes after the queries",
                          (unsigned long long)(len - pos));
    }
    if (list && nq == 0)
        for (id = 0; id < n; id++)
            sel[id] = export_context_name(exp, id) != NULL;

    if (!list) {
        free(c->meta_ids);
        c->meta_ids = calloc(n, sizeof *c->meta_ids);
        c->nr_meta = 0;
        c->meta_export = exp;
        if (!c->meta_ids) {
            free(sel);
            return -1;
        }
    }
    for (id = 0; id < n && r == 0; id++) {
        const char *name = export_context_name(exp, id);
        size_t nl;
        unsigned char *b;

        if (!sel[id] || !name)
            continue;
        nl = strlen(name);
        b = malloc(4 + nl);
        if (!b) {
            r = -1;
            break;
        }
        /* LIST replies carry id 0 (proto.md). */
        put_be32(b, list ? 0 : id);
        memcpy(b + 4, name, nl);
        r = send_reply(h, opt, NBD_REP_META_CONTEXT, b, 4 + nl);
        free(b);
        if (!list)
            c->meta_ids[c->nr_meta++] = id;
        count++;
    }
    free(sel);
    if (r < 0)
        return -1;
    srv_log(c->srv,
            LOG_DEBUG,
            "%s: %s meta context: %u of %u queries "
            "matched %u context(s)",
            c->peer,
            list ? "list" : "set",
            nq,
            nq,
            count);
    return send_reply(h, opt, NBD_REP_ACK, NULL, 0);
}

static int
opt_export_name(struct hs *h, const unsigned char *p, uint32_t len)
{
    struct connection *c = h->c;
    unsigned char b[8 + 2 + 124];
    struct export *exp;
    char shown[100];

    exp = len <= NBD_MAX_STRING
              ? server_find_export(c->srv, (const char *)p, len)
              : NULL;
    if (!exp) {
        /* No error reply exists for EXPORT_NAME: hang up. */
        srv_log(c->srv,
                LOG_INFO,
                "%s: unknown export '%s' requested",
                c->peer,
                show(shown, 64, (const char *)p, len));
        return -1;
    }
    c->exp = exp;
    memset(b, 0, sizeof b);
    put_be64(b, exp->size);
    put_be16(b + 8, transmission_flags(c));
    if (conn_write(c, b, c->no_zeroes ? 10 : sizeof b, false) < 0)
        return -1;
    return 1;
}

/* Consume LEN bytes of option payload unread, by the handshake deadline. */
static int
skip_payload(struct hs *h, uint32_t len)
{
    char buf[4096];

    while (len > 0) {
        uint32_t n = len < sizeof buf ? len : sizeof buf;

        if (conn_read_deadline(h->c, buf, n, h->deadline) < 0)
            return -1;
        len -= n;
    }
    return 0;
}

/* Bytes already waiting behind STARTTLS were sent before the client could
 * see our ACK, which no real client does: they may be plaintext a man in
 * the middle slipped in, to be taken as if they came under TLS (the bug
 * class of nbdkit's CVE-2021-3716, Postfix's CVE-2011-0411).  They are
 * never parsed and never handed to OpenSSL: the caller hangs up.
 */
static bool
plaintext_waiting(int fd)
{
    char b;

    return recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
}

/* NBD_OPT_STARTTLS (proto.md "NBD_OPT_STARTTLS", "TLS support").  0 to go
 * on negotiating (under TLS or after an error reply), -1 to hang up.
 */
static int
opt_starttls(struct hs *h, uint32_t opt, uint32_t len)
{
    struct connection *c = h->c;
    struct server *srv = c->srv;
    char desc[400];

    if (len != 0)
        return send_error(h,
                          opt,
                          NBD_REP_ERR_INVALID,
                          "NBD_OPT_STARTTLS takes no data");
    if (srv->tls_mode == TLS_OFF)
        return send_error(h, opt, NBD_REP_ERR_POLICY, "TLS not configured");
    if (c->tls)
        return send_error(h,
                          opt,
                          NBD_REP_ERR_INVALID,
                          "TLS is already negotiated");
    if (plaintext_waiting(c->fd)) {
        srv_log(srv,
                LOG_INFO,
                "%s: data sent behind NBD_OPT_STARTTLS before our reply "
                "(plaintext injection?): closing",
                c->peer);
        return -1;
    }
    if (send_reply(h, opt, NBD_REP_ACK, NULL, 0) < 0)
        return -1;
    if (tls_accept(srv->tls, c->fd, h->deadline, &c->tls, desc, sizeof desc) <
        0) {
        srv_log(srv, LOG_INFO, "%s: %s", c->peer, qcbt_error_get());
        return -1;
    }
    srv_log(srv, LOG_INFO, "%s: TLS: %s", c->peer, desc);
    /* Forget everything negotiated in plaintext: nothing from before
     * TLS may carry over (proto.md "NBD_OPT_STARTTLS"; CVE-2021-3716).
     */
    c->structured = false;
    free(c->meta_ids);
    c->meta_ids = NULL;
    c->nr_meta = 0;
    c->meta_export = NULL;
    return 0;
}

int
handshake(struct connection *c)
{
    struct hs h = {.c = c,
                   .deadline =
                       now_ms() + (int64_t)c->srv->handshake_timeout * 1000};
    unsigned char greet[18], b[16];
    unsigned char *payload = NULL;
    uint32_t cflags;
    bool fixed;
    unsigned nopts;
    int r = -1;

    c->write_deadline = h.deadline;
    put_be64(greet, NBD_MAGIC);
    put_be64(greet + 8, NBD_OPTS_MAGIC);
    put_be16(greet + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    if (conn_write(c, greet, sizeof greet, false) < 0)
        return -1;
    if (conn_read_deadline(c, b, 4, h.deadline) < 0)
        return -1;
    cflags = get_be32(b);
    if (cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        srv_log(c->srv,
                LOG_INFO,
                "%s: unknown client flags 0x%x",
                c->peer,
                cflags);
        return -1;
    }
    fixed = cflags & NBD_FLAG_C_FIXED_NEWSTYLE;
    c->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;
    if (!fixed && c->srv->tls_mode == TLS_REQUIRE) {
        /* Without fixed newstyle there is no STARTTLS. */
        srv_log(c->srv,
                LOG_INFO,
                "%s: TLS is required but the client cannot do fixed "
                "newstyle",
                c->peer);
        return -1;
    }

    for (nopts = 0;; nopts++) {
        uint32_t opt, len;

        free(payload);
        payload = NULL;
        if (nopts >= MAX_OPTIONS) {
            srv_log(c->srv, LOG_INFO, "%s: too many options", c->peer);
            break;
        }
        if (conn_read_deadline(c, b, 16, h.deadline) < 0) {
            srv_log(c->srv,
                    LOG_DEBUG,
                    "%s: handshake ended (EOF or "
                    "deadline)",
                    c->peer);
            break;
        }
        if (get_be64(b) != NBD_OPTS_MAGIC) {
            srv_log(c->srv, LOG_INFO, "%s: bad option magic", c->peer);
            break;
        }
        opt = get_be32(b + 8);
        len = get_be32(b + 12);
        if (len > MAX_OPTION_LENGTH) {
            srv_log(c->srv,
                    LOG_INFO,
                    "%s: option %u of %u bytes is too "
                    "large",
                    c->peer,
                    opt,
                    len);
            break;
        }
        /* FORCEDTLS (proto.md "TLS support"): before TLS only STARTTLS
         * and ABORT are served.  Anything else is answered TLS_REQD with
         * its payload skipped unread and no export looked up or listed;
         * EXPORT_NAME cannot carry an error, so it ends the connection.
         */
        if (c->srv->tls_mode == TLS_REQUIRE && !c->tls &&
            opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT) {
            if (opt == NBD_OPT_EXPORT_NAME) {
                srv_log(c->srv,
                        LOG_INFO,
                        "%s: NBD_OPT_EXPORT_NAME before TLS: closing",
                        c->peer);
                break;
            }
            if (skip_payload(&h, len) < 0 ||
                send_error(&h,
                           opt,
                           NBD_REP_ERR_TLS_REQD,
                           "TLS is required before option %u",
                           opt) < 0)
                break;
            continue;
        }
        payload = malloc(len ? len : 1);
        if (!payload || conn_read_deadline(c, payload, len, h.deadline) < 0)
            break;
        if (atomic_load(&c->srv->shutting_down)) {
            send_error(&h, opt, NBD_REP_ERR_SHUTDOWN, "server shutting down");
            break;
        }
        if (!fixed && opt != NBD_OPT_EXPORT_NAME)
            break; /* old newstyle: nothing else is possible */

        switch (opt) {
        case NBD_OPT_EXPORT_NAME:
            r = opt_export_name(&h, payload, len);
            goto out;
        case NBD_OPT_GO:
        case NBD_OPT_INFO:
            r = opt_info_go(&h, opt, payload, len);
            if (r != 0)
                goto out;
            break;
        case NBD_OPT_LIST:
            r = opt_list(&h, opt, len);
            break;
        case NBD_OPT_STARTTLS:
            r = opt_starttls(&h, opt, len);
            break;
        case NBD_OPT_ABORT:
            send_reply(&h, opt, NBD_REP_ACK, NULL, 0);
            r = 0;
            goto out;
        case NBD_OPT_STRUCTURED_REPLY:
            if (len != 0)
                r = send_error(&h,
                               opt,
                               NBD_REP_ERR_INVALID,
                               "NBD_OPT_STRUCTURED_REPLY takes no data");
            else if (c->structured)
                r = send_error(&h,
                               opt,
                               NBD_REP_ERR_INVALID,
                               "structured replies already negotiated");
            else {
                c->structured = true;
                r = send_reply(&h, opt, NBD_REP_ACK, NULL, 0);
            }
            break;
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT:
            r = opt_meta_context(&h, opt, payload, len);
            break;
        default:
            r = send_error(&h,
                           opt,
                           NBD_REP_ERR_UNSUP,
                           "unsupported option %u",
                           opt);
            break;
        }
        if (r < 0)
            break;
    }
    r = -1;
out:
    free(payload);
    c->write_deadline = 0;
    if (r == 1) {
        /* A selection made for another export does not carry over. */
        if (c->meta_export != c->exp) {
            free(c->meta_ids);
            c->meta_ids = NULL;
            c->nr_meta = 0;
        }
        /* Simple replies have no block status. */
        if (!c->structured)
            c->nr_meta = 0;
    }
    return r;
}

/* qcbt-server: TLS (proto.md "TLS support", "NBD_OPT_STARTTLS") with
 * OpenSSL.
 *
 * Interoperability with GnuTLS (libnbd, QEMU):
 * - X.509: the directory layout of qemu's tls-creds-x509 and nbdkit's
 *   --tls-certificates (ca-cert.pem, server-cert.pem, server-key.pem,
 *   ca-crl.pem).  qemu's server verifies client certificates by default
 *   (verify-peer=on), nbdkit's does not; each spelling keeps its default.
 * - PSK: psktool's file, one "identity:hexkey" a line.  In TLS 1.2 the
 *   PSK cipher suites (DHE-PSK, ECDHE-PSK, PSK); in TLS 1.3 an external
 *   PSK whose hash GnuTLS takes to be SHA-256, so only the SHA-256 suites
 *   (TLS_AES_128_GCM_SHA256, TLS_CHACHA20_POLY1305_SHA256) are offered.
 *
 * Threads: during transmission one worker reads requests while another
 * writes a reply.  An SSL object must not be used by two threads at once,
 * so every SSL call is made under t->lock with the socket non-blocking,
 * and the waiting (poll) is done without the lock.  Writes go through a
 * buffering BIO so that a 2 MiB reply leaves in a few large send() calls
 * instead of one per 16 KiB record.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include "error.h"
#include "internal.h"
#include "tls.h"

/* As the SO_SNDTIMEO main.c sets on every socket: a peer that takes no
 * reply data for this long is dropped.
 */
#define TLS_SEND_TIMEOUT_MS 120000

/* Ciphertext queued in user space before a send(): 16 records. */
#define TLS_WRITE_BUFFER (256 * 1024)

#define CLOSE_NOTIFY_MS 1000

/* TLS 1.3: AES-128-GCM first (the fastest here with AES-NI, and the
 * suite every TLS 1.3 peer must implement), then the others.  PSK: only
 * the SHA-256 suites, the hash of an external PSK (RFC 8446 4.2.11).
 */
#define CIPHERSUITES_X509                            \
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:" \
    "TLS_CHACHA20_POLY1305_SHA256"
#define CIPHERSUITES_PSK "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
/* TLS 1.2: AEAD with forward secrecy, AES-128-GCM first; for PSK also the
 * plain PSK suites GnuTLS's "+PSK" may insist on, last.
 */
#define CIPHERS_X509                                             \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:" \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:" \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:" \
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:"       \
    "DHE-RSA-CHACHA20-POLY1305"
#define CIPHERS_PSK                                          \
    "DHE-PSK-AES128-GCM-SHA256:DHE-PSK-AES256-GCM-SHA384:"   \
    "ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-CHACHA20-POLY1305:" \
    "PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305"

struct psk_entry {
    char *identity;
    size_t identity_len;
    unsigned char key[PSK_MAX_PSK_LEN];
    size_t key_len;
};

struct tls_server {
    SSL_CTX *ctx;
    struct psk_entry *psk; /* NULL: X.509 */
    size_t nr_psk;
};

struct tls_conn {
    SSL *ssl;
    int fd;
    pthread_mutex_t lock; /* the SSL object: one call at a time */
    /* Whether the session holds bytes the peer sent that no tls_read()
     * has taken yet.  Only tls_read() consumes them, so it keeps this up
     * to date and tls_pending() needs no lock: the worker about to wait
     * for a request is not held up by one encrypting a reply.
     */
    atomic_bool pending;
    /* Handshake only: what the PSK callbacks saw, for the log. */
    const struct psk_entry *psk_used;
    char unknown_identity[80];
};

/* ---------------------------------------------------------------------
 * Options
 */

static int
set_string(char **dst, const char *name, const char *arg)
{
    if (*dst)
        return qcbt_error(EINVAL, "%s given twice", name);
    *dst = strdup(arg);
    if (!*dst)
        return qcbt_error(ENOMEM, "out of memory");
    return 0;
}

static int
parse_bool(const char *what, const char *v, bool *out)
{
    if (!strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true") ||
        !strcmp(v, "1")) {
        *out = true;
        return 0;
    }
    if (!strcmp(v, "off") || !strcmp(v, "no") || !strcmp(v, "false") ||
        !strcmp(v, "0")) {
        *out = false;
        return 0;
    }
    return qcbt_error(EINVAL, "%s=%s: expected on or off", what, v);
}

/* Split a QemuOpts string at single commas (",," is a literal comma).
 * Returns the number of items, each a malloc'd string in *ITEMS.
 */
static int
split_qemu_opts(const char *spec, char ***items, size_t *nr)
{
    size_t len = strlen(spec), n = 0, i;
    char **v = NULL, *cur = malloc(len + 1);
    size_t k = 0;

    *items = NULL;
    *nr = 0;
    if (!cur)
        return qcbt_error(ENOMEM, "out of memory");
    for (i = 0; i <= len; i++) {
        if (spec[i] == ',' && spec[i + 1] == ',') {
            cur[k++] = ',';
            i++;
            continue;
        }
        if (spec[i] == ',' || spec[i] == '\0') {
            char **nv = realloc(v, (n + 1) * sizeof *nv);

            if (!nv)
                goto oom;
            v = nv;
            cur[k] = '\0';
            v[n] = strdup(cur);
            if (!v[n])
                goto oom;
            n++;
            k = 0;
            continue;
        }
        cur[k++] = spec[i];
    }
    free(cur);
    *items = v;
    *nr = n;
    return 0;
oom:
    free(cur);
    for (i = 0; i < n; i++)
        free(v[i]);
    free(v);
    return qcbt_error(ENOMEM, "out of memory");
}

/* --object tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=B]
 * --object tls-creds-psk,id=ID,dir=DIR,endpoint=server
 */
static int
parse_object(struct tls_options *o, const char *spec)
{
    struct tls_object obj = {.verify_peer = -1};
    char **items;
    size_t nr, i;
    bool server = false;
    int r = 0;

    if (spec[0] == '{')
        return qcbt_error(EINVAL,
                          "--object: JSON syntax is not supported; use "
                          "tls-creds-x509,id=ID,dir=DIR,endpoint=server");
    r = split_qemu_opts(spec, &items, &nr);
    if (r < 0)
        return r;
    for (i = 0; i < nr && r == 0; i++) {
        char *k = items[i], *v = strchr(k, '=');

        if (i == 0 && !v) {
            v = k; /* the type, without "qom-type=" */
            k = "qom-type";
        } else if (!v) {
            r = qcbt_error(EINVAL, "--object: '%s' is not KEY=VALUE", k);
            break;
        } else {
            *v++ = '\0';
        }
        if (!strcmp(k, "qom-type")) {
            if (!strcmp(v, "tls-creds-x509"))
                obj.psk = false;
            else if (!strcmp(v, "tls-creds-psk"))
                obj.psk = true;
            else
                r = qcbt_error(EINVAL,
                               "--object %s: qcbt-server knows only "
                               "tls-creds-x509 and tls-creds-psk objects",
                               v);
        } else if (!strcmp(k, "id")) {
            free(obj.id);
            obj.id = strdup(v);
        } else if (!strcmp(k, "dir")) {
            free(obj.dir);
            obj.dir = strdup(v);
        } else if (!strcmp(k, "endpoint")) {
            if (!strcmp(v, "server"))
                server = true;
            else
                r = qcbt_error(EINVAL,
                               "--object: endpoint=%s: qcbt-server needs "
                               "credentials with endpoint=server",
                               v);
        } else if (!strcmp(k, "verify-peer")) {
            bool b = false;

            r = parse_bool("verify-peer", v, &b);
            obj.verify_peer = b;
        } else if (!strcmp(k, "sanity-check") || !strcmp(k, "loaded") ||
                   !strcmp(k, "username") || !strcmp(k, "priority")) {
            /* sanity-check, loaded: qemu's load-time checks; username:
             * client side only; priority: a GnuTLS priority string,
             * which OpenSSL cannot take (our suites are fixed above).
             */
        } else if (!strcmp(k, "passwordid")) {
            r = qcbt_error(ENOTSUP,
                           "--object: passwordid (an encrypted key) is not "
                           "supported");
        } else {
            r = qcbt_error(EINVAL, "--object: unknown property '%s'", k);
        }
    }
    for (i = 0; i < nr; i++)
        free(items[i]);
    free(items);
    if (r == 0 && (!obj.id || !obj.dir))
        r = qcbt_error(EINVAL, "--object %s: id= and dir= are required", spec);
    if (r == 0 && !server)
        r = qcbt_error(EINVAL,
                       "--object %s: endpoint=server is required (qemu's "
                       "default is client)",
                       obj.id);
    for (i = 0; r == 0 && i < o->nr_objects; i++)
        if (!strcmp(o->objects[i].id, obj.id))
            r = qcbt_error(EINVAL, "--object: id '%s' used twice", obj.id);
    if (r == 0) {
        struct tls_object *nv =
            realloc(o->objects, (o->nr_objects + 1) * sizeof *nv);

        if (!nv) {
            r = qcbt_error(ENOMEM, "out of memory");
        } else {
            o->objects = nv;
            o->objects[o->nr_objects++] = obj;
            return 0;
        }
    }
    free(obj.id);
    free(obj.dir);
    return r;
}

int
tls_option(struct tls_options *o, int opt, const char *arg)
{
    switch (opt) {
    case TLS_OPT_MODE:
        if (!strcmp(arg, "require"))
            o->mode = TLS_REQUIRE;
        else if (!strcmp(arg, "on") || !strcmp(arg, "yes") ||
                 !strcmp(arg, "true"))
            o->mode = TLS_ON;
        else if (!strcmp(arg, "off") || !strcmp(arg, "no") ||
                 !strcmp(arg, "false"))
            o->mode = TLS_OFF;
        else
            return qcbt_error(EINVAL,
                              "--tls=%s: expected off, on or require",
                              arg);
        o->mode_given = true;
        return 0;
    case TLS_OPT_CERTIFICATES:
        return set_string(&o->dir, "--tls-certificates", arg);
    case TLS_OPT_CERT:
        return set_string(&o->cert, "--tls-cert", arg);
    case TLS_OPT_KEY:
        return set_string(&o->key, "--tls-key", arg);
    case TLS_OPT_CA:
        return set_string(&o->ca, "--tls-ca", arg);
    case TLS_OPT_CRL:
        return set_string(&o->crl, "--tls-crl", arg);
    case TLS_OPT_PSK:
        return set_string(&o->psk, "--tls-psk", arg);
    case TLS_OPT_VERIFY_PEER:
        o->verify_peer = true;
        return 0;
    case TLS_OPT_OBJECT:
        return parse_object(o, arg);
    case TLS_OPT_CREDS:
        return set_string(&o->creds, "--tls-creds", arg);
    }
    return qcbt_error(EINVAL, "unknown TLS option");
}

void
tls_options_free(struct tls_options *o)
{
    size_t i;

    free(o->dir);
    free(o->cert);
    free(o->key);
    free(o->ca);
    free(o->crl);
    free(o->psk);
    free(o->creds);
    for (i = 0; i < o->nr_objects; i++) {
        free(o->objects[i].id);
        free(o->objects[i].dir);
    }
    free(o->objects);
    memset(o, 0, sizeof *o);
}

void
tls_usage(FILE *fp)
{
    fprintf(
        fp,
        "TLS (see qcbt-server(8)):\n"
        "      --tls=off|on|require  off (default without credentials), on\n"
        "                            (TLS optional) or require (default "
        "with\n"
        "                            credentials)\n"
        "      --tls-certificates DIR  ca-cert.pem, server-cert.pem,\n"
        "                            server-key.pem [, ca-crl.pem] (qemu, "
        "nbdkit)\n"
        "      --tls-cert FILE, --tls-key FILE, --tls-ca FILE, --tls-crl "
        "FILE\n"
        "      --tls-verify-peer     require a client certificate signed by "
        "the CA\n"
        "      --tls-psk FILE        pre-shared keys, psktool's "
        "\"identity:hexkey\"\n"
        "      --object tls-creds-x509,id=ID,dir=DIR,endpoint=server"
        "[,verify-peer=on|off]\n"
        "      --object tls-creds-psk,id=ID,dir=DIR,endpoint=server  "
        "(DIR/keys.psk)\n"
        "      --tls-creds ID        use object ID; TLS required (as "
        "qemu-nbd)\n");
}

/* ---------------------------------------------------------------------
 * Loading credentials
 */

/* The reason of the most recent OpenSSL error of this thread. */
static const char *
ssl_reason(void)
{
    unsigned long e = ERR_peek_last_error();
    const char *s = e ? ERR_reason_error_string(e) : NULL;

    return s ? s : "unknown OpenSSL error";
}

static char *
join(const char *dir, const char *name)
{
    char *p;

    if (asprintf(&p, "%s/%s", dir, name) < 0)
        return NULL;
    return p;
}

static bool
exists(const char *path)
{
    return access(path, F_OK) == 0;
}

static int
check_readable(const char *what, const char *path)
{
    if (access(path, R_OK) < 0)
        return qcbt_error(errno, "%s %s: %s", what, path, strerror(errno));
    return 0;
}

static int
hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static void
psk_free(struct tls_server *ts)
{
    size_t i;

    for (i = 0; i < ts->nr_psk; i++) {
        OPENSSL_cleanse(ts->psk[i].key, sizeof ts->psk[i].key);
        free(ts->psk[i].identity);
    }
    free(ts->psk);
    ts->psk = NULL;
    ts->nr_psk = 0;
}

/* psktool's file: "identity:hexkey" lines.  Messages name the line, never
 * the key.
 */
static int
load_psk_file(struct tls_server *ts, const char *path)
{
    FILE *fp = fopen(path, "re");
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    unsigned lineno = 0;
    int r = 0;

    if (!fp)
        return qcbt_error(errno, "PSK file %s: %s", path, strerror(errno));
    while (r == 0 && (n = getline(&line, &cap, fp)) >= 0) {
        struct psk_entry *e, *nv;
        char *colon, *hex;
        size_t idlen, hexlen, i;

        lineno++;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = '\0';
        if (n == 0)
            continue;
        colon = strchr(line, ':');
        if (!colon || colon == line) {
            r = qcbt_error(EINVAL,
                           "PSK file %s line %u: expected identity:hexkey",
                           path,
                           lineno);
            break;
        }
        idlen = colon - line;
        hex = colon + 1;
        hexlen = strlen(hex);
        if (idlen > PSK_MAX_IDENTITY_LEN) {
            r = qcbt_error(EINVAL,
                           "PSK file %s line %u: identity longer than %d "
                           "bytes",
                           path,
                           lineno,
                           PSK_MAX_IDENTITY_LEN);
            break;
        }
        if (hexlen == 0 || hexlen % 2 || hexlen / 2 > PSK_MAX_PSK_LEN) {
            r = qcbt_error(EINVAL,
                           "PSK file %s line %u: the key must be 1 to %d "
                           "bytes in hexadecimal",
                           path,
                           lineno,
                           PSK_MAX_PSK_LEN);
            break;
        }
        for (i = 0; i < ts->nr_psk; i++)
            if (ts->psk[i].identity_len == idlen &&
                !memcmp(ts->psk[i].identity, line, idlen))
                break;
        if (i < ts->nr_psk) {
            r = qcbt_error(EINVAL,
                           "PSK file %s line %u: identity listed twice",
                           path,
                           lineno);
            break;
        }
        nv = realloc(ts->psk, (ts->nr_psk + 1) * sizeof *nv);
        if (!nv) {
            r = qcbt_error(ENOMEM, "out of memory");
            break;
        }
        ts->psk = nv;
        e = &ts->psk[ts->nr_psk];
        memset(e, 0, sizeof *e);
        e->identity = strndup(line, idlen);
        if (!e->identity) {
            r = qcbt_error(ENOMEM, "out of memory");
            break;
        }
        e->identity_len = idlen;
        ts->nr_psk++;
        for (i = 0; i < hexlen / 2; i++) {
            int hi = hexval((unsigned char)hex[2 * i]);
            int lo = hexval((unsigned char)hex[2 * i + 1]);

            if (hi < 0 || lo < 0) {
                r = qcbt_error(EINVAL,
                               "PSK file %s line %u: the key is not "
                               "hexadecimal",
                               path,
                               lineno);
                break;
            }
            e->key[i] = (unsigned char)(hi << 4 | lo);
        }
        e->key_len = hexlen / 2;
    }
    if (r == 0 && ferror(fp))
        r = qcbt_error(EIO, "PSK file %s: read error", path);
    if (r == 0 && ts->nr_psk == 0)
        r = qcbt_error(EINVAL, "PSK file %s holds no key", path);
    if (line) {
        OPENSSL_cleanse(line, cap);
        free(line);
    }
    fclose(fp);
    return r;
}

static const struct psk_entry *
psk_find(const struct tls_server *ts, const void *identity, size_t len)
{
    size_t i;

    for (i = 0; i < ts->nr_psk; i++)
        if (ts->psk[i].identity_len == len &&
            !memcmp(ts->psk[i].identity, identity, len))
            return &ts->psk[i];
    return NULL;
}

static void
note_unknown_identity(SSL *ssl, const void *identity, size_t len)
{
    struct tls_conn *t = SSL_get_app_data(ssl);

    if (t)
        qcbt_escape(t->unknown_identity,
                    sizeof t->unknown_identity,
                    identity,
                    len);
}

/* TLS 1.2 (and TLS 1.3's fallback when the callback below finds nothing:
 * never, as it is set too).
 */
static unsigned int
psk_server_cb(SSL *ssl,
              const char *identity,
              unsigned char *psk,
              unsigned int max_psk_len)
{
    const struct tls_server *ts = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    const struct psk_entry *e;
    struct tls_conn *t = SSL_get_app_data(ssl);

    if (!identity)
        return 0;
    e = psk_find(ts, identity, strlen(identity));
    if (!e || e->key_len > max_psk_len) {
        note_unknown_identity(ssl, identity, strlen(identity));
        return 0;
    }
    memcpy(psk, e->key, e->key_len);
    if (t)
        t->psk_used = e;
    return (unsigned int)e->key_len;
}

/* TLS 1.3: an external PSK is a session with the key as its master
 * secret and a SHA-256 suite (GnuTLS's default hash for external PSKs).
 */
static int
psk_find_session_cb(SSL *ssl,
                    const unsigned char *identity,
                    size_t identity_len,
                    SSL_SESSION **sess)
{
    static const unsigned char aes128gcm_sha256[2] = {0x13, 0x01};
    const struct tls_server *ts = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    const struct psk_entry *e = psk_find(ts, identity, identity_len);
    struct tls_conn *t = SSL_get_app_data(ssl);
    const SSL_CIPHER *cipher;
    SSL_SESSION *s;

    *sess = NULL;
    if (!e) {
        /* No session: the handshake goes on without a PSK and fails, as
         * there is no certificate either.
         */
        note_unknown_identity(ssl, identity, identity_len);
        return 1;
    }
    cipher = SSL_CIPHER_find(ssl, aes128gcm_sha256);
    s = SSL_SESSION_new();
    if (!cipher || !s || !SSL_SESSION_set1_master_key(s, e->key, e->key_len) ||
        !SSL_SESSION_set_cipher(s, cipher) ||
        !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
        SSL_SESSION_free(s);
        return 0;
    }
    if (t)
        t->psk_used = e;
    *sess = s;
    return 1;
}

/* Warn (not fail: the clock may be what is wrong) when our own
 * certificate is outside its validity period.
 */
static void
warn_validity(SSL_CTX *ctx, const char *path)
{
    X509 *x = SSL_CTX_get0_certificate(ctx);

    if (!x)
        return;
    if (X509_cmp_current_time(X509_get0_notAfter(x)) < 0)
        fprintf(stderr,
                "qcbt-server: warning: certificate %s has expired: clients "
                "will refuse it\n",
                path);
    else if (X509_cmp_current_time(X509_get0_notBefore(x)) > 0)
        fprintf(stderr,
                "qcbt-server: warning: certificate %s is not valid yet: "
                "clients will refuse it\n",
                path);
}

static int
load_x509(struct tls_server *ts,
          const char *cert,
          const char *key,
          const char *ca,
          const char *crl,
          bool verify_peer)
{
    SSL_CTX *ctx = ts->ctx;
    int r;

    if ((r = check_readable("certificate", cert)) < 0 ||
        (r = check_readable("key", key)) < 0)
        return r;
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
        return qcbt_error(EINVAL, "certificate %s: %s", cert, ssl_reason());
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH)
            return qcbt_error(EINVAL,
                              "key %s does not match certificate %s",
                              key,
                              cert);
        return qcbt_error(EINVAL, "key %s: %s", key, ssl_reason());
    }
    if (SSL_CTX_check_private_key(ctx) != 1)
        return qcbt_error(EINVAL,
                          "key %s does not match certificate %s",
                          key,
                          cert);
    warn_validity(ctx, cert);
    if (!verify_peer)
        return 0;

    if (!ca)
        return qcbt_error(EINVAL,
                          "verifying client certificates needs a CA "
                          "(--tls-ca, or ca-cert.pem in the directory)");
    if ((r = check_readable("CA certificate", ca)) < 0)
        return r;
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
        return qcbt_error(EINVAL, "CA certificate %s: %s", ca, ssl_reason());
    /* No certificate_authorities list in the request: GnuTLS clients
     * then send their certificate whoever signed it, and a refusal says
     * why ("unable to get local issuer certificate") instead of "no
     * certificate"; nor are our CA names shown before authentication.
     */
    if (crl) {
        X509_STORE *store = SSL_CTX_get_cert_store(ctx);
        X509_LOOKUP *lu = X509_STORE_add_lookup(store, X509_LOOKUP_file());

        if ((r = check_readable("CRL", crl)) < 0)
            return r;
        if (!lu || X509_load_crl_file(lu, crl, X509_FILETYPE_PEM) <= 0)
            return qcbt_error(EINVAL, "CRL %s: %s", crl, ssl_reason());
        X509_STORE_set_flags(store,
                             X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
    }
    SSL_CTX_set_verify(ctx,
                       SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                       NULL);
    return 0;
}

int
tls_server_new(const struct tls_options *o,
               enum tls_mode *mode,
               struct tls_server **out)
{
    const char *dir = o->dir, *psk = o->psk;
    char *cert = NULL, *key = NULL, *ca = NULL, *crl = NULL, *pskpath = NULL;
    bool verify_peer = o->verify_peer, have_creds;
    struct tls_server *ts = NULL;
    SSL_CTX *ctx;
    int r = 0;

    *out = NULL;
    *mode = TLS_OFF;
    if (o->creds) {
        const struct tls_object *obj = NULL;
        size_t i;

        for (i = 0; i < o->nr_objects; i++)
            if (!strcmp(o->objects[i].id, o->creds))
                obj = &o->objects[i];
        if (!obj)
            return qcbt_error(EINVAL,
                              "--tls-creds %s: no --object with that id",
                              o->creds);
        if (o->dir || o->cert || o->key || o->ca || o->crl || o->psk ||
            o->verify_peer)
            return qcbt_error(EINVAL,
                              "--tls-creds cannot be combined with "
                              "--tls-certificates/-cert/-key/-ca/-crl/-psk/"
                              "-verify-peer");
        if (obj->psk) {
            pskpath = join(obj->dir, "keys.psk");
            if (!pskpath)
                return qcbt_error(ENOMEM, "out of memory");
            psk = pskpath;
        } else {
            dir = obj->dir;
            /* qemu: verify-peer defaults to on. */
            verify_peer = obj->verify_peer != 0;
        }
    } else if (o->nr_objects) {
        return qcbt_error(EINVAL, "--object given without --tls-creds");
    }

    have_creds = dir || o->cert || o->key || psk;
    *mode = o->mode_given ? o->mode : have_creds ? TLS_REQUIRE : TLS_OFF;
    if (*mode == TLS_OFF) {
        if (have_creds || o->ca || o->crl || verify_peer)
            r = qcbt_error(EINVAL, "TLS credentials given with --tls=off");
        goto out;
    }
    if (!have_creds) {
        r = qcbt_error(EINVAL,
                       "--tls=%s needs credentials: --tls-certificates, "
                       "--tls-cert and --tls-key, --tls-psk or --tls-creds",
                       *mode == TLS_ON ? "on" : "require");
        goto out;
    }
    if (psk && (dir || o->cert || o->key || o->ca || o->crl || verify_peer)) {
        r = qcbt_error(EINVAL,
                       "--tls-psk cannot be combined with certificates");
        goto out;
    }

    ts = calloc(1, sizeof *ts);
    ctx = SSL_CTX_new(TLS_server_method());
    if (!ts || !ctx) {
        SSL_CTX_free(ctx);
        r = qcbt_error(ENOMEM, "cannot create the TLS context");
        goto out;
    }
    ts->ctx = ctx;
    SSL_CTX_set_app_data(ctx, ts);
    /* TLS 1.2 and 1.3 only; no renegotiation, compression, tickets or
     * session cache (NBD clients make one session per connection).
     */
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx,
                        SSL_OP_NO_RENEGOTIATION |
                            SSL_OP_CIPHER_SERVER_PREFERENCE |
                            SSL_OP_NO_COMPRESSION | SSL_OP_NO_TICKET);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(ctx,
                     SSL_MODE_ENABLE_PARTIAL_WRITE |
                         SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_dh_auto(ctx, 1);

    if (psk) {
        if (SSL_CTX_set_ciphersuites(ctx, CIPHERSUITES_PSK) != 1 ||
            SSL_CTX_set_cipher_list(ctx, CIPHERS_PSK) != 1) {
            r = qcbt_error(EINVAL, "PSK cipher suites: %s", ssl_reason());
            goto out;
        }
        r = load_psk_file(ts, psk);
        if (r < 0)
            goto out;
        SSL_CTX_set_psk_server_callback(ctx, psk_server_cb);
        SSL_CTX_set_psk_find_session_callback(ctx, psk_find_session_cb);
        goto out;
    }

    if (SSL_CTX_set_ciphersuites(ctx, CIPHERSUITES_X509) != 1 ||
        SSL_CTX_set_cipher_list(ctx, CIPHERS_X509) != 1) {
        r = qcbt_error(EINVAL, "cipher suites: %s", ssl_reason());
        goto out;
    }
    if (dir) {
        struct stat st;

        if (stat(dir, &st) < 0) {
            r = qcbt_error(errno,
                           "TLS certificate directory %s: %s",
                           dir,
                           strerror(errno));
            goto out;
        }
        if (!S_ISDIR(st.st_mode)) {
            r = qcbt_error(ENOTDIR,
                           "TLS certificate directory %s: not a directory",
                           dir);
            goto out;
        }
        cert = join(dir, "server-cert.pem");
        key = join(dir, "server-key.pem");
        ca = join(dir, "ca-cert.pem");
        crl = join(dir, "ca-crl.pem");
        if (!cert || !key || !ca || !crl) {
            r = qcbt_error(ENOMEM, "out of memory");
            goto out;
        }
        /* Only the server's own pair must be there. */
        if (!exists(ca)) {
            free(ca);
            ca = NULL;
        }
        if (!exists(crl)) {
            free(crl);
            crl = NULL;
        }
    }
    if (!(o->cert ? o->cert : cert) || !(o->key ? o->key : key)) {
        r = qcbt_error(EINVAL,
                       "a certificate needs its key: give --tls-cert and "
                       "--tls-key, or --tls-certificates DIR");
        goto out;
    }
    r = load_x509(ts,
                  o->cert ? o->cert : cert,
                  o->key ? o->key : key,
                  o->ca ? o->ca : ca,
                  o->crl ? o->crl : crl,
                  verify_peer);
out:
    free(cert);
    free(key);
    free(ca);
    free(crl);
    free(pskpath);
    if (r < 0) {
        tls_server_free(ts);
        return r;
    }
    *out = ts;
    ERR_clear_error();
    return 0;
}

void
tls_server_free(struct tls_server *ts)
{
    if (!ts)
        return;
    SSL_CTX_free(ts->ctx);
    psk_free(ts);
    free(ts);
}

/* ---------------------------------------------------------------------
 * Connections
 */

/* Wait until FD is ready for EVENTS or DEADLINE_MS passes (< 0: never).
 * 0 when ready (or hung up: the next call finds out), -1 on timeout.
 */
static int
wait_fd(int fd, short events, int64_t deadline_ms)
{
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = events};
        int timeout = -1, r;

        if (deadline_ms >= 0) {
            int64_t left = deadline_ms - now_ms();

            if (left <= 0)
                return -1;
            timeout = left > INT_MAX ? INT_MAX : (int)left;
        }
        r = poll(&pfd, 1, timeout);
        if (r > 0)
            return 0;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

static void
describe(struct tls_conn *t, char *desc, size_t len)
{
    char who[300] = "";

    if (!desc || !len)
        return;
    if (t->psk_used) {
        char id[80];

        qcbt_escape(id,
                    sizeof id,
                    t->psk_used->identity,
                    t->psk_used->identity_len);
        snprintf(who, sizeof who, ", PSK identity '%s'", id);
    } else {
        X509 *peer = SSL_get0_peer_certificate(t->ssl);

        if (peer) {
            char name[256], shown[200];

            X509_NAME_oneline(X509_get_subject_name(peer), name, sizeof name);
            qcbt_escape(shown, sizeof shown, name, strlen(name));
            snprintf(who, sizeof who, ", client certificate %s", shown);
        }
    }
    snprintf(desc,
             len,
             "%s %s%s",
             SSL_get_version(t->ssl),
             SSL_get_cipher_name(t->ssl),
             who);
}

/* Why the handshake failed, in one line. */
static int
handshake_error(struct tls_conn *t, int err, bool timed_out)
{
    long v = SSL_get_verify_result(t->ssl);
    unsigned long e = ERR_peek_last_error();

    if (timed_out)
        return qcbt_error(ETIMEDOUT, "TLS handshake timed out");
    if (!t->psk_used && t->unknown_identity[0])
        return qcbt_error(EACCES,
                          "unknown PSK identity '%s'",
                          t->unknown_identity);
    if (v != X509_V_OK)
        return qcbt_error(EACCES,
                          "client certificate refused: %s",
                          X509_verify_cert_error_string(v));
    if (e && t->psk_used) {
        char id[80];

        qcbt_escape(id,
                    sizeof id,
                    t->psk_used->identity,
                    t->psk_used->identity_len);
        return qcbt_error(EACCES,
                          "TLS handshake failed for PSK identity '%s' "
                          "(wrong key?): %s",
                          id,
                          ssl_reason());
    }
    if (e)
        return qcbt_error(EPROTO, "TLS handshake failed: %s", ssl_reason());
    if (err == SSL_ERROR_SYSCALL || err == SSL_ERROR_ZERO_RETURN)
        return qcbt_error(ECONNRESET,
                          "TLS handshake failed: the client closed the "
                          "connection");
    return qcbt_error(EPROTO, "TLS handshake failed (error %d)", err);
}

int
tls_accept(struct tls_server *ts,
           int fd,
           int64_t deadline_ms,
           struct tls_conn **out,
           char *desc,
           size_t desclen)
{
    struct tls_conn *t = calloc(1, sizeof *t);
    BIO *rbio = NULL, *wbio = NULL, *sbio = NULL;
    int fl, r;

    *out = NULL;
    if (!t)
        return qcbt_error(ENOMEM, "out of memory");
    t->fd = fd;
    pthread_mutex_init(&t->lock, NULL);
    fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        r = qcbt_error(errno, "fcntl: %s", strerror(errno));
        goto fail;
    }
    ERR_clear_error();
    t->ssl = SSL_new(ts->ctx);
    rbio = BIO_new_socket(fd, BIO_NOCLOSE);
    sbio = BIO_new_socket(fd, BIO_NOCLOSE);
    wbio = BIO_new(BIO_f_buffer());
    if (!t->ssl || !rbio || !sbio || !wbio ||
        BIO_set_write_buffer_size(wbio, TLS_WRITE_BUFFER) != 1) {
        BIO_free(rbio);
        BIO_free(sbio);
        BIO_free(wbio);
        r = qcbt_error(ENOMEM, "cannot create the TLS session");
        goto fail;
    }
    BIO_push(wbio, sbio);
    SSL_set_bio(t->ssl, rbio, wbio); /* the SSL owns both now */
    SSL_set_app_data(t->ssl, t);

    for (;;) {
        int err;

        ERR_clear_error();
        r = SSL_accept(t->ssl);
        if (r == 1)
            break;
        err = SSL_get_error(t->ssl, r);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
            if (wait_fd(fd,
                        err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT,
                        deadline_ms) == 0)
                continue;
            r = handshake_error(t, err, true);
            goto fail;
        }
        r = handshake_error(t, err, false);
        goto fail;
    }
    describe(t, desc, desclen);
    SSL_set_app_data(t->ssl, NULL);
    atomic_store(&t->pending, SSL_has_pending(t->ssl) == 1);
    ERR_clear_error();
    *out = t;
    return 0;
fail:
    ERR_clear_error();
    tls_conn_free(t);
    return -1;
}

int
tls_read(struct tls_conn *t, void *buf, size_t len, int64_t deadline_ms)
{
    char *p = buf;

    while (len > 0) {
        size_t n = 0;
        int ok, err = SSL_ERROR_NONE;

        pthread_mutex_lock(&t->lock);
        ERR_clear_error();
        ok = SSL_read_ex(t->ssl, p, len, &n);
        if (!ok)
            err = SSL_get_error(t->ssl, ok);
        atomic_store(&t->pending, SSL_has_pending(t->ssl) == 1);
        pthread_mutex_unlock(&t->lock);
        if (ok) {
            p += n;
            len -= n;
            continue;
        }
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
            if (wait_fd(t->fd,
                        err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT,
                        deadline_ms) < 0)
                return -1;
            continue;
        }
        return -1; /* close_notify, EOF or a TLS error */
    }
    return 0;
}

bool
tls_pending(struct tls_conn *t)
{
    return atomic_load(&t->pending);
}

/* Wait for the peer to take data: until DEADLINE_MS, or (< 0) for at most
 * TLS_SEND_TIMEOUT_MS from now.
 */
static int
wait_writable(struct tls_conn *t, int64_t deadline_ms)
{
    if (deadline_ms < 0)
        deadline_ms = now_ms() + TLS_SEND_TIMEOUT_MS;
    return wait_fd(t->fd, POLLOUT, deadline_ms);
}

int
tls_write(struct tls_conn *t,
          const void *buf,
          size_t len,
          bool more,
          int64_t deadline_ms)
{
    const char *p = buf;

    /* With SSL_MODE_ENABLE_PARTIAL_WRITE each call writes at least one
     * record, and the lock is free in between for the request reader.
     */
    while (len > 0) {
        size_t n = 0;
        int ok, err = SSL_ERROR_NONE;

        pthread_mutex_lock(&t->lock);
        ERR_clear_error();
        ok = SSL_write_ex(t->ssl, p, len, &n);
        if (!ok)
            err = SSL_get_error(t->ssl, ok);
        pthread_mutex_unlock(&t->lock);
        if (ok) {
            p += n;
            len -= n;
            continue;
        }
        if (err == SSL_ERROR_WANT_WRITE) {
            if (wait_writable(t, deadline_ms) < 0)
                return -1;
            continue;
        }
        if (err == SSL_ERROR_WANT_READ) {
            if (wait_fd(t->fd, POLLIN, deadline_ms) < 0)
                return -1;
            continue;
        }
        return -1;
    }
    if (more)
        return 0;
    for (;;) {
        BIO *wbio;
        int r;
        bool retry;

        pthread_mutex_lock(&t->lock);
        wbio = SSL_get_wbio(t->ssl);
        r = BIO_flush(wbio);
        retry = r <= 0 && BIO_should_retry(wbio);
        pthread_mutex_unlock(&t->lock);
        if (r > 0)
            return 0;
        if (!retry || wait_writable(t, deadline_ms) < 0)
            return -1;
    }
}

void
tls_close_notify(struct tls_conn *t)
{
    int64_t deadline = now_ms() + CLOSE_NOTIFY_MS;

    if (!t)
        return;
    pthread_mutex_lock(&t->lock);
    for (;;) {
        int r, err;

        ERR_clear_error();
        r = SSL_shutdown(t->ssl);
        if (r >= 0) {
            /* close_notify is queued: push it out. */
            BIO *wbio = SSL_get_wbio(t->ssl);

            while (BIO_flush(wbio) <= 0 && BIO_should_retry(wbio) &&
                   wait_fd(t->fd, POLLOUT, deadline) == 0)
                ;
            break;
        }
        err = SSL_get_error(t->ssl, r);
        if (err != SSL_ERROR_WANT_WRITE ||
            wait_fd(t->fd, POLLOUT, deadline) < 0)
            break;
    }
    ERR_clear_error();
    pthread_mutex_unlock(&t->lock);
}

void
tls_conn_free(struct tls_conn *t)
{
    if (!t)
        return;
    SSL_free(t->ssl);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

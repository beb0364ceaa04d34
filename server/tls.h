/* qcbt-server: TLS for NBD (proto.md "TLS support"), with OpenSSL.
 *
 * The server side of NBD_OPT_STARTTLS: X.509 certificates (optionally
 * verifying the client's) or pre-shared keys in psktool's format, TLS 1.2
 * and 1.3, interoperating with the GnuTLS clients of libnbd and QEMU.
 * The command line takes nbdkit's spelling (--tls, --tls-certificates,
 * --tls-psk, --tls-verify-peer), single files (--tls-cert, --tls-key,
 * --tls-ca, --tls-crl) and qemu-nbd's (--object tls-creds-x509|psk,...
 * --tls-creds ID).
 */
#ifndef QCBT_SERVER_TLS_H
#define QCBT_SERVER_TLS_H

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* proto.md: NOTLS, SELECTIVETLS without TLS-only exports (nbdkit's
 * --tls=on: TLS is offered, plaintext clients are served too) and
 * FORCEDTLS.
 */
enum tls_mode {
    TLS_OFF,
    TLS_ON,
    TLS_REQUIRE,
};

/* getopt_long values of the TLS options; main.c puts TLS_LONG_OPTIONS in
 * its table and hands these to tls_option().
 */
enum {
    TLS_OPT_MODE = 0x1000,
    TLS_OPT_CERTIFICATES,
    TLS_OPT_CERT,
    TLS_OPT_KEY,
    TLS_OPT_CA,
    TLS_OPT_CRL,
    TLS_OPT_PSK,
    TLS_OPT_VERIFY_PEER,
    TLS_OPT_OBJECT,
    TLS_OPT_CREDS,
    TLS_OPT_LAST = TLS_OPT_CREDS,
};

/* clang-format off */
#define TLS_LONG_OPTIONS                                                   \
    {"tls", required_argument, NULL, TLS_OPT_MODE},                        \
    {"tls-certificates", required_argument, NULL, TLS_OPT_CERTIFICATES},   \
    {"tls-cert", required_argument, NULL, TLS_OPT_CERT},                   \
    {"tls-key", required_argument, NULL, TLS_OPT_KEY},                     \
    {"tls-ca", required_argument, NULL, TLS_OPT_CA},                       \
    {"tls-crl", required_argument, NULL, TLS_OPT_CRL},                     \
    {"tls-psk", required_argument, NULL, TLS_OPT_PSK},                     \
    {"tls-verify-peer", no_argument, NULL, TLS_OPT_VERIFY_PEER},           \
    {"object", required_argument, NULL, TLS_OPT_OBJECT},                   \
    {"tls-creds", required_argument, NULL, TLS_OPT_CREDS}
/* clang-format on */

/* One qemu-nbd style --object tls-creds-x509 / tls-creds-psk. */
struct tls_object {
    char *id;
    bool psk;
    char *dir;
    int verify_peer; /* -1: qemu's default (on) */
};

/* The TLS options as given; strings are owned (tls_options_free). */
struct tls_options {
    enum tls_mode mode;
    bool mode_given;
    char *dir;  /* qemu/nbdkit layout: ca-cert.pem, server-cert.pem, ... */
    char *cert; /* these override the files of dir */
    char *key;
    char *ca;
    char *crl;
    char *psk;
    bool verify_peer;
    struct tls_object *objects;
    size_t nr_objects;
    char *creds; /* --tls-creds ID */
};

/* Record option OPT (a TLS_OPT_* value) with argument ARG (NULL for
 * --tls-verify-peer).  0, or -errno with a message (qcbt_error_get).
 */
int tls_option(struct tls_options *o, int opt, const char *arg);
void tls_options_free(struct tls_options *o);
void tls_usage(FILE *fp);

/* Server-wide TLS state: the SSL_CTX and the keys; immutable once built,
 * shared by every connection.
 */
struct tls_server;

/* Check the options and load every certificate, key and PSK file now, so
 * a mistake is an error at start, not a failed client.  *MODE gets the
 * effective mode (credentials without --tls mean require, as qemu-nbd);
 * *OUT is NULL when TLS is off.  0, or -errno with a message.
 */
int tls_server_new(const struct tls_options *o,
                   enum tls_mode *mode,
                   struct tls_server **out);
void tls_server_free(struct tls_server *ts);

/* One connection's TLS session. */
struct tls_conn;

/* Run the TLS handshake on FD (connected, just after our STARTTLS ACK)
 * until DEADLINE_MS (now_ms() clock).  FD is non-blocking afterwards.
 * On success *OUT owns the session and DESC (if not NULL) describes it
 * for the log ("TLSv1.3 TLS_AES_128_GCM_SHA256, PSK identity 'alice'").
 * -1 with a message (qcbt_error_get) when the handshake failed.
 */
int tls_accept(struct tls_server *ts,
               int fd,
               int64_t deadline_ms,
               struct tls_conn **out,
               char *desc,
               size_t desclen);

/* Read exactly LEN bytes.  DEADLINE_MS < 0: wait as long as it takes.
 * 0, or -1 on EOF, error or deadline.
 */
int tls_read(struct tls_conn *t, void *buf, size_t len, int64_t deadline_ms);

/* Whether bytes the peer sent are already in the session's buffers
 * (read ahead from the socket): then polling the socket for a request
 * would wait for data that has already arrived.
 */
bool tls_pending(struct tls_conn *t);

/* Write LEN bytes.  MORE: more follows at once, so records may stay
 * queued in user space until a write without MORE.  DEADLINE_MS < 0: fail
 * only when the peer takes nothing for TLS_SEND_TIMEOUT_MS (as
 * SO_SNDTIMEO for plaintext).  0 or -1.
 */
int tls_write(struct tls_conn *t,
              const void *buf,
              size_t len,
              bool more,
              int64_t deadline_ms);

/* Send close_notify (best effort, bounded); then the caller closes FD. */
void tls_close_notify(struct tls_conn *t);
void tls_conn_free(struct tls_conn *t);

#endif /* QCBT_SERVER_TLS_H */

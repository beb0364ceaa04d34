/* qcbt: how the commands that talk to NBD servers (backup, restore,
 * verify) connect: the URI plus the TLS options, handed to libnbd.
 */
#ifndef QCBT_CLIENT_NBD_CONNECT_H
#define QCBT_CLIENT_NBD_CONNECT_H

#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>

#include <libnbd.h>

/* getopt_long values; each command puts NBD_CONNECT_LONG_OPTIONS in its
 * table and hands these to nbd_connect_option().
 */
enum {
    NBD_CONNECT_OPT_TLS = 0x2000,
    NBD_CONNECT_OPT_CERTIFICATES,
    NBD_CONNECT_OPT_PSK_FILE,
    NBD_CONNECT_OPT_USERNAME,
    NBD_CONNECT_OPT_NO_VERIFY_PEER,
    NBD_CONNECT_OPT_LAST = NBD_CONNECT_OPT_NO_VERIFY_PEER,
};

/* clang-format off */
#define NBD_CONNECT_LONG_OPTIONS                                             \
    {"tls", required_argument, NULL, NBD_CONNECT_OPT_TLS},                   \
    {"tls-certificates", required_argument, NULL,                            \
     NBD_CONNECT_OPT_CERTIFICATES},                                          \
    {"tls-psk-file", required_argument, NULL, NBD_CONNECT_OPT_PSK_FILE},     \
    {"tls-username", required_argument, NULL, NBD_CONNECT_OPT_USERNAME},     \
    {"no-tls-verify-peer", no_argument, NULL, NBD_CONNECT_OPT_NO_VERIFY_PEER}
/* clang-format on */

struct nbd_connect_opts {
    int tls; /* -1: as the URI says; else LIBNBD_TLS_DISABLE/ALLOW/REQUIRE */
    const char *certificates; /* strings point into argv */
    const char *psk_file;
    const char *username;
    bool no_verify_peer;
};

#define NBD_CONNECT_OPTS_INIT \
    {                         \
        .tls = -1             \
    }

/* Record option OPT (an NBD_CONNECT_OPT_* value).  0, or -1 after
 * printing a usage error "qcbt: CMD: ...".
 */
int nbd_connect_option(struct nbd_connect_opts *o,
                       const char *cmd,
                       int opt,
                       const char *arg);
void nbd_connect_usage(FILE *fp);

/* Set H up as O says, for a following nbd_connect_uri() or
 * nbd_aio_connect_uri(): query parameters of the URI (tls-certificates=,
 * tls-psk-file=) and its user name then win over O.  0, or -1 with
 * libnbd's error (nbd_get_error).
 */
int nbd_connect_setup(struct nbd_handle *h, const struct nbd_connect_opts *o);

/* nbd_connect_setup(H, O), then nbd_connect_uri(H, URI). */
int nbd_connect_with(struct nbd_handle *h,
                     const char *uri,
                     const struct nbd_connect_opts *o);

#endif /* QCBT_CLIENT_NBD_CONNECT_H */

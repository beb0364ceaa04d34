/* qcbt: connecting to NBD servers, with TLS through libnbd (GnuTLS).
 *
 * nbds:// and nbds+unix:// URIs require TLS (libnbd); --tls-certificates
 * or --tls-psk-file make any URI require it, as qemu-img's --tls-creds
 * does; --tls=on lets the server decide.  The URI may name the files
 * itself (tls-certificates=DIR, tls-psk-file=FILE): the user gave it on
 * the command line, so libnbd is allowed to read them.
 */
#include <string.h>

#include "nbd-connect.h"
#include "qcbt.h"

int
nbd_connect_option(struct nbd_connect_opts *o,
                   const char *cmd,
                   int opt,
                   const char *arg)
{
    switch (opt) {
    case NBD_CONNECT_OPT_TLS:
        if (strcmp(arg, "off") == 0)
            o->tls = LIBNBD_TLS_DISABLE;
        else if (strcmp(arg, "on") == 0)
            o->tls = LIBNBD_TLS_ALLOW;
        else if (strcmp(arg, "require") == 0)
            o->tls = LIBNBD_TLS_REQUIRE;
        else {
            usage_error(cmd, "--tls=%s: expected off, on or require", arg);
            return -1;
        }
        return 0;
    case NBD_CONNECT_OPT_CERTIFICATES:
        o->certificates = arg;
        return 0;
    case NBD_CONNECT_OPT_PSK_FILE:
        o->psk_file = arg;
        return 0;
    case NBD_CONNECT_OPT_USERNAME:
        o->username = arg;
        return 0;
    case NBD_CONNECT_OPT_NO_VERIFY_PEER:
        o->no_verify_peer = true;
        return 0;
    }
    usage_error(cmd, "unknown option");
    return -1;
}

void
nbd_connect_usage(FILE *fp)
{
    fprintf(fp,
            "\n"
            "TLS (nbds:// and nbds+unix:// URIs require it):\n"
            "  --tls=off|on|require      off refuses nbds:// URIs; on uses "
            "TLS when\n"
            "                            the server offers it (default: as "
            "the URI\n"
            "                            says, or require with the options "
            "below)\n"
            "  --tls-certificates DIR    ca-cert.pem [, client-cert.pem,\n"
            "                            client-key.pem] (URI: "
            "tls-certificates=DIR)\n"
            "  --tls-psk-file FILE       pre-shared keys, psktool's format "
            "(URI:\n"
            "                            tls-psk-file=FILE)\n"
            "  --tls-username NAME       PSK identity (URI: nbds://NAME@...;"
            " default:\n"
            "                            the login name)\n"
            "  --no-tls-verify-peer      do not check the server's "
            "certificate\n");
}

int
nbd_connect_setup(struct nbd_handle *h, const struct nbd_connect_opts *o)
{
    int tls = o->tls;

    if (tls < 0 && (o->certificates || o->psk_file))
        tls = LIBNBD_TLS_REQUIRE;
    if (nbd_set_uri_allow_local_file(h, true) < 0)
        return -1;
    if (tls >= 0 && nbd_set_tls(h, tls) < 0)
        return -1;
    /* --tls=off: an nbds:// URI is an error, not silently plaintext. */
    if (tls == LIBNBD_TLS_DISABLE &&
        nbd_set_uri_allow_tls(h, LIBNBD_TLS_DISABLE) < 0)
        return -1;
    if (o->certificates && nbd_set_tls_certificates(h, o->certificates) < 0)
        return -1;
    if (o->psk_file && nbd_set_tls_psk_file(h, o->psk_file) < 0)
        return -1;
    if (o->username && nbd_set_tls_username(h, o->username) < 0)
        return -1;
    if (o->no_verify_peer && nbd_set_tls_verify_peer(h, false) < 0)
        return -1;
    return 0;
}

int
nbd_connect_with(struct nbd_handle *h,
                 const char *uri,
                 const struct nbd_connect_opts *o)
{
    if (nbd_connect_setup(h, o) < 0)
        return -1;
    return nbd_connect_uri(h, uri);
}

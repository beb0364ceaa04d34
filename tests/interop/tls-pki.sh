#!/bin/bash
# Make the certificates and pre-shared keys the TLS tests and benchmark use,
# with openssl only (nothing is committed: they are made at test time).
#
#   tls-pki.sh DIR
#
# Directories, each in the layout its user reads:
#   server/          ca-cert.pem server-cert.pem server-key.pem
#                    (qemu tls-creds-x509 endpoint=server, nbdkit
#                    --tls-certificates, qcbt-server --tls-certificates)
#   client/          ca-cert.pem client-cert.pem client-key.pem
#                    (libnbd tls-certificates=, qemu endpoint=client)
#   client-anon/     ca-cert.pem only: trusts the server, has no identity
#   client-otherca/  ca-cert.pem (ours) + a client pair from another CA
#   client-expired/  ca-cert.pem (ours) + an expired client pair
#   trust-otherca/   ca-cert.pem of the other CA only: a client that must
#                    refuse our server
#   server-expired/  our CA, an expired server pair
#   server-crl/      server/ plus ca-crl.pem revoking client-revoked's
#   client-revoked/  ca-cert.pem (ours) + a client pair, then revoked
#   psk/keys.psk     alice:KEY bob:KEY (psktool's format)
#   psk-wrong/keys.psk  alice with another key
# Server certificates name localhost and 127.0.0.1.  Keys are EC P-256.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
mkdir -p "$1"
D=$(cd "$1" && pwd)
cd "$D"
# openssl's chatter goes to pki.log, shown if a step fails.
exec 3>&2 2>"$D/pki.log"
trap 'rc=$?; [ $rc -eq 0 ] || { cat "$D/pki.log" >&3; echo "tls-pki.sh: failed" >&3; }' EXIT
export PKI_CA=$D/ca

cat >openssl.cnf <<'EOF'
[ ca ]
default_ca = ca_default
[ ca_default ]
dir = $ENV::PKI_CA
database = $dir/index.txt
new_certs_dir = $dir
serial = $dir/serial
default_md = sha256
default_crl_days = 3650
policy = policy_any
unique_subject = no
copy_extensions = none
[ policy_any ]
commonName = supplied
organizationName = optional
[ ca_ext ]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[ server_ext ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[ client_ext ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
EOF

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

# mkca NAME: NAME/ca-cert.pem, NAME/ca-key.pem
mkca() {
    mkdir -p "$1"
    key "$1/ca-key.pem"
    openssl req -new -x509 -key "$1/ca-key.pem" -out "$1/ca-cert.pem" \
        -subj "/O=qcbt test/CN=qcbt test CA $1" -days 3650 \
        -config openssl.cnf -extensions ca_ext
    : >"$1/index.txt"
    echo 1000 >"$1/serial"
}

# sign CA EXT CN OUTCERT OUTKEY [DATES...]
sign() {
    local ca=$1 ext=$2 cn=$3 cert=$4 keyf=$5
    shift 5
    key "$keyf"
    openssl req -new -key "$keyf" -subj "/O=qcbt test/CN=$cn" -out "$cert.csr"
    PKI_CA=$D/$ca openssl ca -batch -notext -config openssl.cnf \
        -cert "$ca/ca-cert.pem" -keyfile "$ca/ca-key.pem" \
        -extensions "$ext" -in "$cert.csr" -out "$cert" "$@"
    rm -f "$cert.csr"
}

mkca ca
mkca otherca
# An expired window: valid for January 2020 only.
PAST=(-startdate 20200101000000Z -enddate 20200201000000Z)

mkdir -p server server-expired client client-anon client-otherca \
    client-expired trust-otherca psk psk-wrong server-crl client-revoked
cp ca/ca-cert.pem server/
sign ca server_ext localhost server/server-cert.pem server/server-key.pem -days 365
cp ca/ca-cert.pem server-expired/
sign ca server_ext localhost server-expired/server-cert.pem \
    server-expired/server-key.pem "${PAST[@]}"
cp ca/ca-cert.pem client/
sign ca client_ext qcbt-client client/client-cert.pem client/client-key.pem -days 365
cp ca/ca-cert.pem client-anon/
cp ca/ca-cert.pem client-otherca/
sign otherca client_ext intruder client-otherca/client-cert.pem \
    client-otherca/client-key.pem -days 365
cp ca/ca-cert.pem client-expired/
sign ca client_ext old-client client-expired/client-cert.pem \
    client-expired/client-key.pem "${PAST[@]}"
cp otherca/ca-cert.pem trust-otherca/
cp ca/ca-cert.pem client-revoked/
sign ca client_ext revoked-client client-revoked/client-cert.pem \
    client-revoked/client-key.pem -days 365
PKI_CA=$D/ca openssl ca -batch -config openssl.cnf -cert ca/ca-cert.pem \
    -keyfile ca/ca-key.pem -revoke client-revoked/client-cert.pem
cp server/* server-crl/
PKI_CA=$D/ca openssl ca -batch -config openssl.cnf -cert ca/ca-cert.pem \
    -keyfile ca/ca-key.pem -gencrl -out server-crl/ca-crl.pem

printf 'alice:%s\nbob:%s\n' "$(openssl rand -hex 32)" "$(openssl rand -hex 32)" >psk/keys.psk
printf 'alice:%s\n' "$(openssl rand -hex 32)" >psk-wrong/keys.psk
chmod 600 psk/keys.psk psk-wrong/keys.psk ./*/*-key.pem

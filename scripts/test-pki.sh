#!/usr/bin/env bash
# A throw-away PKI for TLS tests, made with the openssl CLI:
#
#   scripts/test-pki.sh DIR
#
# writes into DIR (created if missing):
#   ca.crt ca.key           a CA
#   tls.crt tls.key         server certificate for localhost / 127.0.0.1, signed by the CA
#                           (the names of a kubernetes.io/tls Secret)
#   client.crt client.key   client certificate (CN=app), signed by the CA
# EC P-256 keys, valid for 2 days. Nothing here is secret: tests only.
set -euo pipefail
dir="${1:?usage: test-pki.sh DIR}"
command -v openssl >/dev/null 2>&1 || { echo "test-pki.sh: openssl not found (scripts/deps.sh python installs it)" >&2; exit 1; }
mkdir -p "$dir"
cd "$dir"
ossl() { openssl "$@" 2>/dev/null; }

ossl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout ca.key -out ca.crt -days 2 -subj "/CN=Warren test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"

leaf() { # leaf NAME CN EXTENSIONS
    ossl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$1.key" -out "$1.csr" -subj "/CN=$2"
    printf '%s\n' "$3" >"$1.ext"
    ossl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out "$1.crt" -days 2 -extfile "$1.ext"
    rm -f "$1.csr" "$1.ext"
}
leaf tls localhost "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1"
leaf client app "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
rm -f ca.srl
echo "test PKI in $dir"

#!/usr/bin/env bash
# Make a test certificate authority and a SuperLink server certificate for TLS (openssl).
#   deploy/make_certs.sh [OUT_DIR] [SERVER_NAMES]
# OUT_DIR (default: certificates/) receives ca.crt (give it to every SuperNode and to `flwr`),
# server.pem and server.key (the SuperLink's). SERVER_NAMES is a comma-separated list of the DNS
# names and IPs the SuperNodes use to reach the SuperLink (default: localhost,127.0.0.1,::1);
# each goes into the certificate's subjectAltName, which TLS checks. For tests and labs: a
# production deployment uses a real CA and keeps ca.key offline.
set -euo pipefail
out=${1:-certificates}
names=${2:-localhost,127.0.0.1,::1}
mkdir -p "$out"
san=""
IFS=',' read -ra parts <<< "$names"
for name in "${parts[@]}"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
san=${san%,}
openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -x509 -new -nodes -key "$out/ca.key" -sha256 -days 365 -subj "/CN=fedllm test CA" -out "$out/ca.crt"
openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=${parts[0]}" -out "$out/server.csr"
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -out "$out/server.pem" -days 365 -sha256 -extfile "$out/server.ext" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
echo "certificates in $out: ca.crt (CA), server.pem + server.key (SuperLink), SANs: $san"

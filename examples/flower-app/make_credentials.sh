#!/bin/bash
# Credentials for a secure perseq federation on Flower (flwr 1.42): a certificate authority,
# the SuperLink's TLS certificate for the addresses nodes and users reach it at, and one
# EC key pair per SuperNode for node authentication. Self-signed: for trials and CI; in
# production use your organization's CA and key management.
#
#     bash examples/flower-app/make_credentials.sh DIR [NODES] [HOSTS]
#     bash examples/flower-app/make_credentials.sh credentials 2 "127.0.0.1,localhost"
#
# DIR/ca.crt                  the CA: SuperNodes (--root-certificates) and the flwr CLI
#                             (root-certificates in config.toml) check the SuperLink with it
# DIR/ca.key                  the CA's private key: signs certificates; keep it offline, never
#                             hand it out with ca.crt
# DIR/server.pem, server.key  the SuperLink's certificate and key (--ssl-certfile, --ssl-keyfile)
# DIR/node<i>, node<i>.pub    SuperNode i's private key (--auth-supernode-private-key, stays on
#                             the node) and public key (`flwr supernode register`)
set -euo pipefail
out=${1:?usage: make_credentials.sh DIR [NODES] [HOSTS]}
nodes=${2:-2}
hosts=${3:-127.0.0.1,localhost}
if [ -e "$out/ca.crt" ]; then
  # a new CA would silently invalidate every certificate and node already deployed with the old one
  echo "$out/ca.crt exists: this folder holds a federation's credentials; choose another folder" >&2
  exit 1
fi
mkdir -p "$out"
san=""
IFS=, read -ra names <<< "$hosts"
for h in "${names[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
openssl req -x509 -newkey rsa:4096 -nodes -days 365 -subj "/CN=perseq-flower-ca" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -nodes -subj "/CN=${names[0]}" -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf "subjectAltName=%s\n" "${san%,}" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days 365 \
  -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
for ((i = 0; i < nodes; i++)); do
  rm -f "$out/node$i" "$out/node$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "perseq-node$i" -f "$out/node$i"
done
echo "wrote $out: ca.crt, server.pem, server.key, node0..node$((nodes - 1)) (+ .pub)"

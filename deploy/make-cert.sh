#!/usr/bin/env sh
# Makes a self-signed certificate for local wss:// through HAProxy:
# deploy/certs/fanout.pem (certificate + key, the form HAProxy's `crt` wants)
# and deploy/certs/fanout.crt (certificate alone, for a client to trust).
# Usage: deploy/make-cert.sh [OUT_DIR] [HOSTNAME]   (default: deploy/certs localhost)
# Production: put the real chain + key in one PEM at the same path instead.
set -eu
out=${1:-"$(dirname "$0")/certs"}
host=${2:-localhost}
mkdir -p "$out"
umask 077
openssl req -x509 -newkey rsa:2048 -sha256 -days 365 -nodes \
  -subj "/CN=$host" \
  -addext "subjectAltName=DNS:$host,DNS:localhost,IP:127.0.0.1" \
  -keyout "$out/fanout.key" -out "$out/fanout.crt" 2>/dev/null
cat "$out/fanout.crt" "$out/fanout.key" > "$out/fanout.pem"
rm -f "$out/fanout.key"
chmod 644 "$out/fanout.crt"
# HAProxy runs as an unprivileged user in its image and must read the PEM.
chmod 644 "$out/fanout.pem"
echo "wrote $out/fanout.pem (HAProxy) and $out/fanout.crt (trust this in clients)"

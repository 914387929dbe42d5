#!/usr/bin/env bash
# Creates deploy/secrets/ for the compose stack: a tokens file with an admin, a load generator
# client and an nginx proxy token, and each token in its own file (shown nowhere else). Run once from the
# repository root (after `make test` or `make serve` made .venv): deploy/local-secrets.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=deploy/secrets
seqserve=".venv/bin/seqserve"
[[ -x "$seqserve" ]] || seqserve=seqserve
if [[ -e "$out/tokens" ]]; then
    echo "local-secrets: $out/tokens exists; delete it to make new tokens" >&2
    exit 1
fi
umask 077
"$seqserve" auth add-token --file "$out/tokens" --principal admin --role admin >"$out/admin.token"
"$seqserve" auth add-token --file "$out/tokens" --principal loadtest >"$out/loadtest.token"
"$seqserve" auth add-token --file "$out/tokens" --principal nginx --role proxy \
    >"$out/nginx-proxy.token"
chmod 0644 "$out/tokens"  # hashes only; the containers' user must read it
echo "local-secrets: wrote $out/tokens, $out/admin.token, $out/loadtest.token, $out/nginx-proxy.token"

#!/bin/sh
# Create every secret that compose.yaml mounts, in ./secrets (or the directory given).
#
# Needs `fedraft`, `fedraft-client` and the Python that has fedraft installed first on
# PATH (an activated virtualenv), or run it inside the node image, as root so that it can
# hand the files to uid 10001, the user the containers run as:
#
#   docker run --rm --user 0 -v "$PWD:/compose" -w /compose --entrypoint sh \
#       fedraft-node:0.1.0 gen-secrets.sh secrets
#
# This is for the single-host example: the CA key (secrets/ca/ca.key) ends up next to the
# rest. In production keep the CA offline and issue certificates there (deploy/README.md).
set -eu

out=${1:-secrets}
python=${FEDRAFT_PYTHON:-python3}
if [ -e "$out/raft_password" ]; then
    echo "gen-secrets: $out/raft_password exists; refusing to overwrite secrets" >&2
    exit 1
fi
umask 077
mkdir -p "$out"

# Shared secrets: the Raft password (>= 16 characters) and the PostgreSQL password.
"$python" -c 'import secrets; print(secrets.token_urlsafe(32))' > "$out/raft_password"
"$python" -c 'import secrets; print(secrets.token_urlsafe(32))' > "$out/postgres_password"

# The federation CA and one certificate per party; the role is bound into each.
fedraft certs init "$out/ca"
cp "$out/ca/ca.pem" "$out/ca.pem"
for node in n1 n2 n3; do
    fedraft certs issue node "$node" --ca-dir "$out/ca" --out "$out" --host "$node"
done
fedraft certs issue operator operator --ca-dir "$out/ca" --out "$out"
fedraft certs issue auditor auditor --ca-dir "$out/ca" --out "$out"

# Each site: a client certificate and its Ed25519 identity key (public half to enroll).
for site in site-a site-b; do
    fedraft certs issue client "$site" --ca-dir "$out/ca" --out "$out"
    fedraft-client keygen --out "$out/$site-identity.pem" > "$out/$site-identity.pub"
done

# The cluster's audit signing key (the same on every node) and its public half, which
# auditors pin with `fedraft audit verify --key`.
"$python" - "$out" <<'PY'
import sys
from pathlib import Path

from coordinator.audit import AuditSigner

out = Path(sys.argv[1])
signer = AuditSigner.generate()
signer.save(out / "audit-key.pem")
(out / "audit-key.pub").write_text(signer.public_key_hex + "\n")
PY

# Certificates and public keys may be read by anyone; private keys and passwords stay
# readable by their owner only (the CA directory too).
chmod 0755 "$out"
for public in ca n1 n2 n3 operator auditor site-a site-b; do
    chmod 0644 "$out/$public.pem"
done
chmod 0644 "$out"/*.pub
if [ "$(id -u)" = 0 ]; then
    chown -R 10001:10001 "$out"
else
    echo "gen-secrets: the containers run as uid 10001: sudo chown -R 10001:10001 $out" >&2
fi
echo "gen-secrets: wrote $out (enroll the sites with the keys in $out/site-*-identity.pub)"

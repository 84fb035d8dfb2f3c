#!/usr/bin/env bash
# Builds and installs gprxy_validator into PostgreSQL 18 (validator) and 15 (SQL side only).
set -euo pipefail
CACHE="${GPRXY_CACHE:-/var/cache/gprxy}"
cd "$(dirname "$0")/../gprxy-validator"
cargo pgrx install --release --pg-config "$CACHE/pg18/bin/pg_config" >/dev/null
cargo pgrx install --release --no-default-features --features pg15 \
  --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
echo "install-extension: gprxy_validator installed into PostgreSQL 18 and 15" >&2

#!/usr/bin/env bash
# Builds and installs gprxy_validator into PostgreSQL 18 and 19 (validator; 19 when bootstrap built
# it), 17 and 15 (SQL side only), and PostgreSQL's own test validator into 18 as
# oauth_test_validator (the floor in `make bench`).
#
# cargo-pgrx 0.19.4 from the cache (bootstrap). pgrx 0.19 declares rust-version 1.96 and these
# machines have Rust 1.95, on which it builds: cargo-pgrx runs the cargo that $CARGO names, here
# scripts/cargo-ignore-rust-version (cargo-pgrx's own --cargo flag also reaches `cargo metadata`,
# which refuses the flag). See the README, "Building".
set -euo pipefail
CACHE="${GPRXY_CACHE:-/var/cache/gprxy}"
export PATH="$CACHE/cargo-pgrx-0.19.4/bin:$PATH"
PG18_CONFIG="$CACHE/pg18/bin/pg_config"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
pgrx() { CARGO="$ROOT/scripts/cargo-ignore-rust-version" cargo-pgrx pgrx "$@"; }
cd "$ROOT/gprxy-validator"
pgrx install --profile extension --pg-config "$PG18_CONFIG" >/dev/null
if [ -x "$CACHE/pg19/bin/pg_config" ]; then
  pgrx install --profile extension --no-default-features --features pg19 \
    --pg-config "$CACHE/pg19/bin/pg_config" >/dev/null
fi
pgrx install --profile extension --no-default-features --features pg15 \
  --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
pgrx install --profile extension --no-default-features --features pg17 \
  --pg-config "$CACHE/pg17/bin/pg_config" >/dev/null

floor_src="$CACHE/pg18/share/gprxy/validator.c"
if [ ! -f "$floor_src" ]; then
  echo "install-extension: $floor_src is missing (a cache from an older bootstrap):" \
       "remove $(readlink -f "$CACHE/pg18")/.gprxy-built and run make bootstrap" >&2
  exit 1
fi
floor_so="$("$PG18_CONFIG" --pkglibdir)/oauth_test_validator.so"
if [ ! -f "$floor_so" ] || [ "$floor_src" -nt "$floor_so" ]; then
  # shellcheck disable=SC2046
  cc $("$PG18_CONFIG" --cflags) $("$PG18_CONFIG" --cflags_sl) -shared \
    -I"$("$PG18_CONFIG" --includedir-server)" "$floor_src" -o "$floor_so.tmp"
  mv "$floor_so.tmp" "$floor_so"
fi
pg19=""; [ -x "$CACHE/pg19/bin/pg_config" ] && pg19=", 19"
echo "install-extension: gprxy_validator installed into PostgreSQL 18$pg19, 17 and 15; oauth_test_validator into 18" >&2

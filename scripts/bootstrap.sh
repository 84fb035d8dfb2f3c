#!/usr/bin/env bash
# Installs everything gprxy's build and tests need, idempotently.
#
#   - Debian packages: build deps, PostgreSQL 15 (server + dev headers), pgbouncer, haproxy,
#     dpkg-dev (make package), sudo-free tools
#   - PostgreSQL 18, 17 and 19, built from Debian's source packages into $GPRXY_CACHE/pg-<version>
#     (never from sid, trixie or experimental binaries: they would replace libc); 17 runs fallback
#     mode's tests, 19 the validator's a second time. 19 is taken from sid or experimental, the
#     final 19.x when there, else the newest pre-release; when the mirror has no 19 source files
#     bootstrap says so and goes on without it (GPRXY_REQUIRE_PG19=1 makes that a failure)
#   - cargo-pgrx 0.19.4 (in $CACHE/cargo-pgrx-0.19.4, --ignore-rust-version: see the README),
#     registered with pg18, pg17, pg15 and pg19; cargo-fuzz for the fuzz targets
#   - Node.js and npm (Debian's, when absent) and tests/provider's package-lock.json (oidc-provider,
#     the real OpenID Provider of tests/tests/certified_provider.rs), `npm ci`'d into
#     $GPRXY_CACHE/node/oidc-provider-<lockfile hash>/node_modules
#   - an unprivileged OS user that test servers run as (PostgreSQL refuses root)
#
# A second run checks stamps and changes nothing. A failed step stops with its name.
#
#   scripts/bootstrap.sh            everything
#   scripts/bootstrap.sh postgres   apt packages and PostgreSQL 18, 17 and 19 only (CI's cold-path check)
set -euo pipefail
ONLY="${1:-all}"

PG18_SUITE="${PG18_SUITE:-sid}"              # Debian suite with the source package postgresql-18
PG17_SUITE="${PG17_SUITE:-trixie}"           # ... and postgresql-17
PG19_SUITES="${PG19_SUITES:-sid experimental}" # ... and postgresql-19 (the newest of them)
PGRX_VERSION="0.19.4"
CACHE="${GPRXY_CACHE:-/var/cache/gprxy}"    # outside the clone; readable by the test user
TEST_USER="${GPRXY_TEST_USER:-gprxytest}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

step() { CURRENT_STEP="$1"; echo "bootstrap: $1" >&2; }
trap 'echo "bootstrap: FAILED at step: ${CURRENT_STEP:-start}" >&2' ERR

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# ---------------------------------------------------------------- apt packages
APT_PACKAGES=(
  build-essential bison flex pkg-config libssl-dev libcurl4-openssl-dev libreadline-dev
  zlib1g-dev clang libclang-dev postgresql-15 postgresql-server-dev-15 postgresql-client-15
  pgbouncer curl ca-certificates xz-utils bzip2 python3 openssl libkrb5-dev
  python3-psycopg python3-prometheus-client
  # gprxy connect's driver tests: pgJDBC and a JDK to run it (node and npm: see below)
  libpostgresql-jdbc-java openjdk-17-jdk-headless python3-pip
  # make package (dpkg-deb, dpkg-shlibdeps), its install test (adduser, systemd-analyze) and the
  # scale-out test's load balancer
  dpkg-dev adduser systemd haproxy
)
step "apt packages"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts a pg15 cluster, pgbouncer and haproxy on install; tests start their own servers.
for svc in postgresql pgbouncer haproxy; do
  if command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null; then
    as_root systemctl stop "$svc" || true
  fi
done

# ---------------------------------------------------------------- test user
step "unprivileged test user $TEST_USER"
if ! id "$TEST_USER" >/dev/null 2>&1; then
  as_root useradd --system --no-create-home --shell /usr/sbin/nologin "$TEST_USER"
fi

# ---------------------------------------------------------------- PostgreSQL 18
step "PostgreSQL 18 (source package from $PG18_SUITE) into $CACHE/pg18"
bash "$ROOT/scripts/build-postgres.sh" 18 "$PG18_SUITE"
PREFIX="$(readlink -f "$CACHE/pg18")"
PG18_FULL="$("$PREFIX/bin/pg_config" --version | awk '{print $2}')"
step "PostgreSQL 17 (source package from $PG17_SUITE) into $CACHE/pg17"
bash "$ROOT/scripts/build-postgres.sh" 17 "$PG17_SUITE"
PG17_CONFIG="$(readlink -f "$CACHE/pg17")/bin/pg_config"
step "PostgreSQL 19 (source package from $PG19_SUITES) into $CACHE/pg19"
# shellcheck disable=SC2086
rc=0; bash "$ROOT/scripts/build-postgres.sh" 19 $PG19_SUITES || rc=$?
PG19_CONFIG=""
if [ "$rc" = 0 ]; then
  PG19_CONFIG="$(readlink -f "$CACHE/pg19")/bin/pg_config"
elif [ "$rc" = 3 ] && [ "${GPRXY_REQUIRE_PG19:-0}" != 1 ]; then
  echo "bootstrap: WARNING: no PostgreSQL 19 source can be downloaded; going on without 19 (make test says its 19 run did not happen)" >&2
else
  false
fi
if [ "$ONLY" = postgres ]; then
  echo "bootstrap: ok (PostgreSQL $PG18_FULL at $PREFIX, $("$PG17_CONFIG" --version)${PG19_CONFIG:+, $("$PG19_CONFIG" --version)})" >&2
  exit 0
fi

# ---------------------------------------------------------------- cargo-pgrx
# pgrx 0.19 (the first with PostgreSQL 19) declares rust-version 1.96; these machines have 1.95
# and it builds and works there: --ignore-rust-version (README, "Building"). Installed into the
# cache, not ~/.cargo/bin, so that the cargo-pgrx on PATH is never the wrong one; the Makefile
# puts this one first on PATH.
step "cargo-pgrx $PGRX_VERSION"
PGRX_ROOT="$CACHE/cargo-pgrx-$PGRX_VERSION"
if ! "$PGRX_ROOT/bin/cargo-pgrx" pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --ignore-rust-version --root "$PGRX_ROOT"
fi
export PATH="$PGRX_ROOT/bin:$PATH"

step "node-postgres for the connector's driver tests into $CACHE/node"
# Pinned by tests/node/package-lock.json; installed again only when the lockfile changes.
NODE_DIR="$CACHE/node"
# Node 20 and its npm come with the machine (NodeSource's nodejs); Debian's npm would conflict.
command -v npm >/dev/null || { echo "bootstrap: npm is missing (Node 20 with npm is expected on the machine)" >&2; exit 1; }
if ! cmp -s "$ROOT/tests/node/package-lock.json" "$NODE_DIR/package-lock.json" 2>/dev/null \
   || [ ! -f "$NODE_DIR/node_modules/pg/package.json" ]; then
  mkdir -p "$NODE_DIR"
  cp "$ROOT/tests/node/package.json" "$ROOT/tests/node/package-lock.json" "$NODE_DIR/"
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --ignore-scripts >/dev/null)
fi

step "asyncpg for the connector's driver tests into $CACHE/python"
# Pinned with its hash by tests/python/requirements.txt, for Debian's python3.
ASYNCPG_DIR="$CACHE/python/asyncpg-0.32.0"
if [ ! -f "$ASYNCPG_DIR/asyncpg/__init__.py" ]; then
  rm -rf "$ASYNCPG_DIR.tmp"
  /usr/bin/python3 -m pip install --disable-pip-version-check --no-cache-dir --require-hashes --root-user-action=ignore \
    --target "$ASYNCPG_DIR.tmp" -r "$ROOT/tests/python/requirements.txt" >/dev/null
  mv "$ASYNCPG_DIR.tmp" "$ASYNCPG_DIR"
fi

step "cargo-fuzz"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

step "cargo pgrx init (pg18, pg17, pg15${PG19_CONFIG:+, pg19})"
PG15_CONFIG=/usr/lib/postgresql/15/bin/pg_config
want="pg18 = \"$PREFIX/bin/pg_config\""
cfg="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
pg19=(); [ -n "$PG19_CONFIG" ] && pg19=(--pg19 "$PG19_CONFIG")
if ! grep -qF "$want" "$cfg" 2>/dev/null || ! grep -qF "$PG15_CONFIG" "$cfg" 2>/dev/null \
   || ! grep -qF "$PG17_CONFIG" "$cfg" 2>/dev/null \
   || { [ -n "$PG19_CONFIG" ] && ! grep -qF "$PG19_CONFIG" "$cfg" 2>/dev/null; }; then
  "$PGRX_ROOT/bin/cargo-pgrx" pgrx init --pg18 "$PREFIX/bin/pg_config" --pg17 "$PG17_CONFIG" --pg15 "$PG15_CONFIG" "${pg19[@]}" >/dev/null
fi

# ---------------------------------------------------------------- Node.js and oidc-provider
step "Node.js and npm"
if ! command -v node >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs >/dev/null
fi
if ! command -v npm >/dev/null 2>&1; then   # NodeSource's nodejs brings its own npm
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
# oidc-provider 9.13 uses URL.parse and crypto.hash (Node 20.18 and later; it asks for 22 and
# warns on 20). Debian 12's own nodejs is 18.20, which has neither: such a machine needs a newer
# Node (the project's machines have NodeSource's 20).
if ! node -e 'process.exit(typeof URL.parse === "function" && typeof require("node:crypto").hash === "function" ? 0 : 1)'; then
  echo "bootstrap: Node $(node --version) is too old for oidc-provider 9.13 (needs URL.parse and crypto.hash: Node 20.18 or later)" >&2
  false
fi

LOCK="$ROOT/tests/provider/package-lock.json"
NODE_DIR="$CACHE/node/oidc-provider-$(sha256sum "$LOCK" | cut -c1-12)"
step "oidc-provider (npm ci of tests/provider/package-lock.json) into $NODE_DIR"
if [ ! -f "$NODE_DIR/.installed" ]; then
  rm -rf "$NODE_DIR.tmp"
  mkdir -p "$NODE_DIR.tmp"
  cp "$ROOT/tests/provider/package.json" "$LOCK" "$NODE_DIR.tmp/"
  (cd "$NODE_DIR.tmp" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
  touch "$NODE_DIR.tmp/.installed"
  rm -rf "$NODE_DIR"
  mv "$NODE_DIR.tmp" "$NODE_DIR"
fi

echo "bootstrap: ok (PostgreSQL $PG18_FULL at $PREFIX, cargo-pgrx $PGRX_VERSION, node $(node --version))" >&2

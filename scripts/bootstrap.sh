#!/usr/bin/env bash
# Installs everything gprxy's build and tests need, idempotently.
#
#   - Debian packages: build deps, PostgreSQL 15 (server + dev headers), pgbouncer, sudo-free tools
#   - PostgreSQL 18, built from Debian's source package into $GPRXY_CACHE/pg-<version>
#     (never from sid binaries: they would replace libc)
#   - cargo-pgrx 0.18.1, registered with pg18 and pg15; cargo-fuzz for the parser fuzz target
#   - an unprivileged OS user that test servers run as (PostgreSQL refuses root)
#
# A second run checks stamps and changes nothing. A failed step stops with its name.
set -euo pipefail

PG18_VERSION="${PG18_VERSION:-18}"           # Debian source package postgresql-18
PGRX_VERSION="0.18.1"
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
  python3-psycopg
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
# Debian starts a pg15 cluster and pgbouncer on install; tests start their own servers.
for svc in postgresql pgbouncer; do
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
step "PostgreSQL 18 source"
as_root mkdir -p "$CACHE"
as_root chmod 755 "$CACHE"
SRC_DIR="$CACHE/src"
as_root mkdir -p "$SRC_DIR"
if ! ls "$SRC_DIR"/postgresql-18_*.orig.tar.bz2 >/dev/null 2>&1; then
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  uri="${uri:-http://deb.debian.org/debian}"
  apt_dir="$CACHE/apt-sid"
  as_root mkdir -p "$apt_dir/lists/partial"
  echo "deb-src [trusted=yes] $uri sid main" | as_root tee "$apt_dir/sources.list" >/dev/null
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$apt_dir/lists")
  as_root apt-get "${apt_opts[@]}" update -qq
  (cd "$SRC_DIR" && as_root apt-get "${apt_opts[@]}" source --download-only -qq "postgresql-$PG18_VERSION")
fi
orig=$(ls "$SRC_DIR"/postgresql-18_*.orig.tar.bz2 | sort -V | tail -n1)
PG18_FULL=$(basename "$orig" | sed -E 's/postgresql-18_(.*)\.orig\.tar\.bz2/\1/')
PREFIX="$CACHE/pg-$PG18_FULL"

step "PostgreSQL $PG18_FULL build into $PREFIX"
if [ ! -f "$PREFIX/.gprxy-built" ]; then
  build="$CACHE/build-$PG18_FULL"
  as_root rm -rf "$build"
  as_root mkdir -p "$build"
  as_root tar -xjf "$orig" -C "$build" --strip-components=1
  (
    cd "$build"
    ./configure --prefix="$PREFIX" --with-openssl --with-libcurl --without-icu >configure.log 2>&1 \
      || { tail -n 30 configure.log; exit 1; }
    make -j3 world-bin >make.log 2>&1 || { tail -n 40 make.log; exit 1; }
    make install-world-bin >install.log 2>&1 || { tail -n 40 install.log; exit 1; }
  )
  # PostgreSQL's own test issuer, for device-flow experiments.
  as_root mkdir -p "$PREFIX/share/gprxy"
  as_root cp "$build/src/test/modules/oauth_validator/t/oauth_server.py" "$PREFIX/share/gprxy/" || true
  as_root rm -rf "$build"
  as_root touch "$PREFIX/.gprxy-built"
fi
# The stable name the Makefile and tests use.
ln -sfn "$PREFIX" "$CACHE/pg18"
ln -sfn "$PREFIX" "$ROOT/.pg18"

# ---------------------------------------------------------------- cargo-pgrx
step "cargo-pgrx $PGRX_VERSION"
if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

step "cargo-fuzz"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

step "cargo pgrx init (pg18, pg15)"
PG15_CONFIG=/usr/lib/postgresql/15/bin/pg_config
want="pg18 = \"$PREFIX/bin/pg_config\""
cfg="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qF "$want" "$cfg" 2>/dev/null || ! grep -qF "$PG15_CONFIG" "$cfg" 2>/dev/null; then
  cargo pgrx init --pg18 "$PREFIX/bin/pg_config" --pg15 "$PG15_CONFIG" >/dev/null
fi

echo "bootstrap: ok (PostgreSQL $PG18_FULL at $PREFIX, cargo-pgrx $PGRX_VERSION)" >&2

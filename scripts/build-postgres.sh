#!/usr/bin/env bash
# Builds one PostgreSQL major version from Debian's own source package into the cache, once.
#
#   scripts/build-postgres.sh MAJOR SUITE...  e.g. 18 sid, 17 trixie, 19 sid experimental
#
# Source: `apt-get source --download-only postgresql-MAJOR` through a private source list (the
# machine's own apt sources are never changed: binaries from a newer suite would replace libc).
# With several suites, the one whose index has the newest version wins (19: the final 19.x once
# Debian has it, else the newest pre-release such as 19~rc1). Result: $GPRXY_CACHE/pg-<version>
# (a pre-release's `~` written `-`: pg-19-rc1), linked as $GPRXY_CACHE/pgMAJOR, stamped when
# complete. A second run finds the source and the stamp and changes nothing (no network).
# Exit status 3: no suite's source of postgresql-MAJOR can be downloaded from the mirror (seen:
# experimental's postgresql-19 19~rc1-1 in the index, its files 404); any other failure is 1.
set -euo pipefail

MAJOR="$1"
shift
SUITES=("$@")
[ ${#SUITES[@]} -gt 0 ] || { echo "usage: build-postgres.sh MAJOR SUITE..." >&2; exit 2; }
CACHE="${GPRXY_CACHE:-/var/cache/gprxy}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# The newest of the Debian versions on stdin, one a line (dpkg's order: 19~rc1 < 19.0 < 19.1).
newest() { local v best=""; while read -r v; do
  if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best="$v"; fi; done; echo "$best"; }

as_root mkdir -p "$CACHE"
as_root chmod 755 "$CACHE"
SRC_DIR="$CACHE/src"
as_root mkdir -p "$SRC_DIR"
pattern="postgresql-${MAJOR}_*.orig.tar.bz2"
if ! compgen -G "$SRC_DIR/$pattern" >/dev/null; then
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  uri="${uri:-http://deb.debian.org/debian}"
  # Each suite's index in its own folder; keep the suite with the newest postgresql-MAJOR.
  SUITE="" best=""
  for s in "${SUITES[@]}"; do
    apt_dir="$CACHE/apt-$s"
    as_root mkdir -p "$apt_dir/lists/partial"
    echo "deb-src [trusted=yes] $uri $s main" | as_root tee "$apt_dir/sources.list" >/dev/null
    opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$apt_dir/lists")
    as_root apt-get "${opts[@]}" update -qq
    v=$(apt-cache "${opts[@]}" showsrc "postgresql-$MAJOR" 2>/dev/null \
          | awk '/^Version:/ {print $2}' | newest || true)
    [ -n "$v" ] || continue
    if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then
      best="$v" SUITE="$s" apt_opts=("${opts[@]}")
    fi
  done
  [ -n "$SUITE" ] || { echo "build-postgres: no postgresql-$MAJOR in ${SUITES[*]} on $uri" >&2; exit 3; }
  echo "build-postgres: postgresql-$MAJOR $best from $SUITE" >&2
  if ! (cd "$SRC_DIR" && as_root apt-get "${apt_opts[@]}" source --download-only -qq "postgresql-$MAJOR=$best"); then
    # A mirror's index can name a point release whose files it does not have yet (seen: trixie's
    # postgresql-17 17.12 listed, 404; 17.11 there). Take the newest earlier point release of
    # the same Debian revision that the mirror has, checked against its .dsc's SHA-256.
    version="$best"
    upstream="${version%%-*}"; revision="${version#*-}"; minor="${upstream#*.}"
    # A pre-release (19~rc1) has no earlier point release to fall back to.
    [[ "$minor" =~ ^[0-9]+$ ]] || { echo "build-postgres: $SUITE's postgresql-$MAJOR $version is not on the mirror" >&2; exit 3; }
    pool="$uri/pool/main/p/postgresql-$MAJOR"
    found=""
    for ((m = minor - 1; m >= 0 && m >= minor - 6; m--)); do
      dsc="postgresql-${MAJOR}_${MAJOR}.${m}-${revision}.dsc"
      if curl -fsS -o "/tmp/$dsc" "$pool/$dsc" 2>/dev/null; then found="$MAJOR.$m"; break; fi
    done
    [ -n "$found" ] || { echo "build-postgres: no source of postgresql-$MAJOR on $uri ($SUITE)" >&2; exit 3; }
    orig_name="postgresql-${MAJOR}_${found}.orig.tar.bz2"
    sum=$(awk -v f="$orig_name" '/^Checksums-Sha256:/ {s = 1; next} s && $3 == f {print $1; exit}' "/tmp/$dsc")
    as_root curl -fsS -o "$SRC_DIR/$orig_name.part" "$pool/$orig_name"
    echo "$sum  $SRC_DIR/$orig_name.part" | sha256sum -c --quiet - \
      || { echo "build-postgres: $orig_name does not match its .dsc" >&2; exit 1; }
    as_root mv "$SRC_DIR/$orig_name.part" "$SRC_DIR/$orig_name"
    echo "build-postgres: $SUITE's postgresql-$MAJOR $version is not on the mirror; took $found" >&2
  fi
fi
newest_orig=$(compgen -G "$SRC_DIR/$pattern" | sed -E "s/.*postgresql-${MAJOR}_(.*)\.orig\.tar\.bz2/\1/" | newest)
orig="$SRC_DIR/postgresql-${MAJOR}_${newest_orig}.orig.tar.bz2"
FULL=$(basename "$orig" | sed -E "s/postgresql-${MAJOR}_(.*)\.orig\.tar\.bz2/\1/")
FULL="${FULL//\~/-}"   # 19~rc1 -> 19-rc1: no `~` in paths that shells and pg_config print
PREFIX="$CACHE/pg-$FULL"

if [ ! -f "$PREFIX/.gprxy-built" ]; then
  echo "build-postgres: PostgreSQL $FULL into $PREFIX (a few minutes, once)" >&2
  build="$CACHE/build-$FULL"
  as_root rm -rf "$build" "$PREFIX"
  as_root mkdir -p "$build"
  as_root tar -xjf "$orig" -C "$build" --strip-components=1
  (
    cd "$build"
    # PostgreSQL's Makefile.global builds its generated headers (utils/errcodes.h, ...) only when
    # MAKELEVEL is 0. Started from the project's make, this script inherits MAKELEVEL=1 and
    # MAKEFLAGS: drop them so the build is the same by hand and under make.
    unset MAKELEVEL MAKEFLAGS MFLAGS
    # libcurl: psql's OAuth device flow (PostgreSQL 18 and later).
    curl=(); [ "$MAJOR" -ge 18 ] && curl=(--with-libcurl)
    ./configure --prefix="$PREFIX" --with-openssl "${curl[@]}" --without-icu >configure.log 2>&1 \
      || { tail -n 30 configure.log; exit 1; }
    make -j3 world-bin >make.log 2>&1 || { tail -n 40 make.log; exit 1; }
    make install-world-bin >install.log 2>&1 || { tail -n 40 install.log; exit 1; }
  )
  # PostgreSQL's own test issuer and test validator (the floor in the connect benchmark).
  as_root mkdir -p "$PREFIX/share/gprxy"
  # (PostgreSQL 18 and later.)
  for f in t/oauth_server.py validator.c; do
    if [ -f "$build/src/test/modules/oauth_validator/$f" ]; then
      as_root cp "$build/src/test/modules/oauth_validator/$f" "$PREFIX/share/gprxy/"
    fi
  done
  as_root rm -rf "$build"
  as_root touch "$PREFIX/.gprxy-built"
fi
# The stable name the Makefile and tests use.
ln -sfn "$PREFIX" "$CACHE/pg$MAJOR"
"$PREFIX/bin/pg_config" --version >&2

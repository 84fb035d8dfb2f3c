#!/usr/bin/env bash
# Builds gprxy's Debian packages with dpkg-deb into $GPRXY_DEB_DIR (default target/debian):
#
#   postgresql-NN-gprxy-validator   gprxy_validator for the PostgreSQL NN that PGNN_CONFIG names
#                                   (`cargo pgrx package`): the library in its pkglibdir, the
#                                   control and SQL files in its sharedir/extension. On 18 it is
#                                   the OAuth validator; on older versions the same library gives
#                                   the SQL side (claim functions, the signed context) that
#                                   fallback mode uses. One package per major, as Debian names
#                                   its PostgreSQL extensions (postgresql-16-pgaudit, ...).
#   gprxy                           the proxy: /usr/bin/gprxy, /etc/gprxy/gprxy.toml (conffile),
#                                   the systemd unit, its system user (postinst)
#
#   PG_VERSIONS    majors to package (default "18 17 15", and 19 first when the cache has it: the
#                  servers the project builds)
#   PG_CONFIG      PostgreSQL 18's pg_config (default: the cache's, $GPRXY_CACHE/pg18); a DBA with
#                  Debian's server gives /usr/lib/postgresql/18/bin/pg_config and gets
#                  /usr/lib/postgresql/18/lib and /usr/share/postgresql/18/extension
#   PG17_CONFIG    PostgreSQL 17's (default: the cache's), PG15_CONFIG 15's (default: Debian's),
#                  PG19_CONFIG 19's (default: the cache's)
#
# A package for a server that Debian's postgresql-NN package provides (its pg_config under
# /usr/lib/postgresql/NN) depends on that package; one for a server built from source cannot.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${GPRXY_CACHE:-/var/cache/gprxy}"
OUT="${GPRXY_DEB_DIR:-$ROOT/target/debian}"
PG19_CONFIG="${PG19_CONFIG:-$CACHE/pg19/bin/pg_config}"
default_versions="18 17 15"; [ -x "$PG19_CONFIG" ] && default_versions="19 $default_versions"
PG_VERSIONS="${PG_VERSIONS:-$default_versions}"
# cargo-pgrx 0.19.4 from the cache (bootstrap).
export PATH="$CACHE/cargo-pgrx-0.19.4/bin:$PATH"
PG18_CONFIG="${PG_CONFIG:-${PG18_CONFIG:-$CACHE/pg18/bin/pg_config}}"
PG17_CONFIG="${PG17_CONFIG:-$CACHE/pg17/bin/pg_config}"
PG15_CONFIG="${PG15_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
MAINTAINER="${DEB_MAINTAINER:-gprxy developers <gprxy@localhost>}"
REVISION="${DEB_REVISION:-1}"

step() { CURRENT_STEP="$1"; echo "package: $1" >&2; }
trap 'echo "package: FAILED at step: ${CURRENT_STEP:-start}" >&2' ERR

for tool in dpkg-deb dpkg-shlibdeps strip; do
  command -v "$tool" >/dev/null || { echo "package: $tool is missing (make bootstrap installs it)" >&2; exit 1; }
done

VERSION="$(cargo metadata --no-deps --format-version 1 --manifest-path "$ROOT/Cargo.toml" \
  | python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "gprxy-passthrough"))')"
DEBVER="$VERSION-$REVISION"
ARCH="$(dpkg --print-architecture)"
# Timestamps from the last commit, so that two builds of one commit are alike. Given to dpkg-deb
# only: exported to cargo it would rebuild every C dependency (the cc crate reruns build scripts
# when SOURCE_DATE_EPOCH changes), here and in make install-extension's builds after it.
EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"

WORK="$(mktemp -d /var/tmp/gprxy-package.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

# "libc6 (>= 2.34), ..." for the ELF files given, from dpkg-shlibdeps (it wants a debian/control).
shlib_depends() {
  local d="$WORK/shlibdeps"
  mkdir -p "$d/debian"
  printf 'Source: gprxy\n\nPackage: gprxy\nArchitecture: any\n' >"$d/debian/control"
  (cd "$d" && dpkg-shlibdeps -O --warnings=0 "$@") | sed -n 's/^shlibs:Depends=//p'
}

# Documentation every package carries (Debian policy 12.5 and 12.7).
add_docs() {
  local stage="$1" pkg="$2" doc="$1/usr/share/doc/$2"
  install -d -m 0755 "$doc"
  install -m 0644 "$ROOT/packaging/copyright" "$doc/copyright"
  {
    echo "$pkg ($DEBVER) unstable; urgency=medium"
    echo
    echo "  * Built from the gprxy repository, commit $COMMIT."
    echo
    echo " -- $MAINTAINER  $(date -u -R -d "@$EPOCH")"
  } | gzip -9n >"$doc/changelog.Debian.gz"
  chmod 0644 "$doc/changelog.Debian.gz"
}

# DEBIAN/control (with Installed-Size) and md5sums, then the archive.
build_deb() {
  local stage="$1" pkg="$2" control="$3"
  find "$stage" -type d -exec chmod 0755 {} +
  (cd "$stage" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum >DEBIAN/md5sums)
  chmod 0644 "$stage/DEBIAN/md5sums"
  local size
  size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
  printf '%s\nInstalled-Size: %s\n' "$control" "$size" >"$stage/DEBIAN/control"
  local deb="$OUT/${pkg}_${DEBVER}_${ARCH}.deb"
  rm -f "$OUT/${pkg}"_*.deb
  SOURCE_DATE_EPOCH="$EPOCH" dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
  echo "package: $deb" >&2
}

strip_elf() { strip --strip-unneeded --remove-section=.comment --remove-section=.note "$1"; }

# ---------------------------------------------------------------- the extension, per major
for major in $PG_VERSIONS; do
  case "$major" in
    19) pgc="$PG19_CONFIG" ;;
    18) pgc="$PG18_CONFIG" ;;
    17) pgc="$PG17_CONFIG" ;;
    15) pgc="$PG15_CONFIG" ;;
    *) echo "package: PostgreSQL $major is not one the project builds (19, 18, 17, 15)" >&2; exit 1 ;;
  esac
  step "postgresql-$major-gprxy-validator ($pgc)"
  [ -x "$pgc" ] || { echo "package: $pgc is not an executable pg_config" >&2; exit 1; }
  got="$("$pgc" --version | awk '{print $2}')"
  [ "${got%%.*}" = "$major" ] || { echo "package: $pgc is PostgreSQL $got, not $major" >&2; exit 1; }
  pkg="postgresql-$major-gprxy-validator"
  stage="$WORK/$pkg"
  mkdir -p "$stage/DEBIAN"
  features=()
  [ "$major" = 18 ] || features=(--no-default-features --features "pg$major")
  (cd "$ROOT/gprxy-validator" && CARGO="$ROOT/scripts/cargo-ignore-rust-version" cargo-pgrx pgrx package --profile extension --pg-config "$pgc" \
    "${features[@]}" --out-dir "$stage" >"$WORK/pgrx-$major.log" 2>&1) \
    || { cat "$WORK/pgrx-$major.log" >&2; exit 1; }
  libdir="$("$pgc" --pkglibdir)"
  extdir="$("$pgc" --sharedir)/extension"
  so="$stage$libdir/gprxy_validator.so"
  for f in "$so" "$stage$extdir/gprxy_validator.control" "$stage$extdir/gprxy_validator--$VERSION.sql"; do
    [ -f "$f" ] || { echo "package: cargo pgrx package made no ${f#"$stage"}" >&2; exit 1; }
  done
  strip_elf "$so"
  chmod 0644 "$so" "$stage$extdir"/*
  add_docs "$stage" "$pkg"
  ex="$stage/usr/share/doc/$pkg/examples"
  install -d "$ex"
  install -m 0644 "$ROOT"/{postgresql.conf,pg_hba.conf,pg_ident.conf}.example "$ROOT/issuers.toml.example" \
    "$ROOT"/sql/*.sql "$ex/"
  depends="$(shlib_depends "$so")"
  if [ "$libdir" = "/usr/lib/postgresql/$major/lib" ]; then
    depends="postgresql-$major, $depends"
    where="Debian's postgresql-$major"
  else
    where="the PostgreSQL $major server at $("$pgc" --bindir | sed 's|/bin$||')"
  fi
  if [ "$major" -ge 18 ]; then
    summary="OAuth validator module for PostgreSQL $major (gprxy_validator)"
    what=" gprxy_validator is PostgreSQL's OAuth validator (oauth_validator_libraries): it checks
 the access token (JWT signature against a cached JWKS, issuer, audience, expiry, scopes) and
 names the user or decides the role, and gives SQL its claims for row-level security."
  else
    summary="gprxy_validator's SQL side for PostgreSQL $major (claims, signed context)"
    what=" The SQL functions of gprxy_validator for PostgreSQL $major, which has no OAuth: the
 claim functions and gprxy.set_context, which accepts the context that gprxy's fallback mode
 signs for each server connection."
  fi
  build_deb "$stage" "$pkg" "Package: $pkg
Version: $DEBVER
Architecture: $ARCH
Maintainer: $MAINTAINER
Section: database
Priority: optional
Depends: $depends
Description: $summary
$what
 .
 Built for $where: library in $libdir, control and SQL files in $extdir."
done

# ---------------------------------------------------------------- the proxy
step "gprxy (cargo build --release)"
(cd "$ROOT" && cargo build -q --release -p gprxy-passthrough --bin gprxy)
target="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
pkg=gprxy
stage="$WORK/$pkg"
install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/etc/gprxy" "$stage/lib/systemd/system"
install -m 0755 "$target/release/gprxy" "$stage/usr/bin/gprxy"
strip_elf "$stage/usr/bin/gprxy"
install -m 0644 "$ROOT/gprxy.toml.example" "$stage/etc/gprxy/gprxy.toml"
install -m 0644 "$ROOT/packaging/gprxy/gprxy.service" "$stage/lib/systemd/system/gprxy.service"
for s in postinst prerm postrm; do install -m 0755 "$ROOT/packaging/gprxy/$s" "$stage/DEBIAN/$s"; done
echo /etc/gprxy/gprxy.toml >"$stage/DEBIAN/conffiles"
chmod 0644 "$stage/DEBIAN/conffiles"
add_docs "$stage" "$pkg"
install -m 0644 "$ROOT/README.md" "$stage/usr/share/doc/$pkg/README.md"
install -d "$stage/usr/share/doc/$pkg/docs"
install -m 0644 "$ROOT"/docs/*.md "$stage/usr/share/doc/$pkg/docs/"
install -d "$stage/usr/share/doc/$pkg/examples"
install -m 0644 "$ROOT/gprxy.toml.example" "$ROOT/issuers.toml.example" "$stage/usr/share/doc/$pkg/examples/"
build_deb "$stage" "$pkg" "Package: $pkg
Version: $DEBVER
Architecture: $ARCH
Maintainer: $MAINTAINER
Section: database
Priority: optional
Depends: adduser, $(shlib_depends "$stage/usr/bin/gprxy")
Description: OAuth-aware PostgreSQL proxy
 gprxy sits in front of PostgreSQL: it terminates TLS, relays PostgreSQL 18's OAuth login and
 logs every login (pass-through mode), or, for servers older than 18, validates the token itself,
 maps its roles to service accounts and logs in for the client from a session pool (fallback
 mode).
 .
 The package installs the gprxy.service unit (its own system user, hardened, Type=notify)
 without enabling or starting it: configure /etc/gprxy/gprxy.toml, then
 systemctl enable --now gprxy."
echo "package: ok ($(ls "$OUT"/*.deb | wc -l) packages in $OUT)" >&2

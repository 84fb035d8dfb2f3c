//! Builds the C shim that reads `MyProcPort` (pgrx's `Port` is opaque) and the session-end
//! timer and hooks (src/session_end.c), and the copy of the library's code into memory that
//! backends inherit (src/resident_code.c).

use std::path::PathBuf;
use std::process::Command;

/// pg_config for the build: `PGRX_PG_CONFIG_PATH` (set by `cargo pgrx`), else the `version`
/// entry of pgrx's config.toml, else `pg_config` on PATH.
fn pg_config(version: &str) -> PathBuf {
    if let Some(p) = std::env::var_os("PGRX_PG_CONFIG_PATH") {
        return p.into();
    }
    let home = std::env::var_os("PGRX_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgrx")));
    if let Some(cfg) = home.and_then(|h| std::fs::read_to_string(h.join("config.toml")).ok()) {
        for line in cfg.lines() {
            if let Some(v) = line.trim().strip_prefix(version) {
                let v = v.trim().trim_start_matches('=').trim().trim_matches('"');
                if !v.is_empty() {
                    return v.into();
                }
            }
        }
    }
    "pg_config".into()
}

fn main() {
    println!("cargo:rerun-if-changed=src/shim.c");
    println!("cargo:rerun-if-changed=src/session_end.c");
    println!("cargo:rerun-if-changed=src/resident_code.c");
    println!("cargo:rerun-if-env-changed=PGRX_PG_CONFIG_PATH");
    // `oauth_validator`: built for a server with OAuth validator modules (18 and later).
    println!("cargo::rustc-check-cfg=cfg(oauth_validator)");
    // `oauth_hba_options`: PostgreSQL 19 and later (pg_hba validator options, `error_detail`).
    println!("cargo::rustc-check-cfg=cfg(oauth_hba_options)");
    let version = ["pg19", "pg18", "pg17", "pg15"]
        .into_iter()
        .find(|v| std::env::var_os(format!("CARGO_FEATURE_{}", v.to_uppercase())).is_some())
        .unwrap_or("pg15");
    let pg_config = pg_config(version);
    let out = Command::new(&pg_config)
        .arg("--includedir-server")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", pg_config.display()));
    assert!(out.status.success(), "{} --includedir-server failed", pg_config.display());
    let include = String::from_utf8(out.stdout).expect("utf-8 path").trim().to_owned();
    let major: u32 = version[2..].parse().expect("pgNN");
    let validator = major >= 18;
    if validator {
        println!("cargo:rustc-cfg=oauth_validator");
    }
    if major >= 19 {
        println!("cargo:rustc-cfg=oauth_hba_options");
    }
    // Segments on 2 MiB boundaries (the dynamic loader honours the alignment): the copy the
    // postmaster keeps of the code (src/resident_code.c) then fits whole 2 MiB pages.
    // PostgreSQL 18 and later only: older servers load the SQL side, which keeps nothing resident.
    if validator && std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,max-page-size=2097152,-z,separate-loadable-segments");
    }
    // PostgreSQL's own headers have unused parameters; its extension builds (PGXS) say so too.
    cc::Build::new()
        .file("src/shim.c")
        .file("src/session_end.c")
        .file("src/resident_code.c")
        .include(include)
        .warnings(true)
        .flag("-Wno-unused-parameter")
        // A hook or callback whose type changed in a new major, or an API it no longer has, is
        // a build failure rather than a warning and a misread at run time.
        .flag("-Werror=incompatible-pointer-types")
        .flag("-Werror=implicit-function-declaration")
        .flag("-Werror=int-conversion")
        // The C side checks at compile time that its headers are of the major pgrx binds
        // (src/shim.c): pg_config and the feature must name the same server.
        .define("GPRXY_PG_MAJOR", major.to_string().as_str())
        .compile("gprxy_shim");
}

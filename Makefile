# gprxy: the two set-up commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
GPRXY_CACHE ?= /var/cache/gprxy
export GPRXY_CACHE
export GPRXY_PG18_PREFIX := $(GPRXY_CACHE)/pg18
export CARGO_TERM_COLOR := never
# cargo-pgrx 0.19.4, installed by bootstrap into the cache (not ~/.cargo/bin).
export PATH := $(GPRXY_CACHE)/cargo-pgrx-0.19.4/bin:$(PATH)
# pgrx 0.19 (the first pgrx with PostgreSQL 19) declares rust-version 1.96; these machines have
# Rust 1.95, on which it builds and its tests pass: every cargo command that builds the
# extension says --ignore-rust-version (README, "Building").
IRV := --ignore-rust-version

.PHONY: all bootstrap postgres fmt-check clippy lint install-extension package build unit-test test soak demo bench fuzz

all: test

## Debian packages, PostgreSQL 18 (built once into $(GPRXY_CACHE)), cargo-pgrx, the test user.
bootstrap:
	@bash scripts/bootstrap.sh

## Only the apt packages and PostgreSQL 18's build into $(GPRXY_CACHE); .ci/run runs it into an
## empty cache every time, so a broken build step fails CI even where the real cache is warm.
postgres:
	@bash scripts/bootstrap.sh postgres

fmt-check:
	cargo fmt --all -- --check

clippy:
	cargo clippy $(IRV) --workspace --all-targets -- -D warnings
	cargo clippy $(IRV) -p gprxy-validator --no-default-features --features pg15 -- -D warnings
	if [ -x $(GPRXY_CACHE)/pg19/bin/pg_config ]; then \
	  cargo clippy $(IRV) -p gprxy-validator --no-default-features --features pg19 -- -D warnings; fi

lint: fmt-check clippy

## gprxy_validator into PostgreSQL 18 and 19 (validator) and 17 and 15 (SQL functions).
install-extension: bootstrap
	@bash scripts/install-extension.sh

## Debian packages into target/debian (scripts/package.sh): postgresql-NN-gprxy-validator for
## each of PG_VERSIONS (default 18 17 15) and gprxy (binary, /etc/gprxy/gprxy.toml, systemd unit).
## PG_CONFIG names the PostgreSQL 18 server to build for (default: the cache's), e.g.
## make package PG_VERSIONS=18 PG_CONFIG=/usr/lib/postgresql/18/bin/pg_config
package: bootstrap
	@PG_CONFIG='$(PG_CONFIG)' PG17_CONFIG='$(PG17_CONFIG)' PG15_CONFIG='$(PG15_CONFIG)' \
	  PG_VERSIONS='$(PG_VERSIONS)' bash scripts/package.sh

build:
	cargo build $(IRV) --workspace --all-targets

## The unit tests that need no server and no bootstrap: gprxy-core and the proxy.
unit-test:
	cargo test $(IRV) -p gprxy-core -p gprxy-passthrough --no-fail-fast

## Everything: bootstrap, format and lint checks, the extension, the packages, every test (unit
## and end-to-end; tests/tests/packages.rs installs and purges the packages).
test: bootstrap lint install-extension package
	cargo build $(IRV) --workspace --bins
	cargo test $(IRV) --workspace --no-fail-fast
	GPRXY_FALLBACK_PG=17 cargo test $(IRV) -p gprxy-tests --no-fail-fast --test fallback --test context --test introspection
	GPRXY_FALLBACK_PG=17 cargo test $(IRV) -p gprxy-tests --no-fail-fast --test connect_drivers through_fallback
	# The validator's and the pass-through's end-to-end tests again on PostgreSQL 19, with what 19
	# adds (tests/tests/validator_pg19.rs). Bootstrap goes on without 19 when the mirror has no
	# source of it (it says so): then this says it did not run.
	if [ -x $(GPRXY_CACHE)/pg19/bin/postgres ]; then \
	  GPRXY_VALIDATOR_PG=19 cargo test $(IRV) -p gprxy-tests --no-fail-fast --test validator \
	    --test validator_pg19 --test session_validator --test passthrough -- --include-ignored; \
	else echo "make test: PostgreSQL 19 is not built ($(GPRXY_CACHE)/pg19): its validator tests DID NOT RUN"; fi
	$(MAKE) fuzz FUZZ_SECONDS=15

## Hostile sessions (tests/tests/hostile_sessions.rs) for DURATION seconds: rounds with seeds
## SEED, SEED+1, ... against every target, each judged from the server's side. make test runs one
## bounded round; a failure prints the seed and target to replay.
SEED ?= 1
DURATION ?= 1800
soak: bootstrap install-extension
	cargo build $(IRV) --workspace --bins
	GPRXY_GEN_SEED=$(SEED) GPRXY_GEN_DURATION=$(DURATION) cargo test $(IRV) -p gprxy-tests --test hostile_sessions -- --nocapture

## The whole product on this machine, no account anywhere; Ctrl-C (or SIGTERM, SIGHUP, or make's
## death: the demo is exec'd, so make is its parent) stops and cleans up.
demo: bootstrap install-extension
	cargo build $(IRV) -q -p gprxy-passthrough
	cargo build $(IRV) -q -p gprxy-tests --bin gprxy-demo
	exec "$${CARGO_TARGET_DIR:-target}/debug/gprxy-demo"

## Coverage-guided fuzzing of the proxy's wire parsing and of token validation (libFuzzer; see
## fuzz/README.md), FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = startup token
fuzz: bootstrap
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t && \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run $$t corpus/$$t $$(ls -d seeds/$$t 2>/dev/null) --sanitizer none \
	    -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

## Benchmarks: ratios against baselines measured in the same run. Every benchmark runs; the
## target fails at the end if any goal was missed or any benchmark failed, naming them.
bench: bootstrap install-extension
	@cargo build --release -p gprxy-passthrough; \
	failed=(); \
	run() { echo "bench: $$*"; "$$@" || failed+=("$$*"); }; \
	run cargo bench -p gprxy-core --bench validate; \
	run python3 scripts/bench-ratios.py target "validate_*" bare_verify validate_warm_cache 1.3; \
	run cargo bench -p gprxy-tests --bench connect; \
	run env GPRXY_BIN=$(CURDIR)/target/release/gprxy cargo bench -p gprxy-tests --bench fallback; \
	run env GPRXY_BIN=$(CURDIR)/target/release/gprxy cargo bench -p gprxy-tests --bench connector; \
	run python3 scripts/bench-ratios.py target "fallback_connect" direct_scram pooled_fallback 0.3; \
	run env GPRXY_BIN=$(CURDIR)/target/release/gprxy cargo run -q --release -p gprxy-tests --bin gprxy-bench-proxy; \
	if [ $${#failed[@]} -gt 0 ]; then printf 'bench: missed or failed: %s\n' "$${failed[@]}"; exit 1; fi

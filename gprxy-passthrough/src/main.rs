//! gprxy: an OAuth-aware PostgreSQL proxy.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::path::PathBuf;
use std::process::ExitCode;

use gprxy_passthrough::{config, connect, server, user_login};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gprxy", version, about = "OAuth-aware PostgreSQL proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: pass-through mode, and fallback mode when the config has a [fallback] section.
    Serve {
        /// TOML configuration file (see gprxy.toml.example).
        #[arg(long, short, env = "GPRXY_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: config::Overrides,
    },
    /// Log in to an identity provider with the OAuth device flow and store the tokens.
    Login {
        /// Issuer URL, exactly as the IdP names itself (e.g. https://tenant.auth0.com/).
        #[arg(long, env = "GPRXY_ISSUER")]
        issuer: String,
        /// OAuth client id of a public client with the device grant enabled.
        #[arg(long, env = "GPRXY_CLIENT_ID")]
        client_id: String,
        /// Scopes to request (offline_access asks for a refresh token).
        #[arg(long, default_value = "openid offline_access")]
        scope: String,
        /// `audience` parameter (Auth0: the API identifier, to get a JWT access token).
        #[arg(long)]
        audience: Option<String>,
        /// RFC 8707 `resource` (an absolute URI; repeatable), asked for at login and at every
        /// refresh: providers that issue JWT access tokens only for a resource need it.
        #[arg(long, value_parser = parse_resource)]
        resource: Vec<String>,
        /// PEM file of CA certificates for a private IdP.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// INSECURE, for tests only: allow a plain-HTTP issuer on a loopback address.
        #[arg(long, hide = true)]
        insecure_allow_http_loopback: bool,
    },
    /// Print a valid access token (refreshed when less than a minute is left): the stored
    /// login's, or a `gprxy connect` profile's with --profile.
    Token {
        /// A profile of the connector's configuration file.
        #[arg(long)]
        profile: Option<String>,
        /// With --profile: the connector's configuration file (default: connect.toml in gprxy's
        /// config folder).
        #[arg(long, env = "GPRXY_CONNECT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run the connector beside an application: it connects to a local socket without a
    /// password, and the connector logs in upstream with a token (see README).
    Connect {
        /// Configuration file (default: connect.toml in gprxy's config folder).
        #[arg(long, short, env = "GPRXY_CONNECT_CONFIG")]
        config: Option<PathBuf>,
        /// The profile to serve (may be left out when the file has one).
        #[arg(long, short)]
        profile: Option<String>,
        /// Fetch a token and log in once, printing what was done, then exit.
        #[arg(long)]
        check: bool,
    },
    /// Print the public key to pin in gprxy.context_keys for a fallback-mode context key file,
    /// making the file first (mode 0600) with --generate.
    ContextKey {
        /// PEM Ed25519 private key file (fallback.context_key_file).
        file: PathBuf,
        /// Make a new key in FILE (refused if it exists).
        #[arg(long)]
        generate: bool,
    },
    /// Check a configuration file as serve would (TLS files, key cache bounds, issuer URL; no
    /// network) and exit.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, short, env = "GPRXY_CONFIG")]
        config: PathBuf,
    },
}

fn init_logging(format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPRXY_LOG").unwrap_or_else(|_| "info".into());
    // The HTTP client's own trace hex-dumps every byte it sends and receives (client secrets in
    // Authorization headers, tokens in answers), 16 bytes a line: never logged, whatever
    // GPRXY_LOG asks for.
    let quiet = |d: &str| d.parse().expect("a valid directive");
    let filter = filter.add_directive(quiet("ureq_proto=info")).add_directive(quiet("ureq=info"));
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        config::LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        config::LogFormat::Text => builder.init(),
    }
}

fn parse_resource(v: &str) -> Result<String, String> {
    user_login::check_resource(v).map(|()| v.to_owned())
}

/// Client commands print their error as one line (no backtrace) and exit with status 1.
fn login_result(r: Result<(), user_login::LoginError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gprxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Login {
            issuer,
            client_id,
            scope,
            audience,
            resource,
            ca_file,
            insecure_allow_http_loopback,
        } => {
            if insecure_allow_http_loopback {
                eprintln!(
                    "gprxy: WARNING: plain-HTTP issuer allowed (--insecure-allow-http-loopback, tests only)"
                );
            }
            let req = user_login::LoginRequest {
                issuer,
                client_id,
                scope,
                audience,
                resource,
                ca_file,
                insecure_allow_http_loopback,
            };
            let path = user_login::credentials_path();
            Ok(login_result(user_login::login(&req, &mut std::io::stderr()).and_then(|creds| {
                user_login::save(&path, &creds)?;
                eprintln!("gprxy: logged in; tokens stored in {}", path.display());
                Ok(())
            })))
        }
        // Without --profile: the stored login, as before (a connector config in the environment
        // does not change what plain `gprxy token` prints).
        Command::Token { profile: None, .. } => Ok(login_result(
            user_login::token(&user_login::credentials_path(), gprxy_core::unix_time())
                .map(|t| println!("{t}")),
        )),
        Command::Token { profile: Some(profile), config } => {
            let path = config.unwrap_or_else(connect::config::default_path);
            let cfg = connect::config::ConnectConfig::load(&path)?;
            let profile = cfg.profile(Some(&profile))?.clone();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            match rt.block_on(connect::token(profile)) {
                Ok(t) => {
                    println!("{t}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("gprxy: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Connect { config, profile, check } => {
            let path = config.unwrap_or_else(connect::config::default_path);
            let cfg = connect::config::ConnectConfig::load(&path)?;
            let profile = cfg.profile(profile.as_deref())?.clone();
            init_logging(cfg.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .worker_threads(2)
                .thread_name("gprxy-connect")
                .build()?;
            if check {
                return Ok(match rt.block_on(connect::check(profile, &mut std::io::stdout())) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("gprxy connect --check: {e}");
                        ExitCode::FAILURE
                    }
                });
            }
            rt.block_on(connect::run(path, profile))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ContextKey { file, generate } => {
            if generate {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let pem = gprxy_core::context::ContextKey::generate_pem()?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&file)
                    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", file.display()))?;
                f.write_all(pem.as_bytes())?;
            }
            let key = config::load_context_key(&file)?;
            println!("{}", key.public_key());
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let cfg = config::Config::load(Some(&config), &config::Overrides::default())?;
            server::check(&cfg)?;
            println!("{}: ok", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config, overrides } => {
            let cfg = config::Config::load(config.as_deref(), &overrides)?;
            init_logging(cfg.log_format);
            let workers = cfg.worker_threads;
            let proxy = server::proxy(cfg)?;
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.enable_all().thread_name("gprxy-worker");
            if let Some(n) = workers {
                rt.worker_threads(n);
            }
            let rt = rt.build()?;
            // The accept loop runs on a worker, so that a new session starts on the thread that
            // accepted it instead of being handed over from the main thread.
            rt.block_on(async { tokio::spawn(server::run(proxy, config, overrides)).await })??;
            Ok(ExitCode::SUCCESS)
        }
    }
}

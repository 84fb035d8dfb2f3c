//! gprxy: an OAuth-aware PostgreSQL proxy.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::path::PathBuf;

use gprxy_passthrough::{config, server};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gprxy", version, about = "OAuth-aware PostgreSQL proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (pass-through mode).
    Serve {
        /// TOML configuration file (see gprxy.toml.example).
        #[arg(long, short, env = "GPRXY_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: config::Overrides,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, short, env = "GPRXY_CONFIG")]
        config: PathBuf,
    },
}

fn init_logging(format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPRXY_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        config::LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        config::LogFormat::Text => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => {
            config::Config::load(Some(&config), &config::Overrides::default())?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Serve { config, overrides } => {
            let cfg = config::Config::load(config.as_deref(), &overrides)?;
            init_logging(cfg.log_format);
            let shared = server::shared_state(cfg)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(server::run(shared, config, overrides))
        }
    }
}

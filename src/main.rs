//! The `tether` server binary: loads the configuration, starts the actors and the
//! HTTP/WebSocket listener, and shuts down gracefully on SIGINT or SIGTERM.
//!
//! `tether events` subscribes to a running server's event stream and prints events.

#![warn(missing_docs)]
#![warn(clippy::all)]
#![forbid(unsafe_code)]

/// jemalloc, built with background threads that hand freed memory back to the system
/// a few seconds after it is freed: glibc's malloc kept about 17 MiB per 12 000
/// connections that came and went (BENCHMARKS.md, churn).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod admin;
mod check_config;
mod cluster_api;
mod config;
mod dashboard;
mod events_cmd;
mod instructions_api;
mod listener;
mod metrics;
mod publishers;
mod server;
mod sse;
mod state;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Tether: keeps fleets of AI agents connected and accounted for.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML) layered over the embedded default.
    #[arg(long, env = "TETHER_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Print lifecycle events as they arrive.
    Events(events_cmd::EventsArgs),
    /// Check the configuration and print it as TOML (secrets redacted), without starting.
    CheckConfig,
}

fn main() -> ExitCode {
    // The RabbitMQ client logs every failed connection attempt at error level (and a
    // tracing span per connection); the publishers report outages themselves, once,
    // with what to do. RUST_LOG=lapin=debug still shows them.
    env_logger::Builder::new()
        .filter_module("lapin", log::LevelFilter::Off)
        .filter_module("tracing::span", log::LevelFilter::Off)
        .parse_env(env_logger::Env::default().default_filter_or("info"))
        .init();
    let cli = Cli::parse();
    let settings = match config::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("tether: {error}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::Events(args) => events_cmd::run(&settings, args),
        Command::CheckConfig => {
            print!("{}", check_config::effective_toml(&settings));
            ExitCode::SUCCESS
        }
    }
}

fn serve(settings: tether_actors::settings::Settings) -> ExitCode {
    let secret = match config::certificate_secret(&settings) {
        Ok(secret) => secret,
        Err(error) => {
            eprintln!("tether: {error}");
            return ExitCode::from(2);
        }
    };
    let system = actix_web::rt::System::new();
    match system.block_on(server::run(settings, secret)) {
        Ok(summary) => {
            log::info!(
                "stopped: {} agents at shutdown, {} left gracefully, {} forced; {} events published, {} dropped; shutdown took {:.2} s",
                summary.agents_at_start,
                summary.left_gracefully,
                summary.forced,
                summary.events_published,
                summary.events_dropped,
                summary.duration.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tether: cannot start: {error}");
            ExitCode::from(1)
        }
    }
}

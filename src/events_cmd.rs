//! `tether events`: subscribe to lifecycle events and print them as they arrive, one
//! JSON document per line (`--format json`, the default) or one human line each
//! (`--format human`). The source is a running server's `GET /events` stream.

use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use serde_json::Value;
use std::io::Write;
use std::process::ExitCode;
use tether_actors::settings::Settings;

/// Options of `tether events`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Where to read events from.
    #[arg(long, value_enum, default_value_t = Source::Sse)]
    pub from: Source,
    /// Server URL for `--from sse` (default: the configured listener).
    #[arg(long)]
    pub url: Option<String>,
    /// Admin token for `--from sse` (default: admin.token).
    #[arg(long)]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

/// Event sources.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The server's server-sent-events stream.
    Sse,
}

/// Output formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One CloudEvents JSON document per line.
    Json,
    /// `time type subject key=value ...`.
    Human,
}

/// Runs the subcommand until interrupted (or `--count` events).
pub fn run(settings: &Settings, args: EventsArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tether events: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.from {
            Source::Sse => from_sse(settings, &args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tether events: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Prints one event document in the chosen format. Returns false when stdout is gone.
pub fn print_event(json: &str, format: Format) -> bool {
    let line = match format {
        Format::Json => json.to_owned(),
        Format::Human => human(json),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
}

fn human(json: &str) -> String {
    let Ok(doc) = serde_json::from_str::<Value>(json) else {
        return json.to_owned();
    };
    let mut line = format!(
        "{} {:<26} {}",
        doc["time"].as_str().unwrap_or("-"),
        doc["type"].as_str().unwrap_or("-"),
        doc["subject"].as_str().unwrap_or("-")
    );
    if let Some(data) = doc["data"].as_object() {
        for (key, value) in data {
            if matches!(
                key.as_str(),
                "agent_id" | "node_id" | "metadata" | "session_id"
            ) {
                continue;
            }
            line.push_str(&format!(" {key}={value}"));
        }
    }
    line
}

async fn from_sse(settings: &Settings, args: &EventsArgs) -> Result<(), String> {
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}:{}", settings.network.host, settings.network.port));
    let url = format!("{}/events", url.trim_end_matches('/'));
    let mut request = reqwest::Client::new().get(&url);
    if let Some(token) = args.token.as_ref().or(settings.admin.token.as_ref()) {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}; is the server running?"))?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut printed = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("the event stream broke: {e}"))?;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data: ") {
                    if !print_event(data, args.format) {
                        return Ok(());
                    }
                    printed += 1;
                    if args.count.is_some_and(|n| printed >= n) {
                        return Ok(());
                    }
                }
            }
        }
    }
    Err("the server closed the event stream".into())
}

//! `tether events`: subscribe to lifecycle events and print them as they arrive, one
//! JSON document per line (`--format json`, the default) or one human line each
//! (`--format human`). The source is a running server's `GET /events` stream
//! (`--from sse`) or one of the configured brokers (`--from redis|kafka|rabbitmq`,
//! read with the settings of its `[events.*]` section). Once subscribed, one line
//! saying so goes to stderr.

mod kafka;
mod rabbitmq;
mod redis;

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
    /// For `--from redis` and `--from kafka`: start with the events published from
    /// now on, or with the oldest the broker still keeps. (RabbitMQ keeps no history
    /// for a new queue: always `now`.)
    #[arg(long, value_enum, default_value_t = Since::Now)]
    pub since: Since,
    /// For `--from rabbitmq`: the binding key of the queue (`agent.#`,
    /// `agent.disconnected`, `network.*`; `#` is everything).
    #[arg(long, default_value = "#")]
    pub binding: String,
}

/// Where a broker subscription starts.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// Events published from now on.
    Now,
    /// The oldest events the broker keeps.
    Beginning,
}

/// Event sources.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The server's server-sent-events stream.
    Sse,
    /// The Redis stream of `[events.redis]` (`XREAD`).
    Redis,
    /// The Kafka topic of `[events.kafka]` (every partition).
    Kafka,
    /// The RabbitMQ exchange of `[events.rabbitmq]` (an exclusive queue bound to it).
    Rabbitmq,
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
            Source::Redis => redis::read(&settings.events.redis, &args).await,
            Source::Kafka => kafka::read(&settings.events.kafka, &args).await,
            Source::Rabbitmq => rabbitmq::read(&settings.events.rabbitmq, &args).await,
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

/// Prints events and counts them against `--count`.
pub struct Printer {
    format: Format,
    count: Option<u64>,
    printed: u64,
}

impl Printer {
    /// A printer for the command's options.
    pub fn new(args: &EventsArgs) -> Self {
        Self {
            format: args.format,
            count: args.count,
            printed: 0,
        }
    }

    /// Prints one event; false when the command should stop (count reached or
    /// stdout gone).
    pub fn print(&mut self, json: &str) -> bool {
        if !print_event(json, self.format) {
            return false;
        }
        self.printed += 1;
        self.count.is_none_or(|n| self.printed < n)
    }

    /// Whether `--count 0` asked for nothing.
    pub fn done(&self) -> bool {
        self.count.is_some_and(|n| self.printed >= n)
    }
}

/// Tells the user (on stderr) that the subscription is in place.
pub fn subscribed(what: &str) {
    eprintln!("tether events: subscribed to {what}; waiting for events (Ctrl-C to stop)");
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
    subscribed(&url);
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut printer = Printer::new(args);
    if printer.done() {
        return Ok(());
    }
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("the event stream broke: {e}"))?;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data: ") {
                    if !printer.print(data) {
                        return Ok(());
                    }
                }
            }
        }
    }
    Err("the server closed the event stream".into())
}

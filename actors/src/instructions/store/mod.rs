//! Where instructions and sessions are kept: SQLite (embedded, the default) or
//! PostgreSQL, through one sqlx pool whose driver the URL picks, with the migrations of
//! `actors/migrations/<backend>/` embedded in the binary and run at start.
//!
//! Every change of state is one conditional `UPDATE … WHERE state = … RETURNING`, so
//! two changes racing for one instruction (an acknowledgement and a deadline, a cancel
//! and a delivery) cannot both happen: the database decides, and the loser changes
//! nothing. Each change also bumps the row's `version`, the `seq` of its event.

mod instructions;
mod sessions;

pub use instructions::{FinishedBy, NewInstruction, Outstanding, ToStore};
pub use sessions::NewSession;

use super::model::{Instruction, State, Strategy};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// What went wrong with the database.
#[derive(Debug, Clone)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self(format!("database error: {error}"))
    }
}

pub(crate) type Result<T> = std::result::Result<T, StoreError>;

/// Which database the store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// An SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

const INSTRUCTION: &str = "seq, id, agent_id, capability, strategy, session_id, payload, state, \
     attempt, max_attempts, ack_timeout_ms, version, created_at_ms, expires_at_ms, \
     delivered_at_ms, ack_deadline_ms, finished_at_ms, result, reason";

fn instruction(row: &AnyRow) -> Result<Instruction> {
    let state: String = row.try_get("state")?;
    let strategy: Option<String> = row.try_get("strategy")?;
    Ok(Instruction {
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        agent_id: row.try_get("agent_id")?,
        capability: row.try_get("capability")?,
        strategy: strategy.as_deref().and_then(Strategy::parse),
        session_id: row.try_get("session_id")?,
        payload: row.try_get("payload")?,
        state: State::parse(&state)
            .ok_or_else(|| StoreError(format!("stored state {state:?} is unknown")))?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        ack_timeout_ms: row.try_get("ack_timeout_ms")?,
        version: row.try_get("version")?,
        created_at_ms: row.try_get("created_at_ms")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        delivered_at_ms: row.try_get("delivered_at_ms")?,
        ack_deadline_ms: row.try_get("ack_deadline_ms")?,
        finished_at_ms: row.try_get("finished_at_ms")?,
        result: row.try_get("result")?,
        reason: row.try_get("reason")?,
    })
}

fn instructions(rows: &[AnyRow]) -> Result<Vec<Instruction>> {
    rows.iter().map(instruction).collect()
}

/// The instruction and session store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Connects to `url` (`sqlite://path`, created when missing, or `postgres://…`) and
    /// brings its schema up to date.
    pub async fn open(url: &str, max_connections: u32) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if let Some(path) = url.strip_prefix("sqlite://") {
            let url = match path.contains("mode=") {
                true => url.to_owned(),
                false if path.contains('?') => format!("{url}&mode=rwc"),
                false => format!("{url}?mode=rwc"),
            };
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(StoreError(format!(
                "storage.url {url:?} is neither sqlite://… nor postgres://…"
            )));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers do not wait for the writer. NORMAL: a commit
                        // survives the process being killed (not a power loss) without
                        // an fsync per commit.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| StoreError(format!("cannot open storage {}: {e}", redact(&url))))?;
        let migrations = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrations
            .run(&pool)
            .await
            .map_err(|e| StoreError(format!("cannot migrate storage {}: {e}", redact(&url))))?;
        Ok(Self { pool })
    }
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    crate::publisher::broker::mask_url_password(url, "<redacted>")
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn a_storage_url_is_shown_without_its_password() {
        assert_eq!(
            redact("postgres://u:secret@db/x"),
            "postgres://u:<redacted>@db/x"
        );
        assert_eq!(redact("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(redact("sqlite://tether.db"), "sqlite://tether.db");
    }
}

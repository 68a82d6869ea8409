//! Where instructions and sessions are kept: SQLite (embedded, the default) or
//! PostgreSQL, through one sqlx pool whose driver the URL picks, with the migrations of
//! `actors/migrations/<backend>/` embedded in the binary and run at start.
//!
//! Every change of state is one conditional `UPDATE … WHERE state = … RETURNING`, so
//! two changes racing for one instruction (an acknowledgement and a deadline, a cancel
//! and a delivery) cannot both happen: the database decides, and the loser changes
//! nothing. Each change also bumps the row's `version`, the `seq` of its event.

use super::model::{Instruction, Session, SessionState, State, Strategy};
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

type Result<T> = std::result::Result<T, StoreError>;

/// Which database the store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A new instruction, checked.
#[derive(Debug, Clone)]
pub struct NewInstruction {
    /// For this agent, or
    pub agent_id: Option<String>,
    /// for one online agent with this capability,
    pub capability: Option<String>,
    /// chosen this way.
    pub strategy: Option<Strategy>,
    /// In this (open) session.
    pub session_id: Option<String>,
    /// JSON text.
    pub payload: String,
    /// Most deliveries.
    pub max_attempts: i64,
    /// Milliseconds to acknowledge one delivery.
    pub ack_timeout_ms: i64,
    /// Milliseconds it lives.
    pub ttl_ms: i64,
}

/// An agent's acknowledgement, to be stored.
#[derive(Debug, Clone)]
pub struct FinishedBy {
    /// The agent that sent it.
    pub agent_id: std::sync::Arc<str>,
    /// The instruction it names.
    pub instruction_id: String,
    /// `done`, `failed` or `rejected`.
    pub state: State,
    /// Its `result` (JSON text).
    pub result: Option<String>,
}

/// A new instruction to store with its id: pending, or, with `to`, already delivered
/// to that agent (an online agent with nothing else pending): its first attempt, in
/// the same statement, its change number 2 (1 was its creation).
#[derive(Debug, Clone, Copy)]
pub struct ToStore<'a> {
    /// What was asked.
    pub new: &'a NewInstruction,
    /// Its id.
    pub id: &'a str,
    /// The agent it is delivered to at once, if any.
    pub to: Option<&'a str>,
}

/// The `SET` of taking a delivery back: pending again, or `failed` (a change, with a
/// new version) when it was its last attempt; `now` and `reason` are SQL expressions.
fn taking_back(now: &str, reason: &str) -> String {
    format!(
        "state = CASE WHEN attempt >= max_attempts THEN 'failed' ELSE 'pending' END, \
         finished_at_ms = CASE WHEN attempt >= max_attempts THEN {now} ELSE NULL END, \
         reason = {reason}, ack_deadline_ms = NULL, \
         version = CASE WHEN attempt >= max_attempts THEN version + 1 ELSE version END"
    )
}

fn insert_sql() -> String {
    format!(
        "INSERT INTO instructions (id, agent_id, capability, strategy, session_id, payload, \
         state, attempt, max_attempts, ack_timeout_ms, version, created_at_ms, expires_at_ms, \
         delivered_at_ms, ack_deadline_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         RETURNING {INSTRUCTION}"
    )
}

fn insert_query<'q>(
    sql: &'q str,
    item: &'q ToStore<'q>,
    now_ms: i64,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let new = item.new;
    let delivered = item.to.is_some();
    sqlx::query(sql)
        .bind(item.id)
        .bind(item.to.map(str::to_owned).or_else(|| new.agent_id.clone()))
        .bind(new.capability.clone())
        .bind(new.strategy.map(|s| s.as_str().to_owned()))
        .bind(new.session_id.clone())
        .bind(new.payload.as_str())
        .bind(if delivered { "delivered" } else { "pending" })
        .bind(i64::from(delivered))
        .bind(new.max_attempts)
        .bind(new.ack_timeout_ms)
        .bind(if delivered { 2_i64 } else { 1 })
        .bind(now_ms)
        .bind(now_ms.saturating_add(new.ttl_ms))
        .bind(delivered.then_some(now_ms))
        .bind(delivered.then(|| now_ms.saturating_add(new.ack_timeout_ms)))
}

/// A new session, checked.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The agent it is with.
    pub agent_id: String,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// JSON text of an object.
    pub parameters: String,
}

const INSTRUCTION: &str = "seq, id, agent_id, capability, strategy, session_id, payload, state, \
     attempt, max_attempts, ack_timeout_ms, version, created_at_ms, expires_at_ms, \
     delivered_at_ms, ack_deadline_ms, finished_at_ms, result, reason";

const SESSION: &str = "id, agent_id, name, description, parameters, state, version, \
     created_at_ms, last_activity_ms, closed_at_ms, close_reason";

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

fn session(row: &AnyRow) -> Result<Session> {
    let state: String = row.try_get("state")?;
    Ok(Session {
        id: row.try_get("id")?,
        agent_id: row.try_get("agent_id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        parameters: row.try_get("parameters")?,
        state: SessionState::parse(&state)
            .ok_or_else(|| StoreError(format!("stored session state {state:?} is unknown")))?,
        version: row.try_get("version")?,
        created_at_ms: row.try_get("created_at_ms")?,
        last_activity_ms: row.try_get("last_activity_ms")?,
        closed_at_ms: row.try_get("closed_at_ms")?,
        close_reason: row.try_get("close_reason")?,
    })
}

fn instructions(rows: &[AnyRow]) -> Result<Vec<Instruction>> {
    rows.iter().map(instruction).collect()
}

/// The instruction and session store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
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
        Ok(Self { pool, backend })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Stores a new instruction (see [`ToStore`]).
    pub async fn insert(&self, item: &ToStore<'_>, now_ms: i64) -> Result<Instruction> {
        let sql = insert_sql();
        let row = insert_query(&sql, item, now_ms)
            .fetch_one(&self.pool)
            .await?;
        instruction(&row)
    }

    /// Stores new instructions in one transaction (one commit for a batch of
    /// creations), in the order given: that is their creation order.
    pub async fn insert_many(
        &self,
        items: &[ToStore<'_>],
        now_ms: i64,
    ) -> Result<Vec<Instruction>> {
        let sql = insert_sql();
        let mut transaction = self.pool.begin().await?;
        let mut stored = Vec::with_capacity(items.len());
        for item in items {
            let row = insert_query(&sql, item, now_ms)
                .fetch_one(&mut *transaction)
                .await?;
            stored.push(instruction(&row)?);
        }
        transaction.commit().await?;
        Ok(stored)
    }

    /// Delivers the oldest `limit` pending, unexpired instructions given to `agent_id`
    /// itself, in one statement; they come back in creation order.
    pub async fn deliver_backlog(
        &self,
        agent_id: &str,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<Instruction>> {
        let sql = format!(
            "UPDATE instructions SET state = 'delivered', attempt = attempt + 1, \
             delivered_at_ms = $2, ack_deadline_ms = $2 + ack_timeout_ms, version = version + 1 \
             WHERE id IN (SELECT id FROM instructions WHERE agent_id = $1 AND state = 'pending' \
             AND capability IS NULL AND expires_at_ms > $2 AND attempt < max_attempts \
             ORDER BY seq LIMIT $3) AND state = 'pending' RETURNING {INSTRUCTION}"
        );
        let rows = sqlx::query(&sql)
            .bind(agent_id)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut delivered = instructions(&rows)?;
        delivered.sort_unstable_by_key(|instruction| instruction.seq);
        Ok(delivered)
    }

    /// The instruction `id`.
    pub async fn get(&self, id: &str) -> Result<Option<Instruction>> {
        let sql = format!("SELECT {INSTRUCTION} FROM instructions WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(instruction).transpose()
    }

    /// The instructions for `agent_id` (in creation order), of `state` if given, at most
    /// `limit`.
    pub async fn for_agent(
        &self,
        agent_id: &str,
        state: Option<State>,
        limit: i64,
    ) -> Result<Vec<Instruction>> {
        let filter = match state {
            Some(state) => format!("AND state = '{}'", state.as_str()),
            None => String::new(),
        };
        let sql = format!(
            "SELECT {INSTRUCTION} FROM instructions WHERE agent_id = $1 {filter} \
             ORDER BY seq LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(agent_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        instructions(&rows)
    }

    /// Pending, unexpired instructions asking for `capability` created after `after_seq`,
    /// in creation order.
    pub async fn waiting_for(
        &self,
        capability: &str,
        now_ms: i64,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<Instruction>> {
        let sql = format!(
            "SELECT {INSTRUCTION} FROM instructions WHERE capability = $1 AND state = 'pending' \
             AND expires_at_ms > $3 AND seq > $4 ORDER BY seq LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(capability)
            .bind(limit)
            .bind(now_ms)
            .bind(after_seq)
            .fetch_all(&self.pool)
            .await?;
        instructions(&rows)
    }

    /// Every unfinished instruction (at start: their deadlines and expiries).
    pub async fn unfinished(&self) -> Result<Vec<Instruction>> {
        let sql = format!(
            "SELECT {INSTRUCTION} FROM instructions WHERE state IN ('pending', 'delivered') \
             ORDER BY seq"
        );
        instructions(&sqlx::query(&sql).fetch_all(&self.pool).await?)
    }

    /// Delivers pending instruction `id` to `agent_id`: its next attempt, due for an
    /// acknowledgement `ack_timeout` from `now_ms`. `None` when it is no longer pending,
    /// has used its attempts or has expired.
    pub async fn deliver(
        &self,
        id: &str,
        agent_id: &str,
        now_ms: i64,
    ) -> Result<Option<Instruction>> {
        let sql = format!(
            "UPDATE instructions SET state = 'delivered', agent_id = $2, attempt = attempt + 1, \
             delivered_at_ms = $3, ack_deadline_ms = $3 + ack_timeout_ms, version = version + 1 \
             WHERE id = $1 AND state = 'pending' AND attempt < max_attempts \
             AND expires_at_ms > $3 RETURNING {INSTRUCTION}"
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(agent_id)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(instruction).transpose()
    }

    /// Takes back delivery `attempt` of `id` (not acknowledged in time, or its agent's
    /// connection ended): pending again, or `failed` when it was the last attempt.
    /// Only failing is a change with an event (and a new `version`): a return to
    /// pending shows in the next delivery's event (`attempt` + 1, and `reason`).
    pub async fn take_back(
        &self,
        id: &str,
        attempt: i64,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<Instruction>> {
        let sql = format!(
            "UPDATE instructions SET {} \
             WHERE id = $1 AND state = 'delivered' AND attempt = $2 RETURNING {INSTRUCTION}",
            taking_back("$3", "$4")
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(attempt)
            .bind(now_ms)
            .bind(reason)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(instruction).transpose()
    }

    /// Expires up to `limit` unfinished instructions whose `ttl` ran out before
    /// `cutoff_ms` (deadlines no live node handled: a lost node's).
    pub async fn expire_overdue(
        &self,
        cutoff_ms: i64,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<Instruction>> {
        let sql = format!(
            "UPDATE instructions SET state = 'expired', reason = 'ttl', finished_at_ms = $2, \
             ack_deadline_ms = NULL, version = version + 1 \
             WHERE id IN (SELECT id FROM instructions WHERE state IN ('pending', 'delivered') \
             AND expires_at_ms < $1 LIMIT $3) AND state IN ('pending', 'delivered') \
             RETURNING {INSTRUCTION}"
        );
        self.overdue(&sql, cutoff_ms, now_ms, limit).await
    }

    /// Runs an overdue statement (`$1` cutoff, `$2` now, `$3` limit).
    async fn overdue(
        &self,
        sql: &str,
        cutoff_ms: i64,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<Instruction>> {
        let rows = sqlx::query(sql)
            .bind(cutoff_ms)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        instructions(&rows)
    }

    /// Takes back up to `limit` deliveries whose acknowledgement was due before
    /// `cutoff_ms` (deadlines no live node handled: a lost node's), as
    /// [`take_back`](Self::take_back) does with reason `ack_timeout`.
    pub async fn take_back_overdue(
        &self,
        cutoff_ms: i64,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<Instruction>> {
        let sql = format!(
            "UPDATE instructions SET {} \
             WHERE id IN (SELECT id FROM instructions WHERE state = 'delivered' \
             AND ack_deadline_ms < $1 LIMIT $3) AND state = 'delivered' RETURNING {INSTRUCTION}",
            taking_back("$2", "'ack_timeout'")
        );
        self.overdue(&sql, cutoff_ms, now_ms, limit).await
    }

    /// Finishes `id` as `state` (with the agent's `result` or a `reason`) if it is
    /// unfinished and, when `agent_id` is given, was last delivered to that agent.
    pub async fn finish(
        &self,
        id: &str,
        agent_id: Option<&str>,
        state: State,
        result: Option<String>,
        reason: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<Instruction>> {
        let mine = match agent_id {
            Some(_) => "AND agent_id = $6",
            None => "AND $6 = ''",
        };
        let sql = format!(
            "UPDATE instructions SET state = $2, result = $3, reason = $4, finished_at_ms = $5, \
             ack_deadline_ms = NULL, version = version + 1 \
             WHERE id = $1 AND state IN ('pending', 'delivered') {mine} RETURNING {INSTRUCTION}"
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(state.as_str())
            .bind(result)
            .bind(reason)
            .bind(now_ms)
            .bind(agent_id.unwrap_or(""))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(instruction).transpose()
    }

    /// Finishes each of `acks` as its agent said, all in one transaction (one commit
    /// for a batch of acknowledgements); `None` for those that were not the agent's
    /// unfinished instruction.
    pub async fn finish_acks(
        &self,
        acks: &[FinishedBy],
        now_ms: i64,
    ) -> Result<Vec<Option<Instruction>>> {
        let sql = format!(
            "UPDATE instructions SET state = $2, result = $3, finished_at_ms = $4, \
             reason = NULL, ack_deadline_ms = NULL, version = version + 1 \
             WHERE id = $1 AND state IN ('pending', 'delivered') AND agent_id = $5 \
             RETURNING {INSTRUCTION}"
        );
        let mut transaction = self.pool.begin().await?;
        let mut finished = Vec::with_capacity(acks.len());
        for ack in acks {
            let row = sqlx::query(&sql)
                .bind(&ack.instruction_id)
                .bind(ack.state.as_str())
                .bind(ack.result.clone())
                .bind(now_ms)
                .bind(&*ack.agent_id)
                .fetch_optional(&mut *transaction)
                .await?;
            finished.push(row.as_ref().map(instruction).transpose()?);
        }
        transaction.commit().await?;
        Ok(finished)
    }

    /// Stores a new open session.
    pub async fn open_session(&self, new: &NewSession, id: &str, now_ms: i64) -> Result<Session> {
        let sql = format!(
            "INSERT INTO sessions (id, agent_id, name, description, parameters, state, version, \
             created_at_ms, last_activity_ms) VALUES ($1, $2, $3, $4, $5, 'open', 1, $6, $6) \
             RETURNING {SESSION}"
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(&new.agent_id)
            .bind(&new.name)
            .bind(&new.description)
            .bind(&new.parameters)
            .bind(now_ms)
            .fetch_one(&self.pool)
            .await?;
        session(&row)
    }

    /// The session `id`.
    pub async fn session(&self, id: &str) -> Result<Option<Session>> {
        let sql = format!("SELECT {SESSION} FROM sessions WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(session).transpose()
    }

    /// Sessions, of `agent_id` and in `state` when given, oldest first, at most `limit`.
    pub async fn sessions(
        &self,
        agent_id: Option<&str>,
        state: Option<SessionState>,
        limit: i64,
    ) -> Result<Vec<Session>> {
        let mut filters = vec![match agent_id {
            Some(_) => "agent_id = $1",
            None => "$1 = ''",
        }
        .to_owned()];
        if let Some(state) = state {
            filters.push(format!("state = '{}'", state.as_str()));
        }
        let sql = format!(
            "SELECT {SESSION} FROM sessions WHERE {} ORDER BY created_at_ms, id LIMIT $2",
            filters.join(" AND ")
        );
        let rows = sqlx::query(&sql)
            .bind(agent_id.unwrap_or(""))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(session).collect()
    }

    /// Closes session `id` if it is open and cancels its unfinished instructions, in
    /// one transaction; `None` when it was not open.
    pub async fn close_session(
        &self,
        id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<(Session, Vec<Instruction>)>> {
        let mut transaction = self.pool.begin().await?;
        let sql = format!(
            "UPDATE sessions SET state = 'closed', closed_at_ms = $2, close_reason = $3, \
             version = version + 1 WHERE id = $1 AND state = 'open' RETURNING {SESSION}"
        );
        let Some(row) = sqlx::query(&sql)
            .bind(id)
            .bind(now_ms)
            .bind(reason)
            .fetch_optional(&mut *transaction)
            .await?
        else {
            return Ok(None);
        };
        let closed = session(&row)?;
        let sql = format!(
            "UPDATE instructions SET state = 'cancelled', reason = 'session_closed', \
             finished_at_ms = $2, ack_deadline_ms = NULL, version = version + 1 \
             WHERE session_id = $1 AND state IN ('pending', 'delivered') RETURNING {INSTRUCTION}"
        );
        let rows = sqlx::query(&sql)
            .bind(id)
            .bind(now_ms)
            .fetch_all(&mut *transaction)
            .await?;
        let mut cancelled = instructions(&rows)?;
        cancelled.sort_unstable_by_key(|instruction| instruction.seq);
        transaction.commit().await?;
        Ok(Some((closed, cancelled)))
    }

    /// Records activity in session `id` (an instruction created or acknowledged in it).
    pub async fn touch_session(&self, id: &str, now_ms: i64) -> Result<()> {
        sqlx::query("UPDATE sessions SET last_activity_ms = $2 WHERE id = $1 AND state = 'open'")
            .bind(id)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ids of open sessions without activity since `before_ms`.
    pub async fn idle_sessions(&self, before_ms: i64, limit: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id FROM sessions WHERE state = 'open' AND last_activity_ms < $1 \
             ORDER BY last_activity_ms LIMIT $2",
        )
        .bind(before_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| row.try_get("id").map_err(StoreError::from))
            .collect()
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

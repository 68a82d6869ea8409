//! The sessions in the store: opening, reading, closing (with their instructions),
//! activity.

use super::{instructions, Result, Store, StoreError, INSTRUCTION};
use crate::instructions::model::{Instruction, Session, SessionState};
use sqlx::any::AnyRow;
use sqlx::Row;

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

const SESSION: &str = "id, agent_id, name, description, parameters, state, version, \
     created_at_ms, last_activity_ms, closed_at_ms, close_reason";

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

impl Store {
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

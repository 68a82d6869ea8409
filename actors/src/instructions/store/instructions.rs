//! The instructions in the store: creating, delivering, taking back, finishing.

use super::{instruction, instructions, Result, Store, INSTRUCTION};
use crate::instructions::model::{Instruction, State, Strategy};
use sqlx::Row;

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

/// An unfinished instruction's deadlines (read at start).
#[derive(Debug, Clone)]
pub struct Outstanding {
    /// Its id.
    pub id: String,
    /// Delivered (else pending).
    pub delivered: bool,
    /// Deliveries so far.
    pub attempt: i64,
    /// Epoch ms it expires.
    pub expires_at_ms: i64,
    /// Epoch ms its current delivery must be acknowledged by.
    pub ack_deadline_ms: Option<i64>,
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

/// The `SET` of delivering a pending instruction at `now` (an SQL expression): its
/// next attempt, due for an acknowledgement `ack_timeout` later.
fn delivering(now: &str) -> String {
    format!(
        "state = 'delivered', attempt = attempt + 1, delivered_at_ms = {now}, \
         ack_deadline_ms = {now} + ack_timeout_ms, version = version + 1"
    )
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

impl Store {
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
            "UPDATE instructions SET {} \
             WHERE id IN (SELECT id FROM instructions WHERE agent_id = $1 AND state = 'pending' \
             AND capability IS NULL AND expires_at_ms > $2 AND attempt < max_attempts \
             ORDER BY seq LIMIT $3) AND state = 'pending' RETURNING {INSTRUCTION}",
            delivering("$2")
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

    /// What the deadlines of every unfinished instruction need (at start), without
    /// their payloads.
    pub async fn outstanding(&self) -> Result<Vec<Outstanding>> {
        let rows = sqlx::query(
            "SELECT id, state, attempt, expires_at_ms, ack_deadline_ms FROM instructions \
             WHERE state IN ('pending', 'delivered') ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let state: String = row.try_get("state")?;
                Ok(Outstanding {
                    id: row.try_get("id")?,
                    delivered: state == State::Delivered.as_str(),
                    attempt: row.try_get("attempt")?,
                    expires_at_ms: row.try_get("expires_at_ms")?,
                    ack_deadline_ms: row.try_get("ack_deadline_ms")?,
                })
            })
            .collect()
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
            "UPDATE instructions SET agent_id = $2, {} \
             WHERE id = $1 AND state = 'pending' AND attempt < max_attempts \
             AND expires_at_ms > $3 RETURNING {INSTRUCTION}",
            delivering("$3")
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

    /// Finishes `id` as `state` for `reason` (expired, cancelled) if it is unfinished.
    pub async fn finish(
        &self,
        id: &str,
        state: State,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<Instruction>> {
        let sql = format!(
            "UPDATE instructions SET state = $2, reason = $3, finished_at_ms = $4, \
             ack_deadline_ms = NULL, version = version + 1 \
             WHERE id = $1 AND state IN ('pending', 'delivered') RETURNING {INSTRUCTION}"
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(state.as_str())
            .bind(reason)
            .bind(now_ms)
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
}

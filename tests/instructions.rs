//! Instructions and sessions (issue 13, PROTOCOL.md §11) against the real binary, each
//! test on SQLite and on PostgreSQL (a database of its own on the local server).

mod common;

use common::instructions::{
    ack, assert_no_instruction, create, create_id, event_of, get, next_instruction, post, worker,
    Db, TestDatabase,
};
use common::{Agent, EventStream};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

/// Runs each named scenario once per database: `sqlite::name` and `postgres::name`.
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Db::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Db::Postgres).await })*
        }
    };
}

on_both_databases!(
    an_instruction_reaches_its_agent_and_one_ack_finishes_it,
    an_offline_agent_receives_its_backlog_in_order_when_it_registers,
    an_unacknowledged_delivery_is_sent_again_then_fails_after_max_attempts,
    a_delivery_cut_by_a_dropped_connection_is_sent_again_with_no_second_done,
    an_instruction_past_its_ttl_expires_undelivered,
    a_cancelled_instruction_is_not_delivered_and_its_late_ack_is_refused,
    an_agent_without_the_instructions_capability_never_receives_one,
    capability_instructions_spread_least_loaded_and_move_when_their_agent_goes_stale,
    round_robin_gives_each_capable_agent_its_turn,
    a_server_killed_with_1000_unfinished_instructions_loses_none_and_finishes_none_twice,
    closing_a_session_cancels_its_instructions_and_idle_sessions_close,
    bad_input_on_every_route_gets_a_clear_4xx_and_stores_nothing,
);

async fn an_instruction_reaches_its_agent_and_one_ack_finishes_it(db: Db) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let mut alice = worker(&server, "alice", &[]).await;
    let mut bob = worker(&server, "bob", &[]).await;

    let created = create(
        &server,
        "alice",
        json!({"payload": {"task": "summarize", "n": 3}}),
    )
    .await;
    let id = created["instruction_id"].as_str().unwrap().to_owned();
    let frame = next_instruction(&mut alice).await;
    assert_eq!(frame["instruction_id"], id.as_str());
    assert_eq!(frame["payload"], json!({"task": "summarize", "n": 3}));
    assert_eq!(frame["attempt"], 1);
    assert!(
        frame["expires_at"].as_str().unwrap().ends_with('Z'),
        "{frame}"
    );

    // Another agent cannot finish it; an unknown id is refused.
    ack(&mut bob, &id, "done", json!({})).await;
    let refused = bob.wait_for(|f| f["type"] == "error").await;
    assert_eq!(refused["error_code"], "not_your_instruction", "{refused}");
    assert_eq!(refused["instruction_id"], id.as_str());
    ack(&mut bob, "no-such-instruction", "done", json!({})).await;
    let refused = bob.wait_for(|f| f["type"] == "error").await;
    assert_eq!(refused["error_code"], "unknown_instruction", "{refused}");

    ack(&mut alice, &id, "done", json!({"summary": "ok"})).await;
    let done = event_of(&mut events, "instruction.done", &id).await;
    assert_eq!(done["data"]["result"], json!({"summary": "ok"}));
    // A second ack of a finished instruction is refused, and changes nothing.
    ack(&mut alice, &id, "failed", json!({})).await;
    let refused = alice.wait_for(|f| f["type"] == "error").await;
    assert_eq!(refused["error_code"], "instruction_finished", "{refused}");

    let (status, stored) = get(&server, &format!("/instructions/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(stored["state"], "done");
    assert_eq!(stored["result"], json!({"summary": "ok"}));
    assert_eq!(stored["attempt"], 1);

    // Its events, in order, numbered by seq.
    let created_event = event_of(&mut events, "instruction.created", &id).await;
    let delivered = event_of(&mut events, "instruction.delivered", &id).await;
    let seqs: Vec<u64> = [&created_event, &delivered, &done]
        .iter()
        .map(|e| e["data"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(delivered["data"]["agent_id"], "alice");
}

async fn an_offline_agent_receives_its_backlog_in_order_when_it_registers(db: Db) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[]);
    let mut ids = Vec::new();
    for n in 0..20 {
        let created = create(&server, "carol", json!({"payload": {"n": n}})).await;
        ids.push(created["instruction_id"].as_str().unwrap().to_owned());
    }
    let (_, listed) = get(&server, "/agents/carol/instructions?state=pending").await;
    assert_eq!(listed["count"], 20);

    let mut carol = worker(&server, "carol", &[]).await;
    for (n, id) in ids.iter().enumerate() {
        let frame = next_instruction(&mut carol).await;
        assert_eq!(
            frame["instruction_id"],
            id.as_str(),
            "instruction {n} out of order"
        );
        assert_eq!(frame["payload"]["n"], n);
        ack(&mut carol, id, "done", Value::Null).await;
    }
    assert_no_instruction(&mut carol, "after its backlog").await;
}

async fn an_unacknowledged_delivery_is_sent_again_then_fails_after_max_attempts(db: Db) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let mut dave = worker(&server, "dave", &[]).await;
    let body = json!({"payload": {}, "ack_timeout": 0.3, "max_attempts": 2});
    let id = create_id(&server, "dave", body).await;
    let first = next_instruction(&mut dave).await;
    assert_eq!(first["attempt"], 1);
    let second = next_instruction(&mut dave).await;
    assert_eq!(second["instruction_id"], id.as_str());
    assert_eq!(second["attempt"], 2);
    let failed = event_of(&mut events, "instruction.failed", &id).await;
    assert_eq!(failed["data"]["reason"], "ack_timeout");
    assert_eq!(failed["data"]["attempt"], 2);
    // Every change is an event, numbered without gaps; the redelivery says why.
    let created = event_of(&mut events, "instruction.created", &id).await;
    let first = event_of(&mut events, "instruction.delivered", &id).await;
    let again = event_of(&mut events, "instruction.delivered", &id).await;
    assert_eq!(again["data"]["reason"], "ack_timeout");
    let seqs: Vec<u64> = [&created, &first, &again, &failed]
        .iter()
        .map(|e| e["data"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    let (_, stored) = get(&server, &format!("/instructions/{id}")).await;
    assert_eq!(stored["state"], "failed");
    assert_no_instruction(&mut dave, "after its last attempt").await;
}

async fn a_delivery_cut_by_a_dropped_connection_is_sent_again_with_no_second_done(db: Db) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let mut erin = worker(&server, "erin", &[]).await;
    let id = create_id(&server, "erin", json!({"payload": {"job": 1}})).await;
    assert_eq!(next_instruction(&mut erin).await["attempt"], 1);
    erin.abort();
    event_of(&mut events, "instruction.delivered", &id).await;

    let mut erin = worker(&server, "erin", &[]).await;
    let again = next_instruction(&mut erin).await;
    assert_eq!(again["instruction_id"], id.as_str());
    assert_eq!(again["attempt"], 2);
    ack(&mut erin, &id, "done", json!({"ok": true})).await;
    ack(&mut erin, &id, "done", json!({"ok": true})).await;
    let refused = erin.wait_for(|f| f["type"] == "error").await;
    assert_eq!(refused["error_code"], "instruction_finished");
    let done = event_of(&mut events, "instruction.done", &id).await;
    assert_eq!(done["data"]["attempt"], 2);
    let (_, stored) = get(&server, &format!("/instructions/{id}")).await;
    assert_eq!(stored["state"], "done");
    assert_eq!(
        stored["reason"],
        Value::Null,
        "done by its agent: no reason left over"
    );
    assert_no_instruction(&mut erin, "after done").await;
}

async fn an_instruction_past_its_ttl_expires_undelivered(db: Db) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let id = create_id(&server, "frank", json!({"payload": {}, "ttl": 0.3})).await;
    let expired = event_of(&mut events, "instruction.expired", &id).await;
    assert_eq!(expired["data"]["reason"], "ttl");
    let mut frank = worker(&server, "frank", &[]).await;
    assert_no_instruction(&mut frank, "an expired instruction was delivered").await;
    let (_, stored) = get(&server, &format!("/instructions/{id}")).await;
    assert_eq!(stored["state"], "expired");
}

async fn a_cancelled_instruction_is_not_delivered_and_its_late_ack_is_refused(db: Db) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[]);
    let client = common::http();
    let waiting = create(&server, "gina", json!({"payload": {}})).await;
    let waiting_id = waiting["instruction_id"].as_str().unwrap();
    let response = client
        .delete(server.http(&format!("/instructions/{waiting_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cancelled: Value = response.json().await.unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    // Cancelling again: 409; an unknown id: 404.
    let again = client
        .delete(server.http(&format!("/instructions/{waiting_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let unknown = client
        .delete(server.http("/instructions/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let mut gina = worker(&server, "gina", &[]).await;
    assert_no_instruction(&mut gina, "a cancelled instruction was delivered").await;
    let live = create(&server, "gina", json!({"payload": {}})).await;
    let live_id = live["instruction_id"].as_str().unwrap();
    next_instruction(&mut gina).await;
    let response = client
        .delete(server.http(&format!("/instructions/{live_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "a delivered instruction can be cancelled"
    );
    ack(&mut gina, live_id, "done", json!({})).await;
    let refused = gina.wait_for(|f| f["type"] == "error").await;
    assert_eq!(refused["error_code"], "instruction_finished");
    let (_, stored) = get(&server, &format!("/instructions/{live_id}")).await;
    assert_eq!(stored["state"], "cancelled");
}

async fn an_agent_without_the_instructions_capability_never_receives_one(db: Db) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[]);
    // As an OpenAgents 0.5.1 agent registers: no capabilities.
    let (mut plain, _) = Agent::register(&server.ws_url(), "hana").await;
    let id = create_id(&server, "hana", json!({"payload": {}})).await;
    assert_no_instruction(&mut plain, "an agent without the capability").await;
    let (_, stored) = get(&server, &format!("/instructions/{id}")).await;
    assert_eq!(stored["state"], "pending");
    // An ack from it is refused like any foreign ack.
    ack(&mut plain, "whatever", "done", json!({})).await;
    let refused = plain.wait_for(|f| f["type"] == "error").await;
    assert_eq!(refused["error_code"], "unknown_instruction");
}

async fn capability_instructions_spread_least_loaded_and_move_when_their_agent_goes_stale(db: Db) {
    let database = TestDatabase::new(db).await;
    let heartbeat = [
        ("TETHER__HEARTBEAT__INTERVAL", "2"),
        ("TETHER__HEARTBEAT__PING_TIMEOUT", "1"),
    ];
    let server = database.start(&heartbeat);
    let mut events = EventStream::subscribe(&server, None).await;
    let names = ["gpu-a", "gpu-b", "gpu-c"];
    // Each gpu agent reads (and answers pings) on a task of its own and reports the
    // instructions it receives, without acknowledging them; gpu-a stops reading when
    // told to, and so goes stale.
    let (received_tx, mut received) = tokio::sync::mpsc::unbounded_channel::<(String, Value)>();
    let (stop_a, stop_a_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stop_a_rx = Some(stop_a_rx);
    for name in names {
        let mut agent = worker(&server, name, &["gpu"]).await;
        let (tx, stop) = (
            received_tx.clone(),
            stop_a_rx.take().filter(|_| name == "gpu-a"),
        );
        tokio::spawn(async move {
            let stopped = async move {
                match stop {
                    Some(stop) => drop(stop.await),
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    frame = next_instruction(&mut agent) => {
                        let _ = tx.send((name.to_owned(), frame));
                    }
                    _ = &mut stopped => break,
                }
            }
            // Holds the socket open without reading it.
            std::future::pending::<()>().await;
            drop(agent);
        });
    }
    let mut cpu = worker(&server, "cpu-only", &["cpu"]).await;
    let mut ids = HashSet::new();
    for n in 0..30 {
        let (status, created) = post(
            &server,
            "/instructions",
            json!({"capability": "gpu", "payload": {"n": n}, "ack_timeout": 60}),
        )
        .await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["strategy"], "least_loaded");
        ids.insert(created["instruction_id"].as_str().unwrap().to_owned());
    }
    assert_no_instruction(&mut cpu, "an agent without the capability").await;
    let mut held: HashMap<String, HashSet<String>> = HashMap::new();
    for _ in 0..30 {
        let (name, frame) = tokio::time::timeout(common::DEADLINE, received.recv())
            .await
            .expect("the 30 instructions were not all delivered in time")
            .unwrap();
        let id = frame["instruction_id"].as_str().unwrap().to_owned();
        assert!(ids.contains(&id) && frame["attempt"] == 1, "{frame}");
        held.entry(name).or_default().insert(id);
    }
    for name in names {
        let count = held.get(name).map_or(0, HashSet::len);
        assert!(
            (9..=11).contains(&count),
            "{name} got {count} of 30: {held:?}"
        );
    }

    // gpu-a stops answering pings: stale; what it held moves to gpu-b and gpu-c.
    stop_a.send(()).unwrap();
    let stale = tokio::time::timeout(
        common::DEADLINE,
        events.wait_for(|e| e["type"] == "agent.stale" && e["subject"] == "gpu-a"),
    )
    .await
    .expect("gpu-a was not declared stale in time");
    assert_eq!(stale["data"]["reason"], "ping_timeout");
    let moved = held.remove("gpu-a").unwrap();
    let mut moved_to = HashSet::new();
    while moved_to.len() < moved.len() {
        let (name, frame) = tokio::time::timeout(common::DEADLINE, received.recv())
            .await
            .expect("gpu-a's instructions did not move in time")
            .unwrap();
        let id = frame["instruction_id"].as_str().unwrap().to_owned();
        assert!(
            moved.contains(&id),
            "{name} got one that did not move: {frame}"
        );
        assert_ne!(name, "gpu-a");
        assert_eq!(frame["attempt"], 2, "{frame}");
        moved_to.insert(id);
    }
}

async fn round_robin_gives_each_capable_agent_its_turn(db: Db) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let names = ["rr-a", "rr-b", "rr-c"];
    let mut agents = Vec::new();
    for name in names {
        agents.push(worker(&server, name, &["render"]).await);
    }
    // rr-b and rr-c are busy (5 unacknowledged each), rr-a idle: least_loaded would give
    // rr-a the next 10; round_robin gives each agent every third.
    for name in ["rr-b", "rr-c"] {
        for _ in 0..5 {
            let id = create_id(&server, name, json!({"payload": {"busy": true}})).await;
            event_of(&mut events, "instruction.delivered", &id).await;
        }
    }
    for n in 0..12 {
        let (status, created) = post(
            &server,
            "/instructions",
            json!({"capability": "render", "strategy": "round_robin", "payload": {"n": n}}),
        )
        .await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["strategy"], "round_robin");
    }
    let mut turns = Vec::new();
    for (agent, name) in agents.iter_mut().zip(names) {
        let busy = if name == "rr-a" { 0 } else { 5 };
        let mut got = 0;
        for _ in 0..busy + 4 {
            let frame = next_instruction(agent).await;
            if frame["payload"].get("n").is_some() {
                got += 1;
            }
        }
        assert_no_instruction(agent, "more than its turns").await;
        turns.push(got);
    }
    assert_eq!(turns, [4, 4, 4]);
}

async fn a_server_killed_with_1000_unfinished_instructions_loses_none_and_finishes_none_twice(
    db: Db,
) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let client = common::http();
    let mut ids = Vec::new();
    let mut creating = futures_util::stream::iter(0..1000)
        .map(|n| {
            let (client, url) = (client.clone(), server.http("/agents/ivan/instructions"));
            async move {
                let response = client
                    .post(url)
                    .json(&json!({"payload": {"n": n}, "ttl": 600, "max_attempts": 5}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
                let created: Value = response.json().await.unwrap();
                created["instruction_id"].as_str().unwrap().to_owned()
            }
        })
        .buffer_unordered(32);
    while let Some(id) = creating.next().await {
        ids.push(id);
    }
    drop(creating);
    // The agent finishes 300, holds 100 more without acknowledging, then the server dies.
    let mut ivan = worker(&server, "ivan", &[]).await;
    let mut finished = HashSet::new();
    for _ in 0..300 {
        let frame = next_instruction(&mut ivan).await;
        let id = frame["instruction_id"].as_str().unwrap().to_owned();
        ack(&mut ivan, &id, "done", Value::Null).await;
        finished.insert(id);
    }
    for _ in 0..100 {
        next_instruction(&mut ivan).await;
    }
    // Every ack is stored (its done published) before the kill.
    let mut done = HashSet::new();
    while done.len() < 300 {
        let event = tokio::time::timeout(
            common::DEADLINE,
            events.wait_for(|e| e["type"] == "instruction.done"),
        )
        .await
        .unwrap_or_else(|_| panic!("{} of 300 acks stored in time", done.len()));
        assert!(done.insert(event["subject"].as_str().unwrap().to_owned()));
    }
    server.signal("KILL");
    drop(server);
    ivan.abort();

    let server = database.start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let mut ivan = worker(&server, "ivan", &[]).await;
    while finished.len() < 1000 {
        let frame = next_instruction(&mut ivan).await;
        let id = frame["instruction_id"].as_str().unwrap().to_owned();
        assert!(
            !finished.contains(&id),
            "an instruction already done was delivered again: {frame}"
        );
        ack(&mut ivan, &id, "done", Value::Null).await;
        finished.insert(id);
    }
    assert_no_instruction(&mut ivan, "after all 1000").await;
    let all: HashSet<String> = ids.into_iter().collect();
    assert_eq!(
        finished, all,
        "every instruction created was finished, once"
    );
    while done.len() < 1000 {
        let event = tokio::time::timeout(
            common::DEADLINE,
            events.wait_for(|e| e["type"] == "instruction.done"),
        )
        .await
        .unwrap_or_else(|_| panic!("{} of 1000 acks stored in time", done.len()));
        let id = event["subject"].as_str().unwrap().to_owned();
        assert!(done.insert(id), "a second instruction.done: {event}");
    }
    let (_, stored) = get(&server, "/agents/ivan/instructions?state=done&limit=1000").await;
    assert_eq!(stored["count"], 1000);
}

async fn closing_a_session_cancels_its_instructions_and_idle_sessions_close(db: Db) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[("TETHER__SESSIONS__IDLE_TIMEOUT", "1")]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (status, session) = post(
        &server,
        "/sessions",
        json!({"agent_id": "jo", "name": "report", "description": "weekly",
               "parameters": {"week": 49}}),
    )
    .await;
    assert_eq!(status, 201, "{session}");
    let session_id = session["session_id"].as_str().unwrap().to_owned();
    assert_eq!(session["state"], "open");
    let opened = event_of(&mut events, "session.opened", &session_id).await;
    assert_eq!(opened["data"]["agent_id"], "jo");
    let mut pending = Vec::new();
    for n in 0..3 {
        let created = create(
            &server,
            "jo",
            json!({"payload": {"n": n}, "session_id": session_id}),
        )
        .await;
        assert_eq!(created["session_id"], session_id.as_str());
        pending.push(created["instruction_id"].as_str().unwrap().to_owned());
    }
    // An instruction for another agent cannot join jo's session.
    let (status, refused) = post(
        &server,
        "/agents/kim/instructions",
        json!({"payload": {}, "session_id": session_id}),
    )
    .await;
    assert_eq!(status, 409, "{refused}");

    let (status, closed) = post(&server, &format!("/sessions/{session_id}/close"), json!({})).await;
    assert_eq!(status, 200, "{closed}");
    assert_eq!(closed["state"], "closed");
    assert_eq!(closed["close_reason"], "closed");
    for id in &pending {
        let cancelled = event_of(&mut events, "instruction.cancelled", id).await;
        assert_eq!(cancelled["data"]["reason"], "session_closed");
    }
    event_of(&mut events, "session.closed", &session_id).await;
    let (status, _) = post(&server, &format!("/sessions/{session_id}/close"), json!({})).await;
    assert_eq!(status, 409, "closing twice");
    let (status, refused) = post(
        &server,
        "/agents/jo/instructions",
        json!({"payload": {}, "session_id": session_id}),
    )
    .await;
    assert_eq!(status, 409, "an instruction in a closed session: {refused}");
    let mut jo = worker(&server, "jo", &[]).await;
    assert_no_instruction(&mut jo, "instructions of a closed session").await;

    // Without activity for sessions.idle_timeout, Tether closes a session.
    let (_, idle) = post(&server, "/sessions", json!({"agent_id": "jo"})).await;
    let idle_id = idle["session_id"].as_str().unwrap().to_owned();
    let closed = event_of(&mut events, "session.closed", &idle_id).await;
    assert_eq!(closed["data"]["close_reason"], "idle");
    let (_, listed) = get(&server, "/sessions?agent_id=jo&state=closed").await;
    assert_eq!(listed["count"], 2, "{listed}");
    let (_, listed) = get(&server, "/sessions?agent_id=jo&state=open").await;
    assert_eq!(listed["count"], 0, "{listed}");
}

async fn bad_input_on_every_route_gets_a_clear_4xx_and_stores_nothing(db: Db) {
    let database = TestDatabase::new(db).await;
    let server = database.start(&[("TETHER__INSTRUCTIONS__MAX_PAYLOAD_BYTES", "1000")]);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "/agents/lee/instructions",
            "not json".into(),
            400,
            "not valid JSON",
        ),
        ("/agents/lee/instructions", "[1]".into(), 400, "JSON object"),
        (
            "/agents/lee/instructions",
            "{}".into(),
            400,
            "`payload` is required",
        ),
        (
            "/agents/lee/instructions",
            r#"{"payload":1,"ttl":-1}"#.into(),
            400,
            "`ttl`",
        ),
        (
            "/agents/lee/instructions",
            r#"{"payload":1,"ttl":"soon"}"#.into(),
            400,
            "`ttl`",
        ),
        (
            "/agents/lee/instructions",
            r#"{"payload":1,"ttl":99999999}"#.into(),
            400,
            "`ttl`",
        ),
        (
            "/agents/lee/instructions",
            r#"{"payload":1,"max_attempts":0}"#.into(),
            400,
            "`max_attempts`",
        ),
        (
            "/agents/lee/instructions",
            r#"{"payload":1,"ack_timeout":0}"#.into(),
            400,
            "`ack_timeout`",
        ),
        (
            "/agents/lee/instructions",
            r#"{"payload":1,"tll":5}"#.into(),
            400,
            "unknown field",
        ),
        (
            "/agents/lee/instructions",
            r#"{"payload":1,"capability":"gpu"}"#.into(),
            400,
            "unknown field",
        ),
        (
            "/agents/lee/instructions",
            r#"{"payload":1,"session_id":"nope"}"#.into(),
            404,
            "no session",
        ),
        (
            "/agents/lee/instructions",
            format!(r#"{{"payload":"{}"}}"#, "x".repeat(2000)),
            413,
            "max_payload_bytes",
        ),
        (
            "/agents/bad%20id/instructions",
            r#"{"payload":1}"#.into(),
            400,
            "agent id",
        ),
        (
            "/instructions",
            r#"{"payload":1}"#.into(),
            400,
            "`agent_id` or `capability`",
        ),
        (
            "/instructions",
            r#"{"payload":1,"agent_id":"lee","capability":"gpu"}"#.into(),
            400,
            "not both",
        ),
        (
            "/instructions",
            r#"{"payload":1,"capability":"gpu","strategy":"fastest"}"#.into(),
            400,
            "`strategy`",
        ),
        (
            "/instructions",
            r#"{"payload":1,"agent_id":"lee","strategy":"round_robin"}"#.into(),
            400,
            "`strategy`",
        ),
        (
            "/instructions",
            r#"{"payload":1,"capability":7}"#.into(),
            400,
            "`capability`",
        ),
        (
            "/instructions",
            r#"{"payload":1,"capability":"gpu","session_id":"s"}"#.into(),
            400,
            "`session_id`",
        ),
        ("/sessions", "{}".into(), 400, "`agent_id` is required"),
        (
            "/sessions",
            r#"{"agent_id":"a b"}"#.into(),
            400,
            "`agent_id`",
        ),
        (
            "/sessions",
            r#"{"agent_id":"lee","parameters":[1]}"#.into(),
            400,
            "`parameters`",
        ),
        (
            "/sessions",
            r#"{"agent_id":"lee","color":"red"}"#.into(),
            400,
            "unknown field",
        ),
        ("/sessions/nope/close", "{}".into(), 404, "no session"),
    ];
    for (path, body, status, says) in &cases {
        let (got, answer) = common::instructions::post_raw(&server, path, body).await;
        assert_eq!(got, *status, "POST {path} {body:.80}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(says),
            "POST {path} {body:.80}: {error:?} should say {says:?}"
        );
    }
    for (path, status) in [
        ("/instructions/nope", 404),
        ("/sessions/nope", 404),
        ("/agents/lee/instructions?state=finished", 400),
        ("/agents/lee/instructions?limit=0", 400),
        ("/sessions?state=half", 400),
        ("/agents/lee/instructions?limit=abc", 400),
    ] {
        let (got, answer) = get(&server, path).await;
        assert_eq!(got, status, "GET {path}: {answer}");
        assert!(answer["error"].is_string(), "GET {path}: {answer}");
    }
    // A body far past the payload limit: 413 as JSON, before it is all read.
    let (status, answer) = common::instructions::post_raw(
        &server,
        "/agents/lee/instructions",
        &format!(r#"{{"payload":"{}"}}"#, "x".repeat(200_000)),
    )
    .await;
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("max_payload_bytes"),
        "{answer}"
    );
    // Nothing was stored.
    let (_, listed) = get(&server, "/agents/lee/instructions").await;
    assert_eq!(listed["count"], 0, "{listed}");
    let (_, listed) = get(&server, "/sessions").await;
    assert_eq!(listed["count"], 0, "{listed}");

    // An agent's bad acks get invalid_frame, and the connection keeps working.
    let mut lee = worker(&server, "lee", &[]).await;
    for bad in [
        json!({"type": "instruction_ack"}),
        json!({"type": "instruction_ack", "instruction_id": "x", "status": "maybe"}),
        json!({"type": "instruction_ack", "instruction_id": 5, "status": "done"}),
    ] {
        lee.send(bad.clone()).await;
        let error = lee.wait_for(|f| f["type"] == "error").await;
        assert_eq!(error["error_code"], "invalid_frame", "{bad}: {error}");
    }
    // A flood of acks for instructions it does not hold: past 50 a second they are
    // refused rate_limited without a database read.
    for n in 0..200 {
        ack(&mut lee, &format!("made-up-{n}"), "done", Value::Null).await;
    }
    let mut codes = HashMap::new();
    for _ in 0..200 {
        let error = lee.wait_for(|f| f["type"] == "error").await;
        let code = error["error_code"].as_str().unwrap().to_owned();
        *codes.entry(code).or_insert(0) += 1;
    }
    assert!(
        codes.get("rate_limited").copied().unwrap_or(0) >= 100,
        "{codes:?}"
    );
    assert!(
        codes.get("unknown_instruction").copied().unwrap_or(0) <= 50,
        "{codes:?}"
    );
    let id = create_id(&server, "lee", json!({"payload": {}})).await;
    assert_eq!(
        next_instruction(&mut lee).await["instruction_id"],
        id.as_str()
    );
}

#[tokio::test]
async fn a_storage_that_cannot_be_opened_stops_the_start_with_a_clear_error() {
    let port = tether_testkit::free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/nowhere");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .env("TETHER__NETWORK__PORT", "0")
        .env("TETHER__STORAGE__URL", &url)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("storage.url") && stderr.contains("cannot open storage"),
        "{stderr}"
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .env("TETHER__NETWORK__PORT", "0")
        .env("TETHER__STORAGE__URL", "mysql://x")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("storage.url"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instructions_reach_agents_on_any_node_of_a_cluster_sharing_postgresql() {
    let database = TestDatabase::new(Db::Postgres).await;
    let prefix = common::cluster::fresh_prefix();
    let a = common::cluster::node(&prefix, "10", &database.env(&[])).await;
    let b = common::cluster::node(&prefix, "10", &database.env(&[])).await;
    let mut b_events = EventStream::subscribe(&b, None).await;

    // Created on node A for an agent online on node B: pushed to it at once.
    let mut w = worker(&b, "w", &["gpu"]).await;
    let id = create_id(&a, "w", json!({"payload": {"from": "a"}})).await;
    let frame = next_instruction(&mut w).await;
    assert_eq!(frame["instruction_id"], id.as_str());
    ack(&mut w, &id, "done", json!({"by": "w"})).await;
    event_of(&mut b_events, "instruction.done", &id).await;
    let (_, stored) = get(&a, &format!("/instructions/{id}")).await;
    assert_eq!(stored["state"], "done", "node A reads what node B finished");

    // Given to a capability on node A, whose only agent with it is on node B.
    let (status, created) = post(
        &a,
        "/instructions",
        json!({"capability": "gpu", "payload": {"n": 1}}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let frame = next_instruction(&mut w).await;
    assert_eq!(frame["instruction_id"], created["instruction_id"]);

    // Created on node B for an offline agent that then registers on node A.
    let id = create_id(&b, "x", json!({"payload": {}})).await;
    let mut x = worker(&a, "x", &[]).await;
    assert_eq!(
        next_instruction(&mut x).await["instruction_id"],
        id.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nodes_deliveries_and_expiries_are_handled_by_a_survivor() {
    let database = TestDatabase::new(Db::Postgres).await;
    let prefix = common::cluster::fresh_prefix();
    let fast = [("TETHER__INSTRUCTIONS__OVERDUE_CHECK", "0.5")];
    let a = common::cluster::node(&prefix, "2", &database.env(&fast)).await;
    let b = common::cluster::node(&prefix, "2", &database.env(&fast)).await;
    let mut b_events = EventStream::subscribe(&b, None).await;
    let mut w = worker(&a, "w", &[]).await;
    let held = create_id(&a, "w", json!({"payload": {}, "ack_timeout": 3})).await;
    assert_eq!(next_instruction(&mut w).await["attempt"], 1);
    let expiring = create_id(&a, "nobody", json!({"payload": {}, "ttl": 3})).await;
    // Node A dies holding both deadlines; only B is left to handle them.
    a.signal("KILL");
    drop(a);
    w.abort();
    tokio::time::timeout(
        common::DEADLINE,
        b_events.wait_for(|e| e["type"] == "agent.cleaned_up" && e["subject"] == "w"),
    )
    .await
    .expect("node B did not end node A's agent in time");
    let mut w = worker(&b, "w", &[]).await;
    let again = next_instruction(&mut w).await;
    assert_eq!(again["instruction_id"], held.as_str());
    assert_eq!(again["attempt"], 2);
    let expired = event_of(&mut b_events, "instruction.expired", &expiring).await;
    assert_eq!(expired["data"]["reason"], "ttl");
}

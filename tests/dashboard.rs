//! `GET /dashboard` in a real browser: Debian's headless Chromium driven through
//! WebDriver (its `chromedriver`, started by each test on a free port) against a real
//! server. The page is watched as a person would: rows and figures appear, change and
//! go as agents come, fall silent and are cleaned up; the token prompt and the
//! `#token=` fragment open a protected server.
//!
//! Needs `chromium` and `chromium-driver` (scripts/test.sh installs them);
//! `TETHER_TEST_CHROMEDRIVER` and `TETHER_TEST_CHROMIUM` override the paths. With
//! `TETHER_DASHBOARD_SCREENSHOT=path` the screenshot test writes a PNG of the page
//! under load there (docs/dashboard.png); otherwise it does nothing.

mod common;

use common::{Agent, Closed, TestServer, DEADLINE};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "dashboard-s3cret";

/// `chromedriver` in its own process group, killed with everything it started (the
/// browser) when dropped; and the browser's fresh profile directory, removed.
struct Driver {
    child: Child,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The negative pid names the process group: chromedriver and its browser.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A headless Chromium session.
struct Browser {
    client: Client,
    _driver: Driver,
}

fn tool(variable: &str, default: &str) -> String {
    let path = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: the dashboard tests need Debian's chromium and chromium-driver \
         (`apt-get install -y chromium chromium-driver`, which scripts/test.sh does), \
         or {variable} set to where it is"
    );
    path
}

impl Browser {
    /// Starts chromedriver and a headless browser with a `width`×`height` window.
    async fn start(width: u32, height: u32) -> Self {
        let chromedriver = tool("TETHER_TEST_CHROMEDRIVER", "/usr/bin/chromedriver");
        let chromium = tool("TETHER_TEST_CHROMIUM", "/usr/bin/chromium");
        let port = tether_testkit::free_port();
        // Fresh for each browser: the port is free (so not in use by another test now).
        let profile =
            std::env::temp_dir().join(format!("tether-dashboard-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {chromedriver}: {e}"));
        let driver = Driver { child, profile };
        tether_testkit::wait_listening(port, "chromedriver", DEADLINE).unwrap();

        let args = json!([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            format!("--user-data-dir={}", driver.profile.display()),
            format!("--window-size={width},{height}"),
        ]);
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium, "args": args}),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("chromedriver refused to start a headless Chromium session");
        Self {
            client,
            _driver: driver,
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigation failed");
    }

    /// Waits until the page's event stream is live.
    async fn wait_live(&self) {
        self.wait(
            "the event stream to be live",
            "document.getElementById('live').dataset.state === 'live'",
        )
        .await;
    }

    /// Runs `script` (a function body: `return …`) in the page.
    async fn eval(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `condition` (an expression) until it is truthy; panics after the
    /// deadline with `what` and the page's text.
    async fn wait(&self, what: &str, condition: &str) -> Value {
        let script = format!("return ({condition}) || null;");
        let end = Instant::now() + DEADLINE;
        loop {
            let value = self.eval(&script).await;
            if !value.is_null() && value != json!(false) {
                return value;
            }
            if Instant::now() > end {
                let text = self
                    .eval("return document.body.innerText.slice(0, 3000);")
                    .await;
                panic!(
                    "timed out waiting for {what} ({condition}); the page shows:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text(&self, id: &str) -> String {
        self.eval(&format!(
            "return document.getElementById('{id}').textContent;"
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

fn row(agent_id: &str) -> String {
    format!("document.querySelector('#agent-rows tr[data-agent-id=\"{agent_id}\"]')")
}

fn row_in_state(agent_id: &str, state: &str) -> String {
    format!(
        "document.querySelector('#agent-rows tr[data-agent-id=\"{agent_id}\"][data-state=\"{state}\"]')"
    )
}

fn event_listed(kind: &str, subject: &str) -> String {
    format!(
        "document.querySelector('#events li[data-type=\"{kind}\"][data-subject=\"{subject}\"]')"
    )
}

fn text_is(id: &str, text: &str) -> String {
    format!("document.getElementById('{id}').textContent === '{text}'")
}

/// Answers the server's pings in the background until aborted.
fn keep_alive(mut agent: Agent) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        agent.answer_pings(usize::MAX).await;
    })
}

/// Keeps an agent active (a system request every 300 ms, an application frame) and
/// answers its pings, until aborted.
fn keep_busy(mut agent: Agent) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            agent
                .request(json!({"type":"system_request","command":"get_network_info"}))
                .await;
            if agent
                .pending()
                .iter()
                .any(|f| f["type"] == "system_request" && f["command"] == "ping_agent")
            {
                agent.answer_pings(1).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test]
async fn connected_agents_show_as_rows_and_in_the_active_count_at_desktop_and_phone_width() {
    let server = TestServer::start(&[]);
    let mut agents = Vec::new();
    for id in ["alice", "bob", "carol"] {
        agents.push(Agent::register(&server.ws_url(), id).await.0);
    }

    // The page holds no data: served as HTML with a restrictive CSP.
    let response = common::http()
        .get(server.http("/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );

    let browser = Browser::start(1280, 900).await;
    browser.goto(&server.http("/dashboard")).await;
    for id in ["alice", "bob", "carol"] {
        browser.wait(&format!("the row of {id}"), &row(id)).await;
    }
    browser
        .wait("3 active agents", &text_is("agents-active", "3"))
        .await;
    assert_eq!(browser.text("agents-registered").await, "3");
    assert_eq!(browser.text("agents-inactive").await, "0");
    assert_eq!(browser.text("open-sockets").await, "3");
    assert_eq!(browser.text("agent-count").await, "showing 3 of 3");
    assert_eq!(
        browser
            .eval(&format!("return {}.dataset.state;", row("bob")))
            .await,
        "active"
    );
    // The `log` publisher of the default configuration, healthy.
    browser
        .wait(
            "a healthy log publisher",
            "document.querySelector('#publishers li[data-publisher=\"log\"][data-status=\"healthy\"]')",
        )
        .await;
    browser.wait_live().await;

    // The search box filters the rows client-side.
    let search = browser.client.find(Locator::Id("search")).await.unwrap();
    search.send_keys("bob").await.unwrap();
    browser
        .wait(
            "only bob's row",
            &format!(
                "document.querySelectorAll('#agent-rows tr[data-agent-id]').length === 1 && {}",
                row("bob")
            ),
        )
        .await;
    assert_eq!(
        browser.text("agent-count").await,
        "showing 1 of 1 matching (3 in all)"
    );

    // A new agent appears without reloading the page (lifecycle event → refresh).
    let (dave, _) = Agent::register(&server.ws_url(), "dave").await;
    search.clear().await.unwrap();
    browser.wait("dave's row", &row("dave")).await;
    browser
        .wait(
            "dave's agent.registered event",
            &event_listed("agent.registered", "dave"),
        )
        .await;
    browser
        .wait("4 active agents", &text_is("agents-active", "4"))
        .await;

    // Phone width: the page itself never scrolls sideways (the table scrolls in its box).
    browser.client.set_window_size(390, 844).await.unwrap();
    browser
        .wait(
            "a phone-width viewport",
            "window.innerWidth <= 420 && document.documentElement.clientWidth <= 420",
        )
        .await;
    let overflow = browser
        .eval("return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
        .await;
    assert_eq!(
        overflow,
        json!(0),
        "the page scrolls horizontally at phone width"
    );
    assert!(browser
        .eval(&format!("return !!{};", row("dave")))
        .await
        .as_bool()
        .unwrap());

    browser.close().await;
    drop((agents, dave));
}

/// Pings every 2 s, stale 1 s after an unanswered one.
const FAST: [(&str, &str); 4] = [
    ("TETHER__HEARTBEAT__INTERVAL", "2"),
    ("TETHER__HEARTBEAT__PING_TIMEOUT", "1"),
    ("TETHER__HEARTBEAT__AGENT_TIMEOUT", "6"),
    ("TETHER__HEARTBEAT__TICK", "0.05"),
];

#[tokio::test]
async fn an_agent_that_stops_answering_pings_is_listed_stale_then_disconnected_and_its_row_goes() {
    let server = TestServer::start(&FAST);
    let browser = Browser::start(1280, 900).await;
    browser.goto(&server.http("/dashboard")).await;
    browser.wait_live().await;

    let steady = keep_alive(Agent::register(&server.ws_url(), "steady").await.0);
    let (mut silent, _) = Agent::register(&server.ws_url(), "silent").await;
    browser.wait("the silent agent's row", &row("silent")).await;
    browser.wait("the steady agent's row", &row("steady")).await;

    // The silent agent never answers: the server declares it stale, closes it 4002,
    // and cleans it up; the page lists the events as they come and drops the row.
    assert_eq!(silent.closed().await, Closed::Code(4002));
    for kind in ["agent.stale", "agent.disconnected", "agent.cleaned_up"] {
        browser
            .wait(&format!("{kind} of silent"), &event_listed(kind, "silent"))
            .await;
    }
    browser
        .wait(
            "the silent agent's row to go",
            &format!("!{}", row("silent")),
        )
        .await;
    browser
        .wait("one stale agent counted", &text_is("stale-declared", "1"))
        .await;
    browser
        .wait("one registered agent", &text_is("agents-registered", "1"))
        .await;
    assert!(browser
        .eval(&format!("return !!{};", row("steady")))
        .await
        .as_bool()
        .unwrap());
    // Newest first: cleaned_up above disconnected above stale.
    let order = browser
        .eval(
            "return [...document.querySelectorAll('#events li[data-subject=\"silent\"]')]\
             .map(li => li.dataset.type);",
        )
        .await;
    assert_eq!(
        order,
        json!([
            "agent.cleaned_up",
            "agent.disconnected",
            "agent.stale",
            "agent.registered"
        ])
    );

    steady.abort();
    browser.close().await;
}

#[tokio::test]
async fn an_agent_without_application_traffic_turns_inactive_in_its_row_and_back() {
    let server = TestServer::start(&[
        ("TETHER__HEARTBEAT__INTERVAL", "20"),
        ("TETHER__HEARTBEAT__PING_TIMEOUT", "5"),
        ("TETHER__HEARTBEAT__AGENT_TIMEOUT", "60"),
        ("TETHER__HEARTBEAT__ACTIVITY_TIMEOUT", "2"),
        ("TETHER__HEARTBEAT__TICK", "0.05"),
    ]);
    let browser = Browser::start(1280, 900).await;
    browser.goto(&server.http("/dashboard")).await;
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;
    browser
        .wait("alice's row, active", &row_in_state("alice", "active"))
        .await;
    browser
        .wait("alice's row, inactive", &row_in_state("alice", "inactive"))
        .await;
    browser
        .wait("one inactive agent", &text_is("agents-inactive", "1"))
        .await;
    browser
        .wait(
            "alice's agent.inactive event",
            &event_listed("agent.inactive", "alice"),
        )
        .await;

    let listed = alice
        .request(json!({"type":"system_request","command":"list_agents"}))
        .await;
    assert_eq!(listed["success"], true, "{listed}");
    browser
        .wait(
            "alice's row, active again",
            &row_in_state("alice", "active"),
        )
        .await;
    browser
        .wait("no inactive agent", &text_is("agents-inactive", "0"))
        .await;
    browser.close().await;
}

#[tokio::test]
async fn cleaning_up_an_agent_from_its_row_closes_its_connection() {
    let server = TestServer::start(&[]);
    let (mut doomed, _) = Agent::register(&server.ws_url(), "doomed").await;
    let (_kept, _) = Agent::register(&server.ws_url(), "kept").await;
    let browser = Browser::start(1280, 900).await;
    browser.goto(&server.http("/dashboard")).await;
    browser.wait("doomed's row", &row("doomed")).await;

    let button = browser
        .client
        .find(Locator::Css(
            "button[data-action=\"cleanup\"][data-agent-id=\"doomed\"]",
        ))
        .await
        .unwrap();
    button.click().await.unwrap();
    // The page asks first.
    let question = browser.client.get_alert_text().await.unwrap();
    assert!(question.contains("doomed"), "{question}");
    browser.client.accept_alert().await.unwrap();

    assert_ne!(doomed.closed().await, Closed::NoCloseFrame);
    browser
        .wait("doomed's row to go", &format!("!{}", row("doomed")))
        .await;
    browser
        .wait(
            "doomed's agent.cleaned_up event",
            &event_listed("agent.cleaned_up", "doomed"),
        )
        .await;
    assert!(browser
        .eval(&format!("return !!{};", row("kept")))
        .await
        .as_bool()
        .unwrap());
    let listed = server.get_json("/agents").await;
    assert_eq!(listed["count"], 1, "{listed}");
    browser.close().await;
}

#[tokio::test]
async fn with_an_admin_token_the_page_asks_for_it_then_shows_the_data() {
    let server = TestServer::start(&[("TETHER__ADMIN__TOKEN", TOKEN)]);
    let (_alice, _) = Agent::register(&server.ws_url(), "alice").await;

    // The page itself needs no token; the data does.
    let page = common::http()
        .get(server.http("/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let stats = common::http()
        .get(server.http("/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), 401);

    let browser = Browser::start(1280, 900).await;
    browser.goto(&server.http("/dashboard")).await;
    browser
        .wait(
            "the token prompt",
            "!document.getElementById('token-prompt').hidden && document.getElementById('main').hidden",
        )
        .await;

    // A wrong token: asked again, and told it was refused.
    let input = browser
        .client
        .find(Locator::Id("token-input"))
        .await
        .unwrap();
    input.send_keys("wrong").await.unwrap();
    browser
        .client
        .find(Locator::Id("token-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait(
            "the prompt to say the token was refused",
            "!document.getElementById('token-prompt').hidden && \
             document.getElementById('token-message').textContent.includes('refused')",
        )
        .await;

    let input = browser
        .client
        .find(Locator::Id("token-input"))
        .await
        .unwrap();
    input.send_keys(TOKEN).await.unwrap();
    browser
        .client
        .find(Locator::Id("token-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.wait("alice's row", &row("alice")).await;
    browser
        .wait("1 active agent", &text_is("agents-active", "1"))
        .await;
    assert!(browser
        .eval("return document.getElementById('token-prompt').hidden;")
        .await
        .as_bool()
        .unwrap());
    browser.wait_live().await;

    // Kept for this tab: a reload needs no prompt.
    browser.client.refresh().await.unwrap();
    browser
        .wait("alice's row after a reload", &row("alice"))
        .await;
    assert!(browser
        .eval("return document.getElementById('token-prompt').hidden;")
        .await
        .as_bool()
        .unwrap());
    browser.close().await;
}

#[tokio::test]
async fn a_token_in_the_url_fragment_opens_the_page_and_leaves_the_address_bar_but_a_query_token_does_not(
) {
    let server = TestServer::start(&[("TETHER__ADMIN__TOKEN", TOKEN)]);
    let (_alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let browser = Browser::start(1280, 900).await;

    browser
        .goto(&server.http(&format!("/dashboard#token={TOKEN}")))
        .await;
    browser.wait("alice's row", &row("alice")).await;
    assert!(browser
        .eval("return document.getElementById('token-prompt').hidden;")
        .await
        .as_bool()
        .unwrap());
    let url = browser.client.current_url().await.unwrap();
    assert!(!url.as_str().contains(TOKEN), "{url}");
    assert_eq!(url.path(), "/dashboard");
    assert_eq!(url.fragment(), None, "{url}");

    // Never from the query string.
    browser.eval("sessionStorage.clear(); return null;").await;
    browser
        .goto(&server.http(&format!("/dashboard?token={TOKEN}")))
        .await;
    browser
        .wait(
            "the token prompt",
            "!document.getElementById('token-prompt').hidden",
        )
        .await;
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('#agent-rows tr[data-agent-id]').length;")
            .await,
        json!(0)
    );
    browser.close().await;
}

/// With `TETHER_DASHBOARD_SCREENSHOT=docs/dashboard.png`: the page at desktop width
/// with 200 agents (25 of them inactive) and a few events (a refused registration,
/// a stale agent, a clean-up), saved as PNG; `TETHER_DASHBOARD_SCREENSHOT_PHONE=path`
/// adds one at phone width. Without the variable it does nothing.
#[tokio::test]
async fn screenshot_of_the_page_under_load() {
    let Ok(path) = std::env::var("TETHER_DASHBOARD_SCREENSHOT") else {
        eprintln!("TETHER_DASHBOARD_SCREENSHOT not set: no screenshot taken");
        return;
    };
    let mut env = FAST.to_vec();
    env.push(("TETHER__HEARTBEAT__ACTIVITY_TIMEOUT", "3"));
    let server = TestServer::start(&env);
    let browser = Browser::start(1440, 1100).await;
    browser.goto(&server.http("/dashboard")).await;
    browser.wait_live().await;

    let mut alive = Vec::new();
    for i in 0..200 {
        let id = format!("agent-{i:03}");
        let (agent, _) = Agent::register(&server.ws_url(), &id).await;
        // One in eight stays quiet (answering pings only) and turns inactive.
        alive.push(if i % 8 == 5 {
            keep_alive(agent)
        } else {
            keep_busy(agent)
        });
    }
    let (mut silent, _) = Agent::register(&server.ws_url(), "flaky-worker").await;
    let mut refused = Agent::connect(&server.ws_url()).await;
    let answer = refused
        .request(json!({"type":"system_request","command":"register_agent","agent_id":""}))
        .await;
    assert_eq!(answer["success"], false, "{answer}");
    assert_eq!(silent.closed().await, Closed::Code(4002));
    browser
        .wait(
            "flaky-worker cleaned up",
            &event_listed("agent.cleaned_up", "flaky-worker"),
        )
        .await;
    browser
        .wait("200 agents", &text_is("agent-count", "showing 200 of 200"))
        .await;
    browser
        .wait("25 inactive agents", &text_is("agents-inactive", "25"))
        .await;
    browser
        .wait(
            "a ping round trip",
            "document.getElementById('ping-p50').textContent !== '—'",
        )
        .await;

    let png = browser.client.screenshot().await.unwrap();
    if let Some(dir) = PathBuf::from(&path).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&path, png).unwrap();
    eprintln!("dashboard screenshot written to {path}");
    // The same page at phone width, to look at (not committed).
    if let Ok(phone) = std::env::var("TETHER_DASHBOARD_SCREENSHOT_PHONE") {
        browser.client.set_window_size(390, 1400).await.unwrap();
        browser
            .wait("a phone-width viewport", "window.innerWidth <= 420")
            .await;
        std::fs::write(&phone, browser.client.screenshot().await.unwrap()).unwrap();
    }
    for task in alive {
        task.abort();
    }
    browser.close().await;
}

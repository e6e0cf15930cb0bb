//! The console in a real headless Chromium (Debian's, through ChromeDriver and WebDriver), against
//! the router and agents on the real broker. Screenshots of every page go to
//! `$CARGO_TARGET_TMPDIR/console-screenshots/`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::llm::real_model;
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use switchyard::codec::Codec;
use switchyard::console::{self, ConsoleConfig, Running};
use switchyard::envelope::{Decision, EventKind, TaskEvent};
use switchyard::journey::describe;
use switchyard::kafka::KafkaConfig;
use switchyard::llm::LlmConfig;
use switchyard::workflow::Workflow;

const WAIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "console-test-token";

/// A headless Chromium behind its own ChromeDriver.
struct Browser {
    client: Client,
    _driver: Spawned,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "this test needs ChromeDriver ({e}): install it with `scripts/install-browser`"
                )
            });
        let driver = Spawned(driver);
        let url = format!("http://127.0.0.1:{port}");
        eventually(
            Duration::from_secs(20),
            "chromedriver to answer",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
            },
        )
        .await;
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-quic", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let client = ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a Chromium session (scripts/install-browser installs Chromium)");
        Self {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    async fn open(&self, console: &Running, path: &str) {
        self.client
            .goto(&format!("http://{}{path}", console.addr))
            .await
            .unwrap();
    }

    /// The text of the first element matching `css`, once there is one.
    async fn text(&self, css: &str) -> String {
        let found = self
            .client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no `{css}` on the page: {e}"));
        found.text().await.unwrap()
    }

    async fn count(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.unwrap().len()
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no `{css}` to click: {e}"))
            .click()
            .await
            .unwrap();
    }

    async fn sign_in(&self, console: &Running) {
        self.open(console, "/login").await;
        self.client
            .find(Locator::Css("#token"))
            .await
            .unwrap()
            .send_keys(TOKEN)
            .await
            .unwrap();
        self.click("#sign-in").await;
        // The form's answer sets the cookie and redirects to the Overview; navigating before it
        // arrives would cancel it.
        eventually(WAIT, "the sign-in to land on the Overview", || async {
            let url = self.client.current_url().await.ok()?;
            (url.path() == "/").then_some(())
        })
        .await;
        self.open(console, "/login").await;
        self.text("#signed-in").await;
    }

    /// Saves a screenshot of the page as `<name>.png`.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// A console for `workflow` in process, with its index in `data`.
async fn start_console(
    kafka: &KafkaConfig,
    workflow: &Workflow,
    data: &std::path::Path,
    token: Option<&str>,
) -> Running {
    console::serve(ConsoleConfig {
        kafka: kafka.clone(),
        codec: Codec::Json,
        workflow: workflow.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data.to_path_buf(),
        token: token.map(str::to_string),
        max_redrives: 1,
    })
    .await
    .expect("the console starts")
}

async fn completed(kafka: &KafkaConfig, task_id: &str) -> Vec<switchyard::envelope::StateEvent> {
    eventually(WAIT, &format!("{task_id} to complete"), || async {
        let events = task_events(kafka, task_id);
        events
            .iter()
            .any(|e| matches!(e.decision, Decision::Completed { .. }))
            .then_some(events)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_task_appears_live_and_its_page_shows_what_audit_shows() {
    let kafka = kafka("console-live");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let data = tempfile::tempdir().unwrap();
    let console = start_console(&kafka, &workflow, data.path(), None).await;
    let browser = Browser::start().await;
    browser.open(&console, "/tasks").await;
    assert_eq!(browser.count("tr[data-task]").await, 0);

    publish(&kafka, &submission("live-1", "where is my parcel?")).await;
    let row = browser.text("tr[data-task='live-1']").await;
    assert!(row.contains("live-1"), "{row}");
    browser.screenshot("tasks").await;
    completed(&kafka, "live-1").await;

    let audit = switchyard_command(&kafka)
        .args(["audit", "live-1", "--json"])
        .output()
        .unwrap();
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    let timeline: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    let expected: Vec<String> = timeline["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| describe(&serde_json::from_value(pair[1].clone()).unwrap()))
        .collect();
    browser.open(&console, "/tasks/live-1").await;
    let shown = eventually(WAIT, "the task page to show every decision", || async {
        browser.open(&console, "/tasks/live-1").await;
        let items = browser
            .client
            .find_all(Locator::Css("li.decision code"))
            .await
            .ok()?;
        let mut texts = Vec::new();
        for item in items {
            texts.push(item.text().await.ok()?);
        }
        (texts.len() == expected.len()).then_some(texts)
    })
    .await;
    assert_eq!(
        shown, expected,
        "the task page shows the decisions `audit --json` shows"
    );
    assert_eq!(browser.text("#status").await, "completed");
    browser.screenshot("task").await;
    for (path, name) in [
        ("/", "overview"),
        ("/workflow", "workflow"),
        ("/agents", "agents"),
    ] {
        browser.open(&console, path).await;
        browser.text("h1").await;
        browser.screenshot(name).await;
    }
    browser.open(&console, "/workflow").await;
    let taken = browser
        .client
        .find(Locator::Css(
            "g.edge[data-source='start'][data-target='sentiment_analyzer']",
        ))
        .await
        .unwrap()
        .attr("data-count")
        .await
        .unwrap();
    assert_eq!(
        taken.as_deref(),
        Some("1"),
        "one task took start → sentiment_analyzer"
    );
    browser.close().await;
    console.stop();
    agents.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_helpdesk_task_page_shows_the_llm_answer_and_its_reason() {
    let url = real_model().await;
    let kafka = kafka("console-llm");
    let workflow = setup(&kafka, &root().join("agents/helpdesk")).await;
    let router = RunningRouter::start_with(&kafka, &workflow, |c| {
        c.llm = Some(LlmConfig {
            base_url: url.clone(),
            timeout: Duration::from_secs(180),
            ..LlmConfig::default()
        })
    })
    .await;
    let data = tempfile::tempdir().unwrap();
    let console = start_console(&kafka, &workflow, data.path(), None).await;
    publish(
        &kafka,
        &submission(
            "llm-1",
            "I was charged twice for my subscription. Please refund one.",
        ),
    )
    .await;
    let recorded = eventually(
        Duration::from_secs(600),
        "the LLM answer to be recorded",
        || async { task_events(&kafka, "llm-1").into_iter().find_map(|e| e.llm) },
    )
    .await;
    let browser = Browser::start().await;
    let reason = eventually(WAIT, "the task page to show the LLM answer", || async {
        browser.open(&console, "/tasks/llm-1").await;
        let found = browser
            .client
            .find(Locator::Css(".llm-reason"))
            .await
            .ok()?;
        found.text().await.ok()
    })
    .await;
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(
        words(&reason),
        words(recorded.reason.as_deref().unwrap_or("-"))
    );
    assert!(
        !reason.is_empty() && reason != "-",
        "the model gave a reason"
    );
    let choice = browser.text(".llm-choice").await;
    assert_eq!(Some(choice.as_str()), recorded.agent.as_deref());
    browser.screenshot("task-llm").await;
    browser.close().await;
    console.stop();
    router.stop().await;
}

/// The missing-card workflow of tests/replay.rs: `billing` tasks are dead-lettered until the
/// `billing` card and its rule are deployed.
fn shipping_only(dir: &std::path::Path, with_billing: bool) {
    std::fs::create_dir_all(dir.join("cards")).unwrap();
    let card = |name: &str| {
        std::fs::write(
            dir.join(format!("cards/{name}.yaml")),
            format!("name: {name}\nruntime: {{kind: handler}}\n"),
        )
        .unwrap()
    };
    card("shipping");
    let mut rules = String::from("rules:\n  - { id: ship, when: { kind: SUBMITTED, payload: [{ pointer: /topic, eq: shipping }] }, then: { route: [shipping] } }\n");
    if with_billing {
        card("billing");
        rules += "  - { id: bill, when: { kind: SUBMITTED, payload: [{ pointer: /topic, eq: billing }] }, then: { route: [billing] } }\n";
        rules += "  - { id: done, when: { source: [shipping, billing] }, then: complete }\n";
    } else {
        rules += "  - { id: shipped, when: { source: shipping }, then: complete }\n";
    }
    std::fs::write(dir.join("rules.yaml"), rules).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_is_redriven_from_the_page_once_and_refused_past_the_limit() {
    let kafka = kafka("console-redrive");
    let dir = tempfile::tempdir().unwrap();
    shipping_only(dir.path(), false);
    let v1 = setup(&kafka, dir.path()).await;
    let router = RunningRouter::start(&kafka, &v1).await;
    let mut task = TaskEvent::new("bill-1", EventKind::Submitted, "client");
    task.payload = json!({ "topic": "billing" });
    publish(&kafka, &task).await;
    let data = tempfile::tempdir().unwrap();
    let console = start_console(&kafka, &v1, data.path(), Some(TOKEN)).await;
    let browser = Browser::start().await;
    browser.sign_in(&console).await;
    let reason = eventually(WAIT, "the dead letter on the page", || async {
        browser.open(&console, "/dead-letters").await;
        let cell = browser
            .client
            .find(Locator::Css("tr[data-at] .reason"))
            .await
            .ok()?;
        cell.text().await.ok()
    })
    .await;
    assert_eq!(reason, "no_rule_matched");
    router.stop().await;

    shipping_only(dir.path(), true);
    let v2 = setup(&kafka, dir.path()).await;
    let router = RunningRouter::start(&kafka, &v2).await;
    let agents = RunningAgents::start(&kafka, &v2, &["billing"], |n| ExampleAgent(n.to_string()));
    browser
        .open(&console, "/dead-letters?reason=no_rule_matched")
        .await;
    browser.click("tr[data-at] input[name=at]").await;
    browser.screenshot("dead-letters").await;
    browser.click("#redrive").await;
    let said = browser.text("#flash").await;
    assert!(said.starts_with("redriven "), "{said}");
    let events = completed(&kafka, "bill-1").await;
    assert!(events.iter().any(
        |e| matches!(&e.decision, Decision::Routed { steps, .. } if steps[0].card == "billing")
    ));

    browser
        .open(&console, "/dead-letters?reason=no_rule_matched")
        .await;
    browser.click("tr[data-at] input[name=at]").await;
    browser.click("#redrive").await;
    let said = browser.text("#flash").await;
    assert!(
        said.contains("refused") && said.contains("the limit is 1"),
        "a second redrive past the limit is refused visibly: {said}"
    );
    browser.close().await;
    console.stop();
    agents.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_escalation_is_answered_from_the_inbox_and_the_task_completes() {
    let kafka = kafka("console-inbox");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let data = tempfile::tempdir().unwrap();
    let console = start_console(&kafka, &workflow, data.path(), Some(TOKEN)).await;
    publish(
        &kafka,
        &submission("angry-1", "I am furious, my order never came"),
    )
    .await;
    let browser = Browser::start().await;
    browser.sign_in(&console).await;
    eventually(WAIT, "the escalation in the inbox", || async {
        browser.open(&console, "/inbox").await;
        browser
            .client
            .find(Locator::Css("section[data-task='angry-1'] button.answer"))
            .await
            .ok()
    })
    .await;
    browser.screenshot("inbox").await;
    browser
        .click("section[data-task='angry-1'] button.answer")
        .await;
    assert_eq!(browser.text("#flash").await, "answered angry-1");
    let events = completed(&kafka, "angry-1").await;
    let answer = events
        .iter()
        .filter_map(|e| e.event.as_ref())
        .find(|e| e.kind == EventKind::HumanDecision)
        .expect("the console's HUMAN_DECISION");
    assert_eq!(answer.payload, json!({ "approved": true }));
    browser.close().await;
    console.stop();
    agents.stop().await;
    router.stop().await;
}

/// A raw HTTP POST of a form: the status code.
async fn post(console: &Running, path: &str, body: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{}{path}", console.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_token_writes_are_refused_and_no_button_is_shown() {
    let kafka = kafka("console-token");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    publish(&kafka, &submission("angry-2", "I am furious")).await;
    publish_raw(&kafka, "junk-1", b"not json").await;
    let read_only = tempfile::tempdir().unwrap();
    let signed = tempfile::tempdir().unwrap();
    let consoles = [
        (
            start_console(&kafka, &workflow, read_only.path(), None).await,
            403,
        ),
        (
            start_console(&kafka, &workflow, signed.path(), Some(TOKEN)).await,
            401,
        ),
    ];
    let browser = Browser::start().await;
    for (console, status) in &consoles {
        eventually(
            WAIT,
            "the escalation and the dead letter indexed",
            || async {
                browser.open(console, "/inbox").await;
                let waiting = browser.count("section[data-task='angry-2']").await;
                browser.open(console, "/dead-letters").await;
                (waiting == 1 && browser.count("tr[data-at]").await >= 1).then_some(())
            },
        )
        .await;
        assert_eq!(
            browser.count("#redrive, input[name=at]").await,
            0,
            "no redrive controls"
        );
        browser.open(console, "/inbox").await;
        assert_eq!(browser.count("button.answer").await, 0, "no answer button");
        browser.open(console, "/tasks/angry-2").await;
        browser.text("#status").await;
        assert_eq!(browser.count("#cancel").await, 0, "no cancel button");
        assert_eq!(
            post(console, "/dead-letters/redrive", "at=0:0").await,
            *status
        );
        assert_eq!(
            post(console, "/inbox/angry-2/answer", "payload=%7B%7D").await,
            *status
        );
        assert_eq!(post(console, "/tasks/angry-2/cancel", "").await, *status);
    }
    // With the token but from another site (no csrf value, a foreign Origin): refused too.
    let (signed_console, _) = &consoles[1];
    let foreign = reqwest::Client::new()
        .post(format!(
            "http://{}/tasks/angry-2/cancel",
            signed_console.addr
        ))
        .header("cookie", "")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status().as_u16(), 403);
    browser.close().await;
    for (console, _) in consoles {
        console.stop();
    }
    agents.stop().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_payload_is_shown_as_text_and_runs_nothing() {
    let kafka = kafka("console-xss");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let hostile = "<script>window.__xss = 1</script>\"><img src=x onerror=\"window.__xss = 2\">";
    publish(&kafka, &submission(hostile, hostile)).await;
    let data = tempfile::tempdir().unwrap();
    let console = start_console(&kafka, &workflow, data.path(), None).await;
    let browser = Browser::start().await;
    browser.open(&console, "/tasks").await;
    let shown = browser.text("#tasks tbody tr td a").await;
    assert_eq!(shown, hostile, "the task id is shown as text");
    browser.click("#tasks tbody tr td a").await;
    let id = browser.text("#task-id").await;
    assert_eq!(id, hostile);
    browser.click("details.payload summary").await;
    let payload = browser.text("details.payload pre").await;
    assert!(
        payload.contains(hostile.replace('"', "\\\"").as_str()),
        "{payload}"
    );
    browser.screenshot("hostile").await;
    let ran = browser
        .client
        .execute(
            "return window.__xss === undefined && document.images.length === 0",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(ran, json!(true), "no script ran and no image was made");
    browser.close().await;
    console.stop();
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_console_resumes_from_its_index_and_misses_no_task() {
    let kafka = kafka("console-restart");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let router = RunningRouter::start(&kafka, &workflow).await;
    let agents = RunningAgents::example(&kafka, &workflow, |_| {});
    let data = tempfile::tempdir().unwrap();
    let console = start_console(&kafka, &workflow, data.path(), None).await;
    let index =
        || switchyard::console::index::Index::open(&data.path().join("index.sqlite")).unwrap();
    let publisher = {
        let kafka = kafka.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                publish(
                    &kafka,
                    &submission(&format!("r-{i}"), "where is my parcel?"),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    eventually(WAIT, "some tasks indexed before the restart", || async {
        (index().counts().unwrap().0 >= 10).then_some(())
    })
    .await;
    console.stop();
    let before = index().counts().unwrap();
    publisher.await.unwrap();
    let console = start_console(&kafka, &workflow, data.path(), None).await;
    eventually(WAIT, "every task to complete", || async {
        (completed_tasks(&kafka) == 60).then_some(())
    })
    .await;
    let records = state_events(&kafka);
    let tasks: std::collections::BTreeSet<&str> = records
        .iter()
        .map(|r| r.task_id.as_str())
        .filter(|t| !t.is_empty())
        .collect();
    let with_task = records.iter().filter(|r| !r.task_id.is_empty()).count() as i64;
    let after = eventually(WAIT, "the index to hold every record", || async {
        let counts = index().counts().unwrap();
        (counts.1 == with_task).then_some(counts)
    })
    .await;
    assert!(
        before.0 < 60,
        "the restart happened mid-stream ({before:?})"
    );
    assert_eq!(
        after,
        (tasks.len() as i64, with_task),
        "tasks and records match the state topic"
    );
    let browser = Browser::start().await;
    browser.open(&console, "/tasks").await;
    assert_eq!(
        browser.count("tr[data-task]").await,
        50,
        "a full first page"
    );
    browser.text("#next").await;
    browser.screenshot("tasks-page").await;
    browser.close().await;
    console.stop();
    agents.stop().await;
    router.stop().await;
}

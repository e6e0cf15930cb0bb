//! Helpers shared by the integration tests. They need a broker on 127.0.0.1 (see README).
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use switchyard::agent::{self, AgentConfig, Failure, Handler, Reply};
use switchyard::codec::Codec;
use switchyard::envelope::{Decision, EventKind, StateEvent, TaskEvent, WorkItem};
use switchyard::kafka::KafkaConfig;
use switchyard::metrics::{AgentMetrics, RouterMetrics};
use switchyard::replay::{replay, Filter, Report};
use switchyard::router::{Engine, Router, RouterConfig};
use switchyard::state_record;
use switchyard::topics::{self, TopicSpecs};
use switchyard::workflow::Workflow;
use tokio::sync::watch;

pub mod llm;
pub mod stall;

/// Logs to the test output when `RUST_LOG` is set.
pub fn logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    }
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Kafka settings with a topic prefix of this test's own; fails clearly when no broker answers.
pub fn kafka(test: &str) -> KafkaConfig {
    kafka_at(
        "SWITCHYARD_TEST_BOOTSTRAP",
        "127.0.0.1:9092",
        "scripts/start-broker",
        test,
    )
}

/// Like [`kafka`], on the broker with Kafka transactions (crabka) that the exactly-once tests
/// need: `SWITCHYARD_TXN_BOOTSTRAP`, or 127.0.0.1:9392 where `scripts/start-txn-broker` puts it.
pub fn txn_kafka(test: &str) -> KafkaConfig {
    kafka_at(
        "SWITCHYARD_TXN_BOOTSTRAP",
        "127.0.0.1:9392",
        "scripts/start-txn-broker",
        test,
    )
}

fn kafka_at(variable: &str, default: &str, start: &str, test: &str) -> KafkaConfig {
    let bootstrap = std::env::var(variable).unwrap_or_else(|_| default.into());
    let prefix = format!(
        "t-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let kafka = KafkaConfig {
        bootstrap_servers: bootstrap,
        topic_prefix: prefix,
        options: Default::default(),
    };
    if let Err(e) = kafka.wait_for_broker(Duration::from_secs(10)) {
        panic!("this test needs a Kafka-protocol broker: {e}\n(start it with `{start}`, or set {variable})");
    }
    kafka
}

/// Loads a workflow and creates its topics.
pub async fn setup(kafka: &KafkaConfig, workflow_dir: &Path) -> Workflow {
    setup_with(kafka, workflow_dir, |_| {}).await
}

/// Loads a workflow and creates its topics from the shipped specs changed by `edit`.
pub async fn setup_with(
    kafka: &KafkaConfig,
    workflow_dir: &Path,
    edit: impl FnOnce(&mut TopicSpecs),
) -> Workflow {
    let workflow = Workflow::load(workflow_dir, None).expect("workflow loads");
    let mut specs = TopicSpecs::load(&root().join("topics/switchyard.yaml")).unwrap();
    edit(&mut specs);
    topics::apply(kafka, &specs, &workflow.cards)
        .await
        .expect("topics apply");
    workflow
}

/// A copy of the workflow in `agents/<name>` in a temporary directory, with `card_lines` added
/// to the named cards and `rules_head` put before the rule table.
pub fn workflow_copy(
    name: &str,
    card_lines: &[(&str, &str)],
    rules_head: &str,
) -> tempfile::TempDir {
    let from = root().join("agents").join(name);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cards")).unwrap();
    for entry in std::fs::read_dir(from.join("cards")).unwrap() {
        let path = entry.unwrap().path();
        let card = path.file_stem().unwrap().to_str().unwrap().to_string();
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (_, line) in card_lines.iter().filter(|(c, _)| *c == card) {
            text.push_str(&format!("\n{line}\n"));
        }
        std::fs::write(
            dir.path().join("cards").join(path.file_name().unwrap()),
            text,
        )
        .unwrap();
    }
    let rules = std::fs::read_to_string(from.join("rules.yaml")).unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        format!("{rules_head}\n{rules}"),
    )
    .unwrap();
    dir
}

/// The example workflow in a temporary directory with every card's timeout set to `timeout`.
/// The SIGKILL tests use it: under their load on a slow broker a step may wait longer than the
/// shipped minute for its agent, and a task ended by timeouts would never complete.
pub fn example_with_timeout(timeout: &str) -> tempfile::TempDir {
    let dir = workflow_copy("customer-service", &[], "");
    for entry in std::fs::read_dir(dir.path().join("cards")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let text: Vec<String> = text
            .lines()
            .map(|line| match line.starts_with("timeout:") {
                true => format!("timeout: {timeout}"),
                false => line.to_string(),
            })
            .collect();
        std::fs::write(&path, text.join("\n")).unwrap();
    }
    dir
}

/// A workflow whose only card, `idle`, has no agent: every submission is routed to it and
/// waits (its timeout is an hour).
pub fn idle_workflow() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cards")).unwrap();
    std::fs::write(
        dir.path().join("cards/idle.yaml"),
        "name: idle\ntimeout: 1h\nruntime: {kind: handler}\n",
    )
    .unwrap();
    let rules = "rules:\n  - { id: start, when: { kind: SUBMITTED }, then: { route: [idle] } }\n  - { id: done, when: { source: idle }, then: complete }\n";
    std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
    dir
}

/// librdkafka's in-process mock cluster (the only transactional broker here, see
/// tests/transactions.rs) with `workflow`'s topics under `prefix`, 3 partitions each.
pub fn mock_cluster_with(
    workflow: &Workflow,
    prefix: &str,
) -> (MockCluster<'static, DefaultProducerContext>, KafkaConfig) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let kafka = KafkaConfig {
        bootstrap_servers: cluster.bootstrap_servers(),
        topic_prefix: prefix.into(),
        // Tests lift the errors they inject into the cluster; clients see that at a refresh.
        options: [("topic.metadata.refresh.interval.ms".into(), "500".into())].into(),
    };
    let topics = kafka.topics();
    let mut names = vec![
        topics.tasks(),
        topics.state(),
        topics.snapshots(),
        topics.dlq(),
    ];
    names.extend(workflow.cards.iter().map(|c| c.topic(prefix)));
    for name in names {
        cluster.create_topic(&name, 3, 1).unwrap();
    }
    (cluster, kafka)
}

/// Replays the whole recorded history of `kafka` (JSON) with `engine`, as `replay --verify` does.
pub async fn replay_all(kafka: &KafkaConfig, engine: &Engine) -> Report {
    replay(kafka, &Codec::Json, engine, &Filter::default(), |_| {})
        .await
        .expect("replay reads the topics")
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_or_report(timeout, what, check, String::new).await
}

/// [`eventually`], with what `report` says in the panic message.
pub async fn eventually_or_report<T, F, Fut>(
    timeout: Duration,
    what: &str,
    mut check: F,
    report: impl FnOnce() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = check().await {
            return t;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                report()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A router running in this process.
pub struct RunningRouter {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
    /// Its metrics.
    pub metrics: RouterMetrics,
    /// The producer it started with.
    pub producer: FutureProducer,
}

impl RunningRouter {
    /// Starts a router for `workflow`.
    pub async fn start(kafka: &KafkaConfig, workflow: &Workflow) -> Self {
        Self::start_with(kafka, workflow, |_| {}).await
    }

    /// Starts a router for `workflow` with its config changed by `edit`.
    pub async fn start_with(
        kafka: &KafkaConfig,
        workflow: &Workflow,
        edit: impl FnOnce(&mut RouterConfig),
    ) -> Self {
        Self::start_engine(kafka, workflow.engine(), edit).await
    }

    /// Starts a router deciding with `engine`, its config changed by `edit`.
    pub async fn start_engine(
        kafka: &KafkaConfig,
        engine: Engine,
        edit: impl FnOnce(&mut RouterConfig),
    ) -> Self {
        logging();
        let mut config = RouterConfig::new(kafka.clone());
        config.session_timeout = Duration::from_secs(6);
        edit(&mut config);
        let metrics = RouterMetrics::new().unwrap();
        let router = Router::new(config, engine, metrics.clone())
            .await
            .expect("router starts");
        let producer = router.producer().clone();
        let (stop, rx) = watch::channel(false);
        let handle = tokio::spawn(async move { router.run(rx).await.expect("router runs") });
        Self {
            stop,
            handle,
            metrics,
            producer,
        }
    }

    /// Stops it and waits.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.handle.await.unwrap();
    }
}

/// The `switchyard` binary with `kafka`'s broker and topic prefix, run from the repository root,
/// logging with its own default filter whatever `RUST_LOG` the test runs with (tests read its
/// log lines).
pub fn switchyard_command(kafka: &KafkaConfig) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .env_remove("RUST_LOG")
        .args([
            "--bootstrap-servers",
            &kafka.bootstrap_servers,
            "--topic-prefix",
            &kafka.topic_prefix,
        ])
        .current_dir(root());
    command
}

/// A process a test started: killed and reaped when dropped, so that a failing test leaves
/// nothing running. It is the [`Child`] for everything else.
pub struct Spawned(pub Child);

impl std::ops::Deref for Spawned {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `switchyard` with `args` as a process; its log goes to `$TMPDIR/<log>`.
pub fn spawn_switchyard(kafka: &KafkaConfig, args: &[&str], log: &str) -> Spawned {
    let log = std::fs::File::create(std::env::temp_dir().join(log)).unwrap();
    Spawned(
        switchyard_command(kafka)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("the switchyard binary starts"),
    )
}

/// Starts `switchyard router` as a process for the workflow in `workflow` (relative to the
/// repository root, or absolute) with `extra` arguments; its log goes to
/// `$TMPDIR/<prefix>-router-<n>.log`.
pub fn spawn_router(kafka: &KafkaConfig, workflow: &Path, n: usize, extra: &[&str]) -> Spawned {
    let workflow = workflow.to_string_lossy();
    let mut args = vec!["router", "--workflow", &workflow];
    args.extend(["--http-addr", "127.0.0.1:0", "--session-timeout", "3s"]);
    args.extend(extra);
    let log = format!("{}-router-{n}.log", kafka.topic_prefix);
    spawn_switchyard(kafka, &args, &log)
}

/// Runs `tasks` example tasks, all published at once, through `switchyard router` processes
/// for `workflow` (a copy of the example's) started with `args`, killed with SIGKILL `kills`
/// times and started again: kill `k` once `k / (kills + 1)` of the tasks finished, the running
/// router finished at least one of them, and `before_kill(k)` returned. Returns when every task finished, with the last router killed
/// too. The agents are the caller's.
pub async fn run_tasks_through_sigkills<F, Fut>(
    kafka: &KafkaConfig,
    workflow: &Path,
    args: &[&str],
    tasks: usize,
    kills: usize,
    mut before_kill: F,
) where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let completions = std::sync::Mutex::new(Completions::new(kafka));
    let finished = || completions.lock().unwrap().count();
    let mut router = spawn_router(kafka, workflow, 0, args);
    publish_example_tasks(kafka, tasks).await;
    let mut before = 0;
    for kill in 1..=kills {
        let target = (tasks * kill / (kills + 1)).max(before + 1);
        assert!(
            target < tasks,
            "router run {} started after every task finished: kill {kill} cannot land mid-flow",
            kill - 1
        );
        eventually(
            Duration::from_secs(300),
            &format!("{target} tasks to finish before kill {kill}"),
            || async { (finished() >= target).then_some(()) },
        )
        .await;
        before_kill(kill).await;
        router.kill().unwrap();
        router.wait().unwrap();
        before = finished();
        router = spawn_router(kafka, workflow, kill, args);
    }
    eventually(Duration::from_secs(300), "every task to finish", || async {
        (finished() >= tasks).then_some(())
    })
    .await;
    router.kill().unwrap();
    router.wait().unwrap();
}

/// A reader of the state topic from its beginning that goes on from where it stopped, so that a
/// test polling it while thousands of tasks run sees the new decisions within milliseconds.
pub struct StateTail {
    consumer: BaseConsumer,
}

impl StateTail {
    /// A reader of `kafka`'s state topic from its beginning.
    pub fn new(kafka: &KafkaConfig) -> Self {
        let consumer = reader(kafka);
        let state = kafka.topics().state();
        let mut tpl = TopicPartitionList::new();
        for p in 0..kafka.partition_count(&state).unwrap() {
            tpl.add_partition_offset(&state, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        Self { consumer }
    }

    /// Hands each state event recorded since the last call to `on`, with its partition.
    pub fn read(&mut self, mut on: impl FnMut(i32, StateEvent)) {
        while let Some(message) = self.consumer.poll(Duration::from_millis(10)) {
            let message = message.unwrap();
            let events = state_record::decode(message.payload().unwrap());
            for event in events.expect("state records are JSON") {
                on(message.partition(), event);
            }
        }
    }
}

/// Counts the tasks the state topic records as completed ([`StateTail`]).
pub struct Completions {
    tail: StateTail,
    count: usize,
}

impl Completions {
    /// A counter from the beginning of `kafka`'s state topic.
    pub fn new(kafka: &KafkaConfig) -> Self {
        let tail = StateTail::new(kafka);
        Self { tail, count: 0 }
    }

    /// The tasks completed so far.
    pub fn count(&mut self) -> usize {
        let count = &mut self.count;
        self.tail.read(|_, event| {
            *count += usize::from(matches!(event.decision, Decision::Completed { .. }));
        });
        self.count
    }
}

/// Agents running in this process.
pub struct RunningAgents {
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningAgents {
    /// Starts one agent per named card, each with the handler `make` gives it.
    pub fn start<H: Handler>(
        kafka: &KafkaConfig,
        workflow: &Workflow,
        cards: &[&str],
        make: impl Fn(&str) -> H,
    ) -> Self {
        Self::start_with(kafka, workflow, cards, make, |_| {})
    }

    /// Like [`RunningAgents::start`], with each agent's config changed by `edit`.
    pub fn start_with<H: Handler>(
        kafka: &KafkaConfig,
        workflow: &Workflow,
        cards: &[&str],
        make: impl Fn(&str) -> H,
        edit: impl Fn(&mut AgentConfig),
    ) -> Self {
        let (stop, rx) = watch::channel(false);
        let handles = cards
            .iter()
            .map(|name| {
                let card = workflow
                    .cards
                    .get(name)
                    .unwrap_or_else(|| panic!("no card {name}"))
                    .clone();
                let mut config = AgentConfig::new(kafka.clone(), card);
                config.session_timeout = Duration::from_secs(6);
                edit(&mut config);
                let handler = Arc::new(make(name));
                let rx = rx.clone();
                tokio::spawn(async move {
                    agent::run(config, handler, AgentMetrics::new().unwrap(), rx)
                        .await
                        .expect("agent runs")
                })
            })
            .collect();
        Self { stop, handles }
    }

    /// Starts [`ExampleAgent`]s for every card of `workflow` that is not answered by a human.
    pub fn example(
        kafka: &KafkaConfig,
        workflow: &Workflow,
        edit: impl Fn(&mut AgentConfig),
    ) -> Self {
        Self::example_of(kafka, workflow, &[], edit)
    }

    /// Like [`RunningAgents::example`], without the cards in `except`.
    pub fn example_except(kafka: &KafkaConfig, workflow: &Workflow, except: &[&str]) -> Self {
        Self::example_of(kafka, workflow, except, |_| {})
    }

    fn example_of(
        kafka: &KafkaConfig,
        workflow: &Workflow,
        except: &[&str],
        edit: impl Fn(&mut AgentConfig),
    ) -> Self {
        let machines: Vec<&str> = workflow
            .cards
            .iter()
            .filter(|c| !c.is_human() && !except.contains(&c.name.as_str()))
            .map(|c| c.name.as_str())
            .collect();
        Self::start_with(
            kafka,
            workflow,
            &machines,
            |n| ExampleAgent(n.to_string()),
            edit,
        )
    }

    /// Stops them (they drain) and waits.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for h in self.handles {
            h.await.unwrap();
        }
    }
}

/// A fast, deterministic stand-in for the example workflow's agents (the same logic as the
/// Python scripts in agents/customer-service/bin): angry ("furious") messages get a
/// low-confidence review; a numeric `score` in the input is the review's confidence; "flaky"
/// messages make intent_classifier fail its first attempt and response_generator fail always.
pub struct ExampleAgent(pub String);

impl Handler for ExampleAgent {
    fn handle(&self, item: WorkItem) -> impl Future<Output = Result<Reply, Failure>> + Send {
        let card = self.0.clone();
        async move {
            let text = item.input["customer_message"]
                .as_str()
                .unwrap_or_default()
                .to_lowercase();
            let angry = text.contains("furious");
            let flaky = text.contains("flaky");
            let payload = match card.as_str() {
                "sentiment_analyzer" => {
                    serde_json::json!({ "sentiment": if angry { "negative" } else { "positive" } })
                }
                "intent_classifier" if flaky && item.attempt == 1 => {
                    return Err("classifier overloaded".into())
                }
                "intent_classifier" => serde_json::json!({ "intent": "delivery" }),
                "knowledge_retriever" => serde_json::json!({ "articles": ["a"] }),
                "response_generator" if flaky => return Err("generator crashed".into()),
                "response_generator" => serde_json::json!({ "draft": "hello" }),
                "quality_controller" => {
                    let negative = item.context["sentiment_analyzer"]["sentiment"] == "negative";
                    let default = if negative { 0.55 } else { 0.93 };
                    let confidence = item.input["score"].as_f64().unwrap_or(default);
                    return Ok(Reply {
                        payload: serde_json::json!({ "confidence": confidence }),
                        confidence: Some(confidence),
                        usage: None,
                    });
                }
                _ => serde_json::json!({ "sent": true }),
            };
            Ok(Reply {
                payload,
                confidence: None,
                usage: None,
            })
        }
    }
}

/// Answers escalations like a human would: a HUMAN_DECISION for the step, on the tasks topic.
pub struct Human(pub KafkaConfig);

impl Handler for Human {
    fn handle(&self, item: WorkItem) -> impl Future<Output = Result<Reply, Failure>> + Send {
        let kafka = self.0.clone();
        async move {
            let mut answer = TaskEvent::new(&item.task_id, EventKind::HumanDecision, "tester");
            answer.step_id = Some(item.step_id);
            publish(&kafka, &answer).await;
            Ok(Reply::default())
        }
    }
}

/// One producer per cluster for all the tests of a binary.
fn producer(kafka: &KafkaConfig) -> FutureProducer {
    static PRODUCERS: OnceLock<std::sync::Mutex<HashMap<String, FutureProducer>>> = OnceLock::new();
    let mut producers = PRODUCERS.get_or_init(Default::default).lock().unwrap();
    producers
        .entry(kafka.bootstrap_servers.clone())
        .or_insert_with(|| {
            let mut config = kafka.client_config();
            config.set("message.max.bytes", "16000000");
            KafkaConfig::producer_from(config).unwrap()
        })
        .clone()
}

/// Publishes raw bytes to the tasks topic with `key`.
pub async fn publish_raw(kafka: &KafkaConfig, key: &str, bytes: &[u8]) {
    publish_record(kafka, key.as_bytes(), Some(bytes), &[]).await;
}

/// Publishes a record to the tasks topic: any key, a value or a tombstone, headers; returns
/// its partition and offset. The producer accepts records of up to 16 MB.
pub async fn publish_record(
    kafka: &KafkaConfig,
    key: &[u8],
    value: Option<&[u8]>,
    headers: &[(&str, &[u8])],
) -> (i32, i64) {
    let producer = producer(kafka);
    let topic = kafka.topics().tasks();
    let mut record = FutureRecord::to(&topic).key(key);
    if let Some(value) = value {
        record = record.payload(value);
    }
    if !headers.is_empty() {
        let mut hs = rdkafka::message::OwnedHeaders::new();
        for (key, value) in headers {
            hs = hs.insert(rdkafka::message::Header {
                key,
                value: Some(*value),
            });
        }
        record = record.headers(hs);
    }
    let delivered = producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("publish");
    (delivered.partition, delivered.offset)
}

/// Publishes a task event.
pub async fn publish(kafka: &KafkaConfig, event: &TaskEvent) {
    publish_raw(kafka, &event.task_id, &serde_json::to_vec(event).unwrap()).await;
}

/// A submission of `message` under `task_id`.
pub fn submission(task_id: &str, message: &str) -> TaskEvent {
    let mut e = TaskEvent::new(task_id, EventKind::Submitted, "client");
    e.payload = serde_json::json!({ "customer_message": message });
    e
}

/// Submits tasks `<prefix>-1`, `<prefix>-2`, … one at a time, each waited for until it ends,
/// until one completes; returns how many ended dead-lettered first. A router's producer learns
/// that a topic accepts writes again only at its next metadata refresh (a test that lifts a
/// broker's refusal sets `topic.metadata.refresh.interval.ms` low), so the first tasks after the
/// refusal is lifted may still be refused.
pub async fn submit_until_one_completes(kafka: &KafkaConfig, prefix: &str) -> usize {
    for attempt in 1..=10 {
        let task = format!("{prefix}-{attempt}");
        publish(kafka, &submission(&task, "where is my other parcel?")).await;
        let completed = eventually(
            Duration::from_secs(60),
            &format!("{task} to end"),
            || async {
                task_events(kafka, &task)
                    .iter()
                    .find_map(|e| match e.decision {
                        Decision::Completed { .. } => Some(true),
                        Decision::DeadLettered {
                            ends_task: true, ..
                        } => Some(false),
                        _ => None,
                    })
            },
        )
        .await;
        if completed {
            return attempt - 1;
        }
    }
    panic!("ten tasks in turn were refused after the refusal was lifted");
}

/// A consumer with `kafka`'s settings that reads what it is assigned and commits nothing.
fn reader(kafka: &KafkaConfig) -> BaseConsumer {
    reader_in(kafka, "switchyard-test-reader")
}

/// [`reader`] as a member of `group` (whose committed offsets it can ask for), without joining it.
pub fn reader_in(kafka: &KafkaConfig, group: &str) -> BaseConsumer {
    let mut config = kafka.client_config();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    config.create().unwrap()
}

/// Every record of `topic` that a consumer with `kafka`'s settings sees (read_committed unless
/// `isolation.level` says otherwise), from the beginning to the high watermarks when called. The
/// consumer's position passes commit and abort markers and aborted records without returning
/// them; with read_committed it waits for a transaction open below a watermark to end.
pub fn read_all(kafka: &KafkaConfig, topic: &str) -> Vec<OwnedMessage> {
    let consumer = reader(kafka);
    let partitions = kafka.partition_count(topic).unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
    }
    if ends.is_empty() {
        return Vec::new();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} to its end took over 60s"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            out.push(message.unwrap().detach());
        }
        for e in consumer.position().unwrap().elements() {
            if let (Offset::Offset(at), Some(end)) = (e.offset(), ends.get(&e.partition())) {
                if at >= *end {
                    ends.remove(&e.partition());
                }
            }
        }
    }
    out
}

/// Every state event, in partition order.
pub fn state_events(kafka: &KafkaConfig) -> Vec<StateEvent> {
    read_all(kafka, &kafka.topics().state())
        .iter()
        .flat_map(|m| state_record::decode(m.payload().unwrap()).expect("state records are JSON"))
        .collect()
}

/// How many tasks the state topic records as completed.
pub fn completed_tasks(kafka: &KafkaConfig) -> usize {
    state_events(kafka)
        .iter()
        .filter(|e| matches!(e.decision, Decision::Completed { .. }))
        .count()
}

/// The state events of one task.
pub fn task_events(kafka: &KafkaConfig, task_id: &str) -> Vec<StateEvent> {
    state_events(kafka)
        .into_iter()
        .filter(|e| e.task_id == task_id)
        .collect()
}

/// A header's value as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Publishes `tasks` submissions `task-0`, `task-1`, … for the example workflow: every tenth is
/// furious (its review is not confident, so a human answers it), the rest ask about an order.
pub async fn publish_example_tasks(kafka: &KafkaConfig, tasks: usize) {
    let submissions: Vec<TaskEvent> = (0..tasks)
        .map(|i| {
            let message = if i % 10 == 0 {
                "I am furious"
            } else {
                "where is my order"
            };
            submission(&format!("task-{i}"), message)
        })
        .collect();
    futures::future::join_all(submissions.iter().map(|s| publish(kafka, s))).await;
}

/// Checks the state topic's `events` after `tasks` tasks of the example workflow ran through
/// crashes: each (task, step) was decided exactly once, every task completed exactly once, and
/// none lost a step (happy tasks take 6 steps, escalated ones 6: the human replaces the sender).
pub fn assert_each_step_decided_once(events: &[StateEvent], tasks: usize) {
    let mut steps: HashMap<(String, u32), usize> = HashMap::new();
    let mut completed: HashMap<String, usize> = HashMap::new();
    for e in events {
        match &e.decision {
            Decision::Routed { steps: new, .. } => {
                for s in new {
                    *steps.entry((e.task_id.clone(), s.step_id)).or_default() += 1;
                }
            }
            Decision::Escalated { step, .. } => {
                *steps.entry((e.task_id.clone(), step.step_id)).or_default() += 1
            }
            Decision::Completed { .. } => *completed.entry(e.task_id.clone()).or_default() += 1,
            _ => {}
        }
    }
    let duplicated: Vec<_> = steps.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        duplicated.is_empty(),
        "steps decided more than once: {:?}",
        &duplicated[..duplicated.len().min(10)]
    );
    assert_eq!(completed.len(), tasks, "every task completed");
    assert!(
        completed.values().all(|n| *n == 1),
        "no task completed twice"
    );
    let tasks_with_steps: std::collections::HashSet<&String> =
        steps.keys().map(|(t, _)| t).collect();
    assert_eq!(tasks_with_steps.len(), tasks);
    assert_eq!(steps.len(), tasks * 6, "no step was lost");
}

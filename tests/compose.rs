//! The production-like stack (`docker-compose.yml`, `deploy/`), checked without Docker:
//! `docker-compose config` accepts it, every switchyard command in it parses and names paths that
//! exist, every Prometheus target is a service listening on that port, and every metric the
//! Grafana dashboard queries appears on the real `/metrics` of a running router and agent.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use common::*;
use serde_json::Value;
use switchyard::envelope::Decision;

fn compose() -> Value {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

/// The services and their `command` lists.
fn commands() -> Vec<(String, Vec<String>)> {
    compose()["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(name, service)| {
            let command = service["command"].as_array()?;
            let args = command.iter().map(|a| a.as_str().unwrap().to_string());
            Some((name.clone(), args.collect()))
        })
        .collect()
}

#[test]
fn docker_compose_accepts_the_file() {
    let output = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .current_dir(root())
        .output()
        .expect("docker-compose is not installed: run scripts/install-compose");
    assert!(
        output.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn every_command_parses_and_every_path_it_names_exists() {
    let commands: Vec<_> = commands()
        .into_iter()
        .filter(|(_, c)| c.first().is_some_and(|p| p == "switchyard"))
        .collect();
    let agents: Vec<_> = commands
        .iter()
        .filter(|(_, c)| c.contains(&"agent".into()))
        .collect();
    let routers: Vec<_> = commands
        .iter()
        .filter(|(_, c)| c.contains(&"router".into()))
        .collect();
    assert_eq!(routers.len(), 2, "two routers");
    let cards = std::fs::read_dir(root().join("agents/customer-service/cards"))
        .unwrap()
        .filter(|e| !e.as_ref().unwrap().path().ends_with("human_agent.yaml"))
        .count();
    assert_eq!(
        agents.len(),
        cards,
        "one agent per runnable card of the example workflow"
    );
    for (service, command) in &commands {
        if let Err(e) = switchyard::cli::Cli::try_parse_from(command) {
            panic!("service `{service}`: {e}");
        }
        for flag in ["--card", "--workflow", "--spec", "--dir"] {
            if let Some(at) = command.iter().position(|a| a == flag) {
                let path = root().join(&command[at + 1]);
                assert!(
                    path.exists(),
                    "service `{service}`: {flag} {} does not exist",
                    path.display()
                );
            }
        }
        assert!(
            command
                .windows(2)
                .any(|w| w[0] == "--encoding" && w[1] == "avro"),
            "service `{service}` speaks Avro"
        );
    }
}

#[test]
fn every_prometheus_target_is_a_service_listening_there() {
    let text = std::fs::read_to_string(root().join("deploy/prometheus.yml")).unwrap();
    let prometheus: Value = serde_yaml_ng::from_str(&text).unwrap();
    let commands = commands();
    let mut targets = 0;
    for job in prometheus["scrape_configs"].as_array().unwrap() {
        for config in job["static_configs"].as_array().unwrap() {
            for target in config["targets"].as_array().unwrap() {
                let (host, port) = target.as_str().unwrap().split_once(':').unwrap();
                let (_, command) = commands
                    .iter()
                    .find(|(name, _)| name == host)
                    .unwrap_or_else(|| panic!("target {host} is no service of the stack"));
                let listen = format!("0.0.0.0:{port}");
                assert!(
                    command
                        .windows(2)
                        .any(|w| w[0] == "--http-addr" && w[1] == listen),
                    "service `{host}` does not serve /metrics on {listen}"
                );
                targets += 1;
            }
        }
    }
    let serving = commands
        .iter()
        .filter(|(_, c)| c.contains(&"--http-addr".into()))
        .count();
    assert_eq!(
        targets, serving,
        "every service that serves /metrics is scraped"
    );
}

/// Every metric family the dashboard queries (histograms by their base name).
fn dashboard_metrics() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(root().join("deploy/grafana/dashboards/switchyard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut out = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("switchyard_") {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| word.strip_suffix(s))
                        .unwrap_or(word);
                    out.insert(base.to_string());
                }
            }
        }
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The metric families `/metrics` at `port` shows, if it answers.
fn scrape(port: u16) -> Option<BTreeSet<String>> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(
        body.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_dashboard_queries_is_served_by_a_running_router_or_agent() {
    let kafka = kafka("compose");
    let workflow = setup(&kafka, &root().join("agents/customer-service")).await;
    let (router_port, agent_port) = (free_port(), free_port());
    let mut router = spawn_switchyard(
        &kafka,
        &[
            "router",
            "--workflow",
            "agents/customer-service",
            "--session-timeout",
            "3s",
            "--http-addr",
            &format!("127.0.0.1:{router_port}"),
        ],
        &format!("{}-router.log", kafka.topic_prefix),
    );
    let mut agent = spawn_switchyard(
        &kafka,
        &[
            "agent",
            "--card",
            "agents/customer-service/cards/sentiment_analyzer.yaml",
            "--session-timeout",
            "3s",
            "--http-addr",
            &format!("127.0.0.1:{agent_port}"),
        ],
        &format!("{}-agent.log", kafka.topic_prefix),
    );
    let agents = RunningAgents::example_except(&kafka, &workflow, &["sentiment_analyzer"]);
    let humans = RunningAgents::start(&kafka, &workflow, &["human_agent"], |_| {
        Human(kafka.clone())
    });
    publish_example_tasks(&kafka, 3).await;
    publish_raw(&kafka, "poison", b"not json").await;
    eventually(
        Duration::from_secs(120),
        "three tasks to complete",
        || async {
            let done = state_events(&kafka)
                .iter()
                .filter(|e| matches!(e.decision, Decision::Completed { .. }))
                .count();
            (done >= 3).then_some(())
        },
    )
    .await;
    let wanted = dashboard_metrics();
    assert!(wanted.len() >= 12, "the dashboard queries {wanted:?}");
    // The router's lag gauge comes from librdkafka's statistics, every 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let mut served = scrape(router_port).unwrap_or_default();
        served.extend(scrape(agent_port).unwrap_or_default());
        let missing: Vec<_> = wanted
            .iter()
            .filter(|m| !served.contains(*m))
            .cloned()
            .collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no router or agent serves: {missing:?}"
    );
    router.kill().unwrap();
    router.wait().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    agents.stop().await;
    humans.stop().await;
}

#[test]
fn the_dashboard_and_its_provisioning_name_the_same_places() {
    let provider: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            root().join("deploy/grafana/provisioning/dashboards/switchyard.yml"),
        )
        .unwrap(),
    )
    .unwrap();
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let grafana = &compose()["services"]["grafana"]["volumes"];
    let mounted = grafana.as_array().unwrap().iter().any(|v| {
        v.as_str()
            .unwrap()
            .starts_with("./deploy/grafana/dashboards:")
            && v.as_str().unwrap().contains(path)
    });
    assert!(
        mounted,
        "Grafana mounts deploy/grafana/dashboards at {path}"
    );
    assert!(Path::new(&root().join("deploy/grafana/dashboards/switchyard.json")).exists());
}

//! The command line: start-up refuses bad cards, rule tables and LLM settings with the file and
//! the field.

use std::process::Command;

fn switchyard(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("SWITCHYARD_BOOTSTRAP_SERVERS", "127.0.0.1:1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn workflow(card: &str, rules: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cards")).unwrap();
    std::fs::write(dir.path().join("cards/a.yaml"), card).unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
    dir
}

const RULES: &str = "rules:\n  - { id: s, when: { kind: SUBMITTED }, then: { route: [a] } }\n  - { id: d, when: { source: a }, then: complete }\n";

#[test]
fn a_bad_card_stops_start_up_naming_file_and_field() {
    let dir = workflow(
        "name: a\nruntime: {kind: command, command: [x]}\nconcurency: 2\n",
        RULES,
    );
    let (ok, stderr) = switchyard(&["router", "--workflow", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("cards/a.yaml") && stderr.contains("unknown field `concurency`"),
        "{stderr}"
    );
}

#[test]
fn a_bad_rule_table_stops_start_up_naming_file_and_field() {
    let dir = workflow(
        "name: a\nruntime: {kind: handler}\n",
        &RULES.replace("route: [a]", "route: [b]"),
    );
    let (ok, stderr) = switchyard(&["router", "--workflow", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("rules.yaml")
            && stderr.contains("rules[0].then.route[0]")
            && stderr.contains("no card named `b`"),
        "{stderr}"
    );
}

#[test]
fn the_shipped_workflow_loads() {
    let root = env!("CARGO_MANIFEST_DIR");
    let wf = switchyard::workflow::Workflow::load(
        &std::path::Path::new(root).join("agents/customer-service"),
        None,
    )
    .unwrap();
    assert_eq!(wf.cards.names().len(), 7);
}

#[test]
fn every_subcommand_has_help() {
    for sub in ["router", "agent", "submit", "tail", "topics", "dev"] {
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{sub} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{sub} --help"
        );
    }
}

#[test]
fn a_bad_llm_section_stops_start_up_naming_file_and_field() {
    let dir = workflow("name: a\nruntime: {kind: handler}\n", RULES);
    let config = dir.path().join("switchyard.yaml");
    for (llm, field) in [
        ("{ base_url: 'ftp://models' }", "llm.base_url"),
        ("{ timout: 5s }", "unknown field `timout`"),
    ] {
        std::fs::write(&config, format!("llm: {llm}\n")).unwrap();
        let (ok, stderr) = switchyard(&[
            "--config",
            config.to_str().unwrap(),
            "router",
            "--workflow",
            dir.path().to_str().unwrap(),
        ]);
        assert!(!ok);
        assert!(
            stderr.contains("switchyard.yaml") && stderr.contains(field),
            "{stderr}"
        );
    }
}

#[test]
fn the_shipped_llm_workflow_loads() {
    let root = env!("CARGO_MANIFEST_DIR");
    let wf = switchyard::workflow::Workflow::load(
        &std::path::Path::new(root).join("agents/helpdesk"),
        None,
    )
    .unwrap();
    assert!(wf.rules.uses_llm());
    assert_eq!(wf.cards.names().len(), 6);
}

#[test]
fn every_command_says_in_one_line_within_10s_that_no_broker_answers() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let address = format!("127.0.0.1:{port}");
    let commands: [&[&str]; 7] = [
        &["submit", "--payload", "{}"],
        &["tail", "t1"],
        &["audit", "t1"],
        &["replay", "--verify"],
        &["dlq", "list"],
        &["dlq", "redrive", "--reason", "x"],
        &["topics", "apply"],
    ];
    let runs: Vec<_> = commands
        .iter()
        .map(|args| {
            let address = address.clone();
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
                    .args(["--bootstrap-servers", &address])
                    .args(&args)
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
                    .env_remove("RUST_LOG")
                    .output()
                    .unwrap();
                (args, started.elapsed(), out)
            })
        })
        .collect();
    for run in runs {
        let (args, took, out) = run.join().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded without a broker");
        assert!(took.as_secs_f64() < 10.0, "{args:?} took {took:?}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            (1..=3).contains(&lines.len()),
            "{args:?} printed {} lines:\n{stderr}",
            lines.len()
        );
        assert!(
            stderr.contains(&address) && stderr.contains("scripts/start-broker"),
            "{args:?}: {stderr}"
        );
    }
}

//! The published JSON Schemas (`schemas/*.schema.json`) are the ones the code generates, every
//! example file names and passes its schema, and a typo is refused by the schema as it is by the
//! loader. No broker needed.

mod common;

use std::path::{Path, PathBuf};

use common::root;
use serde_json::Value;
use switchyard::envelope::{DecidedBy, Decision, StateEvent, Step};

fn schema(name: &str) -> Value {
    let path = root().join("schemas").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The schema errors of `instance`, as text.
fn errors(schema: &Value, instance: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(schema).expect("a valid schema");
    validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// Each example workflow's directory.
fn workflows() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("agents"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// The card files of every example workflow.
fn cards() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = workflows()
        .iter()
        .flat_map(|w| std::fs::read_dir(w.join("cards")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    out.sort();
    out
}

#[test]
fn the_published_schemas_are_the_generated_ones() {
    for (name, generated) in switchyard::schema::all() {
        assert_eq!(
            schema(name),
            generated,
            "schemas/{name} is out of date: run `cargo run -- schemas export`"
        );
    }
}

#[test]
fn every_example_file_names_and_passes_its_schema() {
    let mut checked = 0;
    let groups = [
        ("card.schema.json", cards()),
        (
            "rules.schema.json",
            workflows().iter().map(|w| w.join("rules.yaml")).collect(),
        ),
        (
            "rules.schema.json",
            vec![
                root().join("tests/fixtures/llm-rules.yaml"),
                root().join("benches/fixtures/one-work-item.yaml"),
            ],
        ),
        (
            "topics.schema.json",
            vec![root().join("topics/switchyard.yaml")],
        ),
        (
            "config.schema.json",
            vec![root().join("tests/fixtures/config.yaml")],
        ),
    ];
    for (name, paths) in groups {
        let schema = schema(name);
        assert!(!paths.is_empty(), "no example files for {name}");
        for path in paths {
            let first = std::fs::read_to_string(&path).unwrap();
            let first = first.lines().next().unwrap_or_default();
            assert!(
                first.starts_with("# yaml-language-server: $schema=") && first.ends_with(name),
                "{} starts with `# yaml-language-server: $schema=…/{name}`",
                path.display()
            );
            let errors = errors(&schema, &yaml(&path));
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 18, "checked {checked} files");
}

#[test]
fn a_card_with_a_typo_is_refused_by_the_schema_and_by_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let original = root().join("agents/customer-service/cards/sentiment_analyzer.yaml");
    let text = std::fs::read_to_string(&original).unwrap() + "timeuot: 5s\n";
    let path = dir.path().join("sentiment_analyzer.yaml");
    std::fs::write(&path, &text).unwrap();
    let errors = errors(&schema("card.schema.json"), &yaml(&path));
    assert!(
        errors.iter().any(|e| e.contains("timeuot")),
        "the schema names the unknown field: {errors:?}"
    );
    let loaded = switchyard::cards::Card::load(&path)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(loaded.contains("timeuot"), "{loaded}");
    let bad_duration = std::fs::read_to_string(&original).unwrap() + "timeout: soon\n";
    std::fs::write(&path, bad_duration).unwrap();
    assert!(
        !errors_of_card(&path).is_empty(),
        "`timeout: soon` is not a duration for the schema either"
    );
    assert!(switchyard::cards::Card::load(&path).is_err());
}

fn errors_of_card(path: &Path) -> Vec<String> {
    errors(&schema("card.schema.json"), &yaml(path))
}

#[test]
fn state_events_pass_the_published_schema() {
    let schema = schema("state-event.schema.json");
    let owned = StateEvent::owned("router-1", 1_700_000_000_000);
    let routed = StateEvent::new(
        "task-1",
        1,
        (7, "router-1"),
        Decision::Routed {
            steps: vec![Step::new(1, "sentiment_analyzer", 1)],
            decided_by: DecidedBy::Rule {
                rule_id: "start".into(),
            },
        },
        1_700_000_000_000,
    );
    for event in [owned, routed] {
        let value = serde_json::to_value(&event).unwrap();
        let errors = errors(&schema, &value);
        assert!(errors.is_empty(), "{value}: {errors:?}");
    }
}

//! The Python agent library's own tests (pytest, `sdk/python/tests`) against the real broker and
//! this build's `switchyard` binary: a Python agent completes its step in the example workflow,
//! a redelivered work item is handled once, SIGTERM finishes the item in hand, and an Avro work
//! item round-trips through the registry.

mod common;

#[test]
fn the_python_agent_library_passes_its_tests() {
    let kafka = common::kafka("python-sdk");
    let out = std::process::Command::new("python3")
        .args(["-m", "pytest", "-q", "sdk/python/tests"])
        .env("SWITCHYARD_BIN", env!("CARGO_BIN_EXE_switchyard"))
        .env("SWITCHYARD_TEST_BOOTSTRAP", &kafka.bootstrap_servers)
        .current_dir(common::root())
        .output()
        .expect("python3 runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !said.contains("No module named pytest"),
        "pytest is missing: run `scripts/install-python-deps`"
    );
    assert!(out.status.success(), "pytest failed:\n{said}");
    assert!(said.contains("4 passed"), "{said}");
}

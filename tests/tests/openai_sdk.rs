//! The OpenAI-SDK conformance suite (`tests/python/`): the official `openai` Python package
//! against two real `kiln serve` processes on the default model. `tests/python/run.sh` builds
//! the release binary, makes its venv, starts and always stops the servers; this test only runs
//! it, so `cargo test --workspace` covers the HTTP API end to end.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn openai_python_sdk_conformance() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/run.sh");
    let started = std::time::Instant::now();
    let status =
        Command::new("bash").arg(&script).status().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    eprintln!("tests/python/run.sh finished in {:.0} s", started.elapsed().as_secs_f64());
    assert!(status.success(), "the OpenAI SDK conformance suite failed ({status}); its output is above");
}

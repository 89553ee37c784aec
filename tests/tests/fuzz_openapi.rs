//! The API fuzz suite (`tests/fuzz/`, issue 14): at least 5,000 Schemathesis cases generated from
//! kiln's own `/openapi.json` against a real `kiln serve` (default model + embedding model), with
//! no 5xx, no answer slower than 30 s, OpenAI's error body on every 4xx and `/health` answering
//! throughout. `tests/fuzz/run.sh` builds the release binary, makes its venv, starts and always
//! stops the server; this test runs it so `cargo test --workspace` (and CI) fuzzes every route.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn openapi_driven_fuzz_of_every_route() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/run.sh");
    let started = std::time::Instant::now();
    let status =
        Command::new("bash").arg(&script).status().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    eprintln!("tests/fuzz/run.sh finished in {:.0} s", started.elapsed().as_secs_f64());
    assert!(status.success(), "the fuzz suite failed ({status}); its summary and failures are above");
}

//! `kiln serve` as a process under SIGTERM (issue 14 items 3 and 11): while draining, `/health`
//! answers a JSON 503 (connections are still accepted) and a request in flight finishes; half-sent
//! requests (head or body) do not hold the exit, which comes well within `--shutdown-timeout`.
//! Needs the default model (`scripts/fetch-models.sh`); its absence is a failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/models.rs"]
mod models;

fn model() -> PathBuf {
    let p = models::models_dir().join("smollm2-135m-instruct-q4_1.gguf");
    assert!(p.is_file(), "{} missing: run scripts/fetch-models.sh", p.display());
    p
}

/// Starts `kiln serve` on a free port and waits until it is ready; returns it and its address.
fn serve(shutdown_timeout: u64) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--port", "0", "--kv-cache-memory", "64M", "--shutdown-timeout"])
        .arg(shutdown_timeout.to_string())
        .arg("--model")
        .arg(model())
        .env_remove("KILN_API_KEY")
        .env_remove("KILN_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = lines.next().expect("a ready line").expect("utf-8");
    // kiln: serving http://127.0.0.1:PORT/v1 (model "...") ...
    let addr = line.split("http://").nth(1).and_then(|r| r.split('/').next()).expect("an address");
    (child, addr.parse().expect("host:port"))
}

/// One request on its own connection; returns (status, body).
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect (not refused)");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("a response");
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs").success();
    assert!(ok, "kill -TERM failed");
}

#[test]
fn drain_answers_health_503_finishes_in_flight_work_and_ignores_half_sent_requests() {
    let (mut child, addr) = serve(20);
    // Two clients stuck mid-request: half a head, and a head with half its body.
    let mut half_head = TcpStream::connect(addr).unwrap();
    half_head.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-le").unwrap();
    let mut half_body = TcpStream::connect(addr).unwrap();
    half_body
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"model\"")
        .unwrap();
    // A generation long enough to be in flight when the signal comes.
    let long = r#"{"model": "smollm2-135m-instruct-q4_1", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "temperature": 0}"#;
    let in_flight = std::thread::spawn(move || (request(addr, "POST", "/v1/completions", long), Instant::now()));
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    sigterm(&child);
    std::thread::sleep(Duration::from_millis(100));
    let (status, body) = request(addr, "GET", "/health", "");
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["error"]["type"], "service_unavailable_error", "{v}");
    let ((status, body), answered) = in_flight.join().unwrap();
    assert!(answered > signalled, "the generation ended before the signal: make it longer");
    assert_eq!(status, 200, "the in-flight request finished: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["usage"]["completion_tokens"], 400, "{v}");
    eprintln!("in-flight request answered {:?} after SIGTERM", answered - signalled);
    let exit = wait_exit(&mut child, Duration::from_secs(5)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("still running 5 s after the last request ended (half-sent requests held it)")
    });
    assert!(exit.success(), "{exit}");
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
    assert!(signalled.elapsed() < Duration::from_secs(20), "past the shutdown deadline");
}

#[test]
fn half_sent_request_does_not_delay_exit() {
    let (mut child, addr) = serve(20);
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nhost: loc").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    sigterm(&child);
    let exit = wait_exit(&mut child, Duration::from_secs(5)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("a half-sent request held the exit past 5 s (deadline 20 s)")
    });
    assert!(exit.success(), "{exit}");
    eprintln!("exited {:?} after SIGTERM with a half-sent request open", t.elapsed());
}

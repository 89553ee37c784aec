//! Issue 14's socket-level reproducers against kiln's own listener (`kiln_server::http::serve` on
//! a free 127.0.0.1 port, raw `TcpStream`s): requests hyper rejects before the app get OpenAI
//! JSON bodies; slow, idle and half-sent connections are closed by the header timeout while a
//! normal request is answered at once; the connection cap answers JSON 503; a declared oversize
//! body is refused before it is sent; a stalled body gets 408; while draining, new connections
//! are still accepted and `/health` says 503. No model is loaded: none of this reaches one.

use kiln_server::api::{router, AppState};
use kiln_server::http::{serve, HttpLimits};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The listener on its own two-worker runtime; the tests are plain blocking clients.
struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    drain: watch::Sender<bool>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn start(limits: HttpLimits) -> Server {
    start_with(limits, AppState::new("m".into(), vec![], "fp".into()))
}

fn start_with(limits: HttpLimits, state: AppState) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let state = Arc::new(state.with_body_timeout(Duration::from_secs(1)));
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (drain, rx) = watch::channel(false);
    rt.spawn(serve(listener, router(state.clone()), limits, rx));
    Server { addr, state, drain, rt: Some(rt) }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    s
}

fn limits(header_timeout_ms: u64, max_connections: usize) -> HttpLimits {
    HttpLimits { header_timeout: Duration::from_millis(header_timeout_ms), max_connections }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    /// OpenAI's error shape; returns the inner object.
    fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}\n{}", self.head, self.body);
        assert!(self.head.to_ascii_lowercase().contains("content-type: application/json"), "{}", self.head);
        let v: Value = serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body));
        let e = v["error"].clone();
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error without '{k}': {e}");
        }
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        e
    }
}

/// Reads one response (head, then `content-length` bytes) from `s`.
fn read_reply(s: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                return Reply { status, head, body };
            }
        }
        match s.read(&mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {}
            other => panic!("no complete response ({other:?}): {:?}", String::from_utf8_lossy(&buf)),
        }
    }
}

fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut s = connect(addr);
    s.write_all(raw).unwrap();
    read_reply(&mut s)
}

/// Whether the server closed `s` within `within` (EOF or reset).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return false;
                }
            }
            Err(_) => return true,
            Ok(_) => {}
        }
    }
}

#[test]
fn requests_hyper_rejects_get_openai_json_bodies() {
    let srv = start(limits(5000, 64));
    let many_headers: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("bad request line", b"GARBAGE\r\n\r\n".to_vec(), 400),
        ("control byte in a header", b"GET /health HTTP/1.1\r\nhost: a\r\nx-bad: a\x01b\r\n\r\n".to_vec(), 400),
        ("101 headers", format!("GET /health HTTP/1.1\r\nhost: a\r\n{many_headers}\r\n").into_bytes(), 431),
        ("100 KB URL", format!("GET /{} HTTP/1.1\r\nhost: a\r\n\r\n", "a".repeat(100 * 1024)).into_bytes(), 414),
        (
            "duplicate Content-Length",
            b"POST /tokenize HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello".to_vec(),
            400,
        ),
    ];
    for (what, raw, status) in cases {
        let e = exchange(srv.addr, &raw).error(status);
        assert_eq!(e["type"], "invalid_request_error", "{what}: {e}");
    }
}

#[test]
fn slow_idle_and_half_sent_connections_close_while_others_are_served() {
    let srv = start(limits(1000, 1024));
    let mut conns = Vec::new();
    for i in 0..300 {
        let mut s = connect(srv.addr);
        match i % 3 {
            // Slowloris: half a head, then silence.
            0 => s.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nx-slow: ").unwrap(),
            // A kept-alive connection left idle after one answered request.
            1 => {
                s.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
                assert_eq!(read_reply(&mut s).status, 503);
            }
            // Connected, never a byte.
            _ => {}
        }
        conns.push(s);
    }
    let t = Instant::now();
    let r = exchange(srv.addr, b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(1), "a normal request took {:?}", t.elapsed());
    for (i, s) in conns.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(3)), "connection {i} (kind {}) still open", i % 3);
    }
}

#[test]
fn connections_over_the_cap_get_a_json_503() {
    let srv = start(limits(10_000, 3));
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(connect(srv.addr));
    }
    std::thread::sleep(Duration::from_millis(100));
    let e = exchange(srv.addr, b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n").error(503);
    assert_eq!(e["code"], "too_many_connections");
    drop(idle.pop());
    // The freed slot is reused once the server notices the close.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = exchange(srv.addr, b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed: {} {}", r.status, r.body);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn oversize_declared_body_is_413_before_it_is_sent_and_a_stalled_body_is_408() {
    let srv = start(limits(5000, 64));
    let t = Instant::now();
    let head = b"POST /tokenize HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n";
    exchange(srv.addr, head).error(413);
    assert!(t.elapsed() < Duration::from_secs(1), "413 took {:?}", t.elapsed());
    let t = Instant::now();
    let partial = b"POST /tokenize HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\"";
    assert_eq!(exchange(srv.addr, partial).error(408)["code"], "request_timeout");
    assert!(t.elapsed() < Duration::from_secs(3), "408 took {:?}", t.elapsed());
}

#[test]
fn while_draining_health_is_503_and_idle_connections_close() {
    let srv = start(limits(10_000, 64));
    let mut idle = connect(srv.addr);
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    assert_eq!(read_reply(&mut idle).status, 200);
    srv.state.begin_shutdown();
    srv.drain.send(true).unwrap();
    assert!(closed_within(&mut idle, Duration::from_secs(2)), "an idle keep-alive survived the drain");
    let r = exchange(srv.addr, b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n");
    assert!(r.error(503)["message"].as_str().unwrap().contains("shutting down"));
}

#[test]
fn the_audit_log_names_the_remote_address() {
    let path = std::env::temp_dir().join(format!("kiln-audit-socket-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let log = kiln_server::api::audit::AuditLog::open(path.to_str().unwrap()).unwrap();
    let state = AppState::new("m".into(), vec!["k".into()], "fp".into()).with_audit_log(log);
    let server = start_with(limits(5_000, 16), state);
    let mut s = connect(server.addr);
    let local = s.local_addr().unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer nope\r\n\r\n").unwrap();
    assert_eq!(read_reply(&mut s).error(401)["type"], "authentication_error");
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(l) = text.lines().next() {
            break serde_json::from_str::<Value>(l).expect("a JSON line");
        }
        assert!(Instant::now() < deadline, "no audit line");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(line["event"], "auth_failure");
    assert_eq!(line["remote_addr"], local.to_string());
    let _ = std::fs::remove_file(&path);
}

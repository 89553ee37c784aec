//! Unit tests of the registry and `invoke`: every way a tool can misbehave ends as a result.

use super::*;
use futures_util::FutureExt;
use serde_json::json;

/// A tool whose behaviour the test picks.
struct Fake {
    def: ToolDef,
    behave: fn(Value) -> BoxFuture<'static, Result<String, ToolError>>,
}

fn fake(name: &str, behave: fn(Value) -> BoxFuture<'static, Result<String, ToolError>>) -> Arc<dyn Tool> {
    let def = ToolDef { name: name.into(), description: String::new(), parameters: json!({"type": "object"}) };
    Arc::new(Fake { def, behave })
}

impl Tool for Fake {
    fn def(&self) -> &ToolDef {
        &self.def
    }
    fn call(&self, args: Value) -> BoxFuture<'static, Result<String, ToolError>> {
        (self.behave)(args)
    }
}

fn limits(ms: u64, max: usize) -> CallLimits {
    CallLimits { timeout: Duration::from_millis(ms), max_result_bytes: max }
}

#[test]
fn names() {
    for ok in ["a", "get_time", "get-sum", "A9", &"x".repeat(64)] {
        assert!(is_valid_tool_name(ok), "{ok}");
    }
    for bad in ["", "a b", "a.b", "é", "a/b", &"x".repeat(65)] {
        assert!(!is_valid_tool_name(bad), "{bad}");
    }
}

#[test]
fn registry_refuses_duplicates_and_bad_names() {
    let mut reg = ToolRegistry::with_builtins();
    assert_eq!(reg.names(), ["current_time", "calculator"]);
    let err = reg.insert(fake("calculator", |_| async { Ok(String::new()) }.boxed())).unwrap_err();
    assert!(matches!(err, ToolError::Duplicate(ref n) if n == "calculator"), "{err}");
    let err = reg.insert(fake("no spaces", |_| async { Ok(String::new()) }.boxed())).unwrap_err();
    assert!(matches!(err, ToolError::InvalidName(_)), "{err}");
    reg.insert(fake("extra", |_| async { Ok(String::new()) }.boxed())).unwrap();
    assert_eq!(reg.len(), 3);
    assert_eq!(reg.defs()[2].name, "extra");
    assert!(reg.get("extra").is_some() && reg.get("nope").is_none());
}

#[tokio::test]
async fn ok_error_panic_timeout() {
    let ok = fake("ok", |args| async move { Ok(format!("got {args}")) }.boxed());
    let out = invoke(&ok, json!({"x": 1}), &limits(1000, 100)).await;
    assert_eq!((out.content.as_str(), out.is_error, out.truncated), ("got {\"x\":1}", false, false));

    let failing = fake("failing", |_| async { Err(ToolError::Failed("no such city".into())) }.boxed());
    let out = invoke(&failing, json!({}), &limits(1000, 100)).await;
    assert!(out.is_error);
    assert_eq!(out.content, "tool failing failed: no such city");

    let panicking = fake("panicking", |_| async { panic!("index out of bounds") }.boxed());
    let out = invoke(&panicking, json!({}), &limits(1000, 100)).await;
    assert!(out.is_error);
    assert_eq!(out.content, "tool panicking crashed: index out of bounds");

    let hanging = fake("hanging", |_| {
        async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(String::new())
        }
        .boxed()
    });
    let out = invoke(&hanging, json!({}), &limits(200, 100)).await;
    assert!(out.is_error);
    assert_eq!(out.content, "tool hanging timed out after 200 ms");
    assert!(out.elapsed >= Duration::from_millis(200) && out.elapsed < Duration::from_secs(5));
}

/// A tool that panics in `call` itself, before any future exists.
struct PanicsEarly(ToolDef);

impl Tool for PanicsEarly {
    fn def(&self) -> &ToolDef {
        &self.0
    }
    fn call(&self, _: Value) -> BoxFuture<'static, Result<String, ToolError>> {
        panic!("bad arguments {}", 42)
    }
}

#[tokio::test]
async fn a_panic_before_the_future_is_caught_too() {
    let def = ToolDef { name: "early".into(), description: String::new(), parameters: json!({}) };
    let tool: Arc<dyn Tool> = Arc::new(PanicsEarly(def));
    let out = invoke(&tool, json!({}), &limits(1000, 100)).await;
    assert_eq!((out.content.as_str(), out.is_error), ("tool early crashed: bad arguments 42", true));
}

#[tokio::test]
async fn a_dropped_invoke_aborts_the_call() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static FINISHED: AtomicBool = AtomicBool::new(false);
    let slow = fake("slow", |_| {
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            FINISHED.store(true, Ordering::SeqCst);
            Ok(String::new())
        }
        .boxed()
    });
    let dropped = tokio::time::timeout(Duration::from_millis(50), invoke(&slow, json!({}), &limits(5000, 100))).await;
    assert!(dropped.is_err());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!FINISHED.load(Ordering::SeqCst), "the call kept running after invoke was dropped");
}

#[tokio::test]
async fn timeout_text_in_seconds() {
    assert_eq!(human_duration(Duration::from_secs(30)), "30 s");
    assert_eq!(human_duration(Duration::from_millis(1500)), "1.5 s");
    let hanging = fake("slow", |_| futures_util::future::pending().boxed());
    let out = invoke(&hanging, json!({}), &limits(1000, 100)).await;
    assert_eq!(out.content, "tool slow timed out after 1 s");
}

#[tokio::test]
async fn big_results_are_cut_at_a_char_boundary() {
    // "é" is 2 bytes: a cut at an odd byte count must step back, never split it.
    let big = fake("big", |_| async { Ok("é".repeat(100)) }.boxed());
    let out = invoke(&big, json!({}), &limits(1000, 51)).await;
    assert!(out.truncated && !out.is_error);
    let (head, note) = out.content.split_once('\n').unwrap();
    assert_eq!(head, "é".repeat(25));
    assert_eq!(note, "[result truncated: 150 of 200 bytes cut]");

    let (same, cut) = truncate_result("short".into(), 5);
    assert_eq!((same.as_str(), cut), ("short", false));
    let (empty, cut) = truncate_result("€".into(), 0);
    assert!(cut && empty.starts_with("\n[result truncated: 3 of 3"));
}

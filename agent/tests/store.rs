//! Integration tests of the run store on real databases: every test runs on SQLite (a file in a
//! temp dir) and on Postgres when `KILN_TEST_DATABASE_URL` is set (`scripts/test.sh` starts a
//! throwaway cluster and sets it; without it the Postgres half prints `SKIP:` and returns).
//! Each Postgres test gets its own schema, so parallel tests never see each other's runs.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use kiln_agent::store::{now_ms, RunRecord, RunStatus, RunStore, StepKind, StoreError};
use serde_json::{json, Value};
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

const PG_ENV: &str = "KILN_TEST_DATABASE_URL";

/// A fresh, empty database: a SQLite file in a temp dir, or a new schema in the test Postgres.
struct Db {
    url: String,
    _dir: Option<tempfile::TempDir>,
    /// Postgres: the admin pool and the schema to drop when the test is done.
    schema: Option<(AnyPool, String)>,
}

impl Db {
    fn sqlite() -> Result<Db> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("runs.db").display());
        Ok(Db { url, _dir: Some(dir), schema: None })
    }

    /// None (after printing `SKIP:`) when no test Postgres is configured.
    async fn postgres(test: &str) -> Result<Option<Db>> {
        let Ok(base) = std::env::var(PG_ENV) else {
            eprintln!("SKIP: {test} on postgres: {PG_ENV} is not set (scripts/postgres.sh starts one)");
            return Ok(None);
        };
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        sqlx::any::install_default_drivers();
        let admin = AnyPoolOptions::new().max_connections(1).connect(&base).await?;
        sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await?;
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options[search_path]={schema}");
        Ok(Some(Db { url, _dir: None, schema: Some((admin, schema)) }))
    }

    /// Both databases this run can test against.
    async fn all(test: &str) -> Result<Vec<Db>> {
        let mut dbs = vec![Db::sqlite()?];
        dbs.extend(Db::postgres(test).await?);
        Ok(dbs)
    }

    async fn cleanup(self) -> Result<()> {
        if let Some((admin, schema)) = self.schema {
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&admin).await?;
        }
        Ok(())
    }
}

/// Runs `body` on a fresh SQLite store, then on a fresh Postgres schema if one is configured. The
/// body also gets the URL, to open more handles (as other kiln processes would).
async fn on_both<F, Fut>(test: &str, body: F) -> Result<()>
where
    F: Fn(RunStore, String) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    for db in Db::all(test).await? {
        let store = RunStore::open(&db.url).await?;
        body(store.clone(), db.url.clone()).await?;
        store.close().await;
        db.cleanup().await?;
    }
    Ok(())
}

fn run(id: &str, agent: &str, status: RunStatus) -> RunRecord {
    let input = json!({"messages": [{"role": "user", "content": "hi"}]});
    RunRecord { id: id.to_string(), status, ..RunRecord::new(agent, input) }
}

#[tokio::test]
async fn agents_put_get_list_delete() -> Result<()> {
    on_both("agents_put_get_list_delete", |s, _| async move {
        assert_eq!(s.get_agent("a").await?, None);
        s.put_agent("b", &json!({"name": "b", "model": "m"})).await?;
        s.put_agent("a", &json!({"name": "a", "model": "m"})).await?;
        s.put_agent("a", &json!({"name": "a", "model": "m2"})).await?; // upsert
        assert_eq!(s.get_agent("a").await?, Some(json!({"name": "a", "model": "m2"})));
        let names: Vec<Value> = s.list_agents().await?.into_iter().map(|v| v["name"].clone()).collect();
        assert_eq!(names, vec![json!("a"), json!("b")]);
        assert!(s.delete_agent("a").await?);
        assert!(!s.delete_agent("a").await?);
        assert_eq!(s.get_agent("a").await?, None);
        assert_eq!(s.list_agents().await?.len(), 1);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn responses_put_get_delete() -> Result<()> {
    on_both("responses_put_get_delete", |s, _| async move {
        let body = json!({"id": "resp_1", "output": [{"type": "message", "content": "é \" ' \\ 🦀"}]});
        s.put_response("resp_1", &body).await?;
        assert_eq!(s.get_response("resp_1").await?, Some(body));
        s.put_response("resp_1", &json!({"id": "resp_1", "v": 2})).await?;
        assert_eq!(s.get_response("resp_1").await?.unwrap()["v"], 2);
        assert!(s.delete_response("resp_1").await?);
        assert!(!s.delete_response("resp_1").await?);
        assert_eq!(s.get_response("resp_1").await?, None);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn responses_prune_by_age() -> Result<()> {
    on_both("responses_prune_by_age", |s, _| async move {
        s.put_response("resp_old", &json!({"id": "resp_old"})).await?;
        let cut = kiln_agent::store::now_ms() + 1;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        s.put_response("resp_new", &json!({"id": "resp_new"})).await?;
        assert_eq!(s.prune_responses(cut).await?, 1);
        assert_eq!(s.get_response("resp_old").await?, None);
        assert!(s.get_response("resp_new").await?.is_some());
        assert_eq!(s.prune_responses(cut).await?, 0);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn runs_create_get_list() -> Result<()> {
    on_both("runs_create_get_list", |s, _| async move {
        let mut r1 = run("r1", "a", RunStatus::Queued);
        r1.created_at -= 10;
        r1.lease_owner = Some("w".into());
        r1.lease_until = Some(123);
        r1.error = Some("e".into());
        r1.output = Some(json!({"x": 1}));
        s.create_run(&r1).await?;
        s.create_run(&run("r2", "b", RunStatus::Queued)).await?;
        s.create_run(&run("r3", "a", RunStatus::InProgress)).await?;
        assert_eq!(s.get_run("r1").await?, Some(r1.clone()));
        assert_eq!(s.get_run("nope").await?, None);
        assert!(matches!(s.create_run(&r1).await, Err(StoreError::Conflict(_))));

        let ids = |v: Vec<RunRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(s.list_runs(Some("a"), 10).await?), vec!["r3", "r1"]);
        assert_eq!(ids(s.list_runs(None, 10).await?).len(), 3);
        assert_eq!(ids(s.list_runs(None, 2).await?).len(), 2);
        assert!(s.list_runs(Some("zzz"), 10).await?.is_empty());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn set_status_keeps_replaces_and_freezes_terminal_runs() -> Result<()> {
    on_both("set_status", |s, _| async move {
        s.create_run(&run("r", "a", RunStatus::Queued)).await?;
        s.set_status("r", RunStatus::InProgress, None, Some(json!({"tokens": 3})), None).await?;
        let got = s.get_run("r").await?.unwrap();
        assert_eq!((got.status, got.usage, got.output), (RunStatus::InProgress, json!({"tokens": 3}), None));
        s.set_status("r", RunStatus::Completed, Some(json!("done")), None, None).await?;
        let got = s.get_run("r").await?.unwrap();
        assert_eq!(
            (got.status, got.usage, got.output),
            (RunStatus::Completed, json!({"tokens": 3}), Some(json!("done")))
        );
        let again = s.set_status("r", RunStatus::Failed, None, None, Some("late".into())).await;
        assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
        assert_eq!(s.get_run("r").await?.unwrap().error, None);
        let missing = s.set_status("nope", RunStatus::Failed, None, None, None).await;
        assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn steps_append_in_order_and_idempotently() -> Result<()> {
    on_both("steps", |s, _| async move {
        s.create_run(&run("r", "a", RunStatus::InProgress)).await?;
        s.create_run(&run("other", "a", RunStatus::InProgress)).await?;
        assert_eq!(s.append_step("r", StepKind::ModelOutput, &json!({"text": "hi"}), None).await?, 0);
        let call = json!({"name": "search", "arguments": {"q": "x"}});
        assert_eq!(s.append_step("r", StepKind::ToolCall, &call, Some("call_1")).await?, 1);
        assert_eq!(s.append_step("r", StepKind::ToolResult, &json!("found"), Some("result_1")).await?, 2);
        // A retried append with the same key and content returns the recorded seq.
        assert_eq!(s.append_step("r", StepKind::ToolResult, &json!("found"), Some("result_1")).await?, 2);
        let clash = s.append_step("r", StepKind::ToolResult, &json!("other"), Some("result_1")).await;
        assert!(matches!(clash, Err(StoreError::Conflict(_))), "{clash:?}");
        // Keys and seqs are per run.
        assert_eq!(s.append_step("other", StepKind::ToolResult, &json!(1), Some("result_1")).await?, 0);
        let missing = s.append_step("nope", StepKind::Status, &json!({}), None).await;
        assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");

        let steps = s.steps("r").await?;
        assert_eq!(steps.iter().map(|st| st.seq).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(steps[1].kind, StepKind::ToolCall);
        assert_eq!(steps[1].data, call);
        assert_eq!(steps[1].idempotency_key.as_deref(), Some("call_1"));
        let found = s.step_by_key("r", "result_1").await?.unwrap();
        assert_eq!((found.seq, found.kind, found.data), (2, StepKind::ToolResult, json!("found")));
        assert_eq!(s.step_by_key("r", "nope").await?, None);
        assert!(s.steps("nope").await?.is_empty());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_distinct_contiguous_seqs() -> Result<()> {
    on_both("concurrent_appends", |s, _| async move {
        s.create_run(&run("r", "a", RunStatus::InProgress)).await?;
        let mut tasks = Vec::new();
        for t in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..10 {
                    let key = format!("{t}-{i}");
                    seqs.push(s.append_step("r", StepKind::Status, &json!({"t": t, "i": i}), Some(&key)).await?);
                }
                Ok::<_, StoreError>(seqs)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        all.sort();
        assert_eq!(all, (0..80).collect::<Vec<i64>>());
        assert_eq!(s.steps("r").await?.len(), 80);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn leases_acquire_renew_release_expire() -> Result<()> {
    on_both("leases", |s, _| async move {
        let ttl = Duration::from_secs(60);
        s.create_run(&run("r", "a", RunStatus::InProgress)).await?;
        assert!(s.try_acquire("r", "p1", ttl).await?);
        assert!(s.try_acquire("r", "p1", ttl).await?, "the owner may re-acquire");
        assert!(!s.try_acquire("r", "p2", ttl).await?, "a live lease is not taken");
        assert!(s.renew("r", "p1", ttl).await?);
        assert!(!s.renew("r", "p2", ttl).await?);
        let got = s.get_run("r").await?.unwrap();
        assert_eq!(got.lease_owner.as_deref(), Some("p1"));
        assert!(got.lease_until.unwrap() >= now_ms() + 59_000);

        s.release("r", "p2").await?; // not the owner: no effect
        assert_eq!(s.get_run("r").await?.unwrap().lease_owner.as_deref(), Some("p1"));
        s.release("r", "p1").await?;
        assert_eq!(s.get_run("r").await?.unwrap().lease_owner, None);
        assert!(s.try_acquire("r", "p2", Duration::ZERO).await?);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(s.try_acquire("r", "p1", ttl).await?, "an expired lease is taken");
        assert!(!s.renew("r", "p2", ttl).await?, "the old owner learns it lost the lease");

        assert!(matches!(s.try_acquire("nope", "p1", ttl).await, Err(StoreError::NotFound(_))));
        assert!(matches!(s.renew("nope", "p1", ttl).await, Err(StoreError::NotFound(_))));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn claim_orphans_takes_only_orphans() -> Result<()> {
    on_both("claim_orphans", |s, _| async move {
        let ttl = Duration::from_secs(60);
        let cases = [
            ("queued_free", RunStatus::Queued, None, true),
            ("progress_free", RunStatus::InProgress, None, true),
            ("action_free", RunStatus::RequiresAction, None, false),
            ("done_free", RunStatus::Completed, None, false),
            ("progress_live", RunStatus::InProgress, Some(now_ms() + 60_000), false),
            ("progress_expired", RunStatus::InProgress, Some(now_ms() - 1), true),
            ("action_expired", RunStatus::RequiresAction, Some(now_ms() - 1), true),
            ("failed_expired", RunStatus::Failed, Some(now_ms() - 1), false),
        ];
        let mut want = HashSet::new();
        for (i, (id, status, until, orphan)) in cases.into_iter().enumerate() {
            let mut r = run(id, "a", status);
            r.created_at += i as i64;
            r.lease_owner = until.map(|_| "dead".to_string());
            r.lease_until = until;
            s.create_run(&r).await?;
            if orphan {
                want.insert(id.to_string());
            }
        }
        let first = s.claim_orphans("p1", ttl, 2).await?;
        assert_eq!(first, vec!["queued_free", "progress_free"], "oldest first, at most limit");
        let rest: HashSet<String> = s.claim_orphans("p1", ttl, 100).await?.into_iter().collect();
        let got: HashSet<String> = first.into_iter().chain(rest).collect();
        assert_eq!(got, want);
        assert!(s.claim_orphans("p2", ttl, 100).await?.is_empty(), "claimed runs hold live leases");
        assert_eq!(s.get_run("action_expired").await?.unwrap().lease_owner.as_deref(), Some("p1"));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_claimers_never_share_a_run() -> Result<()> {
    on_both("claim_race", |s, url| async move {
        let n = 60;
        for i in 0..n {
            s.create_run(&run(&format!("r{i:03}"), "a", RunStatus::Queued)).await?;
        }
        let mut tasks = Vec::new();
        for owner in ["p1", "p2", "p3", "p4"] {
            // Each owner has its own pool, as separate kiln processes would.
            let s = RunStore::open(&url).await?;
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = s.claim_orphans(owner, Duration::from_secs(60), 3).await?;
                    if got.is_empty() {
                        return Ok::<_, StoreError>((owner, mine));
                    }
                    mine.extend(got);
                }
            }));
        }
        let mut seen = HashSet::new();
        for t in tasks {
            let (owner, mine) = t.await??;
            for id in mine {
                assert!(seen.insert(id.clone()), "{id} claimed twice");
                assert_eq!(s.get_run(&id).await?.unwrap().lease_owner.as_deref(), Some(owner));
            }
        }
        assert_eq!(seen.len(), n);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn reopening_is_idempotent_and_keeps_everything() -> Result<()> {
    on_both("reopen", |s, _| async move {
        s.create_run(&run("r", "a", RunStatus::Queued)).await?;
        s.append_step("r", StepKind::Status, &json!({"s": 1}), Some("k")).await?;
        Ok(())
    })
    .await?;

    // SQLite: a file (in a directory that does not exist yet) survives close and reopen.
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("sub/dir/kiln.db").display());
    let s = RunStore::open(&url).await?;
    s.put_agent("a", &json!({"name": "a"})).await?;
    s.create_run(&run("r", "a", RunStatus::InProgress)).await?;
    s.append_step("r", StepKind::ToolResult, &json!("out"), Some("k")).await?;
    s.put_response("resp", &json!({"id": "resp"})).await?;
    assert!(s.try_acquire("r", "p1", Duration::from_secs(60)).await?);
    let before = s.get_run("r").await?;
    s.close().await;
    drop(s);

    let s = RunStore::open(&url).await?;
    assert_eq!(s.get_agent("a").await?, Some(json!({"name": "a"})));
    assert_eq!(s.get_run("r").await?, before);
    assert_eq!(s.step_by_key("r", "k").await?.unwrap().data, json!("out"));
    assert_eq!(s.get_response("resp").await?, Some(json!({"id": "resp"})));
    assert_eq!(s.append_step("r", StepKind::Status, &json!({}), None).await?, 1);
    // WAL mode is a property of the file.
    let wal = dir.path().join("sub/dir/kiln.db-wal");
    assert!(wal.exists(), "expected a WAL file at {}", wal.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_opens_of_a_fresh_database_migrate_once() -> Result<()> {
    for db in Db::all("concurrent_opens").await? {
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = db.url.clone();
                tokio::spawn(async move { RunStore::open(&url).await })
            })
            .collect();
        let mut stores = Vec::new();
        for o in opens {
            stores.push(o.await??);
        }
        stores[0].create_run(&run("r", "a", RunStatus::Queued)).await?;
        assert!(stores[3].get_run("r").await?.is_some());
        for s in &stores {
            s.close().await;
        }
        db.cleanup().await?;
    }
    Ok(())
}

/// A database at an older schema (as a previous kiln left it), opened by several processes at
/// once: each waits its turn and finds the newer migrations applied by the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_opens_of_an_older_database_migrate_once() -> Result<()> {
    for db in Db::all("concurrent_upgrades").await? {
        RunStore::open(&db.url).await?.close().await;
        let pool = sqlx::AnyPool::connect(&db.url).await?;
        sqlx::query("DELETE FROM kiln_migrations WHERE version > 1").execute(&pool).await?;
        sqlx::query("DROP INDEX kiln_responses_created").execute(&pool).await?;
        pool.close().await;
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = db.url.clone();
                tokio::spawn(async move { RunStore::open(&url).await })
            })
            .collect();
        for o in opens {
            o.await??.close().await;
        }
        db.cleanup().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_is_shared_by_clones() -> Result<()> {
    let s = RunStore::open("sqlite::memory:").await?;
    let c = s.clone();
    s.create_run(&run("r", "a", RunStatus::Queued)).await?;
    let t = tokio::spawn(async move { c.append_step("r", StepKind::Status, &json!({}), None).await });
    assert_eq!(t.await??, 0);
    assert_eq!(s.steps("r").await?.len(), 1);
    // Another memory store is another database.
    assert_eq!(RunStore::open("sqlite::memory:").await?.get_run("r").await?, None);
    Ok(())
}

#[tokio::test]
async fn bad_urls_are_backend_errors() {
    assert!(matches!(RunStore::open("mysql://x").await, Err(StoreError::Backend(_))));
    assert!(matches!(RunStore::open("postgres://127.0.0.1:1/none").await, Err(StoreError::Backend(_))));
}

#[test]
fn new_runs_are_queued_with_fresh_ids() {
    let (a, b) = (RunRecord::new("agent", json!(1)), RunRecord::new("agent", json!(1)));
    assert!(a.id.starts_with("run_") && a.id != b.id);
    assert_eq!((a.status, a.usage, a.output, a.lease_owner), (RunStatus::Queued, json!({}), None, None));
    assert!(a.created_at > 0 && a.created_at == a.updated_at);
}

#[test]
fn statuses_and_kinds_are_snake_case() {
    assert_eq!(serde_json::to_value(RunStatus::RequiresAction).unwrap(), json!("requires_action"));
    assert_eq!(serde_json::to_value(StepKind::ToolResult).unwrap(), json!("tool_result"));
    let terminal: Vec<_> = RunStatus::ALL.into_iter().filter(|s| s.is_terminal()).collect();
    assert_eq!(terminal, vec![RunStatus::Completed, RunStatus::Incomplete, RunStatus::Failed, RunStatus::Cancelled]);
    for st in RunStatus::ALL {
        assert_eq!(serde_json::to_value(st).unwrap(), json!(st.as_str()));
        assert_eq!(st.as_str().parse::<RunStatus>().unwrap(), st);
    }
    for k in StepKind::ALL {
        assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
    }
}

#[tokio::test]
async fn files_and_vector_stores_keep_bytes_and_page_by_id() -> Result<()> {
    use kiln_agent::store::{FileRecord, Page, VectorStoreRow, VsFileRow};
    on_both("files_and_vector_stores", |s, _| async move {
        // Every byte value, NUL included: Postgres BYTEA and a SQLite blob keep them all.
        let bytes: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
        for (i, id) in ["file-a", "file-b", "file-c"].iter().enumerate() {
            let f = FileRecord {
                id: id.to_string(),
                filename: format!("{i}.bin"),
                purpose: if i == 1 { "batch" } else { "assistants" }.into(),
                bytes: bytes.len() as i64,
                created_at: i as i64,
            };
            s.put_file(&f, &bytes).await?;
        }
        assert_eq!(s.file_content("file-b").await?.unwrap(), bytes);
        assert_eq!(s.get_file("file-c").await?.unwrap().filename, "2.bin");
        let page = |after: Option<&str>, desc| Page { limit: 2, after: after.map(str::to_string), before: None, desc };
        let ids = |v: Vec<FileRecord>| v.into_iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(ids(s.list_files(&page(None, true), None).await?), ["file-c", "file-b"]);
        assert_eq!(ids(s.list_files(&page(Some("file-a"), false), None).await?), ["file-b", "file-c"]);
        assert_eq!(ids(s.list_files(&page(None, false), Some("assistants")).await?), ["file-a", "file-c"]);
        let vs = VectorStoreRow { id: "vs_1".into(), body: json!({"name": "n"}), created_at: 1 };
        s.put_vector_store(&vs).await?;
        s.put_vector_store(&VectorStoreRow { body: json!({"name": "m"}), ..vs.clone() }).await?;
        assert_eq!(s.get_vector_store("vs_1").await?.unwrap().body["name"], "m");
        for f in ["file-a", "file-c"] {
            let row = VsFileRow {
                vector_store_id: "vs_1".into(),
                file_id: f.into(),
                body: json!({"status": "completed"}),
                chunk_ids: vec![format!("{f}-0"), format!("{f}-1")],
                created_at: 2,
            };
            s.put_vs_file(&row).await?;
            assert_eq!(s.get_vs_file("vs_1", f).await?.unwrap(), row);
        }
        assert_eq!(s.list_vs_files("vs_1", &page(Some("file-a"), false)).await?.len(), 1);
        assert_eq!(s.attachments_of("file-c").await?.len(), 1);
        assert!(s.delete_vs_file("vs_1", "file-c").await? && !s.delete_vs_file("vs_1", "file-c").await?);
        assert!(s.delete_vector_store("vs_1").await?);
        assert!(s.all_vs_files("vs_1").await?.is_empty() && s.get_vector_store("vs_1").await?.is_none());
        assert!(s.delete_file("file-a").await? && s.get_file("file-a").await?.is_none());
        Ok(())
    })
    .await
}

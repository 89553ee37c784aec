//! A test gRPC server over qdrant-edge: Qdrant's own gRPC services (`Collections`, `Points`, the
//! `Qdrant` health check, as `qdrant-client` 1.20 generates them from Qdrant's `.proto` files)
//! served from qdrant-edge shards, one shard per collection, in a temporary directory. It is *not*
//! Qdrant: no cluster, no REST, no snapshots, only the RPCs and request fields kiln's remote memory
//! backend sends; every other RPC answers `Unimplemented` and every request field it does not
//! honour answers `InvalidArgument`, so nothing is silently ignored. It exists because no Qdrant
//! server can be installed where kiln's tests run: with it those tests speak the real protocol to
//! Qdrant's real engine. Writes must say `wait=true` (the only mode it has: each write is applied
//! and flushed to disk before the answer), so a client that forgets it fails its tests.
//!
//! Owns: the listener, the collections and the protobuf -> qdrant-edge translation. Must not:
//! be used by the product crates (it is a dev-dependency and a test binary only).

/// RPCs the server does not serve: each answers `Unimplemented` naming itself. Written in the
/// shape `#[async_trait]` gives trait methods, because the attribute runs before this expands.
macro_rules! unimplemented_rpcs {
    ($($name:ident($req:ident) -> $resp:ident;)*) => {$(
        fn $name<'life0, 'async_trait>(
            &'life0 self,
            _request: tonic::Request<qdrant_client::qdrant::$req>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<
            Output = Result<tonic::Response<qdrant_client::qdrant::$resp>, tonic::Status>,
        > + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async {
                Err(tonic::Status::unimplemented(concat!(
                    "the test gRPC server over qdrant-edge does not serve `", stringify!($name), "`"
                )))
            })
        }
    )*};
}

mod collections;
mod convert;
mod points;

use anyhow::{Context, Result};
use qdrant_client::qdrant::collections_server::CollectionsServer;
use qdrant_client::qdrant::points_server::PointsServer;
use qdrant_client::qdrant::qdrant_server::QdrantServer;
use qdrant_edge::EdgeShard;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tokio::net::TcpListener;
use tonic::Status;

/// What the server calls itself in health checks and logs.
pub const TITLE: &str = "kiln test gRPC server over qdrant-edge (not Qdrant)";

/// Requests up to this size are accepted (tonic's default is 4 MiB, Qdrant's own server allows
/// far more; kiln's backend sends at most a few MiB per request).
const MAX_MESSAGE: usize = 64 << 20;

/// One collection: a qdrant-edge shard. A write holds the lock alone, because
/// `EdgeShard::flush` panics if anyone else holds the shard's internals.
pub(crate) struct Collection {
    pub shard: RwLock<EdgeShard>,
}

#[derive(Default)]
pub(crate) struct State {
    pub dir: PathBuf,
    pub collections: RwLock<HashMap<String, Arc<Collection>>>,
}

impl State {
    pub fn collection(&self, name: &str) -> Result<Arc<Collection>, Status> {
        let map = self.collections.read().map_err(|_| Status::internal("collections lock poisoned"))?;
        map.get(name).cloned().ok_or_else(|| Status::not_found(format!("Collection `{name}` doesn't exist!")))
    }
}

/// Runs blocking shard work off the async workers; an engine error is an `Internal` status.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("shard task failed: {e}")))?
}

/// Serves the three services on `listener` from collections under `dir` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    dir: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let state = Arc::new(State { dir, collections: RwLock::default() });
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tonic::transport::Server::builder()
        .add_service(QdrantServer::new(collections::Health))
        .add_service(
            CollectionsServer::new(collections::Service(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            PointsServer::new(points::Service(state))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("test gRPC server over qdrant-edge")
}

/// A server on 127.0.0.1 in a thread of its own (its own runtime, so tests that block their
/// runtime cannot stall it); stopped and its directory removed on drop.
pub struct TestServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// On a free port.
    pub fn start() -> Result<Self> {
        Self::start_on(0)
    }

    /// On `port` (e.g. one a client was already told about, to bring a "down" server up).
    /// Callable from inside an async runtime: the server's runtime lives in its own thread.
    pub fn start_on(port: u16) -> Result<Self> {
        let dir = tempfile::tempdir().context("test server directory")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, addr) = std::sync::mpsc::channel::<std::io::Result<SocketAddr>>();
        let path = dir.path().to_path_buf();
        let thread = std::thread::Builder::new().name("qdrant-testserver".into()).spawn(move || {
            let run = || -> Result<()> {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
                let listener = rt.block_on(TcpListener::bind(("127.0.0.1", port)));
                let listener = match listener.and_then(|l| l.local_addr().map(|a| (l, a))) {
                    Ok((l, a)) => {
                        let _ = bound.send(Ok(a));
                        l
                    }
                    Err(e) => {
                        let _ = bound.send(Err(e));
                        return Ok(());
                    }
                };
                let shutdown = async {
                    let _ = stopped.await;
                };
                rt.block_on(serve(listener, path, shutdown))
            };
            if let Err(e) = run() {
                eprintln!("{TITLE}: {e:#}");
            }
        })?;
        let addr = addr.recv().context("test server thread ended before binding")?.context("binding")?;
        Ok(Self { addr, stop: Some(stop), thread: Some(thread), _dir: dir })
    }

    /// The gRPC URL clients connect to (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

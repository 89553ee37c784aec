//! `kiln-qdrant-testserver`: the test gRPC server over qdrant-edge as a process, for running
//! kiln (`--qdrant-url`) or a benchmark against it by hand. Not Qdrant; see the library's docs.
//! Usage: `kiln-qdrant-testserver [PORT] [DIR]` (default 6334 and a temporary directory);
//! SIGINT or SIGTERM stops it.

use anyhow::{Context, Result};

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().map(|p| p.parse()).transpose().context("PORT")?.unwrap_or(6334);
    let temp = tempfile::tempdir()?;
    let dir = args.next().map(std::path::PathBuf::from).unwrap_or_else(|| temp.path().to_path_buf());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!(
        "{} on http://{} (collections in {})",
        kiln_qdrant_testserver::TITLE,
        listener.local_addr()?,
        dir.display()
    );
    // SIGINT or SIGTERM: stop serving, so the temporary directory is removed on the way out.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    kiln_qdrant_testserver::serve(listener, dir, shutdown).await
}

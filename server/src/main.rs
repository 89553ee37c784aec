//! The `kiln` binary: `kiln serve` runs the OpenAI-compatible server, `kiln generate` streams a
//! completion to stdout, `kiln bench` measures the engine. Logs and progress go to stderr so
//! stdout carries only generated text.

mod embed_cli;
mod memory_bench;

use clap::{CommandFactory, Parser, Subcommand};
use kiln_server::{bench, bench_agent, config, generate, serve};

#[derive(Parser)]
#[command(name = "kiln", version, about = "High-performance LLM inference server")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "human", value_parser = ["human", "json"], env = "KILN_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(Box<serve::ServeArgs>),
    /// Generate text from a prompt (or one chat message) and stream it to stdout.
    Generate(generate::GenerateArgs),
    /// Measure prefill, decode and batched decode throughput of the engine.
    Bench(bench::BenchArgs),
    /// Measure prefix caching, sessions and fork against the same engine without them.
    BenchAgent(bench_agent::BenchAgentArgs),
    /// Embed texts with an embedding model and print the vectors.
    Embed(embed_cli::EmbedArgs),
    /// Measure sentences/s of the embedding engine on batches of texts.
    EmbedBench(embed_cli::EmbedBenchArgs),
    /// Measure the memory store: batch adds against raw embedding, search latency, reopen time.
    MemoryBench(memory_bench::MemoryBenchArgs),
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(path) = config::config_path(&args) {
        config::apply_file(std::path::Path::new(&path), &serve_envs())?;
    }
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.command {
        Command::Serve(a) => serve::run(*a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchAgent(a) => bench_agent::run(a),
        Command::Embed(a) => embed_cli::run(a),
        Command::EmbedBench(a) => embed_cli::bench(a),
        Command::MemoryBench(a) => memory_bench::run(a),
    }
}

/// The `KILN_*` variables `kiln serve` reads (the keys a config file may set).
fn serve_envs() -> Vec<String> {
    let cmd = Cli::command();
    let mut envs: Vec<String> =
        cmd.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect();
    if let Some(serve) = cmd.find_subcommand("serve") {
        envs.extend(serve.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()));
    }
    envs
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

//! The `kiln` binary: `kiln generate` streams a completion to stdout, `kiln bench` measures the
//! engine. Logs and progress go to stderr so stdout carries only generated text.

mod bench;
mod engine_args;
mod generate;

use clap::{Parser, Subcommand};

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
    /// Generate text from a prompt (or one chat message) and stream it to stdout.
    Generate(generate::GenerateArgs),
    /// Measure prefill, decode and batched decode throughput of the engine.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
    }
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

//! The `natter` binary: `natter serve` (the default) runs a node.

use anyhow::Context;
use clap::{Parser, Subcommand};
use natter::config::{Config, ServeArgs};

/// mimalloc: measured on the load tool against glibc's malloc (README,
/// Performance): less CPU per message, and memory freed after a burst
/// (argon2's 19 MiB per hash, an overload's queues) goes back to the
/// system instead of staying in per-thread arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "natter", version, about = "Event-sourced, horizontally scaled chat backend")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (the default).
    Serve(ServeArgs),
    /// Each projection's checkpoint, lag behind the log, and parked events.
    Projections(ServeArgs),
    /// Rebuild a projection from the log beside the live one, then switch to it.
    Rebuild {
        /// mongo-views, redis-unseen or all
        #[arg(default_value = "all")]
        projection: String,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Copy an embedded node's event log into a NATS JetStream deployment.
    Migrate {
        /// The embedded node's data directory.
        #[arg(long, default_value = "natter-data")]
        from: std::path::PathBuf,
        /// The NATS server to move to (nats://host:port).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Events a projector could not apply.
    Parked {
        #[command(subcommand)]
        action: ParkedAction,
    },
}

#[derive(Subcommand)]
enum ParkedAction {
    /// List parked events with their reasons.
    List(ServeArgs),
    /// Apply parked events again; those that now apply are removed.
    Retry {
        /// Parked sequence numbers to retry (default: all).
        seqs: Vec<u64>,
        #[command(flatten)]
        args: ServeArgs,
    },
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
        Some(command) => return runtime(0)?.block_on(run_command(command)),
    };
    let cfg = Config::resolve(&args)?;
    runtime(cfg.server.threads)?.block_on(serve(cfg))
}

/// The runtime: `threads` workers (0: one per CPU).
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build().context("cannot start the async runtime")
}

/// The subcommands other than `serve`.
async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => unreachable!("serve is not a one-off command"),
        Command::Projections(args) => natter::cli::projections(&Config::resolve(&args)?).await,
        Command::Rebuild { projection, args } => {
            natter::telemetry::init(false);
            natter::cli::rebuild(&Config::resolve(&args)?, &projection).await
        }
        Command::Migrate { from, to, args } => natter::cli::migrate(&Config::resolve(&args)?, &from, &to).await,
        Command::Parked { action: ParkedAction::List(args) } => natter::cli::parked_list(&Config::resolve(&args)?).await,
        Command::Parked { action: ParkedAction::Retry { seqs, args } } => natter::cli::parked_retry(&Config::resolve(&args)?, &seqs).await,
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    natter::telemetry::init(cfg.server.log_format == natter::config::LogFormat::Json);
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (port in use? set NATTER_PORT)"))?;
    let running = natter::startup::start(cfg, listener).await?;
    let stop = running.shutdown_handle();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested: draining requests and stopping projectors");
        let _ = stop.send(true);
    });
    running.wait().await;
    tracing::info!("natter stopped");
    Ok(())
}

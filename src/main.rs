//! The `herd` binary: parse the command line, load the config, start tracing,
//! bind, and hand over to the library.

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use herd::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use tracing::info;

#[derive(Parser)]
#[command(name = "herd", version, about = "A WebSocket pub/sub result broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Submit an input (or JSON lines from stdin with `-`) and print the result.
    Submit {
        #[command(flatten)]
        target: TargetArgs,
        /// Evaluator name.
        #[arg(long = "fn", default_value = herd::protocol::DEFAULT_FN)]
        fn_name: String,
        /// Do not wait for the result; print what `accepted` said.
        #[arg(long)]
        nowait: bool,
        /// 0-9 (the broker's default: 5): the queued evaluation starts in
        /// order of the highest priority among its submits.
        #[arg(long)]
        priority: Option<u8>,
        /// Give up on this submit after this long (`deadline_exceeded`);
        /// the evaluation goes on for its other waiters.
        #[arg(long)]
        deadline_ms: Option<u64>,
        /// Print the evaluation's progress reports on stderr as they come.
        #[arg(long)]
        progress: bool,
        /// With `-`: submits in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// The input as JSON, or `-` to read JSON lines from stdin.
        input: String,
    },
    /// Print a key's state without waiting or starting work.
    Get {
        #[command(flatten)]
        target: TargetArgs,
        key: String,
    },
    /// Drop a key's cached result, or every result of a fn (an admin's op).
    #[command(group(clap::ArgGroup::new("what").required(true).args(["key", "fn_name"])))]
    Invalidate {
        #[command(flatten)]
        target: TargetArgs,
        /// The key whose result is dropped.
        #[arg(long)]
        key: Option<String>,
        /// The fn whose results are all dropped.
        #[arg(long = "fn")]
        fn_name: Option<String>,
    },
    /// Wait for keys' results, whoever submits them; print each as it arrives.
    Subscribe {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// A live one-line view of the broker.
    Watch {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Run a benchmark scenario (see BENCHMARKS.md) against a running broker.
    Bench(BenchArgs),
    /// Print a signed token (JWT, HS256) for a broker whose `[auth]
    /// jwt_secret_env` names the same secret.
    Token(herd::client::token::TokenArgs),
    /// Serve a remote fn with a JSON-lines program:
    /// `herd work --fn NAME --concurrency 4 -- python3 worker.py`.
    Work {
        #[command(flatten)]
        target: TargetArgs,
        /// The remote fn to serve.
        #[arg(long = "fn")]
        fn_name: String,
        /// Tasks run at once: one child each.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// A child that takes longer for one task is killed and replaced.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Args, Clone)]
struct TargetArgs {
    /// The broker's WebSocket URL (`herd bench`: give it once per broker of
    /// a cluster; sessions go round-robin and figures are summed).
    #[arg(
        long,
        env = "HERD_URL",
        default_value = "ws://127.0.0.1:7878/ws",
        global = true
    )]
    url: Vec<String>,
    /// Bearer token.
    #[arg(long, env = "HERD_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Seed of the inputs; the same seed sends the same requests. Without
    /// it each run draws a fresh seed (printed), so its inputs are new.
    #[arg(long, global = true)]
    seed: Option<u64>,
    /// Also write the figures as one JSON object to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// The broker's process id (on this machine): adds its CPU seconds and
    /// resident memory to every scenario's figures.
    #[arg(long, global = true)]
    pid: Option<u32>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// S1: agents submitting a Zipf mix with many identical requests.
    Agents(herd::client::bench::agents::AgentsArgs),
    /// S2: a cold key submitted by every session at once.
    Burst(herd::client::bench::burst::BurstArgs),
    /// S3: the cache-hit path.
    Hits(herd::client::bench::hits::HitsArgs),
    /// The transport's floor beside S3: the same client against a
    /// WebSocket echo server (examples/echo_server).
    Echo(herd::client::bench::hits::EchoArgs),
    /// S4: one result, many subscribers.
    Fanout(herd::client::bench::fanout::FanoutArgs),
    /// S5: many idle sessions.
    Idle(herd::client::bench::idle::IdleArgs),
}

/// `host:port` resolved to one address (IPv4 first, as `localhost` is
/// usually meant).
fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("{e} (expected host:port, such as 127.0.0.1:7878 or localhost:7878)"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{text} resolves to no address"))
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (TOML). Without it, config/herd.toml is read when present.
    #[arg(long, env = "HERD_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, overriding the config's `listen`: `host:port`,
    /// where host is an IP address or a name such as `localhost` (port 0
    /// picks a free one).
    #[arg(long, env = "HERD_LISTEN", value_parser = listen_addr)]
    listen: Option<SocketAddr>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

const DEFAULT_CONFIG: &str = "config/herd.toml";

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => {
            let config = Config::load(path)?;
            info!(path = %path.display(), "config read");
            config
        }
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            let config = Config::load(std::path::Path::new(DEFAULT_CONFIG))?;
            info!(path = DEFAULT_CONFIG, "config read (no --config given)");
            config
        }
        None => {
            info!("no {DEFAULT_CONFIG} here; using the builtin defaults");
            Config::default()
        }
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    config.validate()?;
    Ok(config)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    let config = load_config(&args)?;
    raise_fd_limit();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    herd::server::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Many sessions need many descriptors: raise the limit to `WANTED_FDS`
/// (possible beyond the hard limit only with privilege), else to the hard limit.
fn raise_fd_limit() {
    const WANTED_FDS: u64 = 65_536;
    let raised = rlimit::Resource::NOFILE
        .get()
        .ok()
        .filter(|(soft, _)| *soft < WANTED_FDS)
        .map(|_| rlimit::Resource::NOFILE.set(WANTED_FDS, WANTED_FDS));
    if !matches!(raised, Some(Ok(()))) {
        if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
            tracing::warn!(%error, "cannot raise the open file limit");
        }
    }
    if let Ok((soft, _)) = rlimit::Resource::NOFILE.get() {
        info!(limit = soft, "open file limit");
    }
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use herd::client::bench::{self, Target};
    raise_fd_limit();
    let target = Target {
        urls: args.target.url,
        token: args.target.token,
        pid: args.pid,
        partial_cluster_said: Default::default(),
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let scenario = async {
        match &args.scenario {
            Scenario::Agents(a) => bench::agents::run(&target, a, seed).await,
            Scenario::Burst(a) => bench::burst::run(&target, a, seed).await,
            Scenario::Hits(a) => bench::hits::run(&target, a, seed).await,
            Scenario::Echo(a) => bench::hits::echo(&target, a, seed).await,
            Scenario::Fanout(a) => bench::fanout::run(&target, a, seed).await,
            Scenario::Idle(a) => bench::idle::run(&target, a).await,
        }
    };
    let mut report = bench::with_broker_figures(target.pid, scenario).await?;
    report.add("seed", seed);
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&report.to_json())? + "\n",
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The one URL of a command that talks to one broker.
fn first_url(urls: Vec<String>) -> String {
    if urls.len() > 1 {
        eprintln!("herd: only `herd bench` takes several --url; using the first");
    }
    urls.into_iter().next().unwrap_or_default()
}

fn target(args: TargetArgs) -> herd::client::cli::Target {
    herd::client::cli::Target {
        url: first_url(args.url),
        token: args.token,
    }
}

/// Prints a failure of `serve` or `bench` as one line (whatever
/// `RUST_BACKTRACE` says: these are a user's errors, not the program's) and
/// gives the exit code.
fn report(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("herd: {error:#}");
            1
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("herd: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    };
    let code = match cli.command {
        Command::Serve(args) => {
            let served = report(runtime.block_on(serve(args)));
            // Evaluator threads still inside an overrunning evaluation after
            // the drain bounds are not waited for: the process ends now.
            runtime.shutdown_background();
            std::process::exit(served);
        }
        Command::Bench(args) => report(runtime.block_on(bench(args))),
        Command::Token(args) => match herd::client::token::mint(&args) {
            Ok(token) => {
                println!("{token}");
                0
            }
            Err(message) => {
                eprintln!("herd token: {message}");
                2
            }
        },
        Command::Work {
            target,
            fn_name,
            concurrency,
            timeout_ms,
            command,
        } => {
            init_tracing(LogFormat::Text);
            let args = herd::client::work::WorkArgs {
                url: first_url(target.url),
                token: target.token,
                fn_name,
                concurrency,
                timeout_ms,
                command,
            };
            report(runtime.block_on(herd::client::work::run(args, shutdown_signal())))
        }
        Command::Submit {
            target: t,
            fn_name,
            nowait,
            priority,
            deadline_ms,
            progress,
            concurrency,
            input,
        } => {
            let flags = herd::client::cli::SubmitFlags {
                nowait,
                options: herd::client::SubmitOptions {
                    priority,
                    deadline_ms,
                },
                progress,
            };
            runtime.block_on(herd::client::cli::submit(
                &target(t),
                &fn_name,
                flags,
                &input,
                concurrency,
            ))
        }
        Command::Get { target: t, key } => {
            runtime.block_on(herd::client::cli::get(&target(t), &key))
        }
        Command::Invalidate {
            target: t,
            key,
            fn_name,
        } => runtime.block_on(herd::client::cli::invalidate(
            &target(t),
            key.as_deref(),
            fn_name.as_deref(),
        )),
        Command::Subscribe { target: t, keys } => {
            runtime.block_on(herd::client::cli::subscribe(&target(t), &keys))
        }
        Command::Watch {
            target: t,
            interval_ms,
        } => runtime.block_on(herd::client::cli::watch(&target(t), interval_ms)),
    };
    drop(runtime);
    std::process::exit(code)
}

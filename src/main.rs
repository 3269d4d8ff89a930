//! The `weft` command line: run, render, check, bridge, demo.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use weft::bridge::BridgeState;
use weft::config::{BridgeConfig, BridgeMode, Config, HaproxyConfig, HaproxyMode};
use weft::haproxy::files::stage;
use weft::haproxy::validate::{validate, ValidateError};
use weft::model::{build, Ledger, SourceReport};
use weft::render::{render, RenderSettings, CONFIG_FILE};
use weft::sources::read_all_once;

/// A line on stdout; a failed write (a closed pipe) is an error, not a panic.
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

#[derive(Parser)]
#[command(
    version,
    about = "HAProxy edge controller for Weave container networks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (sources -> HAProxy) until SIGTERM/SIGINT.
    Run {
        #[arg(short, long, default_value = "weft.toml")]
        config: PathBuf,
    },
    /// Read every source once and print haproxy.cfg; dropped inputs go to stderr.
    Render {
        #[arg(short, long, default_value = "weft.toml")]
        config: PathBuf,
        /// Write every file HAProxy needs into DIR (paths inside point at DIR) instead.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Validate the config, read each source, run `haproxy -c` on the result.
    Check {
        #[arg(short, long, default_value = "weft.toml")]
        config: PathBuf,
        /// Also fail when an input is dropped.
        #[arg(long)]
        strict: bool,
    },
    /// Check the weave bridge once and, in bridge.mode = ensure, repair it; print the outcome.
    Bridge {
        #[arg(short, long, default_value = "weft.toml")]
        config: PathBuf,
        /// Only report, change nothing (whatever bridge.mode says).
        #[arg(long)]
        check: bool,
        /// Keep going: a pass on every link/address event and every bridge.interval, until
        /// SIGTERM/SIGINT.
        #[arg(long)]
        watch: bool,
    },
    /// Run the embedded default: HAProxy on 127.0.0.1:8080, the file source, two demo backends.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: SocketAddr,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("weft: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        // The reader went away (`weft render | head`): nothing more to say, as ripgrep does.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            // Not `{err:#}`: weft's errors name their cause in their own message too, and
            // `{:#}` would print it once more for every level of the chain.
            eprintln!("weft: {}", weft::sources::error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => run(Config::load(&config)?).await,
        Command::Render { config, out } => render_once(&Config::load(&config)?, out).await,
        Command::Check { config, strict } => check(&config, strict).await,
        Command::Bridge {
            config,
            check,
            watch,
        } => bridge(&config, check, watch).await,
        Command::Demo { bind } => demo(bind).await,
    }
}

async fn run(config: Config) -> anyhow::Result<ExitCode> {
    require_binary(&config.haproxy.binary)?;
    raise_open_files_limit(&config.haproxy);
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    weft::controller::run(config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM, SIGINT and SIGHUP stop weft gracefully (a managed HAProxy with it). SIGHUP's
/// default would kill weft on the spot and leave its HAProxy behind; weft.toml is read at
/// start only, so a SIGHUP from a config-management tool means "restart me".
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(term), Ok(hup)) => (term, hup),
        (Err(err), _) | (_, Err(err)) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM and SIGHUP");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM, stopping"),
        _ = hup.recv() => tracing::info!("SIGHUP, stopping: weft reads weft.toml at start only, so restart it to apply a change"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT, stopping"),
    }
    shutdown.cancel();
}

fn require_binary(binary: &Path) -> anyhow::Result<()> {
    if !binary.exists() {
        bail!(
            "haproxy not found at {} (Debian: apt-get install haproxy; or set haproxy.binary)",
            binary.display()
        );
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard one, as Consul, fabio and Traefik do: the soft
/// limit is often 1024, and weft holds a socket per Consul service watch. A managed HAProxy
/// inherits the limits and sets its own from `haproxy.maxconn`, within the hard limit unless
/// it may raise that too (CAP_SYS_RESOURCE); when it cannot, it refuses to start, so say so
/// first, naming the key.
fn raise_open_files_limit(haproxy: &HaproxyConfig) {
    let (before, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the open files limit");
            return;
        }
    };
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::info!(
            before,
            after = hard,
            "open files limit set to the hard limit"
        ),
        Err(err) => tracing::warn!(before, hard, error = %err, "cannot raise the open files limit"),
    }
    // What HAProxy 2.6 sets its limit to, measured: two per connection and 40 of its own (one
    // more per health-checked server).
    let Some(maxconn) = haproxy.maxconn() else {
        return;
    };
    let needed = 2 * u64::from(maxconn) + 40;
    if haproxy.mode == HaproxyMode::Managed && needed > hard {
        tracing::warn!(
            maxconn,
            needed,
            hard,
            "haproxy.maxconn needs more open files than the hard limit: HAProxy refuses to start \
             unless it may raise it (CAP_SYS_RESOURCE); lower haproxy.maxconn or raise the limit \
             (LimitNOFILE= in the systemd unit)"
        );
    }
}

/// Reads every source once and builds the table; source failures are returned as messages.
async fn build_once(config: &Config) -> (weft::model::Built, Vec<String>) {
    let mut reports: Vec<SourceReport> = Vec::new();
    let mut failures = Vec::new();
    for result in read_all_once(config).await {
        match result {
            Ok(report) => reports.push(report),
            Err(err) => failures.push(format!("source {}: {err}", err.source_id())),
        }
    }
    let refs: Vec<&SourceReport> = reports.iter().collect();
    let ledger = match weft::controller::claims::LocalStore::open(&config.haproxy.run_dir) {
        Ok(store) => store.ledger(),
        Err(err) => {
            failures.push(err.to_string());
            Ledger::default()
        }
    };
    let model = config.model_settings(weft::network::own_addresses());
    (build(&refs, &model, &ledger), failures)
}

async fn render_once(config: &Config, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let (built, failures) = build_once(config).await;
    for failure in &failures {
        eprintln!("weft: {failure}");
    }
    for dropped in &built.dropped {
        eprintln!("dropped: {dropped}");
    }
    match out {
        None => {
            let rendered = render(
                &built.table,
                &RenderSettings::new(&config.haproxy, &config.haproxy.run_dir),
            )?;
            std::io::stdout().write_all(rendered.config.as_bytes())?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let dir = std::path::absolute(&dir)?;
            let rendered = render(&built.table, &RenderSettings::new(&config.haproxy, &dir))?;
            stage(&dir, &rendered)?;
        }
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn check(path: &Path, strict: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    out!("config {}: ok", path.display());
    let mut problems = 0;
    if let Err(err) = require_binary(&config.haproxy.binary) {
        out!("haproxy: {err:#}");
        problems += 1;
    }
    let (built, failures) = build_once(&config).await;
    for failure in &failures {
        out!("{failure}");
        problems += 1;
    }
    out!(
        "routing: {} services, {} routes, {} dropped",
        built.table.backends.len(),
        built.table.routes.len(),
        built.dropped.len()
    );
    for dropped in &built.dropped {
        out!("dropped: {dropped}");
        if strict {
            problems += 1;
        }
    }
    if config.bridge.mode == BridgeMode::Off {
        out!("bridge {}: off (bridge.mode = \"off\")", config.bridge.name);
    } else {
        // Only looks: `weft check` changes nothing, and reading links needs no privilege.
        let bridge = BridgeConfig {
            mode: BridgeMode::Check,
            ..config.bridge.clone()
        };
        let (state, healthy) = bridge_once(&bridge).await;
        out!("{state}");
        if !healthy {
            problems += 1;
        }
    }
    if config.haproxy.binary.exists() {
        let dir = tempfile::tempdir()?;
        let rendered = render(
            &built.table,
            &RenderSettings::new(&config.haproxy, dir.path()),
        )?;
        stage(dir.path(), &rendered)?;
        let staged = dir.path().join(CONFIG_FILE);
        match validate(&config.haproxy.binary, &staged, &rendered.config).await {
            Ok(()) => out!("haproxy -c: ok"),
            Err(ValidateError::Rejected { stderr, .. }) => {
                out!("haproxy -c: rejected:\n{stderr}");
                problems += 1;
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        out!("{problems} problem(s)");
        ExitCode::FAILURE
    })
}

/// One bridge pass: the state as `weft bridge` prints it, and whether it is fine.
async fn bridge_once(config: &BridgeConfig) -> (BridgeState, bool) {
    let mut state = BridgeState::new(config);
    let pass = weft::bridge::reconcile(config).await;
    state.record(pass.health, 0);
    let healthy = state.problems().is_empty();
    (state, healthy)
}

async fn bridge(path: &Path, check: bool, watch: bool) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(path)?.bridge;
    if check {
        config.mode = BridgeMode::Check;
    }
    if config.mode == BridgeMode::Off {
        out!(
            "bridge {}: off (bridge.mode = \"off\"; --check looks anyway)",
            config.name
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !watch {
        let (state, healthy) = bridge_once(&config).await;
        out!("{state}");
        return Ok(if healthy {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let (tx, mut rx) = tokio::sync::watch::channel(BridgeState::new(&config));
    let mut keeper = weft::bridge::Keeper::new(config, tx);
    keeper.check_now().await;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    // Each outcome printed when it differs from the last, the way the first one is.
    let printer = tokio::spawn(async move {
        let mut last = None;
        loop {
            let state = rx.borrow_and_update().clone();
            if last.as_ref() != Some(&state.health) {
                out!("{state}");
                last = Some(state.health);
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
        Ok::<(), std::io::Error>(())
    });
    keeper.run(shutdown).await;
    printer.abort();
    Ok(ExitCode::SUCCESS)
}

async fn demo(bind: SocketAddr) -> anyhow::Result<ExitCode> {
    let dir = tempfile::Builder::new().prefix("weft-demo-").tempdir()?;
    let shutdown = CancellationToken::new();
    let backend1 = TcpListener::bind("127.0.0.1:0").await?;
    let backend2 = TcpListener::bind("127.0.0.1:0").await?;
    weft::demo::write_files(dir.path(), backend1.local_addr()?, backend2.local_addr()?)?;
    tokio::spawn(weft::demo::serve_backend(
        "backend1",
        backend1,
        shutdown.clone(),
    ));
    tokio::spawn(weft::demo::serve_backend(
        "backend2",
        backend2,
        shutdown.clone(),
    ));

    let mut config = Config::load(&dir.path().join("weft.toml"))?;
    config.haproxy.bind = bind;
    require_binary(&config.haproxy.binary)?;
    raise_open_files_limit(&config.haproxy);
    let services = dir.path().join("services.toml");
    out!(
        "weft demo: HAProxy on http://{bind}, services in {}",
        services.display()
    );
    out!("try:");
    out!(
        "  curl -H 'Host: app.demo.localhost' http://{bind}/       # backend1 and backend2 in turn"
    );
    out!("  curl -H 'Host: app.demo.localhost' http://{bind}/api/x  # the /api prefix: backend2");
    out!("  curl -H 'Host: one.demo.localhost' http://{bind}/       # backend1 only");
    out!("  curl -H 'Host: nope.example.com' http://{bind}/         # no route: 404");
    out!(
        "edit {} and watch traffic follow; Ctrl-C stops.",
        services.display()
    );
    tokio::spawn(stop_on_signal(shutdown.clone()));
    weft::controller::run(config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

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
use weft::escape::Escaped;
use weft::haproxy::files::stage;
use weft::haproxy::validate::{validate, ValidateError};
use weft::model::{build, Ledger, SourceReport};
use weft::render::{render, RenderSettings, CONFIG_FILE};
use weft::sources::read_all_once;

/// mimalloc, not glibc's malloc: glibc keeps what a render or a reload freed in its per-thread
/// arenas (up to 8 per core) and hands little of it back, so that weft's RSS at 10,000 services
/// was three to six times what it held (BENCHMARKS.md, "10,000 services"); and building the
/// routing table makes and frees many small values (a million for 10,000 Marathon apps), which
/// mimalloc does in far fewer instructions.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Log lines as text (default) or as one JSON object per line, for a log collector.
    #[arg(long, global = true, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// Print a running weft's /status as a table (routes, sources, problems); exit 1 when it is
    /// unhealthy or does not answer (a container health check).
    Status {
        #[arg(short, long, default_value = "weft.toml")]
        config: PathBuf,
    },
    /// Stop the HAProxy a weft left serving (haproxy.on_exit = "keep", the default), gracefully:
    /// takes the edge out of service. Stop weft first: a running weft would start it again.
    Stop {
        #[arg(short, long, default_value = "weft.toml")]
        config: PathBuf,
    },
    /// Run the embedded default: HAProxy on 127.0.0.1:8080, the file source, two demo backends.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // The same fields as the text lines, the span's among them; one object a line.
        LogFormat::Json => logs.json().flatten_event(true).with_ansi(false).init(),
    }
    let daemon = matches!(cli.command, Command::Run { .. } | Command::Demo { .. });
    if matches!(cli.command, Command::Run { .. }) {
        // The daemon's footprint before a first touch's speed (see the module), from before
        // the runtime's threads touch their first pages.
        weft::pages::keep_small();
    }
    if matches!(cli.command, Command::Render { .. } | Command::Check { .. }) {
        // `weft render` and `weft check` do large steps of work on rayon's pool (an answer's
        // segments as it comes, the validation, the render, split in two): their own thread is
        // one of rayon's, so that it decodes segments too while it reads, and a step begins at
        // once on it, and goes on there alone while the other thread is slow to come (a vCPU
        // the host descheduled). Handed from outside the pool, it could not begin before a
        // pool thread woke to take it. Built now, the pool waits for its threads to start (a
        // fraction of a millisecond), which the other commands need not pay. Never fewer than
        // two threads: a pool of this thread alone would never take work handed to it from
        // another thread.
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        if let Err(err) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .use_current_thread()
            .build_global()
        {
            tracing::warn!(error = %err, "cannot start the worker threads with this one among them");
        }
    }
    // A one-shot command (render, check, status, ...) waits on one thing at a time: one thread,
    // none to start and no hand-over between threads for each chunk of an answer it reads.
    let runtime = if daemon {
        tokio::runtime::Runtime::new()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
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
        Command::Run { config } => run(&config).await,
        Command::Render { config, out } => render_once(&Config::load(&config)?, out).await,
        Command::Check { config, strict } => check(&config, strict).await,
        Command::Bridge {
            config,
            check,
            watch,
        } => bridge(&config, check, watch).await,
        Command::Stop { config } => stop(&config).await,
        Command::Status { config } => status(&config).await,
        Command::Demo { bind } => demo(bind).await,
    }
}

/// The most of `/status` `weft status` reads (10,000 routes are a few MiB).
const MAX_STATUS_BYTES: usize = 64 << 20;
/// Rows of each list `weft status` prints; `/status` has them all.
const SHOWN_ROWS: usize = 50;

async fn status(path: &Path) -> anyhow::Result<ExitCode> {
    use weft::escape::Escaped;
    let mut listen = Config::load(path)?.status_listen;
    if listen.ip().is_unspecified() {
        listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{listen}/status");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()?;
    let mut answer = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("no weft answers at {url}"))?;
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_STATUS_BYTES {
            bail!("{url} answered more than {MAX_STATUS_BYTES} bytes");
        }
    }
    let view: serde_json::Value =
        serde_json::from_slice(&body).with_context(|| format!("{url} is not weft's /status"))?;
    let text = |value: &serde_json::Value| match value {
        serde_json::Value::String(text) => Escaped(text.clone()).to_string(),
        serde_json::Value::Null => "-".into(),
        other => Escaped(other.to_string()).to_string(),
    };
    let list = |key: &str| view[key].as_array().cloned().unwrap_or_default();
    let healthy = view["healthy"].as_bool().unwrap_or(false);
    out!(
        "weft at {listen}: {}",
        if healthy { "healthy" } else { "UNHEALTHY" }
    );
    for problem in list("problems") {
        out!("  problem: {}", text(&problem));
    }
    let haproxy = &view["haproxy"];
    out!(
        "haproxy: {}, {} reloads, {} runtime updates, {} of {} spare backends free{}",
        if haproxy["running"].as_bool() == Some(true) {
            "running"
        } else {
            "NOT RUNNING"
        },
        haproxy["reloads"],
        haproxy["runtime_updates"],
        haproxy["pool"]["free"],
        haproxy["pool"]["declared"],
        match &haproxy["last_error"] {
            serde_json::Value::Null => String::new(),
            error => format!(", last error: {}", text(error)),
        }
    );
    out!("\nsources:");
    out!("  {:<12} {:<10} {:>8}  reason", "name", "state", "services");
    for source in list("sources") {
        out!(
            "  {:<12} {:<10} {:>8}  {}",
            text(&source["name"]),
            text(&source["state"]),
            source["services"],
            text(&source["reason"])
        );
    }
    let routes = list("routes");
    out!("\nroutes ({}):", routes.len());
    for route in routes.iter().take(SHOWN_ROWS) {
        // As the page lists them: the first few, the rest counted.
        let all = route["servers"].as_array().map_or(&[][..], Vec::as_slice);
        let mut servers: Vec<String> = all
            .iter()
            .take(weft::status::SERVERS_SHOWN)
            .map(text)
            .collect();
        if all.len() > weft::status::SERVERS_SHOWN {
            servers.push(format!("{} more", all.len() - weft::status::SERVERS_SHOWN));
        }
        out!(
            "  {}{} -> {} [{}]",
            text(&route["host"]),
            text(&route["path"]),
            text(&route["service"]),
            servers.join(", ")
        );
    }
    if routes.len() > SHOWN_ROWS {
        out!("  ... {} more in {url}", routes.len() - SHOWN_ROWS);
    }
    let dropped = list("dropped");
    out!("\ndropped ({}):", dropped.len());
    for drop in dropped.iter().take(SHOWN_ROWS) {
        out!(
            "  {} {}: {}",
            text(&drop["source"]),
            text(&drop["subject"]),
            text(&drop["reason"])
        );
    }
    if dropped.len() > SHOWN_ROWS {
        out!("  ... {} more in {url}", dropped.len() - SHOWN_ROWS);
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn stop(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?.haproxy;
    if config.mode == HaproxyMode::External {
        bail!("haproxy.mode is \"external\": that HAProxy is not weft's to stop");
    }
    // Held by a running weft, which would start HAProxy again at once.
    let _lock = weft::haproxy::files::lock_run_dir(&config.run_dir)?;
    let launch = weft::haproxy::process::Launch::new(&config);
    let grace = config.hard_stop_after + std::time::Duration::from_secs(5);
    match weft::haproxy::process::stop_kept(&launch, grace).await {
        Some(pid) => out!("haproxy (pid {pid}) stopped"),
        None => out!("no haproxy of weft's runs on {}", config.run_dir.display()),
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    require_binary(&config.haproxy.binary)?;
    raise_open_files_limit(&config.haproxy);
    let shutdown = CancellationToken::new();
    let handover = CancellationToken::new();
    tokio::spawn(stop_or_reexec_on_signal(
        path.to_path_buf(),
        shutdown.clone(),
        handover.clone(),
    ));
    weft::controller::run(config, shutdown, handover.clone()).await?;
    if handover.is_cancelled() {
        reexec()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT stop weft gracefully; its HAProxy keeps serving or stops, as
/// `haproxy.on_exit` says. SIGHUP re-reads weft.toml the only way weft reads it, at start: if
/// the file is sound, weft hands its HAProxy over (whatever `on_exit` says) and executes
/// itself again, under the same pid, and the new image adopts HAProxy with no request lost;
/// if it is not, weft says why and runs on as it was.
async fn stop_or_reexec_on_signal(
    path: PathBuf,
    shutdown: CancellationToken,
    handover: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return stop_on_signal(shutdown).await;
    };
    let hangups = async {
        loop {
            hup.recv().await;
            match Config::load(&path) {
                Ok(_) => {
                    tracing::info!(config = %path.display(), "SIGHUP: weft.toml is sound, restarting weft in place; haproxy keeps serving");
                    return;
                }
                Err(err) => tracing::error!(
                    error = %weft::sources::error_chain(&err),
                    "SIGHUP: weft.toml has errors, running on as before"
                ),
            }
        }
    };
    tokio::select! {
        () = terminated() => {}
        () = hangups => handover.cancel(),
    }
    shutdown.cancel();
}

/// Executes weft's binary again with the same arguments: the file at weft's path now (after
/// a package upgrade, the new version), under the same pid.
fn reexec() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("cannot find weft's own binary")?;
    let text = exe.to_string_lossy();
    let exe = PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text));
    // The new image starts with the host's huge page setting, as a fresh weft would: the
    // switch survives an exec, and the new image's HAProxy must not inherit weft's own choice.
    let err = weft::pages::spawn_with_host_pages(|| {
        std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .exec()
    });
    Err(err).with_context(|| format!("cannot execute {}", exe.display()))
}

/// SIGTERM, SIGINT and SIGHUP stop weft gracefully (SIGHUP's default would kill weft on the
/// spot).
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => tokio::select! {
            () = terminated() => {}
            _ = hup.recv() => tracing::info!("SIGHUP, stopping"),
        },
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGHUP");
            terminated().await
        }
    }
    shutdown.cancel();
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM, stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT, stopping"),
    }
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
    tracing::debug!("sources read");
    let refs: Vec<&SourceReport> = reports.iter().collect();
    let ledger = match weft::controller::claims::LocalStore::open(&config.haproxy.run_dir) {
        Ok(store) => store.ledger(),
        Err(err) => {
            failures.push(err.to_string());
            Ledger::default()
        }
    };
    let model = config.model_settings(weft::network::own_addresses());
    let built = build(&refs, &model, &ledger);
    tracing::debug!("table built");
    // A one-shot command ends soon: freeing the definitions would only make it wait.
    std::mem::forget(reports);
    (built, failures)
}

async fn render_once(config: &Config, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let (built, failures) = build_once(config).await;
    // Source text (names, tags, labels, error bodies) is escaped: one line each, no terminal
    // control sequences.
    for failure in &failures {
        eprintln!("weft: {}", Escaped(failure));
    }
    for dropped in &built.dropped {
        eprintln!("dropped: {}", Escaped(dropped));
    }
    match out {
        None => {
            let rendered = render(
                &built.table,
                &RenderSettings::new(
                    &config.haproxy,
                    &config.haproxy.run_dir,
                    &default_cert(config)?,
                ),
            )?;
            std::io::stdout().write_all(rendered.config.as_bytes())?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let dir = std::path::absolute(&dir)?;
            let settings = RenderSettings::new(&config.haproxy, &dir, &default_cert(config)?);
            let rendered = render(&built.table, &settings)?;
            tracing::debug!("rendered");
            stage(&dir, &rendered)?;
            tracing::debug!("written");
            // The process ends here, and its memory with it: freeing 10,000 services first
            // would only make the operator wait.
            std::mem::forget(rendered);
        }
    }
    std::mem::forget(built);
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A default certificate for `weft render` and `weft check`, which touch no run_dir: a new
/// one each time (`weft run` keeps its own in run_dir).
fn default_cert(config: &Config) -> anyhow::Result<String> {
    Ok(match config.haproxy.tls {
        Some(_) => weft::haproxy::tls::generate_default()?,
        None => String::new(),
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
        out!("{}", Escaped(failure));
        problems += 1;
    }
    out!(
        "routing: {} services, {} routes, {} dropped",
        built.table.backends.len(),
        built.table.routes.len(),
        built.dropped.len()
    );
    for dropped in &built.dropped {
        out!("dropped: {}", Escaped(dropped));
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
            &RenderSettings::new(&config.haproxy, dir.path(), &default_cert(&config)?),
        )?;
        stage(dir.path(), &rendered)?;
        let staged = dir.path().join(CONFIG_FILE);
        match validate(&config.haproxy.binary, &staged, &rendered.config).await {
            Ok(()) => out!("haproxy -c: ok"),
            Err(ValidateError::Rejected { stderr, .. }) => {
                out!("haproxy -c: rejected:");
                for line in stderr.lines() {
                    out!("{}", Escaped(line));
                }
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
    weft::controller::run(config, shutdown, CancellationToken::new()).await?;
    Ok(ExitCode::SUCCESS)
}

//! The `gateway` binary: parse options, set up logs, bind, serve until SIGTERM or Ctrl-C.

use clap::Parser;
use gateway::Config;
use gateway::config::LogFormat;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{FilterExt, FilterFn, LevelFilter};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> ExitCode {
    let config = Config::parse();
    if config.healthcheck {
        return healthcheck(&config);
    }
    init_tracing(config.log_format);
    if let Err(e) = config.validate() {
        tracing::error!("{e}");
        return ExitCode::from(2);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = config.worker_threads {
        builder.worker_threads(workers);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(listen = %config.listen, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        // Spawned rather than run here: a future given to `block_on` runs on this thread, outside
        // the runtime's workers, so every connection its accept loop spawned had to be handed over
        // and a worker woken for it. On a worker, a new connection's task starts on the same one.
        match tokio::spawn(gateway::run(config, listener, shutdown_signal())).await {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
            Err(e) => {
                tracing::error!(error = %e, "the node's task failed");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The WebSocket library logs frame payloads (tokens in `refresh` frames) at trace level:
    // its trace events are dropped whatever RUST_LOG says. A filter of their own, not a
    // directive: a directive would lose to a more specific one in RUST_LOG, and would turn the
    // library's debug lines on under a quieter RUST_LOG. A `FilterFn` sees only a call site's
    // static metadata, so its answer is cached per call site; its level hint is left open, so
    // that the combined hint stays RUST_LOG's and disabled call sites stay free.
    let no_payloads = FilterFn::new(|meta| {
        !(*meta.level() == Level::TRACE
            && (meta.target().starts_with("tungstenite") || meta.target().starts_with("tokio_tungstenite")))
    })
    .with_max_level_hint(LevelFilter::TRACE);
    let filter = filter.and(no_payloads);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => tracing_subscriber::registry().with(layer.with_filter(filter)).init(),
        LogFormat::Json => tracing_subscriber::registry().with(layer.json().with_filter(filter)).init(),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}

/// `gateway --healthcheck`: GET /healthz on the listen port (0.0.0.0 probes 127.0.0.1).
fn healthcheck(config: &Config) -> ExitCode {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let probe = async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<bool, std::io::Error>(head.starts_with(b"HTTP/1.1 200"))
    };
    let healthy = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()
        .and_then(|rt| rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), probe).await.ok()?.ok() }));
    if healthy == Some(true) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

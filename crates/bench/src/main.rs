//! `gateway-bench`: see `gateway-bench --help` and the library docs.

use clap::Parser;
use gateway_bench::cli::{Cli, Command, Common};
use gateway_bench::report::emit;
use gateway_bench::scenario::{self, Ctx};
use gateway_bench::target::resolve_all;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let validated = match &cli.command {
        Command::Fanout(a) => a.validate(),
        Command::Idle(a) => a.validate(),
        Command::Churn(a) => a.validate(),
        Command::MaxRate(a) => a.validate(),
    };
    if let Err(e) = validated.and_then(|()| {
        if (1..=256).contains(&cli.threads) { Ok(()) } else { Err("--threads must be 1..=256".to_owned()) }
    }) {
        tracing::error!("{e}");
        return ExitCode::from(2);
    }
    let runtime = if cli.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cli.threads).enable_all().build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    // Start the shared clock before anything is timed.
    let _ = gateway_bench::sys::now_ns();
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let common: &Common = match &cli.command {
        Command::Fanout(a) => &a.common,
        Command::Idle(a) => &a.common,
        Command::Churn(a) => &a.common,
        Command::MaxRate(a) => &a.common,
    };
    let targets = match resolve_all(&common.urls, common.allow_remote).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let ctx = Ctx { targets, common: common.clone(), threads: cli.threads, progress: !cli.quiet };
    let json_out = cli.json_out.as_deref();
    let written = match &cli.command {
        Command::Fanout(a) => {
            let p = scenario::fanout::FanoutParams::new(&a.load, a.rate, a.duration, 1);
            match scenario::fanout::run(&ctx, p, "fanout").await {
                Ok(r) => emit(&r, json_out),
                Err(e) => return fail(&e),
            }
        }
        Command::Idle(a) => match scenario::idle::run(&ctx, a).await {
            Ok(r) => emit(&r, json_out),
            Err(e) => return fail(&e),
        },
        Command::Churn(a) => emit(&scenario::churn::run(&ctx, a).await, json_out),
        Command::MaxRate(a) => match scenario::max_rate::run(&ctx, a).await {
            Ok(r) => emit(&r, json_out),
            Err(e) => return fail(&e),
        },
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot write the summary");
            ExitCode::FAILURE
        }
    }
}

fn fail(e: &scenario::RunError) -> ExitCode {
    tracing::error!("{e}");
    ExitCode::FAILURE
}

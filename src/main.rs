//! The `chargegate` binary: parses the command line, and either serves or runs a client command.

use std::process::ExitCode;

use chargegate::{
    cli::{Cli, Command, ConfigCommand},
    server::{self, ServeError},
    settings, telemetry,
};
use clap::Parser;

/// mimalloc: measurably cheaper than the system allocator for the many small, short-lived
/// allocations of gRPC calls (see the README's Performance section).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The exit code for a configuration that cannot be used (EX_CONFIG is 78; EX_USAGE 64 is what
/// operators and the contract expect here).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.command {
        None => serve(&runtime, cli.serve),
        Some(Command::Serve(args)) => serve(&runtime, *args),
        Some(Command::Config(args)) => match args.command {
            ConfigCommand::Defaults => {
                print!("{}", settings::default_toml());
                ExitCode::SUCCESS
            }
            ConfigCommand::Check(args) => match args.resolve() {
                Ok(config) => {
                    println!("{config:#?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("chargegate: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            },
        },
        Some(Command::Migrate(args)) => migrate(&runtime, *args),
        Some(command) => match runtime.block_on(chargegate::cli::run_client(command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e)
                if e.downcast_ref::<chargegate::cli::StdoutError>()
                    .is_some_and(|e| e.reader_gone()) =>
            {
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chargegate: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `chargegate migrate`: the schema of a PostgreSQL `store_url`, applied under the advisory lock
/// every instance takes.
fn migrate(runtime: &tokio::runtime::Runtime, args: chargegate::cli::ServeArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("chargegate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let chargegate::config::StoreBackend::Postgres { url } = &config.store else {
        eprintln!(
            "chargegate: store_url: migrate applies the PostgreSQL schema; the SQLite store migrates itself when it opens"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    match runtime.block_on(chargegate::store::postgres::migrate_url(url)) {
        Ok(applied) if applied.is_empty() => {
            println!(
                "the schema is current (version {})",
                chargegate::store::postgres::schema::VERSION
            );
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            println!(
                "applied migrations {applied:?}; the schema is at version {}",
                chargegate::store::postgres::schema::VERSION
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chargegate: migrate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(runtime: &tokio::runtime::Runtime, args: chargegate::cli::ServeArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("chargegate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init_logging(config.log_format);
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        server::run(listener, config, shutdown_signal())
            .await
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("chargegate: {e:#}");
            let config_error = matches!(
                e.downcast_ref::<ServeError>(),
                Some(
                    ServeError::Config(_)
                        | ServeError::AccessList(_)
                        | ServeError::Clients(_)
                        | ServeError::Tls(_)
                        | ServeError::Key(_)
                        | ServeError::Archive(_)
                )
            );
            if config_error {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("chargegate: second signal, exiting at once");
        std::process::exit(130);
    });
}

//! The `switchyard` binary: a thin shell over the library.

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// mimalloc, set up by `main` (see [`switchyard::allocator`]).
#[global_allocator]
static GLOBAL: switchyard::allocator::Allocator = switchyard::allocator::Allocator {};

fn main() {
    switchyard::allocator::configure();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Parses the command line, sets up logs and traces, and runs the subcommand.
async fn run() {
    let cli = switchyard::cli::Cli::parse();
    let tracing = match switchyard::trace::Tracing::init(cli.service_name(), cli.otlp_endpoint()) {
        Ok(tracing) => tracing,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cli.default_log_filter()));
    tracing.install(filter);
    let result = cli.run().await;
    // The exporter's HTTP client blocks: export what is left off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
    if let Err(e) = result {
        // One line with the whole chain of causes, never a backtrace: every error names its fix.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

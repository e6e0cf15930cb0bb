//! The `switchyard` binary: a thin shell over the library.

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's allocator: the router allocates and frees per record, and
/// `scripts/bench-routing` measured 71.0k / 71.4k events/s with glibc against 81.1k / 74.5k with
/// mimalloc (alternated, a fresh broker per run).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
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

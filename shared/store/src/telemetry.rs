//! Logging: one `init` for every binary.

use tracing_subscriber::EnvFilter;

/// Log settings shared by every binary (flatten it into a clap struct).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter, `tracing_subscriber::EnvFilter` syntax.
    #[arg(
        long = "log",
        env = "RUST_LOG",
        default_value = "info,sqlx=warn,apalis=warn,apalis_core=warn,apalis_postgres=warn"
    )]
    pub filter: String,
    /// Log as JSON lines instead of text.
    #[arg(long = "log-json", env = "LOG_JSON", default_value_t = false)]
    pub json: bool,
}

/// Installs the global subscriber (logs go to stderr). Call once, first thing in `main`.
pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_new(&args.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

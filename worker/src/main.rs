use clap::Parser;

// One thread: the process waits on the database, it does not compute, and
// a wake-up that crosses threads costs a futex round of its own on top of
// each database round trip (measured in docs/benchmarks/profile.md). Scale
// out with processes.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = worker::Config::parse();
    store::telemetry::init(&config.log);
    worker::run(config, store::shutdown::signal()).await
}

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = worker::Config::parse();
    shared::telemetry::init(&config.log);
    worker::run(config, shared::shutdown::signal()).await
}

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = api::Config::parse();
    shared::telemetry::init(&config.log);
    api::run(config, shared::shutdown::signal()).await
}

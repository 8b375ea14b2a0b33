//! A worker process running the engine's test workflows (queue `engine`),
//! configured exactly like `widget-worker`.

use std::time::Duration;

use clap::Parser;
use harness::workflows::{Counter, Flaky, Gated, Messenger, NoOp, Parent, Ticker};
use shared::engine::Runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = worker::Config::parse();
    shared::telemetry::init(&config.log);
    let pool = config
        .database
        .migrated_pool("engine-test-worker", Duration::from_secs(30))
        .await?;
    Runtime::new(
        pool.clone(),
        config
            .database
            .connect_options("engine-test-worker-registry")?,
        config.runtime(),
    )
    .register(Counter)
    .register(NoOp)
    .register(Ticker)
    .register(Gated)
    .register(Messenger)
    .register(Parent)
    .register(Flaky { pool })
    .run(shared::shutdown::signal())
    .await
}

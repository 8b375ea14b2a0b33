//! A worker process running the engine's test workflows (queue `engine`),
//! configured exactly like `widget-worker`, on a database with the engine's
//! schema alone.

use clap::Parser;
use engine::Runtime;
use harness::workflows::{Counter, Flaky, Gated, Messenger, NoOp, Parent, Ticker};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = worker::Config::parse();
    store::telemetry::init(&config.log);
    let pool = config.database.pool("engine-test-worker")?;
    engine::run_migrations(&pool).await?;
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
    .run(store::shutdown::signal())
    .await
}

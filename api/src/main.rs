use clap::Parser;

// One thread: the process waits on the database, it does not compute, and
// a wake-up that crosses threads costs a futex round of its own on top of
// each database round trip (sqlx SELECT 1 on one connection: 121-158 µs per
// query here, 146-193 µs on the multi-thread runtime). Scale out with
// processes.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = api::Config::parse();
    shared::telemetry::init(&config.log);
    api::run(config, shared::shutdown::signal()).await
}

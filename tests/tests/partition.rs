//! A worker cut off from PostgreSQL by the network, under load: it runs in
//! a network namespace of its own, reaching a private PostgreSQL over a
//! veth pair, and the link is taken down for 40 s (packets dropped, no
//! reset), then brought back. Its heartbeat stops, so the others take its
//! workflows over after `WORKER_STALE_AFTER`; its open transactions end
//! with `DB_IDLE_IN_TRANSACTION_TIMEOUT`; healed, it learns it was silent
//! too long. Every flow completes within 5 s of its normal time, each
//! dispatch step applied once.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use harness::postgres::{PrivatePostgres, is_root, run};
use harness::{
    Api, Proc, TestDb, assert_flows_taken_over, bin, normal_flow_latency, restock, shoppers_until,
    spawn_store_worker, wait_for_log, wait_workers, worker_env,
};
use tokio::time::Instant;

const CUT_FOR: Duration = Duration::from_secs(40);
const CLIENTS: usize = 4;

/// A network namespace joined to the host by a veth pair: the host side
/// `10.231.<n>.1`, the namespace side `10.231.<n>.2`. Removed when dropped.
struct Namespace {
    name: String,
    host_link: String,
    host_address: String,
}

impl Namespace {
    fn create() -> anyhow::Result<Self> {
        if Command::new("ip").arg("-V").output().is_err() {
            run(Command::new("apt-get").args(["install", "-y", "-qq", "iproute2"]))?;
        }
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let n = 1 + rand::random::<u8>() % 250;
        let namespace = Namespace {
            name: format!("wpart{tag}"),
            host_link: format!("vh{tag}"),
            host_address: format!("10.231.{n}.1"),
        };
        let inner_link = format!("vn{tag}");
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        ip(&["netns", "add", &namespace.name])?;
        ip(&[
            "link",
            "add",
            &namespace.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &inner_link,
        ])?;
        ip(&["link", "set", &inner_link, "netns", &namespace.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", namespace.host_address),
            "dev",
            &namespace.host_link,
        ])?;
        ip(&["link", "set", &namespace.host_link, "up"])?;
        let inside = format!("10.231.{n}.2/24");
        ip(&[
            "-n",
            &namespace.name,
            "addr",
            "add",
            &inside,
            "dev",
            &inner_link,
        ])?;
        ip(&["-n", &namespace.name, "link", "set", &inner_link, "up"])?;
        ip(&["-n", &namespace.name, "link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// Takes the host's side of the link down (`false`) or up: down, every
    /// packet either way is dropped, and no connection is reset.
    fn link(&self, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        run(Command::new("ip").args(["link", "set", &self.host_link, state]))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_by_the_network_is_taken_over_within_seconds() -> anyhow::Result<()> {
    anyhow::ensure!(is_root(), "network namespaces need root (CI runs as root)");
    let namespace = Namespace::create()?;
    let pg = PrivatePostgres::listening_on(&[&namespace.host_address])?;
    let db = TestDb::create_on(&pg.url("postgres")).await?;
    let api = Arc::new(Api::start(&db, &[]).await?);
    restock(&api, 100_000).await?;
    let extra = [("DISPATCH_INTERVAL", "100ms")];
    let _peers = [
        spawn_store_worker(&db, "partition-peer-a", &extra)?,
        spawn_store_worker(&db, "partition-peer-b", &extra)?,
    ];
    // The third worker, inside the namespace, reaches PostgreSQL over the veth.
    let mut env = worker_env(&db, &extra);
    env.retain(|(key, _)| *key != "DATABASE_URL");
    env.push(("DATABASE_URL", pg.url_at(&namespace.host_address, &db.name)));
    let worker = bin("widget-worker");
    let cut_off = Proc::spawn(
        "partition-cut-off",
        Path::new("ip"),
        &["netns", "exec", &namespace.name, &worker.to_string_lossy()],
        &env,
    )?;
    wait_workers(&db.pool, 3).await?;

    let normal = normal_flow_latency(&api).await?;
    let load = shoppers_until(
        api.clone(),
        CLIENTS,
        Instant::now() + CUT_FOR + Duration::from_secs(4),
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // mid-load
    namespace.link(false)?;
    tokio::time::sleep(CUT_FOR).await; // the partition itself
    namespace.link(true)?;

    let flows = load.await??;
    assert_flows_taken_over(
        &db.pool,
        &flows,
        normal,
        &format!("a {CUT_FOR:?} partition"),
    )
    .await?;
    // Healed (TCP retransmits back off, so allow them a while), it finds
    // it was silent too long.
    wait_for_log(
        &cut_off,
        "silent past WORKER_STALE_AFTER",
        Duration::from_secs(90),
    )
    .await?;
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM engine.workflows WHERE status = 'failed'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(failed, 0, "no workflow failed");
    drop(cut_off);
    // The private cluster, and the database with it, go when `pg` drops.
    db.pool.close().await;
    Ok(())
}

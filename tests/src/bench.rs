//! What the store's benchmarks share: the release stack they run against
//! and one shopper's flow over HTTP. `widget-bench` measures levels of
//! concurrency on it, `widget-soak` a long run with retention on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{Api, Proc, TestDb, wait_until};

/// A release binary of the workspace (the benchmarks measure what ships).
pub fn release(name: &str) -> PathBuf {
    crate::target_dir().join("release").join(name)
}

/// Fails with the command to run when the release binaries are missing.
pub fn ensure_release_built() -> anyhow::Result<()> {
    anyhow::ensure!(
        release("widget-api").exists() && release("widget-worker").exists(),
        "build first: cargo build --release --bins"
    );
    Ok(())
}

/// The API and `workers` worker processes on a fresh database with a
/// million units of stock.
pub struct Stack {
    /// The database, dropped by [`Stack::stop`].
    pub db: TestDb,
    /// The API.
    pub api: Api,
    /// The workers.
    pub workers: Vec<Proc>,
    /// The pool size of each process.
    pub pool_size: u32,
    /// What every process was started with.
    pub env: Vec<(&'static str, String)>,
}

/// The production defaults (chaos off: its crash listener would be one more
/// connection that PostgreSQL wakes at every notification), but for the
/// pool, the concurrency and a payment timeout longer than any level.
fn env(db: &TestDb, pool_size: u32) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url.clone()),
        ("DB_MAX_CONNECTIONS", pool_size.to_string()),
        ("WORKER_CONCURRENCY", "64".into()),
        ("DISPATCH_INTERVAL", "1000ms".into()),
        ("PAYMENT_TIMEOUT", "600000ms".into()),
        ("DEMO_PAYMENTS", "true".into()),
        // Every client here is 127.0.0.1: no per-client limits.
        ("CHECKOUT_RATE", "0".into()),
        ("MAX_PENDING_CHECKOUTS", "0".into()),
        ("RUST_LOG", "warn".into()),
    ]
}

impl Stack {
    /// Starts the stack; `extra` is added to (and overrides) [`env`].
    pub async fn start(
        workers: usize,
        pool_size: u32,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<Self> {
        let db = TestDb::create().await?;
        sqlx::query("UPDATE products SET inventory = 1000000")
            .execute(&db.pool)
            .await?;
        let mut env = env(&db, pool_size);
        env.retain(|(key, _)| extra.iter().all(|(k, _)| k != key));
        env.extend(extra.iter().cloned());
        let api = Api::launch(&release("widget-api"), env.clone()).await?;
        let mut stack = Self {
            db,
            api,
            workers: Vec::new(),
            pool_size,
            env,
        };
        for _ in 0..workers {
            stack.workers.push(stack.spawn_worker()?);
        }
        let expected = workers as i64;
        wait_until("workers registered", Duration::from_secs(60), || async {
            Ok(crate::live_workers(&stack.db.pool).await? == expected)
        })
        .await?;
        Ok(stack)
    }

    /// One more worker with the stack's environment.
    pub fn spawn_worker(&self) -> anyhow::Result<Proc> {
        Proc::spawn(
            "bench-store-worker",
            &release("widget-worker"),
            &[],
            &self.env,
        )
    }

    /// Stops every process and drops the database.
    pub async fn stop(self) -> anyhow::Result<()> {
        let Self {
            db, api, workers, ..
        } = self;
        drop((api, workers));
        db.drop_database().await
    }
}

/// One shopper's flow that went through: its two requests' latencies.
pub struct Flow {
    /// `POST /checkout/{key}` until its payment id, ms.
    pub checkout_ms: f64,
    /// The payment webhook, ms.
    pub webhook_ms: f64,
}

/// A checkout, then its payment webhook (`paid` or `failed`). A failure is
/// named by what failed ("checkout 503", "webhook transport", ...).
pub async fn one_flow(http: &reqwest::Client, base: &str, paid: bool) -> Result<Flow, String> {
    let key = uuid::Uuid::new_v4().simple().to_string();
    let t0 = Instant::now();
    let r = http
        .post(format!("{base}/checkout/{key}"))
        .send()
        .await
        .map_err(|_| "checkout transport".to_owned())?;
    let status = r.status();
    let payment_id = r.text().await.unwrap_or_default();
    let t1 = Instant::now();
    if !status.is_success() {
        return Err(format!("checkout {}", status.as_u16()));
    }
    let outcome = if paid { "paid" } else { "failed" };
    let r = http
        .post(format!("{base}/payment_webhook/{payment_id}/{outcome}"))
        .send()
        .await
        .map_err(|_| "webhook transport".to_owned())?;
    let status = r.status();
    let _ = r.bytes().await;
    let t2 = Instant::now();
    if !status.is_success() {
        return Err(format!("webhook {}", status.as_u16()));
    }
    Ok(Flow {
        checkout_ms: (t1 - t0).as_secs_f64() * 1000.0,
        webhook_ms: (t2 - t1).as_secs_f64() * 1000.0,
    })
}

/// A client of one benchmark shopper: its own connection.
pub fn shopper_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .expect("an HTTP client")
}

/// The `p`th percentile (0–100) of sorted values, 0 when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((p / 100.0) * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_ticks(&format!("/proc/{pid}/stat")).map_or(0.0, |ticks| ticks / 100.0)
}

/// User + system CPU time in a `/proc/.../stat` file, in ticks (10 ms).
fn stat_cpu_ticks(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
}

/// CPU seconds of every PostgreSQL server process on the machine.
pub fn postgres_cpu_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_seconds)
        .sum()
}

/// A memory figure from /proc/<pid>/status in MB (VmRSS now, VmHWM peak).
pub fn memory_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The machine in one line: cores, memory, the server's version.
pub async fn machine(pool: &sqlx::PgPool) -> anyhow::Result<String> {
    let gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let server: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await?;
    Ok(format!(
        "{} cores, {gib:.0} GiB, PostgreSQL {server}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
    ))
}

/// CPU milliseconds a fixed piece of work (integer mixing over a 1 MiB
/// buffer, about 11 ms here) takes on this machine now. It is measured in
/// the calling thread's CPU time, so waiting for a core does not count:
/// what it tracks is the speed a core gives this work now, one kind of the
/// drift a shared host shows, not every kind (the soak's database blocks
/// per flow is the figure no drift moves). Call it from a thread of its
/// own (`spawn_blocking`).
pub fn speed_probe_ms() -> f64 {
    let mut buffer = vec![0u64; 1 << 17];
    let start = thread_cpu_ms();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..48u64 {
        for (i, slot) in buffer.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *slot = slot.wrapping_add(x ^ (i as u64).wrapping_add(round));
        }
    }
    std::hint::black_box(&buffer);
    thread_cpu_ms() - start
}

/// CPU milliseconds of the calling thread: the scheduler's exact figure
/// (`se.sum_exec_runtime`) where the kernel shows it, else user + system
/// time in ticks (10 ms).
fn thread_cpu_ms() -> f64 {
    let exact = std::fs::read_to_string("/proc/thread-self/sched")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("se.sum_exec_runtime"))?
                .rsplit(':')
                .next()?
                .trim()
                .parse::<f64>()
                .ok()
        });
    exact.unwrap_or_else(|| {
        stat_cpu_ticks("/proc/thread-self/stat").map_or(0.0, |ticks| ticks * 10.0)
    })
}

/// The machine's CPU time so far in ticks: (stolen by the host, all).
pub fn machine_ticks() -> (u64, u64) {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let fields: Vec<u64> = s
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .take(8)
                .filter_map(|v| v.parse().ok())
                .collect();
            Some((fields.get(7).copied().unwrap_or(0), fields.iter().sum()))
        })
        .unwrap_or((0, 0))
}

/// Shared-buffer blocks the current database has touched so far (hits and
/// reads), and those it had to read from outside shared buffers: the work
/// its statements did, whatever the machine's speed.
pub async fn database_blocks(pool: &sqlx::PgPool) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT blks_hit + blks_read, blks_read FROM pg_stat_database
          WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

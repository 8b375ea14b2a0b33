//! The store's benchmark: end-to-end checkout flows over real HTTP against a
//! fresh stack, printed next to PostgreSQL's own ceiling measured by pgbench
//! on the same server in the same run.
//!
//!   cargo build --release --bins
//!   ./target/release/widget-bench --workers 2 --out docs/benchmarks
//!
//! PostgreSQL: WIDGET_TEST_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable);
//! `tests/bench.sh` finds or starts one the way the launcher does.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use harness::bench::{
    Stack, cpu_seconds, ensure_release_built, machine, memory_mb, one_flow, percentile,
    postgres_cpu_seconds, shopper_client,
};
use harness::{first_step_elsewhere, wait_until};
use rand::Rng;
use serde_json::{Value, json};
use sqlx::PgPool;

#[derive(Parser)]
struct Args {
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Client concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    levels: Vec<usize>,
    /// Measured seconds per level (after a warm-up of a third of it).
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// SIGKILLs for the takeover measurement.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Checkouts parked at once for the capacity measurement.
    #[arg(long, default_value_t = 10_000)]
    parked: usize,
    /// Pool size of the API and of each worker (DB_MAX_CONNECTIONS).
    #[arg(long, default_value_t = store::db::DEFAULT_MAX_CONNECTIONS)]
    db_max_connections: u32,
    /// Where to write latest.json, latest.md and throughput.svg.
    #[arg(long, default_value = "docs/benchmarks")]
    out: PathBuf,
}

// ------------------------------------------------------------ the ceiling

fn pgbench(url: &str, script: &str, clients: u32, seconds: u32) -> anyhow::Result<f64> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin/pgbench")))
        .filter(|p| p.exists())
        .max()
        .context("pgbench not found")?;
    let file = std::env::temp_dir().join(format!("bench-{}.sql", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, script)?;
    let output = Command::new(bin)
        .args([
            "-n",
            "-T",
            &seconds.to_string(),
            "-j",
            &clients.min(2).to_string(),
            "-c",
            &clients.to_string(),
            "-f",
        ])
        .arg(&file)
        .arg(url)
        .output()?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| {
            format!(
                "pgbench said: {text} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
}

/// PostgreSQL's own figures on the same server, same run.
struct Ceiling {
    /// Single-row insert commits/s at 16 clients.
    insert_tps: f64,
    /// Claim + 3 inserts + complete cycles/s at 16 clients.
    cycle_tps: f64,
    /// One `SELECT 1` round trip at 1 client, µs: what every statement on
    /// a flow's path costs at least.
    round_trip_us: f64,
}

async fn ceiling(pool: &PgPool, url: &str) -> anyhow::Result<Ceiling> {
    sqlx::raw_sql(
        "CREATE TABLE bench_insert (id bigserial PRIMARY KEY, v int);
         CREATE TABLE bench_jobs (id bigserial PRIMARY KEY, status text NOT NULL);
         CREATE TABLE bench_steps (job bigint NOT NULL, seq int NOT NULL, PRIMARY KEY (job, seq));",
    )
    .execute(pool)
    .await?;
    let insert = pgbench(url, "INSERT INTO bench_insert (v) VALUES (1);\n", 16, 10)?;
    let round_trip_us = 1e6 / pgbench(url, "SELECT 1;\n", 1, 5)?;
    // One queue cycle = claim + 3 checkpoint inserts + complete, each its own commit.
    let cycle = pgbench(
        url,
        "INSERT INTO bench_jobs (status) VALUES ('running') RETURNING id AS job \\gset\n\
         INSERT INTO bench_steps (job, seq) VALUES (:job, 1);\n\
         INSERT INTO bench_steps (job, seq) VALUES (:job, 2);\n\
         INSERT INTO bench_steps (job, seq) VALUES (:job, 3);\n\
         UPDATE bench_jobs SET status = 'done' WHERE id = :job;\n",
        16,
        10,
    )?;
    sqlx::raw_sql("DROP TABLE bench_insert, bench_jobs, bench_steps")
        .execute(pool)
        .await?;
    Ok(Ceiling {
        insert_tps: insert,
        cycle_tps: cycle,
        round_trip_us,
    })
}

// ------------------------------------------------------------ flows

#[derive(Default)]
struct Samples {
    checkout: Vec<f64>,
    webhook: Vec<f64>,
    flow: Vec<f64>,
    paid: u64,
    errors: u64,
    /// Failed requests by kind ("checkout 503", "webhook transport", ...).
    error_kinds: std::collections::BTreeMap<String, u64>,
}

impl Samples {
    fn error(&mut self, kind: String) {
        self.errors += 1;
        *self.error_kinds.entry(kind).or_default() += 1;
    }
}

fn summary(values: &mut [f64]) -> Value {
    values.sort_by(f64::total_cmp);
    json!({
        "p50_ms": percentile(values, 50.0), "p95_ms": percentile(values, 95.0),
        "p99_ms": percentile(values, 99.0), "max_ms": values.last().copied().unwrap_or(0.0),
    })
}

/// Closed-loop clients, each on its own connections, for `duration`.
async fn run_flows(base: &str, clients: usize, duration: Duration) -> Samples {
    let until = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let base = base.to_owned();
            tokio::spawn(async move {
                let http = shopper_client();
                let mut s = Samples::default();
                while Instant::now() < until {
                    let paid = rand::rng().random_bool(0.8);
                    match one_flow(&http, &base, paid).await {
                        Ok(flow) => {
                            s.checkout.push(flow.checkout_ms);
                            s.webhook.push(flow.webhook_ms);
                            s.flow.push(flow.checkout_ms + flow.webhook_ms);
                            s.paid += u64::from(paid);
                        }
                        Err(kind) => s.error(kind),
                    }
                }
                s
            })
        })
        .collect();
    let mut all = Samples::default();
    for task in tasks {
        if let Ok(s) = task.await {
            all.checkout.extend(s.checkout);
            all.webhook.extend(s.webhook);
            all.flow.extend(s.flow);
            all.paid += s.paid;
            all.errors += s.errors;
            for (kind, n) in s.error_kinds {
                *all.error_kinds.entry(kind).or_default() += n;
            }
        }
    }
    all
}

async fn commits(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure_release_built()?;
    let mut s = Stack::start(args.workers, args.db_max_connections, &[]).await?;
    let machine = machine(&s.db.pool).await?;
    println!("widget-bench: {} worker(s); {machine}", args.workers);

    let Ceiling {
        insert_tps,
        cycle_tps,
        round_trip_us,
    } = ceiling(&s.db.pool, &s.db.url).await?;
    println!(
        "ceiling (pgbench, 16 clients): {insert_tps:.0} single-row insert commits/s; {cycle_tps:.0} queue cycles/s (claim + 3 inserts + complete); \
         round trip (SELECT 1, 1 client): {round_trip_us:.0} µs"
    );

    let mut levels = Vec::new();
    for &clients in &args.levels {
        let measure = Duration::from_secs(args.seconds);
        run_flows(&s.api.base, clients, measure / 3).await; // warm-up
        let commits_before = commits(&s.db.pool).await?;
        let cpu_before = (
            cpu_seconds(s.api.proc.pid()),
            s.workers.iter().map(|w| cpu_seconds(w.pid())).sum::<f64>(),
            postgres_cpu_seconds(),
        );
        let started = Instant::now();
        let mut samples = run_flows(&s.api.base, clients, measure).await;
        let elapsed = started.elapsed().as_secs_f64();
        let commit_delta = (commits(&s.db.pool).await? - commits_before) as f64;
        let flows = samples.flow.len() as f64;
        let per_1000 = |before: f64, after: f64| (after - before) / flows.max(1.0) * 1000.0;
        let mut level = json!({
            "clients": clients,
            "flows_per_s": flows / elapsed,
            "flows": flows,
            "errors": samples.errors,
            "error_kinds": samples.error_kinds,
            "checkout": summary(&mut samples.checkout),
            "webhook": summary(&mut samples.webhook),
            "flow": summary(&mut samples.flow),
            "commits_per_paid_order": commit_delta / (samples.paid as f64).max(1.0),
            "cpu_s_per_1000_flows": {
                "api": per_1000(cpu_before.0, cpu_seconds(s.api.proc.pid())),
                "workers": per_1000(cpu_before.1, s.workers.iter().map(|w| cpu_seconds(w.pid())).sum()),
                "postgres": per_1000(cpu_before.2, postgres_cpu_seconds()),
            },
            "ratio_to_insert_ceiling": flows / elapsed / insert_tps,
        });
        // At one client nothing queues: the checkout's p50 in round trips
        // is how many sequential waits its path is made of.
        let checkout_p50 = level["checkout"]["p50_ms"].as_f64().unwrap_or(0.0);
        let in_round_trips = if clients == 1 {
            level["checkout_p50_round_trips"] = json!(checkout_p50 * 1000.0 / round_trip_us);
            format!(
                " ({:.0} round trips)",
                checkout_p50 * 1000.0 / round_trip_us
            )
        } else {
            String::new()
        };
        println!(
            "c={clients:>2}: {:>6.1} flows/s | checkout p50 {:.1}{in_round_trips} p99 {:.1} ms | webhook p50 {:.1} p99 {:.1} ms | flow p50 {:.1} p95 {:.1} p99 {:.1} max {:.1} ms | {:.1} commits/paid order | errors {} {:?}",
            level["flows_per_s"].as_f64().unwrap_or(0.0),
            checkout_p50,
            level["checkout"]["p99_ms"].as_f64().unwrap_or(0.0),
            level["webhook"]["p50_ms"].as_f64().unwrap_or(0.0),
            level["webhook"]["p99_ms"].as_f64().unwrap_or(0.0),
            level["flow"]["p50_ms"].as_f64().unwrap_or(0.0),
            level["flow"]["p95_ms"].as_f64().unwrap_or(0.0),
            level["flow"]["p99_ms"].as_f64().unwrap_or(0.0),
            level["flow"]["max_ms"].as_f64().unwrap_or(0.0),
            level["commits_per_paid_order"].as_f64().unwrap_or(0.0),
            samples.errors,
            samples.error_kinds,
        );
        levels.push(level);
    }
    let rss = json!({
        "api_peak_mb": memory_mb(s.api.proc.pid(), "VmHWM"),
        "workers_peak_mb": s.workers.iter().map(|w| memory_mb(w.pid(), "VmHWM")).fold(0.0, f64::max),
    });
    println!(
        "peak RSS after the flow levels: API {:.1} MB, largest worker {:.1} MB",
        rss["api_peak_mb"].as_f64().unwrap_or(0.0),
        rss["workers_peak_mb"].as_f64().unwrap_or(0.0)
    );

    let takeover = takeover(&mut s, args.kills).await?;
    let parked = parked(&s, args.parked).await?;

    let report = json!({
        "date": chrono::Utc::now().format("%Y-%m-%d").to_string(),
        "machine": machine,
        "workers": args.workers,
        "ceiling": {
            "insert_commits_per_s": insert_tps,
            "queue_cycles_per_s": cycle_tps,
            "round_trip_us": round_trip_us,
        },
        "levels": levels,
        "rss": rss,
        "takeover": takeover,
        "parked": parked,
    });
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("latest.md"), markdown(&report))?;
    std::fs::write(args.out.join("throughput.svg"), chart(&report))?;
    println!(
        "wrote {}/latest.json, latest.md, throughput.svg",
        args.out.display()
    );
    s.stop().await
}

/// SIGKILLs a worker during load (8 clients) and times, for each workflow
/// it was running, the kill until its next step on another worker.
async fn takeover(s: &mut Stack, kills: usize) -> anyhow::Result<Value> {
    let load = tokio::spawn({
        let base = s.api.base.clone();
        async move { run_flows(&base, 8, Duration::from_secs(3600)).await }
    });
    let mut times = Vec::new();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1000..2000))).await;
        let index = rand::rng().random_range(0..s.workers.len());
        let pid = s.workers[index].pid();
        let victim: Option<String> = sqlx::query_scalar("SELECT id FROM workers WHERE pid = $1")
            .bind(pid as i32)
            .fetch_optional(&s.db.pool)
            .await?;
        let Some(victim) = victim else { continue };
        let owned: Vec<String> =
            sqlx::query_scalar("SELECT id FROM workflows WHERE owner = $1 AND status = 'running'")
                .bind(&victim)
                .fetch_all(&s.db.pool)
                .await?;
        let dead = s.workers.remove(index);
        dead.signal("KILL")?;
        let at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&s.db.pool)
            .await?;
        drop(dead);
        s.workers.push(s.spawn_worker()?);
        for id in owned {
            let first = wait_for_step(&s.db.pool, &id, &victim, at).await?;
            if let Some(first) = first {
                times.push((first - at).to_std().unwrap_or_default().as_secs_f64() * 1000.0);
            }
        }
    }
    load.abort();
    let mut sorted = times.clone();
    let summary = summary(&mut sorted);
    println!(
        "takeover after SIGKILL under load ({} workflows over {kills} kills): p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
        times.len(),
        summary["p50_ms"].as_f64().unwrap_or(0.0),
        summary["p99_ms"].as_f64().unwrap_or(0.0),
        summary["max_ms"].as_f64().unwrap_or(0.0)
    );
    Ok(json!({ "kills": kills, "workflows": times.len(), "ms": summary }))
}

async fn wait_for_step(
    pool: &PgPool,
    id: &str,
    victim: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(first) = first_step_elsewhere(pool, id, victim, at).await? {
            return Ok(Some(first));
        }
        // A workflow that parked or finished meanwhile has no next step to wait for.
        let done: bool = sqlx::query_scalar("SELECT status IN ('succeeded', 'failed', 'cancelled', 'waiting') FROM workflows WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?;
        if done {
            return first_step_elsewhere(pool, id, victim, at).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}

/// Parks `n` checkouts waiting for payment, reads what they hold, then pays
/// them all and times until every checkout has finished.
async fn parked(s: &Stack, n: usize) -> anyhow::Result<Value> {
    let keys: Vec<String> = (0..n).map(|i| format!("parked-{i}")).collect();
    let http = reqwest::Client::new();
    let started = Instant::now();
    futures::future::try_join_all((0..64).map(|lane| {
        let (http, keys, base) = (http.clone(), keys.clone(), s.api.base.clone());
        async move {
            for key in keys.iter().skip(lane).step_by(64) {
                let r = http.post(format!("{base}/checkout/{key}")).send().await?;
                anyhow::ensure!(r.status().is_success(), "checkout {key}: {}", r.status());
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    let parked_in = started.elapsed();
    wait_until("all parked", Duration::from_secs(600), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workflows WHERE id LIKE 'parked-%' AND status = 'waiting'",
        )
        .fetch_one(&s.db.pool)
        .await?;
        Ok(waiting == n as i64)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await; // one registry heartbeat
    // Slots held by the parked checkouts themselves (dispatches of earlier
    // phases may still be running and are reported apart).
    let (in_flight, connections): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM workflows WHERE id LIKE 'parked-%' AND status = 'running'),
                (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'widget-worker%')",
    )
    .fetch_one(&s.db.pool)
    .await?;
    let api_mb = memory_mb(s.api.proc.pid(), "VmRSS");
    let worker_mb = s
        .workers
        .iter()
        .map(|w| memory_mb(w.pid(), "VmRSS"))
        .fold(0.0, f64::max);
    let paying = Instant::now();
    futures::future::try_join_all((0..64).map(|lane| {
        let (http, keys, base) = (http.clone(), keys.clone(), s.api.base.clone());
        async move {
            for key in keys.iter().skip(lane).step_by(64) {
                let r = http
                    .post(format!("{base}/payment_webhook/{key}/failed"))
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "webhook {key}: {}", r.status());
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    wait_until("all finished", Duration::from_secs(600), || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workflows WHERE id LIKE 'parked-%' AND status <> 'succeeded'",
        )
        .fetch_one(&s.db.pool)
        .await?;
        Ok(left == 0)
    })
    .await?;
    let finished_in = paying.elapsed();
    println!(
        "parked: {n} checkouts waiting for payment ({:.1?} to start them): slots they hold {in_flight}, worker connections open (pooled, idle included) {connections}, RSS API {api_mb:.1} MB, largest worker {worker_mb:.1} MB; all settled {:.1?} after their webhooks began",
        parked_in, finished_in
    );
    Ok(json!({
        "checkouts": n, "worker_slots_in_use": in_flight, "worker_connections": connections,
        "api_rss_mb": api_mb, "worker_rss_mb": worker_mb,
        "start_s": parked_in.as_secs_f64(), "settle_s": finished_in.as_secs_f64(),
    }))
}

fn markdown(r: &Value) -> String {
    let mut md = format!(
        "# Benchmark results\n\n{} on {} ({} worker(s)). Reproduce: `tests/bench.sh`.\n\n\
         PostgreSQL's own ceiling on the same server, same run (pgbench, 16 clients): \
         **{:.0}** single-row insert commits/s, **{:.0}** queue cycles/s (claim + 3 inserts + complete); \
         one round trip (`SELECT 1`, 1 client) **{:.0} µs**.\n\n\
         | clients | flows/s | × insert ceiling | checkout p50 / p99 ms | webhook p50 / p99 ms | flow p50 / p95 / p99 / max ms | commits / paid order | CPU s per 1,000 flows (API / workers / PostgreSQL) | errors |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        r["date"].as_str().unwrap_or(""),
        r["machine"].as_str().unwrap_or(""),
        r["workers"],
        r["ceiling"]["insert_commits_per_s"].as_f64().unwrap_or(0.0),
        r["ceiling"]["queue_cycles_per_s"].as_f64().unwrap_or(0.0),
        r["ceiling"]["round_trip_us"].as_f64().unwrap_or(0.0),
    );
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    for l in r["levels"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {:.1} | {:.4} | {:.1} / {:.1}{} | {:.1} / {:.1} | {:.1} / {:.1} / {:.1} / {:.1} | {:.1} | {:.2} / {:.2} / {:.2} | {} |\n",
            l["clients"], f(&l["flows_per_s"]), f(&l["ratio_to_insert_ceiling"]),
            f(&l["checkout"]["p50_ms"]), f(&l["checkout"]["p99_ms"]),
            l["checkout_p50_round_trips"].as_f64().map(|n| format!(" ({n:.0} round trips)")).unwrap_or_default(),
            f(&l["webhook"]["p50_ms"]), f(&l["webhook"]["p99_ms"]),
            f(&l["flow"]["p50_ms"]), f(&l["flow"]["p95_ms"]), f(&l["flow"]["p99_ms"]), f(&l["flow"]["max_ms"]),
            f(&l["commits_per_paid_order"]),
            f(&l["cpu_s_per_1000_flows"]["api"]), f(&l["cpu_s_per_1000_flows"]["workers"]), f(&l["cpu_s_per_1000_flows"]["postgres"]),
            l["errors"],
        ));
    }
    md.push_str(&format!(
        "\nPeak RSS after the flow levels: API {:.1} MB, largest worker {:.1} MB.\n\n\
         Takeover after SIGKILL under load ({} workflows over {} kills): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms.\n\n\
         Parked capacity: {} checkouts waiting for payment at once held {} worker slots; the workers had {} connections open (their pools, idle included); \
         RSS API {:.1} MB, largest worker {:.1} MB; all settled {:.1} s after their webhooks began.\n\n\
         ![flows/s and p99 flow latency against client concurrency](throughput.svg)\n",
        f(&r["rss"]["api_peak_mb"]), f(&r["rss"]["workers_peak_mb"]),
        r["takeover"]["workflows"], r["takeover"]["kills"],
        f(&r["takeover"]["ms"]["p50_ms"]), f(&r["takeover"]["ms"]["p99_ms"]), f(&r["takeover"]["ms"]["max_ms"]),
        r["parked"]["checkouts"], r["parked"]["worker_slots_in_use"], r["parked"]["worker_connections"],
        f(&r["parked"]["api_rss_mb"]), f(&r["parked"]["worker_rss_mb"]), f(&r["parked"]["settle_s"]),
    ));
    md
}

/// Issue 5's throughput target: three times the original demo's 82 flows/s
/// (at 32 clients), drawn on the chart.
const TARGET_FLOWS_PER_S: f64 = 250.0;

/// Flows/s (bars) and p99 flow latency (line) against client concurrency,
/// with the throughput target as a dashed line.
fn chart(r: &Value) -> String {
    let levels: Vec<(String, f64, f64)> = r["levels"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                l["clients"].to_string(),
                l["flows_per_s"].as_f64().unwrap_or(0.0),
                l["flow"]["p99_ms"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let (w, h, left, right, top, bottom) = (640.0, 360.0, 70.0, 70.0, 50.0, 50.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max_rate = levels
        .iter()
        .map(|l| l.1)
        .fold(TARGET_FLOWS_PER_S, f64::max)
        * 1.15;
    let max_p99 = levels.iter().map(|l| l.2).fold(1.0, f64::max) * 1.15;
    let slot = plot_w / levels.len().max(1) as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">Widget Store: flows/s (bars) and p99 flow latency (line) — {}</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>\n",
        w / 2.0,
        r["date"].as_str().unwrap_or(""),
        top + plot_h,
        left + plot_w,
        top + plot_h
    );
    for i in 0..=4 {
        let y = top + plot_h - plot_h * i as f64 / 4.0;
        svg.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eee\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#2b6cb0\">{:.0}</text>\
             <text x=\"{}\" y=\"{}\" fill=\"#c05621\">{:.0} ms</text>\n",
            left + plot_w,
            left - 6.0,
            y + 4.0,
            max_rate * i as f64 / 4.0,
            left + plot_w + 6.0,
            y + 4.0,
            max_p99 * i as f64 / 4.0
        ));
    }
    let mut points = Vec::new();
    for (i, (clients, rate, p99)) in levels.iter().enumerate() {
        let x = left + slot * i as f64 + slot * 0.2;
        let bar_h = plot_h * rate / max_rate;
        svg.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{bar_h}\" fill=\"#2b6cb0\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">c={clients}</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"white\">{rate:.0}</text>\n",
            top + plot_h - bar_h,
            slot * 0.6,
            x + slot * 0.3,
            top + plot_h + 18.0,
            x + slot * 0.3,
            (top + plot_h - bar_h + 16.0).min(top + plot_h - 4.0)
        ));
        points.push(format!(
            "{},{}",
            x + slot * 0.3,
            top + plot_h - plot_h * p99 / max_p99
        ));
    }
    let target_y = top + plot_h - plot_h * TARGET_FLOWS_PER_S / max_rate;
    svg.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{target_y}\" x2=\"{}\" y2=\"{target_y}\" stroke=\"#48bb78\" stroke-width=\"2\" stroke-dasharray=\"6 4\"/>\
         <text x=\"{}\" y=\"36\" text-anchor=\"middle\" font-size=\"11\" fill=\"#2f855a\">dashed: the target, {TARGET_FLOWS_PER_S:.0} flows/s at 32 clients</text>\n",
        left + plot_w,
        w / 2.0,
    ));
    svg.push_str(&format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#c05621\" stroke-width=\"2.5\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">client concurrency</text>\n</svg>\n",
        points.join(" "),
        left + plot_w / 2.0,
        h - 12.0
    ));
    svg
}

//! The soak benchmark: a million store flows (checkout, then its payment
//! webhook) by closed-loop clients against the release stack with a short
//! retention, printing throughput and p99 per decile of the run and the
//! engine's and the queue's table sizes over time. The run is flat when
//! the last decile's throughput is within 10 % of the second's (the first
//! warms caches and fills the tables up to what retention keeps). Beside
//! it: the database blocks a flow touches, which the machine's drifting
//! speed does not move, and the throughput corrected by the speed a fixed
//! CPU probe finds at every sample (one kind of that drift).
//!
//!   cargo build --release --bins
//!   ./target/release/widget-soak --flows 1000000 --out docs/benchmarks
//!
//! Writes soak-<date>.{json,md,svg} into `--out`. PostgreSQL:
//! WIDGET_TEST_ADMIN_URL, as for `widget-bench`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use harness::bench::{
    Stack, cpu_seconds, database_blocks, ensure_release_built, machine, machine_ticks, one_flow,
    percentile, postgres_cpu_seconds, shopper_client, speed_probe_ms,
};
use rand::Rng;
use serde::Serialize;

#[derive(Parser)]
struct Args {
    /// Flows to complete.
    #[arg(long, default_value_t = 1_000_000)]
    flows: u64,
    /// Closed-loop clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// WORKFLOW_RETENTION (and WORKER_PRUNE_AFTER for queue jobs) of the
    /// stack: short, so the tables reach their bounded size early.
    #[arg(long, default_value = "1m")]
    retention: String,
    /// Seconds between two samples of throughput and table sizes.
    #[arg(long, default_value_t = 10)]
    sample_every: u64,
    /// Pool size of the API and of each worker (DB_MAX_CONNECTIONS).
    #[arg(long, default_value_t = store::db::DEFAULT_MAX_CONNECTIONS)]
    db_max_connections: u32,
    /// Where to write soak-<date>.{json,md,svg}.
    #[arg(long, default_value = "docs/benchmarks")]
    out: PathBuf,
}

/// One tenth of the run, by flows completed.
#[derive(Serialize)]
struct Decile {
    decile: usize,
    flows: usize,
    seconds: f64,
    flows_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// CPU seconds per 1,000 flows of the API, the workers and PostgreSQL
    /// together, between the samples nearest the decile's ends. It moves
    /// with the machine's speed as well as with the work a flow takes.
    cpu_s_per_1000_flows: f64,
    /// Shared-buffer blocks the store's database touched per flow (hits
    /// and reads): the work a flow's statements did, whatever the
    /// machine's speed.
    db_blocks_per_flow: f64,
    /// Of those, blocks read from outside shared buffers per flow.
    db_reads_per_flow: f64,
    /// The machine's speed: mean CPU ms of [`speed_probe_ms`] in the
    /// decile (higher is slower).
    probe_ms: f64,
    /// CPU time the host stole from this machine, % of all.
    steal_pct: f64,
    /// Throughput had the machine run at the second decile's speed:
    /// flows/s × this decile's probe ms / the second's.
    flows_per_s_at_second_speed: f64,
}

/// The stack at one moment of the run.
#[derive(Serialize)]
struct Sample {
    at_s: f64,
    flows: u64,
    /// Flows/s since the previous sample.
    flows_per_s: f64,
    /// Rows (PostgreSQL's live-tuple estimate) and bytes (with indexes and
    /// TOAST) per table of the engine and the queue.
    tables: Vec<Table>,
    /// Workflows in the engine's table by status.
    workflows_by_status: Vec<(String, i64)>,
    /// CPU seconds used so far by the API, the workers and PostgreSQL.
    cpu_s: f64,
    /// Blocks the database touched so far, and read from outside shared
    /// buffers ([`database_blocks`]).
    db_blocks: i64,
    db_blocks_read: i64,
    /// CPU ms of one [`speed_probe_ms`] at this sample.
    probe_ms: f64,
    /// The machine's CPU ticks so far: stolen by the host, and all.
    steal_ticks: u64,
    machine_ticks: u64,
}

#[derive(Serialize, sqlx::FromRow)]
struct Table {
    name: String,
    rows: i64,
    bytes: i64,
}

impl Sample {
    fn engine_mb(&self) -> f64 {
        self.tables.iter().map(|t| t.bytes).sum::<i64>() as f64 / 1e6
    }
    fn engine_rows(&self) -> i64 {
        self.tables.iter().map(|t| t.rows).sum()
    }
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    flows: u64,
    clients: usize,
    workers: usize,
    retention: String,
    seconds: f64,
    errors: u64,
    deciles: Vec<Decile>,
    /// The last decile's throughput over the second's.
    last_over_second: f64,
    /// The last decile's CPU per flow over the second's.
    cpu_last_over_second: f64,
    /// The last decile's database blocks per flow over the second's.
    blocks_last_over_second: f64,
    /// The last decile's throughput at the second's machine speed over the
    /// second's.
    speed_adjusted_last_over_second: f64,
    samples: Vec<Sample>,
    /// The store's own records at the end (they are kept: business records).
    orders: i64,
}

/// What the clients share: flows done, when each decile ended, errors.
struct Progress {
    target: u64,
    done: AtomicU64,
    started: Instant,
    /// Microseconds from the start at which each decile's last flow ended.
    decile_ends: Vec<AtomicU64>,
}

impl Progress {
    fn decile_of(&self, index: u64) -> usize {
        (index * 10 / self.target) as usize
    }
}

/// One client: flows until the target is reached. Its latencies by decile,
/// and its errors by decile.
async fn client(base: String, progress: Arc<Progress>) -> (Vec<Vec<f64>>, Vec<u64>) {
    let http = shopper_client();
    let mut latencies = vec![Vec::new(); 10];
    let mut errors = vec![0u64; 10];
    while progress.done.load(Ordering::Relaxed) < progress.target {
        let paid = rand::rng().random_bool(0.8);
        let result = one_flow(&http, &base, paid).await;
        let index = match &result {
            Ok(_) => progress.done.fetch_add(1, Ordering::Relaxed),
            Err(_) => progress.done.load(Ordering::Relaxed),
        };
        if index >= progress.target {
            break;
        }
        let decile = progress.decile_of(index);
        match result {
            Ok(flow) => {
                latencies[decile].push(flow.checkout_ms + flow.webhook_ms);
                if progress.decile_of(index + 1) != decile || index + 1 == progress.target {
                    progress.decile_ends[decile].store(
                        progress.started.elapsed().as_micros() as u64,
                        Ordering::Relaxed,
                    );
                }
            }
            Err(kind) => {
                errors[decile] += 1;
                if errors.iter().sum::<u64>() % 1000 == 1 {
                    eprintln!("widget-soak: a flow failed: {kind}");
                }
            }
        }
    }
    (latencies, errors)
}

/// CPU seconds the stack has used so far (every PostgreSQL process of the
/// machine included).
fn stack_cpu_seconds(stack: &Stack) -> f64 {
    cpu_seconds(stack.api.proc.pid())
        + stack
            .workers
            .iter()
            .map(|w| cpu_seconds(w.pid()))
            .sum::<f64>()
        + postgres_cpu_seconds()
}

async fn sample(
    stack: &Stack,
    at: Duration,
    flows: u64,
    previous: Option<&Sample>,
) -> anyhow::Result<Sample> {
    let pool = &stack.db.pool;
    let tables: Vec<Table> = sqlx::query_as(
        "SELECT s.schemaname || '.' || s.relname AS name, s.n_live_tup AS rows,
                pg_total_relation_size(s.relid) AS bytes
           FROM pg_stat_user_tables s
          WHERE s.schemaname IN ('engine', 'apalis')
          ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let workflows_by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status::text, count(*) FROM engine.workflows GROUP BY 1 ORDER BY 1")
            .fetch_all(pool)
            .await?;
    let (db_blocks, db_blocks_read) = database_blocks(pool).await?;
    let probe_ms = tokio::task::spawn_blocking(speed_probe_ms).await?;
    let (steal_ticks, machine_ticks) = machine_ticks();
    let at_s = at.as_secs_f64();
    let flows_per_s = match previous {
        Some(p) => (flows - p.flows) as f64 / (at_s - p.at_s).max(1e-9),
        None => flows as f64 / at_s.max(1e-9),
    };
    Ok(Sample {
        at_s,
        flows,
        flows_per_s,
        tables,
        workflows_by_status,
        cpu_s: stack_cpu_seconds(stack),
        db_blocks,
        db_blocks_read,
        probe_ms,
        steal_ticks,
        machine_ticks,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.flows >= 10, "--flows must be at least 10");
    ensure_release_built()?;
    let stack = Stack::start(
        args.workers,
        args.db_max_connections,
        &[
            ("WORKFLOW_RETENTION", args.retention.clone()),
            ("WORKFLOW_RETENTION_FAILED", args.retention.clone()),
            ("WORKER_PRUNE_AFTER", args.retention.clone()),
        ],
    )
    .await?;
    // Enough stock for every flow (the failed payments give theirs back).
    sqlx::query("UPDATE products SET inventory = $1")
        .bind(args.flows as i64 + 1_000_000)
        .execute(&stack.db.pool)
        .await?;
    let machine = machine(&stack.db.pool).await?;
    println!(
        "widget-soak: {} flows by {} clients, {} worker(s), retention {}; {machine}",
        args.flows, args.clients, args.workers, args.retention
    );

    let progress = Arc::new(Progress {
        target: args.flows,
        done: AtomicU64::new(0),
        started: Instant::now(),
        decile_ends: (0..10).map(|_| AtomicU64::new(0)).collect(),
    });
    let clients: Vec<_> = (0..args.clients)
        .map(|_| tokio::spawn(client(stack.api.base.clone(), progress.clone())))
        .collect();

    let mut samples: Vec<Sample> = Vec::new();
    let every = Duration::from_secs(args.sample_every);
    while progress.done.load(Ordering::Relaxed) < args.flows {
        tokio::time::sleep(every).await;
        let done = progress.done.load(Ordering::Relaxed).min(args.flows);
        let s = sample(&stack, progress.started.elapsed(), done, samples.last()).await?;
        println!(
            "{:>6.0} s  {:>8} flows ({:>5.1} %)  {:>6.1} flows/s  engine and queue: {:>9} rows, {:>7.1} MB",
            s.at_s,
            s.flows,
            100.0 * s.flows as f64 / args.flows as f64,
            s.flows_per_s,
            s.engine_rows(),
            s.engine_mb()
        );
        samples.push(s);
    }
    let mut latencies = vec![Vec::new(); 10];
    let mut errors = [0u64; 10];
    for c in clients {
        let (l, e) = c.await?;
        for d in 0..10 {
            latencies[d].extend(l[d].iter());
            errors[d] += e[d];
        }
    }
    let seconds = progress.started.elapsed().as_secs_f64();
    let mut deciles = Vec::new();
    let mut begin = 0.0;
    for (d, mut values) in latencies.into_iter().enumerate() {
        let end = progress.decile_ends[d].load(Ordering::Relaxed) as f64 / 1e6;
        values.sort_by(f64::total_cmp);
        let decile = Decile {
            decile: d + 1,
            flows: values.len(),
            seconds: end - begin,
            flows_per_s: values.len() as f64 / (end - begin).max(1e-9),
            p50_ms: percentile(&values, 50.0),
            p99_ms: percentile(&values, 99.0),
            errors: errors[d],
            cpu_s_per_1000_flows: 0.0,
            db_blocks_per_flow: 0.0,
            db_reads_per_flow: 0.0,
            probe_ms: 0.0,
            steal_pct: 0.0,
            flows_per_s_at_second_speed: 0.0,
        };
        deciles.push(match window(&samples, begin, end) {
            Some(w) => w.fill(decile),
            None => decile,
        });
        begin = end;
    }
    let second_probe = deciles[1].probe_ms.max(1e-9);
    for d in &mut deciles {
        d.flows_per_s_at_second_speed = d.flows_per_s * d.probe_ms / second_probe;
        println!(
            "decile {:>2}: {:>7.1} flows/s ({:>7.1} at the second's speed), p50 {:.1} ms, p99 {:.1} ms, \
             {:.2} CPU s and {:.0} blocks per flow, probe {:.1} ms, steal {:.1} %, {} errors",
            d.decile,
            d.flows_per_s,
            d.flows_per_s_at_second_speed,
            d.p50_ms,
            d.p99_ms,
            d.cpu_s_per_1000_flows,
            d.db_blocks_per_flow,
            d.probe_ms,
            d.steal_pct,
            d.errors
        );
    }
    let ratio = |f: fn(&Decile) -> f64| f(&deciles[9]) / f(&deciles[1]).max(1e-9);
    let last_over_second = ratio(|d| d.flows_per_s);
    let cpu_last_over_second = ratio(|d| d.cpu_s_per_1000_flows);
    let blocks_last_over_second = ratio(|d| d.db_blocks_per_flow);
    let speed_adjusted_last_over_second = ratio(|d| d.flows_per_s_at_second_speed);
    println!(
        "last decile over the second: throughput {:.1} % ({}), at the second's machine speed \
         {:.1} %, database blocks per flow {:.1} %, CPU per flow {:.1} %",
        last_over_second * 100.0,
        verdict(last_over_second),
        speed_adjusted_last_over_second * 100.0,
        blocks_last_over_second * 100.0,
        cpu_last_over_second * 100.0,
    );
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&stack.db.pool)
        .await?;
    let report = Report {
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        machine,
        flows: args.flows,
        clients: args.clients,
        workers: args.workers,
        retention: args.retention.clone(),
        seconds,
        errors: errors.iter().sum(),
        deciles,
        last_over_second,
        cpu_last_over_second,
        blocks_last_over_second,
        speed_adjusted_last_over_second,
        samples,
        orders,
    };
    std::fs::create_dir_all(&args.out)?;
    let stem = args.out.join(format!("soak-{}", report.date));
    std::fs::write(
        stem.with_extension("json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(stem.with_extension("md"), markdown(&report))?;
    std::fs::write(stem.with_extension("svg"), chart(&report))?;
    println!("wrote {}.{{json,md,svg}}", stem.display());
    stack.stop().await
}

/// "flat" when `ratio` is within 10 % of 1.
fn verdict(ratio: f64) -> &'static str {
    if (ratio - 1.0).abs() <= 0.10 {
        "within 10 %: flat"
    } else {
        "more than 10 % apart: not flat"
    }
}

/// The samples from the one nearest `begin` to the one nearest `end`
/// (seconds into the run), when they span some flows.
fn window(samples: &[Sample], begin: f64, end: f64) -> Option<Window<'_>> {
    let nearest = |t: f64| {
        (0..samples.len()).min_by(|&a, &b| {
            (samples[a].at_s - t)
                .abs()
                .total_cmp(&(samples[b].at_s - t).abs())
        })
    };
    let span = samples.get(nearest(begin)?..=nearest(end)?)?;
    let (first, last) = (span.first()?, span.last()?);
    (last.flows > first.flows).then_some(Window { span, first, last })
}

/// The samples of one decile.
struct Window<'a> {
    span: &'a [Sample],
    first: &'a Sample,
    last: &'a Sample,
}

impl Window<'_> {
    /// The decile's figures that come from the samples.
    fn fill(&self, decile: Decile) -> Decile {
        let flows = (self.last.flows - self.first.flows) as f64;
        // A PostgreSQL backend that exits (a pool recycling its
        // connections) takes its CPU time with it: an interval in which
        // the total falls counts as none, a slight undercount.
        let cpu: f64 = self
            .span
            .windows(2)
            .map(|w| (w[1].cpu_s - w[0].cpu_s).max(0.0))
            .sum();
        let ticks = self
            .last
            .machine_ticks
            .saturating_sub(self.first.machine_ticks);
        let stolen = self.last.steal_ticks.saturating_sub(self.first.steal_ticks);
        Decile {
            cpu_s_per_1000_flows: cpu / flows * 1000.0,
            db_blocks_per_flow: (self.last.db_blocks - self.first.db_blocks) as f64 / flows,
            db_reads_per_flow: (self.last.db_blocks_read - self.first.db_blocks_read) as f64
                / flows,
            probe_ms: self.span.iter().map(|s| s.probe_ms).sum::<f64>() / self.span.len() as f64,
            steal_pct: 100.0 * stolen as f64 / (ticks.max(1)) as f64,
            ..decile
        }
    }
}

fn markdown(r: &Report) -> String {
    let mut md = format!(
        "# Soak: {} store flows with retention on\n\n\
         {} on {}: {} closed-loop clients, {} worker(s), `WORKFLOW_RETENTION`, \
         `WORKFLOW_RETENTION_FAILED` and `WORKER_PRUNE_AFTER` at {}. A flow is a checkout \
         then its payment webhook (80 % paid, each paid order then dispatched in ten steps). \
         Reproduce: `cargo build --release --bins && ./target/release/widget-soak --flows {}` \
         (PostgreSQL from `WIDGET_TEST_ADMIN_URL`).\n\n\
         {:.0} s in all, {} failed flows. The last decile against the second:\n\n\
         - throughput **{:.1} %** ({});\n\
         - throughput at the second decile's machine speed {:.1} % ({}): the machine's \
         speed drifts on a shared host, and a fixed CPU probe run at every sample measures one kind of that drift;\n\
         - database blocks touched per flow {:.1} % ({}): the work a flow's statements did, \
         which the machine's speed does not move;\n\
         - CPU per flow (the API, the workers and PostgreSQL) {:.1} %: it moves with the \
         work and with the machine's speed.\n\n\
         | decile | flows | seconds | flows/s | flows/s at the second's speed | p50 ms | p99 ms \
         | CPU s per 1,000 flows | DB blocks per flow | of them read | probe ms | steal % | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        r.flows,
        r.date,
        r.machine,
        r.clients,
        r.workers,
        r.retention,
        r.flows,
        r.seconds,
        r.errors,
        r.last_over_second * 100.0,
        verdict(r.last_over_second),
        r.speed_adjusted_last_over_second * 100.0,
        verdict(r.speed_adjusted_last_over_second),
        r.blocks_last_over_second * 100.0,
        verdict(r.blocks_last_over_second),
        r.cpu_last_over_second * 100.0,
    );
    for d in &r.deciles {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {} |\n",
            d.decile,
            d.flows,
            d.seconds,
            d.flows_per_s,
            d.flows_per_s_at_second_speed,
            d.p50_ms,
            d.p99_ms,
            d.cpu_s_per_1000_flows,
            d.db_blocks_per_flow,
            d.db_reads_per_flow,
            d.probe_ms,
            d.steal_pct,
            d.errors
        ));
    }
    md.push_str(
        "\nThe engine's and the queue's tables over time (rows: PostgreSQL's live-tuple \
         estimate; MB with indexes), at each tenth of the run:\n\n",
    );
    let names: Vec<&str> = r
        .samples
        .first()
        .map(|s| s.tables.iter().map(|t| t.name.as_str()).collect())
        .unwrap_or_default();
    md.push_str("| at s | flows | flows/s (last sample) |");
    for n in &names {
        md.push_str(&format!(" {n} rows / MB |"));
    }
    md.push_str(" total MB |\n|---|---|---|");
    md.push_str(&"---|".repeat(names.len() + 1));
    md.push('\n');
    let step = (r.samples.len() / 10).max(1);
    for s in r
        .samples
        .iter()
        .step_by(step)
        .chain(r.samples.last().filter(|_| r.samples.len() % step != 1))
    {
        md.push_str(&format!(
            "| {:.0} | {} | {:.1} |",
            s.at_s, s.flows, s.flows_per_s
        ));
        for n in &names {
            match s.tables.iter().find(|t| t.name == *n) {
                Some(t) => md.push_str(&format!(" {} / {:.1} |", t.rows, t.bytes as f64 / 1e6)),
                None => md.push_str(" – |"),
            }
        }
        md.push_str(&format!(" {:.1} |\n", s.engine_mb()));
    }
    md.push_str(&format!(
        "\nOrders at the end: {} (business records, kept).\n\n\
         ![throughput and the engine's table size over the run](soak-{}.svg)\n",
        r.orders, r.date
    ));
    md
}

/// Throughput per sample (blue) and the engine's and queue's tables in MB
/// (orange) against time.
fn chart(r: &Report) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 360.0, 70.0, 70.0, 50.0, 50.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max_t = r.samples.last().map(|s| s.at_s).unwrap_or(1.0).max(1.0);
    let max_rate = r.samples.iter().map(|s| s.flows_per_s).fold(1.0, f64::max) * 1.15;
    let max_mb = r.samples.iter().map(Sample::engine_mb).fold(1.0, f64::max) * 1.15;
    let x = |t: f64| left + plot_w * t / max_t;
    let y = |v: f64, max: f64| top + plot_h - plot_h * v / max;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">Soak, {} flows: flows/s (blue) and engine + queue tables, MB (orange) — {}</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>\n",
        w / 2.0,
        r.flows,
        r.date,
        top + plot_h,
        left + plot_w,
        top + plot_h
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let yy = top + plot_h - plot_h * f;
        svg.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{yy}\" x2=\"{}\" y2=\"{yy}\" stroke=\"#eee\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#2b6cb0\">{:.0}</text>\
             <text x=\"{}\" y=\"{}\" fill=\"#c05621\">{:.0} MB</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{:.0} s</text>\n",
            left + plot_w,
            left - 6.0,
            yy + 4.0,
            max_rate * f,
            left + plot_w + 6.0,
            yy + 4.0,
            max_mb * f,
            left + plot_w * f,
            top + plot_h + 18.0,
            max_t * f
        ));
    }
    let line = |points: Vec<String>, colour: &str| {
        format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>\n",
            points.join(" ")
        )
    };
    svg.push_str(&line(
        r.samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.at_s), y(s.flows_per_s, max_rate)))
            .collect(),
        "#2b6cb0",
    ));
    svg.push_str(&line(
        r.samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.at_s), y(s.engine_mb(), max_mb)))
            .collect(),
        "#c05621",
    ));
    svg.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds into the run</text>\n</svg>\n",
        left + plot_w / 2.0,
        h - 12.0
    ));
    svg
}

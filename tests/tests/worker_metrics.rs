//! A worker's `GET /metrics` at `WORKER_METRICS_ADDR`: its workflows,
//! executions, steps and takeovers move under load and a SIGKILL; and the
//! Grafana dashboard queries only series the API or a worker exposes.

use std::time::Duration;

use anyhow::Context as _;
use harness::{Api, Proc, TestDb, spawn_store_worker, wait_until, wait_workers};
use serde_json::Value;

/// The value of the sample `series` (name and labels, exactly) in a scrape.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A worker with metrics on a free port, and that port's URL.
async fn worker(db: &TestDb, label: &str, env: &[(&str, &str)]) -> anyhow::Result<(Proc, String)> {
    let mut env = env.to_vec();
    env.push(("WORKER_METRICS_ADDR", "127.0.0.1:0"));
    let mut proc = spawn_store_worker(db, label, &env)?;
    let line = proc
        .read_line_containing("metrics on http://", Duration::from_secs(60))
        .await?;
    let url = line
        .split_whitespace()
        .last()
        .context("no address")?
        .to_owned();
    Ok((proc, url))
}

async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let response = http.get(url).send().await?;
    anyhow::ensure!(response.status() == 200, "GET {url}: {}", response.status());
    Ok(response.text().await?)
}

#[tokio::test]
async fn worker_metrics_count_workflows_steps_and_takeovers_and_the_dashboard_queries_only_exposed_series()
-> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let env = [("DISPATCH_INTERVAL", "300ms")];
    let api = Api::start(&db, &env).await?;
    let (victim, victim_url) = worker(&db, "metrics-victim", &env).await?;
    let (_survivor, survivor_url) = worker(&db, "metrics-survivor", &env).await?;
    wait_workers(&db.pool, 2).await?;
    let http = reqwest::Client::new();
    let before = scrape(&http, &survivor_url).await?;
    assert!(before.contains("engine_workers_reaped_total 0"), "{before}");

    // Paid checkouts: dispatches sleep between steps on both workers.
    let mut paid = 0;
    for _ in 0..6 {
        let key = uuid::Uuid::new_v4().simple().to_string();
        let (status, payment_id) = api.post(&format!("/checkout/{key}")).await?;
        anyhow::ensure!(status == 200, "checkout {status} {payment_id}");
        let (status, body) = api
            .post(&format!("/payment_webhook/{payment_id}/paid"))
            .await?;
        anyhow::ensure!(status == 200, "payment {status} {body}");
        paid += 1;
    }
    let both = [
        scrape(&http, &victim_url).await?,
        scrape(&http, &survivor_url).await?,
    ];
    let total = |series: &str| both.iter().map(|s| sample(s, series)).sum::<f64>();
    assert_eq!(
        total(r#"engine_workflows_started_total{kind="checkout"}"#),
        f64::from(paid),
        "each checkout started once, on one worker or the other"
    );
    assert!(
        total(r#"engine_workflows_finished_total{kind="checkout",outcome="succeeded"}"#) >= 1.0
    );
    assert!(
        total(r#"engine_step_duration_seconds_count{kind="checkout",step="reserve_inventory"}"#)
            >= f64::from(paid)
    );
    assert!(total(r#"engine_workflow_executions_total{kind="checkout",outcome="parked"}"#) >= 1.0);

    // SIGKILL one worker while it runs dispatches: the other reaps it and
    // runs their next steps.
    wait_until(
        "the victim running a dispatch",
        Duration::from_secs(30),
        || async {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM engine.workflows w JOIN engine.workers k ON k.id = w.owner
             WHERE k.pid = $1 AND w.status = 'running' AND w.kind = 'dispatch'",
            )
            .bind(victim.pid() as i32)
            .fetch_one(&db.pool)
            .await?;
            Ok(running > 0)
        },
    )
    .await?;
    victim.signal("KILL")?;
    wait_until(
        "the survivor reaped the victim",
        Duration::from_secs(30),
        || async {
            Ok(sample(
                &scrape(&http, &survivor_url).await?,
                "engine_workers_reaped_total",
            ) >= 1.0)
        },
    )
    .await?;
    let after = scrape(&http, &survivor_url).await?;
    assert!(
        sample(&after, "engine_takeover_detection_seconds_count") >= 1.0,
        "{after}"
    );
    let detection = sample(&after, "engine_takeover_detection_seconds_sum");
    assert!(
        detection < 5.0,
        "a killed worker is found within seconds, not {detection} s"
    );
    wait_until(
        "a taken-over dispatch's next step",
        Duration::from_secs(30),
        || async {
            let s = scrape(&http, &survivor_url).await?;
            Ok(sample(&s, r#"engine_takeover_seconds_count{kind="dispatch"}"#) >= 1.0)
        },
    )
    .await?;
    let s = scrape(&http, &survivor_url).await?;
    let (sum, count) = (
        sample(&s, r#"engine_takeover_seconds_sum{kind="dispatch"}"#),
        sample(&s, r#"engine_takeover_seconds_count{kind="dispatch"}"#),
    );
    assert!(
        sum / count < 5.0,
        "death to next step {:.2} s on average",
        sum / count
    );
    println!(
        "takeovers: {count} dispatches, {:.3} s on average from the victim's last heartbeat to their next step",
        sum / count
    );
    wait_until(
        "every dispatch finished",
        Duration::from_secs(60),
        || async {
            let s = scrape(&http, &survivor_url).await?;
            let finished_here = sample(
                &s,
                r#"engine_workflows_finished_total{kind="dispatch",outcome="succeeded"}"#,
            );
            let dispatched: i64 =
                sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'DISPATCHED'")
                    .fetch_one(&db.pool)
                    .await?;
            Ok(dispatched == i64::from(paid) && finished_here >= 1.0)
        },
    )
    .await?;

    // Every series the Grafana dashboard queries is exposed by the API or
    // by a worker.
    let (status, api_scrape) = api.call("GET", "/metrics", None).await?;
    anyhow::ensure!(status == 200);
    let survivor_scrape = scrape(&http, &survivor_url).await?;
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/widget-store.json"
    ))?)?;
    let panels = dashboard["panels"].as_array().context("panels")?;
    let mut queried = 0;
    for expr in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
    {
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| {
                ["http_", "widget_", "engine_"]
                    .iter()
                    .any(|p| w.starts_with(p))
            })
        {
            queried += 1;
            let exposed = [&api_scrape, &survivor_scrape].iter().any(|scrape| {
                scrape.lines().any(|line| {
                    line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
                })
            });
            assert!(
                exposed,
                "the dashboard queries {name}, which no /metrics exposes"
            );
        }
    }
    assert!(queried >= 18, "the dashboard queries {queried} series");
    Ok(())
}

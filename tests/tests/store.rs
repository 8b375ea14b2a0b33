//! The store over real HTTP: one API and two worker processes on a fresh
//! database per test, as a client of the original demo would drive them.

use std::time::Duration;

use anyhow::Context as _;
use harness::{Api, Proc, TestDb, live_workers, spawn_store_worker, wait_until, wait_workers};
use serde_json::Value;
use sqlx::PgPool;

/// The stack of one test.
struct Stack {
    db: TestDb,
    api: Api,
    workers: Vec<Proc>,
}

async fn stack(extra: &[(&str, &str)]) -> anyhow::Result<Stack> {
    let db = TestDb::create().await?;
    let mut env = vec![("DISPATCH_INTERVAL_MS", "50"), ("CHAOS", "true")];
    env.extend_from_slice(extra);
    let api = Api::start(&db, &env).await?;
    let workers = vec![
        spawn_store_worker(&db, "worker-a", &env)?,
        spawn_store_worker(&db, "worker-b", &env)?,
    ];
    wait_workers(&db.pool, 2).await?;
    Ok(Stack { db, api, workers })
}

async fn inventory(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT inventory::bigint FROM products WHERE id = 1")
            .fetch_one(pool)
            .await?,
    )
}

async fn order_count(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(pool)
        .await?)
}

/// Stock conserved: initial stock = current stock + orders not cancelled.
async fn assert_stock_conserved(pool: &PgPool, initial: i64) -> anyhow::Result<()> {
    let (stock, live): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT inventory FROM products WHERE id = 1)::bigint,
                (SELECT count(*) FROM orders WHERE status <> 'CANCELLED')",
    )
    .fetch_one(pool)
    .await?;
    assert_eq!(
        stock + live,
        initial,
        "stock leaked: {stock} in stock + {live} live orders != {initial}"
    );
    Ok(())
}

async fn order_status(api: &Api, order_id: &str) -> anyhow::Result<Value> {
    api.get_json(&format!("/order/{order_id}")).await
}

async fn wait_order_status(
    api: &Api,
    order_id: &str,
    status: &str,
    timeout: Duration,
) -> anyhow::Result<Value> {
    wait_until(&format!("order {order_id} {status}"), timeout, || async {
        Ok(order_status(api, order_id).await?["status"] == status)
    })
    .await?;
    order_status(api, order_id).await
}

/// The order a checkout created.
async fn order_of_checkout(pool: &PgPool, key: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT id FROM orders WHERE checkout_id = $1")
            .bind(key)
            .fetch_one(pool)
            .await?,
    )
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn happy_path_reaches_dispatched() -> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let product = s.api.get_json("/product").await?;
    assert_eq!(product["product"], "Premium Quality Widget");
    assert_eq!(
        product["description"],
        "Enhance your productivity with our top-rated widgets!"
    );
    assert_eq!(product["inventory"], 100);
    assert_eq!(product["price"], 99.99);

    let key = key();
    let (status, payment_id) = s.api.post(&format!("/checkout/{key}")).await?;
    assert_eq!(
        (status, payment_id.as_str()),
        (200, key.as_str()),
        "payment id is the checkout key, as text"
    );
    assert_eq!(inventory(&s.db.pool).await?, 99);
    let pending = s.api.get_json("/orders").await?;
    assert_eq!(pending[0]["status"], "PENDING");
    assert_eq!(pending[0]["order_status"], 0);
    assert_eq!(pending[0]["progress_remaining"], 10);

    let (status, order_id) = s
        .api
        .post(&format!("/payment_webhook/{payment_id}/paid"))
        .await?;
    assert_eq!(status, 200, "{order_id}");
    let order = wait_order_status(&s.api, &order_id, "DISPATCHED", Duration::from_secs(30)).await?;
    assert_eq!(order["order_status"], 1);
    assert_eq!(order["progress_remaining"], 0);
    assert!(order["last_update_time"].is_string());
    // The payment resumed the checkout with the job its payment wait was
    // scheduled with: nothing is left in the queue to run at the deadline.
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT id || ' ' || status FROM apalis.jobs
         WHERE status NOT IN ('Done') AND convert_from(job, 'UTF8')::json->>'workflow_id' = $1",
    )
    .bind(&key)
    .fetch_all(&s.db.pool)
    .await?;
    assert!(left.is_empty(), "jobs left for the paid checkout: {left:?}");
    assert_stock_conserved(&s.db.pool, 100).await
}

#[tokio::test]
async fn the_storefront_page_is_served_self_contained() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let api = Api::start(&db, &[]).await?;
    let response = api.http.get(format!("{}/", api.base)).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"].to_str()?.to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let page = response.text().await?;
    for part in [
        "id=\"buy\"",
        "id=\"workers\"",
        "id=\"timeline\"",
        "id=\"banner\"",
    ] {
        assert!(page.contains(part), "the page has {part}");
    }
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("src=\"//"),
        "everything the page needs is in it: no CDN, no network at run time"
    );
    Ok(())
}

#[tokio::test]
async fn failed_payment_cancels_and_returns_the_unit() -> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let key = key();
    let (status, payment_id) = s.api.post(&format!("/checkout/{key}")).await?;
    assert_eq!(status, 200);
    assert_eq!(inventory(&s.db.pool).await?, 99);
    let (status, order_id) = s
        .api
        .post(&format!("/payment_webhook/{payment_id}/failed"))
        .await?;
    assert_eq!(status, 200, "{order_id}");
    let order = order_status(&s.api, &order_id).await?;
    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(order["order_status"], -1);
    assert_eq!(
        inventory(&s.db.pool).await?,
        100,
        "the unit is back in stock"
    );
    assert_stock_conserved(&s.db.pool, 100).await
}

#[tokio::test]
async fn payment_timeout_cancels_and_a_late_webhook_gets_409() -> anyhow::Result<()> {
    let s = stack(&[("PAYMENT_TIMEOUT_MS", "1500")]).await?;
    let key = key();
    let (status, payment_id) = s.api.post(&format!("/checkout/{key}")).await?;
    assert_eq!(status, 200);
    let order_id = order_of_checkout(&s.db.pool, &key).await?;
    wait_order_status(
        &s.api,
        &order_id.to_string(),
        "CANCELLED",
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(inventory(&s.db.pool).await?, 100);
    for late in ["paid", "failed"] {
        let (status, body) = s
            .api
            .post(&format!("/payment_webhook/{payment_id}/{late}"))
            .await?;
        assert_eq!(status, 409, "{body}");
        assert!(body.contains("checkout_expired"), "{body}");
    }
    let order = order_status(&s.api, &order_id.to_string()).await?;
    assert_eq!(
        order["status"], "CANCELLED",
        "a late webhook resurrects nothing"
    );
    assert_stock_conserved(&s.db.pool, 100).await
}

#[tokio::test]
async fn out_of_stock_is_409_and_restock_works() -> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let (status, _) = s
        .api
        .call("POST", "/restock", Some(r#"{"inventory": 1}"#))
        .await?;
    assert_eq!(status, 200);
    let (status, _) = s.api.post(&format!("/checkout/{}", key())).await?;
    assert_eq!(status, 200);
    let orders_before = order_count(&s.db.pool).await?;
    let sold_out_key = key();
    let (status, body) = s.api.post(&format!("/checkout/{sold_out_key}")).await?;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("out_of_stock"), "{body}");
    assert_eq!(
        order_count(&s.db.pool).await?,
        orders_before,
        "nothing created"
    );
    assert_eq!(inventory(&s.db.pool).await?, 0);
    // The same key stays out of stock (idempotent), even after a restock.
    let (status, body) = s.api.post("/restock").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(inventory(&s.db.pool).await?, 100);
    let (status, _) = s.api.post(&format!("/checkout/{sold_out_key}")).await?;
    assert_eq!(status, 409);
    let (status, _) = s.api.post(&format!("/checkout/{}", key())).await?;
    assert_eq!(status, 200, "a new key buys after the restock");
    Ok(())
}

#[tokio::test]
async fn twenty_concurrent_checkouts_with_one_key_make_one_order() -> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let key = key();
    let path = format!("/checkout/{key}");
    let calls = (0..20).map(|_| s.api.post(&path));
    let answers = futures::future::try_join_all(calls).await?;
    for (status, body) in &answers {
        assert_eq!((*status, body.as_str()), (200, key.as_str()));
    }
    assert_eq!(order_count(&s.db.pool).await?, 1);
    assert_eq!(inventory(&s.db.pool).await?, 99, "one unit reserved");
    // Days later (here: now) the same key still answers the same.
    let (status, again) = s.api.post(&format!("/checkout/{key}")).await?;
    assert_eq!((status, again.as_str()), (200, key.as_str()));
    let (status, json) = s
        .api
        .http
        .post(format!("{}/checkout/{key}", s.api.base))
        .header("accept", "application/json")
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))?;
    assert_eq!(status, 200);
    assert_eq!(json.json::<Value>().await?["payment_id"], key.as_str());
    assert_stock_conserved(&s.db.pool, 100).await
}

#[tokio::test]
async fn duplicate_and_conflicting_webhooks() -> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let key = key();
    let (_, payment_id) = s.api.post(&format!("/checkout/{key}")).await?;
    let path = format!("/payment_webhook/{payment_id}/paid");
    let concurrent = futures::future::try_join_all((0..5).map(|_| s.api.post(&path))).await?;
    let order_id = concurrent[0].1.clone();
    for (status, body) in &concurrent {
        assert_eq!(
            (*status, body.as_str()),
            (200, order_id.as_str()),
            "same order id every time"
        );
    }
    let (status, again) = s.api.post(&path).await?;
    assert_eq!((status, again.as_str()), (200, order_id.as_str()));
    let (status, body) = s
        .api
        .post(&format!("/payment_webhook/{payment_id}/failed"))
        .await?;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("payment_conflict"), "{body}");
    wait_order_status(&s.api, &order_id, "DISPATCHED", Duration::from_secs(30)).await?;
    let dispatches: i64 =
        sqlx::query_scalar("SELECT count(*) FROM workflows WHERE kind = 'dispatch'")
            .fetch_one(&s.db.pool)
            .await?;
    assert_eq!(dispatches, 1, "paid once, dispatched once");
    // Unknown payment id.
    let (status, body) = s
        .api
        .post(&format!("/payment_webhook/{}/paid", self::key()))
        .await?;
    assert_eq!(status, 404, "{body}");
    assert_stock_conserved(&s.db.pool, 100).await
}

#[tokio::test]
async fn sigkill_between_order_and_payment_still_dispatches_on_the_other_worker()
-> anyhow::Result<()> {
    let mut s = stack(&[]).await?;
    let key = key();
    let (status, payment_id) = s.api.post(&format!("/checkout/{key}")).await?;
    assert_eq!(status, 200);
    // The checkout now waits for its payment. Kill one worker outright.
    let victim = s.workers.remove(0);
    let victim_pid = victim.pid() as i32;
    victim.signal("KILL")?;
    drop(victim);
    wait_until(
        "the dead worker is reaped",
        Duration::from_secs(15),
        || async { Ok(live_workers(&s.db.pool).await? == 1) },
    )
    .await?;
    let (status, order_id) = s
        .api
        .post(&format!("/payment_webhook/{payment_id}/paid"))
        .await?;
    assert_eq!(status, 200, "{order_id}");
    wait_order_status(&s.api, &order_id, "DISPATCHED", Duration::from_secs(30)).await?;
    let survivor_pid: i32 = sqlx::query_scalar("SELECT pid FROM workers")
        .fetch_one(&s.db.pool)
        .await?;
    assert_ne!(survivor_pid, victim_pid);
    let steps_by_survivor: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM workflow_steps s JOIN workers w ON w.id = s.worker_id
         WHERE s.workflow_id = $1 AND s.name = 'mark_paid'",
    )
    .bind(&key)
    .fetch_one(&s.db.pool)
    .await?;
    assert_eq!(
        steps_by_survivor, 1,
        "the surviving worker settled the payment"
    );
    assert_stock_conserved(&s.db.pool, 100).await
}

#[tokio::test]
async fn bad_inputs_get_a_4xx_json_error_and_change_nothing() -> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let (_, payment_id) = s.api.post(&format!("/checkout/{}", key())).await?;
    let snapshot = || async {
        let row: (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT inventory FROM products)::bigint, (SELECT count(*) FROM orders),
                    (SELECT count(*) FROM workflows), (SELECT count(*) FROM workflow_messages)",
        )
        .fetch_one(&s.db.pool)
        .await?;
        anyhow::Ok(row)
    };
    let before = snapshot().await?;
    let long_key = "k".repeat(129);
    let big_body = format!(r#"{{"inventory": 1, "pad": "{}"}}"#, "x".repeat(64 * 1024));
    let cases: Vec<(&str, String, Option<&str>, u16)> = vec![
        ("POST", "/checkout/bad%20key".into(), None, 400),
        ("POST", "/checkout/bad.key".into(), None, 400),
        ("POST", format!("/checkout/{long_key}"), None, 400),
        ("POST", "/checkout/dispatch-1".into(), None, 400),
        ("POST", "/checkout/%C3%A9t%C3%A9".into(), None, 400),
        ("GET", "/checkout/abc".into(), None, 405),
        (
            "POST",
            format!("/payment_webhook/{payment_id}/maybe"),
            None,
            400,
        ),
        (
            "POST",
            format!("/payment_webhook/{payment_id}/PAID"),
            None,
            400,
        ),
        (
            "POST",
            "/payment_webhook/no-such-payment/paid".into(),
            None,
            404,
        ),
        ("POST", "/payment_webhook/bad%20id/paid".into(), None, 400),
        ("GET", "/payment_webhook/x/paid".into(), None, 405),
        ("GET", "/order/abc".into(), None, 400),
        ("GET", "/order/-1".into(), None, 400),
        ("GET", "/order/99999999999999999999".into(), None, 400),
        ("GET", "/order/424242".into(), None, 404),
        ("GET", "/orders?limit=0".into(), None, 400),
        ("GET", "/orders?limit=100000".into(), None, 400),
        ("GET", "/orders?limit=ten".into(), None, 400),
        ("POST", "/restock".into(), Some(r#"{"inventory": -1}"#), 400),
        (
            "POST",
            "/restock".into(),
            Some(r#"{"inventory": 2000000}"#),
            400,
        ),
        (
            "POST",
            "/restock".into(),
            Some(r#"{"inventory": "lots"}"#),
            400,
        ),
        ("POST", "/restock".into(), Some("not json"), 400),
        ("DELETE", "/product".into(), None, 405),
        ("GET", "/no/such/path".into(), None, 404),
        ("GET", "/order/abc/timeline".into(), None, 400),
        ("GET", "/order/0/timeline".into(), None, 400),
        ("GET", "/order/424242/timeline".into(), None, 404),
        ("POST", "/workers/no-such-worker/crash".into(), None, 404),
        ("POST", "/workers/bad%20id/crash".into(), None, 400),
        ("POST", "/workers/a%2Fb/crash".into(), None, 400),
        (
            "POST",
            format!("/workers/{}/crash", "w".repeat(256)),
            None,
            400,
        ),
        ("GET", "/workers/x/crash".into(), None, 405),
        ("POST", "/config".into(), None, 405),
    ];
    for (method, path, body, expected) in &cases {
        let (status, text) = s.api.call(method, path, *body).await?;
        assert_eq!(status, *expected, "{method} {path} -> {status} {text}");
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{method} {path}: not JSON: {text}"))?;
        assert!(json["error"]["code"].is_string(), "{method} {path}: {text}");
        assert!(
            json["error"]["message"].is_string(),
            "{method} {path}: {text}"
        );
    }
    // The server answers 413 without reading the body and closes the
    // connection; a client of its own keeps that close off the pooled ones.
    let response = reqwest::Client::new()
        .post(format!("{}/restock", s.api.base))
        .header("content-type", "application/json")
        .body(big_body)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 413);
    let json: Value = response.json().await?;
    assert_eq!(json["error"]["code"], "payload_too_large");
    assert_eq!(snapshot().await?, before, "bad input changed nothing");
    assert_eq!(live_workers(&s.db.pool).await?, 2, "no worker was crashed");
    Ok(())
}

/// The worker at `index` was told to crash: it dies by a signal, not a
/// clean exit, and the fleet reaps it.
async fn expect_crashed(s: &mut Stack, index: usize) -> anyhow::Result<()> {
    let mut victim = s.workers.remove(index);
    let code = victim.wait_exit(Duration::from_secs(15)).await?;
    assert_eq!(code, None, "aborted by a signal, no clean exit");
    let live = s.workers.len() as i64;
    wait_until("crashed worker reaped", Duration::from_secs(15), || async {
        Ok(live_workers(&s.db.pool).await? == live)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn crash_application_aborts_one_worker_and_the_api_stays_up() -> anyhow::Result<()> {
    let mut s = stack(&[]).await?;
    let (status, worker_id) = s.api.post("/crash_application").await?;
    assert_eq!(status, 202, "{worker_id}");
    let pid: i32 = sqlx::query_scalar("SELECT pid FROM workers WHERE id = $1")
        .bind(&worker_id)
        .fetch_one(&s.db.pool)
        .await?;
    let crashed = s
        .workers
        .iter()
        .position(|w| w.pid() as i32 == pid)
        .context("crashed worker is ours")?;
    expect_crashed(&mut s, crashed).await?;
    let (status, body) = s.api.call("GET", "/healthz", None).await?;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok"),
        "the API itself never crashes"
    );
    Ok(())
}

#[tokio::test]
async fn crash_application_is_forbidden_without_chaos() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let api = Api::start(&db, &[("CHAOS", "false")]).await?;
    let worker = spawn_store_worker(&db, "worker-a", &[("CHAOS", "false")])?;
    wait_workers(&db.pool, 1).await?;
    let worker_id: String = sqlx::query_scalar("SELECT id FROM workers")
        .fetch_one(&db.pool)
        .await?;
    for path in [
        "/crash_application".to_owned(),
        format!("/workers/{worker_id}/crash"),
        "/workers/no-such-worker/crash".to_owned(),
    ] {
        let (status, body) = api.post(&path).await?;
        assert_eq!(status, 403, "{path}: {body}");
        let json: Value = serde_json::from_str(&body)?;
        assert_eq!(json["error"]["code"], "chaos_disabled", "{path}: {body}");
    }
    let config = api.get_json("/config").await?;
    assert_eq!(config["chaos"], false, "the page hides its crash buttons");
    assert_eq!(config["dispatch_steps"], 10);
    assert_eq!(live_workers(&db.pool).await?, 1, "the worker still lives");
    drop(worker);
    Ok(())
}

/// The worker process whose registry row has this id.
async fn worker_with_id(s: &Stack, worker_id: &str) -> anyhow::Result<usize> {
    let pid: i32 = sqlx::query_scalar("SELECT pid FROM workers WHERE id = $1")
        .bind(worker_id)
        .fetch_one(&s.db.pool)
        .await?;
    s.workers
        .iter()
        .position(|w| w.pid() as i32 == pid)
        .context("a worker of this test")
}

#[tokio::test]
async fn crash_of_a_named_worker_makes_that_worker_exit() -> anyhow::Result<()> {
    let mut s = stack(&[]).await?;
    assert_eq!(s.api.get_json("/config").await?["chaos"], true);
    let fleet = s.api.get_json("/workers").await?;
    let fleet = fleet.as_array().context("a list")?;
    assert_eq!(fleet.len(), 2, "{fleet:?}");
    for w in fleet {
        for field in ["id", "pid", "started_at", "last_seen", "in_flight"] {
            assert!(!w[field].is_null(), "{field} in {w}");
        }
    }
    // The younger worker: not simply the one a random pick would favour.
    let target = fleet[1]["id"].as_str().context("worker id")?.to_owned();
    let (status, body) = s.api.post(&format!("/workers/{target}/crash")).await?;
    assert_eq!((status, body.as_str()), (202, target.as_str()));
    let index = worker_with_id(&s, &target).await?;
    expect_crashed(&mut s, index).await?;
    let survivor = &mut s.workers[0];
    assert!(!survivor.has_exited(), "only the named worker crashed");
    let fleet = s.api.get_json("/workers").await?;
    assert_eq!(fleet.as_array().map(Vec::len), Some(1));
    assert_ne!(fleet[0]["id"], target.as_str());
    // The crashed worker is gone: asking again is a 404, with JSON.
    let (status, body) = s.api.post(&format!("/workers/{target}/crash")).await?;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown_worker"), "{body}");
    Ok(())
}

async fn timeline(api: &Api, order_id: &str) -> anyhow::Result<Value> {
    api.get_json(&format!("/order/{order_id}/timeline")).await
}

fn step_names<'a>(timeline: &'a Value, workflow: &str) -> Vec<&'a str> {
    timeline["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["workflow"] == workflow)
        .filter_map(|s| s["name"].as_str())
        .collect()
}

#[tokio::test]
async fn timeline_lists_checkout_then_dispatch_steps_with_worker_ids() -> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let worker_ids: Vec<String> = sqlx::query_scalar("SELECT id FROM workers")
        .fetch_all(&s.db.pool)
        .await?;
    let key = key();
    let (status, payment_id) = s.api.post(&format!("/checkout/{key}")).await?;
    assert_eq!(status, 200);
    let order_id = order_of_checkout(&s.db.pool, &key).await?;
    let pending = timeline(&s.api, &order_id.to_string()).await?;
    assert_eq!(pending["status"], "PENDING");
    assert_eq!(
        step_names(&pending, "checkout")[..2],
        ["reserve_inventory", "create_order"]
    );
    assert!(step_names(&pending, "dispatch").is_empty(), "{pending}");

    let (status, order_id) = s
        .api
        .post(&format!("/payment_webhook/{payment_id}/paid"))
        .await?;
    assert_eq!(status, 200, "{order_id}");
    wait_order_status(&s.api, &order_id, "DISPATCHED", Duration::from_secs(30)).await?;
    let done = timeline(&s.api, &order_id).await?;
    assert_eq!(done["order_id"].to_string(), order_id);
    assert_eq!(done["progress_remaining"], 0);
    let steps = done["steps"].as_array().context("steps")?;
    let kinds: Vec<&str> = steps
        .iter()
        .filter_map(|s| s["workflow"].as_str())
        .collect();
    let first_dispatch = kinds
        .iter()
        .position(|k| *k == "dispatch")
        .context("dispatch steps")?;
    assert!(
        kinds[..first_dispatch].iter().all(|k| *k == "checkout")
            && kinds[first_dispatch..].iter().all(|k| *k == "dispatch"),
        "checkout steps, then dispatch steps: {kinds:?}"
    );
    let checkout = step_names(&done, "checkout");
    assert_eq!(checkout.first(), Some(&"reserve_inventory"));
    assert_eq!(checkout.last(), Some(&"mark_paid"));
    let progress = step_names(&done, "dispatch")
        .into_iter()
        .filter(|n| *n == "update_progress")
        .count();
    assert_eq!(progress, 10, "each progress step once");
    for (i, step) in steps.iter().enumerate() {
        let worker = step["worker_id"].as_str().context("worker id")?;
        assert!(worker_ids.iter().any(|w| w == worker), "{step}");
        let started: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(step["started_at"].clone())?;
        let finished: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(step["finished_at"].clone())?;
        assert!(started <= finished, "{step}");
        assert!(
            step["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{step}"
        );
        if i > 0 && steps[i - 1]["workflow"] == step["workflow"] {
            assert!(
                step["seq"].as_i64() > steps[i - 1]["seq"].as_i64(),
                "steps in order: {}",
                done
            );
        }
    }
    let runs = done["workflows"].as_array().context("workflows")?;
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r["status"] == "succeeded"), "{runs:?}");
    assert!(
        !done.to_string().contains(&key),
        "the payment id (a bearer secret) is not on the timeline"
    );
    Ok(())
}

/// The worker that ran the first dispatch step of the order, once there is one.
async fn first_dispatch_worker(api: &Api, order_id: &str) -> anyhow::Result<Option<String>> {
    let t = timeline(api, order_id).await?;
    Ok(t["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["workflow"] == "dispatch")
        .and_then(|s| s["worker_id"].as_str())
        .map(str::to_owned))
}

#[tokio::test]
async fn timeline_shows_the_takeover_after_the_dispatching_worker_crashes() -> anyhow::Result<()> {
    let mut s = stack(&[("DISPATCH_INTERVAL_MS", "300")]).await?;
    let (_, payment_id) = s.api.post(&format!("/checkout/{}", key())).await?;
    let (status, order_id) = s
        .api
        .post(&format!("/payment_webhook/{payment_id}/paid"))
        .await?;
    assert_eq!(status, 200, "{order_id}");
    // The worker that ran the dispatch's first step runs the next ones too
    // (its sleeps are held in-process) until it dies.
    wait_until(
        "a dispatch step on the timeline",
        Duration::from_secs(15),
        || async { Ok(first_dispatch_worker(&s.api, &order_id).await?.is_some()) },
    )
    .await?;
    let first_worker = first_dispatch_worker(&s.api, &order_id)
        .await?
        .context("dispatch step")?;
    let (status, body) = s
        .api
        .post(&format!("/workers/{first_worker}/crash"))
        .await?;
    assert_eq!(status, 202, "{body}");
    let index = worker_with_id(&s, &first_worker).await?;
    s.workers
        .remove(index)
        .wait_exit(Duration::from_secs(15))
        .await?;
    wait_order_status(&s.api, &order_id, "DISPATCHED", Duration::from_secs(30)).await?;
    let done = timeline(&s.api, &order_id).await?;
    let dispatch: Vec<&Value> = done["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["workflow"] == "dispatch")
        .collect();
    let workers: std::collections::BTreeSet<&str> = dispatch
        .iter()
        .filter_map(|s| s["worker_id"].as_str())
        .collect();
    assert_eq!(workers.len(), 2, "dispatch taken over: {done}");
    assert!(workers.contains(first_worker.as_str()));
    let progress = dispatch
        .iter()
        .filter(|s| s["name"] == "update_progress")
        .count();
    assert_eq!(progress, 10, "each progress step once: {done}");
    assert_eq!(done["progress_remaining"], 0);
    Ok(())
}

#[tokio::test]
async fn readiness_and_database_outage_answer_503_quickly() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let api = Api::start(&db, &[]).await?;
    assert_eq!(
        api.call("GET", "/readyz", None).await?,
        (200, "ready".to_owned())
    );
    // Cut the API off its database: terminate its sessions and forbid new ones.
    let admin = sqlx::PgPool::connect(&harness::admin_url()).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS false",
        db.name
    )))
    .execute(&admin)
    .await?;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&db.name)
        .execute(&admin)
        .await?;
    let started = std::time::Instant::now();
    let (status, body) = api.call("GET", "/product", None).await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database_unavailable"), "{body}");
    assert!(
        !body.to_lowercase().contains("postgres"),
        "no database words on the wire: {body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "503 quickly, not a hang: {:?}",
        started.elapsed()
    );
    assert_eq!(api.call("GET", "/readyz", None).await?.0, 503);
    assert_eq!(api.call("GET", "/healthz", None).await?.0, 200);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS true",
        db.name
    )))
    .execute(&admin)
    .await?;
    wait_until(
        "API recovers by itself",
        Duration::from_secs(15),
        || async { Ok(api.call("GET", "/product", None).await?.0 == 200) },
    )
    .await?;
    Ok(())
}

//! The store over real HTTP: one API and two worker processes on a fresh
//! database per test, as a client of the original demo would drive them.

use std::time::Duration;

use anyhow::Context as _;
use harness::{
    Api, Proc, TestDb, inventory, live_workers, spawn_store_worker, wait_until, wait_workers,
};
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
    let mut env = vec![("DISPATCH_INTERVAL", "50ms"), ("CHAOS", "true")];
    env.extend_from_slice(extra);
    let api = Api::start(&db, &env).await?;
    let workers = vec![
        spawn_store_worker(&db, "worker-a", &env)?,
        spawn_store_worker(&db, "worker-b", &env)?,
    ];
    wait_workers(&db.pool, 2).await?;
    Ok(Stack { db, api, workers })
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

/// Waits until order `order_id`'s dispatch workflow has succeeded, so its
/// tenth progress step has run: with a step applied twice the order shows
/// DISPATCHED a step early, before that, so its status is no sign that
/// every step has run.
async fn wait_dispatch_succeeded(pool: &PgPool, order_id: i64) -> anyhow::Result<()> {
    let id = store::dispatch_workflow_id(order_id);
    let took = wait_until(
        &format!("workflow {id} succeeded"),
        Duration::from_secs(90),
        || async {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM workflows WHERE id = $1")
                    .bind(&id)
                    .fetch_optional(pool)
                    .await?;
            Ok(status.as_deref() == Some("succeeded"))
        },
    )
    .await?;
    eprintln!("{id} succeeded (waited {took:?})");
    Ok(())
}

/// Waits for order `order_id`'s dispatch to end, then asserts it applied
/// each progress step exactly once: its checkpoints read 9, 8, ..., 0.
async fn assert_dispatched_once(pool: &PgPool, order_id: i64) -> anyhow::Result<()> {
    wait_dispatch_succeeded(pool, order_id).await?;
    harness::assert_progress_applied_once(pool, order_id).await
}

/// Asserts that checkout `key` checkpointed each of the guarded steps
/// `names` exactly once with output `true`: a guarded statement that found
/// nothing to do (the order not pending, no unit in stock) leaves null.
async fn assert_checkout_steps_took_effect(
    pool: &PgPool,
    key: &str,
    names: &[&str],
) -> anyhow::Result<()> {
    for name in names {
        let outputs: Vec<Value> = sqlx::query_scalar(
            "SELECT output FROM workflow_steps WHERE workflow_id = $1 AND name = $2
             ORDER BY step_seq",
        )
        .bind(key)
        .bind(name)
        .fetch_all(pool)
        .await?;
        assert_eq!(
            outputs,
            [Value::Bool(true)],
            "checkout's {name}: one checkpoint with output true (its effect applied once)"
        );
    }
    Ok(())
}

/// The outputs of the dispatch's `update_progress` steps on a timeline, in
/// its order.
fn progress_on_timeline(timeline: &Value) -> Vec<Option<i64>> {
    timeline["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["workflow"] == "dispatch" && s["name"] == "update_progress")
        .map(|s| s["output"].as_i64())
        .collect()
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
    assert_dispatched_once(&s.db.pool, order_id.parse()?).await?;
    assert_checkout_steps_took_effect(&s.db.pool, &key, &["reserve_inventory", "mark_paid"])
        .await?;
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
    assert_checkout_steps_took_effect(&s.db.pool, &key, &["reserve_inventory", "cancel_order"])
        .await?;
    assert_stock_conserved(&s.db.pool, 100).await
}

#[tokio::test]
async fn payment_timeout_cancels_and_a_late_webhook_gets_409() -> anyhow::Result<()> {
    let s = stack(&[("PAYMENT_TIMEOUT", "1500ms")]).await?;
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
    assert_checkout_steps_took_effect(&s.db.pool, &key, &["reserve_inventory", "cancel_order"])
        .await?;
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
    assert_dispatched_once(&s.db.pool, order_id.parse()?).await?;
    assert_checkout_steps_took_effect(&s.db.pool, &key, &["reserve_inventory", "mark_paid"])
        .await?;
    // Unknown payment id.
    let (status, body) = s
        .api
        .post(&format!("/payment_webhook/{}/paid", self::key()))
        .await?;
    assert_eq!(status, 404, "{body}");
    assert_stock_conserved(&s.db.pool, 100).await
}

/// The registry id of a live worker process of this test.
async fn id_of_worker(pool: &PgPool, worker: &Proc) -> anyhow::Result<String> {
    sqlx::query_scalar("SELECT id FROM workers WHERE pid = $1")
        .bind(worker.pid() as i32)
        .fetch_optional(pool)
        .await?
        .with_context(|| format!("{} is not in the registry", worker.label))
}

/// The owner of workflow `id` while it runs after at least one
/// `update_progress` checkpoint, with the owner's pid, once it does.
async fn running_dispatch_owner(pool: &PgPool, id: &str) -> anyhow::Result<Option<(String, i32)>> {
    Ok(sqlx::query_as(
        "SELECT w.owner, k.pid FROM workflows w JOIN workers k ON k.id = w.owner
         WHERE w.id = $1 AND w.status = 'running'
           AND EXISTS (SELECT 1 FROM workflow_steps s
                       WHERE s.workflow_id = w.id AND s.name = 'update_progress')",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Two kills. First, with the checkout parked in its payment wait (no
/// owner: nothing to take over), one worker is SIGKILLed and a fresh one
/// joins; the payment still settles on a live worker. Then the worker that
/// owns the running dispatch (its sleeps between steps are held in that
/// process) is SIGKILLed mid-dispatch: a different worker takes the
/// workflow over and checkpoints its next progress step, and the order
/// ends DISPATCHED with each step applied once and the stock conserved.
#[tokio::test]
async fn sigkill_of_the_dispatch_owner_hands_its_next_step_to_another_worker() -> anyhow::Result<()>
{
    let env = [("DISPATCH_INTERVAL", "400ms")];
    let mut s = stack(&env).await?;
    let key = key();
    let (status, payment_id) = s.api.post(&format!("/checkout/{key}")).await?;
    assert_eq!(status, 200);

    // The checkout now waits for its payment, owned by no worker. Kill one
    // worker outright; a fresh one joins so that two remain for the
    // takeover below.
    let parked_victim = s.workers.remove(0);
    let parked_victim_id = id_of_worker(&s.db.pool, &parked_victim).await?;
    parked_victim.signal("KILL")?;
    drop(parked_victim);
    wait_until(
        "the dead worker is reaped",
        Duration::from_secs(30),
        || async { Ok(live_workers(&s.db.pool).await? == 1) },
    )
    .await?;
    s.workers.push(spawn_store_worker(
        &s.db,
        "worker-c",
        &[("DISPATCH_INTERVAL", "400ms"), ("CHAOS", "true")],
    )?);
    wait_workers(&s.db.pool, 2).await?;

    let (status, order_id) = s
        .api
        .post(&format!("/payment_webhook/{payment_id}/paid"))
        .await?;
    assert_eq!(status, 200, "{order_id}");
    let order_id: i64 = order_id.parse()?;
    let settled_by: Option<String> = sqlx::query_scalar(
        "SELECT worker_id FROM workflow_steps WHERE workflow_id = $1 AND name = 'mark_paid'",
    )
    .bind(&key)
    .fetch_one(&s.db.pool)
    .await?;
    assert_ne!(
        settled_by.as_deref(),
        Some(parked_victim_id.as_str()),
        "a live worker settled the payment"
    );

    // Kill the dispatch's owner while it runs, after its first progress step.
    let dispatch_id = store::dispatch_workflow_id(order_id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (owner, owner_pid) = loop {
        if let Some(found) = running_dispatch_owner(&s.db.pool, &dispatch_id).await? {
            break found;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{dispatch_id} never ran with an owner after a progress step"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let index = s
        .workers
        .iter()
        .position(|w| w.pid() as i32 == owner_pid)
        .context("the dispatch's owner is a worker of this test")?;
    let mut owner_proc = s.workers.remove(index);
    owner_proc.signal("KILL")?;
    assert_eq!(
        owner_proc.wait_exit(Duration::from_secs(15)).await?,
        None,
        "killed by the signal"
    );
    drop(owner_proc);

    wait_order_status(
        &s.api,
        &order_id.to_string(),
        "DISPATCHED",
        Duration::from_secs(90),
    )
    .await?;
    wait_dispatch_succeeded(&s.db.pool, order_id).await?;

    // Every checkpoint is final now, the killed owner's included (one it
    // sent the commit of just before it died could land after its exit).
    let progress: Vec<(i32, Option<String>)> = sqlx::query_as(
        "SELECT step_seq, worker_id FROM workflow_steps
         WHERE workflow_id = $1 AND name = 'update_progress' ORDER BY step_seq",
    )
    .bind(&dispatch_id)
    .fetch_all(&s.db.pool)
    .await?;
    let by_owner = progress
        .iter()
        .filter(|(_, w)| w.as_deref() == Some(owner.as_str()))
        .count();
    let last_by_owner = progress
        .iter()
        .rposition(|(_, w)| w.as_deref() == Some(owner.as_str()))
        .context("the killed owner had checkpointed a progress step")?;
    eprintln!(
        "killed owner {owner} (pid {owner_pid}) after {by_owner} of {} progress steps",
        progress.len()
    );
    let (next_seq, next_worker) = progress
        .get(last_by_owner + 1)
        .context("the owner was killed before the dispatch's last progress step")?;
    let next_worker = next_worker.as_deref().context("next step's worker")?;
    assert_ne!(
        next_worker, owner,
        "step {next_seq}, the next progress step after the kill, ran on another worker"
    );
    eprintln!("the next progress step (seq {next_seq}) ran on {next_worker}");
    assert!(
        progress[last_by_owner + 1..]
            .iter()
            .all(|(_, w)| w.as_deref() != Some(owner.as_str())),
        "the killed owner ran nothing after its last step: {progress:?}"
    );
    let survivor: String = sqlx::query_scalar("SELECT id FROM workers")
        .fetch_one(&s.db.pool)
        .await?;
    assert_eq!(
        next_worker, survivor,
        "the surviving worker took the dispatch over"
    );
    let executions: i32 = sqlx::query_scalar("SELECT executions FROM workflows WHERE id = $1")
        .bind(&dispatch_id)
        .fetch_one(&s.db.pool)
        .await?;
    assert!(
        executions >= 2,
        "{dispatch_id} ran {executions} execution(s)"
    );

    harness::assert_progress_applied_once(&s.db.pool, order_id).await?;
    assert_checkout_steps_took_effect(&s.db.pool, &key, &["reserve_inventory", "mark_paid"])
        .await?;
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
        for field in ["id", "started_at", "last_seen", "in_flight"] {
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
    wait_dispatch_succeeded(&s.db.pool, order_id.parse()?).await?;
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
    assert_eq!(
        progress_on_timeline(&done),
        harness::EXPECTED_PROGRESS,
        "the timeline's progress steps left 9, 8, ..., 0: each applied once"
    );
    assert_eq!(
        progress_on_timeline(&done),
        harness::progress_outputs(&s.db.pool, order_id.parse()?).await?,
        "the timeline shows the checkpoints' outputs"
    );
    let settled: Vec<&Value> = steps
        .iter()
        .filter(|s| s["workflow"] == "checkout" && s["name"] == "mark_paid")
        .map(|s| &s["output"])
        .collect();
    assert_eq!(settled, [&Value::Bool(true)], "mark_paid took effect once");
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
    let mut s = stack(&[("DISPATCH_INTERVAL", "300ms")]).await?;
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
    wait_dispatch_succeeded(&s.db.pool, order_id.parse()?).await?;
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
    assert_eq!(
        progress_on_timeline(&done),
        harness::EXPECTED_PROGRESS,
        "the timeline's progress steps left 9, 8, ..., 0, each applied once across the takeover: {done}"
    );
    harness::assert_progress_applied_once(&s.db.pool, order_id.parse()?).await?;
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
    // A hang would end in the request timeout's 408 (75 s); the 503 must
    // come well before it. The limit is generous for a loaded machine; the
    // figure measured is printed.
    let started = std::time::Instant::now();
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(30), api.call("GET", "/product", None))
            .await
            .context("no answer within 30 s with the database away: a hang, not a 503")??;
    eprintln!("503 with the database away after {:?}", started.elapsed());
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database_unavailable"), "{body}");
    assert!(
        !body.to_lowercase().contains("postgres"),
        "no database words on the wire: {body}"
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

#[tokio::test]
async fn every_response_carries_a_request_id_that_the_log_line_names() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let api = Api::start(&db, &[("RUST_LOG", "info,api=debug")]).await?;
    let request_id = |response: &reqwest::Response| {
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let made = api.http.get(format!("{}/product", api.base)).send().await?;
    assert_eq!(made.status(), 200);
    let made = request_id(&made).context("a request id on a 200")?;
    assert!(uuid::Uuid::parse_str(&made).is_ok(), "{made}");
    let given = "client-chose-this-id-42";
    for (method, path, status) in [
        ("POST", "/checkout/not%20a%20key", 400),
        ("GET", "/no_such_route", 404),
    ] {
        let response = api
            .http
            .request(method.parse()?, format!("{}{path}", api.base))
            .header("x-request-id", given)
            .send()
            .await?;
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(
            request_id(&response).as_deref(),
            Some(given),
            "{method} {path}"
        );
    }
    wait_until(
        "the log line names the request id",
        Duration::from_secs(10),
        || async { Ok(std::fs::read_to_string(&api.proc.log)?.contains(given)) },
    )
    .await?;

    // The steps of the checkout a request starts log its id too.
    let worker = spawn_store_worker(&db, "worker", &[("RUST_LOG", "info,engine=debug")])?;
    wait_workers(&db.pool, 1).await?;
    let started_by = "checkout-request-7";
    let response = api
        .http
        .post(format!("{}/checkout/{}", api.base, key()))
        .header("x-request-id", started_by)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    wait_until(
        "the checkout's steps log the request id",
        Duration::from_secs(10),
        || async {
            let log = std::fs::read_to_string(&worker.log)?;
            Ok(log.lines().any(|l| {
                l.contains("step done") && l.contains("create_order") && l.contains(started_by)
            }))
        },
    )
    .await?;
    Ok(())
}

/// The value of one sample (`name{labels}` exactly as exposed) in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_expose_traffic_queues_and_the_shops_health_and_move_under_load()
-> anyhow::Result<()> {
    let s = stack(&[]).await?;
    let scrape = || async {
        let (status, body) = s.api.call("GET", "/metrics", None).await?;
        anyhow::ensure!(status == 200, "GET /metrics: {status} {body}");
        anyhow::Ok(body)
    };
    let before = scrape().await?;
    for family in [
        "# TYPE widget_orders gauge",
        "# TYPE widget_oldest_pending_order_age_seconds gauge",
        "# TYPE widget_stock_units gauge",
        "# TYPE widget_payment_deliveries counter",
        "# TYPE widget_refunds_due gauge",
        "# TYPE engine_unfinished_workflows gauge",
        "# TYPE engine_ready_jobs gauge",
        "# TYPE engine_oldest_ready_job_age_seconds gauge",
    ] {
        assert!(before.contains(family), "{family} missing:\n{before}");
    }
    assert_eq!(sample(&before, "widget_database_up"), Some(1.0));
    assert_eq!(sample(&before, "widget_stock_units"), Some(100.0));
    assert_eq!(
        sample(&before, r#"widget_orders{status="PENDING"}"#),
        Some(0.0)
    );

    let checkouts = r#"http_requests_total{method="POST",route="/checkout/{key}",status="200"}"#;
    let mut payment_ids = Vec::new();
    for _ in 0..3 {
        let (status, payment_id) = s.api.post(&format!("/checkout/{}", key())).await?;
        assert_eq!(status, 200);
        payment_ids.push(payment_id);
    }
    let (status, _) = s
        .api
        .post(&format!("/payment_webhook/{}/paid", payment_ids[0]))
        .await?;
    assert_eq!(status, 200);
    s.api.call("GET", "/no/such/route", None).await?;

    let after = scrape().await?;
    for family in [
        "# TYPE http_requests counter",
        "# TYPE http_request_duration_seconds histogram",
    ] {
        assert!(after.contains(family), "{family} missing:\n{after}");
    }
    assert_eq!(sample(&after, checkouts), Some(3.0), "{after}");
    assert_eq!(sample(&after, "widget_stock_units"), Some(97.0));
    assert_eq!(
        sample(&after, r#"widget_orders{status="PENDING"}"#),
        Some(2.0)
    );
    assert!(sample(&after, "widget_oldest_pending_order_age_seconds").is_some_and(|age| age > 0.0));
    assert!(
        after.contains(r#"route="unmatched",status="404""#),
        "an unknown path is counted under one label"
    );
    assert!(!after.contains("/no/such/route"));
    let paid_or_dispatched = sample(&after, r#"widget_orders{status="PAID"}"#).unwrap_or(0.0)
        + sample(&after, r#"widget_orders{status="DISPATCHED"}"#).unwrap_or(0.0);
    assert_eq!(paid_or_dispatched, 1.0, "{after}");

    // The dashboard's queries are checked against this scrape and a
    // worker's in worker_metrics.rs.
    Ok(())
}

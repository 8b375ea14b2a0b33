//! A crash at every step boundary of the checkout and the dispatch, chosen
//! rather than left to chance: a worker started with `WORKER_CRASH_AT` dies
//! with SIGKILL right before or right after the named step commits; a second
//! worker, started once the first is dead, takes the order over. Each test
//! then checks what a shopper and an operator would: the answers the client
//! got, the order's end state, the stock, and every effect exactly once
//! (the unit, the order, the payment taken, each progress step).

use std::time::Duration;

use anyhow::Context as _;
use harness::{
    Api, TestDb, assert_progress_applied_once, spawn_store_worker, wait_until, wait_workers,
};
use serde_json::{Value, json};
use sqlx::PgPool;

/// What the shopper and the payment provider do in a scenario.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Payment {
    /// The webhook says paid.
    Paid,
    /// The webhook says failed.
    Failed,
    /// No webhook: the payment window closes.
    Never,
    /// The product is sold out: the checkout answers 409.
    OutOfStock,
}

/// The answers the client got: the checkout's, then the webhook's.
type Answers = ((u16, String), Option<(u16, String)>);

/// Drives one purchase as a client of the demo would, waiting as long as
/// the API lets it (the workers may be dead for a while).
async fn shop(http: reqwest::Client, base: String, key: String, payment: Payment) -> Answers {
    let post = |path: String| {
        let http = http.clone();
        async move {
            let response = http.post(path).send().await.expect("the API answers");
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
    };
    let checkout = post(format!("{base}/checkout/{key}")).await;
    let status = match payment {
        Payment::Paid => "paid",
        Payment::Failed => "failed",
        Payment::Never | Payment::OutOfStock => return (checkout, None),
    };
    if checkout.0 != 200 {
        return (checkout, None);
    }
    let webhook = post(format!("{base}/payment_webhook/{}/{status}", checkout.1)).await;
    (checkout, Some(webhook))
}

async fn scalar<T>(pool: &PgPool, sql: &'static str, id: &str) -> anyhow::Result<T>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    Ok(sqlx::query_scalar(sql).bind(id).fetch_one(pool).await?)
}

/// The checkpoints of workflow `id` named `name`, in order, as (worker id,
/// output).
async fn checkpoints(pool: &PgPool, id: &str, name: &str) -> anyhow::Result<Vec<(String, Value)>> {
    Ok(sqlx::query_as(
        "SELECT worker_id, output FROM workflow_steps WHERE workflow_id = $1 AND name = $2
         ORDER BY step_seq",
    )
    .bind(id)
    .bind(name)
    .fetch_all(pool)
    .await?)
}

/// The outputs of workflow `id`'s checkpoints named `name`, in order.
async fn outputs(pool: &PgPool, id: &str, name: &str) -> anyhow::Result<Vec<Value>> {
    Ok(checkpoints(pool, id, name)
        .await?
        .into_iter()
        .map(|(_, output)| output)
        .collect())
}

/// One order through a worker that dies at `point`, then through another.
async fn crash_at(point: &str, payment: Payment) -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let pool = &db.pool;
    let payment_timeout = if payment == Payment::Never {
        "1500ms"
    } else {
        "2m"
    };
    let env = [
        ("DISPATCH_INTERVAL", "50ms"),
        ("PAYMENT_TIMEOUT", payment_timeout),
    ];
    let api = Api::start(&db, &env).await?;
    if payment == Payment::OutOfStock {
        let (status, body) = api
            .call("POST", "/restock", Some(r#"{"inventory": 0}"#))
            .await?;
        anyhow::ensure!(status == 200, "restock: {status} {body}");
    }
    let stock_before: i32 = sqlx::query_scalar("SELECT inventory FROM products")
        .fetch_one(pool)
        .await?;

    let mut crashing_env = env.to_vec();
    crashing_env.push(("WORKER_CRASH_AT", point));
    let mut crashing = spawn_store_worker(&db, "crashing", &crashing_env)?;
    wait_workers(pool, 1).await?;
    let crashing_id: String = sqlx::query_scalar("SELECT id FROM workers")
        .fetch_one(pool)
        .await?;

    let key = uuid::Uuid::new_v4().to_string();
    let flow = tokio::spawn(shop(
        api.http.clone(),
        api.base.clone(),
        key.clone(),
        payment,
    ));
    let exit = crashing
        .wait_exit(Duration::from_secs(90))
        .await
        .with_context(|| format!("the worker never reached its crash point {point}"))?;
    assert_eq!(exit, None, "{point}: the worker died by a signal");
    let log = std::fs::read_to_string(&crashing.log)?;
    assert!(
        log.contains("crash point reached"),
        "{point}: the worker died at its crash point, not elsewhere; see {}",
        crashing.log.display()
    );
    let _rescuer = spawn_store_worker(&db, "rescuer", &env)?;
    let ((checkout_status, payment_id), webhook) =
        tokio::time::timeout(Duration::from_secs(120), flow)
            .await
            .with_context(|| format!("{point}: the shopper's requests did not end"))??;

    // Every workflow of the order ends.
    wait_until(
        &format!("{point}: every workflow finished"),
        Duration::from_secs(60),
        || async {
            let busy: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM workflows WHERE status NOT IN ('succeeded', 'failed', 'cancelled')",
            )
            .fetch_one(pool)
            .await?;
            Ok(busy == 0)
        },
    )
    .await?;
    let failed: Vec<String> = sqlx::query_scalar(
        "SELECT id || ': ' || coalesce(error, status) FROM workflows WHERE status <> 'succeeded'",
    )
    .fetch_all(pool)
    .await?;
    assert!(
        failed.is_empty(),
        "{point}: workflows not succeeded: {failed:?}"
    );

    let stock: i32 = sqlx::query_scalar("SELECT inventory FROM products")
        .fetch_one(pool)
        .await?;
    let orders: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, status FROM orders WHERE checkout_id = $1")
            .bind(&key)
            .fetch_all(pool)
            .await?;
    let doubled: Vec<String> = sqlx::query_scalar(
        "SELECT workflow_id || ' ' || name || ' x' || count(*) FROM workflow_steps
         WHERE name <> 'update_progress' GROUP BY workflow_id, name HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await?;
    assert!(doubled.is_empty(), "{point}: steps run twice: {doubled:?}");

    if payment == Payment::OutOfStock {
        assert_eq!(checkout_status, 409, "{point}: {payment_id}");
        assert!(payment_id.contains("out_of_stock"), "{point}: {payment_id}");
        assert!(orders.is_empty(), "{point}: no order: {orders:?}");
        assert_eq!(stock, 0, "{point}: nothing taken from an empty stock");
        assert_boundary(pool, point, &key, &crashing_id).await?;
        return Ok(());
    }

    assert_eq!(
        (checkout_status, payment_id.as_str()),
        (200, key.as_str()),
        "{point}: the shopper got the payment id"
    );
    let [(order_id, order_status)] = orders.as_slice() else {
        panic!("{point}: exactly one order for the checkout, found {orders:?}");
    };
    let reserved: Vec<Value> = outputs(pool, &key, "reserve_inventory").await?;
    assert_eq!(reserved, [json!(true)], "{point}: one unit reserved");
    let messages: Vec<(Value, bool)> = sqlx::query_as(
        "SELECT payload, consumed_at IS NOT NULL FROM workflow_messages WHERE workflow_id = $1",
    )
    .bind(&key)
    .fetch_all(pool)
    .await?;
    let outcome: Value = scalar(
        pool,
        "SELECT value FROM workflow_events WHERE workflow_id = $1 AND key = 'payment_outcome'",
        &key,
    )
    .await?;
    let recv: Vec<Value> = outputs(pool, &key, "recv:payment_status").await?;

    match payment {
        Payment::Paid => {
            assert_eq!(
                webhook.as_ref().map(|(s, b)| (*s, b.clone())),
                Some((200, order_id.to_string())),
                "{point}: the webhook got the order id"
            );
            assert_eq!(
                messages,
                [(json!("paid"), true)],
                "{point}: the payment taken once"
            );
            assert_eq!(recv, [json!({ "message": "paid" })], "{point}");
            assert_eq!(outcome, json!("paid"), "{point}");
            assert_eq!(order_status, "DISPATCHED", "{point}");
            assert_eq!(stock, stock_before - 1, "{point}: one unit sold");
            let paid: Vec<Value> = outputs(pool, &key, "mark_paid").await?;
            assert_eq!(paid, [json!(true)], "{point}: marked paid once");
            let dispatches: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM workflows WHERE kind = 'dispatch' AND status = 'succeeded'",
            )
            .fetch_one(pool)
            .await?;
            assert_eq!(dispatches, 1, "{point}: dispatched once");
            assert_progress_applied_once(pool, *order_id).await?;
        }
        Payment::Failed | Payment::Never => {
            let (expected_outcome, expected_messages, expected_recv) = if payment == Payment::Failed
            {
                assert_eq!(
                    webhook.as_ref().map(|(s, b)| (*s, b.clone())),
                    Some((200, order_id.to_string())),
                    "{point}: the webhook got the order id"
                );
                (
                    json!("failed"),
                    vec![(json!("failed"), true)],
                    json!({ "message": "failed" }),
                )
            } else {
                (json!("timed_out"), vec![], json!({ "message": null }))
            };
            assert_eq!(messages, expected_messages, "{point}");
            assert_eq!(recv, [expected_recv], "{point}");
            assert_eq!(outcome, expected_outcome, "{point}");
            assert_eq!(order_status, "CANCELLED", "{point}");
            assert_eq!(stock, stock_before, "{point}: the unit came back once");
            let cancelled: Vec<Value> = outputs(pool, &key, "cancel_order").await?;
            assert_eq!(cancelled, [json!(true)], "{point}: cancelled once");
        }
        Payment::OutOfStock => unreachable!(),
    }
    assert_boundary(pool, point, &key, &crashing_id).await
}

/// The crash was where it was meant to be: a step that died before its
/// commit was checkpointed by the other worker, one that died after it by
/// the crashed worker. (A sleep writes no checkpoint of its own.)
async fn assert_boundary(
    pool: &PgPool,
    point: &str,
    checkout_id: &str,
    crashed: &str,
) -> anyhow::Result<()> {
    let (when, step) = point.split_once(':').context("when:step")?;
    let (step, occurrence) = match step.rsplit_once('#') {
        Some((step, n)) => (step, n.parse::<usize>()?),
        None => (step, 1),
    };
    if step == "sleep" {
        return Ok(());
    }
    let workflow = if step == "update_progress" {
        let order_id: i64 = scalar(
            pool,
            "SELECT id FROM orders WHERE checkout_id = $1",
            checkout_id,
        )
        .await?;
        store::dispatch_workflow_id(order_id)
    } else {
        checkout_id.to_owned()
    };
    let runs = checkpoints(pool, &workflow, step).await?;
    let (worker, _) = runs
        .get(occurrence - 1)
        .with_context(|| format!("{point}: no checkpoint of that step: {runs:?}"))?;
    if when == "before" {
        assert_ne!(
            worker, crashed,
            "{point}: the step the crash undid was redone by the other worker"
        );
    } else {
        assert_eq!(
            worker, crashed,
            "{point}: the step committed before the crash is the crashed worker's"
        );
    }
    Ok(())
}

macro_rules! boundaries {
    ($($test:ident: $point:literal, $payment:expr;)*) => {
        $(
            #[tokio::test]
            async fn $test() -> anyhow::Result<()> {
                crash_at($point, $payment).await
            }
        )*
    };
}

boundaries! {
    before_reserve_inventory: "before:reserve_inventory", Payment::Paid;
    after_reserve_inventory: "after:reserve_inventory", Payment::Paid;
    before_create_order: "before:create_order", Payment::Paid;
    after_create_order: "after:create_order", Payment::Paid;
    before_the_recv_takes_the_payment: "before:recv:payment_status", Payment::Paid;
    after_the_recv_takes_the_payment: "after:recv:payment_status", Payment::Paid;
    before_mark_paid: "before:mark_paid", Payment::Paid;
    after_mark_paid: "after:mark_paid", Payment::Paid;
    before_the_first_dispatch_sleep: "before:sleep", Payment::Paid;
    after_the_first_dispatch_sleep: "after:sleep", Payment::Paid;
    before_the_first_progress_step: "before:update_progress", Payment::Paid;
    after_the_first_progress_step: "after:update_progress", Payment::Paid;
    before_the_fifth_progress_step: "before:update_progress#5", Payment::Paid;
    after_the_fifth_progress_step: "after:update_progress#5", Payment::Paid;
    before_the_last_progress_step: "before:update_progress#10", Payment::Paid;
    after_the_last_progress_step: "after:update_progress#10", Payment::Paid;
    before_the_recv_takes_a_failed_payment: "before:recv:payment_status", Payment::Failed;
    after_the_recv_takes_a_failed_payment: "after:recv:payment_status", Payment::Failed;
    before_cancel_order: "before:cancel_order", Payment::Failed;
    after_cancel_order: "after:cancel_order", Payment::Failed;
    before_the_recv_times_out: "before:recv:payment_status", Payment::Never;
    after_the_recv_times_out: "after:recv:payment_status", Payment::Never;
    before_cancel_order_after_a_timeout: "before:cancel_order", Payment::Never;
    after_cancel_order_after_a_timeout: "after:cancel_order", Payment::Never;
    before_publishing_out_of_stock: "before:set_event:payment_id", Payment::OutOfStock;
    after_publishing_out_of_stock: "after:set_event:payment_id", Payment::OutOfStock;
}

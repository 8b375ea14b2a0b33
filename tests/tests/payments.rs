//! Payments through the provider's signed webhook (`POST /webhooks/payments`),
//! over real HTTP against an API and a worker, delivered by the simulated
//! provider (`harness::provider`), which signs with its own code.

use std::time::Duration;

use anyhow::Context as _;
use harness::provider::{Delivery, Provider, event_body, new_secret};
use harness::{Api, Proc, TestDb, inventory, spawn_store_worker, wait_until, wait_workers};
use serde_json::{Value, json};
use sqlx::PgPool;

const PRICE: &str = "99.99";

struct Stack {
    db: TestDb,
    api: Api,
    _worker: Proc,
    /// The two secrets of a rotation, both configured.
    secrets: [String; 2],
}

impl Stack {
    async fn start(extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let db = TestDb::create().await?;
        let secrets = [new_secret(), new_secret()];
        let both = format!("{},{}", secrets[0], secrets[1]);
        let mut env = vec![
            ("DISPATCH_INTERVAL", "50ms"),
            ("DEMO_PAYMENTS", "false"),
            ("PAYMENT_WEBHOOK_SECRETS", both.as_str()),
        ];
        env.extend_from_slice(extra);
        let api = Api::start(&db, &env).await?;
        let worker = spawn_store_worker(&db, "worker", &env)?;
        wait_workers(&db.pool, 1).await?;
        Ok(Stack {
            db,
            api,
            _worker: worker,
            secrets,
        })
    }

    fn provider(&self) -> Provider {
        Provider::new(&self.api.base, &self.secrets[0])
    }

    /// A checkout: its payment id and its order's id.
    async fn checkout(&self) -> anyhow::Result<(String, i64)> {
        let key = uuid::Uuid::new_v4().to_string();
        let (status, payment_id) = self.api.post(&format!("/checkout/{key}")).await?;
        anyhow::ensure!(status == 200, "checkout: {status} {payment_id}");
        let order_id = sqlx::query_scalar("SELECT id FROM orders WHERE checkout_id = $1")
            .bind(&payment_id)
            .fetch_one(&self.db.pool)
            .await?;
        Ok((payment_id, order_id))
    }

    async fn wait_status(&self, order_id: i64, status: &str) -> anyhow::Result<()> {
        wait_until(
            &format!("order {order_id} {status}"),
            Duration::from_secs(30),
            || async { Ok(order_status(&self.db.pool, order_id).await? == status) },
        )
        .await?;
        Ok(())
    }
}

async fn order_status(pool: &PgPool, order_id: i64) -> anyhow::Result<String> {
    Ok(
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
            .bind(order_id)
            .fetch_one(pool)
            .await?,
    )
}

async fn ledger_rows(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM payment_ledger")
        .fetch_one(pool)
        .await?)
}

async fn refunds(api: &Api) -> anyhow::Result<Vec<Value>> {
    let refunds = api.get_json("/payments/refunds_due").await?;
    Ok(refunds.as_array().context("an array")?.clone())
}

fn delivery_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_signed_success_pays_the_order_with_either_secret_of_a_rotation() -> anyhow::Result<()> {
    let s = Stack::start(&[]).await?;
    for secret in &s.secrets {
        let provider = Provider::new(&s.api.base, secret);
        let (payment_id, order_id) = s.checkout().await?;
        let id = delivery_id();
        let (status, answer) = provider
            .deliver(&id, "payment.succeeded", &payment_id, PRICE, 1)
            .await?;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer, json!({ "delivery_id": id, "outcome": "applied" }));
        s.wait_status(order_id, "DISPATCHED").await?;
        let timeline = s
            .api
            .get_json(&format!("/order/{order_id}/timeline"))
            .await?;
        let payments = &timeline["payments"];
        assert_eq!(payments.as_array().map(Vec::len), Some(1), "{timeline}");
        assert_eq!(payments[0]["delivery_id"], json!(id));
        assert_eq!(payments[0]["type"], "payment.succeeded");
        assert_eq!(payments[0]["outcome"], "applied");
        assert_eq!(payments[0]["amount"], json!(PRICE));
        // A failure delivered after the success (out of order) changes nothing.
        let (status, answer) = provider
            .deliver(&delivery_id(), "payment.failed", &payment_id, PRICE, 1)
            .await?;
        assert_eq!(
            (status, &answer["outcome"]),
            (200, &json!("ignored")),
            "{answer}"
        );
        assert_eq!(order_status(&s.db.pool, order_id).await?, "DISPATCHED");
    }
    assert!(refunds(&s.api).await?.is_empty());
    assert_eq!(inventory(&s.db.pool).await?, 98);
    Ok(())
}

#[tokio::test]
async fn forged_stale_and_malformed_deliveries_are_refused_and_change_nothing() -> anyhow::Result<()>
{
    let s = Stack::start(&[]).await?;
    let provider = s.provider();
    let (payment_id, order_id) = s.checkout().await?;
    let body = event_body("payment.succeeded", &payment_id, PRICE, "USD");
    let now = chrono::Utc::now().timestamp();
    let good = Delivery::signed(&s.secrets[0], &delivery_id(), body.clone());
    let truncated = good.signature[..good.signature.len() - 8].to_owned();
    let cases: Vec<(&str, Delivery, u16, &str)> = vec![
        (
            "wrong secret",
            Delivery::signed(&new_secret(), &delivery_id(), body.clone()),
            401,
            "invalid_signature",
        ),
        (
            "empty v1,",
            Delivery {
                signature: "v1,".into(),
                ..good.clone()
            },
            401,
            "invalid_signature",
        ),
        (
            "truncated signature",
            Delivery {
                signature: truncated,
                ..good.clone()
            },
            401,
            "invalid_signature",
        ),
        (
            "body altered after signing",
            Delivery {
                body: body.replace(PRICE, "0.01"),
                ..good.clone()
            },
            401,
            "invalid_signature",
        ),
        (
            "timestamp 6 minutes old",
            Delivery::signed_at(&s.secrets[0], &delivery_id(), body.clone(), now - 360),
            401,
            "stale_timestamp",
        ),
        (
            "timestamp 6 minutes ahead",
            Delivery::signed_at(&s.secrets[0], &delivery_id(), body.clone(), now + 360),
            401,
            "stale_timestamp",
        ),
        (
            "no signature header",
            Delivery {
                signature: String::new(),
                ..good.clone()
            },
            401,
            "invalid_signature",
        ),
        (
            "signed, but not the event's shape",
            Delivery::signed(&s.secrets[0], &delivery_id(), r#"{"type": 1}"#.into()),
            400,
            "invalid_body",
        ),
        (
            "signed, but an unknown type",
            Delivery::signed(
                &s.secrets[0],
                &delivery_id(),
                event_body("payment.refunded", &payment_id, PRICE, "USD"),
            ),
            400,
            "invalid_event_type",
        ),
        (
            "signed, but not an amount",
            Delivery::signed(
                &s.secrets[0],
                &delivery_id(),
                event_body("payment.succeeded", &payment_id, "lots", "USD"),
            ),
            400,
            "invalid_amount",
        ),
    ];
    for (what, delivery, status, code) in cases {
        let (got, answer) = provider.send(&delivery).await?;
        assert_eq!(
            (got, &answer["error"]["code"]),
            (status, &json!(code)),
            "{what}: {answer}"
        );
    }
    assert_eq!(
        ledger_rows(&s.db.pool).await?,
        0,
        "a refusal records nothing"
    );
    assert_eq!(order_status(&s.db.pool, order_id).await?, "PENDING");
    // The untouched delivery still pays.
    let (status, answer) = provider.send(&good).await?;
    assert_eq!(status, 200, "{answer}");
    s.wait_status(order_id, "PAID").await
}

#[tokio::test]
async fn one_delivery_id_twenty_times_at_once_has_one_effect_and_one_answer() -> anyhow::Result<()>
{
    let s = Stack::start(&[]).await?;
    let provider = s.provider();
    let (payment_id, order_id) = s.checkout().await?;
    let delivery = Delivery::signed(
        &s.secrets[0],
        &delivery_id(),
        event_body("payment.succeeded", &payment_id, PRICE, "USD"),
    );
    let answers = futures::future::join_all((0..20).map(|_| provider.send(&delivery))).await;
    let answers: Vec<(u16, Value)> = answers.into_iter().collect::<Result<_, _>>()?;
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "20 deliveries, different answers: {answers:?}"
    );
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[0].1["outcome"], "applied");
    assert_eq!(ledger_rows(&s.db.pool).await?, 1);
    s.wait_status(order_id, "DISPATCHED").await?;
    assert!(refunds(&s.api).await?.is_empty());
    // Redelivered later, as a provider retries: the same answer again.
    assert_eq!(provider.send(&delivery).await?, answers[0]);
    assert_eq!(inventory(&s.db.pool).await?, 99);
    Ok(())
}

#[tokio::test]
async fn a_success_after_a_failure_or_after_expiry_is_a_refund_due() -> anyhow::Result<()> {
    let s = Stack::start(&[("PAYMENT_TIMEOUT", "1500ms")]).await?;
    let provider = s.provider();

    // Failed, then succeeded (out of order, or the shopper retried).
    let (failed_first, order_a) = s.checkout().await?;
    let (status, answer) = provider
        .deliver(&delivery_id(), "payment.failed", &failed_first, PRICE, 1)
        .await?;
    assert_eq!((status, &answer["outcome"]), (200, &json!("applied")));
    let late = delivery_id();
    let (status, answer) = provider
        .deliver(&late, "payment.succeeded", &failed_first, PRICE, 1)
        .await?;
    assert_eq!(
        (status, &answer["outcome"]),
        (200, &json!("refund_due")),
        "{answer}"
    );
    s.wait_status(order_a, "CANCELLED").await?;

    // Paid after the payment window closed.
    let (expired, order_b) = s.checkout().await?;
    s.wait_status(order_b, "CANCELLED").await?;
    let stock = inventory(&s.db.pool).await?;
    let after_expiry = delivery_id();
    let (status, answer) = provider
        .deliver(&after_expiry, "payment.succeeded", &expired, PRICE, 1)
        .await?;
    assert_eq!(
        (status, &answer["outcome"]),
        (200, &json!("refund_due")),
        "{answer}"
    );
    assert_eq!(order_status(&s.db.pool, order_b).await?, "CANCELLED");
    assert_eq!(
        inventory(&s.db.pool).await?,
        stock,
        "a late payment takes no stock"
    );
    assert_eq!(stock, 100, "both cancelled orders gave their unit back");

    let refunds = refunds(&s.api).await?;
    let listed: Vec<(&Value, &Value, &Value)> = refunds
        .iter()
        .map(|r| (&r["delivery_id"], &r["order_id"], &r["amount"]))
        .collect();
    assert_eq!(
        listed,
        [
            (&json!(after_expiry), &json!(order_b), &json!(PRICE)),
            (&json!(late), &json!(order_a), &json!(PRICE)),
        ],
        "newest first"
    );
    Ok(())
}

#[tokio::test]
async fn a_wrong_amount_or_currency_is_recorded_never_applied() -> anyhow::Result<()> {
    let s = Stack::start(&[]).await?;
    let provider = s.provider();
    let (payment_id, order_id) = s.checkout().await?;
    for (amount, currency) in [("9.99", "USD"), (PRICE, "EUR")] {
        let delivery = Delivery::signed(
            &s.secrets[0],
            &delivery_id(),
            event_body("payment.succeeded", &payment_id, amount, currency),
        );
        let (status, answer) = provider.send(&delivery).await?;
        assert_eq!(
            (status, &answer["error"]["code"]),
            (422, &json!("payment_mismatch")),
            "{answer}"
        );
    }
    let outcomes: Vec<String> =
        sqlx::query_scalar("SELECT outcome FROM payment_ledger ORDER BY received_at")
            .fetch_all(&s.db.pool)
            .await?;
    assert_eq!(outcomes, ["mismatch", "mismatch"]);
    assert_eq!(order_status(&s.db.pool, order_id).await?, "PENDING");
    assert!(refunds(&s.api).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn the_demo_route_is_404_unless_demo_payments_and_no_secret_is_503() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let api = Api::start(&db, &[("DEMO_PAYMENTS", "false")]).await?;
    let (status, body) = api.post("/payment_webhook/some-payment/paid").await?;
    assert_eq!(status, 404, "{body}");
    let (_, unknown) = api.post("/no_such_route").await?;
    assert_eq!(body, unknown, "answered like any unknown route");
    assert_eq!(
        api.get_json("/config").await?["demo_payments"],
        json!(false)
    );
    let provider = Provider::new(&api.base, &new_secret());
    let (status, answer) = provider
        .deliver(
            &delivery_id(),
            "payment.succeeded",
            "some-payment",
            PRICE,
            1,
        )
        .await?;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (503, &json!("webhooks_not_configured"))
    );
    Ok(())
}

#[tokio::test]
async fn the_readme_signing_recipe_and_the_provider_command_pay_orders() -> anyhow::Result<()> {
    let s = Stack::start(&[]).await?;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let recipe = readme
        .split("Signing by hand:")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|block| block.split("```").next())
        .context("the README's signing recipe")?;
    let (payment_id, order_id) = s.checkout().await?;
    let script = recipe
        .replace("whsec_...", &s.secrets[1])
        .replace("PAYMENT_ID", &payment_id)
        .replace("localhost:8080", s.api.base.trim_start_matches("http://"));
    let out = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_str(&stdout).context("curl's output")?;
    assert_eq!(answer["outcome"], "applied", "{answer}");
    s.wait_status(order_id, "PAID").await?;

    let provider = harness::bin("provider");
    let (payment_id, order_id) = s.checkout().await?;
    let run = |extra: &[&str]| {
        let mut command = tokio::process::Command::new(&provider);
        command
            .args([
                "paid",
                &payment_id,
                "--url",
                &s.api.base,
                "--secret",
                &s.secrets[0],
            ])
            .args(extra);
        command.output()
    };
    let forged = run(&["--forge", "--attempts", "1"]).await?;
    let printed = String::from_utf8_lossy(&forged.stdout);
    assert!(printed.contains(": 401 "), "{printed}");
    assert_eq!(order_status(&s.db.pool, order_id).await?, "PENDING");
    let paid = run(&["--copies", "3"]).await?;
    let printed = String::from_utf8_lossy(&paid.stdout);
    assert_eq!(printed.matches(": 200 ").count(), 3, "{printed}");
    s.wait_status(order_id, "PAID").await?;
    assert_eq!(ledger_rows(&s.db.pool).await?, 2, "one row per delivery id");
    Ok(())
}

/// A success handed to a checkout whose payment window closed a moment
/// before (its recv timed out, its cancel not yet run): the cancel owes it
/// back. The worker dies right after the recv times out, the success
/// arrives, then another worker runs the cancel.
#[tokio::test]
async fn a_success_handed_over_as_the_window_closes_is_refunded_by_the_cancel() -> anyhow::Result<()>
{
    let db = TestDb::create().await?;
    let secret = new_secret();
    let env = [
        ("PAYMENT_TIMEOUT", "1s"),
        ("DEMO_PAYMENTS", "false"),
        ("PAYMENT_WEBHOOK_SECRETS", secret.as_str()),
    ];
    let api = Api::start(&db, &env).await?;
    let mut crashing = spawn_store_worker(
        &db,
        "crashes-after-the-recv",
        &[env[0], ("WORKER_CRASH_AT", "after:recv:payment_status")],
    )?;
    wait_workers(&db.pool, 1).await?;
    let key = uuid::Uuid::new_v4().to_string();
    let (status, payment_id) = api.post(&format!("/checkout/{key}")).await?;
    assert_eq!(status, 200, "{payment_id}");
    let exit = crashing
        .wait_exit(Duration::from_secs(30))
        .await
        .context("the worker never reached its crash point after the recv")?;
    assert_eq!(exit, None, "the worker died by its crash point's signal");

    let id = delivery_id();
    let (status, answer) = Provider::new(&api.base, &secret)
        .deliver(&id, "payment.succeeded", &payment_id, PRICE, 1)
        .await?;
    assert_eq!(
        (status, &answer["outcome"]),
        (200, &json!("applied")),
        "{answer}"
    );

    let _worker = spawn_store_worker(&db, "takes-over", &[env[0]])?;
    let order_id: i64 = sqlx::query_scalar("SELECT id FROM orders WHERE checkout_id = $1")
        .bind(&payment_id)
        .fetch_one(&db.pool)
        .await?;
    wait_until("the order cancelled", Duration::from_secs(30), || async {
        Ok(order_status(&db.pool, order_id).await? == "CANCELLED")
    })
    .await?;
    let refunds = refunds(&api).await?;
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["delivery_id"], json!(id));
    assert_eq!(refunds[0]["reason"], "checkout_cancelled");
    assert_eq!(inventory(&db.pool).await?, 100, "the unit went back");
    Ok(())
}

#[tokio::test]
async fn webhook_secrets_never_reach_a_log_or_an_error() -> anyhow::Result<()> {
    let s = Stack::start(&[]).await?;
    let (payment_id, order_id) = s.checkout().await?;
    let provider = s.provider();
    let forged = Provider::new(&s.api.base, &new_secret());
    forged
        .deliver(&delivery_id(), "payment.succeeded", &payment_id, PRICE, 1)
        .await?;
    provider
        .deliver(&delivery_id(), "payment.succeeded", &payment_id, PRICE, 1)
        .await?;
    s.wait_status(order_id, "PAID").await?;
    let log = std::fs::read_to_string(&s.api.proc.log)?;
    assert!(
        log.contains("webhook_secrets"),
        "the start-up line names how many"
    );
    for secret in &s.secrets {
        let key = secret.trim_start_matches("whsec_");
        assert!(
            !log.contains(key),
            "a secret in {}",
            s.api.proc.log.display()
        );
    }

    // A malformed secret stops the API with a message that does not repeat it.
    let bad = "whsec_not-base64-but-very-secret";
    let out = tokio::process::Command::new(harness::bin("widget-api"))
        .env("DATABASE_URL", &s.db.url)
        .env("PAYMENT_WEBHOOK_SECRETS", bad)
        .output()
        .await?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(printed.contains("PAYMENT_WEBHOOK_SECRETS"), "{printed}");
    assert!(!printed.contains("very-secret"), "{printed}");
    Ok(())
}

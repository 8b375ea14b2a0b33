//! The operator's admin API against the real stack: its token, its list
//! and detail, and cancel, resume and restart as a checkout's shopper and
//! stock see them (a cancelled or failed checkout gives its unit back).

use std::time::Duration;

use anyhow::Context as _;
use harness::{Api, Proc, TestDb, inventory, spawn_store_worker, wait_until, wait_workers};
use serde_json::{Value, json};
use sqlx::PgPool;

const TOKEN: &str = "ops-token-0123456789abcdefghij";
const PATIENCE: Duration = Duration::from_secs(30);

struct Stack {
    db: TestDb,
    api: Api,
    _workers: Vec<Proc>,
}

async fn stack() -> anyhow::Result<Stack> {
    let db = TestDb::create().await?;
    let token = format!("ops={TOKEN}");
    let env = [
        ("DISPATCH_INTERVAL", "50ms"),
        ("ADMIN_TOKEN", token.as_str()),
    ];
    let api = Api::start(&db, &env).await?;
    let workers = vec![
        spawn_store_worker(&db, "admin-worker-a", &env)?,
        spawn_store_worker(&db, "admin-worker-b", &env)?,
    ];
    wait_workers(&db.pool, 2).await?;
    Ok(Stack {
        db,
        api,
        _workers: workers,
    })
}

/// An admin call with the token; status and parsed body.
async fn admin(
    api: &Api,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let bearer = format!("Bearer {TOKEN}");
    let (status, text) = api
        .call_with(method, path, body, &[("authorization", &bearer)])
        .await?;
    let body = serde_json::from_str(&text).with_context(|| format!("{method} {path}: {text}"))?;
    Ok((status, body))
}

/// An admin action (`cancel`, `resume`, `restart`) on workflow `id`.
async fn act(
    api: &Api,
    id: &str,
    action: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    admin(
        api,
        "POST",
        &format!("/admin/workflows/{id}/{action}"),
        body,
    )
    .await
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

async fn checkout(api: &Api) -> anyhow::Result<String> {
    let key = uuid::Uuid::new_v4().simple().to_string();
    let (status, payment_id) = api.post(&format!("/checkout/{key}")).await?;
    anyhow::ensure!(status == 200, "checkout: {status} {payment_id}");
    Ok(payment_id)
}

async fn workflow_status(api: &Api, id: &str) -> anyhow::Result<String> {
    let (status, body) = admin(api, "GET", &format!("/admin/workflows/{id}"), None).await?;
    anyhow::ensure!(status == 200, "detail of {id}: {status} {body}");
    Ok(body["workflow"]["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

async fn wait_workflow(api: &Api, id: &str, expected: &str) -> anyhow::Result<()> {
    wait_until(&format!("workflow {id} {expected}"), PATIENCE, || async {
        Ok(workflow_status(api, id).await? == expected)
    })
    .await?;
    Ok(())
}

async fn order_of(pool: &PgPool, checkout_id: &str) -> anyhow::Result<Option<(i64, String)>> {
    Ok(
        sqlx::query_as("SELECT id, status FROM orders WHERE checkout_id = $1")
            .bind(checkout_id)
            .fetch_optional(pool)
            .await?,
    )
}

#[tokio::test]
async fn admin_is_off_without_a_token_and_refuses_a_missing_or_wrong_one() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let off = Api::start(&db, &[]).await?;
    for path in ["/admin/", "/admin/workflows", "/admin/workers"] {
        let (status, body) = off.call("GET", path, None).await?;
        assert_eq!(status, 404, "{path} with admin off: {body}");
    }
    drop(off);

    let s = stack().await?;
    let (status, body) = s.api.call("GET", "/admin/workflows", None).await?;
    assert_eq!(status, 401, "{body}");
    assert_eq!(error_code(&serde_json::from_str(&body)?), "missing_token");
    for wrong in [
        "Bearer nope",
        "Bearer ops-token-0123456789abcdefghiJ",
        TOKEN,
    ] {
        let (status, body) = s
            .api
            .call_with(
                "POST",
                "/admin/workflows/x/cancel",
                None,
                &[("authorization", wrong)],
            )
            .await?;
        assert_eq!(status, 401, "{wrong}: {body}");
    }
    // The page itself is served without a token: it holds no data.
    let (status, page) = s.api.call("GET", "/admin/", None).await?;
    assert_eq!(status, 200);
    assert!(page.contains("Widget Store admin"));

    // The public fleet hides hosts and process ids; the admin's shows them.
    let public = s.api.get_json("/workers").await?;
    let public = public.as_array().context("a list")?;
    assert_eq!(public.len(), 2);
    for w in public {
        assert!(w.get("pid").is_none() && w.get("host").is_none(), "{w}");
        assert!(
            !w["id"]
                .as_str()
                .unwrap_or_default()
                .contains(&std::process::id().to_string())
        );
    }
    let (status, fleet) = admin(&s.api, "GET", "/admin/workers", None).await?;
    assert_eq!(status, 200);
    for w in fleet.as_array().context("a list")? {
        assert!(
            w["pid"].as_i64().is_some() && w["host"].as_str().is_some(),
            "{w}"
        );
    }

    // Bad input: a clear 400 each, nothing changed.
    for (path, code) in [
        ("/admin/workflows?status=lost", "invalid_status"),
        ("/admin/workflows?limit=0", "invalid_limit"),
        ("/admin/workflows?limit=501", "invalid_limit"),
        ("/admin/workflows?older_than=soon", "invalid_older_than"),
        ("/admin/workflows?cursor=nonsense", "invalid_cursor"),
    ] {
        let (status, body) = admin(&s.api, "GET", path, None).await?;
        assert_eq!((status, error_code(&body)), (400, code), "{path}: {body}");
    }
    let (status, body) = admin(&s.api, "GET", "/admin/workflows/nobody", None).await?;
    assert_eq!((status, error_code(&body)), (404, "unknown_workflow"));
    let (status, body) = admin(&s.api, "POST", "/admin/workflows/nobody/cancel", None).await?;
    assert_eq!((status, error_code(&body)), (404, "unknown_workflow"));

    // Newest first, keyset pages that cover each workflow once.
    let mut started = Vec::new();
    for _ in 0..5 {
        started.push(checkout(&s.api).await?);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/workflows?kind=checkout&limit=2&cursor={c}"),
            None => "/admin/workflows?kind=checkout&limit=2".to_owned(),
        };
        let (status, page) = admin(&s.api, "GET", &path, None).await?;
        assert_eq!(status, 200, "{page}");
        for w in page["workflows"].as_array().context("workflows")? {
            seen.push(w["id"].as_str().context("id")?.to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    started.reverse();
    assert_eq!(seen, started, "every checkout once, newest first");
    let (_, waiting) = admin(
        &s.api,
        "GET",
        "/admin/workflows?status=waiting&older_than=1h",
        None,
    )
    .await?;
    assert_eq!(waiting["workflows"], json!([]), "none has waited an hour");

    let log = std::fs::read_to_string(&s.api.proc.log)?;
    assert!(!log.contains(TOKEN), "the token never reaches the log");
    Ok(())
}

#[tokio::test]
async fn an_operator_cancels_a_checkout_waiting_for_payment_and_its_unit_comes_back()
-> anyhow::Result<()> {
    let s = stack().await?;
    let initial = inventory(&s.db.pool).await?;
    let payment_id = checkout(&s.api).await?;
    assert_eq!(inventory(&s.db.pool).await?, initial - 1);
    wait_workflow(&s.api, &payment_id, "waiting").await?;

    let (status, body) = act(&s.api, &payment_id, "cancel", None).await?;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (202, Some("cancel_requested")),
        "{body}"
    );
    wait_workflow(&s.api, &payment_id, "cancelled").await?;
    let (_, status) = order_of(&s.db.pool, &payment_id)
        .await?
        .context("its order")?;
    assert_eq!(status, "CANCELLED");
    assert_eq!(
        inventory(&s.db.pool).await?,
        initial,
        "the unit is back in stock"
    );

    // The detail shows the end and the compensation's step.
    let (_, detail) = admin(
        &s.api,
        "GET",
        &format!("/admin/workflows/{payment_id}"),
        None,
    )
    .await?;
    let steps: Vec<&str> = detail["steps"]
        .as_array()
        .context("steps")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        steps,
        [
            "reserve_inventory",
            "create_order",
            "recv:payment_status:deadline",
            "$ending",
            "cancel_order"
        ]
    );
    assert!(
        detail["events"]
            .as_array()
            .context("events")?
            .iter()
            .any(|e| e["key"] == "payment_outcome" && e["value"] == "cancelled")
    );
    assert_eq!(detail["workflow"]["input"]["product_id"], 1);

    // The shopper's late payment is refused; the operator's second cancel
    // and a resume over the compensation too.
    let (status, body) = s
        .api
        .post(&format!("/payment_webhook/{payment_id}/paid"))
        .await?;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("checkout_ended"), "{body}");
    let (status, body) = act(&s.api, &payment_id, "cancel", None).await?;
    assert_eq!((status, error_code(&body)), (409, "already_finished"));
    let (status, body) = act(&s.api, &payment_id, "resume", None).await?;
    assert_eq!((status, error_code(&body)), (409, "compensated"));
    assert_eq!(inventory(&s.db.pool).await?, initial, "nothing changed");

    let log = std::fs::read_to_string(&s.api.proc.log)?;
    let line = log
        .lines()
        .find(|l| l.contains("admin action") && l.contains(&payment_id))
        .context("the cancel is logged")?;
    assert!(line.contains("ops") && line.contains("cancel"), "{line}");
    Ok(())
}

#[tokio::test]
async fn a_checkout_that_fails_for_good_cancels_its_order_and_restarts_as_new() -> anyhow::Result<()>
{
    let s = stack().await?;
    let initial = inventory(&s.db.pool).await?;
    // Marking this order paid fails every time (a broken constraint, say).
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_paid() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'orders cannot be paid today'; END $$;
         CREATE TRIGGER refuse_paid BEFORE UPDATE ON orders FOR EACH ROW
         WHEN (NEW.status = 'PAID') EXECUTE FUNCTION refuse_paid();",
    )
    .execute(&s.db.pool)
    .await?;
    let payment_id = checkout(&s.api).await?;
    let _ = s
        .api
        .post(&format!("/payment_webhook/{payment_id}/paid"))
        .await?;
    wait_workflow(&s.api, &payment_id, "failed").await?;
    let (_, status) = order_of(&s.db.pool, &payment_id)
        .await?
        .context("its order")?;
    assert_eq!(
        status, "CANCELLED",
        "the failed checkout cancelled its order"
    );
    assert_eq!(
        inventory(&s.db.pool).await?,
        initial,
        "and returned its unit"
    );
    let (_, detail) = admin(
        &s.api,
        "GET",
        &format!("/admin/workflows/{payment_id}"),
        None,
    )
    .await?;
    let error = detail["workflow"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("mark_paid"),
        "the failing step is named: {error}"
    );

    // Restarted as a new checkout from the same input: a new order.
    sqlx::raw_sql("DROP TRIGGER refuse_paid ON orders")
        .execute(&s.db.pool)
        .await?;
    let (status, body) = act(&s.api, &payment_id, "restart", Some("{}")).await?;
    assert_eq!(status, 201, "{body}");
    let new_id = body["workflow_id"].as_str().context("new id")?.to_owned();
    assert_ne!(new_id, payment_id);
    wait_workflow(&s.api, &new_id, "waiting").await?;
    let (_, status) = order_of(&s.db.pool, &new_id).await?.context("new order")?;
    assert_eq!(status, "PENDING");
    assert_eq!(
        workflow_status(&s.api, &payment_id).await?,
        "failed",
        "the original untouched"
    );
    let (status, _) = s
        .api
        .post(&format!("/payment_webhook/{new_id}/paid"))
        .await?;
    assert_eq!(status, 200, "the new id is a payment id");
    let (status, body) = act(&s.api, &payment_id, "restart", Some("{\"from_step\": 99}")).await?;
    assert_eq!((status, error_code(&body)), (400, "invalid_from_step"));
    let (status, body) = act(&s.api, &payment_id, "restart", Some("{\"step\": 1}")).await?;
    assert_eq!((status, error_code(&body)), (400, "invalid_body"));
    Ok(())
}

#[tokio::test]
async fn a_checkout_cancelled_between_reserving_and_ordering_returns_its_unit() -> anyhow::Result<()>
{
    let s = stack().await?;
    let initial = inventory(&s.db.pool).await?;
    let key = uuid::Uuid::new_v4().simple().to_string();
    // An uncommitted order with this checkout id holds the unique key the
    // checkout's create_order needs: it waits there, its unit reserved.
    let mut blocker = s.db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO orders (product_id, checkout_id, status, progress_remaining)
         VALUES (1, $1, 'PENDING', 10)",
    )
    .bind(&key)
    .execute(&mut *blocker)
    .await?;
    let shopper = {
        let (base, http) = (s.api.base.clone(), s.api.http.clone());
        let key = key.clone();
        tokio::spawn(async move {
            let response = http.post(format!("{base}/checkout/{key}")).send().await?;
            Ok::<_, anyhow::Error>((response.status().as_u16(), response.text().await?))
        })
    };
    wait_until("the unit reserved", PATIENCE, || async {
        Ok(inventory(&s.db.pool).await? == initial - 1)
    })
    .await?;
    let (status, body) = act(&s.api, &key, "cancel", None).await?;
    assert_eq!(status, 202, "{body}");
    blocker.rollback().await?;
    wait_workflow(&s.api, &key, "cancelled").await?;
    assert_eq!(
        order_of(&s.db.pool, &key).await?,
        None,
        "no order was created"
    );
    assert_eq!(
        inventory(&s.db.pool).await?,
        initial,
        "the reserved unit is back"
    );
    let (status, body) = tokio::time::timeout(PATIENCE, shopper).await???;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("checkout_ended"),
        "the shopper hears why: {body}"
    );
    Ok(())
}

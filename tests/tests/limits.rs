//! What one client may hold or start: the per-client rate limit on
//! checkouts and the cap on checkouts waiting for payment, each refusing
//! with 429 and reserving nothing.

use std::time::Duration;

use harness::{Api, Proc, TestDb, inventory, spawn_store_worker, wait_until, wait_workers};
use serde_json::Value;
use sqlx::PgPool;

struct Stack {
    db: TestDb,
    api: Api,
    _worker: Proc,
}

async fn stack(env: &[(&str, &str)]) -> anyhow::Result<Stack> {
    let db = TestDb::create().await?;
    let api = Api::start(&db, env).await?;
    let worker = spawn_store_worker(&db, "limits-worker", env)?;
    wait_workers(&db.pool, 1).await?;
    Ok(Stack {
        db,
        api,
        _worker: worker,
    })
}

fn key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `POST /checkout/{key}` as `client` (an `X-Forwarded-For` a trusted
/// proxy would have set): status, `Retry-After`, body.
async fn checkout_as(
    api: &Api,
    key: &str,
    client: Option<&str>,
) -> anyhow::Result<(u16, Option<String>, String)> {
    let mut request = api.http.post(format!("{}/checkout/{key}", api.base));
    if let Some(client) = client {
        request = request.header("x-forwarded-for", client);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((status, retry_after, response.text().await?))
}

fn code(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn checkouts(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM engine.workflows WHERE kind = 'checkout'")
            .fetch_one(pool)
            .await?,
    )
}

#[tokio::test]
async fn a_client_over_its_checkout_rate_gets_429_with_retry_after_and_reserves_nothing()
-> anyhow::Result<()> {
    let s = stack(&[
        ("CHECKOUT_RATE", "1"),
        ("CHECKOUT_BURST", "3"),
        ("MAX_PENDING_CHECKOUTS", "0"),
        ("FORWARDED_HOPS", "1"),
    ])
    .await?;
    let initial = inventory(&s.db.pool).await?;
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(checkout_as(&s.api, &key(), Some("198.51.100.1")).await?);
    }
    let statuses: Vec<u16> = answers.iter().map(|(status, _, _)| *status).collect();
    assert_eq!(
        &statuses[..3],
        [200, 200, 200],
        "the burst passes: {answers:?}"
    );
    assert!(
        statuses[3..].contains(&429),
        "then the rate applies: {answers:?}"
    );
    for (status, retry_after, body) in &answers {
        if *status == 429 {
            assert_eq!(code(body), "rate_limited", "{body}");
            let wait: u64 = retry_after.as_deref().unwrap_or("").parse()?;
            assert!((1..=2).contains(&wait), "Retry-After in seconds: {wait}");
        }
    }
    let passed = statuses.iter().filter(|s| **s == 200).count() as i64;
    assert_eq!(
        inventory(&s.db.pool).await?,
        initial - passed,
        "refused ones reserved nothing"
    );
    assert_eq!(checkouts(&s.db.pool).await?, passed, "and started nothing");

    // Another client has a bucket of its own; other routes are not limited.
    let (status, _, body) = checkout_as(&s.api, &key(), Some("198.51.100.2")).await?;
    assert_eq!(status, 200, "{body}");
    for _ in 0..10 {
        s.api.get_json("/product").await?;
    }
    // A client writing its own X-Forwarded-For further left changes nothing:
    // the trusted proxy's entry (the last) is the client.
    let (status, _, _) = checkout_as(&s.api, &key(), Some("1.2.3.4, 198.51.100.1")).await?;
    assert_eq!(status, 429);
    Ok(())
}

#[tokio::test]
async fn a_client_holding_its_cap_of_pending_checkouts_gets_429_until_one_settles()
-> anyhow::Result<()> {
    let s = stack(&[
        ("CHECKOUT_RATE", "0"),
        ("MAX_PENDING_CHECKOUTS", "2"),
        ("FORWARDED_HOPS", "1"),
    ])
    .await?;
    let initial = inventory(&s.db.pool).await?;
    let client = Some("203.0.113.5");
    let (first, second) = (key(), key());
    let (status, _, payment_id) = checkout_as(&s.api, &first, client).await?;
    assert_eq!(status, 200);
    assert_eq!(checkout_as(&s.api, &second, client).await?.0, 200);
    let (status, _, body) = checkout_as(&s.api, &key(), client).await?;
    assert_eq!(
        (status, code(&body).as_str()),
        (429, "too_many_pending_checkouts"),
        "{body}"
    );
    assert_eq!(
        inventory(&s.db.pool).await?,
        initial - 2,
        "the third reserved nothing"
    );
    assert_eq!(checkouts(&s.db.pool).await?, 2);
    // A retry of a key it holds is answered as before, not refused.
    let (status, _, again) = checkout_as(&s.api, &first, client).await?;
    assert_eq!((status, again.as_str()), (200, payment_id.as_str()));
    // Another client is not held back by this one.
    assert_eq!(
        checkout_as(&s.api, &key(), Some("203.0.113.6")).await?.0,
        200
    );

    // Paid, the first settles; the client may start another.
    let (status, _) = s
        .api
        .post(&format!("/payment_webhook/{payment_id}/paid"))
        .await?;
    assert_eq!(status, 200);
    wait_until(
        "a checkout allowed again",
        Duration::from_secs(30),
        || async { Ok(checkout_as(&s.api, &key(), client).await?.0 == 200) },
    )
    .await?;

    // Forty at once from a new client with a cap of two: exactly two pass.
    let burst = futures::future::join_all(
        (0..40).map(|_| async { checkout_as(&s.api, &key(), Some("203.0.113.77")).await }),
    )
    .await;
    let mut passed = 0;
    for answer in burst {
        let (status, _, body) = answer?;
        match status {
            200 => passed += 1,
            429 => assert_eq!(code(&body), "too_many_pending_checkouts"),
            other => anyhow::bail!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(passed, 2, "the cap holds under concurrency");
    Ok(())
}

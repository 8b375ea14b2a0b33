//! A payment provider, simulated: it signs its webhooks as the Standard
//! Webhooks scheme says (its own implementation, not the API's), retries a
//! delivery that did not get a 2xx with backoff, and can deliver twice,
//! out of order, late, with an old or future timestamp, or forged.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// A new random secret, written `whsec_<base64>`.
pub fn new_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("whsec_{}", STANDARD.encode(key))
}

/// `v1,<base64 HMAC-SHA256>` of `{id}.{timestamp}.{body}` under `secret`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .expect("a whsec_ secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// A payment event's body.
pub fn event_body(kind: &str, payment_id: &str, amount: &str, currency: &str) -> String {
    json!({
        "type": kind,
        "data": { "payment_id": payment_id, "amount": amount, "currency": currency },
    })
    .to_string()
}

/// One delivery as sent: the headers and the body.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: i64,
    /// `webhook-signature`.
    pub signature: String,
    /// The raw body.
    pub body: String,
}

impl Delivery {
    /// A delivery signed now with `secret`.
    pub fn signed(secret: &str, id: &str, body: String) -> Self {
        Self::signed_at(secret, id, body, chrono::Utc::now().timestamp())
    }

    /// A delivery signed with `secret` at `timestamp`.
    pub fn signed_at(secret: &str, id: &str, body: String, timestamp: i64) -> Self {
        Delivery {
            id: id.to_owned(),
            timestamp,
            signature: sign(secret, id, timestamp, &body),
            body,
        }
    }
}

/// The provider, sending to one store.
#[derive(Clone)]
pub struct Provider {
    /// `http://host:port` of the store's API.
    pub base: String,
    /// The secret it signs with.
    pub secret: String,
    http: reqwest::Client,
}

impl Provider {
    /// A provider for the API at `base`, signing with `secret`.
    pub fn new(base: &str, secret: &str) -> Self {
        Provider {
            base: base.to_owned(),
            secret: secret.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Sends one delivery once: the status and the JSON answer.
    pub async fn send(&self, delivery: &Delivery) -> anyhow::Result<(u16, Value)> {
        let response = post(&self.http, &self.base, delivery).await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    /// A payment event for `payment_id`, delivered as a provider does:
    /// signed now and again on each attempt (same id), retried after a
    /// transport error or any answer but 2xx, up to `attempts` times with
    /// a doubling backoff. The last answer.
    pub async fn deliver(
        &self,
        id: &str,
        kind: &str,
        payment_id: &str,
        amount: &str,
        attempts: u32,
    ) -> anyhow::Result<(u16, Value)> {
        let body = event_body(kind, payment_id, amount, "USD");
        let mut backoff = Duration::from_millis(50);
        let mut last = Err(anyhow::anyhow!("no attempt"));
        for _ in 0..attempts.max(1) {
            let delivery = Delivery::signed(&self.secret, id, body.clone());
            last = self.send(&delivery).await;
            if matches!(&last, Ok((status, _)) if (200..300).contains(status)) {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        last
    }
}

/// POSTs `delivery` to the store at `base` with its three headers.
pub async fn post(
    http: &reqwest::Client,
    base: &str,
    delivery: &Delivery,
) -> reqwest::Result<reqwest::Response> {
    http.post(format!("{base}/webhooks/payments"))
        .header("content-type", "application/json")
        .header("webhook-id", &delivery.id)
        .header("webhook-timestamp", delivery.timestamp.to_string())
        .header("webhook-signature", &delivery.signature)
        .body(delivery.body.clone())
        .send()
        .await
}

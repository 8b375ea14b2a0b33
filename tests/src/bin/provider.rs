//! A payment provider at the command line: sends one signed payment event
//! to a store's `POST /webhooks/payments`, as `harness::provider` does for
//! the tests, and prints each answer.
//!
//!   cargo run -p widget-tests --bin provider -- paid <payment id>
//!
//! The secret is `--secret`, else the first of `PAYMENT_WEBHOOK_SECRETS`,
//! else the launcher's `.local/webhook_secret`.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use harness::provider::{Delivery, Provider, event_body, new_secret};

#[derive(Parser)]
#[command(
    name = "provider",
    about = "Send a signed payment webhook to the store"
)]
struct Args {
    /// `paid` (payment.succeeded) or `failed` (payment.failed).
    #[arg(value_parser = ["paid", "failed"])]
    status: String,
    /// The payment id the checkout answered.
    payment_id: String,
    /// The store's API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The signing secret (`whsec_...`).
    #[arg(long, hide_env_values = true)]
    secret: Option<String>,
    /// Amount charged.
    #[arg(long, default_value = "99.99")]
    amount: String,
    /// Currency.
    #[arg(long, default_value = "USD")]
    currency: String,
    /// The delivery's id (default: a new one); reuse one to redeliver.
    #[arg(long)]
    delivery_id: Option<String>,
    /// Send the delivery this many times at once (a provider's duplicates).
    #[arg(long, default_value_t = 1)]
    copies: usize,
    /// Sign it this many seconds in the past (a stale delivery beyond 300).
    #[arg(long, default_value_t = 0)]
    age: i64,
    /// Sign with a random secret instead (a forged delivery).
    #[arg(long)]
    forge: bool,
    /// Attempts while the answer is not 2xx (a provider retries).
    #[arg(long, default_value_t = 5)]
    attempts: u32,
}

fn secret(args: &Args) -> anyhow::Result<String> {
    if args.forge {
        return Ok(new_secret());
    }
    if let Some(secret) = &args.secret {
        return Ok(secret.clone());
    }
    if let Ok(secrets) = std::env::var("PAYMENT_WEBHOOK_SECRETS")
        && let Some(first) = secrets.split(',').map(str::trim).find(|s| !s.is_empty())
    {
        return Ok(first.to_owned());
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../.local/webhook_secret");
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("no --secret, no PAYMENT_WEBHOOK_SECRETS and no {path}"))?
        .trim()
        .to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secret = secret(&args)?;
    let provider = Provider::new(args.url.trim_end_matches('/'), &secret);
    let kind = if args.status == "paid" {
        "payment.succeeded"
    } else {
        "payment.failed"
    };
    let id = args
        .delivery_id
        .clone()
        .unwrap_or_else(|| format!("msg_{}", uuid::Uuid::new_v4().simple()));
    let body = event_body(kind, &args.payment_id, &args.amount, &args.currency);
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=args.attempts.max(1) {
        let at = chrono::Utc::now().timestamp() - args.age;
        let delivery = Delivery::signed_at(&secret, &id, body.clone(), at);
        let answers =
            futures::future::join_all((0..args.copies.max(1)).map(|_| provider.send(&delivery)))
                .await;
        let mut done = true;
        for answer in answers {
            match answer {
                Ok((status, body)) => {
                    println!("{id} attempt {attempt}: {status} {body}");
                    done &= (200..300).contains(&status);
                }
                Err(e) => {
                    println!("{id} attempt {attempt}: {e:#}");
                    done = false;
                }
            }
        }
        if done || attempt == args.attempts {
            return Ok(());
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    Ok(())
}

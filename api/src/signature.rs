//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>), as
//! payment providers sign their webhooks: headers `webhook-id`,
//! `webhook-timestamp` (Unix seconds) and `webhook-signature`
//! (space-separated `v1,<base64>` entries); a signature is
//! base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), a secret is written
//! `whsec_<base64 key>`.

use std::fmt;

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// How far a timestamp may be from now, either way.
pub const TOLERANCE_SECS: i64 = 5 * 60;

/// The secrets a signature may be made with: any one matches, so a secret
/// can be rotated without downtime (configure the new one beside the old,
/// switch the provider, then drop the old). Never printed.
#[derive(Clone, Default)]
pub struct WebhookSecrets(Vec<Vec<u8>>);

impl fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecrets({} configured)", self.0.len())
    }
}

impl WebhookSecrets {
    /// Parses `whsec_<base64>[,whsec_<base64>...]`; empty for none.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, secret) in text.split(',').map(str::trim).enumerate() {
            if secret.is_empty() {
                continue;
            }
            let n = i + 1;
            let encoded = secret
                .strip_prefix("whsec_")
                .ok_or_else(|| format!("secret {n} does not start with whsec_"))?;
            let key = STANDARD
                .decode(encoded)
                .map_err(|_| format!("secret {n} is not whsec_ followed by base64"))?;
            if key.len() < 16 {
                return Err(format!("secret {n} is shorter than 16 bytes"));
            }
            keys.push(key);
        }
        Ok(Self(keys))
    }

    /// Whether any secret is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl crate::secrets::Secret for WebhookSecrets {
    const NAME: &'static str = "PAYMENT_WEBHOOK_SECRETS";

    fn parse(text: &str) -> Result<Self, String> {
        WebhookSecrets::parse(text)
    }
}

/// Why a delivery's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A header is missing or not what the scheme says.
    Malformed(&'static str),
    /// The timestamp is more than [`TOLERANCE_SECS`] from now.
    Stale,
    /// No `v1` signature matches any secret.
    Mismatch,
}

/// Verifies a delivery: its `webhook-id` when one `v1` signature matches
/// one secret over exactly this body, at a timestamp within tolerance of
/// `now` (Unix seconds). Each comparison is in constant time, and a
/// signature of any other length than HMAC-SHA256's (empty, truncated)
/// never matches.
pub fn verify<'h>(
    secrets: &WebhookSecrets,
    headers: &'h HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<&'h str, Refused> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or(Refused::Malformed(name))
    };
    let id = header("webhook-id")?;
    let timestamp = header("webhook-timestamp")?;
    let signatures = header("webhook-signature")?;
    let at: i64 = timestamp
        .parse()
        .map_err(|_| Refused::Malformed("webhook-timestamp"))?;
    if (now - at).abs() > TOLERANCE_SECS {
        return Err(Refused::Stale);
    }
    let candidates: Vec<Vec<u8>> = signatures
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .collect();
    for key in &secrets.0 {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| Refused::Mismatch)?;
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        // verify_slice compares in constant time and refuses another length.
        if candidates
            .iter()
            .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
        {
            return Ok(id);
        }
    }
    Err(Refused::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The published example of the Standard Webhooks libraries.
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TIMESTAMP: i64 = 1649367553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const SIGNATURE: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn headers(signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", ID.parse().unwrap());
        headers.insert("webhook-timestamp", TIMESTAMP.to_string().parse().unwrap());
        headers.insert("webhook-signature", signature.parse().unwrap());
        headers
    }

    fn secrets() -> WebhookSecrets {
        WebhookSecrets::parse(SECRET).unwrap()
    }

    #[test]
    fn the_published_example_verifies() {
        assert_eq!(
            verify(&secrets(), &headers(SIGNATURE), BODY, TIMESTAMP),
            Ok(ID)
        );
        let several = format!("v1,bm90IGl0 {SIGNATURE} v2,abc");
        assert_eq!(
            verify(&secrets(), &headers(&several), BODY, TIMESTAMP),
            Ok(ID)
        );
    }

    #[test]
    fn empty_truncated_and_altered_signatures_are_refused() {
        let truncated = &SIGNATURE[..SIGNATURE.len() - 8];
        for signature in [
            "v1,",
            "v1",
            truncated,
            "v1,AAAA",
            "v2,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ] {
            assert_eq!(
                verify(&secrets(), &headers(signature), BODY, TIMESTAMP),
                Err(Refused::Mismatch),
                "{signature}"
            );
        }
        let altered = br#"{"email":"test@example.com","username":"test_usex"}"#;
        assert_eq!(
            verify(&secrets(), &headers(SIGNATURE), altered, TIMESTAMP),
            Err(Refused::Mismatch)
        );
    }

    #[test]
    fn timestamps_beyond_five_minutes_either_way_are_stale() {
        for now in [TIMESTAMP + 301, TIMESTAMP - 301] {
            assert_eq!(
                verify(&secrets(), &headers(SIGNATURE), BODY, now),
                Err(Refused::Stale)
            );
        }
        assert!(verify(&secrets(), &headers(SIGNATURE), BODY, TIMESTAMP + 300).is_ok());
    }

    #[test]
    fn any_secret_of_a_rotation_matches_and_secrets_are_checked() {
        let rotated =
            WebhookSecrets::parse(&format!("whsec_{}, {SECRET}", STANDARD.encode([7u8; 32])))
                .unwrap();
        assert_eq!(
            verify(&rotated, &headers(SIGNATURE), BODY, TIMESTAMP),
            Ok(ID)
        );
        assert!(WebhookSecrets::parse("C2FVsBQIhrscChlQIMV+b5sSYspob7oD").is_err());
        assert!(WebhookSecrets::parse("whsec_not base64!").is_err());
        assert!(WebhookSecrets::parse("").unwrap().is_empty());
        assert_eq!(format!("{rotated:?}"), "WebhookSecrets(2 configured)");
    }
}

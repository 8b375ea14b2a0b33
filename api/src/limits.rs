//! What one client may do: a rate limit on starting checkouts, and a cap on
//! the checkouts it holds at once (reserved, waiting for payment). A client
//! is an IP address: the peer's, or, behind proxies that append to
//! `X-Forwarded-For`, the address the outermost trusted proxy saw.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderValue, Request, header};
use axum::response::{IntoResponse, Response};
use governor::middleware::NoOpMiddleware;
use tower_governor::governor::{GovernorConfig, GovernorConfigBuilder};
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use crate::error::ApiError;

/// The limits' configuration (part of the API's).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Checkouts one client may start per second, sustained (0: no limit).
    #[arg(long, env = "CHECKOUT_RATE", default_value_t = 2)]
    pub checkout_rate: u32,
    /// Checkouts one client may start at once before the rate applies.
    #[arg(long, env = "CHECKOUT_BURST", default_value_t = 10)]
    pub checkout_burst: u32,
    /// Checkouts one client may hold at once, reserved and not yet paid,
    /// failed or expired (0: no cap).
    #[arg(long, env = "MAX_PENDING_CHECKOUTS", default_value_t = 5)]
    pub max_pending_checkouts: u32,
    /// Proxies in front of the API that append the client's address to
    /// `X-Forwarded-For` (0: the peer address is the client's).
    #[arg(long, env = "FORWARDED_HOPS", default_value_t = 0)]
    pub forwarded_hops: u8,
}

/// The client's IP address: with `hops` trusted proxies, the address the
/// outermost of them appended to `X-Forwarded-For` (the `hops`-th from the
/// right; what a client wrote itself further left is ignored); else, or
/// when the header is short, the peer's.
pub fn client_ip(headers: &HeaderMap, peer: Option<IpAddr>, hops: u8) -> Option<IpAddr> {
    if hops > 0 {
        let forwarded: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        if let Some(ip) = forwarded
            .len()
            .checked_sub(usize::from(hops))
            .and_then(|i| forwarded[i].parse().ok())
        {
            return Some(ip);
        }
    }
    peer
}

/// The peer address axum records for each connection.
pub fn peer_ip<T>(request: &Request<T>) -> Option<IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}

/// The rate limiter's key: the client's IP address.
#[derive(Debug, Clone, Copy)]
pub struct ClientKey {
    hops: u8,
}

impl KeyExtractor for ClientKey {
    type Key = IpAddr;

    fn extract<T>(&self, request: &Request<T>) -> Result<IpAddr, GovernorError> {
        client_ip(request.headers(), peer_ip(request), self.hops)
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

/// The per-client rate limit of `POST /checkout/{key}`, or `None` when
/// off. Refused requests get 429 `rate_limited` with `Retry-After`.
pub fn checkout_rate_limit(
    args: &LimitArgs,
) -> Option<GovernorLayer<ClientKey, NoOpMiddleware, axum::body::Body>> {
    if args.checkout_rate == 0 {
        return None;
    }
    let config: Arc<GovernorConfig<ClientKey, _>> = Arc::new(
        GovernorConfigBuilder::default()
            .per_nanosecond((1_000_000_000 / u64::from(args.checkout_rate)).max(1))
            .burst_size(args.checkout_burst.max(1))
            .key_extractor(ClientKey {
                hops: args.forwarded_hops,
            })
            .finish()?,
    );
    // Forget clients idle long enough to have their whole burst back.
    let limiter = config.limiter().clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            limiter.retain_recent();
        }
    });
    Some(GovernorLayer::new(config).error_handler(refused))
}

fn refused(error: GovernorError) -> Response {
    match error {
        GovernorError::TooManyRequests { wait_time, .. } => {
            let wait = wait_time.max(1);
            let mut response = ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many checkouts from this client; retry in {wait} s"),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait));
            response
        }
        other => ApiError::internal(other).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().unwrap());
        headers
    }

    #[test]
    fn the_client_is_the_peer_unless_proxies_are_trusted() {
        let peer = Some("10.0.0.9".parse().unwrap());
        let headers = forwarded("6.6.6.6, 203.0.113.7");
        assert_eq!(client_ip(&headers, peer, 0), peer, "the header is ignored");
        assert_eq!(
            client_ip(&headers, peer, 1),
            Some("203.0.113.7".parse().unwrap()),
            "one proxy: the address it appended, not what the client wrote"
        );
        assert_eq!(
            client_ip(&headers, peer, 2),
            Some("6.6.6.6".parse().unwrap())
        );
        assert_eq!(client_ip(&headers, peer, 3), peer, "too short: the peer");
        assert_eq!(client_ip(&forwarded("nonsense"), peer, 1), peer);
    }
}

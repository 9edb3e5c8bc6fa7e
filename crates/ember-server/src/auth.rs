//! `--api-key`: every route but `/health` needs `Authorization: Bearer KEY`.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use crate::Shared;
use crate::error::ApiError;

pub async fn require_key(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let Some(key) = state.config.api_key.as_deref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/health" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    if given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    let err = ApiError::unauthorized();
    err.for_path(path)
}

/// The token of `Bearer TOKEN`; the scheme is case-insensitive (RFC 9110 §11.1), so
/// `bearer` and `BEARER` work as with OpenAI's and vLLM's servers.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without stopping at the first difference, so timing does not reveal how much of
/// a guessed key is right.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer k", "bearer k", "BEARER  k ", " Bearer\tk"] {
            assert_eq!(super::bearer_token(v), Some("k"), "{v:?}");
        }
        assert_eq!(super::bearer_token("Basic k"), None);
        assert_eq!(super::bearer_token("Bearerk"), None);
    }

    #[test]
    fn same_compares_whole_keys() {
        assert!(super::same(b"secret", b"secret"));
        assert!(!super::same(b"secret", b"secreT"));
        assert!(!super::same(b"secret", b"secret2"));
        assert!(!super::same(b"", b"x"));
    }
}

//! API keys: `Authorization: Bearer KEY`, compared in time that does not depend on
//! where a guess first differs from the key.

use axum::http::{HeaderMap, header};

/// Whether `headers` carry `Authorization: Bearer <expected>`.
pub fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.as_bytes(), expected.as_bytes()))
}

/// `given == expected`, looking at every byte of `given` whatever the outcome (only
/// the lengths show through timing).
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = u8::from(given.len() != expected.len());
    for (index, byte) in given.iter().enumerate() {
        difference |= byte ^ expected.get(index).copied().unwrap_or(0);
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_match_exactly() {
        assert!(constant_time_eq(b"key", b"key"));
        assert!(!constant_time_eq(b"kez", b"key"));
        assert!(!constant_time_eq(b"ke", b"key"));
        assert!(!constant_time_eq(b"key\0", b"key"));
        assert!(!constant_time_eq(b"", b"key"));
    }

    #[test]
    fn only_bearer_headers_count() {
        let mut headers = HeaderMap::new();
        assert!(!bearer_matches(&headers, "k"));
        headers.insert(header::AUTHORIZATION, "Basic k".parse().unwrap());
        assert!(!bearer_matches(&headers, "k"));
        headers.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert!(!bearer_matches(&headers, "k"));
        headers.insert(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        assert!(bearer_matches(&headers, "k"));
    }
}

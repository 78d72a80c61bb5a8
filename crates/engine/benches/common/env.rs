//! The benches' settings from the environment.

/// `name` parsed as a count, else `default` (unset or unparsable).
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

//! What a report says about where it ran: the machine, the date, each topology in
//! one line.

use tandem_launch::topology::{Checked, Role};

/// "prefill (cores 0) + decode (cores 1)".
pub fn describe(topology: &Checked) -> String {
    let workers: Vec<String> = topology
        .workers
        .iter()
        .map(|w| {
            let role = match w.spec.role {
                Role::Prefill => "prefill",
                Role::Decode => "decode",
                Role::Both => "worker",
            };
            let cores: Vec<String> = w.spec.cores.iter().map(usize::to_string).collect();
            let kv = w
                .spec
                .kv_cache_memory
                .as_deref()
                .map_or(String::new(), |m| format!(", KV {m}"));
            if cores.is_empty() {
                format!("{role} on {}{kv}", w.spec.host)
            } else {
                format!("{role} (cores {}{kv})", cores.join(","))
            }
        })
        .collect();
    format!("router → {}", workers.join(" + "))
}

/// "host: CPU model, N cores" (after the host, what a planner profile calls the
/// machine).
pub fn machine() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "this machine".into());
    format!("{host}: {}", tandem_bench::profile::cpu_description())
}

/// Today's date in UTC, `YYYY-MM-DD`.
pub fn utc_date() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_414), (2025, 11, 22));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}

//! How fast each core a measurement uses computes, alone and with all of them busy:
//! one pinned thread per core runs a fixed loop of f32 multiply-adds. A VM's cores need
//! not run at one speed (its vCPUs sit where the host puts them, beside whatever else
//! the host runs), and a worker on a slow core makes every figure of its layout slower
//! than a profile measured on another core predicts; the profile and each compared
//! layout record the speeds of their cores so that a reader (and `tandem plan
//! validate`) can tell.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use tandem_launch::run::pin_to_cores;
use tandem_planner::profile::{CoreSpeed, describe_core_speeds, fastest_alone, slowest_core};

/// One timed run of the loop; the median of [`TRIALS`] is kept.
const TRIAL: Duration = Duration::from_millis(20);
const TRIALS: usize = 5;
/// Below this share of the fastest core, a core is reported as slow.
pub const SLOW_SHARE: f64 = 0.85;

/// Each of `cores` measured alone (one after the other), then all at once.
pub fn measure(cores: &[usize]) -> std::io::Result<Vec<CoreSpeed>> {
    let mut alone = Vec::with_capacity(cores.len());
    for &core in cores {
        alone.push(on_cores(&[core])?[0]);
    }
    let together = on_cores(cores)?;
    Ok(cores
        .iter()
        .zip(alone.into_iter().zip(together))
        .map(|(&core, (alone, together))| CoreSpeed {
            core,
            alone,
            together,
        })
        .collect())
}

/// A line saying which core is slow and by how much, where one is.
pub fn warning(speeds: &[CoreSpeed]) -> Option<String> {
    let (core, rate) = slowest_core(speeds)?;
    let share = rate / fastest_alone(speeds);
    (share < SLOW_SHARE).then(|| {
        format!(
            "core {core} computes at {:.0}% of the fastest measured core ({}): figures of \
             workers on it will be slower than those of workers elsewhere",
            share * 100.0,
            describe_core_speeds(speeds)
        )
    })
}

/// The median rate (GFLOP/s) of a thread pinned to each of `cores`, all running at once.
fn on_cores(cores: &[usize]) -> std::io::Result<Vec<f64>> {
    let start = Barrier::new(cores.len());
    std::thread::scope(|scope| {
        let threads: Vec<_> = cores
            .iter()
            .map(|&core| {
                let start = &start;
                scope.spawn(move || -> std::io::Result<f64> {
                    let pinned = pin_to_cores(&[core]);
                    start.wait();
                    pinned?;
                    let mut rates: Vec<f64> = (0..TRIALS).map(|_| multiply_add_rate()).collect();
                    rates.sort_by(f64::total_cmp);
                    Ok(rates[TRIALS / 2])
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// GFLOP/s of 64 independent multiply-add chains (eight 8-lane vectors, enough to keep
/// two FMA units busy) for [`TRIAL`].
fn multiply_add_rate() -> f64 {
    const ROUNDS: u64 = 1024;
    let mut acc = [[1.0f32; 8]; 8];
    let (scale, add) = (black_box(0.999_999_9f32), black_box(1.0e-7f32));
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < TRIAL {
        for _ in 0..ROUNDS {
            for lanes in &mut acc {
                for value in lanes.iter_mut() {
                    *value = value.mul_add(scale, add);
                }
            }
        }
        acc = black_box(acc);
        rounds += ROUNDS;
    }
    (rounds * 64 * 2) as f64 / start.elapsed().as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allowed_core_is_measured_alone_and_together() {
        let cores: Vec<usize> = tandem_launch::run::allowed_cores()
            .into_iter()
            .take(2)
            .collect();
        let speeds = measure(&cores).unwrap();
        assert_eq!(speeds.iter().map(|s| s.core).collect::<Vec<_>>(), cores);
        for s in &speeds {
            assert!(s.alone.is_finite() && s.alone > 0.0, "{s:?}");
            assert!(s.together.is_finite() && s.together > 0.0, "{s:?}");
        }
    }

    #[test]
    fn a_core_the_machine_lacks_is_refused() {
        assert!(measure(&[1000]).is_err());
    }
}

//! How fast each core a measurement uses computes and reads, alone and with all of them
//! busy: one pinned thread per core runs a fixed loop of f32 multiply-adds in registers,
//! then sums a buffer larger than its own caches (what tenants of a VM's host share:
//! the last-level cache and memory). A VM's cores need not run at one speed (its vCPUs
//! sit where the host puts them, beside whatever else the host runs), and a worker on a
//! slow core makes every figure of its layout slower than a profile measured on another
//! core predicts; the profile and each compared layout record the speeds of their cores
//! so that a reader (and `tandem plan validate`) can tell.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use tandem_launch::run::pin_to_cores;
use tandem_planner::profile::{CoreRate, CoreSpeed, describe_core_speeds, slowest_share};

/// One timed run of a loop; the median of [`TRIALS`] is kept.
const TRIAL: Duration = Duration::from_millis(20);
const TRIALS: usize = 5;
/// f32s each thread reads: 32 MiB, past any core's own L2.
const READ_FLOATS: usize = 8 << 20;
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
            alone: alone.compute,
            together: together.compute,
            read_alone: Some(alone.read),
            read_together: Some(together.read),
        })
        .collect())
}

/// [`measure`], with a [`warning`] printed where a core is slow.
pub fn measure_and_warn(cores: &[usize]) -> std::io::Result<Vec<CoreSpeed>> {
    let speeds = measure(cores)?;
    if let Some(warning) = warning(&speeds) {
        eprintln!("warning: {warning}");
    }
    Ok(speeds)
}

/// A line saying which core is slow, at what and by how much, where one is.
pub fn warning(speeds: &[CoreSpeed]) -> Option<String> {
    let slow: Vec<String> = [(CoreRate::Compute, "computes"), (CoreRate::Read, "reads")]
        .into_iter()
        .filter_map(|(rate, verb)| {
            let (core, share) = slowest_share(speeds, speeds, rate)?;
            (share < SLOW_SHARE)
                .then(|| format!("core {core} {verb} at {:.0}% of the fastest", share * 100.0))
        })
        .collect();
    (!slow.is_empty()).then(|| {
        format!(
            "{} ({}): figures of workers there will be slower than those of workers elsewhere",
            slow.join(", "),
            describe_core_speeds(speeds)
        )
    })
}

/// One thread's median rates.
#[derive(Clone, Copy)]
struct Rates {
    /// GFLOP/s.
    compute: f64,
    /// GB/s.
    read: f64,
}

/// The median rates of a thread pinned to each of `cores`, all running at once.
fn on_cores(cores: &[usize]) -> std::io::Result<Vec<Rates>> {
    let start = Barrier::new(cores.len());
    std::thread::scope(|scope| {
        let threads: Vec<_> = cores
            .iter()
            .map(|&core| {
                let start = &start;
                scope.spawn(move || -> std::io::Result<Rates> {
                    let pinned = pin_to_cores(&[core]);
                    // Touched after pinning, so it is this core's memory.
                    let buffer = vec![1.0f32; READ_FLOATS];
                    // Every thread passes both barriers, so one that could not be
                    // pinned returns its error without leaving the others waiting.
                    start.wait();
                    let compute = match pinned {
                        Ok(()) => median((0..TRIALS).map(|_| multiply_add_rate()).collect()),
                        Err(_) => 0.0,
                    };
                    start.wait();
                    pinned?;
                    let read = median((0..TRIALS).map(|_| read_rate(&buffer)).collect());
                    Ok(Rates { compute, read })
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

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// GB/s of summing `buffer` over and over for at least [`TRIAL`]: four 8-lane
/// accumulators, so the adds keep up with the loads.
fn read_rate(buffer: &[f32]) -> f64 {
    let start = Instant::now();
    let mut passes = 0u64;
    let mut acc = [[0.0f32; 8]; 4];
    while passes == 0 || start.elapsed() < TRIAL {
        for chunk in buffer.chunks_exact(32) {
            for (lanes, values) in acc.iter_mut().zip(chunk.chunks_exact(8)) {
                for (sum, value) in lanes.iter_mut().zip(values) {
                    *sum += value;
                }
            }
        }
        acc = black_box(acc);
        passes += 1;
    }
    (passes as usize * std::mem::size_of_val(buffer)) as f64 / start.elapsed().as_secs_f64() / 1e9
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
            for rate in [CoreRate::Compute, CoreRate::Read] {
                let (alone, together) = s.rates(rate).unwrap();
                assert!(alone.is_finite() && alone > 0.0, "{s:?}");
                assert!(together.is_finite() && together > 0.0, "{s:?}");
            }
        }
    }

    #[test]
    fn a_core_the_machine_lacks_is_refused() {
        assert!(measure(&[1000]).is_err());
    }
}

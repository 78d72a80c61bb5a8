//! What is asked of a layout: request lengths and arrivals ([`Workload`]), and the
//! latency every request should meet ([`Slo`]).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Token lengths of prompts or outputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthDist {
    Fixed(usize),
    /// Uniform over `min..=max`.
    Uniform {
        min: usize,
        max: usize,
    },
}

impl LengthDist {
    fn sample(self, rng: &mut StdRng) -> usize {
        match self {
            LengthDist::Fixed(n) => n.max(1),
            LengthDist::Uniform { min, max } => rng.random_range(min.max(1)..=max.max(min).max(1)),
        }
    }

    pub fn mean(self) -> f64 {
        match self {
            LengthDist::Fixed(n) => n as f64,
            LengthDist::Uniform { min, max } => (min + max.max(min)) as f64 / 2.0,
        }
    }
}

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// A Poisson process of this many requests per second.
    Poisson { rate: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub input: LengthDist,
    pub output: LengthDist,
    pub arrival: Arrival,
    /// Requests to model (more: steadier figures, slower to model).
    pub requests: usize,
    /// The random draws' seed: a workload models the same requests each time.
    pub seed: u64,
}

/// One modelled request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    pub arrival: f64,
    pub input: usize,
    pub output: usize,
}

impl Workload {
    /// Its requests, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut now = 0.0;
        (0..self.requests)
            .map(|_| {
                let Arrival::Poisson { rate } = self.arrival;
                // Exponential gaps: -ln(U)/rate, U in (0, 1].
                let uniform: f64 = 1.0 - rng.random::<f64>();
                now += -uniform.ln() / rate;
                Request {
                    arrival: now,
                    input: self.input.sample(&mut rng),
                    output: self.output.sample(&mut rng),
                }
            })
            .collect()
    }

    /// The same requests at another rate.
    pub fn at_rate(&self, rate: f64) -> Self {
        Self {
            arrival: Arrival::Poisson { rate },
            ..*self
        }
    }
}

/// The latency a request should meet: both its time to first token and its time per
/// output token after the first (DistServe's attainment counts a request only if it
/// meets both), for at least `attainment` of the requests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    pub ttft_seconds: f64,
    pub tpot_seconds: f64,
    /// Share of requests that must meet it (0.9 for DistServe's 90%).
    pub attainment: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_arrive_at_the_rate_with_their_lengths_and_repeat_with_the_seed() {
        let workload = Workload {
            input: LengthDist::Uniform { min: 100, max: 200 },
            output: LengthDist::Fixed(8),
            arrival: Arrival::Poisson { rate: 4.0 },
            requests: 20_000,
            seed: 3,
        };
        let requests = workload.requests();
        let span = requests.last().unwrap().arrival;
        assert!((requests.len() as f64 / span - 4.0).abs() < 0.1, "{span}");
        let mean = requests.iter().map(|r| r.input as f64).sum::<f64>() / 20_000.0;
        assert!((mean - workload.input.mean()).abs() < 1.0, "{mean}");
        assert!(
            requests
                .iter()
                .all(|r| (100..=200).contains(&r.input) && r.output == 8)
        );
        assert_eq!(workload.requests(), requests);
    }
}

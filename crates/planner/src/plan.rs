//! Which layout serves the most within the SLO: each layout's goodput (the highest
//! request rate at which the SLO's share of requests meets both latencies, found by
//! bisection over modelled runs, DistServe's definition), ranked.

use crate::layout::Layout;
use crate::profile::{Profile, ProfileError};
use crate::simulate::{Prediction, simulate};
use crate::workload::{Slo, Workload};

/// A layout's modelled figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub layout: Layout,
    /// Requests per second within the SLO; 0 when no rate meets it.
    pub goodput: f64,
    /// The workload at its own rate.
    pub at_rate: Prediction,
}

impl Ranked {
    pub fn goodput_per_core(&self) -> f64 {
        self.goodput / self.layout.cores().max(1) as f64
    }
}

/// The ranking as a text table, best first, and what it recommends.
pub fn table(ranked: &[Ranked], slo: &Slo) -> String {
    let mut out = format!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>11}\n",
        "layout", "goodput/s", "per core", "TTFT p90", "TPOT p90", "attainment"
    );
    for entry in ranked {
        let at = &entry.at_rate;
        out += &format!(
            "{:<28} {:>10.3} {:>10.3} {:>9.0}ms {:>9.1}ms {:>10.0}%\n",
            entry.layout.to_string(),
            entry.goodput,
            entry.goodput_per_core(),
            at.ttft_percentile(90.0) * 1e3,
            at.tpot_percentile(90.0) * 1e3,
            at.attainment(slo) * 100.0
        );
    }
    out += "(goodput: the highest request rate at which the SLO is met; the latency and \
            attainment columns are at the workload's own rate)\n";
    match ranked.first() {
        Some(best) if best.goodput > 0.0 => {
            out += &format!("recommended: {}\n", best.layout);
        }
        _ => {
            out += &format!(
                "no layout meets the SLO (TTFT ≤ {} s and TPOT ≤ {} s for {:.0}% of \
                 requests) at any rate: loosen it, shorten the requests, or add cores\n",
                slo.ttft_seconds,
                slo.tpot_seconds,
                slo.attainment * 100.0
            );
        }
    }
    out
}

/// Bisection steps after bracketing: the rate to within 2^-10 of the bracket.
const BISECTIONS: usize = 10;

/// `layouts` ranked by goodput under `slo`, best first; ties keep the given order.
pub fn rank_layouts(
    profile: &Profile,
    layouts: &[Layout],
    workload: &Workload,
    slo: &Slo,
) -> Result<Vec<Ranked>, ProfileError> {
    let mut ranked = layouts
        .iter()
        .map(|layout| {
            Ok(Ranked {
                layout: layout.clone(),
                goodput: goodput(profile, layout, workload, slo)?,
                at_rate: simulate(profile, layout, workload)?,
            })
        })
        .collect::<Result<Vec<_>, ProfileError>>()?;
    ranked.sort_by(|a, b| b.goodput.total_cmp(&a.goodput));
    Ok(ranked)
}

/// The highest rate of `workload`'s requests at which `slo` is met.
pub fn goodput(
    profile: &Profile,
    layout: &Layout,
    workload: &Workload,
    slo: &Slo,
) -> Result<f64, ProfileError> {
    let meets = |rate: f64| -> Result<bool, ProfileError> {
        let predicted = simulate(profile, layout, &workload.at_rate(rate))?;
        Ok(predicted.attainment(slo) >= slo.attainment)
    };
    let crate::workload::Arrival::Poisson { rate } = workload.arrival;
    let mut high = rate.max(1e-3);
    // Bracket: double while met (a rate that meets is a floor), halve while not.
    let mut low;
    if meets(high)? {
        while meets(high * 2.0)? && high < 1e6 {
            high *= 2.0;
        }
        low = high;
        high *= 2.0;
    } else {
        while !meets(high / 2.0)? {
            high /= 2.0;
            if high < rate * 1e-3 {
                return Ok(0.0);
            }
        }
        low = high / 2.0;
    }
    for _ in 0..BISECTIONS {
        let middle = (low + high) / 2.0;
        if meets(middle)? {
            low = middle;
        } else {
            high = middle;
        }
    }
    Ok(low)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::tests::profile;
    use crate::workload::{Arrival, LengthDist};

    fn workload(input: usize, output: usize) -> Workload {
        Workload {
            input: LengthDist::Uniform {
                min: input / 2,
                max: input * 3 / 2,
            },
            output: LengthDist::Uniform {
                min: output / 2,
                max: output * 3 / 2,
            },
            arrival: Arrival::Poisson { rate: 1.0 },
            requests: 600,
            seed: 7,
        }
    }

    fn layout_named(ranked: &[Ranked], name: &str) -> usize {
        ranked
            .iter()
            .position(|r| r.layout.to_string() == name)
            .unwrap_or_else(|| panic!("{name} not ranked"))
    }

    #[test]
    fn the_split_follows_the_work_prefill_heavy_or_decode_heavy() {
        let profile = profile();
        let layouts = Layout::all_on(4, &[1]);
        let slo = Slo {
            ttft_seconds: 1.0,
            tpot_seconds: 0.03,
            attainment: 0.9,
        };
        // Long prompts, short answers: prefill workers are the bottleneck.
        let prefill_heavy = rank_layouts(&profile, &layouts, &workload(1500, 8), &slo).unwrap();
        let (more_p, more_d) = (
            layout_named(&prefill_heavy, "3P1D (1-core P, 1-core D)"),
            layout_named(&prefill_heavy, "1P3D (1-core P, 1-core D)"),
        );
        assert!(more_p < more_d, "{prefill_heavy:#?}");
        // Short prompts, long answers: decode batches are.
        let decode_heavy = rank_layouts(&profile, &layouts, &workload(64, 400), &slo).unwrap();
        let (more_p, more_d) = (
            layout_named(&decode_heavy, "3P1D (1-core P, 1-core D)"),
            layout_named(&decode_heavy, "1P3D (1-core P, 1-core D)"),
        );
        assert!(more_d < more_p);
        assert!(
            decode_heavy
                .windows(2)
                .all(|w| w[0].goodput >= w[1].goodput)
        );
    }

    #[test]
    fn the_table_recommends_the_best_or_says_none_will_do() {
        let profile = profile();
        let layouts = Layout::all_on(2, &[1, 2]);
        let slo = Slo {
            ttft_seconds: 1.0,
            tpot_seconds: 0.05,
            attainment: 0.9,
        };
        let ranked = rank_layouts(&profile, &layouts, &workload(300, 30), &slo).unwrap();
        let text = table(&ranked, &slo);
        assert!(
            text.contains(&format!("recommended: {}", ranked[0].layout)),
            "{text}"
        );
        assert_eq!(text.lines().count(), layouts.len() + 3);
        let impossible = Slo {
            ttft_seconds: 1e-4,
            ..slo
        };
        let ranked = rank_layouts(&profile, &layouts, &workload(300, 30), &impossible).unwrap();
        assert!(table(&ranked, &impossible).contains("no layout meets the SLO"));
    }

    #[test]
    fn an_slo_no_rate_meets_has_no_goodput() {
        let profile = profile();
        // Faster than the prefill of the prompt alone.
        let slo = Slo {
            ttft_seconds: 0.001,
            tpot_seconds: 1.0,
            attainment: 0.9,
        };
        let rate = goodput(&profile, &Layout::single(2), &workload(1000, 10), &slo).unwrap();
        assert_eq!(rate, 0.0);
    }

    #[test]
    fn goodput_is_where_attainment_crosses_the_target() {
        let profile = profile();
        let slo = Slo {
            ttft_seconds: 0.5,
            tpot_seconds: 0.05,
            attainment: 0.9,
        };
        let load = workload(500, 50);
        let layout = Layout::replicas(2, 1);
        let rate = goodput(&profile, &layout, &load, &slo).unwrap();
        assert!(rate > 0.0);
        let at = |r: f64| {
            simulate(&profile, &layout, &load.at_rate(r))
                .unwrap()
                .attainment(&slo)
        };
        assert!(at(rate) >= 0.9);
        assert!(at(rate * 1.1) < 0.9, "{rate}: {}", at(rate * 1.1));
    }
}

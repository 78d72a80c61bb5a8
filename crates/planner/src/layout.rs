//! How workers are laid out on the cores: one worker, replicas behind a balancer, or
//! prefill and decode pools (xPyD), each worker of a profiled size.

use std::fmt;

/// A worker's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Computes prompts and decodes them (single worker, replicas).
    Both,
    Prefill,
    Decode,
}

/// `count` workers of `cores` cores with one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerGroup {
    pub role: Role,
    pub count: usize,
    pub cores: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    pub groups: Vec<WorkerGroup>,
}

impl Layout {
    pub fn single(cores: usize) -> Self {
        Self::replicas(1, cores)
    }

    pub fn replicas(count: usize, cores: usize) -> Self {
        Self {
            groups: vec![WorkerGroup {
                role: Role::Both,
                count,
                cores,
            }],
        }
    }

    /// `prefill` prefill workers and `decode` decode workers, of `(count, cores)`.
    pub fn disaggregated(prefill: (usize, usize), decode: (usize, usize)) -> Self {
        Self {
            groups: vec![
                WorkerGroup {
                    role: Role::Prefill,
                    count: prefill.0,
                    cores: prefill.1,
                },
                WorkerGroup {
                    role: Role::Decode,
                    count: decode.0,
                    cores: decode.1,
                },
            ],
        }
    }

    pub fn cores(&self) -> usize {
        self.groups.iter().map(|g| g.count * g.cores).sum()
    }

    pub fn is_disaggregated(&self) -> bool {
        self.groups.iter().any(|g| g.role != Role::Both)
    }

    /// Every layout of workers of the given sizes that uses exactly `cores` cores:
    /// replicas of each size (one worker being the single layout), and every split
    /// into a prefill pool of one size and a decode pool of one size.
    pub fn all_on(cores: usize, sizes: &[usize]) -> Vec<Layout> {
        let mut layouts = Vec::new();
        for &size in sizes {
            if size > 0 && cores.is_multiple_of(size) {
                layouts.push(Layout::replicas(cores / size, size));
            }
        }
        for &p_size in sizes {
            for &d_size in sizes {
                for p in 1..=cores / p_size.max(1) {
                    let rest = cores - p * p_size;
                    if d_size > 0 && rest > 0 && rest.is_multiple_of(d_size) {
                        layouts.push(Layout::disaggregated((p, p_size), (rest / d_size, d_size)));
                    }
                }
            }
        }
        layouts
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cores = |n: usize| if n == 1 { "core" } else { "cores" };
        match self.groups.as_slice() {
            [
                WorkerGroup {
                    role: Role::Both,
                    count: 1,
                    cores: c,
                },
            ] => write!(f, "single ({c} {})", cores(*c)),
            [
                WorkerGroup {
                    role: Role::Both,
                    count,
                    cores: c,
                },
            ] => write!(f, "{count} replicas ({c} {} each)", cores(*c)),
            [p, d] => write!(
                f,
                "{}P{}D ({}-core P, {}-core D)",
                p.count, d.count, p.cores, d.cores
            ),
            groups => write!(f, "{groups:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_on_the_cores_is_listed_once() {
        let names: Vec<String> = Layout::all_on(4, &[1, 2])
            .iter()
            .map(|l| l.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "4 replicas (1 core each)",
                "2 replicas (2 cores each)",
                "1P3D (1-core P, 1-core D)",
                "2P2D (1-core P, 1-core D)",
                "3P1D (1-core P, 1-core D)",
                "2P1D (1-core P, 2-core D)",
                "1P2D (2-core P, 1-core D)",
                "1P1D (2-core P, 2-core D)",
            ]
        );
        assert!(Layout::all_on(4, &[1, 2]).iter().all(|l| l.cores() == 4));
        assert_eq!(Layout::single(2).to_string(), "single (2 cores)");
    }
}

//! Topology files written by tandem itself (`tandem plan rank --out`): built-in
//! workers pinned to given cores, on loopback ports, behind the router; checked by
//! parsing them back, so what is written is what `tandem up` accepts.

use std::fmt::Write as _;

use crate::topology::{self, Checked, PlannerSpec, Role, TopologyError};

/// First worker HTTP port; the next workers take the following hundreds.
const FIRST_PORT: u16 = 8100;
/// First KV hand-off port.
const FIRST_KV_PORT: u16 = 5600;

/// One built-in worker to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedWorker {
    pub role: Role,
    pub cores: Vec<usize>,
}

/// What the file holds besides its workers.
#[derive(Debug, Clone)]
pub struct Generated<'a> {
    /// A comment put at the top (one or more lines, without `#`).
    pub comment: &'a str,
    pub router_port: u16,
    pub policy: &'a str,
    pub kv_cache_memory: &'a str,
    /// `[router.planner]`, for P/D layouts.
    pub planner: Option<PlannerSpec>,
    pub workers: Vec<GeneratedWorker>,
}

impl Generated<'_> {
    /// The topology file's text and its checked form.
    pub fn write(&self) -> Result<(String, Checked), TopologyError> {
        let mut text = String::new();
        for line in self.comment.lines() {
            let _ = writeln!(text, "# {line}");
        }
        let _ = write!(
            text,
            "\n[router]\nport = {}\npolicy = \"{}\"\n",
            self.router_port, self.policy
        );
        if let Some(planner) = &self.planner {
            text.push_str("\n[router.planner]\n");
            let fields = [("ttft", planner.ttft), ("tpot", planner.tpot)];
            for (name, value) in fields {
                if let Some(value) = value {
                    let _ = writeln!(text, "{name} = {value}");
                }
            }
        }
        let pd = self.workers.iter().any(|w| w.role != Role::Both);
        for (index, worker) in self.workers.iter().enumerate() {
            let role = match worker.role {
                Role::Prefill => "prefill",
                Role::Decode => "decode",
                Role::Both => "both",
            };
            let _ = write!(
                text,
                "\n[[worker]]\nengine = \"builtin\"\nrole = \"{role}\"\nport = {}\ncores = {:?}\nkv_cache_memory = \"{}\"\n",
                FIRST_PORT + 100 * index as u16,
                worker.cores,
                self.kv_cache_memory
            );
            if pd {
                let _ = writeln!(text, "kv_port = {}", FIRST_KV_PORT + index as u16);
            }
        }
        let checked = topology::parse(&text, "the generated topology")?;
        Ok((text, checked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pd_layout_with_the_planner_is_written_and_accepted() {
        let generated = Generated {
            comment: "2P1D for a prefill-heavy load\nfrom tandem plan rank",
            router_port: 8192,
            policy: "least_loaded",
            kv_cache_memory: "512MiB",
            planner: Some(PlannerSpec {
                ttft: Some(2.0),
                tpot: Some(0.1),
                ..PlannerSpec::default()
            }),
            workers: vec![
                GeneratedWorker {
                    role: Role::Prefill,
                    cores: vec![0],
                },
                GeneratedWorker {
                    role: Role::Prefill,
                    cores: vec![1],
                },
                GeneratedWorker {
                    role: Role::Decode,
                    cores: vec![2, 3],
                },
            ],
        };
        let (text, checked) = generated.write().unwrap();
        assert!(
            text.starts_with("# 2P1D for a prefill-heavy load\n# from tandem plan rank\n"),
            "{text}"
        );
        assert_eq!(checked.workers.len(), 3);
        assert_eq!(checked.workers[2].spec.cores, vec![2, 3]);
        assert_eq!(checked.workers[2].spec.kv_port, Some(5602));
        assert_eq!(checked.router.planner.as_ref().unwrap().tpot, Some(0.1));
    }

    #[test]
    fn replicas_get_no_kv_ports() {
        let generated = Generated {
            comment: "replicas",
            router_port: 8192,
            policy: "least_loaded",
            kv_cache_memory: "1GiB",
            planner: None,
            workers: vec![
                GeneratedWorker {
                    role: Role::Both,
                    cores: vec![0],
                },
                GeneratedWorker {
                    role: Role::Both,
                    cores: vec![1],
                },
            ],
        };
        let (text, checked) = generated.write().unwrap();
        assert!(!text.contains("kv_port"), "{text}");
        assert!(!checked.is_disaggregated());
    }
}

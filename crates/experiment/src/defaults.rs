//! The default topologies of a comparison, written as topology files: a single
//! worker, two replicas, and one prefill and one decode worker, on the same cores in
//! total and the same KV budget per worker, on free loopback ports.

use std::net::TcpListener;
use std::path::Path;

use tandem_launch::run;

use tandem_launch::topology::{self, Checked};

use crate::ExperimentError;

/// The cores the default topologies share: the first `count` of those this process
/// may use (its affinity mask: a cpuset or taskset may exclude some), else all of them.
pub fn given_cores(count: Option<usize>) -> Result<Vec<usize>, ExperimentError> {
    let allowed = run::allowed_cores();
    match count {
        None => Ok(allowed),
        Some(0) => Err(ExperimentError::Cores("must be at least 1".into())),
        Some(n) if n > allowed.len() => Err(ExperimentError::Cores(format!(
            "{n}: this process may use {} cores ({})",
            allowed.len(),
            run::core_list(&allowed)
        ))),
        Some(n) => Ok(allowed[..n].to_vec()),
    }
}

/// The default topologies, written as topology files: the same cores in total in all,
/// the same KV budget per worker, free ports on loopback.
pub struct DefaultTopologies<'a> {
    /// The core ids given (see [`given_cores`]).
    pub cores: Vec<usize>,
    pub kv_cache_memory: &'a str,
    pub model: Option<&'a Path>,
    pub serve_args: &'a [String],
}

impl DefaultTopologies<'_> {
    /// Single, replicated and disaggregated, by name, checked.
    pub fn all(&self) -> Result<Vec<(String, Checked)>, ExperimentError> {
        [
            ("single", self.single()),
            ("replicated", self.replicated()),
            ("disaggregated", self.disaggregated()),
        ]
        .into_iter()
        .map(|(name, text)| {
            let topology = topology::parse(&text?, &format!("the default {name} topology"))?;
            Ok((name.to_owned(), topology))
        })
        .collect()
    }

    fn single(&self) -> Result<String, ExperimentError> {
        let (first, second) = self.halves();
        let mut all = first;
        if second != all {
            all.extend(second);
        }
        Ok(self.router("least_loaded")? + &self.worker("both", &all, false)?)
    }

    fn replicated(&self) -> Result<String, ExperimentError> {
        let (first, second) = self.halves();
        Ok(self.router("least_loaded")?
            + &self.worker("both", &first, false)?
            + &self.worker("both", &second, false)?)
    }

    fn disaggregated(&self) -> Result<String, ExperimentError> {
        let (first, second) = self.halves();
        Ok(self.router("least_loaded")?
            + &self.worker("prefill", &first, true)?
            + &self.worker("decode", &second, true)?)
    }

    /// Two disjoint halves of equal size (both the one core given, with one); with an
    /// odd count the last core is left out, so that single gets what the two workers of
    /// the other layouts get together.
    fn halves(&self) -> (Vec<usize>, Vec<usize>) {
        if self.cores.len() <= 1 {
            return (self.cores.clone(), self.cores.clone());
        }
        let half = self.cores.len() / 2;
        (
            self.cores[..half].to_vec(),
            self.cores[half..half * 2].to_vec(),
        )
    }

    /// What each layout got, for the report.
    pub fn resources(&self) -> String {
        let (first, second) = self.halves();
        let used = if first == second {
            first.clone()
        } else {
            [first.clone(), second.clone()].concat()
        };
        let mut text = format!(
            "{} cores in all for every layout (single: one worker on cores {}; replicated \
             and disaggregated: two workers, on cores {} and on cores {})",
            used.len(),
            run::core_list(&used),
            run::core_list(&first),
            run::core_list(&second),
        );
        if used.len() < self.cores.len() {
            let idle: Vec<usize> = self
                .cores
                .iter()
                .copied()
                .filter(|c| !used.contains(c))
                .collect();
            text.push_str(&format!(
                " — of {} cores given: core {} stays idle so that every layout gets the same \
                 total",
                self.cores.len(),
                run::core_list(&idle)
            ));
        }
        text.push_str(&format!(
            ", KV cache {} per worker, the router on one thread",
            self.kv_cache_memory
        ));
        text
    }

    pub(crate) fn router(&self, policy: &str) -> Result<String, ExperimentError> {
        Ok(format!(
            "[router]\nport = {}\npolicy = \"{policy}\"\nextra_args = [\"--threads\", \"1\"]\n\n",
            free_port()?
        ))
    }

    pub(crate) fn worker(
        &self,
        role: &str,
        cores: &[usize],
        kv: bool,
    ) -> Result<String, ExperimentError> {
        let mut text = format!(
            "[[worker]]\nengine = \"builtin\"\nrole = \"{role}\"\nport = {}\ncores = {cores:?}\nkv_cache_memory = \"{}\"\n",
            free_port()?,
            self.kv_cache_memory
        );
        if kv {
            text.push_str(&format!("kv_port = {}\n", free_port()?));
        }
        if let Some(model) = self.model {
            text.push_str(&format!("model = {:?}\n", model.display().to_string()));
        }
        if !self.serve_args.is_empty() {
            text.push_str(&format!("extra_args = {:?}\n", self.serve_args));
        }
        text.push('\n');
        Ok(text)
    }
}

/// A port free on loopback now (the kernel's pick; it stays free until a worker binds
/// it unless something else races for it).
fn free_port() -> Result<u16, ExperimentError> {
    let io = |source| ExperimentError::Io {
        context: "finding a free port".into(),
        source,
    };
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    Ok(listener.local_addr().map_err(io)?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_topologies_share_the_cores_and_the_kv_budget() {
        let serve_args = vec!["--max-num-seqs=8".to_owned()];
        let defaults = DefaultTopologies {
            cores: vec![0, 1, 2, 3],
            kv_cache_memory: "256MiB",
            model: None,
            serve_args: &serve_args,
        };
        let parse =
            |text: Result<String, ExperimentError>| topology::parse(&text.unwrap(), "t").unwrap();
        let single = parse(defaults.single());
        let replicated = parse(defaults.replicated());
        let disaggregated = parse(defaults.disaggregated());
        assert_eq!(cores(&single), vec![vec![0, 1, 2, 3]]);
        assert_eq!(cores(&replicated), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(cores(&disaggregated), vec![vec![0, 1], vec![2, 3]]);
        assert!(disaggregated.is_disaggregated() && !replicated.is_disaggregated());
        for t in [&single, &replicated, &disaggregated] {
            for w in &t.workers {
                assert_eq!(w.spec.kv_cache_memory.as_deref(), Some("256MiB"));
                assert_eq!(w.spec.extra_args, serve_args);
            }
        }
        assert_eq!(
            crate::setup::describe(&disaggregated),
            "router → prefill (cores 0,1, KV 256MiB) + decode (cores 2,3, KV 256MiB)"
        );
    }

    fn cores(t: &Checked) -> Vec<Vec<usize>> {
        t.workers.iter().map(|w| w.spec.cores.clone()).collect()
    }

    fn defaults_on(cores: Vec<usize>) -> DefaultTopologies<'static> {
        DefaultTopologies {
            cores,
            kv_cache_memory: "64MiB",
            model: None,
            serve_args: &[],
        }
    }

    #[test]
    fn an_odd_core_count_gives_every_layout_the_same_total() {
        // Three cores this process may use, not starting at 0 (as under taskset).
        let defaults = defaults_on(vec![1, 2, 3]);
        let parse =
            |text: Result<String, ExperimentError>| topology::parse(&text.unwrap(), "t").unwrap();
        let total = |t: &Checked| -> usize { cores(t).iter().map(Vec::len).sum() };
        let single = parse(defaults.single());
        let replicated = parse(defaults.replicated());
        let disaggregated = parse(defaults.disaggregated());
        assert_eq!(cores(&single), vec![vec![1, 2]]);
        assert_eq!(cores(&replicated), vec![vec![1], vec![2]]);
        assert_eq!(cores(&disaggregated), vec![vec![1], vec![2]]);
        assert!(total(&single) == total(&replicated) && total(&single) == total(&disaggregated));
        let resources = defaults.resources();
        assert!(
            resources.starts_with("2 cores in all for every layout")
                && resources.contains("single: one worker on cores 1,2")
                && resources.contains("on cores 1 and on cores 2")
                && resources.contains("core 3 stays idle"),
            "{resources}"
        );
        // One core: every worker shares it.
        let one = defaults_on(vec![5]);
        assert_eq!(cores(&parse(one.single())), vec![vec![5]]);
        assert_eq!(cores(&parse(one.replicated())), vec![vec![5], vec![5]]);
        assert!(!one.resources().contains("idle"));
    }
}

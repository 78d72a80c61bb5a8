//! The CPU kernel family, chosen once per process at run time.
//!
//! The binary is compiled for x86-64-v3 (AVX2/FMA/F16C), which every kernel may assume.
//! Kernels that need more than that — the `vpdpbusd` int8 panels of the quantized
//! matmul (`quant_dot::vnni`), the AVX-512 f32/f16 tiles (`quant_dot::avx512`) and the
//! AMX tile kernels (`quant_dot::amx`, `tiles`) —
//! live in `#[target_feature]` functions (or `asm!`) that are only reachable through the
//! [`PanelTable`] of a family this CPU has, so one binary uses what the CPU offers:
//!
//! - `avx2`: the x86-64-v3 kernels (`maddubs` + `madd`), on every machine the binary
//!   runs on.
//! - `vnni`: `vpdpbusd` for the Q4_0/Q4_1/Q8_0 panels (AVX-VNNI where present, else
//!   AVX512-VNNI with AVX512-VL, both on 256-bit vectors); the f32/f16 tiles and
//!   everything else stay on AVX2.
//! - `avx512`: the `vnni` panels (the `avx2` ones on a CPU with AVX-512 but no VNNI,
//!   e.g. Skylake-SP) plus 512-bit f32/f16 tiles (`quant_dot::avx512`) for F32/F16
//!   weights below the GEMM threshold: 16 columns per multiply-add, one conversion per
//!   16 f16 weights; and, where the CPU has AVX512-VNNI, 512-bit `vpdpbusd` kernels for
//!   pairs of panels × 8, 4 or 1 tokens at a time for every matmul, single-token decode
//!   included (`quant_dot::vnni512`: 16 rows per multiply, bit-identical to the panels).
//!   Measured on a 2-core Zen 5 (`docs/benchmarks.md`, issue 20): prefill ×1.3 and
//!   8-stream decode ×1.15–1.2 over `vnni`. A family of its own rather than folded into `vnni` because its
//!   f32/f16 outputs are not bit-identical to AVX2's (16-lane sums; see numerics below),
//!   so `vnni` stays the bit-exact reference on AVX-512 machines. Measured against
//!   `vnni` (`docs/benchmarks.md`, issue 20): F16 rows ×1.14–1.48 at 1–16 tokens, F32
//!   rows −7% to +11% (they are bound by the weights' bytes sooner).
//! - `amx`: `avx512`, plus AMX int8 tiles (`tdpbsud`/`tdpbssd`) for the panels whenever
//!   a matmul has 16 tokens or more (prefill, large decode batches): pairs of panels × 16
//!   or 8 tokens per tile, the f32 steps on AVX-512. Smaller matmuls, and the tokens the
//!   runs of 8 leave over, take `avx512`'s 512-bit VNNI pairs: below 16 tokens the tile
//!   multiply waits on the per-call repack and the per-block f32 steps, and measured
//!   slower there (`docs/benchmarks.md`, issue 20: 8-stream decode ×1.3–1.4 once 8
//!   tokens left the tiles). Needs AMX-TILE/INT8, AVX-512 F/BW/VL and AVX512-VNNI, an OS
//!   that manages tile state, and on Linux the `arch_prctl` permission for tile data,
//!   which `tiles` requests once; without any of these the family is unavailable and
//!   says why.
//! - `portable`: the scalar kernels, only on builds without AVX2 at compile time.
//!
//! Numerics: the Q4_0/Q4_1/Q8_0 panels give bit-identical outputs in every family: each
//! computes every 32-value block's integer dot product exactly in i32, then the same f32
//! operations in the same order (a unit test forces every build this CPU has and
//! compares bit for bit). The F32/F16 tiles of `avx512` and `amx` sum in a different
//! order than AVX2's; tests hold every family to the f32 dot-product bound n·ε·Σ|w·x|
//! against an f64 reference, and the llama.cpp fixture tests pass with each family
//! forced.
//!
//! The best family the CPU has is the default; `TANDEM_CPU_KERNELS=avx2|vnni|avx512|amx`
//! overrides it (benchmarks, bug reports). An unknown value, or a family this CPU lacks,
//! is a [`CpuKernelsError`] naming the reason, not a silent fallback. The choice is made
//! on first use and cached ([`selected`]); each matmul then reads the resolved table
//! ([`panel_table`]), never per panel.

use std::fmt;
use std::sync::OnceLock;

use super::matmul::{self, DenseTable};
use super::quant_dot::{self, PanelTable};

/// The environment variable that overrides the kernel family.
pub const CPU_KERNELS_ENV: &str = "TANDEM_CPU_KERNELS";

/// A family of CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuKernels {
    /// Scalar kernels: builds without AVX2 enabled at compile time.
    Portable,
    /// The x86-64-v3 kernels: AVX2, FMA, F16C.
    Avx2,
    /// AVX2 plus `vpdpbusd` (AVX-VNNI or AVX512-VNNI+VL) for the int8 panels.
    Vnni,
    /// `vnni` (or `avx2` panels on a CPU without VNNI) plus AVX-512 f32/f16 tiles and,
    /// with AVX512-VNNI, 512-bit pair kernels for every batch.
    Avx512,
    /// `avx512` plus AMX int8 tiles for the panels at 16 tokens or more.
    Amx,
}

impl CpuKernels {
    /// Every family, best last.
    pub const ALL: [CpuKernels; 5] = [
        CpuKernels::Portable,
        CpuKernels::Avx2,
        CpuKernels::Vnni,
        CpuKernels::Avx512,
        CpuKernels::Amx,
    ];

    /// The name `TANDEM_CPU_KERNELS` takes and the logs print.
    pub fn name(self) -> &'static str {
        match self {
            CpuKernels::Portable => "portable",
            CpuKernels::Avx2 => "avx2",
            CpuKernels::Vnni => "vnni",
            CpuKernels::Avx512 => "avx512",
            CpuKernels::Amx => "amx",
        }
    }

    /// Whether this build on this CPU can run the family. `Portable` only exists on
    /// builds without AVX2 (AVX2 builds never run the scalar kernels in a forward pass).
    pub fn available(self) -> bool {
        self.kernels().is_some()
    }

    /// The CPU features the family runs on here (for the start-up log line), e.g.
    /// `avx_vnni` or `avx512_vnni`.
    pub fn features(self) -> &'static str {
        match self {
            CpuKernels::Portable => "scalar",
            CpuKernels::Avx2 => "avx2, fma, f16c",
            CpuKernels::Vnni => quant_dot::vnni_flavor().unwrap_or("none"),
            CpuKernels::Avx512 => match (quant_dot::vnni_flavor(), quant_dot::has_zmm_pairs()) {
                (Some(_), true) => "avx512_vnni pairs, avx512f f32/f16 tiles",
                (Some(_), false) => "avx512f f32/f16 tiles, avx_vnni panels",
                (None, _) => "avx512f f32/f16 tiles, avx2 panels",
            },
            CpuKernels::Amx => match quant_dot::has_zmm_pairs() {
                true => "amx_int8 tiles from 16 tokens, avx512_vnni pairs below, avx512f",
                false => "none",
            },
        }
    }

    /// Why this build on this CPU cannot run the family, or `None` if it can.
    pub fn unavailable_reason(self) -> Option<String> {
        if self.available() {
            return None;
        }
        Some(match self {
            CpuKernels::Portable => "AVX2 builds never run the scalar kernels".to_owned(),
            CpuKernels::Avx2 => "the build was compiled without AVX2/FMA/F16C".to_owned(),
            CpuKernels::Vnni => "the CPU lacks avx_vnni and avx512_vnni (with avx512vl)".to_owned(),
            CpuKernels::Avx512 => {
                quant_dot::avx512_unavailable().unwrap_or_else(|| "the build lacks AVX2".to_owned())
            }
            CpuKernels::Amx => quant_dot::amx_unavailable()
                .unwrap_or_else(|| "no VNNI build for the small tiles".to_owned()),
        })
    }

    /// The best family this CPU has (the last available one of [`CpuKernels::ALL`]).
    pub fn best() -> CpuKernels {
        CpuKernels::ALL
            .into_iter()
            .rev()
            .find(|k| k.available())
            .expect("the build's compile-time family is always available")
    }

    /// The families this CPU has, best first.
    pub fn supported() -> Vec<CpuKernels> {
        CpuKernels::ALL
            .into_iter()
            .rev()
            .filter(|k| k.available())
            .collect()
    }

    /// The family named by an override value (`avx2`, `vnni`, `avx512`, `amx`,
    /// `portable`).
    pub fn parse(value: &str) -> Result<CpuKernels, CpuKernelsError> {
        let family = CpuKernels::ALL
            .into_iter()
            .find(|k| k.name() == value.trim().to_ascii_lowercase())
            .ok_or_else(|| CpuKernelsError::Unknown {
                value: value.to_owned(),
                supported: SupportedList,
            })?;
        if family.available() {
            Ok(family)
        } else {
            Err(CpuKernelsError::Unsupported {
                value: value.to_owned(),
                reason: family.unavailable_reason().unwrap_or_default(),
                supported: SupportedList,
            })
        }
    }

    /// The family for an optional override value: the best one without it.
    pub fn resolve(value: Option<&str>) -> Result<CpuKernels, CpuKernelsError> {
        match value {
            None => Ok(CpuKernels::best()),
            Some(value) => CpuKernels::parse(value),
        }
    }

    /// One line for the start-up log, e.g. `vnni (avx_vnni; avx2 also available; amx
    /// unavailable: the CPU lacks amx_tile)`: the chosen family, the others this CPU
    /// has, and why any better one is missing.
    pub fn describe(self) -> String {
        let others: Vec<&str> = CpuKernels::supported()
            .into_iter()
            .filter(|&k| k != self)
            .map(CpuKernels::name)
            .collect();
        let mut line = format!("{} ({}", self.name(), self.features());
        if !others.is_empty() {
            line.push_str(&format!("; {} also available", others.join(", ")));
        }
        for better in CpuKernels::ALL.into_iter().filter(|&k| k > self) {
            if let Some(why) = better.unavailable_reason() {
                line.push_str(&format!("; {better} unavailable: {why}"));
            }
        }
        line.push(')');
        line
    }

    /// The kernels of this family, if this build on this CPU can run it.
    pub(crate) fn kernels(self) -> Option<FamilyKernels> {
        Some(FamilyKernels {
            panels: quant_dot::panel_table(self)?,
            dense: matmul::dense_table(self),
        })
    }
}

impl fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The families this CPU supports, printed in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SupportedList;

impl fmt::Display for SupportedList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = CpuKernels::supported()
            .into_iter()
            .map(CpuKernels::name)
            .collect();
        f.write_str(&names.join(", "))
    }
}

/// A `TANDEM_CPU_KERNELS` value that cannot be honoured.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CpuKernelsError {
    #[error(
        "{CPU_KERNELS_ENV}={value:?}: unknown kernel family (this CPU and build support: {supported})"
    )]
    Unknown {
        value: String,
        supported: SupportedList,
    },
    #[error(
        "{CPU_KERNELS_ENV}={value:?}: kernel family not available here: {reason} (this CPU and build support: {supported})"
    )]
    Unsupported {
        value: String,
        reason: String,
        supported: SupportedList,
    },
}

/// A family's kernels, resolved once so a matmul calls through plain function pointers.
#[derive(Clone, Copy)]
pub(crate) struct FamilyKernels {
    /// The Q4_0/Q4_1/Q8_0 panel (and pair) kernels.
    pub(crate) panels: &'static PanelTable,
    /// The F32/F16 row kernels.
    pub(crate) dense: &'static DenseTable,
}

/// The family and its resolved kernels, decided once per process.
type Selection = Result<(CpuKernels, FamilyKernels), CpuKernelsError>;

fn selection() -> &'static Selection {
    static SELECTED: OnceLock<Selection> = OnceLock::new();
    SELECTED.get_or_init(|| {
        let value = std::env::var(CPU_KERNELS_ENV).ok();
        let family = CpuKernels::resolve(value.as_deref().filter(|v| !v.trim().is_empty()))?;
        let kernels = family
            .kernels()
            .expect("resolve only returns available families");
        Ok((family, kernels))
    })
}

/// The process's kernel family: `TANDEM_CPU_KERNELS` if set, else the best available;
/// decided on the first call and cached. Front ends call it at start to log the choice
/// and to fail early on a bad override; every matmul fails the same way otherwise.
pub fn selected() -> Result<CpuKernels, CpuKernelsError> {
    selection()
        .as_ref()
        .map(|&(family, _)| family)
        .map_err(Clone::clone)
}

/// The selected family's kernels.
pub(crate) fn kernels() -> Result<FamilyKernels, CpuKernelsError> {
    selection()
        .as_ref()
        .map(|&(_, kernels)| kernels)
        .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_or_name_the_supported_families() {
        assert_eq!(CpuKernels::resolve(None).unwrap(), CpuKernels::best());
        let best = CpuKernels::best();
        assert_eq!(CpuKernels::parse(best.name()).unwrap(), best);
        let err = CpuKernels::parse("sse9").unwrap_err().to_string();
        assert!(
            err.contains("\"sse9\"") && err.contains(best.name()),
            "{err}"
        );
        for family in CpuKernels::ALL {
            if !family.available() {
                let err = CpuKernels::parse(family.name()).unwrap_err();
                assert!(matches!(err, CpuKernelsError::Unsupported { .. }), "{err}");
                let why = family
                    .unavailable_reason()
                    .expect("unavailable families say why");
                assert!(err.to_string().contains(best.name()) && err.to_string().contains(&why));
                assert!(best.describe().contains(&why) || family < best);
            }
        }
        assert!(best.describe().starts_with(best.name()));
    }
}

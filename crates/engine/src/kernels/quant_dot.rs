//! Dot-product kernels for small batches (decode): quantized weights against quantized
//! activations, and f32/f16 weights against f32 activations.
//!
//! Activations are quantized once per call into [`Q8Acts`] (32-element blocks of i8 with
//! an f32 scale and the scaled block sum), which serves Q4_0, Q4_1 and Q8_0 weights:
//!
//! - Q8_0 `w = d·q`:          Σ w·x = d_w·d_x·Σ q·a
//! - Q4_1 `w = d·q + m`:      Σ w·x = d_w·d_x·Σ q·a + m·(d_x·Σ a)
//! - Q4_0 `w = d·(q - 8)`:    as Q4_1 with m = -8·d
//!
//! The quantized kernels work on one panel of 8 weight rows (`packed.rs`) × 1, 4 or 8
//! tokens, with each row's integer dot product in its own 32-bit lane (no horizontal
//! adds), scaled by the panel's vector of 8 row scales at once:
//!
//! - Q4: nibbles through `maddubs` against broadcast groups of 4 activations, summed in
//!   i16 over a block.
//! - Q8_0: quants sign-extended to i16 through `madd` against broadcast pairs of
//!   activations widened once per call ([`Q8Acts::widen`]): one multiply per 16
//!   products and no sign fix-ups, exact in i32.
//!
//! The f32/f16 kernels compute tiles of `R` rows × `T` tokens. The AVX2 versions (`avx2`)
//! and the portable ones (`scalar`) have identical signatures; the scalar ones are always
//! compiled so tests can compare the two. `avx512` has 512-bit versions for the `avx512`
//! and `amx` families (same results up to summation order).
//!
//! The panel kernels are also reached at run time through a [`PanelTable`] per kernel
//! family (`super::dispatch`): `vnni` replaces the AVX2 panels with `vpdpbusd` ones
//! (bit-identical results), chosen only when the CPU has AVX-VNNI or AVX512-VNNI+VL;
//! `avx512` adds pair kernels (`vnni512`: two panels per 512-bit `vpdpbusd`, also
//! bit-identical) that every matmul uses, and `amx` puts AMX tile kernels (`amx`: two
//! panels × 8 or 16 tokens per tile multiply) before those for matmuls of 16 tokens or
//! more.

use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use super::aligned::AlignedBytes;
use super::dispatch::CpuKernels;
use super::packed::{PANEL_ROWS, PanelFormat};
use super::pool::ThreadPool;

/// Elements per quantization block of the 32-wide formats.
pub(crate) const QK: usize = 32;

/// Batches of at least twice this many tokens are quantized in parallel, this many per
/// task.
const PARALLEL_QUANTIZE_TOKENS: usize = 16;

/// One task's share of a parallel quantization: values in, quants, scales, sums out.
type QuantizeChunk<'a> = (&'a [f32], &'a mut [i8], BlockStats<'a>);

/// Quantizes whole 32-value blocks of `x` into `qs` and each block's `out` entries.
fn quantize_blocks(x: &[f32], qs: &mut [i8], out: &mut BlockStats<'_>) {
    let stats = out
        .scales
        .iter_mut()
        .zip(out.sums.iter_mut())
        .zip(out.block_sums.iter_mut());
    let blocks = x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).zip(stats);
    for ((src, dst), ((scale, sum), block_sum)) in blocks {
        let (src, dst) = (
            src.try_into().expect("32 values"),
            dst.try_into().expect("32 quants"),
        );
        let quant_sum;
        (*scale, quant_sum) = fast::quantize_block(src, dst);
        *sum = *scale * quant_sum as f32;
        *block_sum = quant_sum;
    }
}

/// Where [`quantize_blocks`] writes each block's scale, scaled sum and sum of quants.
struct BlockStats<'a> {
    scales: &'a mut [f32],
    sums: &'a mut [f32],
    block_sums: &'a mut [i32],
}

/// Activation rows quantized to i8 in blocks of 32 (the Q8_0/Q8_1 dot types).
#[derive(Default)]
pub(crate) struct Q8Acts {
    n_tokens: usize,
    cols: usize,
    qs: AlignedBytes,
    /// `qs` sign-extended, for the Q8_0 kernels; empty until [`Q8Acts::widen`].
    qs16: Vec<i16>,
    scales: Vec<f32>,
    /// Each block's `scale · Σ qs` (the Q4 kernels' min term).
    sums: Vec<f32>,
    /// Each block's `Σ qs` (the 512-bit Q8_0 kernels' offset term).
    block_sums: Vec<i32>,
}

impl Q8Acts {
    /// Quantizes `x` (`n_tokens` rows of `cols` values; `cols` a multiple of 32, both
    /// caller-checked) in place of the previous contents, on `pool` for large batches.
    pub(crate) fn quantize(&mut self, pool: &ThreadPool, x: &[f32], n_tokens: usize, cols: usize) {
        debug_assert!(cols.is_multiple_of(QK) && x.len() == n_tokens * cols);
        let n_blocks = n_tokens * cols / QK;
        self.n_tokens = n_tokens;
        self.cols = cols;
        self.qs.resize(n_tokens * cols);
        self.qs16.clear();
        self.scales.resize(n_blocks, 0.0);
        self.sums.resize(n_blocks, 0.0);
        self.block_sums.resize(n_blocks, 0);
        if cols == 0 {
            return;
        }
        let qs = self.qs.as_mut_i8();
        if n_tokens < 2 * PARALLEL_QUANTIZE_TOKENS {
            let mut stats = BlockStats {
                scales: &mut self.scales,
                sums: &mut self.sums,
                block_sums: &mut self.block_sums,
            };
            quantize_blocks(x, qs, &mut stats);
            return;
        }
        let (values, blocks) = (
            PARALLEL_QUANTIZE_TOKENS * cols,
            PARALLEL_QUANTIZE_TOKENS * cols / QK,
        );
        let chunks: Vec<Mutex<QuantizeChunk<'_>>> = x
            .chunks(values)
            .zip(qs.chunks_mut(values))
            .zip(
                self.scales
                    .chunks_mut(blocks)
                    .zip(self.sums.chunks_mut(blocks))
                    .zip(self.block_sums.chunks_mut(blocks)),
            )
            .map(|((x, qs), ((scales, sums), block_sums))| {
                Mutex::new((
                    x,
                    qs,
                    BlockStats {
                        scales,
                        sums,
                        block_sums,
                    },
                ))
            })
            .collect();
        pool.run(chunks.len(), |i| {
            let mut chunk = chunks[i].lock().unwrap_or_else(PoisonError::into_inner);
            let (x, qs, stats) = &mut *chunk;
            quantize_blocks(x, qs, stats);
        });
    }

    /// Fills the 16-bit copy of the quants that the Q8_0 kernels read (only they need
    /// it, so large batches of other formats skip the copy).
    pub(crate) fn widen(&mut self) {
        self.qs16.clear();
        self.qs16
            .extend(self.qs.as_i8().iter().map(|&q| i16::from(q)));
    }

    pub(crate) fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / QK
    }

    /// Quantized values of token `t`.
    fn qs(&self, t: usize) -> &[i8] {
        &self.qs.as_i8()[t * self.cols..(t + 1) * self.cols]
    }

    /// Quantized values of token `t` as i16 (after [`Q8Acts::widen`]).
    fn qs16(&self, t: usize) -> &[i16] {
        &self.qs16[t * self.cols..(t + 1) * self.cols]
    }

    fn scales(&self, t: usize) -> &[f32] {
        let nb = self.blocks_per_row();
        &self.scales[t * nb..(t + 1) * nb]
    }

    fn sums(&self, t: usize) -> &[f32] {
        let nb = self.blocks_per_row();
        &self.sums[t * nb..(t + 1) * nb]
    }

    /// Token `t`'s blocks' sums of quants.
    fn block_sums(&self, t: usize) -> &[i32] {
        let nb = self.blocks_per_row();
        &self.block_sums[t * nb..(t + 1) * nb]
    }
}

/// Results of one panel (8 rows, natural order) for each of `T` tokens.
pub(crate) type PanelOut<const T: usize> = [[f32; PANEL_ROWS]; T];

/// A panel kernel for `T` tokens: (panel, format, activations, first token).
pub(crate) type PanelFn<const T: usize> = fn(&[u8], &PanelFormat, &Q8Acts, usize) -> PanelOut<T>;

/// Weight rows of a pair of panels (the pair kernels' unit).
pub(crate) const PAIR_ROWS: usize = 2 * PANEL_ROWS;

/// Results of a pair of panels (16 rows, natural order) for one token.
pub(crate) type PairOut = [f32; PAIR_ROWS];

/// A kernel for a pair of panels (16 rows; the second may be absent: 1 or 2 live
/// panels) × a run of tokens whose length is a multiple of its [`PairKernel::tokens`],
/// written to one [`PairOut`] per token: (panels, live panels, format, activations,
/// tokens, out).
pub(crate) type PairFn = fn(&[u8], usize, &PanelFormat, &Q8Acts, Range<usize>, &mut [PairOut]);

/// A family's kernel for pairs of panels, the runs of tokens it takes and the batches
/// it is used for.
#[derive(Clone, Copy)]
pub(crate) struct PairKernel {
    pub(crate) run: PairFn,
    /// Runs of tokens are a multiple of this (AMX tiles: 8; 512-bit VNNI: 1).
    pub(crate) tokens: usize,
    /// The smallest matmul (in tokens) that takes this kernel.
    pub(crate) from: usize,
}

/// One weight format's panel kernels for tiles of 8, 4 and 1 tokens, and optionally
/// kernels for pairs of panels × runs of tokens.
#[derive(Clone, Copy)]
pub(crate) struct PanelSet {
    pub(crate) k8: PanelFn<8>,
    pub(crate) k4: PanelFn<4>,
    pub(crate) k1: PanelFn<1>,
    /// Pair kernels, the one for the largest matmuls first (`amx`: AMX tiles, then the
    /// 512-bit VNNI pairs): a matmul takes the first whose `from` it reaches, the tokens
    /// that kernel's runs leave over go to the next one, and what is left to the panels.
    pub(crate) pairs: [Option<PairKernel>; 2],
}

/// A kernel family's panel kernels, resolved once (`super::dispatch`) so a matmul
/// calls through plain function pointers.
pub(crate) struct PanelTable {
    pub(crate) q4_0: PanelSet,
    pub(crate) q4_1: PanelSet,
    pub(crate) q8_0: PanelSet,
    /// Whether the Q8_0 kernels read the i16 activations ([`Q8Acts::widen`]).
    pub(crate) q8_0_wide: bool,
}

/// The pair kernels `[q4_0, q4_1, q8_0]` of a module with `q4_pair`, `q8_0_pair` and
/// `RUN_TOKENS`, used by matmuls of `from` tokens or more.
macro_rules! pair_kernels {
    ($($module:ident)::+, $from:expr) => {
        [
            Some($crate::kernels::quant_dot::PairKernel {
                run: $($module)::+::q4_pair::<false>,
                tokens: $($module)::+::RUN_TOKENS,
                from: $from,
            }),
            Some($crate::kernels::quant_dot::PairKernel {
                run: $($module)::+::q4_pair::<true>,
                tokens: $($module)::+::RUN_TOKENS,
                from: $from,
            }),
            Some($crate::kernels::quant_dot::PairKernel {
                run: $($module)::+::q8_0_pair,
                tokens: $($module)::+::RUN_TOKENS,
                from: $from,
            }),
        ]
    };
}

/// The table of a module whose `q4_panel` and `q8_0_panel` have the panel signatures,
/// with no pair kernels, or with the [`pair_kernels!`] of one module (`pairs: module
/// from N`) or two (`..., then: module from N`), largest matmuls first.
macro_rules! panel_table {
    ($wide:expr) => {
        panel_table!($wide, [None, None, None], [None, None, None])
    };
    ($wide:expr, pairs: $($module:ident)::+ from $from:expr) => {
        panel_table!($wide, pair_kernels!($($module)::+, $from), [None, None, None])
    };
    (
        $wide:expr,
        pairs: $($first:ident)::+ from $first_from:expr,
        then: $($second:ident)::+ from $second_from:expr
    ) => {
        panel_table!(
            $wide,
            pair_kernels!($($first)::+, $first_from),
            pair_kernels!($($second)::+, $second_from)
        )
    };
    ($wide:expr, $first:expr, $second:expr) => {
        $crate::kernels::quant_dot::PanelTable {
            q4_0: $crate::kernels::quant_dot::PanelSet {
                k8: q4_panel::<false, 8>,
                k4: q4_panel::<false, 4>,
                k1: q4_panel::<false, 1>,
                pairs: [$first[0], $second[0]],
            },
            q4_1: $crate::kernels::quant_dot::PanelSet {
                k8: q4_panel::<true, 8>,
                k4: q4_panel::<true, 4>,
                k1: q4_panel::<true, 1>,
                pairs: [$first[1], $second[1]],
            },
            q8_0: $crate::kernels::quant_dot::PanelSet {
                k8: q8_0_panel::<8>,
                k4: q8_0_panel::<4>,
                k1: q8_0_panel::<1>,
                pairs: [$first[2], $second[2]],
            },
            q8_0_wide: $wide,
        }
    };
}

/// The panel kernels of `family`, if this build on this CPU can run it.
pub(crate) fn panel_table(family: CpuKernels) -> Option<&'static PanelTable> {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    return match family {
        CpuKernels::Portable => None,
        CpuKernels::Avx2 => Some(&avx2::TABLE),
        CpuKernels::Vnni => vnni::tables().first().map(|build| build.table),
        CpuKernels::Avx512 => {
            avx512_unavailable().is_none().then_some(())?;
            Some(
                vnni::tables()
                    .first()
                    .map_or(&avx2::TABLE, |build| build.zmm_table.unwrap_or(build.table)),
            )
        }
        CpuKernels::Amx => amx_table(),
    };
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    return (family == CpuKernels::Portable).then_some(&scalar::TABLE);
}

/// The `amx` family's table: the best VNNI build's panels for few tokens, AMX tiles for
/// pairs of panels × many tokens. Only where the process can use AMX (see
/// `super::tiles`) and the CPU has AVX-512 F/BW/VL (the tiles' f32 steps).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
fn amx_table() -> Option<&'static PanelTable> {
    amx_unavailable().is_none().then_some(())?;
    vnni::tables().first().map(|build| build.amx_table)
}

/// Why the `amx` family cannot run here, or `None` when it can.
pub(crate) fn amx_unavailable() -> Option<String> {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        if let Err(why) = super::tiles::availability() {
            return Some(why.clone());
        }
        if let Some(why) = avx512_unavailable() {
            return Some(why);
        }
        if !has_zmm_pairs() {
            return Some(
                "the CPU lacks AVX512-VNNI, which the family uses below the tiles' batches"
                    .to_owned(),
            );
        }
        None
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    Some("the build lacks AVX2".to_owned())
}

/// Why the `avx512` family (and the AVX-512 parts of `amx`) cannot run here, or `None`.
pub(crate) fn avx512_unavailable() -> Option<String> {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl");
        (!avx512).then(|| "the CPU lacks AVX-512 F/BW/VL".to_owned())
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    Some("the build lacks AVX2".to_owned())
}

/// Whether the `avx512` family runs the 512-bit VNNI pair kernels here.
pub(crate) fn has_zmm_pairs() -> bool {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    return vnni::tables()
        .first()
        .is_some_and(|build| build.zmm_table.is_some());
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    return false;
}

/// The CPU feature the `vnni` family runs on here (`avx_vnni` or `avx512_vnni`).
pub(crate) fn vnni_flavor() -> Option<&'static str> {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    return vnni::tables().first().map(|build| build.name);
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    return None;
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub(crate) use avx2 as fast;
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
pub(crate) use scalar as fast;

/// Checks the slices a panel kernel reads, so the SIMD loads below stay in bounds.
#[inline(always)]
fn check_panel(panel: &[u8], format: &PanelFormat, acts: &Q8Acts, t0: usize, tokens: usize) {
    assert!(panel.len() == acts.blocks_per_row() * format.panel_block);
    assert!(t0 + tokens <= acts.n_tokens);
}

#[allow(dead_code)] // With AVX2 only the tests call these.
pub(crate) mod scalar {
    use super::{PanelOut, Q8Acts, QK, check_panel};
    use crate::kernels::packed::{PANEL_ROWS, PanelFormat, q4_row_nibbles, q8_row_quants};
    use crate::kernels::simd::f16_at;

    pub(crate) static TABLE: super::PanelTable = panel_table!(false);

    /// Quantizes 32 values to i8; returns (scale, scale · Σ q).
    pub(crate) fn quantize_block(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, i32) {
        let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in dst.iter_mut().zip(src) {
            *q = (v * inv).round_ties_even() as i8;
            sum += i32::from(*q);
        }
        (scale, sum)
    }

    /// One panel of Q4_0 (`HAS_MIN = false`) or Q4_1 weights × tokens `t0..t0+T`.
    pub(crate) fn q4_panel<const HAS_MIN: bool, const T: usize>(
        panel: &[u8],
        format: &PanelFormat,
        acts: &Q8Acts,
        t0: usize,
    ) -> PanelOut<T> {
        check_panel(panel, format, acts, t0, T);
        let mut out = [[0f32; PANEL_ROWS]; T];
        for (b, block) in panel.chunks_exact(format.panel_block).enumerate() {
            for k in 0..PANEL_ROWS {
                let d = f16_at(block, PanelFormat::SCALES + 2 * k);
                let m = if HAS_MIN {
                    f16_at(block, PanelFormat::MINS + 2 * k)
                } else {
                    -8.0 * d
                };
                let nibbles = q4_row_nibbles(format, block, k);
                for (t, out) in out.iter_mut().enumerate() {
                    let a = &acts.qs(t0 + t)[b * QK..(b + 1) * QK];
                    let dot: i32 = nibbles
                        .iter()
                        .enumerate()
                        .map(|(j, &n)| {
                            i32::from(n & 0x0F) * i32::from(a[j])
                                + i32::from(n >> 4) * i32::from(a[j + 16])
                        })
                        .sum();
                    out[k] += d * acts.scales(t0 + t)[b] * dot as f32 + m * acts.sums(t0 + t)[b];
                }
            }
        }
        out
    }

    /// One panel of Q8_0 weights × tokens `t0..t0+T`.
    pub(crate) fn q8_0_panel<const T: usize>(
        panel: &[u8],
        format: &PanelFormat,
        acts: &Q8Acts,
        t0: usize,
    ) -> PanelOut<T> {
        check_panel(panel, format, acts, t0, T);
        let mut out = [[0f32; PANEL_ROWS]; T];
        for (b, block) in panel.chunks_exact(format.panel_block).enumerate() {
            for k in 0..PANEL_ROWS {
                let d = f16_at(block, PanelFormat::SCALES + 2 * k);
                let quants = q8_row_quants(format, block, k);
                for (t, out) in out.iter_mut().enumerate() {
                    let a = &acts.qs(t0 + t)[b * QK..(b + 1) * QK];
                    let dot: i32 = quants
                        .iter()
                        .zip(a)
                        .map(|(&w, &x)| i32::from(w) * i32::from(x))
                        .sum();
                    // Fused like the AVX2 kernel, which this matches bit for bit.
                    out[k] = (dot as f32).mul_add(d * acts.scales(t0 + t)[b], out[k]);
                }
            }
        }
        out
    }

    /// `R` rows of f32 weights (`cols` each, consecutive in `w`) × f32 tokens
    /// `t0..t0+T` of `x` (`cols` each).
    pub(crate) fn f32_tile<const R: usize, const T: usize>(
        w: &[f32],
        x: &[f32],
        cols: usize,
        t0: usize,
    ) -> [[f32; T]; R] {
        let mut out = [[0f32; T]; R];
        for (r, out_row) in out.iter_mut().enumerate() {
            let row = &w[r * cols..(r + 1) * cols];
            for (t, out) in out_row.iter_mut().enumerate() {
                let xt = &x[(t0 + t) * cols..(t0 + t + 1) * cols];
                *out = row.iter().zip(xt).map(|(a, b)| a * b).sum();
            }
        }
        out
    }

    /// `R` rows of f16 weights (little-endian bytes, `cols` each) × f32 tokens.
    pub(crate) fn f16_tile<const R: usize, const T: usize>(
        w: &[u8],
        x: &[f32],
        cols: usize,
        t0: usize,
    ) -> [[f32; T]; R] {
        let mut out = [[0f32; T]; R];
        for (r, out_row) in out.iter_mut().enumerate() {
            let row = &w[r * cols * 2..(r + 1) * cols * 2];
            for (t, out) in out_row.iter_mut().enumerate() {
                let xt = &x[(t0 + t) * cols..(t0 + t + 1) * cols];
                *out = xt
                    .iter()
                    .enumerate()
                    .map(|(c, v)| f16_at(row, 2 * c) * v)
                    .sum();
            }
        }
        out
    }
}

/// The block loop of the Q4_0/Q4_1 panel kernels, shared by the AVX2 and VNNI builds
/// (expanded inside each `#[target_feature]` function, so each gets its own features):
/// per block, nibbles × activations accumulated per lane by `$step(sum, w, a)` (four
/// products of row k's nibbles `w` by the same 4 activations `a` into lane k), turned
/// into one i32 per row by `$finish(sum)`, then scaled (and the min term added) in f32.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
macro_rules! q4_panel_blocks {
    (
        ($has_min:ident, $tokens:ident),
        ($panel:ident, $format:ident, $acts:ident, $t0:ident),
        |$sum:ident, $w:ident, $a:ident| $step:expr,
        |$done:ident| $finish:expr
    ) => {{
        let n_blocks = $acts.blocks_per_row();
        // Raw rows: the block loop reads them without bounds checks (see the SAFETY notes).
        let qs: [*const i8; $tokens] = std::array::from_fn(|t| $acts.qs($t0 + t).as_ptr());
        let scales: [*const f32; $tokens] = std::array::from_fn(|t| $acts.scales($t0 + t).as_ptr());
        let act_sums: [*const f32; $tokens] = std::array::from_fn(|t| $acts.sums($t0 + t).as_ptr());
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); $tokens];
        for b in 0..n_blocks {
            // SAFETY: `check_panel` asserted `panel` holds `n_blocks` panel blocks, and every
            // token row `n_blocks` blocks of 32 quants, one scale and one sum each; b < n_blocks.
            let (block, a, scale, act_sum) = unsafe {
                (
                    $panel.as_ptr().add(b * $format.panel_block),
                    qs.map(|q| q.add(b * QK)),
                    scales.map(|s| s.add(b).read()),
                    act_sums.map(|s| s.add(b).read()),
                )
            };
            // SAFETY: a panel block holds its 4 × 32 nibble bytes at `quants()`.
            let quants = unsafe { block.add($format.quants()) };
            // Lane k of `lo` holds row k's elements 4g..4g+4, of `hi` elements
            // 16+4g..16+4g+4: multiply each by the same 4 activations in every lane.
            let mut sums = [_mm256_setzero_si256(); $tokens];
            for g in 0..4 {
                // SAFETY: group g is 32 bytes at 32g of the quants.
                let raw = unsafe { _mm256_loadu_si256(quants.add(32 * g).cast()) };
                let lo = _mm256_and_si256(raw, low_nibbles);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low_nibbles);
                for t in 0..$tokens {
                    // SAFETY: `a[t]` points at 32 quants; 4g + 4 <= 16 and 16 + 4g + 4 <= 32.
                    let (a_lo, a_hi) = unsafe {
                        (
                            _mm256_set1_epi32(a[t].add(4 * g).cast::<i32>().read_unaligned()),
                            _mm256_set1_epi32(a[t].add(16 + 4 * g).cast::<i32>().read_unaligned()),
                        )
                    };
                    sums[t] = {
                        let ($sum, $w, $a) = (sums[t], lo, a_lo);
                        $step
                    };
                    sums[t] = {
                        let ($sum, $w, $a) = (sums[t], hi, a_hi);
                        $step
                    };
                }
            }
            // SAFETY: the scale (and min) arrays are 16 bytes at offsets 0 (and 16).
            let d = unsafe { load_f16x8(block.add(PanelFormat::SCALES)) };
            let m = if $has_min {
                // SAFETY: as above.
                unsafe { load_f16x8(block.add(PanelFormat::MINS)) }
            } else {
                _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
            };
            for t in 0..$tokens {
                let row_sums = {
                    let $done = sums[t];
                    $finish
                };
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(scale[t]));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(row_sums), scale, acc[t]);
                acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(act_sum[t]), acc[t]);
            }
        }
        std::array::from_fn(|t| to_array(acc[t]))
    }};
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub(crate) mod avx2 {
    //! Every `unsafe` call of an `_avx2` function here relies on the module's cfg: it is
    //! only compiled when the target enables avx2, fma and f16c, all they require.

    use std::arch::x86_64::*;

    use super::{PanelOut, Q8Acts, QK, check_panel};
    use crate::kernels::packed::PanelFormat;
    use crate::kernels::simd::avx2::{hmax, hsum};

    pub(crate) static TABLE: super::PanelTable = panel_table!(true);

    /// Quantizes 32 values to i8; returns (scale, scale · Σ q).
    #[inline(always)]
    pub(crate) fn quantize_block(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, i32) {
        // SAFETY: see the module note.
        unsafe { quantize_block_avx2(src, dst) }
    }

    /// One panel of Q4_0 (`HAS_MIN = false`) or Q4_1 weights × tokens `t0..t0+T`.
    #[inline(always)]
    pub(crate) fn q4_panel<const HAS_MIN: bool, const T: usize>(
        panel: &[u8],
        format: &PanelFormat,
        acts: &Q8Acts,
        t0: usize,
    ) -> PanelOut<T> {
        check_panel(panel, format, acts, t0, T);
        // SAFETY: see the module note.
        unsafe { q4_panel_avx2::<HAS_MIN, T>(panel, format, acts, t0) }
    }

    /// One panel of Q8_0 weights × tokens `t0..t0+T` (`acts` widened).
    #[inline(always)]
    pub(crate) fn q8_0_panel<const T: usize>(
        panel: &[u8],
        format: &PanelFormat,
        acts: &Q8Acts,
        t0: usize,
    ) -> PanelOut<T> {
        check_panel(panel, format, acts, t0, T);
        assert!(
            acts.qs16.len() == acts.n_tokens * acts.cols,
            "Q8Acts::widen not called"
        );
        // SAFETY: see the module note.
        unsafe { q8_0_panel_avx2::<T>(panel, format, acts, t0) }
    }

    /// `R` rows of f32 weights (`cols` each, consecutive in `w`) × f32 tokens
    /// `t0..t0+T` of `x` (`cols` each).
    #[inline(always)]
    pub(crate) fn f32_tile<const R: usize, const T: usize>(
        w: &[f32],
        x: &[f32],
        cols: usize,
        t0: usize,
    ) -> [[f32; T]; R] {
        assert!(w.len() >= R * cols && x.len() >= (t0 + T) * cols);
        // SAFETY: see the module note.
        unsafe { f32_tile_avx2::<R, T>(w, x, cols, t0) }
    }

    /// `R` rows of f16 weights (little-endian bytes, `cols` each) × f32 tokens.
    #[inline(always)]
    pub(crate) fn f16_tile<const R: usize, const T: usize>(
        w: &[u8],
        x: &[f32],
        cols: usize,
        t0: usize,
    ) -> [[f32; T]; R] {
        assert!(w.len() >= R * cols * 2 && x.len() >= (t0 + T) * cols);
        // SAFETY: see the module note.
        unsafe { f16_tile_avx2::<R, T>(w, x, cols, t0) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn quantize_block_avx2(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, i32) {
        let p = src.as_ptr();
        // SAFETY: `src` holds 32 f32, read as four unaligned 8-lane vectors.
        let v = unsafe {
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        };
        let sign = _mm256_set1_ps(-0.0);
        let abs01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        let abs23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        let amax = hmax(_mm256_max_ps(abs01, abs23));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        // cvtps rounds to nearest even (the default MXCSR mode).
        let q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv));
        let q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv));
        let q2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv));
        let q3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv));
        let sum32 = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
        let sum = hsum(_mm256_cvtepi32_ps(sum32));
        // packs work per 128-bit lane; the permute restores element order.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        let ordered =
            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `dst` holds 32 bytes.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), ordered) };
        // The sum of 32 quants is an integer far below 2^24: exact in f32.
        (scale, sum as i32)
    }

    /// Loads 8 f16 at `ptr` as f32.
    ///
    /// # Safety
    /// `ptr` must be valid for reading 16 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn load_f16x8(ptr: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 16 readable bytes.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(ptr.cast()) })
    }

    /// Converts 8 lanes to an array of f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn to_array(v: __m256) -> [f32; 8] {
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q4_panel_avx2<const HAS_MIN: bool, const T: usize>(
        panel: &[u8],
        format: &PanelFormat,
        acts: &Q8Acts,
        t0: usize,
    ) -> PanelOut<T> {
        // Each i16 lane sums 8 `maddubs` pairs, 16 products of a nibble (<= 15) by an
        // activation (|a| <= 128): |Σ| <= 16 · 15 · 128 = 30720 < 2^15, so neither
        // `maddubs` nor the adds saturate and the block's dot product is exact.
        let ones = _mm256_set1_epi16(1);
        q4_panel_blocks!(
            (HAS_MIN, T),
            (panel, format, acts, t0),
            |sum, w, a| _mm256_add_epi16(sum, _mm256_maddubs_epi16(w, a)),
            |sum| _mm256_madd_epi16(sum, ones)
        )
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q8_0_panel_avx2<const T: usize>(
        panel: &[u8],
        format: &PanelFormat,
        acts: &Q8Acts,
        t0: usize,
    ) -> PanelOut<T> {
        let n_blocks = acts.blocks_per_row();
        // Raw rows: the block loop reads them without bounds checks (see the SAFETY notes).
        let qs: [*const i16; T] = std::array::from_fn(|t| acts.qs16(t0 + t).as_ptr());
        let scales: [*const f32; T] = std::array::from_fn(|t| acts.scales(t0 + t).as_ptr());
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..n_blocks {
            // SAFETY: `check_panel` asserted `panel` holds `n_blocks` panel blocks, and every
            // token row `n_blocks` blocks of 32 quants and one scale each; b < n_blocks.
            let (block, a, scale) = unsafe {
                (
                    panel.as_ptr().add(b * format.panel_block),
                    qs.map(|q| q.add(b * QK)),
                    scales.map(|s| s.add(b).read()),
                )
            };
            // SAFETY: a panel block holds its 16 × 16 quant bytes at `quants()`.
            let quants = unsafe { block.add(format.quants()) };
            // Lane k of group g's weights holds row k's elements 2g, 2g+1; `madd`
            // multiplies them by the same 2 activations in every lane. Exact:
            // |Σ| <= 32 · 128 · 127.
            let mut dots = [_mm256_setzero_si256(); T];
            for g in 0..QK / 2 {
                // SAFETY: group g is 16 bytes at 16g of the quants.
                let w = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(quants.add(16 * g).cast()) });
                for t in 0..T {
                    // SAFETY: `a[t]` points at 32 i16; 2g + 2 <= 32.
                    let pair = unsafe { a[t].add(2 * g).cast::<i32>().read_unaligned() };
                    let products = _mm256_madd_epi16(w, _mm256_set1_epi32(pair));
                    dots[t] = _mm256_add_epi32(dots[t], products);
                }
            }
            // SAFETY: the scale array is 16 bytes at offset 0.
            let d = unsafe { load_f16x8(block.add(PanelFormat::SCALES)) };
            for t in 0..T {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(scale[t]));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[t]), scale, acc[t]);
            }
        }
        std::array::from_fn(|t| to_array(acc[t]))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f32_tile_avx2<const R: usize, const T: usize>(
        w: &[f32],
        x: &[f32],
        cols: usize,
        t0: usize,
    ) -> [[f32; T]; R] {
        let rows: [&[f32]; R] = std::array::from_fn(|r| &w[r * cols..(r + 1) * cols]);
        let xs: [&[f32]; T] = std::array::from_fn(|t| &x[(t0 + t) * cols..(t0 + t + 1) * cols]);
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let full = cols / 8 * 8;
        for c in (0..full).step_by(8) {
            let mut wv = [_mm256_setzero_ps(); R];
            for r in 0..R {
                // SAFETY: c + 8 <= cols = rows[r].len().
                wv[r] = unsafe { _mm256_loadu_ps(rows[r].as_ptr().add(c)) };
            }
            for t in 0..T {
                // SAFETY: c + 8 <= cols = xs[t].len().
                let xv = unsafe { _mm256_loadu_ps(xs[t].as_ptr().add(c)) };
                for r in 0..R {
                    acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
                }
            }
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                let tail: f32 = rows[r][full..]
                    .iter()
                    .zip(&xs[t][full..])
                    .map(|(a, b)| a * b)
                    .sum();
                out[r][t] = hsum(acc[r][t]) + tail;
            }
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16_tile_avx2<const R: usize, const T: usize>(
        w: &[u8],
        x: &[f32],
        cols: usize,
        t0: usize,
    ) -> [[f32; T]; R] {
        let rows: [&[u8]; R] = std::array::from_fn(|r| &w[r * cols * 2..(r + 1) * cols * 2]);
        let xs: [&[f32]; T] = std::array::from_fn(|t| &x[(t0 + t) * cols..(t0 + t + 1) * cols]);
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let full = cols / 8 * 8;
        for c in (0..full).step_by(8) {
            let mut wv = [_mm256_setzero_ps(); R];
            for r in 0..R {
                // SAFETY: 2 * (c + 8) <= 2 * cols = rows[r].len().
                wv[r] =
                    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(rows[r].as_ptr().add(2 * c).cast())) };
            }
            for t in 0..T {
                // SAFETY: c + 8 <= cols = xs[t].len().
                let xv = unsafe { _mm256_loadu_ps(xs[t].as_ptr().add(c)) };
                for r in 0..R {
                    acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
                }
            }
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                let tail: f32 = (full..cols)
                    .map(|c| crate::kernels::simd::f16_at(rows[r], 2 * c) * xs[t][c])
                    .sum();
                out[r][t] = hsum(acc[r][t]) + tail;
            }
        }
        out
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod amx;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub(crate) mod avx512;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod vnni512;

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub(crate) mod vnni {
    //! `vpdpbusd` panel kernels: u8 × i8 products summed in groups of 4 into i32 lanes,
    //! one instruction where AVX2 needs `maddubs` + `madd` (Q4) or a widening `madd`
    //! per pair (Q8_0). Two builds of the same code: AVX-VNNI (VEX) and AVX512-VNNI with
    //! AVX512-VL (EVEX), both on 256-bit vectors.
    //!
    //! - Q4: nibbles (0..15) are the unsigned operand, activations the signed one: exactly
    //!   `vpdpbusd`'s types.
    //! - Q8_0: both operands are signed, so each lane multiplies |w| (unsigned; 128 for
    //!   -128) by the activations with w's sign applied (`sign_epi8`), which is exact
    //!   because activations are in -127..=127 ([`super::Q8Acts::quantize`] scales to
    //!   ±127), so negating one never overflows. Reads the i8 activations: no widening.
    //!
    //! Each block's integer dot product is exact in i32 here and in the AVX2 kernels,
    //! and the float operations after it are the same, so the results are bit-identical.
    //!
    //! The kernels are only reachable through [`tables`], which lists a build only when
    //! the CPU reports its features: that check is what every `unsafe` call of a
    //! `#[target_feature]` function below relies on.

    use super::PanelTable;

    macro_rules! vnni_kernels {
        ($name:ident, $features:literal, $dpbusd:ident) => {
            pub(super) mod $name {
                use std::arch::x86_64::*;

                use super::super::avx2::{load_f16x8, to_array};
                use super::super::{PanelOut, Q8Acts, QK, check_panel};
                use crate::kernels::packed::PanelFormat;

                /// Only handed out by `tables` once the CPU has the features.
                pub(in super::super) static TABLE: super::super::PanelTable = panel_table!(false);

                /// [`TABLE`] plus the 512-bit VNNI pair kernels: only handed out once
                /// the CPU also has AVX512-VNNI, F, BW and VL (`zmm_table`).
                pub(in super::super) static ZMM_TABLE: super::super::PanelTable = panel_table!(
                    false,
                    pairs: super::super::vnni512 from super::super::vnni512::FROM_TOKENS
                );

                /// [`ZMM_TABLE`] with the AMX pair kernels for large matmuls: only
                /// handed out once the process can also use AMX and the CPU has
                /// AVX512-VNNI (`super::super::amx_table`).
                pub(in super::super) static AMX_TABLE: super::super::PanelTable = panel_table!(
                    false,
                    pairs: super::super::amx from super::super::amx::FROM_TOKENS,
                    then: super::super::vnni512 from super::super::vnni512::FROM_TOKENS
                );

                fn q4_panel<const HAS_MIN: bool, const T: usize>(
                    panel: &[u8],
                    format: &PanelFormat,
                    acts: &Q8Acts,
                    t0: usize,
                ) -> PanelOut<T> {
                    check_panel(panel, format, acts, t0, T);
                    // SAFETY: reachable only through TABLE (see the module note).
                    unsafe { q4_panel_vnni::<HAS_MIN, T>(panel, format, acts, t0) }
                }

                fn q8_0_panel<const T: usize>(
                    panel: &[u8],
                    format: &PanelFormat,
                    acts: &Q8Acts,
                    t0: usize,
                ) -> PanelOut<T> {
                    check_panel(panel, format, acts, t0, T);
                    // SAFETY: reachable only through TABLE (see the module note).
                    unsafe { q8_0_panel_vnni::<T>(panel, format, acts, t0) }
                }

                #[inline]
                #[target_feature(enable = $features)]
                fn q4_panel_vnni<const HAS_MIN: bool, const T: usize>(
                    panel: &[u8],
                    format: &PanelFormat,
                    acts: &Q8Acts,
                    t0: usize,
                ) -> PanelOut<T> {
                    q4_panel_blocks!(
                        (HAS_MIN, T),
                        (panel, format, acts, t0),
                        |sum, w, a| $dpbusd(sum, w, a),
                        |sum| sum
                    )
                }

                #[inline]
                #[target_feature(enable = $features)]
                fn q8_0_panel_vnni<const T: usize>(
                    panel: &[u8],
                    format: &PanelFormat,
                    acts: &Q8Acts,
                    t0: usize,
                ) -> PanelOut<T> {
                    let n_blocks = acts.blocks_per_row();
                    let qs: [*const i8; T] = std::array::from_fn(|t| acts.qs(t0 + t).as_ptr());
                    let scales: [*const f32; T] =
                        std::array::from_fn(|t| acts.scales(t0 + t).as_ptr());
                    // After the qword permute, each 128-bit lane holds 4 rows' pairs of
                    // group 2h then the same rows' pairs of group 2h+1; this puts row k's
                    // 4 consecutive elements in 32-bit lane k.
                    let interleave = _mm256_setr_epi8(
                        0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, //
                        0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                    );
                    let mut acc = [_mm256_setzero_ps(); T];
                    for b in 0..n_blocks {
                        // SAFETY: `check_panel` asserted `panel` holds `n_blocks` panel
                        // blocks, and every token row `n_blocks` blocks of 32 quants and
                        // one scale each; b < n_blocks.
                        let (block, a, scale) = unsafe {
                            (
                                panel.as_ptr().add(b * format.panel_block),
                                qs.map(|q| q.add(b * QK)),
                                scales.map(|s| s.add(b).read()),
                            )
                        };
                        // SAFETY: a panel block holds its 16 × 16 quant bytes at `quants()`.
                        let quants = unsafe { block.add(format.quants()) };
                        let mut dots = [_mm256_setzero_si256(); T];
                        for h in 0..QK / 4 {
                            // SAFETY: groups 2h and 2h+1 are the 32 bytes at 32h.
                            let raw = unsafe { _mm256_loadu_si256(quants.add(32 * h).cast()) };
                            let w = _mm256_shuffle_epi8(
                                _mm256_permute4x64_epi64::<0b11_01_10_00>(raw),
                                interleave,
                            );
                            let w_abs = _mm256_abs_epi8(w);
                            for t in 0..T {
                                // SAFETY: `a[t]` points at 32 quants; 4h + 4 <= 32.
                                let quad =
                                    unsafe { a[t].add(4 * h).cast::<i32>().read_unaligned() };
                                let signed = _mm256_sign_epi8(_mm256_set1_epi32(quad), w);
                                dots[t] = $dpbusd(dots[t], w_abs, signed);
                            }
                        }
                        // SAFETY: the scale array is 16 bytes at offset 0.
                        let d = unsafe { load_f16x8(block.add(PanelFormat::SCALES)) };
                        for t in 0..T {
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(scale[t]));
                            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[t]), scale, acc[t]);
                        }
                    }
                    std::array::from_fn(|t| to_array(acc[t]))
                }
            }
        };
    }

    vnni_kernels!(avx_vnni, "avx2,fma,f16c,avxvnni", _mm256_dpbusd_avx_epi32);
    vnni_kernels!(
        avx512_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        _mm256_dpbusd_epi32
    );

    /// One build of the VNNI kernels.
    pub(crate) struct VnniBuild {
        /// The CPU's `/proc/cpuinfo` flag for it.
        pub(crate) name: &'static str,
        pub(crate) table: &'static PanelTable,
        /// The same kernels plus the AMX pair kernels (for the `amx` family only).
        pub(crate) amx_table: &'static PanelTable,
        /// The same kernels plus the 512-bit VNNI pair kernels (for the `avx512`
        /// family), where the CPU has AVX512-VNNI, F, BW and VL.
        pub(crate) zmm_table: Option<&'static PanelTable>,
    }

    /// Whether the CPU runs the 512-bit VNNI pair kernels (`super::vnni512`).
    fn has_zmm_vnni() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    /// The VNNI builds this CPU can run, preferred first (VEX-encoded AVX-VNNI, then
    /// AVX512-VNNI).
    pub(crate) fn tables() -> Vec<VnniBuild> {
        let mut tables = Vec::new();
        if std::arch::is_x86_feature_detected!("avxvnni") {
            tables.push(VnniBuild {
                name: "avx_vnni",
                table: &avx_vnni::TABLE,
                amx_table: &avx_vnni::AMX_TABLE,
                zmm_table: has_zmm_vnni().then_some(&avx_vnni::ZMM_TABLE),
            });
        }
        if has_zmm_vnni() {
            tables.push(VnniBuild {
                name: "avx512_vnni",
                table: &avx512_vnni::TABLE,
                amx_table: &avx512_vnni::AMX_TABLE,
                zmm_table: Some(&avx512_vnni::ZMM_TABLE),
            });
        }
        tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn acts(cols: usize, n_tokens: usize) -> Q8Acts {
        let mut acts = Q8Acts::default();
        let pool = ThreadPool::new(2).unwrap();
        acts.quantize(&pool, &pseudo_random(cols * n_tokens, 7), n_tokens, cols);
        acts.widen();
        acts
    }

    #[test]
    fn quantize_block_matches_scalar() {
        let x = pseudo_random(QK, 3);
        let src: &[f32; QK] = x.as_slice().try_into().unwrap();
        let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
        let fast = fast::quantize_block(src, &mut a);
        let slow = scalar::quantize_block(src, &mut b);
        assert_eq!(a, b);
        assert!((fast.0 - slow.0).abs() < 1e-7);
        assert_eq!(fast.1, slow.1);
        assert_eq!(fast.1, a.iter().map(|&q| i32::from(q)).sum::<i32>());
    }

    /// One panel tile of `T` tokens from `t0`, fast vs scalar kernels.
    fn check_panel_tile<const T: usize>(m: &crate::kernels::QMatrix, acts: &Q8Acts, t0: usize) {
        use crate::kernels::GgmlDType;
        let format = m.panel_format().unwrap();
        let panel_bytes = m.cols() / QK * format.panel_block;
        for panel in m.storage().chunks_exact(panel_bytes) {
            let (fast, slow) = match m.dtype() {
                GgmlDType::Q4_0 => (
                    fast::q4_panel::<false, T>(panel, format, acts, t0),
                    scalar::q4_panel::<false, T>(panel, format, acts, t0),
                ),
                GgmlDType::Q4_1 => (
                    fast::q4_panel::<true, T>(panel, format, acts, t0),
                    scalar::q4_panel::<true, T>(panel, format, acts, t0),
                ),
                _ => (
                    fast::q8_0_panel::<T>(panel, format, acts, t0),
                    scalar::q8_0_panel::<T>(panel, format, acts, t0),
                ),
            };
            for (f, s) in fast.iter().flatten().zip(slow.iter().flatten()) {
                assert!((f - s).abs() <= 1e-4 * (1.0 + s.abs()), "{f} vs {s}");
            }
        }
    }

    #[test]
    fn kernels_match_scalar() {
        use crate::kernels::{GgmlDType, QMatrix};
        // 13 rows: a full panel and a zero-padded one.
        let (cols, rows) = (128, 13);
        let acts = acts(cols, 9);
        let w = pseudo_random(rows * cols, 11);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let m = QMatrix::from_f32(dtype, rows, cols, &w).unwrap();
            for t0 in [0, 1] {
                check_panel_tile::<1>(&m, &acts, t0 + 7);
                check_panel_tile::<3>(&m, &acts, t0);
                check_panel_tile::<4>(&m, &acts, t0 + 4);
                check_panel_tile::<8>(&m, &acts, t0);
            }
        }
        let close = |fast: [[f32; 3]; 4], slow: [[f32; 3]; 4]| {
            for (f, s) in fast.iter().flatten().zip(slow.iter().flatten()) {
                assert!((f - s).abs() <= 1e-4 * (1.0 + s.abs()), "{f} vs {s}");
            }
        };
        let x = pseudo_random(3 * 100, 5);
        let wf = pseudo_random(4 * 100, 9);
        close(
            fast::f32_tile::<4, 3>(&wf, &x, 100, 0),
            scalar::f32_tile::<4, 3>(&wf, &x, 100, 0),
        );
        let wh: Vec<u8> = wf
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        close(
            fast::f16_tile::<4, 3>(&wh, &x, 100, 0),
            scalar::f16_tile::<4, 3>(&wh, &x, 100, 0),
        );
    }

    /// The Q8_0 kernel's integer dot products are exact, so its results are those of
    /// `fma(dot, d · s, acc)` block after block, bit for bit, even at the extremes of
    /// the quants (-128 and 127, which `from_f32` never produces).
    #[test]
    fn q8_0_kernel_is_exact() {
        use crate::kernels::simd::f16_at;
        use crate::kernels::{GgmlDType, QMatrix};
        let (rows, cols, n_tokens) = (9, 96, 9);
        let acts = acts(cols, n_tokens);
        let mut ggml = Vec::new();
        let mut quants = vec![0i8; rows * cols];
        for (i, q) in quants.iter_mut().enumerate() {
            *q = match i % 7 {
                0 => -128,
                1 => 127,
                _ => (i * 37 % 256) as u8 as i8,
            };
        }
        for (i, block) in quants.chunks_exact(QK).enumerate() {
            ggml.extend(half::f16::from_f32(0.01 + i as f32 * 1e-3).to_le_bytes());
            ggml.extend(block.iter().map(|&q| q as u8));
        }
        let m = QMatrix::from_raw(GgmlDType::Q8_0, rows, cols, &ggml).unwrap();
        let expected = |row: usize, t: usize| {
            let mut acc = 0f32;
            for b in 0..cols / QK {
                let w = &quants[row * cols + b * QK..][..QK];
                let a = &acts.qs(t)[b * QK..][..QK];
                let dot: i32 = w
                    .iter()
                    .zip(a)
                    .map(|(&w, &a)| i32::from(w) * i32::from(a))
                    .sum();
                let d = f16_at(&ggml, (row * cols / QK + b) * 34);
                acc = (dot as f32).mul_add(d * acts.scales(t)[b], acc);
            }
            acc
        };
        let format = m.panel_format().unwrap();
        let panel_bytes = cols / QK * format.panel_block;
        for (p, panel) in m.storage().chunks_exact(panel_bytes).enumerate() {
            let tile = fast::q8_0_panel::<8>(panel, format, &acts, 1);
            let single = fast::q8_0_panel::<1>(panel, format, &acts, 0);
            for row in (p * PANEL_ROWS..rows).take(PANEL_ROWS) {
                let k = row % PANEL_ROWS;
                assert_eq!(single[0][k].to_bits(), expected(row, 0).to_bits());
                for (dt, values) in tile.iter().enumerate() {
                    assert_eq!(values[k].to_bits(), expected(row, 1 + dt).to_bits());
                }
            }
        }
    }

    /// Q8_0 weights covering the whole i8 range, -128 and 127 included (which
    /// `from_f32` never produces), with varied scales.
    fn q8_0_extremes(rows: usize, cols: usize) -> crate::kernels::QMatrix {
        use crate::kernels::{GgmlDType, QMatrix};
        let mut ggml = Vec::new();
        for (i, block) in (0..rows * cols)
            .collect::<Vec<_>>()
            .chunks_exact(QK)
            .enumerate()
        {
            ggml.extend(half::f16::from_f32(0.01 + i as f32 * 1e-3).to_le_bytes());
            ggml.extend(block.iter().map(|&j| match j % 7 {
                0 => 0x80,
                1 => 0x7F,
                _ => (j * 37 % 256) as u8,
            }));
        }
        QMatrix::from_raw(GgmlDType::Q8_0, rows, cols, &ggml).unwrap()
    }

    /// Every panel of `m`, tokens `t0..t0 + T`: `family` bit for bit against
    /// `reference` (AVX2), and within a tolerance of `portable` (scalar).
    fn compare_tile<const T: usize>(
        name: &str,
        m: &crate::kernels::QMatrix,
        acts: &Q8Acts,
        t0: usize,
        kernels: [PanelFn<T>; 3],
    ) {
        let [family, reference, portable] = kernels;
        let format = m.panel_format().unwrap();
        let panel_bytes = m.cols() / QK * format.panel_block;
        for (p, panel) in m.storage().chunks_exact(panel_bytes).enumerate() {
            let got = family(panel, format, acts, t0);
            let want = reference(panel, format, acts, t0);
            let slow = portable(panel, format, acts, t0);
            for (dt, ((g, w), s)) in got.iter().zip(&want).zip(&slow).enumerate() {
                for k in 0..PANEL_ROWS {
                    let what =
                        format!("{name} {:?} panel {p} row {k} token {}", m.dtype(), t0 + dt);
                    assert_eq!(
                        g[k].to_bits(),
                        w[k].to_bits(),
                        "{what}: {} vs avx2 {}",
                        g[k],
                        w[k]
                    );
                    let tol = 1e-4 * (1.0 + s[k].abs());
                    assert!(
                        (g[k] - s[k]).abs() <= tol,
                        "{what}: {} vs scalar {}",
                        g[k],
                        s[k]
                    );
                }
            }
        }
    }

    /// Every pair of panels of `m` (the last one lone when the panel count is odd) ×
    /// `tokens` through `pairs`, bit for bit against the AVX2 single-token kernel.
    fn compare_pairs(
        name: &str,
        m: &crate::kernels::QMatrix,
        acts: &Q8Acts,
        tokens: Range<usize>,
        pairs: PairFn,
        reference: PanelFn<1>,
    ) {
        let format = m.panel_format().unwrap();
        let panel_bytes = m.cols() / QK * format.panel_block;
        let n_panels = m.storage().len() / panel_bytes;
        let mut out = vec![[f32::NAN; 2 * PANEL_ROWS]; tokens.len()];
        for first in (0..n_panels).step_by(2) {
            let live = (n_panels - first).min(2);
            let panels = &m.storage()[first * panel_bytes..(first + live) * panel_bytes];
            pairs(panels, live, format, acts, tokens.clone(), &mut out);
            for (t, got) in tokens.clone().zip(&out) {
                for p in 0..live {
                    let panel = &panels[p * panel_bytes..(p + 1) * panel_bytes];
                    let [want] = reference(panel, format, acts, t);
                    for k in 0..PANEL_ROWS {
                        let g = got[p * PANEL_ROWS + k];
                        assert_eq!(
                            g.to_bits(),
                            want[k].to_bits(),
                            "{name} {:?} pairs: panel {} row {k} token {t}: {g} vs avx2 {}",
                            m.dtype(),
                            first + p,
                            want[k]
                        );
                    }
                }
            }
        }
    }

    /// Forces each kernel family (and each VNNI build, with and without AMX tiles or the
    /// 512-bit VNNI pairs) this CPU has and compares every panel kernel (1, 4 and 8
    /// tokens; pairs of panels × runs of 1 to 24 tokens, cut to each pair kernel's run;
    /// Q4_0, Q4_1, Q8_0) with the AVX2 and scalar ones.
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    #[test]
    fn every_family_matches_avx2_and_scalar() {
        use crate::kernels::{GgmlDType, QMatrix};
        let mut families = vec![("avx2".to_owned(), &avx2::TABLE)];
        let vnni = vnni::tables();
        for flavor in ["avx_vnni", "avx512_vnni"] {
            if !vnni.iter().any(|build| build.name == flavor) {
                eprintln!("notice: skipping the {flavor} kernels: this CPU lacks {flavor}");
            }
        }
        let amx = amx_unavailable();
        if let Some(why) = &amx {
            eprintln!("notice: skipping the AMX tile kernels: {why}");
        }
        for build in &vnni {
            families.push((build.name.to_owned(), build.table));
            if amx.is_none() {
                families.push((format!("amx+{}", build.name), build.amx_table));
            }
            match build.zmm_table {
                Some(table) => families.push((format!("zmm+{}", build.name), table)),
                None => eprintln!("notice: skipping the 512-bit VNNI pairs: no AVX512-VNNI"),
            }
        }
        for family in CpuKernels::ALL {
            if family.available() {
                let table = family.kernels().unwrap().panels;
                assert!(families.iter().any(|&(_, t)| std::ptr::eq(t, table)));
            } else {
                eprintln!("notice: kernel family {family} is not available here");
            }
        }
        // 21 rows: a pair of panels, then a lone one padded with zero rows.
        let (rows, cols, n_tokens) = (21, 256, 27);
        let acts = acts(cols, n_tokens);
        let w = pseudo_random(rows * cols, 23);
        let matrices = [
            QMatrix::from_f32(GgmlDType::Q4_0, rows, cols, &w).unwrap(),
            QMatrix::from_f32(GgmlDType::Q4_1, rows, cols, &w).unwrap(),
            q8_0_extremes(rows, cols),
        ];
        for (name, table) in &families {
            for m in &matrices {
                let set = |t: &PanelTable| match m.dtype() {
                    GgmlDType::Q4_0 => t.q4_0,
                    GgmlDType::Q4_1 => t.q4_1,
                    _ => t.q8_0,
                };
                let sets = [set(table), set(&avx2::TABLE), set(&scalar::TABLE)];
                for t0 in [0, 3] {
                    compare_tile::<8>(name, m, &acts, t0, sets.map(|s| s.k8));
                }
                for t0 in [0, 2, 7] {
                    compare_tile::<4>(name, m, &acts, t0, sets.map(|s| s.k4));
                }
                for t0 in 0..n_tokens {
                    compare_tile::<1>(name, m, &acts, t0, sets.map(|s| s.k1));
                }
                for pairs in sets[0].pairs.iter().flatten() {
                    for tokens in [0..24, 3..19, 19..27, 1..25, 5..9, 2..14, 4..5] {
                        let tokens = tokens.start..tokens.end - tokens.len() % pairs.tokens;
                        compare_pairs(name, m, &acts, tokens, pairs.run, sets[1].k1);
                    }
                }
            }
        }
    }
}

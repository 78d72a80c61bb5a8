//! `y = x · Wᵀ` for a batch of activation rows, split over a [`ThreadPool`].
//!
//! - Quantized path: the activations are quantized once to the weights' dot type and
//!   every task dots a slice of weight rows against all tokens (own AVX2 kernels for
//!   Q4_0, Q4_1, Q8_0 — panels of 8 rows × 8, 4 or 1 tokens of integer dot products —
//!   and F32/F16; candle's `GgmlType::vec_dot` for the other formats).
//! - GEMM path: f32 GEMM over a dense copy of the weights, per row slice. It only pays
//!   for formats without panel kernels, from [`GEMM_MIN_TOKENS`] tokens up: the Q4_0,
//!   Q4_1 and Q8_0 kernels beat f32 GEMM at every batch size (see `benches/kernels.rs`).
//!
//! [`matmul_many`] runs several matrices that share one input (q/k/v, gate/up) in a single
//! dispatch, quantizing the input once.
//!
//! The panel kernels come from the process's kernel family (`super::dispatch`: AVX2,
//! VNNI or AMX, chosen once at run time); each matmul reads the resolved table once and
//! its tasks call through it. Where the family has pair kernels (AMX tiles, or 512-bit
//! VNNI in `avx512`) and the batch has
//! at least one run of the pair kernel's tokens (8 for AMX, 4 for VNNI), tasks own whole
//! pairs of panels and run them through those, the tokens left over through the
//! per-panel kernels.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::Range;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::GgmlType;

use super::KernelError;
use super::dispatch::{CpuKernels, FamilyKernels};
use super::gemm::DenseWeights;
use super::packed::{PANEL_ROWS, PanelFormat};
use super::pool::ThreadPool;
use super::qmatrix::{QMatrix, blocks, with_block_type};
use super::quant_dot::{PAIR_ROWS, PairKernel, PanelSet, Q8Acts, QK, fast};

/// Batches of at least this many tokens use f32 GEMM when the weights have a dense copy
/// and a format without panel kernels (measured on a 2-core Zen 3: K-quants cross over
/// at ~24 tokens, F32/F16 at ~64; see `benches/kernels.rs`).
pub const GEMM_MIN_TOKENS: usize = 32;

/// Whether batches of `n_tokens` of `dtype` weights are faster through f32 GEMM.
pub fn gemm_pays(dtype: GgmlDType, n_tokens: usize) -> bool {
    PanelFormat::of(dtype).is_none() && n_tokens >= GEMM_MIN_TOKENS
}

/// A weight matrix plus, optionally, a dense f32 copy of it for large batches.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: QMatrix,
    dense: Option<DenseWeights>,
}

impl Linear {
    /// Wraps `weight`. With `dense`, also keeps a dense f32 copy (4 bytes per weight) for
    /// batches of [`GEMM_MIN_TOKENS`] or more, if the format benefits from GEMM at all
    /// ([`gemm_pays`]): Q4_0, Q4_1 and Q8_0 never build one.
    pub fn new(weight: QMatrix, dense: bool) -> Self {
        let linear = Self {
            weight,
            dense: None,
        };
        if dense && gemm_pays(linear.weight.dtype(), usize::MAX) {
            linear.with_dense()
        } else {
            linear
        }
    }

    /// Adds the dense f32 copy whatever the format (for [`MatmulPath::Gemm`]).
    pub fn with_dense(mut self) -> Self {
        if self.dense.is_none() {
            self.dense = Some(DenseWeights::from_qmatrix(&self.weight));
        }
        self
    }

    /// The quantized weights.
    pub fn qmatrix(&self) -> &QMatrix {
        &self.weight
    }

    pub fn has_dense(&self) -> bool {
        self.dense.is_some()
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.weight.rows()
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.weight.cols()
    }
}

/// Which kernel family a matmul uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPath {
    /// GEMM where the weights have a dense copy and [`gemm_pays`], quantized dot
    /// products otherwise.
    #[default]
    Auto,
    /// Always the quantized dot products.
    Quantized,
    /// GEMM whenever the weights have a dense copy, whatever the batch size.
    Gemm,
}

/// `y[t, r] = Σ_c x[t, c] · W[r, c]`: `x` is `[n_tokens, cols]`, `y` is `[n_tokens, rows]`,
/// both row-major.
pub fn matmul(
    pool: &ThreadPool,
    w: &Linear,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    matmul_many_with(pool, &[w], x, n_tokens, &mut [y], MatmulPath::Auto)
}

/// [`matmul`] for several matrices with the same number of columns applied to the same
/// input, in one dispatch: `ys[i] = x · ws[i]ᵀ`.
pub fn matmul_many(
    pool: &ThreadPool,
    ws: &[&Linear],
    x: &[f32],
    n_tokens: usize,
    ys: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    matmul_many_with(pool, ws, x, n_tokens, ys, MatmulPath::Auto)
}

/// [`matmul_many`] with an explicit choice of kernels (benchmarks, tests).
pub fn matmul_many_with(
    pool: &ThreadPool,
    ws: &[&Linear],
    x: &[f32],
    n_tokens: usize,
    ys: &mut [&mut [f32]],
    path: MatmulPath,
) -> Result<(), KernelError> {
    check_shapes(ws, x, n_tokens, ys)?;
    if n_tokens == 0 || ws.is_empty() {
        return Ok(());
    }
    let kernels = super::dispatch::kernels()?;
    matmul_with_kernels(pool, ws, x, n_tokens, ys, path, kernels);
    Ok(())
}

/// [`matmul_many_with`] through a family's `kernels` (shapes checked, batch and matrices
/// non-empty).
fn matmul_with_kernels(
    pool: &ThreadPool,
    ws: &[&Linear],
    x: &[f32],
    n_tokens: usize,
    ys: &mut [&mut [f32]],
    path: MatmulPath,
    kernels: FamilyKernels,
) {
    let table = kernels.panels;
    let use_gemm = |w: &Linear| {
        w.dense.is_some()
            && match path {
                MatmulPath::Auto => gemm_pays(w.weight.dtype(), n_tokens),
                MatmulPath::Quantized => false,
                MatmulPath::Gemm => true,
            }
    };
    let panel_jobs = || {
        ws.iter()
            .filter(|w| !use_gemm(w) && w.weight.panel_format().is_some())
    };
    let needs_q8 = panel_jobs().next().is_some();
    let needs_wide = table.q8_0_wide && panel_jobs().any(|w| w.weight.dtype() == GgmlDType::Q8_0);
    with_q8_scratch(|acts| {
        if needs_q8 {
            acts.quantize(pool, x, n_tokens, ws[0].cols());
        }
        if needs_wide {
            acts.widen();
        }
        let acts = &*acts;
        let jobs: Vec<Job<'_>> = ws
            .iter()
            .zip(ys.iter_mut())
            .map(|(w, y)| {
                let out = SharedOut::new(y, w.rows(), n_tokens);
                let kind = match &w.dense {
                    Some(dense) if use_gemm(w) => JobKind::Dense(dense),
                    _ => JobKind::for_weight(&w.weight, kernels, acts, x, n_tokens),
                };
                let chunk = kind.chunk_rows(w.rows(), n_tokens, pool.n_threads(), ws.len());
                Job { kind, out, chunk }
            })
            .collect();
        let task_offsets: Vec<usize> = jobs
            .iter()
            .scan(0, |total, job| {
                let start = *total;
                *total += job.n_tasks();
                Some(start)
            })
            .collect();
        let n_tasks = jobs.iter().map(Job::n_tasks).sum();
        pool.run(n_tasks, |task| {
            let j = task_offsets.partition_point(|&start| start <= task) - 1;
            let job = &jobs[j];
            let start = (task - task_offsets[j]) * job.chunk;
            let rows = start..(start + job.chunk).min(job.out.rows);
            job.kind.compute(rows, x, n_tokens, &job.out);
        });
    });
}

fn check_shapes(
    ws: &[&Linear],
    x: &[f32],
    n_tokens: usize,
    ys: &[&mut [f32]],
) -> Result<(), KernelError> {
    super::check_len("matmul outputs", ws.len(), ys.len())?;
    let Some(first) = ws.first() else {
        return Ok(());
    };
    let cols = first.cols();
    let x_len = n_tokens
        .checked_mul(cols)
        .ok_or_else(|| KernelError::InvalidShape {
            what: "matmul input",
            detail: format!("{n_tokens} tokens × {cols} columns overflows"),
        })?;
    super::check_len("matmul input", x_len, x.len())?;
    for (w, y) in ws.iter().zip(ys) {
        if w.cols() != cols {
            return Err(KernelError::InvalidShape {
                what: "matmul_many weights",
                detail: format!("column counts differ ({} vs {cols})", w.cols()),
            });
        }
        super::check_len("matmul output", n_tokens * w.rows(), y.len())?;
    }
    Ok(())
}

/// Runs `body` with this thread's reusable activation buffer (a fresh one if it is
/// already in use, e.g. by a matmul inside a pool task).
fn with_q8_scratch<R>(body: impl FnOnce(&mut Q8Acts) -> R) -> R {
    thread_local! {
        static SCRATCH: RefCell<Q8Acts> = RefCell::new(Q8Acts::default());
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut acts) => body(&mut acts),
        Err(_) => body(&mut Q8Acts::default()),
    })
}

/// The output matrix `[n_tokens, rows]`, written concurrently by tasks that own
/// disjoint sets of rows.
pub(crate) struct SharedOut<'a> {
    ptr: *mut f32,
    rows: usize,
    n_tokens: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks only write through `SharedOut` to rows they own exclusively (each row
// range of a job is handed to exactly one task), so concurrent writes never alias; the
// buffer stays mutably borrowed for `'a`.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    fn new(y: &'a mut [f32], rows: usize, n_tokens: usize) -> Self {
        debug_assert_eq!(y.len(), rows * n_tokens);
        Self {
            ptr: y.as_mut_ptr(),
            rows,
            n_tokens,
            _borrow: PhantomData,
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Writes `out[t, r]`. The caller owns row `r` (no other thread writes it).
    #[inline(always)]
    fn set(&self, t: usize, r: usize, value: f32) {
        assert!(t < self.n_tokens && r < self.rows);
        // SAFETY: in bounds (checked above); row `r` is owned by the calling task, so the
        // write does not race (see the `Sync` impl).
        unsafe { self.ptr.add(t * self.rows + r).write(value) }
    }

    /// Writes `out[t, r..r + values.len()]`. The caller owns those rows.
    #[inline(always)]
    fn set_rows(&self, t: usize, r: usize, values: &[f32]) {
        assert!(t < self.n_tokens && r + values.len() <= self.rows);
        // SAFETY: in bounds (checked above); the rows are owned by the calling task, so
        // the writes do not race (see the `Sync` impl), and `values` cannot alias the
        // output, which stays mutably borrowed by `self`.
        unsafe {
            let dst = self.ptr.add(t * self.rows + r);
            std::ptr::copy_nonoverlapping(values.as_ptr(), dst, values.len());
        }
    }

    /// Pointer to `out[0, r]` for kernels that write a block of rows themselves; the
    /// caller owns the rows it writes through it.
    pub(crate) fn row_ptr(&self, r: usize) -> *mut f32 {
        assert!(r <= self.rows);
        self.ptr.wrapping_add(r)
    }
}

struct Job<'a> {
    kind: JobKind<'a>,
    out: SharedOut<'a>,
    chunk: usize,
}

impl Job<'_> {
    fn n_tasks(&self) -> usize {
        self.out.rows.div_ceil(self.chunk)
    }
}

type GenericRows<'a> = Box<dyn Fn(Range<usize>, &SharedOut) + Sync + 'a>;

enum JobKind<'a> {
    /// Q4_0, Q4_1 or Q8_0 panels through the family's kernels for that format.
    Panels(&'a QMatrix, &'a PanelFormat, &'a Q8Acts, &'static PanelSet),
    /// F32 or F16 weights through the family's row kernel for that format.
    Rows(&'a QMatrix, DenseRowsFn),
    Dense(&'a DenseWeights),
    Generic(GenericRows<'a>),
}

impl<'a> JobKind<'a> {
    fn for_weight(
        w: &'a QMatrix,
        kernels: FamilyKernels,
        acts: &'a Q8Acts,
        x: &'a [f32],
        n_tokens: usize,
    ) -> Self {
        let table = kernels.panels;
        match (w.dtype(), w.panel_format()) {
            (GgmlDType::Q4_0, Some(format)) => Self::Panels(w, format, acts, &table.q4_0),
            (GgmlDType::Q4_1, Some(format)) => Self::Panels(w, format, acts, &table.q4_1),
            (GgmlDType::Q8_0, Some(format)) => Self::Panels(w, format, acts, &table.q8_0),
            (GgmlDType::F32, _) => Self::Rows(w, kernels.dense.f32_rows),
            (GgmlDType::F16, _) => Self::Rows(w, kernels.dense.f16_rows),
            (dtype, _) => {
                with_block_type!(dtype, T => Self::Generic(generic_rows::<T>(w, x, n_tokens)))
            }
        }
    }

    /// Rows per task: enough tasks to balance the threads (several per thread, for a
    /// machine shared with other work), not so many that claiming dominates.
    fn chunk_rows(&self, rows: usize, n_tokens: usize, n_threads: usize, n_jobs: usize) -> usize {
        if let Self::Dense(dense) = self {
            return dense.preferred_chunk(n_threads);
        }
        let min_rows = if n_tokens == 1 { 32 } else { 8 };
        let target_tasks = (4 * n_threads).div_ceil(n_jobs).max(1);
        // Multiples of a panel, so no panel is split between tasks; of a pair of panels
        // where pair kernels run, so no task ends on a lone panel needlessly.
        let multiple = match self {
            Self::Panels(_, _, _, set) if pairs_for(set, n_tokens).next().is_some() => {
                2 * PANEL_ROWS
            }
            _ => PANEL_ROWS,
        };
        rows.div_ceil(target_tasks)
            .next_multiple_of(multiple)
            .max(min_rows)
    }

    fn compute(&self, rows: Range<usize>, x: &[f32], n_tokens: usize, out: &SharedOut) {
        match self {
            Self::Panels(w, format, acts, kernels) => {
                panel_rows(w, format, acts, rows, out, kernels)
            }
            Self::Rows(w, kernel) => kernel(w, x, n_tokens, rows, out),
            Self::Dense(dense) => dense.matmul_rows(x, n_tokens, rows, out),
            Self::Generic(body) => body(rows, out),
        }
    }
}

/// Walks `rows × tokens` in tiles of up to 4 rows × 4 tokens and stores each tile:
/// `tile(R, T)(row, t0)` must return the `[[f32; T]; R]` dot products.
macro_rules! for_each_tile {
    ($rows:expr, $n_tokens:expr, $out:expr, |$row:ident, $t0:ident, $R:ident, $T:ident| $tile:expr) => {{
        let rows: Range<usize> = $rows;
        let n_tokens: usize = $n_tokens;
        let out: &SharedOut = $out;
        macro_rules! store {
            ($r_const:literal, $t_const:literal, $row_v:expr, $t0_v:expr) => {{
                let $row: usize = $row_v;
                let $t0: usize = $t0_v;
                const $R: usize = $r_const;
                const $T: usize = $t_const;
                let tile: [[f32; $t_const]; $r_const] = $tile;
                for (dr, values) in tile.iter().enumerate() {
                    for (dt, &value) in values.iter().enumerate() {
                        out.set($t0 + dt, $row + dr, value);
                    }
                }
            }};
        }
        macro_rules! token_groups {
            ($r_const:literal, $row_v:expr) => {{
                let mut t0 = 0;
                while t0 + 4 <= n_tokens {
                    store!($r_const, 4, $row_v, t0);
                    t0 += 4;
                }
                match n_tokens - t0 {
                    3 => store!($r_const, 3, $row_v, t0),
                    2 => store!($r_const, 2, $row_v, t0),
                    1 => store!($r_const, 1, $row_v, t0),
                    _ => {}
                }
            }};
        }
        let mut row = rows.start;
        if n_tokens == 1 {
            while row + 4 <= rows.end {
                store!(4, 1, row, 0);
                row += 4;
            }
        } else {
            while row + 2 <= rows.end {
                token_groups!(2, row);
                row += 2;
            }
        }
        while row < rows.end {
            token_groups!(1, row);
            row += 1;
        }
    }};
}

/// Tokens per block of the panel loops: a block's quantized activations (cols bytes per
/// token) stay in L2 while the task's panels are swept over them.
const PANEL_TOKEN_BLOCK: usize = 64;

/// Tokens per block of the pair loops: each pair call repacks its two panels once, so
/// larger blocks repack less (the activations of 256 tokens, ≤ 400 KB for this model's
/// widest input, still sit in L2).
const PAIR_TOKEN_BLOCK: usize = 256;

/// The pair kernels of `set` a matmul of `n_tokens` uses, largest first (none: the
/// panels alone, single-token decode on families without 512-bit VNNI above all).
fn pairs_for(set: &PanelSet, n_tokens: usize) -> impl Iterator<Item = PairKernel> + '_ {
    set.pairs
        .iter()
        .flatten()
        .copied()
        .skip_while(move |pairs| n_tokens < pairs.from)
}

/// Panels of a panel-format matrix covering `rows` (which start on a panel boundary):
/// through the pair kernels when the family has them and the batch is large enough,
/// else one panel at a time.
fn panel_rows(
    w: &QMatrix,
    format: &PanelFormat,
    acts: &Q8Acts,
    rows: Range<usize>,
    out: &SharedOut,
    kernels: &PanelSet,
) {
    debug_assert_eq!(rows.start % PANEL_ROWS, 0);
    let n_tokens = acts.n_tokens();
    let paired = pairs_for(kernels, n_tokens).next().is_some();
    let block = if paired {
        PAIR_TOKEN_BLOCK
    } else {
        PANEL_TOKEN_BLOCK
    };
    for block_start in (0..n_tokens).step_by(block) {
        let tokens = block_start..(block_start + block).min(n_tokens);
        if paired {
            pair_block(w, format, acts, rows.clone(), tokens, out, kernels);
        } else {
            for first_row in rows.clone().step_by(PANEL_ROWS) {
                panel_block(
                    w,
                    format,
                    acts,
                    first_row,
                    rows.end,
                    tokens.clone(),
                    out,
                    kernels,
                );
            }
        }
    }
}

/// The panel starting at `first_row` (rows past `rows_end` are padding) × `tokens`: 8
/// tokens at a time, then 4, then one at a time.
#[allow(clippy::too_many_arguments)]
fn panel_block(
    w: &QMatrix,
    format: &PanelFormat,
    acts: &Q8Acts,
    first_row: usize,
    rows_end: usize,
    tokens: Range<usize>,
    out: &SharedOut,
    kernels: &PanelSet,
) {
    let panel_bytes = w.cols() / QK * format.panel_block;
    let panel = &w.storage()[first_row / PANEL_ROWS * panel_bytes..][..panel_bytes];
    let live_rows = PANEL_ROWS.min(rows_end - first_row);
    let store = |t0: usize, values: &[[f32; PANEL_ROWS]]| {
        for (dt, row_values) in values.iter().enumerate() {
            out.set_rows(t0 + dt, first_row, &row_values[..live_rows]);
        }
    };
    let mut t0 = tokens.start;
    while t0 + 8 <= tokens.end {
        store(t0, &(kernels.k8)(panel, format, acts, t0));
        t0 += 8;
    }
    if t0 + 4 <= tokens.end {
        store(t0, &(kernels.k4)(panel, format, acts, t0));
        t0 += 4;
    }
    for t in t0..tokens.end {
        store(t, &(kernels.k1)(panel, format, acts, t));
    }
}

/// Pairs of panels covering `rows` × `tokens` through the pair kernels the matmul uses,
/// each taking the largest multiple of its run of the tokens the one before left; the
/// rest of the tokens one panel at a time.
#[allow(clippy::too_many_arguments)]
fn pair_block(
    w: &QMatrix,
    format: &PanelFormat,
    acts: &Q8Acts,
    rows: Range<usize>,
    tokens: Range<usize>,
    out: &SharedOut,
    kernels: &PanelSet,
) {
    let mut runs: [Option<(PairKernel, Range<usize>)>; 2] = [None, None];
    let mut first_unpaired = tokens.start;
    for (run, pairs) in runs.iter_mut().zip(pairs_for(kernels, acts.n_tokens())) {
        let len = (tokens.end - first_unpaired) / pairs.tokens * pairs.tokens;
        if len > 0 {
            *run = Some((pairs, first_unpaired..first_unpaired + len));
            first_unpaired += len;
        }
    }
    let panel_bytes = w.cols() / QK * format.panel_block;
    let mut values = [[0f32; PAIR_ROWS]; PAIR_TOKEN_BLOCK];
    for first_row in rows.clone().step_by(PAIR_ROWS) {
        let live_panels = (rows.end - first_row).div_ceil(PANEL_ROWS).min(2);
        let first_panel = first_row / PANEL_ROWS;
        let panels = &w.storage()[first_panel * panel_bytes..][..live_panels * panel_bytes];
        let live_rows = PAIR_ROWS.min(rows.end - first_row);
        for (pairs, run) in runs.iter().flatten() {
            let values = &mut values[..run.len()];
            (pairs.run)(panels, live_panels, format, acts, run.clone(), values);
            for (t, row_values) in run.clone().zip(values.iter()) {
                out.set_rows(t, first_row, &row_values[..live_rows]);
            }
        }
        for panel_row in (first_row..rows.end).step_by(PANEL_ROWS).take(live_panels) {
            let rest = first_unpaired..tokens.end;
            panel_block(w, format, acts, panel_row, rows.end, rest, out, kernels);
        }
    }
}

/// Rows `rows` of F32 or F16 weights × all `n_tokens` tokens of `x` into `out`.
pub(crate) type DenseRowsFn = fn(&QMatrix, &[f32], usize, Range<usize>, &SharedOut);

/// A kernel family's row kernels for F32 and F16 weights.
pub(crate) struct DenseTable {
    pub(crate) f32_rows: DenseRowsFn,
    pub(crate) f16_rows: DenseRowsFn,
}

/// The build's own tiles: AVX2 on x86-64-v3, else scalar.
static DENSE_BASE: DenseTable = DenseTable { f32_rows, f16_rows };

/// The F32/F16 row kernels of `family`: AVX-512 tiles for `avx512` and `amx` (which only
/// exist where the CPU has AVX-512 F/BW/VL), the build's own for the others.
pub(crate) fn dense_table(family: CpuKernels) -> &'static DenseTable {
    match family {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        CpuKernels::Avx512 | CpuKernels::Amx => &avx512_rows::TABLE,
        _ => &DENSE_BASE,
    }
}

fn f32_rows(w: &QMatrix, x: &[f32], n_tokens: usize, rows: Range<usize>, out: &SharedOut) {
    let cols = w.cols();
    let weights: &[f32] = blocks::<f32>(w.storage());
    for_each_tile!(rows, n_tokens, out, |row, t0, R, T| {
        fast::f32_tile::<R, T>(&weights[row * cols..(row + R) * cols], x, cols, t0)
    });
}

fn f16_rows(w: &QMatrix, x: &[f32], n_tokens: usize, rows: Range<usize>, out: &SharedOut) {
    let cols = w.cols();
    for_each_tile!(rows, n_tokens, out, |row, t0, R, T| {
        fast::f16_tile::<R, T>(w.rows_bytes(row, row + R), x, cols, t0)
    });
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod avx512_rows {
    //! The row loops over the AVX-512 f32/f16 tiles (`quant_dot::avx512`). Only reachable
    //! through [`TABLE`], which `dense_table` hands out only to the `avx512` and `amx`
    //! families, which exist only where the CPU has AVX-512 F/BW/VL: what the `unsafe`
    //! calls below rely on.

    use std::ops::Range;

    use super::{DenseTable, SharedOut};
    use crate::kernels::qmatrix::{QMatrix, blocks};
    use crate::kernels::quant_dot::avx512;

    pub(super) static TABLE: DenseTable = DenseTable { f32_rows, f16_rows };

    fn f32_rows(w: &QMatrix, x: &[f32], n_tokens: usize, rows: Range<usize>, out: &SharedOut) {
        // SAFETY: reachable only through TABLE (see the module note).
        unsafe { f32_rows_avx512(w, x, n_tokens, rows, out) }
    }

    fn f16_rows(w: &QMatrix, x: &[f32], n_tokens: usize, rows: Range<usize>, out: &SharedOut) {
        // SAFETY: reachable only through TABLE (see the module note).
        unsafe { f16_rows_avx512(w, x, n_tokens, rows, out) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn f32_rows_avx512(
        w: &QMatrix,
        x: &[f32],
        n_tokens: usize,
        rows: Range<usize>,
        out: &SharedOut,
    ) {
        let cols = w.cols();
        let weights: &[f32] = blocks::<f32>(w.storage());
        for_each_tile!(rows, n_tokens, out, |row, t0, R, T| {
            avx512::f32_tile::<R, T>(&weights[row * cols..(row + R) * cols], x, cols, t0)
        });
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn f16_rows_avx512(
        w: &QMatrix,
        x: &[f32],
        n_tokens: usize,
        rows: Range<usize>,
        out: &SharedOut,
    ) {
        let cols = w.cols();
        for_each_tile!(rows, n_tokens, out, |row, t0, R, T| {
            avx512::f16_tile::<R, T>(w.rows_bytes(row, row + R), x, cols, t0)
        });
    }
}

/// Rows of any other format through candle's reference dot products: the activations
/// are quantized to `T::VecDotType` here (on the calling thread), then each task dots
/// its rows.
fn generic_rows<'a, T: GgmlType + 'a>(
    w: &'a QMatrix,
    x: &[f32],
    n_tokens: usize,
) -> GenericRows<'a> {
    let cols = w.cols();
    let blocks_per_row = cols / T::BLCK_SIZE;
    let mut acts = vec![T::VecDotType::zeros(); n_tokens * blocks_per_row];
    if blocks_per_row > 0 {
        for (dst, src) in acts
            .chunks_exact_mut(blocks_per_row)
            .zip(x.chunks_exact(cols))
        {
            T::VecDotType::from_float(src, dst);
        }
    }
    Box::new(move |rows: Range<usize>, out: &SharedOut| {
        for r in rows {
            let weights = blocks::<T>(w.rows_bytes(r, r + 1));
            for t in 0..n_tokens {
                let value = if blocks_per_row == 0 {
                    0.0
                } else {
                    T::vec_dot(
                        cols,
                        weights,
                        &acts[t * blocks_per_row..(t + 1) * blocks_per_row],
                    )
                };
                out.set(t, r, value);
            }
        }
    })
}

/// Compile-time check that the 32-wide kernels and the block size agree.
const _: () = assert!(QK == candle_core::quantized::k_quants::QK8_0);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant_dot::scalar;

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

    /// Every kernel family this CPU has, through the whole matmul (task split, pairs of
    /// panels and the tokens left over, ragged last panels), bit for bit against `avx2`.
    #[test]
    fn every_family_matmul_matches_avx2() {
        use crate::kernels::CpuKernels;
        let pool = ThreadPool::new(2).unwrap();
        let Some(reference) = CpuKernels::Avx2.kernels() else {
            eprintln!("notice: no avx2 family in this build");
            return;
        };
        for family in CpuKernels::ALL.into_iter().filter(|f| !f.available()) {
            eprintln!("notice: kernel family {family} is not available here");
        }
        let cols = 160;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for rows in [13, 40, 72] {
                let values = pseudo_random(rows * cols, rows as u32 + 3);
                let w = Linear::new(
                    QMatrix::from_f32(dtype, rows, cols, &values).unwrap(),
                    false,
                );
                for n_tokens in [1, 4, 7, 8, 12, 16, 20, 27, 64, 83, 300] {
                    let x = pseudo_random(n_tokens * cols, 200 + n_tokens as u32);
                    let run = |kernels| {
                        let mut y = vec![f32::NAN; n_tokens * rows];
                        let path = MatmulPath::Auto;
                        matmul_with_kernels(
                            &pool,
                            &[&w],
                            &x,
                            n_tokens,
                            &mut [&mut y],
                            path,
                            kernels,
                        );
                        y
                    };
                    let want = run(reference);
                    for family in CpuKernels::supported() {
                        let got = run(family.kernels().unwrap());
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                e.to_bits(),
                                "{family} {dtype:?} rows {rows}, {n_tokens} tokens, [{}, {}]: {g} vs {e}",
                                i / rows,
                                i % rows
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every kernel family's F32/F16 row kernels through the whole matmul (all tile
    /// shapes, ragged rows, columns not a multiple of 16), against an f64 reference
    /// within the dot-product bound n·ε·Σ|w·x|, and against `avx2` within twice that.
    #[test]
    fn every_family_f32_f16_rows_within_tolerance() {
        use crate::kernels::CpuKernels;
        let pool = ThreadPool::new(2).unwrap();
        for dtype in [GgmlDType::F32, GgmlDType::F16] {
            for (rows, cols) in [(7, 100), (13, 576), (5, 1000)] {
                let values = pseudo_random(rows * cols, cols as u32);
                let w = QMatrix::from_f32(dtype, rows, cols, &values).unwrap();
                let exact_w = w.dequantize();
                let w = Linear::new(w, false);
                for n_tokens in [1, 2, 3, 5, 9] {
                    let x = pseudo_random(n_tokens * cols, 300 + n_tokens as u32);
                    let bound = |t: usize, r: usize| {
                        let (wr, xt) = (&exact_w[r * cols..][..cols], &x[t * cols..][..cols]);
                        let exact: f64 =
                            wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = wr
                            .iter()
                            .zip(xt)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        (exact, cols as f64 * f32::EPSILON as f64 * mag)
                    };
                    let mut avx2 = None;
                    for family in CpuKernels::ALL.into_iter().filter(|f| f.available()) {
                        let mut y = vec![f32::NAN; n_tokens * rows];
                        let kernels = family.kernels().unwrap();
                        let path = MatmulPath::Quantized;
                        matmul_with_kernels(
                            &pool,
                            &[&w],
                            &x,
                            n_tokens,
                            &mut [&mut y],
                            path,
                            kernels,
                        );
                        for (i, &got) in y.iter().enumerate() {
                            let (exact, tol) = bound(i / rows, i % rows);
                            assert!(
                                (got as f64 - exact).abs() <= tol,
                                "{family} {dtype:?} [{rows}, {cols}] {n_tokens} tokens, {i}: {got} vs exact {exact} (tolerance {tol})"
                            );
                        }
                        if family == CpuKernels::Avx2 {
                            avx2 = Some(y);
                        } else if let Some(avx2) = &avx2 {
                            for (i, (&got, &want)) in y.iter().zip(avx2).enumerate() {
                                let (_, tol) = bound(i / rows, i % rows);
                                let diff = (got as f64 - want as f64).abs();
                                assert!(diff <= 2.0 * tol, "{family} vs avx2: {got} vs {want}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The tiling of `panel_rows` (8, 4 and 1 tokens; ragged last panels) against the
    /// scalar kernels one token at a time.
    #[test]
    fn panel_tiles_match_scalar_for_every_token_count() {
        let pool = ThreadPool::new(2).unwrap();
        let cols = 96;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for rows in [5, 8, 21] {
                let values = pseudo_random(rows * cols, rows as u32);
                let w = Linear::new(
                    QMatrix::from_f32(dtype, rows, cols, &values).unwrap(),
                    false,
                );
                let format = *w.qmatrix().panel_format().unwrap();
                let panel_bytes = cols / QK * format.panel_block;
                for n_tokens in 1..=9 {
                    let x = pseudo_random(n_tokens * cols, 100 + n_tokens as u32);
                    let mut y = vec![f32::NAN; n_tokens * rows];
                    matmul(&pool, &w, &x, n_tokens, &mut y).unwrap();
                    let mut acts = Q8Acts::default();
                    acts.quantize(&pool, &x, n_tokens, cols);
                    let panels = w.qmatrix().storage().chunks_exact(panel_bytes);
                    for (p, panel) in panels.enumerate() {
                        for t in 0..n_tokens {
                            let [expected] = match dtype {
                                GgmlDType::Q4_0 => {
                                    scalar::q4_panel::<false, 1>(panel, &format, &acts, t)
                                }
                                GgmlDType::Q4_1 => {
                                    scalar::q4_panel::<true, 1>(panel, &format, &acts, t)
                                }
                                _ => scalar::q8_0_panel::<1>(panel, &format, &acts, t),
                            };
                            for (k, e) in expected.iter().enumerate().take(rows - p * PANEL_ROWS) {
                                let got = y[t * rows + p * PANEL_ROWS + k];
                                assert!(
                                    (got - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                    "{dtype:?} rows {rows}, {n_tokens} tokens, t {t}: {got} vs {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

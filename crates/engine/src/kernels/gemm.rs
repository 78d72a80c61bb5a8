//! f32 GEMM over a dense (dequantized) copy of a weight matrix: the large-batch path for
//! formats without panel kernels (K-quants, F16, F32…).
//!
//! Each pool task multiplies all tokens by one slice of weight rows with the `gemm`
//! crate, single-threaded, writing its own columns of the output.

use std::ops::Range;

use super::aligned::AlignedF32;
use super::matmul::SharedOut;
use super::qmatrix::QMatrix;

/// A weight matrix `[rows, cols]` as row-major f32.
#[derive(Clone)]
pub(crate) struct DenseWeights {
    data: AlignedF32,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for DenseWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DenseWeights [{}, {}]", self.rows, self.cols)
    }
}

impl DenseWeights {
    pub(crate) fn from_qmatrix(w: &QMatrix) -> Self {
        let mut data = AlignedF32::zeroed(w.rows() * w.cols());
        w.dequantize_into(data.as_mut_slice());
        Self {
            data,
            rows: w.rows(),
            cols: w.cols(),
        }
    }

    /// Rows per task: one slice per thread, since every `gemm` call packs all of `x`.
    pub(crate) fn preferred_chunk(&self, n_threads: usize) -> usize {
        self.rows.div_ceil(n_threads).next_multiple_of(16).max(16)
    }

    /// `out[t, r] = Σ_c x[t, c] · W[r, c]` for `r` in `rows`, every token.
    ///
    /// The caller guarantees `x.len() == n_tokens * cols`, `rows.end <= self.rows`, that
    /// `out` is `[n_tokens, self.rows]`, and that no other thread writes these rows of it.
    pub(crate) fn matmul_rows(
        &self,
        x: &[f32],
        n_tokens: usize,
        rows: Range<usize>,
        out: &SharedOut,
    ) {
        assert!(x.len() == n_tokens * self.cols && rows.end <= self.rows && rows.start <= rows.end);
        assert!(out.rows() == self.rows && out.n_tokens() == n_tokens);
        if rows.is_empty() || n_tokens == 0 {
            return;
        }
        let weights = &self.data.as_slice()[rows.start * self.cols..rows.end * self.cols];
        let cols = self.cols as isize;
        // SAFETY: dst is `out` offset to column `rows.start`: n_tokens rows of
        // `rows.len()` columns with row stride `out.rows()`, all inside `out` and owned by
        // this task (caller guarantee). lhs is x as [n_tokens, cols] (checked above);
        // rhs is the weight slice read as [cols, rows.len()] with column stride `cols`,
        // inside `weights`.
        unsafe {
            ::gemm::gemm(
                n_tokens,
                rows.len(),
                self.cols,
                out.row_ptr(rows.start),
                1,
                self.rows as isize,
                false,
                x.as_ptr(),
                1,
                cols,
                weights.as_ptr(),
                cols,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                ::gemm::Parallelism::None,
            );
        }
    }
}

//! Element-wise and row-wise operations of the forward pass: RMS norm, SiLU(gate)·up,
//! softmax, dot/axpy, argmax and rotary position embeddings.
//!
//! All run on the calling thread; the AVX2 versions are used when the target enables
//! them. Functions that take a whole activation tensor check its shape and return a
//! [`KernelError`]; the per-row primitives used inside attention (`dot`, `axpy`)
//! document their length contract instead.

use super::{KernelError, check_len};

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
use avx2 as fast;
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
use scalar as fast;

/// RMS-normalises each row of `x` (rows of `weight.len()` values) and scales it by
/// `weight`: `out = x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm_rows(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_rows("rms_norm input", x.len(), weight.len())?;
    check_len("rms_norm output", x.len(), out.len())?;
    for (row, out_row) in x
        .chunks_exact(weight.len())
        .zip(out.chunks_exact_mut(weight.len()))
    {
        let inv_rms = 1.0 / (fast::sum_squares(row) / row.len() as f32 + eps).sqrt();
        fast::scale_mul(row, weight, inv_rms, out_row);
    }
    Ok(())
}

/// [`rms_norm_rows`] in place.
pub fn rms_norm_rows_inplace(x: &mut [f32], weight: &[f32], eps: f32) -> Result<(), KernelError> {
    check_rows("rms_norm input", x.len(), weight.len())?;
    for row in x.chunks_exact_mut(weight.len()) {
        let inv_rms = 1.0 / (fast::sum_squares(row) / row.len() as f32 + eps).sqrt();
        fast::scale_mul_inplace(row, weight, inv_rms);
    }
    Ok(())
}

/// `out = SiLU(gate) · up` element-wise, with `SiLU(g) = g / (1 + e^-g)`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    check_len("silu_mul up", gate.len(), up.len())?;
    check_len("silu_mul output", gate.len(), out.len())?;
    fast::silu_mul(gate, up, out);
    Ok(())
}

/// `gate = SiLU(gate) · up` element-wise.
pub fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) -> Result<(), KernelError> {
    check_len("silu_mul up", gate.len(), up.len())?;
    fast::silu_mul_inplace(gate, up);
    Ok(())
}

/// Replaces `x` by `softmax(x)` (in place). An empty slice is left as is; entries of `-inf` become 0
/// (a row of only `-inf` becomes all zeros).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.fill(0.0);
        return;
    }
    let sum = fast::exp_sub_inplace(x, max);
    let inv = 1.0 / sum;
    fast::scale_inplace(x, inv);
}

/// Σ a·b. `a` and `b` should have the same length (debug-asserted); extra elements of
/// the longer one are ignored.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    fast::dot(&a[..n], &b[..n])
}

/// `y += alpha · x`. `x` and `y` should have the same length (debug-asserted); extra
/// elements of the longer one are ignored.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    let n = x.len().min(y.len());
    fast::axpy(alpha, &x[..n], &mut y[..n]);
}

/// `y += x` element-wise (residual connections).
pub fn add_assign(y: &mut [f32], x: &[f32]) -> Result<(), KernelError> {
    check_len("add_assign", y.len(), x.len())?;
    fast::axpy(1.0, x, y);
    Ok(())
}

/// `x *= alpha` element-wise.
pub fn scale_inplace(x: &mut [f32], alpha: f32) {
    fast::scale_inplace(x, alpha);
}

/// Index of the largest value (the first one on ties; NaN is skipped, an all-NaN row
/// gives 0), or `None` for an empty slice.
pub fn argmax(row: &[f32]) -> Option<usize> {
    fast::argmax(row)
}

/// Precomputed cos/sin of rotary position embeddings for positions `0..max_positions`.
#[derive(Clone, Debug)]
pub struct RopeTable {
    head_dim: usize,
    max_positions: usize,
    /// `[max_positions, head_dim / 2]`
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Frequencies `theta^(-2i / head_dim)` for `i < head_dim / 2` (`head_dim` even).
    pub fn new(head_dim: usize, theta: f32, max_positions: usize) -> Result<Self, KernelError> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(KernelError::InvalidShape {
                what: "RopeTable",
                detail: format!("head_dim {head_dim} must be even and positive"),
            });
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| f64::from(theta).powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            head_dim,
            max_positions,
            cos,
            sin,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates `x` (`[positions.len(), n_heads, head_dim]`) in the NeoX/Llama-HF layout:
    /// element `i` pairs with `i + head_dim/2`.
    pub fn apply_neox(
        &self,
        x: &mut [f32],
        positions: &[usize],
        n_heads: usize,
    ) -> Result<(), KernelError> {
        self.check(x, positions, n_heads)?;
        let half = self.head_dim / 2;
        for (token, &pos) in x.chunks_exact_mut(n_heads * self.head_dim).zip(positions) {
            let (cos, sin) = self.angles(pos);
            for head in token.chunks_exact_mut(self.head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                fast::rotate_halves(lo, hi, cos, sin);
            }
        }
        Ok(())
    }

    /// Rotates `x` in the interleaved (GPT-J / GGUF-Llama) layout: element `2i` pairs
    /// with `2i + 1`.
    pub fn apply_interleaved(
        &self,
        x: &mut [f32],
        positions: &[usize],
        n_heads: usize,
    ) -> Result<(), KernelError> {
        self.check(x, positions, n_heads)?;
        for (token, &pos) in x.chunks_exact_mut(n_heads * self.head_dim).zip(positions) {
            let (cos, sin) = self.angles(pos);
            for head in token.chunks_exact_mut(self.head_dim) {
                for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        }
        Ok(())
    }

    fn angles(&self, pos: usize) -> (&[f32], &[f32]) {
        let half = self.head_dim / 2;
        (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        )
    }

    fn check(&self, x: &[f32], positions: &[usize], n_heads: usize) -> Result<(), KernelError> {
        check_len(
            "rope input",
            positions.len() * n_heads * self.head_dim,
            x.len(),
        )?;
        if let Some(&pos) = positions.iter().find(|&&p| p >= self.max_positions) {
            return Err(KernelError::InvalidShape {
                what: "rope positions",
                detail: format!("position {pos} >= table size {}", self.max_positions),
            });
        }
        Ok(())
    }
}

fn check_rows(what: &'static str, len: usize, row: usize) -> Result<(), KernelError> {
    if row == 0 || !len.is_multiple_of(row) {
        return Err(KernelError::InvalidShape {
            what,
            detail: format!("length {len} is not a whole number of rows of {row}"),
        });
    }
    Ok(())
}

/// Portable versions: the only ones without AVX2, tails and references otherwise.
#[allow(dead_code)]
mod scalar {
    pub(super) fn argmax(row: &[f32]) -> Option<usize> {
        let mut best: Option<(usize, f32)> = None;
        for (i, &v) in row.iter().enumerate() {
            if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
                best = Some((i, v));
            }
        }
        match best {
            Some((i, _)) => Some(i),
            None if row.is_empty() => None,
            None => Some(0),
        }
    }

    pub(super) fn sum_squares(x: &[f32]) -> f32 {
        x.iter().map(|v| v * v).sum()
    }

    pub(super) fn scale_mul(x: &[f32], w: &[f32], s: f32, out: &mut [f32]) {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
            *o = v * s * g;
        }
    }

    pub(super) fn scale_mul_inplace(x: &mut [f32], w: &[f32], s: f32) {
        for (v, &g) in x.iter_mut().zip(w) {
            *v = *v * s * g;
        }
    }

    fn silu(g: f32) -> f32 {
        g / (1.0 + (-g).exp())
    }

    pub(super) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(g) * u;
        }
    }

    pub(super) fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = silu(*g) * u;
        }
    }

    /// x = e^(x - max); returns the sum.
    pub(super) fn exp_sub_inplace(x: &mut [f32], max: f32) -> f32 {
        let mut sum = 0.0;
        for v in x.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        sum
    }

    pub(super) fn scale_inplace(x: &mut [f32], s: f32) {
        x.iter_mut().for_each(|v| *v *= s);
    }

    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    pub(super) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += alpha * v;
        }
    }

    pub(super) fn rotate_halves(lo: &mut [f32], hi: &mut [f32], cos: &[f32], sin: &[f32]) {
        for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
            let (x0, x1) = (*a, *b);
            *a = x0 * c - x1 * s;
            *b = x0 * s + x1 * c;
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod avx2 {
    use std::arch::x86_64::*;

    use super::scalar;
    use crate::kernels::simd::avx2::{exp, hmax, hsum};

    /// Safe entry points: this module is only compiled when the target enables AVX2, FMA
    /// and F16C, which is what the `_avx2` functions require.
    macro_rules! safe_entry_points {
        ($(fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $imp:ident;)*) => {
            $(
                #[inline(always)]
                pub(super) fn $name($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: the target enables avx2, fma and f16c (module cfg).
                    unsafe { $imp($($arg),*) }
                }
            )*
        };
    }

    safe_entry_points! {
        fn sum_squares(x: &[f32]) -> f32 => sum_squares_avx2;
        fn scale_mul(x: &[f32], w: &[f32], s: f32, out: &mut [f32]) => scale_mul_avx2;
        fn scale_mul_inplace(x: &mut [f32], w: &[f32], s: f32) => scale_mul_inplace_avx2;
        fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) => silu_mul_avx2;
        fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) => silu_mul_inplace_avx2;
        fn exp_sub_inplace(x: &mut [f32], max: f32) -> f32 => exp_sub_inplace_avx2;
        fn scale_inplace(x: &mut [f32], s: f32) => scale_inplace_avx2;
        fn dot(a: &[f32], b: &[f32]) -> f32 => dot_avx2;
        fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) => axpy_avx2;
        fn rotate_halves(lo: &mut [f32], hi: &mut [f32], cos: &[f32], sin: &[f32]) => rotate_halves_avx2;
        fn argmax(row: &[f32]) -> Option<usize> => argmax_avx2;
    }

    /// [`scalar::argmax`] in two passes: the largest value (`maxps` keeps its second
    /// operand, the running maximum, where the row holds NaN), then the first index
    /// holding a value equal to it — where the scalar loop ends, since it moves only on
    /// a strictly larger value. A row whose maximum is -inf (or all NaN) goes to the
    /// scalar loop, which tells those cases apart.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn argmax_avx2(row: &[f32]) -> Option<usize> {
        let body = body_len(row.len());
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..body).step_by(8) {
            acc = _mm256_max_ps(load(row, i), acc);
        }
        let mut max = hmax(acc);
        for &v in &row[body..] {
            if v > max {
                max = v;
            }
        }
        if max == f32::NEG_INFINITY {
            return scalar::argmax(row);
        }
        let wanted = _mm256_set1_ps(max);
        for i in (0..body).step_by(8) {
            let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(load(row, i), wanted));
            if hits != 0 {
                return Some(i + hits.trailing_zeros() as usize);
            }
        }
        row[body..].iter().position(|&v| v == max).map(|j| body + j)
    }

    /// Splits `len` into the part handled 8 lanes at a time and the scalar tail start.
    #[inline(always)]
    fn body_len(len: usize) -> usize {
        len / 8 * 8
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load(x: &[f32], i: usize) -> __m256 {
        assert!(i + 8 <= x.len());
        // SAFETY: bounds checked above.
        unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn store(x: &mut [f32], i: usize, v: __m256) {
        assert!(i + 8 <= x.len());
        // SAFETY: bounds checked above.
        unsafe { _mm256_storeu_ps(x.as_mut_ptr().add(i), v) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn sum_squares_avx2(x: &[f32]) -> f32 {
        let n = body_len(x.len());
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            let v = load(x, i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        hsum(acc) + scalar::sum_squares(&x[n..])
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn scale_mul_avx2(x: &[f32], w: &[f32], s: f32, out: &mut [f32]) {
        let n = body_len(x.len().min(w.len()).min(out.len()));
        let sv = _mm256_set1_ps(s);
        for i in (0..n).step_by(8) {
            store(
                out,
                i,
                _mm256_mul_ps(_mm256_mul_ps(load(x, i), sv), load(w, i)),
            );
        }
        scalar::scale_mul(&x[n..], &w[n..], s, &mut out[n..]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn scale_mul_inplace_avx2(x: &mut [f32], w: &[f32], s: f32) {
        let n = body_len(x.len().min(w.len()));
        let sv = _mm256_set1_ps(s);
        for i in (0..n).step_by(8) {
            let v = _mm256_mul_ps(_mm256_mul_ps(load(x, i), sv), load(w, i));
            store(x, i, v);
        }
        scalar::scale_mul_inplace(&mut x[n..], &w[n..], s);
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn silu_mul8(g: __m256, u: __m256) -> __m256 {
        let neg = _mm256_sub_ps(_mm256_setzero_ps(), g);
        let denom = _mm256_add_ps(_mm256_set1_ps(1.0), exp(neg));
        _mm256_mul_ps(_mm256_div_ps(g, denom), u)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = body_len(gate.len().min(up.len()).min(out.len()));
        for i in (0..n).step_by(8) {
            store(out, i, silu_mul8(load(gate, i), load(up, i)));
        }
        scalar::silu_mul(&gate[n..], &up[n..], &mut out[n..]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn silu_mul_inplace_avx2(gate: &mut [f32], up: &[f32]) {
        let n = body_len(gate.len().min(up.len()));
        for i in (0..n).step_by(8) {
            let v = silu_mul8(load(gate, i), load(up, i));
            store(gate, i, v);
        }
        scalar::silu_mul_inplace(&mut gate[n..], &up[n..]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp_sub_inplace_avx2(x: &mut [f32], max: f32) -> f32 {
        let n = body_len(x.len());
        let mv = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            let e = exp(_mm256_sub_ps(load(x, i), mv));
            acc = _mm256_add_ps(acc, e);
            store(x, i, e);
        }
        hsum(acc) + scalar::exp_sub_inplace(&mut x[n..], max)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn scale_inplace_avx2(x: &mut [f32], s: f32) {
        let n = body_len(x.len());
        let sv = _mm256_set1_ps(s);
        for i in (0..n).step_by(8) {
            let v = _mm256_mul_ps(load(x, i), sv);
            store(x, i, v);
        }
        scalar::scale_inplace(&mut x[n..], s);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n16 = a.len().min(b.len()) / 16 * 16;
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..n16).step_by(16) {
            acc0 = _mm256_fmadd_ps(load(a, i), load(b, i), acc0);
            acc1 = _mm256_fmadd_ps(load(a, i + 8), load(b, i + 8), acc1);
        }
        let mut n = n16;
        if n + 8 <= a.len().min(b.len()) {
            acc0 = _mm256_fmadd_ps(load(a, n), load(b, n), acc0);
            n += 8;
        }
        hsum(_mm256_add_ps(acc0, acc1)) + scalar::dot(&a[n..], &b[n..])
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn axpy_avx2(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = body_len(x.len().min(y.len()));
        let av = _mm256_set1_ps(alpha);
        for i in (0..n).step_by(8) {
            let v = _mm256_fmadd_ps(av, load(x, i), load(y, i));
            store(y, i, v);
        }
        scalar::axpy(alpha, &x[n..], &mut y[n..]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn rotate_halves_avx2(lo: &mut [f32], hi: &mut [f32], cos: &[f32], sin: &[f32]) {
        let n = body_len(lo.len().min(hi.len()).min(cos.len()).min(sin.len()));
        for i in (0..n).step_by(8) {
            let (a, b, c, s) = (load(lo, i), load(hi, i), load(cos, i), load(sin, i));
            store(lo, i, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
            store(hi, i, _mm256_fmadd_ps(a, s, _mm256_mul_ps(b, c)));
        }
        scalar::rotate_halves(&mut lo[n..], &mut hi[n..], &cos[n..], &sin[n..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised argmax picks the scalar loop's index on rows with ties, NaN,
    /// signed zeros, infinities and every tail length.
    #[test]
    fn argmax_matches_the_scalar_loop() {
        let mut state = 12345u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let specials = [f32::NAN, -0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY, 3.0];
        for len in 0..70 {
            for _ in 0..40 {
                let row: Vec<f32> = (0..len)
                    .map(|_| match next() % 10 {
                        0 => specials[(next() % 6) as usize],
                        // Few distinct values, so that ties are common.
                        _ => (next() % 7) as f32 - 3.0,
                    })
                    .collect();
                assert_eq!(argmax(&row), scalar::argmax(&row), "{row:?}");
            }
        }
        for row in [
            vec![f32::NAN; 19],
            vec![f32::NEG_INFINITY; 17],
            [vec![f32::NAN; 9], vec![f32::NEG_INFINITY; 9]].concat(),
            [vec![-0.0; 12], vec![0.0; 12]].concat(),
        ] {
            assert_eq!(argmax(&row), scalar::argmax(&row), "{row:?}");
        }
    }
}

//! The two inner loops of attention: scoring a query against a run of keys, and the
//! probability-weighted sum of values. Each result depends only on its own inputs, in a
//! fixed order, however many keys are processed together: batching must not change a
//! sequence's numbers.

/// `scores[j] = scale · (q · keys[j])` for the `scores.len()` keys stored back to back
/// in `keys` (`[j][d]`, `d = q.len()`).
pub fn scores(q: &[f32], keys: &[f32], scale: f32, scores: &mut [f32]) {
    let d = q.len();
    assert!(keys.len() >= scores.len() * d, "scores: too few keys");
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if d.is_multiple_of(8) {
        // SAFETY: AVX2/FMA are enabled at compile time; lengths checked above.
        unsafe { avx2::scores(q, keys, scale, scores) };
        return;
    }
    for (score, key) in scores.iter_mut().zip(keys.chunks_exact(d)) {
        *score = scale * super::ops::dot(q, key);
    }
}

/// `out = Σ_j probs[j] · values[j]` over the `probs.len()` values stored back to back
/// (`[j][d]`, `d = out.len()`), accumulated in order of `j`.
pub fn weighted_sum(probs: &[f32], values: &[f32], out: &mut [f32]) {
    let d = out.len();
    assert!(
        values.len() >= probs.len() * d,
        "weighted_sum: too few values"
    );
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if d.is_multiple_of(64) {
        // SAFETY: AVX2/FMA are enabled at compile time; lengths checked above.
        unsafe { avx2::weighted_sum(probs, values, out) };
        return;
    }
    out.fill(0.0);
    for (&p, value) in probs.iter().zip(values.chunks_exact(d)) {
        super::ops::axpy(p, value, out);
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes, in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One key's dot product: lanes accumulate along `d` in steps of 8, then `hsum`.
    /// Four keys at a time run the very same per-key sequence, interleaved for ILP.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        let d = q.len();
        let qp = q.as_ptr();
        let kp = keys.as_ptr();
        let n = out.len();
        let mut j = 0;
        while j + 4 <= n {
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in (0..d).step_by(8) {
                // SAFETY: c + 8 <= d and (j + 3) * d + d <= keys.len() (caller-checked).
                unsafe {
                    let qv = _mm256_loadu_ps(qp.add(c));
                    for (k, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add((j + k) * d + c)), *a);
                    }
                }
            }
            for (k, a) in acc.iter().enumerate() {
                out[j + k] = scale * hsum(*a);
            }
            j += 4;
        }
        while j < n {
            let mut a = _mm256_setzero_ps();
            for c in (0..d).step_by(8) {
                // SAFETY: as above, for one key.
                unsafe {
                    a = _mm256_fmadd_ps(
                        _mm256_loadu_ps(qp.add(c)),
                        _mm256_loadu_ps(kp.add(j * d + c)),
                        a,
                    );
                }
            }
            out[j] = scale * hsum(a);
            j += 1;
        }
    }

    /// 64 output columns at a time held in 8 registers while every value row streams by.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(probs: &[f32], values: &[f32], out: &mut [f32]) {
        let d = out.len();
        let vp = values.as_ptr();
        for slab in (0..d).step_by(64) {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, &p) in probs.iter().enumerate() {
                let pv = _mm256_set1_ps(p);
                for (k, a) in acc.iter_mut().enumerate() {
                    // SAFETY: j * d + slab + 8k + 8 <= probs.len() * d <= values.len().
                    *a = unsafe {
                        _mm256_fmadd_ps(pv, _mm256_loadu_ps(vp.add(j * d + slab + 8 * k)), *a)
                    };
                }
            }
            for (k, a) in acc.iter().enumerate() {
                // SAFETY: slab + 8k + 8 <= d = out.len().
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(slab + 8 * k), *a) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32 * 2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn scores_match_a_plain_dot_and_do_not_depend_on_grouping() {
        let d = 64;
        let q = data(d, 1);
        let keys = data(d * 11, 2);
        let mut all = vec![0.0; 11];
        scores(&q, &keys, 0.125, &mut all);
        for (j, s) in all.iter().enumerate() {
            let plain: f32 = q
                .iter()
                .zip(&keys[j * d..(j + 1) * d])
                .map(|(a, b)| a * b)
                .sum();
            assert!((s - 0.125 * plain).abs() < 1e-4, "key {j}");
            // The same key scored alone gives the identical bits.
            let mut one = [0.0];
            scores(&q, &keys[j * d..(j + 1) * d], 0.125, &mut one);
            assert_eq!(one[0].to_bits(), s.to_bits(), "key {j}");
        }
    }

    #[test]
    fn weighted_sum_matches_a_plain_sum() {
        for d in [64, 128, 12] {
            let probs = data(9, 3);
            let values = data(9 * d, 4);
            let mut out = vec![7.0; d];
            weighted_sum(&probs, &values, &mut out);
            for c in 0..d {
                let plain: f32 = (0..9).map(|j| probs[j] * values[j * d + c]).sum();
                assert!((out[c] - plain).abs() < 1e-4, "d {d}, column {c}");
            }
        }
    }
}

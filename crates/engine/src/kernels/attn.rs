//! The two inner loops of attention: scoring a query against a run of keys, and the
//! probability-weighted sum of values. Each result depends only on its own inputs, in a
//! fixed order, however many keys are processed together: batching must not change a
//! sequence's numbers.
//!
//! Keys and values come as f32 rows, or (`*_in_place`) as the KV store's own f16/f32
//! slots of one block, converted in registers: a decode step reads its keys and values
//! where they lie instead of copying them out first. f16 → f32 is exact and the
//! operations are the same in the same order, so both give the same bits; a run of
//! blocks through [`weighted_sum_add_in_place`] equals one [`weighted_sum`] over them.

use half::f16;

use crate::kv::KvSlots;

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

/// Whether the `*_in_place` kernels serve heads of dimension `d` on this build.
pub fn reads_in_place(d: usize) -> bool {
    cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )) && d.is_multiple_of(64)
}

/// [`scores`] against one block's key slots as the KV store holds them
/// (`scores.len()` keys of `q.len()` values). Only where [`reads_in_place`].
pub fn scores_in_place(q: &[f32], keys: KvSlots<'_>, scale: f32, scores: &mut [f32]) {
    let d = q.len();
    assert!(
        reads_in_place(d),
        "scores_in_place: unsupported head dim {d}"
    );
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        assert!(keys.len() >= scores.len() * d, "scores: too few keys");
        // SAFETY: AVX2/FMA/F16C are enabled at compile time; lengths checked above.
        match keys {
            KvSlots::F32(keys) => unsafe { avx2::scores_of::<f32>(q, keys, scale, scores) },
            KvSlots::F16(keys) => unsafe { avx2::scores_of::<f16>(q, keys, scale, scores) },
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        let _ = (keys, scale, scores);
        unreachable!("reads_in_place is false on this build")
    }
}

/// `out += Σ_j probs[j] · values[j]` over one block's value slots as the KV store holds
/// them, accumulated in order of `j` onto what `out` holds: starting from zeros and
/// running the blocks in order gives [`weighted_sum`]'s bits. Only where
/// [`reads_in_place`].
pub fn weighted_sum_add_in_place(probs: &[f32], values: KvSlots<'_>, out: &mut [f32]) {
    let d = out.len();
    assert!(
        reads_in_place(d),
        "weighted_sum_add_in_place: unsupported head dim {d}"
    );
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        assert!(
            values.len() >= probs.len() * d,
            "weighted_sum: too few values"
        );
        // SAFETY: AVX2/FMA/F16C are enabled at compile time; lengths checked above.
        match values {
            KvSlots::F32(values) => unsafe {
                avx2::weighted_sum_of::<f32>(probs, values, out, true)
            },
            KvSlots::F16(values) => unsafe {
                avx2::weighted_sum_of::<f16>(probs, values, out, true)
            },
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        let _ = (probs, values);
        unreachable!("reads_in_place is false on this build")
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    /// An element type of stored keys and values: 8 of them load as 8 f32 lanes.
    pub(super) trait Lanes: Copy {
        /// # Safety
        /// 8 elements are readable at `ptr`.
        unsafe fn load8(ptr: *const Self) -> __m256;
    }

    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load8(ptr: *const f32) -> __m256 {
            // SAFETY: the caller's promise.
            unsafe { _mm256_loadu_ps(ptr) }
        }
    }

    impl Lanes for f16 {
        #[inline(always)]
        unsafe fn load8(ptr: *const f16) -> __m256 {
            // SAFETY: the caller's promise; F16C is enabled at compile time wherever the
            // f16 kernels are called (`reads_in_place`).
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(ptr.cast())) }
        }
    }

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
        // SAFETY: the caller's promise.
        unsafe { scores_of::<f32>(q, keys, scale, out) }
    }

    /// [`scores`] over keys of any stored element type.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_of<E: Lanes>(q: &[f32], keys: &[E], scale: f32, out: &mut [f32]) {
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
                        *a = _mm256_fmadd_ps(qv, E::load8(kp.add((j + k) * d + c)), *a);
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
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), E::load8(kp.add(j * d + c)), a);
                }
            }
            out[j] = scale * hsum(a);
            j += 1;
        }
    }

    /// 64 output columns at a time held in 8 registers while every value row streams by.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(probs: &[f32], values: &[f32], out: &mut [f32]) {
        // SAFETY: the caller's promise.
        unsafe { weighted_sum_of::<f32>(probs, values, out, false) }
    }

    /// [`weighted_sum`] over values of any stored element type, onto `out`'s contents
    /// when `add` (else onto zeros).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum_of<E: Lanes>(
        probs: &[f32],
        values: &[E],
        out: &mut [f32],
        add: bool,
    ) {
        let d = out.len();
        let vp = values.as_ptr();
        for slab in (0..d).step_by(64) {
            let mut acc = [_mm256_setzero_ps(); 8];
            if add {
                for (k, a) in acc.iter_mut().enumerate() {
                    // SAFETY: slab + 8k + 8 <= d = out.len().
                    *a = unsafe { _mm256_loadu_ps(out.as_ptr().add(slab + 8 * k)) };
                }
            }
            for (j, &p) in probs.iter().enumerate() {
                let pv = _mm256_set1_ps(p);
                for (k, a) in acc.iter_mut().enumerate() {
                    // SAFETY: j * d + slab + 8k + 8 <= probs.len() * d <= values.len().
                    *a = unsafe { _mm256_fmadd_ps(pv, E::load8(vp.add(j * d + slab + 8 * k)), *a) };
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

    /// Keys and values read in place, block by block, as f16 or f32 slots, give the
    /// bits of the f32 kernels over the same values copied out in one run.
    #[test]
    fn in_place_blocks_match_the_copied_run() {
        let (d, block, n) = (64, 16, 37);
        if !reads_in_place(d) {
            eprintln!("notice: this build has no in-place attention kernels");
            return;
        }
        let q = data(d, 5);
        // Values representable in f16, so that both layouts hold the same numbers.
        let as_f16 = |v: Vec<f32>| v.into_iter().map(f16::from_f32).collect::<Vec<_>>();
        let keys16 = as_f16(data(n * d, 6));
        let values16 = as_f16(data(n * d, 7));
        let keys: Vec<f32> = keys16.iter().map(|h| h.to_f32()).collect();
        let values: Vec<f32> = values16.iter().map(|h| h.to_f32()).collect();
        let mut want_scores = vec![0.0; n];
        scores(&q, &keys, 0.125, &mut want_scores);
        let probs = data(n, 8);
        let mut want = vec![0.0; d];
        weighted_sum(&probs, &values, &mut want);
        for f16_slots in [true, false] {
            fn slots<'a>(
                all16: &'a [f16],
                all32: &'a [f32],
                f16_slots: bool,
                range: std::ops::Range<usize>,
            ) -> KvSlots<'a> {
                if f16_slots {
                    KvSlots::F16(&all16[range])
                } else {
                    KvSlots::F32(&all32[range])
                }
            }
            let span = |b: usize, len: usize| b * block * d..(b * block + len) * d;
            let mut got_scores = vec![0.0; n];
            for (b, chunk) in got_scores.chunks_mut(block).enumerate() {
                let len = chunk.len();
                scores_in_place(
                    &q,
                    slots(&keys16, &keys, f16_slots, span(b, len)),
                    0.125,
                    chunk,
                );
            }
            let mut got = vec![0.0; d];
            for (b, p) in probs.chunks(block).enumerate() {
                let values = slots(&values16, &values, f16_slots, span(b, p.len()));
                weighted_sum_add_in_place(p, values, &mut got);
            }
            for (g, w) in got_scores
                .iter()
                .zip(&want_scores)
                .chain(got.iter().zip(&want))
            {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "f16 slots: {f16_slots}: {g} vs {w}"
                );
            }
        }
    }
}

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

/// Asks the CPU to start loading `slots` into its caches: a decode step's keys and
/// values were last touched a whole step ago and come from L3 or memory, and the
/// kernels' walk over them is too short for the hardware prefetcher to get ahead.
pub fn prefetch(slots: KvSlots<'_>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let (start, bytes) = match slots {
            KvSlots::F16(s) => (s.as_ptr().cast::<i8>(), std::mem::size_of_val(s)),
            KvSlots::F32(s) => (s.as_ptr().cast::<i8>(), std::mem::size_of_val(s)),
        };
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch reads nothing; the address is inside `slots`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = slots;
}

/// The most query heads per KV head the group kernels serve.
pub const MAX_GROUP: usize = 8;

/// [`scores_in_place`] for the `heads` query heads of one KV head at once (`qs`: their
/// queries back to back): each key is loaded and converted once for all of them. Row
/// `h` of `rows` (`stride` apart) gets this block's scores at `[at, at + keys)`; each
/// has the bits [`scores`] gives that query alone. Only where [`reads_in_place`] and
/// `heads <= MAX_GROUP`.
pub fn group_scores_in_place(
    qs: &[f32],
    heads: usize,
    keys: KvSlots<'_>,
    scale: f32,
    rows: &mut [f32],
    stride: usize,
    at: usize,
) {
    let d = qs.len() / heads.max(1);
    assert!(
        (1..=MAX_GROUP).contains(&heads) && qs.len() == heads * d && reads_in_place(d),
        "group_scores_in_place: unsupported group of {heads} heads of dim {d}"
    );
    let n = keys.len() / d;
    assert!(
        at + n <= stride && rows.len() >= (heads - 1) * stride + at + n,
        "group_scores_in_place: rows too small"
    );
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        let out = rows[at..].as_mut_ptr();
        // SAFETY: AVX2/FMA/F16C are enabled at compile time; the reads stay inside
        // `qs` and `keys`, the writes inside `rows` (checked above).
        unsafe {
            match keys {
                KvSlots::F32(k) => avx2::group_scores(heads, qs, k.as_ptr(), n, scale, out, stride),
                KvSlots::F16(k) => avx2::group_scores(heads, qs, k.as_ptr(), n, scale, out, stride),
            }
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        let _ = (keys, scale, rows, stride, at);
        unreachable!("reads_in_place is false on this build")
    }
}

/// [`weighted_sum_add_in_place`] for the `heads` query heads of one KV head at once:
/// `out` holds their outputs back to back, row `h` of `probs` (`stride` apart) their
/// probabilities, of which `[at, at + values)` weight this block's values. Each value
/// is loaded and converted once for all heads; each output gets the bits of
/// [`weighted_sum_add_in_place`] for its head alone. Only where [`reads_in_place`] and
/// `heads <= MAX_GROUP`.
pub fn group_weighted_sum_add_in_place(
    probs: &[f32],
    stride: usize,
    at: usize,
    values: KvSlots<'_>,
    out: &mut [f32],
    heads: usize,
) {
    let d = out.len() / heads.max(1);
    assert!(
        (1..=MAX_GROUP).contains(&heads) && out.len() == heads * d && reads_in_place(d),
        "group_weighted_sum_add_in_place: unsupported group of {heads} heads of dim {d}"
    );
    let n = values.len() / d;
    assert!(
        at + n <= stride && probs.len() >= (heads - 1) * stride + at + n,
        "group_weighted_sum_add_in_place: probabilities too few"
    );
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        let p = probs[at..].as_ptr();
        // SAFETY: as in `group_scores_in_place`, with the writes inside `out`.
        unsafe {
            match values {
                KvSlots::F32(v) => avx2::group_weighted_sum(heads, p, stride, v.as_ptr(), n, out),
                KvSlots::F16(v) => avx2::group_weighted_sum(heads, p, stride, v.as_ptr(), n, out),
            }
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        let _ = (probs, stride, at, values, out);
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

    /// Dispatches a group kernel on its head count (a constant inside, so that the
    /// accumulators stay in registers).
    macro_rules! by_heads {
        ($heads:expr, $kernel:ident, $($arg:expr),*) => {
            match $heads {
                1 => $kernel::<E, 1>($($arg),*),
                2 => $kernel::<E, 2>($($arg),*),
                3 => $kernel::<E, 3>($($arg),*),
                4 => $kernel::<E, 4>($($arg),*),
                5 => $kernel::<E, 5>($($arg),*),
                6 => $kernel::<E, 6>($($arg),*),
                7 => $kernel::<E, 7>($($arg),*),
                8 => $kernel::<E, 8>($($arg),*),
                _ => unreachable!("group of {} heads", $heads),
            }
        };
    }

    /// # Safety
    /// `qs` holds `heads` queries of `d = qs.len() / heads` (a multiple of 8) values,
    /// `n * d` keys are readable at `keys`, and `heads` rows of `n` scores, `stride`
    /// apart, writable at `out`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn group_scores<E: Lanes>(
        heads: usize,
        qs: &[f32],
        keys: *const E,
        n: usize,
        scale: f32,
        out: *mut f32,
        stride: usize,
    ) {
        let d = qs.len() / heads;
        // SAFETY: the caller's promise.
        unsafe {
            by_heads!(
                heads,
                group_scores_of,
                qs.as_ptr(),
                d,
                keys,
                n,
                scale,
                out,
                stride
            )
        }
    }

    /// Every (head, key) pair runs [`scores_of`]'s own sequence: lanes accumulate along
    /// `d` in steps of 8, then `hsum`, then `scale`. Two keys at a time for small
    /// groups, one for large ones (register room).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group_scores_of<E: Lanes, const G: usize>(
        qp: *const f32,
        d: usize,
        kp: *const E,
        n: usize,
        scale: f32,
        out: *mut f32,
        stride: usize,
    ) {
        let mut j = 0;
        if G <= 4 {
            while j + 2 <= n {
                // Per head, the two keys' accumulators.
                let mut acc = [[_mm256_setzero_ps(); 2]; G];
                for c in (0..d).step_by(8) {
                    // SAFETY: c + 8 <= d, j + 1 < n (the caller's promise).
                    unsafe {
                        let k0 = E::load8(kp.add(j * d + c));
                        let k1 = E::load8(kp.add((j + 1) * d + c));
                        for (h, pair) in acc.iter_mut().enumerate() {
                            let qv = _mm256_loadu_ps(qp.add(h * d + c));
                            pair[0] = _mm256_fmadd_ps(qv, k0, pair[0]);
                            pair[1] = _mm256_fmadd_ps(qv, k1, pair[1]);
                        }
                    }
                }
                for (h, pair) in acc.iter().enumerate() {
                    // SAFETY: rows of `n` at `stride` (the caller's promise).
                    unsafe {
                        *out.add(h * stride + j) = scale * hsum(pair[0]);
                        *out.add(h * stride + j + 1) = scale * hsum(pair[1]);
                    }
                }
                j += 2;
            }
        }
        while j < n {
            let mut acc = [_mm256_setzero_ps(); G];
            for c in (0..d).step_by(8) {
                // SAFETY: as above, for one key.
                unsafe {
                    let k = E::load8(kp.add(j * d + c));
                    for (h, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(h * d + c)), k, *a);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                // SAFETY: as above.
                unsafe { *out.add(h * stride + j) = scale * hsum(*a) };
            }
            j += 1;
        }
    }

    /// # Safety
    /// `out` holds `heads` outputs of `d = out.len() / heads` (a multiple of 16) values,
    /// `n * d` values are readable at `values`, and `heads` rows of `n`
    /// probabilities, `stride` apart, at `probs`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn group_weighted_sum<E: Lanes>(
        heads: usize,
        probs: *const f32,
        stride: usize,
        values: *const E,
        n: usize,
        out: &mut [f32],
    ) {
        let d = out.len() / heads;
        let op = out.as_mut_ptr();
        // SAFETY: the caller's promise.
        unsafe {
            by_heads!(
                heads,
                group_weighted_sum_of,
                probs,
                stride,
                values,
                n,
                d,
                op
            )
        }
    }

    /// Each output column accumulates `p_j · v_j` in order of `j` onto what `out` holds,
    /// as [`weighted_sum_of`] does; 16 columns at a time, each value row converted once
    /// for all `G` heads.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group_weighted_sum_of<E: Lanes, const G: usize>(
        probs: *const f32,
        stride: usize,
        vp: *const E,
        n: usize,
        d: usize,
        out: *mut f32,
    ) {
        for slab in (0..d).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; G];
            for (h, pair) in acc.iter_mut().enumerate() {
                for (k, a) in pair.iter_mut().enumerate() {
                    // SAFETY: h * d + slab + 8k + 8 <= G * d (the caller's promise).
                    *a = unsafe { _mm256_loadu_ps(out.add(h * d + slab + 8 * k)) };
                }
            }
            for j in 0..n {
                // SAFETY: j * d + slab + 16 <= n * d, h * stride + j inside the
                // probabilities (the caller's promise).
                unsafe {
                    let v0 = E::load8(vp.add(j * d + slab));
                    let v1 = E::load8(vp.add(j * d + slab + 8));
                    for (h, pair) in acc.iter_mut().enumerate() {
                        let p = _mm256_set1_ps(*probs.add(h * stride + j));
                        pair[0] = _mm256_fmadd_ps(p, v0, pair[0]);
                        pair[1] = _mm256_fmadd_ps(p, v1, pair[1]);
                    }
                }
            }
            for (h, pair) in acc.iter().enumerate() {
                for (k, a) in pair.iter().enumerate() {
                    // SAFETY: as for the loads.
                    unsafe { _mm256_storeu_ps(out.add(h * d + slab + 8 * k), *a) };
                }
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

    /// A group of query heads scored and summed together gives each head the bits it
    /// gets alone, for every group size, both slot types, odd key counts and offsets.
    #[test]
    fn groups_give_each_head_its_own_bits() {
        let (d, n, at, stride) = (64, 7, 3, 12);
        if !reads_in_place(d) {
            eprintln!("notice: this build has no in-place attention kernels");
            return;
        }
        let keys16: Vec<f16> = data(n * d, 11).into_iter().map(f16::from_f32).collect();
        let values16: Vec<f16> = data(n * d, 12).into_iter().map(f16::from_f32).collect();
        let keys32 = data(n * d, 13);
        let values32 = data(n * d, 14);
        for heads in 1..=MAX_GROUP {
            let qs = data(heads * d, heads as u32);
            let probs = data(heads * stride, 20 + heads as u32);
            let start = data(heads * d, 40 + heads as u32);
            for f16_slots in [true, false] {
                let (keys, values) = if f16_slots {
                    (KvSlots::F16(&keys16), KvSlots::F16(&values16))
                } else {
                    (KvSlots::F32(&keys32), KvSlots::F32(&values32))
                };
                let mut rows = vec![0.0; heads * stride];
                group_scores_in_place(&qs, heads, keys, 0.125, &mut rows, stride, at);
                let mut outs = start.clone();
                group_weighted_sum_add_in_place(&probs, stride, at, values, &mut outs, heads);
                for h in 0..heads {
                    let mut alone = vec![0.0; n];
                    scores_in_place(&qs[h * d..(h + 1) * d], keys, 0.125, &mut alone);
                    let got = &rows[h * stride + at..h * stride + at + n];
                    assert!(
                        got.iter()
                            .zip(&alone)
                            .all(|(g, a)| g.to_bits() == a.to_bits()),
                        "scores, {heads} heads, head {h}, f16 {f16_slots}"
                    );
                    let mut out = start[h * d..(h + 1) * d].to_vec();
                    let p = &probs[h * stride + at..h * stride + at + n];
                    weighted_sum_add_in_place(p, values, &mut out);
                    let got = &outs[h * d..(h + 1) * d];
                    assert!(
                        got.iter()
                            .zip(&out)
                            .all(|(g, a)| g.to_bits() == a.to_bits()),
                        "sums, {heads} heads, head {h}, f16 {f16_slots}"
                    );
                }
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

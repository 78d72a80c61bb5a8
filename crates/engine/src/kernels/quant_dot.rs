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
//! A kernel computes a tile of `R` weight rows × `T` tokens, so that each weight block is
//! loaded and unpacked once per tile and each activation block once per row group. The
//! AVX2 versions (`avx2`) and the portable ones (`scalar`) have identical signatures; the
//! scalar ones are always compiled so tests can compare the two.

use super::aligned::AlignedBytes;

/// Elements per quantization block of the 32-wide formats.
pub(crate) const QK: usize = 32;

/// Activation rows quantized to i8 in blocks of 32 (the Q8_0/Q8_1 dot types).
#[derive(Default)]
pub(crate) struct Q8Acts {
    n_tokens: usize,
    cols: usize,
    qs: AlignedBytes,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

impl Q8Acts {
    /// Quantizes `x` (`n_tokens` rows of `cols` values; `cols` a multiple of 32, both
    /// caller-checked) in place of the previous contents.
    pub(crate) fn quantize(&mut self, x: &[f32], n_tokens: usize, cols: usize) {
        debug_assert!(cols % QK == 0 && x.len() == n_tokens * cols);
        let n_blocks = n_tokens * cols / QK;
        self.n_tokens = n_tokens;
        self.cols = cols;
        self.qs.resize(n_tokens * cols);
        self.scales.resize(n_blocks, 0.0);
        self.sums.resize(n_blocks, 0.0);
        let blocks = x
            .chunks_exact(QK)
            .zip(self.qs.as_mut_i8().chunks_exact_mut(QK))
            .zip(self.scales.iter_mut().zip(self.sums.iter_mut()));
        for ((src, dst), (scale, sum)) in blocks {
            (*scale, *sum) =
                fast::quantize_block(src.try_into().expect("32"), dst.try_into().expect("32"));
        }
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

    fn scales(&self, t: usize) -> &[f32] {
        let nb = self.blocks_per_row();
        &self.scales[t * nb..(t + 1) * nb]
    }

    fn sums(&self, t: usize) -> &[f32] {
        let nb = self.blocks_per_row();
        &self.sums[t * nb..(t + 1) * nb]
    }
}

/// Layout of a 32-element 4-bit block: bytes, where the packed nibbles start, and how
/// to read its scale `d` and offset `m` (`w = d·q + m`).
pub(crate) trait Q4Layout: Sync {
    const BLOCK_BYTES: usize;
    const QS_OFFSET: usize;
    /// The offset `m` of a block whose scale is `d`.
    fn offset(block: &[u8], d: f32) -> f32;
}

pub(crate) struct Q4_0Layout;
pub(crate) struct Q4_1Layout;

impl Q4Layout for Q4_0Layout {
    const BLOCK_BYTES: usize = 18;
    const QS_OFFSET: usize = 2;
    #[inline(always)]
    fn offset(_block: &[u8], d: f32) -> f32 {
        -8.0 * d
    }
}

impl Q4Layout for Q4_1Layout {
    const BLOCK_BYTES: usize = 20;
    const QS_OFFSET: usize = 4;
    #[inline(always)]
    fn offset(block: &[u8], _d: f32) -> f32 {
        super::simd::f16_at(block, 2)
    }
}

/// Bytes of one Q8_0 block (f16 scale + 32 i8).
pub(crate) const Q8_0_BLOCK_BYTES: usize = 34;

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

/// Checks the slices a tile kernel reads, so the SIMD loads below stay in bounds.
#[inline(always)]
fn check_tile(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    acts: &Q8Acts,
    t0: usize,
    tokens: usize,
    block_bytes: usize,
) {
    assert!(w.len() >= rows * row_bytes && row_bytes == acts.blocks_per_row() * block_bytes);
    assert!(t0 + tokens <= acts.n_tokens);
}

#[allow(dead_code)] // With AVX2 only the tests call these.
pub(crate) mod scalar {
    use super::{Q4Layout, Q8_0_BLOCK_BYTES, Q8Acts, QK, check_tile};
    use crate::kernels::simd::f16_at;

    /// Quantizes 32 values to i8; returns (scale, scale · Σ q).
    pub(crate) fn quantize_block(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, f32) {
        let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in dst.iter_mut().zip(src) {
            *q = (v * inv).round_ties_even() as i8;
            sum += i32::from(*q);
        }
        (scale, scale * sum as f32)
    }

    /// `R` rows of 4-bit weights (`w` holds them, `row_bytes` apart) × tokens `t0..t0+T`.
    pub(crate) fn q4_tile<L: Q4Layout, const R: usize, const T: usize>(
        w: &[u8],
        row_bytes: usize,
        acts: &Q8Acts,
        t0: usize,
    ) -> [[f32; T]; R] {
        check_tile(w, row_bytes, R, acts, t0, T, L::BLOCK_BYTES);
        let mut out = [[0f32; T]; R];
        for (r, out_row) in out.iter_mut().enumerate() {
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            for (t, out) in out_row.iter_mut().enumerate() {
                let (qs, scales, sums) = (acts.qs(t0 + t), acts.scales(t0 + t), acts.sums(t0 + t));
                for (b, block) in row.chunks_exact(L::BLOCK_BYTES).enumerate() {
                    let d = f16_at(block, 0);
                    let nibbles = &block[L::QS_OFFSET..L::QS_OFFSET + QK / 2];
                    let a = &qs[b * QK..(b + 1) * QK];
                    let dot: i32 = nibbles
                        .iter()
                        .enumerate()
                        .map(|(j, &n)| {
                            i32::from(n & 0x0F) * i32::from(a[j])
                                + i32::from(n >> 4) * i32::from(a[j + QK / 2])
                        })
                        .sum();
                    *out += d * scales[b] * dot as f32 + L::offset(block, d) * sums[b];
                }
            }
        }
        out
    }

    /// `R` rows of Q8_0 weights × tokens `t0..t0+T`.
    pub(crate) fn q8_0_tile<const R: usize, const T: usize>(
        w: &[u8],
        row_bytes: usize,
        acts: &Q8Acts,
        t0: usize,
    ) -> [[f32; T]; R] {
        check_tile(w, row_bytes, R, acts, t0, T, Q8_0_BLOCK_BYTES);
        let mut out = [[0f32; T]; R];
        for (r, out_row) in out.iter_mut().enumerate() {
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            for (t, out) in out_row.iter_mut().enumerate() {
                let (qs, scales) = (acts.qs(t0 + t), acts.scales(t0 + t));
                for (b, block) in row.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
                    let a = &qs[b * QK..(b + 1) * QK];
                    let dot: i32 = block[2..]
                        .iter()
                        .zip(a)
                        .map(|(&wq, &aq)| i32::from(wq as i8) * i32::from(aq))
                        .sum();
                    *out += f16_at(block, 0) * scales[b] * dot as f32;
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

    use super::{Q4Layout, Q8_0_BLOCK_BYTES, Q8Acts, QK, check_tile};
    use crate::kernels::simd::avx2::{hmax, hsum, load_f16};

    /// Quantizes 32 values to i8; returns (scale, scale · Σ q).
    #[inline(always)]
    pub(crate) fn quantize_block(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, f32) {
        // SAFETY: see the module note.
        unsafe { quantize_block_avx2(src, dst) }
    }

    /// `R` rows of 4-bit weights (`w` holds them, `row_bytes` apart) × tokens `t0..t0+T`.
    #[inline(always)]
    pub(crate) fn q4_tile<L: Q4Layout, const R: usize, const T: usize>(
        w: &[u8],
        row_bytes: usize,
        acts: &Q8Acts,
        t0: usize,
    ) -> [[f32; T]; R] {
        check_tile(w, row_bytes, R, acts, t0, T, L::BLOCK_BYTES);
        // SAFETY: see the module note.
        unsafe { q4_tile_avx2::<L, R, T>(w, row_bytes, acts, t0) }
    }

    /// `R` rows of Q8_0 weights × tokens `t0..t0+T`.
    #[inline(always)]
    pub(crate) fn q8_0_tile<const R: usize, const T: usize>(
        w: &[u8],
        row_bytes: usize,
        acts: &Q8Acts,
        t0: usize,
    ) -> [[f32; T]; R] {
        check_tile(w, row_bytes, R, acts, t0, T, Q8_0_BLOCK_BYTES);
        // SAFETY: see the module note.
        unsafe { q8_0_tile_avx2::<R, T>(w, row_bytes, acts, t0) }
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
    fn quantize_block_avx2(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, f32) {
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
        (scale, scale * sum)
    }

    /// Loads a block's 16 bytes of nibbles as 32 bytes 0..=15 (low nibbles = elements
    /// 0..16, high nibbles = elements 16..32).
    ///
    /// # Safety
    /// `ptr` must be valid for reading 16 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_nibbles(ptr: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 16 readable bytes.
        let raw = unsafe { _mm_loadu_si128(ptr.cast()) };
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// Σ u·s over 32 byte pairs, as 8 i32 lanes converted to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_madd_epi16(
            _mm256_maddubs_epi16(u, s),
            _mm256_set1_epi16(1),
        ))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q4_tile_avx2<L: Q4Layout, const R: usize, const T: usize>(
        w: &[u8],
        row_bytes: usize,
        acts: &Q8Acts,
        t0: usize,
    ) -> [[f32; T]; R] {
        let n_blocks = acts.blocks_per_row();
        let qs: [&[i8]; T] = std::array::from_fn(|t| acts.qs(t0 + t));
        let scales: [&[f32]; T] = std::array::from_fn(|t| acts.scales(t0 + t));
        let sums: [&[f32]; T] = std::array::from_fn(|t| acts.sums(t0 + t));
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut offset_acc = [[0f32; T]; R];
        for b in 0..n_blocks {
            let mut wq = [_mm256_setzero_si256(); R];
            let mut wd = [0f32; R];
            let mut wm = [0f32; R];
            for r in 0..R {
                let block = &w[r * row_bytes + b * L::BLOCK_BYTES..][..L::BLOCK_BYTES];
                // SAFETY: `block` has BLOCK_BYTES >= QS_OFFSET + 16 bytes, and >= 2 for d.
                unsafe {
                    wq[r] = unpack_nibbles(block.as_ptr().add(L::QS_OFFSET));
                    wd[r] = load_f16(block.as_ptr());
                }
                wm[r] = L::offset(block, wd[r]);
            }
            for t in 0..T {
                let a_block = &qs[t][b * QK..][..QK];
                // SAFETY: `a_block` holds 32 bytes.
                let a = unsafe { _mm256_loadu_si256(a_block.as_ptr().cast()) };
                let (ad, asum) = (scales[t][b], sums[t][b]);
                for r in 0..R {
                    let scale = _mm256_set1_ps(wd[r] * ad);
                    acc[r][t] = _mm256_fmadd_ps(dot_u8_i8(wq[r], a), scale, acc[r][t]);
                    offset_acc[r][t] = wm[r].mul_add(asum, offset_acc[r][t]);
                }
            }
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                out[r][t] = hsum(acc[r][t]) + offset_acc[r][t];
            }
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q8_0_tile_avx2<const R: usize, const T: usize>(
        w: &[u8],
        row_bytes: usize,
        acts: &Q8Acts,
        t0: usize,
    ) -> [[f32; T]; R] {
        let n_blocks = acts.blocks_per_row();
        let qs: [&[i8]; T] = std::array::from_fn(|t| acts.qs(t0 + t));
        let scales: [&[f32]; T] = std::array::from_fn(|t| acts.scales(t0 + t));
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        for b in 0..n_blocks {
            let mut w_abs = [_mm256_setzero_si256(); R];
            let mut w_val = [_mm256_setzero_si256(); R];
            let mut wd = [0f32; R];
            for r in 0..R {
                let block = &w[r * row_bytes + b * Q8_0_BLOCK_BYTES..][..Q8_0_BLOCK_BYTES];
                // SAFETY: `block` has 34 bytes: f16 scale then 32 i8.
                unsafe {
                    w_val[r] = _mm256_loadu_si256(block.as_ptr().add(2).cast());
                    wd[r] = load_f16(block.as_ptr());
                }
                w_abs[r] = _mm256_sign_epi8(w_val[r], w_val[r]);
            }
            for t in 0..T {
                let a_block = &qs[t][b * QK..][..QK];
                // SAFETY: `a_block` holds 32 bytes.
                let a = unsafe { _mm256_loadu_si256(a_block.as_ptr().cast()) };
                let ad = scales[t][b];
                for r in 0..R {
                    // maddubs needs an unsigned operand: |w| · (a with w's sign).
                    let signed_a = _mm256_sign_epi8(a, w_val[r]);
                    let scale = _mm256_set1_ps(wd[r] * ad);
                    acc[r][t] = _mm256_fmadd_ps(dot_u8_i8(w_abs[r], signed_a), scale, acc[r][t]);
                }
            }
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                out[r][t] = hsum(acc[r][t]);
            }
        }
        out
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
        acts.quantize(&pseudo_random(cols * n_tokens, 7), n_tokens, cols);
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
        assert!((fast.0 - slow.0).abs() < 1e-7 && (fast.1 - slow.1).abs() < 1e-5);
    }

    #[test]
    fn tiles_match_scalar() {
        let (cols, rows) = (128, 4);
        let acts = acts(cols, 3);
        let w = pseudo_random(rows * cols, 11);
        let check = |fast: [[f32; 3]; 4], slow: [[f32; 3]; 4]| {
            for (f, s) in fast.iter().flatten().zip(slow.iter().flatten()) {
                assert!((f - s).abs() <= 1e-4 * (1.0 + s.abs()), "{f} vs {s}");
            }
        };
        for dtype in [
            super::super::GgmlDType::Q4_0,
            super::super::GgmlDType::Q4_1,
            super::super::GgmlDType::Q8_0,
        ] {
            let m = super::super::QMatrix::from_f32(dtype, rows, cols, &w).unwrap();
            let bytes = m.as_bytes();
            let rb = m.row_bytes();
            match dtype {
                super::super::GgmlDType::Q4_0 => check(
                    fast::q4_tile::<Q4_0Layout, 4, 3>(bytes, rb, &acts, 0),
                    scalar::q4_tile::<Q4_0Layout, 4, 3>(bytes, rb, &acts, 0),
                ),
                super::super::GgmlDType::Q4_1 => check(
                    fast::q4_tile::<Q4_1Layout, 4, 3>(bytes, rb, &acts, 0),
                    scalar::q4_tile::<Q4_1Layout, 4, 3>(bytes, rb, &acts, 0),
                ),
                _ => check(
                    fast::q8_0_tile::<4, 3>(bytes, rb, &acts, 0),
                    scalar::q8_0_tile::<4, 3>(bytes, rb, &acts, 0),
                ),
            }
        }
        let x = pseudo_random(3 * 100, 5);
        let wf = pseudo_random(4 * 100, 9);
        check(
            fast::f32_tile::<4, 3>(&wf, &x, 100, 0),
            scalar::f32_tile::<4, 3>(&wf, &x, 100, 0),
        );
        let wh: Vec<u8> = wf
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        check(
            fast::f16_tile::<4, 3>(&wh, &x, 100, 0),
            scalar::f16_tile::<4, 3>(&wh, &x, 100, 0),
        );
    }
}

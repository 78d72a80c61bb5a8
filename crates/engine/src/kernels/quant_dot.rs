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
//! compiled so tests can compare the two.

use std::sync::{Mutex, PoisonError};

use super::aligned::AlignedBytes;
use super::packed::{PANEL_ROWS, PanelFormat};
use super::pool::ThreadPool;

/// Elements per quantization block of the 32-wide formats.
pub(crate) const QK: usize = 32;

/// Batches of at least twice this many tokens are quantized in parallel, this many per
/// task.
const PARALLEL_QUANTIZE_TOKENS: usize = 16;

/// One task's share of a parallel quantization: values in, quants, scales, sums out.
type QuantizeChunk<'a> = (&'a [f32], &'a mut [i8], &'a mut [f32], &'a mut [f32]);

/// Quantizes whole 32-value blocks of `x` into `qs`, `scales` and `sums`.
fn quantize_blocks(x: &[f32], qs: &mut [i8], scales: &mut [f32], sums: &mut [f32]) {
    let blocks = x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(QK))
        .zip(scales.iter_mut().zip(sums.iter_mut()));
    for ((src, dst), (scale, sum)) in blocks {
        let (src, dst) = (
            src.try_into().expect("32 values"),
            dst.try_into().expect("32 quants"),
        );
        (*scale, *sum) = fast::quantize_block(src, dst);
    }
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
    sums: Vec<f32>,
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
        if cols == 0 {
            return;
        }
        let qs = self.qs.as_mut_i8();
        if n_tokens < 2 * PARALLEL_QUANTIZE_TOKENS {
            quantize_blocks(x, qs, &mut self.scales, &mut self.sums);
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
                    .zip(self.sums.chunks_mut(blocks)),
            )
            .map(|((x, qs), (scales, sums))| Mutex::new((x, qs, scales, sums)))
            .collect();
        pool.run(chunks.len(), |i| {
            let mut chunk = chunks[i].lock().unwrap_or_else(PoisonError::into_inner);
            let (x, qs, scales, sums) = &mut *chunk;
            quantize_blocks(x, qs, scales, sums);
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
}

/// Results of one panel (8 rows, natural order) for each of `T` tokens.
pub(crate) type PanelOut<const T: usize> = [[f32; PANEL_ROWS]; T];

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

    /// Quantizes 32 values to i8; returns (scale, scale · Σ q).
    #[inline(always)]
    pub(crate) fn quantize_block(src: &[f32; QK], dst: &mut [i8; QK]) -> (f32, f32) {
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

    /// Loads 8 f16 at `ptr` as f32.
    ///
    /// # Safety
    /// `ptr` must be valid for reading 16 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16x8(ptr: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 16 readable bytes.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(ptr.cast()) })
    }

    /// Converts 8 lanes to an array of f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn to_array(v: __m256) -> [f32; 8] {
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
        let n_blocks = acts.blocks_per_row();
        // Raw rows: the block loop reads them without bounds checks (see the SAFETY notes).
        let qs: [*const i8; T] = std::array::from_fn(|t| acts.qs(t0 + t).as_ptr());
        let scales: [*const f32; T] = std::array::from_fn(|t| acts.scales(t0 + t).as_ptr());
        let act_sums: [*const f32; T] = std::array::from_fn(|t| acts.sums(t0 + t).as_ptr());
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..n_blocks {
            // SAFETY: `check_panel` asserted `panel` holds `n_blocks` panel blocks, and every
            // token row `n_blocks` blocks of 32 quants, one scale and one sum each; b < n_blocks.
            let (block, a, scale, act_sum) = unsafe {
                (
                    panel.as_ptr().add(b * format.panel_block),
                    qs.map(|q| q.add(b * QK)),
                    scales.map(|s| s.add(b).read()),
                    act_sums.map(|s| s.add(b).read()),
                )
            };
            // SAFETY: a panel block holds its 4 × 32 nibble bytes at `quants()`.
            let quants = unsafe { block.add(format.quants()) };
            // Lane k of `lo` holds row k's elements 4g..4g+4, of `hi` elements
            // 16+4g..16+4g+4: multiply each by the same 4 activations in every lane.
            // Each i16 lane sums at most 8 products of 15 × 127 pairs: no saturation.
            let mut sums = [_mm256_setzero_si256(); T];
            for g in 0..4 {
                // SAFETY: group g is 32 bytes at 32g of the quants.
                let raw = unsafe { _mm256_loadu_si256(quants.add(32 * g).cast()) };
                let lo = _mm256_and_si256(raw, low_nibbles);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low_nibbles);
                for t in 0..T {
                    // SAFETY: `a[t]` points at 32 quants; 4g + 4 <= 16 and 16 + 4g + 4 <= 32.
                    let (a_lo, a_hi) = unsafe {
                        (
                            _mm256_set1_epi32(a[t].add(4 * g).cast::<i32>().read_unaligned()),
                            _mm256_set1_epi32(a[t].add(16 + 4 * g).cast::<i32>().read_unaligned()),
                        )
                    };
                    sums[t] = _mm256_add_epi16(sums[t], _mm256_maddubs_epi16(lo, a_lo));
                    sums[t] = _mm256_add_epi16(sums[t], _mm256_maddubs_epi16(hi, a_hi));
                }
            }
            // SAFETY: the scale (and min) arrays are 16 bytes at offsets 0 (and 16).
            let d = unsafe { load_f16x8(block.add(PanelFormat::SCALES)) };
            let m = if HAS_MIN {
                // SAFETY: as above.
                unsafe { load_f16x8(block.add(PanelFormat::MINS)) }
            } else {
                _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
            };
            for t in 0..T {
                let row_sums = _mm256_madd_epi16(sums[t], ones);
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(scale[t]));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(row_sums), scale, acc[t]);
                acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(act_sum[t]), acc[t]);
            }
        }
        std::array::from_fn(|t| to_array(acc[t]))
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
        assert!((fast.0 - slow.0).abs() < 1e-7 && (fast.1 - slow.1).abs() < 1e-5);
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
}

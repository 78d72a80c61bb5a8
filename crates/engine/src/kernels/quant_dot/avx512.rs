//! The f32/f16 tiles (`R` weight rows × `T` tokens, f32 activations) on 512-bit
//! vectors, for the `avx512` and `amx` families: 16 columns per multiply-add where AVX2
//! does 8, half the loads and conversions (f16: one `vcvtph2ps` per 16 weights), and
//! the ragged end of a row through masked loads instead of a scalar loop.
//!
//! Numerics: each output is still one f32 dot product over the row, but summed in 16
//! lanes (then a fixed-order reduction) where AVX2 sums in 8, so results differ from the
//! AVX2 tiles in the last bits. Both are within the usual bound of a length-n f32 dot
//! product, |error| <= n·ε·Σ|w·x|, which the tests check against an f64 reference, and
//! so within twice that of each other (`matmul`'s
//! `every_family_f32_f16_rows_within_tolerance`, for every family this CPU has).
//!
//! The tiles are `#[target_feature]` functions reached only through `matmul`'s AVX-512
//! row kernels, which only the families that checked the CPU's AVX-512 F/BW/VL hand out.

use std::arch::x86_64::*;

/// The lanes of a row past `full` (a multiple of 16) as a load mask.
#[inline(always)]
fn tail_mask(cols: usize, full: usize) -> __mmask16 {
    ((1u32 << (cols - full)) - 1) as __mmask16
}

/// `R` rows of f32 weights (`cols` each, consecutive in `w`) × f32 tokens
/// `t0..t0+T` of `x` (`cols` each).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn f32_tile<const R: usize, const T: usize>(
    w: &[f32],
    x: &[f32],
    cols: usize,
    t0: usize,
) -> [[f32; T]; R] {
    assert!(w.len() >= R * cols && x.len() >= (t0 + T) * cols);
    let rows: [*const f32; R] = std::array::from_fn(|r| w[r * cols..].as_ptr());
    let xs: [*const f32; T] = std::array::from_fn(|t| x[(t0 + t) * cols..].as_ptr());
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let full = cols / 16 * 16;
    let mut step = |c: usize, mask: __mmask16| {
        // SAFETY: the mask only enables lanes c..cols of each row (checked lengths above).
        let wv: [__m512; R] =
            std::array::from_fn(|r| unsafe { _mm512_maskz_loadu_ps(mask, rows[r].add(c)) });
        for t in 0..T {
            // SAFETY: as above, for token t's row.
            let xv = unsafe { _mm512_maskz_loadu_ps(mask, xs[t].add(c)) };
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
    };
    for c in (0..full).step_by(16) {
        step(c, !0);
    }
    if full < cols {
        step(full, tail_mask(cols, full));
    }
    acc.map(|row| row.map(|v| _mm512_reduce_add_ps(v)))
}

/// `R` rows of f16 weights (little-endian bytes, `cols` each) × f32 tokens.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) fn f16_tile<const R: usize, const T: usize>(
    w: &[u8],
    x: &[f32],
    cols: usize,
    t0: usize,
) -> [[f32; T]; R] {
    assert!(w.len() >= R * cols * 2 && x.len() >= (t0 + T) * cols);
    let rows: [*const u16; R] = std::array::from_fn(|r| w[r * cols * 2..].as_ptr().cast());
    let xs: [*const f32; T] = std::array::from_fn(|t| x[(t0 + t) * cols..].as_ptr());
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let full = cols / 16 * 16;
    let mut step = |c: usize, mask: __mmask16| {
        // SAFETY: the mask only enables elements c..cols of each row (checked above).
        let wv: [__m512; R] = std::array::from_fn(|r| unsafe {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, rows[r].add(c).cast()))
        });
        for t in 0..T {
            // SAFETY: as above, for token t's row.
            let xv = unsafe { _mm512_maskz_loadu_ps(mask, xs[t].add(c)) };
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
    };
    for c in (0..full).step_by(16) {
        step(c, !0);
    }
    if full < cols {
        step(full, tail_mask(cols, full));
    }
    acc.map(|row| row.map(|v| _mm512_reduce_add_ps(v)))
}

//! 512-bit `vpdpbusd` kernels for a pair of Q4_0/Q4_1/Q8_0 panels × runs of tokens:
//! the pair kernels of the `avx512` family on CPUs with AVX512-VNNI (and BW/VL), used
//! by every matmul (single-token decode, batched decode, prefill), in register tiles of
//! 8 tokens, then one of 4, then single tokens; the `amx` family's kernels below its
//! tiles' batches.
//!
//! The VNNI panel kernels work on 256-bit vectors, one panel (8 rows) per multiply. Here
//! the two panels of a pair share each vector: the low half holds panel A's group of
//! quants, the high half panel B's, both multiplied by the same broadcast activations,
//! so one instruction does 16 rows' work. Where the vector unit is a full 512 bits wide
//! (Zen 5, Sapphire Rapids) that halves the multiplies, broadcasts and f32 steps per row;
//! it pays most at the batch sizes where decode stops being bound by the weights' bytes,
//! and for single tokens where the weights come from a large L3 (an Emerald Rapids
//! Xeon's 98 MB model: `docs/benchmarks.md`, issue 20).
//!
//! Numerics: the same per-block integer dot products as the VNNI panels (exact in i32),
//! then the same lane-wise f32 operations in the same order (`acc = fma(float(dot),
//! d·s, acc)`, then for Q4 `acc = fma(m, s·Σa, acc)`): bit-identical to `avx2`. Q8_0's
//! signed × signed products take w + 128 as the unsigned operand (one XOR) and subtract
//! 128 · Σa per block afterwards, Σa kept per block by the activation quantizer
//! ([`Q8Acts::quantize`]): exact in i32 (|Σ| ≤ 32 · 255 · 127), and one instruction per
//! token and group fewer than negating the activations where w < 0.
//!
//! A lone last panel (`live == 1`) is paired with itself and the high half's results
//! are dropped by the caller (it stores only the live rows).
//!
//! The kernels are only reachable through the table [`super::vnni`] hands out once the
//! CPU reports AVX512-VNNI, F, BW and VL: that check is what the `unsafe` calls of the
//! `#[target_feature]` functions below rely on.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{PAIR_ROWS, PairOut, Q8Acts, QK};
use crate::kernels::packed::{PANEL_ROWS, PanelFormat};

/// Tokens per register tile: 8 accumulators and 8 dot products stay in registers.
const TILE_TOKENS: usize = 8;

/// Tokens per middle-sized tile.
const HALF_TILE_TOKENS: usize = 4;

/// The smallest tile, and so the granularity of the token runs these kernels take.
pub(crate) const RUN_TOKENS: usize = 1;

/// The smallest matmul (in tokens) these kernels take.
pub(crate) const FROM_TOKENS: usize = 1;

/// The two panels' starts (the first twice for a lone panel), after checking that
/// every load below stays in bounds.
fn pair_panels<'a>(
    panels: &'a [u8],
    live: usize,
    format: &PanelFormat,
    acts: &Q8Acts,
    tokens: &Range<usize>,
    out: &[PairOut],
) -> (&'a [u8], &'a [u8]) {
    assert!(live == 1 || live == 2, "a pair holds 1 or 2 live panels");
    let panel_bytes = acts.blocks_per_row() * format.panel_block;
    assert!(panels.len() == live * panel_bytes);
    assert!(tokens.end <= acts.n_tokens && tokens.len().is_multiple_of(RUN_TOKENS));
    assert!(out.len() == tokens.len());
    let a = &panels[..panel_bytes];
    let b = if live == 2 { &panels[panel_bytes..] } else { a };
    (a, b)
}

/// Q4_0 (`HAS_MIN = false`) or Q4_1 panels × `tokens` (any run) into `out`.
pub(crate) fn q4_pair<const HAS_MIN: bool>(
    panels: &[u8],
    live: usize,
    format: &PanelFormat,
    acts: &Q8Acts,
    tokens: Range<usize>,
    out: &mut [PairOut],
) {
    let (a, b) = pair_panels(panels, live, format, acts, &tokens, out);
    for_each_tile(tokens.start, out, |t0, chunk| {
        // SAFETY: reachable only through the table of CPUs with the features (module
        // note); `pair_panels` checked the panels, tokens and output.
        unsafe {
            match chunk.len() {
                TILE_TOKENS => q4_tile::<HAS_MIN, TILE_TOKENS>(a, b, format, acts, t0, chunk),
                HALF_TILE_TOKENS => {
                    q4_tile::<HAS_MIN, HALF_TILE_TOKENS>(a, b, format, acts, t0, chunk)
                }
                _ => q4_tile::<HAS_MIN, 1>(a, b, format, acts, t0, chunk),
            }
        }
    });
}

/// Q8_0 panels × `tokens` (any run) into `out`.
pub(crate) fn q8_0_pair(
    panels: &[u8],
    live: usize,
    format: &PanelFormat,
    acts: &Q8Acts,
    tokens: Range<usize>,
    out: &mut [PairOut],
) {
    let (a, b) = pair_panels(panels, live, format, acts, &tokens, out);
    for_each_tile(tokens.start, out, |t0, chunk| {
        // SAFETY: as in `q4_pair`.
        unsafe {
            match chunk.len() {
                TILE_TOKENS => q8_0_tile::<TILE_TOKENS>(a, b, format, acts, t0, chunk),
                HALF_TILE_TOKENS => q8_0_tile::<HALF_TILE_TOKENS>(a, b, format, acts, t0, chunk),
                _ => q8_0_tile::<1>(a, b, format, acts, t0, chunk),
            }
        }
    });
}

/// Calls `tile(first token, outputs)` for each register tile of `out`, whose tokens
/// start at `t0`: tiles of 8 tokens, then one of 4, then single tokens.
fn for_each_tile(t0: usize, out: &mut [PairOut], mut tile: impl FnMut(usize, &mut [PairOut])) {
    let mut first = t0;
    let mut rest = out;
    while !rest.is_empty() {
        let len = match rest.len() {
            TILE_TOKENS.. => TILE_TOKENS,
            HALF_TILE_TOKENS.. => HALF_TILE_TOKENS,
            _ => 1,
        };
        let (chunk, tail) = rest.split_at_mut(len);
        tile(first, chunk);
        first += len;
        rest = tail;
    }
}

/// Blocks ahead of the one being computed that [`prefetch_ahead`] asks for.
const PREFETCH_BLOCKS: usize = 4;

/// Asks for both panels' block `PREFETCH_BLOCKS` ahead. The pair reads two streams that
/// restart every panel (a few KB), which the hardware prefetchers follow poorly when the
/// weights come from DRAM (batched decode): without this, 8 tokens of the model's
/// lm_head ran slower through the pairs than through the single-stream panels. Past
/// panel A's end the address lies in panel B (already read), past B's in the next pair.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn prefetch_ahead(block_a: *const u8, block_b: *const u8, panel_block: usize) {
    let ahead = PREFETCH_BLOCKS * panel_block;
    for line in (0..panel_block).step_by(64) {
        // A prefetch never faults, whatever the address: wrapping arithmetic keeps the
        // pointer computation itself defined.
        _mm_prefetch::<_MM_HINT_T0>(block_a.wrapping_add(ahead + line).cast());
        _mm_prefetch::<_MM_HINT_T0>(block_b.wrapping_add(ahead + line).cast());
    }
}

/// 32 bytes of panel A's block then the same 32 bytes of panel B's.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn load_pair(a: *const u8, b: *const u8) -> __m512i {
    // SAFETY: the caller passes 32 readable bytes at each.
    unsafe {
        let low = _mm256_loadu_si256(a.cast());
        let high = _mm256_loadu_si256(b.cast());
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
    }
}

/// The 8 f16 values at `a` then the 8 at `b`, as 16 f32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn load_f16_pair(a: *const u8, b: *const u8) -> __m512 {
    // SAFETY: the caller passes 16 readable bytes at each.
    unsafe {
        let low = _mm_loadu_si128(a.cast());
        let high = _mm_loadu_si128(b.cast());
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(low),
            high,
        ))
    }
}

/// Stores token `t`'s 16 lanes (rows 0..8 of A, then of B) into `out[t]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn store_rows<const T: usize>(acc: &[__m512; T], out: &mut [PairOut]) {
    assert!(out.len() == T);
    for (row_values, lanes) in out.iter_mut().zip(acc) {
        // SAFETY: a `PairOut` holds 16 f32.
        unsafe { _mm512_storeu_ps(row_values.as_mut_ptr(), *lanes) };
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_tile<const HAS_MIN: bool, const T: usize>(
    a: &[u8],
    b: &[u8],
    format: &PanelFormat,
    acts: &Q8Acts,
    t0: usize,
    out: &mut [PairOut],
) {
    let n_blocks = acts.blocks_per_row();
    let qs: [*const i8; T] = std::array::from_fn(|t| acts.qs(t0 + t).as_ptr());
    let scales: [*const f32; T] = std::array::from_fn(|t| acts.scales(t0 + t).as_ptr());
    let act_sums: [*const f32; T] = std::array::from_fn(|t| acts.sums(t0 + t).as_ptr());
    let low_nibbles = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); T];
    for blk in 0..n_blocks {
        // SAFETY: `pair_panels` checked both panels hold `n_blocks` blocks, and every
        // token row holds `n_blocks` blocks of 32 quants, one scale and one sum each.
        let (block_a, block_b, x, scale, act_sum) = unsafe {
            (
                a.as_ptr().add(blk * format.panel_block),
                b.as_ptr().add(blk * format.panel_block),
                qs.map(|q| q.add(blk * QK)),
                scales.map(|s| s.add(blk).read()),
                act_sums.map(|s| s.add(blk).read()),
            )
        };
        prefetch_ahead(block_a, block_b, format.panel_block);
        let (quants_a, quants_b) = (
            // SAFETY: a panel block holds its 4 × 32 nibble bytes at `quants()`.
            unsafe { block_a.add(format.quants()) },
            unsafe { block_b.add(format.quants()) },
        );
        // Lane k of `lo` holds row k's elements 4g..4g+4 (rows 8..16: panel B's), of
        // `hi` elements 16+4g..16+4g+4, as in the 256-bit panels.
        let mut sums = [_mm512_setzero_si512(); T];
        for g in 0..4 {
            // SAFETY: group g is 32 bytes at 32g of each block's quants.
            let raw = unsafe { load_pair(quants_a.add(32 * g), quants_b.add(32 * g)) };
            let lo = _mm512_and_si512(raw, low_nibbles);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low_nibbles);
            for t in 0..T {
                // SAFETY: `x[t]` points at 32 quants; 4g + 4 <= 16 and 16 + 4g + 4 <= 32.
                let (x_lo, x_hi) = unsafe {
                    (
                        _mm512_set1_epi32(x[t].add(4 * g).cast::<i32>().read_unaligned()),
                        _mm512_set1_epi32(x[t].add(16 + 4 * g).cast::<i32>().read_unaligned()),
                    )
                };
                sums[t] = _mm512_dpbusd_epi32(sums[t], lo, x_lo);
                sums[t] = _mm512_dpbusd_epi32(sums[t], hi, x_hi);
            }
        }
        // SAFETY: the scale (and min) arrays are 16 bytes at offsets 0 (and 16).
        let d = unsafe {
            load_f16_pair(
                block_a.add(PanelFormat::SCALES),
                block_b.add(PanelFormat::SCALES),
            )
        };
        let m = if HAS_MIN {
            // SAFETY: as above.
            unsafe {
                load_f16_pair(
                    block_a.add(PanelFormat::MINS),
                    block_b.add(PanelFormat::MINS),
                )
            }
        } else {
            _mm512_mul_ps(d, _mm512_set1_ps(-8.0))
        };
        for t in 0..T {
            let row_scale = _mm512_mul_ps(d, _mm512_set1_ps(scale[t]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[t]), row_scale, acc[t]);
            acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(act_sum[t]), acc[t]);
        }
    }
    store_rows(&acc, out);
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_tile<const T: usize>(
    a: &[u8],
    b: &[u8],
    format: &PanelFormat,
    acts: &Q8Acts,
    t0: usize,
    out: &mut [PairOut],
) {
    let n_blocks = acts.blocks_per_row();
    let qs: [*const i8; T] = std::array::from_fn(|t| acts.qs(t0 + t).as_ptr());
    let scales: [*const f32; T] = std::array::from_fn(|t| acts.scales(t0 + t).as_ptr());
    // After the qword permute (within each 256-bit half), each 128-bit lane holds 4
    // rows' pairs of group 2h then the same rows' pairs of group 2h+1; this puts row k's
    // 4 consecutive elements in 32-bit lane k of each half.
    let interleave = _mm512_broadcast_i32x4(_mm_setr_epi8(
        0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
    ));
    let block_sums: [*const i32; T] = std::array::from_fn(|t| acts.block_sums(t0 + t).as_ptr());
    let offset = _mm512_set1_epi8(i8::MIN);
    let mut acc = [_mm512_setzero_ps(); T];
    for blk in 0..n_blocks {
        // SAFETY: as in `q4_tile`; `quantize` gave every block its sum.
        let (block_a, block_b, x, scale, x_sum) = unsafe {
            (
                a.as_ptr().add(blk * format.panel_block),
                b.as_ptr().add(blk * format.panel_block),
                qs.map(|q| q.add(blk * QK)),
                scales.map(|s| s.add(blk).read()),
                block_sums.map(|s| s.add(blk).read()),
            )
        };
        prefetch_ahead(block_a, block_b, format.panel_block);
        let (quants_a, quants_b) = (
            // SAFETY: a panel block holds its 16 × 16 quant bytes at `quants()`.
            unsafe { block_a.add(format.quants()) },
            unsafe { block_b.add(format.quants()) },
        );
        let mut dots = [_mm512_setzero_si512(); T];
        for h in 0..QK / 4 {
            // SAFETY: groups 2h and 2h+1 are the 32 bytes at 32h of each block's quants.
            let raw = unsafe { load_pair(quants_a.add(32 * h), quants_b.add(32 * h)) };
            let w = _mm512_shuffle_epi8(_mm512_permutex_epi64::<0b11_01_10_00>(raw), interleave);
            // w + 128 as an unsigned byte.
            let w_offset = _mm512_xor_si512(w, offset);
            for t in 0..T {
                // SAFETY: `x[t]` points at 32 quants; 4h + 4 <= 32.
                let quad = unsafe { x[t].add(4 * h).cast::<i32>().read_unaligned() };
                dots[t] = _mm512_dpbusd_epi32(dots[t], w_offset, _mm512_set1_epi32(quad));
            }
        }
        for t in 0..T {
            dots[t] = _mm512_sub_epi32(dots[t], _mm512_set1_epi32(128 * x_sum[t]));
        }
        // SAFETY: the scale array is 16 bytes at offset 0.
        let d = unsafe {
            load_f16_pair(
                block_a.add(PanelFormat::SCALES),
                block_b.add(PanelFormat::SCALES),
            )
        };
        for t in 0..T {
            let row_scale = _mm512_mul_ps(d, _mm512_set1_ps(scale[t]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[t]), row_scale, acc[t]);
        }
    }
    store_rows(&acc, out);
}

const _: () = assert!(PAIR_ROWS == 2 * PANEL_ROWS && PANEL_ROWS == 8);

//! AMX int8 tile kernels for the Q4_0/Q4_1/Q8_0 panels at many tokens (prefill, large
//! batches): the `tiles` entries of the `amx` family's [`PanelTable`](super::PanelTable).
//!
//! One call computes a pair of panels (16 weight rows; a lone last panel is paired with
//! zeros) against a run of tokens in tiles of 16 or 8:
//!
//! 1. Repack: each 32-value block of the pair becomes one B tile (`super::super::tiles`):
//!    row j holds elements 4j..4j+4 of each of the 16 rows, as bytes. Q4 nibbles are
//!    split (unsigned 0..15); Q8_0 pairs are interleaved into quads. The row scales
//!    (and Q4 mins, or `-8·d` for Q4_0) go beside it as f32, converted once. This is done
//!    once per call, into a thread-local scratch, and reused by every token tile.
//! 2. Per token tile and block: the activations' A tile is loaded straight from
//!    [`Q8Acts`] (one row per token, stride = columns), multiplied with `tdpbsud` (Q4:
//!    signed activations × unsigned nibbles) or `tdpbssd` (Q8_0: both signed), so no sign
//!    tricks are needed, and the i32 C tile is stored to the stack.
//! 3. The f32 steps of the AVX2 kernels, in the same order, on 16-lane vectors: per token,
//!    `acc = fma(float(dot), d·s, acc)`, then (Q4) `acc = fma(m, s·Σa, acc)`. Lane-wise
//!    IEEE operations do not depend on vector width, and each block's dot product is
//!    exact in i32 in both, so results are bit-identical to `avx2` and `vnni`.
//!
//! The kernels are only reachable through the `amx` table, which `quant_dot::panel_table`
//! hands out only when [`tiles::availability`](super::super::tiles::availability) is Ok
//! (which implies AVX-512 F/BW/VL, checked there too): that is what the `unsafe` calls of
//! the `#[target_feature]` functions here rely on.

use std::cell::RefCell;
use std::ops::Range;

use std::arch::x86_64::*;

use super::{PAIR_ROWS, PairOut, Q8Acts, QK};
use crate::kernels::aligned::AlignedBytes;
use crate::kernels::packed::PanelFormat;
use crate::kernels::tiles::{B_TILE_BYTES, Tiles};

/// Bytes of one repacked block: the B tile, then 16 f32 scales, then 16 f32 mins.
const PACKED_BLOCK: usize = B_TILE_BYTES + 2 * 64;
const SCALES_AT: usize = B_TILE_BYTES;
const MINS_AT: usize = B_TILE_BYTES + 64;

/// The i32 C tiles of two blocks × up to 16 tokens, 64-byte aligned for vector loads.
#[repr(C, align(64))]
struct CTiles([i32; 2 * 16 * PAIR_ROWS]);

/// The token runs these kernels take are multiples of this (the smallest tile).
pub(crate) const RUN_TOKENS: usize = 8;

/// The smallest matmul (in tokens) these kernels take; smaller ones, and the tokens a
/// run of 8s leaves over, go to the 512-bit VNNI pairs, which are faster there
/// (`docs/benchmarks.md`, issue 20: the tile multiply waits on the repack and the f32
/// steps, which only enough tokens amortise).
pub(crate) const FROM_TOKENS: usize = 16;

/// Checks what the kernels read and write, so the raw loads below stay in bounds.
fn check_pair(
    panels: &[u8],
    live: usize,
    format: &PanelFormat,
    acts: &Q8Acts,
    tokens: &Range<usize>,
    out: &[PairOut],
) {
    assert!(live == 1 || live == 2, "a pair holds 1 or 2 live panels");
    assert!(panels.len() == live * acts.blocks_per_row() * format.panel_block);
    assert!(tokens.end <= acts.n_tokens && tokens.len().is_multiple_of(RUN_TOKENS));
    assert!(out.len() == tokens.len());
}

/// Q4_0 (`HAS_MIN = false`) or Q4_1 panels × `tokens` (a multiple of 8) into `out`.
pub(crate) fn q4_pair<const HAS_MIN: bool>(
    panels: &[u8],
    live: usize,
    format: &PanelFormat,
    acts: &Q8Acts,
    tokens: Range<usize>,
    out: &mut [PairOut],
) {
    check_pair(panels, live, format, acts, &tokens, out);
    with_packed(acts.blocks_per_row(), |packed| {
        // SAFETY: the table holding this kernel exists only where AMX and AVX-512 are
        // available (module note); `check_pair` checked the panels.
        unsafe { repack_q4::<HAS_MIN>(panels, live, format, packed) };
        run_tiles::<false, true>(packed, acts, tokens, out);
    });
}

/// Q8_0 panels × `tokens` (a multiple of 8) into `out`.
pub(crate) fn q8_0_pair(
    panels: &[u8],
    live: usize,
    format: &PanelFormat,
    acts: &Q8Acts,
    tokens: Range<usize>,
    out: &mut [PairOut],
) {
    check_pair(panels, live, format, acts, &tokens, out);
    with_packed(acts.blocks_per_row(), |packed| {
        // SAFETY: as in `q4_pair`.
        unsafe { repack_q8_0(panels, live, format, packed) };
        run_tiles::<true, false>(packed, acts, tokens, out);
    });
}

/// Runs `body` with this thread's repack scratch sized for `n_blocks` blocks.
fn with_packed(n_blocks: usize, body: impl FnOnce(&mut [u8])) {
    thread_local! {
        static PACKED: RefCell<AlignedBytes> = RefCell::new(AlignedBytes::default());
    }
    PACKED.with(|cell| {
        let mut packed = cell.borrow_mut();
        packed.resize(n_blocks * PACKED_BLOCK);
        body(packed.as_mut_slice());
    });
}

/// The token tiles of one call: 16 at a time, then 8.
fn run_tiles<const SIGNED_B: bool, const MIN_TERM: bool>(
    packed: &[u8],
    acts: &Q8Acts,
    tokens: Range<usize>,
    out: &mut [PairOut],
) {
    let tiles = Tiles::for_this_thread().expect("the amx table exists only where AMX is usable");
    let mut t = tokens.start;
    for chunk in out.chunks_mut(16) {
        // SAFETY: AMX and AVX-512 are available (module note); `check_pair` bounded the
        // tokens, and `packed` holds one repacked block per activation block.
        unsafe {
            if chunk.len() == 16 {
                token_tile::<16, SIGNED_B, MIN_TERM>(&tiles, packed, acts, t, chunk);
            } else {
                token_tile::<8, SIGNED_B, MIN_TERM>(&tiles, packed, acts, t, chunk);
            }
        }
        t += chunk.len();
    }
}

/// Tokens `t0..t0 + M` × the repacked pair: per block, one tile multiply (two blocks'
/// at once for 16 tokens), then the f32 steps of the AVX2 kernels on 16 rows at once.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn token_tile<const M: usize, const SIGNED_B: bool, const MIN_TERM: bool>(
    tiles: &Tiles,
    packed: &[u8],
    acts: &Q8Acts,
    t0: usize,
    out: &mut [PairOut],
) {
    let n_blocks = acts.blocks_per_row();
    assert!(packed.len() >= n_blocks * PACKED_BLOCK && out.len() == M);
    let a_rows = &acts.qs.as_i8()[t0 * acts.cols..(t0 + M) * acts.cols];
    let scales: [*const f32; M] = std::array::from_fn(|t| acts.scales(t0 + t).as_ptr());
    let sums: [*const f32; M] = std::array::from_fn(|t| acts.sums(t0 + t).as_ptr());
    let mut c = CTiles([0; 2 * 16 * PAIR_ROWS]);
    let mut acc = [_mm512_setzero_ps(); M];
    let mut b = 0;
    while b < n_blocks {
        let two = M == 16 && b + 1 < n_blocks;
        // SAFETY: b (and b + 1 when `two`) < n_blocks: the packed blocks are in bounds
        // (asserted above), the A rows are M rows of `cols` >= (b + 2)·32 bytes, and `c`
        // holds 2 × 16 rows.
        unsafe {
            let a = a_rows.as_ptr().add(b * QK);
            let block = packed.as_ptr().add(b * PACKED_BLOCK);
            if two {
                let next = block.add(PACKED_BLOCK);
                tiles.dot_block_pair::<SIGNED_B>(a, acts.cols, block, next, c.0.as_mut_ptr());
            } else {
                tiles.dot_block::<M, SIGNED_B>(a, acts.cols, block, c.0.as_mut_ptr());
            }
        }
        for (i, dots) in
            c.0.chunks_exact(16 * PAIR_ROWS)
                .take(1 + two as usize)
                .enumerate()
        {
            // SAFETY: block b + i < n_blocks holds its scales and mins; the token rows
            // hold n_blocks scales and sums.
            unsafe {
                let block = packed.as_ptr().add((b + i) * PACKED_BLOCK);
                let step = BlockStep::<M> {
                    block,
                    scales: scales.map(|s| s.add(b + i)),
                    sums: sums.map(|s| s.add(b + i)),
                };
                step.apply::<MIN_TERM>(dots, &mut acc);
            }
        }
        b += 1 + two as usize;
    }
    for (row, acc) in out.iter_mut().zip(acc) {
        // SAFETY: `row` holds 16 f32.
        unsafe { _mm512_storeu_ps(row.as_mut_ptr(), acc) };
    }
}

/// One block's f32 step for `M` tokens: where its scales, mins and the tokens' scale
/// and sum for the block are.
struct BlockStep<const M: usize> {
    block: *const u8,
    scales: [*const f32; M],
    sums: [*const f32; M],
}

impl<const M: usize> BlockStep<M> {
    /// `acc[t] = fma(float(dot[t]), d·s[t], acc[t])`, then with `MIN_TERM`
    /// `acc[t] = fma(m, s[t]·Σa[t], acc[t])`: the AVX2 kernels' operations, 16 rows wide.
    ///
    /// # Safety
    /// `block` is a 64-byte aligned repacked block; every pointer is readable.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn apply<const MIN_TERM: bool>(&self, dots: &[i32], acc: &mut [__m512; M]) {
        assert!(dots.len() >= M * PAIR_ROWS);
        // SAFETY: the caller guarantees the block and pointers; `dots` holds M aligned
        // rows of 16 i32 (checked above; the C tiles are 64-byte aligned).
        unsafe {
            let d = _mm512_load_ps(self.block.add(SCALES_AT).cast());
            let m = _mm512_load_ps(self.block.add(MINS_AT).cast());
            for (t, acc) in acc.iter_mut().enumerate() {
                let dots = _mm512_load_si512(dots.as_ptr().add(PAIR_ROWS * t).cast());
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(self.scales[t].read()));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), scale, *acc);
                if MIN_TERM {
                    *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(self.sums[t].read()), *acc);
                }
            }
        }
    }
}

/// Two panels' 8 f16 values each (at `first` and `second`, or zeros for a lone panel)
/// as 16 f32, stored at `dst` (64 bytes, aligned); returns them.
///
/// # Safety
/// `first` (and `second`) readable for 16 bytes, `dst` writable for 64 and 64-byte
/// aligned; AVX-512 F/BW/VL available.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn store_f16x16(first: *const u8, second: Option<*const u8>, dst: *mut u8) -> __m512 {
    // SAFETY: the caller guarantees the ranges.
    unsafe {
        let low = _mm_loadu_si128(first.cast());
        let high = second.map_or(_mm_setzero_si128(), |p| _mm_loadu_si128(p.cast()));
        let halves = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(low), high);
        let values = _mm512_cvtph_ps(halves);
        _mm512_store_ps(dst.cast(), values);
        values
    }
}

/// The 32 bytes at `first + at` and at `second + at` (zeros for a lone panel) as one
/// 64-byte vector.
///
/// # Safety
/// Both ranges readable; AVX-512 F available.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn load_pair32(first: *const u8, second: Option<*const u8>, at: usize) -> __m512i {
    // SAFETY: the caller guarantees the ranges.
    unsafe {
        let low = _mm256_loadu_si256(first.add(at).cast());
        let high = second.map_or(_mm256_setzero_si256(), |p| {
            _mm256_loadu_si256(p.add(at).cast())
        });
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
    }
}

/// The two panels' blocks `b`: the first, and the second unless the panel is lone.
///
/// # Safety
/// `panels` holds `live` panels of `n_blocks` blocks and b < n_blocks.
#[inline(always)]
unsafe fn pair_blocks(
    panels: &[u8],
    live: usize,
    format: &PanelFormat,
    n_blocks: usize,
    b: usize,
) -> (*const u8, Option<*const u8>) {
    let panel_bytes = n_blocks * format.panel_block;
    // SAFETY: in bounds per the caller's guarantee.
    unsafe {
        let first = panels.as_ptr().add(b * format.panel_block);
        (first, (live == 2).then(|| first.add(panel_bytes)))
    }
}

/// Q4 pair → B tiles of unpacked nibbles plus f32 scales and mins (`-8·d` for Q4_0).
///
/// # Safety
/// AVX-512 F/BW/VL available; `panels` checked by `check_pair`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn repack_q4<const HAS_MIN: bool>(
    panels: &[u8],
    live: usize,
    format: &PanelFormat,
    packed: &mut [u8],
) {
    let n_blocks = panels.len() / live / format.panel_block;
    assert!(packed.len() >= n_blocks * PACKED_BLOCK);
    let low = _mm512_set1_epi8(0x0F);
    for b in 0..n_blocks {
        // SAFETY: b < n_blocks (see the function's contract); the packed block is in
        // bounds (asserted above) and 64-byte aligned (aligned scratch, 640-byte blocks);
        // a Q4 panel block holds 4 groups of 32 nibble bytes at `quants()` and d[8]
        // (and m[8]) at 0 (and 16). B rows j and 4 + j are 64 bytes at 64j.
        unsafe {
            let (first, second) = pair_blocks(panels, live, format, n_blocks, b);
            let dst = packed.as_mut_ptr().add(b * PACKED_BLOCK);
            let quants = format.quants();
            for j in 0..4 {
                let raw = load_pair32(first, second, quants + 32 * j);
                let lo = _mm512_and_si512(raw, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                _mm512_store_si512(dst.add(64 * j).cast(), lo);
                _mm512_store_si512(dst.add(64 * (4 + j)).cast(), hi);
            }
            let at = |offset: usize| second.map(|p| p.add(offset));
            let d = store_f16x16(first, at(PanelFormat::SCALES), dst.add(SCALES_AT));
            if HAS_MIN {
                let mins = first.add(PanelFormat::MINS);
                store_f16x16(mins, at(PanelFormat::MINS), dst.add(MINS_AT));
            } else {
                // The same lane-wise operation as the AVX2 kernel's `m`.
                let m = _mm512_mul_ps(d, _mm512_set1_ps(-8.0));
                _mm512_store_ps(dst.add(MINS_AT).cast(), m);
            }
        }
    }
}

/// Q8_0 pair → B tiles of quads (group 2j's pair then group 2j+1's pair, per row) plus
/// f32 scales.
///
/// # Safety
/// As [`repack_q4`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn repack_q8_0(panels: &[u8], live: usize, format: &PanelFormat, packed: &mut [u8]) {
    let n_blocks = panels.len() / live / format.panel_block;
    assert!(packed.len() >= n_blocks * PACKED_BLOCK);
    // Loaded: per panel p, 16-bit words 16p..16p+8 are group 2j's pairs of rows 0..7,
    // 16p+8..16p+16 group 2j+1's. Wanted: row n's quad = word 16p + 8s + n at 16p + 2n + s.
    let quads = _mm512_set_epi16(
        31, 23, 30, 22, 29, 21, 28, 20, 27, 19, 26, 18, 25, 17, 24, 16, //
        15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0,
    );
    for b in 0..n_blocks {
        // SAFETY: as in `repack_q4`; a Q8_0 panel block holds 16 groups of 16 quant bytes
        // at `quants()` and d[8] at 0.
        unsafe {
            let (first, second) = pair_blocks(panels, live, format, n_blocks, b);
            let dst = packed.as_mut_ptr().add(b * PACKED_BLOCK);
            for j in 0..8 {
                let raw = load_pair32(first, second, format.quants() + 32 * j);
                let row = _mm512_permutexvar_epi16(quads, raw);
                _mm512_store_si512(dst.add(64 * j).cast(), row);
            }
            let scales = second.map(|p| p.add(PanelFormat::SCALES));
            store_f16x16(first.add(PanelFormat::SCALES), scales, dst.add(SCALES_AT));
        }
    }
}

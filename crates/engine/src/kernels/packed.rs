//! The row-interleaved ("panel") layout of the 32-element block formats Q4_0, Q4_1 and
//! Q8_0, which is how a [`QMatrix`](super::QMatrix) stores them.
//!
//! Rows are grouped in panels of 8 (the last one padded with zero rows). A panel stores,
//! for each 32-column block in turn, the 8 rows' blocks side by side with their scales
//! gathered:
//!
//! - Q4_1: `d[8]` f16, `m[8]` f16, then the nibbles in 4 groups of 32 bytes: group `g`
//!   holds bytes `4g..4g+4` of each row's 16 GGML nibble bytes, row `k` at `4k` (low
//!   nibbles: elements `4g..4g+4`; high nibbles: elements `16+4g..16+4g+4`). 160 bytes
//!   per block, the same as 8 GGML blocks.
//! - Q4_0: as Q4_1 without `m`: 144 bytes.
//! - Q8_0: `d[8]` f16, then the quants in 16 groups of 16 bytes: group `g` holds
//!   elements `2g, 2g+1` of each row, row `k` at `2k`. 272 bytes.
//!
//! The grouping puts consecutive elements of row `k` in 32-bit lane `k` of one AVX2
//! register (4 nibbles, or 2 quants once sign-extended to 16 bits), so multiply-adds
//! against broadcast activations leave each row's sum in its own lane, with no
//! horizontal adds. Bytes are moved, never changed.

use candle_core::quantized::GgmlDType;

/// Rows per panel.
pub(crate) const PANEL_ROWS: usize = 8;

/// Where the pieces of one row's block live inside a panel block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PanelFormat {
    /// Bytes of one GGML block.
    pub(crate) ggml_block: usize,
    /// Bytes of one panel block (8 rows).
    pub(crate) panel_block: usize,
    has_min: bool,
    four_bit: bool,
}

impl PanelFormat {
    pub(crate) fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self {
                ggml_block: 18,
                panel_block: 144,
                has_min: false,
                four_bit: true,
            }),
            GgmlDType::Q4_1 => Some(Self {
                ggml_block: 20,
                panel_block: 160,
                has_min: true,
                four_bit: true,
            }),
            GgmlDType::Q8_0 => Some(Self {
                ggml_block: 34,
                panel_block: 272,
                has_min: false,
                four_bit: false,
            }),
            _ => None,
        }
    }

    /// Offset of the scales (`d[8]`) in a panel block; `m[8]` follows for Q4_1.
    pub(crate) const SCALES: usize = 0;
    pub(crate) const MINS: usize = 16;

    /// Offset of the quants in a panel block.
    pub(crate) fn quants(&self) -> usize {
        if self.has_min { 32 } else { 16 }
    }

    /// (offset in the panel block, offset in the GGML block, length) of the pieces of
    /// row `k`'s block: scale, optional min, quants (in groups, see the module doc).
    fn pieces(&self, k: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        let scale = (Self::SCALES + 2 * k, 0, 2);
        let min = self.has_min.then_some((Self::MINS + 2 * k, 2, 2));
        // Bytes per row in one group, and groups per block.
        let (len, groups) = if self.four_bit { (4, 4) } else { (2, 16) };
        let quants_at = self.quants();
        let ggml_quants_at = self.ggml_block - len * groups;
        let quants = (0..groups).map(move |g| {
            (
                quants_at + PANEL_ROWS * len * g + len * k,
                ggml_quants_at + len * g,
                len,
            )
        });
        std::iter::once(scale).chain(min).chain(quants)
    }
}

/// The 16 GGML nibble bytes of row `k` of a 4-bit panel block (see the module doc).
pub(crate) fn q4_row_nibbles(format: &PanelFormat, block: &[u8], k: usize) -> [u8; 16] {
    let mut nibbles = [0u8; 16];
    for g in 0..4 {
        let at = format.quants() + 32 * g + 4 * k;
        nibbles[4 * g..4 * g + 4].copy_from_slice(&block[at..at + 4]);
    }
    nibbles
}

/// The 32 quants of row `k` of a Q8_0 panel block (see the module doc).
pub(crate) fn q8_row_quants(format: &PanelFormat, block: &[u8], k: usize) -> [i8; 32] {
    let mut quants = [0i8; 32];
    for g in 0..16 {
        let at = format.quants() + 16 * g + 2 * k;
        quants[2 * g] = block[at] as i8;
        quants[2 * g + 1] = block[at + 1] as i8;
    }
    quants
}

/// Bytes of a packed `[rows, cols]` matrix.
pub(crate) fn packed_len(format: &PanelFormat, rows: usize, cols: usize) -> usize {
    rows.div_ceil(PANEL_ROWS) * (cols / 32) * format.panel_block
}

/// Packs row-major GGML bytes (`rows` rows of `cols / 32` blocks) into `dst`
/// (`packed_len` bytes, zeroed: padding rows stay zero).
pub(crate) fn pack(format: &PanelFormat, rows: usize, cols: usize, ggml: &[u8], dst: &mut [u8]) {
    let blocks = cols / 32;
    let row_bytes = blocks * format.ggml_block;
    for row in 0..rows {
        let (panel, k) = (row / PANEL_ROWS, row % PANEL_ROWS);
        for b in 0..blocks {
            let src = &ggml[row * row_bytes + b * format.ggml_block..][..format.ggml_block];
            let block = &mut dst[(panel * blocks + b) * format.panel_block..][..format.panel_block];
            for (at_panel, at_ggml, len) in format.pieces(k) {
                block[at_panel..at_panel + len].copy_from_slice(&src[at_ggml..at_ggml + len]);
            }
        }
    }
}

/// Writes row `row`'s GGML blocks (`cols / 32` of them) from packed bytes into `dst`.
pub(crate) fn unpack_row(
    format: &PanelFormat,
    cols: usize,
    packed: &[u8],
    row: usize,
    dst: &mut [u8],
) {
    let blocks = cols / 32;
    let (panel, k) = (row / PANEL_ROWS, row % PANEL_ROWS);
    for b in 0..blocks {
        let block = &packed[(panel * blocks + b) * format.panel_block..][..format.panel_block];
        let out = &mut dst[b * format.ggml_block..][..format.ggml_block];
        for (at_panel, at_ggml, len) in format.pieces(k) {
            out[at_ggml..at_ggml + len].copy_from_slice(&block[at_panel..at_panel + len]);
        }
    }
}

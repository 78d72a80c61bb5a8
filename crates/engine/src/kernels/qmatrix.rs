//! Weight matrices in GGML block formats.
//!
//! A [`QMatrix`] is `[rows, cols]` with rows the output features (`y = W x`). Each row is
//! `cols / block_size` blocks of the dtype's GGML layout, in a 64-byte aligned buffer the
//! matrix owns: row-major as GGUF stores them, or for Q4_0/Q4_1/Q8_0 interleaved in
//! panels of 8 rows (`packed.rs`). The block layouts and their reference (de)quantizers
//! are candle's (`k_quants::GgmlType`).

use std::borrow::Cow;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::GgmlType;

use super::KernelError;
use super::aligned::AlignedBytes;
use super::packed::{self, PanelFormat};

/// Runs `$body` with `$T` bound to the candle block type of `$dtype`.
macro_rules! with_block_type {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            ::candle_core::quantized::GgmlDType::F32 => {
                type $T = f32;
                $body
            }
            ::candle_core::quantized::GgmlDType::F16 => {
                type $T = ::half::f16;
                $body
            }
            ::candle_core::quantized::GgmlDType::BF16 => {
                type $T = ::half::bf16;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q4_0 => {
                type $T = ::candle_core::quantized::k_quants::BlockQ4_0;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q4_1 => {
                type $T = ::candle_core::quantized::k_quants::BlockQ4_1;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q5_0 => {
                type $T = ::candle_core::quantized::k_quants::BlockQ5_0;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q5_1 => {
                type $T = ::candle_core::quantized::k_quants::BlockQ5_1;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q8_0 => {
                type $T = ::candle_core::quantized::k_quants::BlockQ8_0;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q8_1 => {
                type $T = ::candle_core::quantized::k_quants::BlockQ8_1;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q2K => {
                type $T = ::candle_core::quantized::k_quants::BlockQ2K;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q3K => {
                type $T = ::candle_core::quantized::k_quants::BlockQ3K;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q4K => {
                type $T = ::candle_core::quantized::k_quants::BlockQ4K;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q5K => {
                type $T = ::candle_core::quantized::k_quants::BlockQ5K;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q6K => {
                type $T = ::candle_core::quantized::k_quants::BlockQ6K;
                $body
            }
            ::candle_core::quantized::GgmlDType::Q8K => {
                type $T = ::candle_core::quantized::k_quants::BlockQ8K;
                $body
            }
        }
    };
}
pub(crate) use with_block_type;

/// A weight matrix `[rows, cols]` in one GGML block format.
///
/// Q4_0, Q4_1 and Q8_0 matrices keep their blocks in row-interleaved panels of 8 rows
/// (see `packed.rs`: same bytes per weight, laid out for the SIMD kernels); every other
/// format is stored row-major exactly as GGUF has it.
#[derive(Clone)]
pub struct QMatrix {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    /// Bytes per row in GGML layout.
    row_bytes: usize,
    panels: Option<PanelFormat>,
    data: AlignedBytes,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// Bytes one row of `cols` elements takes in `dtype`, or an error when `cols` is not a
/// whole number of blocks.
pub fn row_bytes(dtype: GgmlDType, cols: usize) -> Result<usize, KernelError> {
    let block_size = dtype.block_size();
    if !cols.is_multiple_of(block_size) {
        return Err(KernelError::RaggedBlocks {
            dtype,
            cols,
            block_size,
        });
    }
    Ok(cols / block_size * dtype.type_size())
}

/// Bytes of a `[rows, cols]` matrix in GGML layout, checked for overflow.
fn ggml_len(dtype: GgmlDType, rows: usize, cols: usize) -> Result<(usize, usize), KernelError> {
    let row_bytes = row_bytes(dtype, cols)?;
    let total = rows
        .checked_mul(row_bytes)
        .ok_or_else(|| KernelError::InvalidShape {
            what: "QMatrix",
            detail: format!("[{rows}, {cols}] overflows"),
        })?;
    Ok((row_bytes, total))
}

impl QMatrix {
    /// Copies GGML-format bytes (`rows` rows of `cols` elements, row-major, as in a GGUF
    /// file) into a new matrix.
    pub fn from_raw(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, KernelError> {
        let (row_bytes, expected) = ggml_len(dtype, rows, cols)?;
        if bytes.len() != expected {
            return Err(KernelError::ByteLength {
                dtype,
                rows,
                cols,
                expected,
                actual: bytes.len(),
            });
        }
        let panels = PanelFormat::of(dtype);
        let data = match &panels {
            Some(format) => {
                let mut data = AlignedBytes::zeroed(packed::packed_len(format, rows, cols));
                packed::pack(format, rows, cols, bytes, data.as_mut_slice());
                data
            }
            None => AlignedBytes::from_slice(bytes),
        };
        Ok(Self {
            dtype,
            rows,
            cols,
            row_bytes,
            panels,
            data,
        })
    }

    /// Quantizes row-major f32 `values` (`rows * cols` of them) to `dtype`.
    pub fn from_f32(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        values: &[f32],
    ) -> Result<Self, KernelError> {
        let (row_bytes, total) = ggml_len(dtype, rows, cols)?;
        super::check_len("QMatrix::from_f32 values", rows * cols, values.len())?;
        let mut ggml = AlignedBytes::zeroed(total);
        if cols > 0 {
            let rows_out = ggml.as_mut_slice().chunks_exact_mut(row_bytes);
            for (row_out, row_in) in rows_out.zip(values.chunks_exact(cols)) {
                with_block_type!(dtype, T => T::from_float(row_in, blocks_mut::<T>(row_out)));
            }
        }
        Self::from_raw(dtype, rows, cols, ggml.as_slice())
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes per row in GGML layout.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Bytes the matrix occupies (including panel padding).
    pub fn storage_bytes(&self) -> usize {
        self.data.as_slice().len()
    }

    /// The matrix in GGML layout (row-major blocks, as in a GGUF file): borrowed for
    /// row-major formats, rebuilt for the panel formats.
    pub fn ggml_bytes(&self) -> Cow<'_, [u8]> {
        match &self.panels {
            None => Cow::Borrowed(self.data.as_slice()),
            Some(format) => {
                let mut out = vec![0u8; self.rows * self.row_bytes];
                if self.row_bytes > 0 {
                    for (row, dst) in out.chunks_exact_mut(self.row_bytes).enumerate() {
                        packed::unpack_row(format, self.cols, self.data.as_slice(), row, dst);
                    }
                }
                Cow::Owned(out)
            }
        }
    }

    /// The panel layout, if this matrix uses one.
    pub(crate) fn panel_format(&self) -> Option<&PanelFormat> {
        self.panels.as_ref()
    }

    /// All stored bytes (panels or row-major GGML).
    pub(crate) fn storage(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The GGML bytes of rows `start..end` of a row-major matrix (`end <= rows`, and
    /// the matrix not panelled: both debug-asserted).
    #[inline]
    pub(crate) fn rows_bytes(&self, start: usize, end: usize) -> &[u8] {
        debug_assert!(start <= end && end <= self.rows && self.panels.is_none());
        &self.data.as_slice()[start * self.row_bytes..end * self.row_bytes]
    }

    /// Dequantizes row `row` into `out` (`cols` values).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if row >= self.rows {
            return Err(KernelError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        super::check_len("dequantize_row output", self.cols, out.len())?;
        let mut scratch = Vec::new();
        self.dequantize_row_unchecked(row, out, &mut scratch);
        Ok(())
    }

    /// `scratch` holds the row's GGML bytes for panel formats (reused across calls).
    fn dequantize_row_unchecked(&self, row: usize, out: &mut [f32], scratch: &mut Vec<u8>) {
        let bytes = match &self.panels {
            None => self.rows_bytes(row, row + 1),
            Some(format) => {
                scratch.resize(self.row_bytes, 0);
                packed::unpack_row(format, self.cols, self.data.as_slice(), row, scratch);
                scratch.as_slice()
            }
        };
        with_block_type!(self.dtype, T => T::to_float(blocks::<T>(bytes), out));
    }

    /// The whole matrix as row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_into(&mut out);
        out
    }

    /// Dequantizes the whole matrix into `out` (`rows * cols` values, caller-checked).
    pub(crate) fn dequantize_into(&self, out: &mut [f32]) {
        if self.cols == 0 {
            return;
        }
        let mut scratch = Vec::new();
        for (row, out_row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row_unchecked(row, out_row, &mut scratch);
        }
    }
}

/// Views GGML bytes as blocks of type `T`.
///
/// `T` must be one of candle's GGML block types (or f32/f16/bf16): plain-old-data whose
/// every bit pattern is valid. `bytes` must be a whole number of blocks and aligned for
/// `T`, which holds for rows of a [`QMatrix`] (64-byte aligned buffer, rows a multiple of
/// the block size, which Rust makes a multiple of the alignment).
#[inline]
pub(crate) fn blocks<T: GgmlType>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(size)
            && bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0,
        "misaligned GGML block view"
    );
    // SAFETY: length and alignment checked above; `T` is plain old data (see above).
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) }
}

/// Mutable twin of [`blocks`], same requirements.
#[inline]
pub(crate) fn blocks_mut<T: GgmlType>(bytes: &mut [u8]) -> &mut [T] {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(size)
            && bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0,
        "misaligned GGML block view"
    );
    // SAFETY: length and alignment checked above; `T` is plain old data (see above).
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), bytes.len() / size) }
}

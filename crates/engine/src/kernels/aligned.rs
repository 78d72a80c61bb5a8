//! Heap buffers aligned to a cache line, so that SIMD loads of weight and activation
//! blocks never straddle more lines than they must and typed views of GGML blocks are
//! always sufficiently aligned.

/// One 64-byte cache line: the unit of allocation.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A zero-initialised byte buffer whose start is 64-byte aligned.
#[derive(Clone, Default)]
pub(crate) struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    pub(crate) fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    pub(crate) fn from_slice(bytes: &[u8]) -> Self {
        let mut buf = Self::zeroed(bytes.len());
        buf.as_mut_slice().copy_from_slice(bytes);
        buf
    }

    /// Grows (never shrinks) the allocation to hold `len` bytes and sets the length.
    /// Bytes past the previous length are unspecified (zero or stale).
    pub(crate) fn resize(&mut self, len: usize) {
        let lines = len.div_ceil(64);
        if self.lines.len() < lines {
            self.lines.resize(lines, Line([0; 64]));
        }
        self.len = len;
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `lines` owns at least `len` initialised bytes (64 per line, `Line` is
        // plain bytes with no padding), and the borrow of `self` keeps them alive.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, with exclusive access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }

    /// The buffer viewed as signed bytes (quantized activations).
    pub(crate) fn as_i8(&self) -> &[i8] {
        // SAFETY: i8 and u8 have the same size, alignment and validity.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<i8>(), self.len) }
    }

    pub(crate) fn as_mut_i8(&mut self) -> &mut [i8] {
        // SAFETY: as in `as_i8`, with exclusive access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<i8>(), self.len) }
    }
}

/// A 64-byte aligned buffer of f32 (dense weights for GEMM).
#[derive(Clone, Default)]
pub(crate) struct AlignedF32 {
    bytes: AlignedBytes,
}

impl AlignedF32 {
    pub(crate) fn zeroed(len: usize) -> Self {
        Self {
            bytes: AlignedBytes::zeroed(len * 4),
        }
    }

    pub(crate) fn as_slice(&self) -> &[f32] {
        let bytes = self.bytes.as_slice();
        // SAFETY: the buffer is 64-byte aligned, holds `len * 4` initialised bytes and every
        // bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        let bytes = self.bytes.as_mut_slice();
        // SAFETY: as in `as_slice`, with exclusive access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), bytes.len() / 4) }
    }
}

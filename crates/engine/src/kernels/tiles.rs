//! AMX tile state and the few tile instructions the `amx` kernel family uses
//! (`quant_dot::amx` owns the kernels themselves).
//!
//! Rust's AMX intrinsics and `amx-*` target features are unstable on the stable toolchain
//! (rust-lang/rust#126622), so the instructions are written with `asm!` here, in small
//! wrappers whose safety contracts say what they need. The compiler never uses tile
//! registers itself, so the wrappers may name them directly.
//!
//! - Availability ([`availability`]), decided once per process: CPUID must report
//!   AMX-TILE and AMX-INT8, XCR0 must show the OS manages tile state, and on Linux the
//!   process must be granted tile data, which the kernel only allows after
//!   `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` (requested here, once, before
//!   any tile use). Any failure is a reason string: the `amx` family is then unavailable
//!   and says why, it never falls back silently.
//! - Configuration: tile shapes are per-thread state. [`Tiles::for_this_thread`] loads
//!   the one configuration this module uses on a thread's first call (a thread-local
//!   flag), so every pool thread configures itself before its first tile instruction;
//!   the [`Tiles`] token it returns is what the instruction wrappers require.
//!
//! Register plan (palette 1, int8 `tdpb**d`: `C[M×16 i32] += A[M×32 u8|i8] · B`):
//!
//! | tile | shape | holds |
//! |---|---|---|
//! | tmm0 | 16 rows × 32 bytes | A: 16 tokens' activations for one 32-value block |
//! | tmm1 | 8 rows × 32 bytes | A: 8 tokens' activations |
//! | tmm2 | 8 rows × 64 bytes | B: 16 weight rows × one block, 4 consecutive values of a row per 32-bit lane |
//! | tmm3 | 16 rows × 64 bytes | C: 16 tokens × 16 rows of i32 dot products |
//! | tmm4 | 8 rows × 64 bytes | C: 8 tokens × 16 rows |
//! | tmm5, tmm6, tmm7 | as tmm0, tmm2, tmm3 | the next block's A, B and C for 16 tokens, so two blocks' tile work overlaps |
//!
//! K is 32 bytes (one quantization block) per instruction, never 64, so every block's
//! integer dot product comes out on its own and the per-block scales can be applied in
//! f32 exactly as the AVX2 kernels do.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::OnceLock;

/// Bytes of one B tile: 8 rows of 64 bytes.
pub(crate) const B_TILE_BYTES: usize = 512;
/// Bytes per row of a C tile: 16 i32.
pub(crate) const C_ROW_BYTES: usize = 64;

/// Whether this process can use AMX int8 tiles; the reason when it cannot.
pub(crate) fn availability() -> &'static Result<(), String> {
    static AMX: OnceLock<Result<(), String>> = OnceLock::new();
    AMX.get_or_init(probe)
}

fn probe() -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    {
        cpu_has_amx()?;
        os_enabled_amx()?;
        request_tile_data()
    }
    #[cfg(not(target_arch = "x86_64"))]
    Err("AMX is an x86-64 feature".to_owned())
}

/// CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
#[cfg(target_arch = "x86_64")]
fn cpu_has_amx() -> Result<(), String> {
    use std::arch::x86_64::__cpuid_count;
    let max_leaf = __cpuid_count(0, 0).eax;
    let edx = if max_leaf >= 7 {
        __cpuid_count(7, 0).edx
    } else {
        0
    };
    match (edx >> 24 & 1, edx >> 25 & 1) {
        (1, 1) => Ok(()),
        (0, _) => Err("the CPU lacks amx_tile".to_owned()),
        _ => Err("the CPU lacks amx_int8".to_owned()),
    }
}

/// XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves and restores tile state.
#[cfg(target_arch = "x86_64")]
fn os_enabled_amx() -> Result<(), String> {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    // CPUID.1:ECX bit 27 (OSXSAVE): XGETBV is usable.
    if __cpuid_count(1, 0).ecx >> 27 & 1 == 0 {
        return Err("the OS has not enabled XSAVE (no XGETBV)".to_owned());
    }
    // SAFETY: XGETBV exists (OSXSAVE, checked above) and XSAVE is part of the
    // x86-64-v3 baseline this crate is compiled for; register 0 is XCR0.
    let xcr0 = unsafe { _xgetbv(0) };
    if xcr0 >> 17 & 0b11 == 0b11 {
        Ok(())
    } else {
        Err(format!(
            "the OS does not manage AMX tile state (XCR0 = {xcr0:#x}, bits 17 and 18 needed)"
        ))
    }
}

/// Linux: asks for permission to use tile data (XFEATURE_XTILEDATA, 18) in this
/// process; without it the first tile instruction raises SIGILL.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> Result<(), String> {
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes only reads its integer arguments.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if ret != 0 {
        return Err(format!(
            "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed: {} \
             (a kernel before 5.16, or a VM without AMX state support)",
            std::io::Error::last_os_error()
        ));
    }
    let mut granted: u64 = 0;
    // SAFETY: ARCH_GET_XCOMP_PERM writes one u64 through the pointer, which is valid.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_PERM,
            &mut granted as *mut u64,
        )
    };
    if ret != 0 || granted >> XFEATURE_XTILEDATA & 1 == 0 {
        return Err(format!(
            "arch_prctl granted no tile data (permitted features {granted:#x}: {})",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_data() -> Result<(), String> {
    Err("AMX tile state is only requested on Linux (arch_prctl)".to_owned())
}

/// The 64-byte tile configuration of the register plan in the module doc.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn plan() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1; // palette 1; byte 1 (start row) stays 0.
        let shapes: [(u8, u16); 8] = [
            (16, 32),
            (8, 32),
            (8, 64),
            (16, 64),
            (8, 64),
            (16, 32),
            (8, 64),
            (16, 64),
        ];
        for (tile, (rows, bytes_per_row)) in shapes.into_iter().enumerate() {
            cfg[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&bytes_per_row.to_le_bytes());
            cfg[48 + tile] = rows;
        }
        Self(cfg)
    }
}

/// Proof that this thread's tile registers are configured with the module's plan; not
/// `Send`, because tile configuration is per thread.
pub(crate) struct Tiles {
    _per_thread: PhantomData<*const ()>,
}

impl Tiles {
    /// The calling thread's tiles, configured on first use; `None` when the process
    /// cannot use AMX ([`availability`]).
    pub(crate) fn for_this_thread() -> Option<Tiles> {
        thread_local! {
            static CONFIGURED: Cell<bool> = const { Cell::new(false) };
        }
        availability().as_ref().ok()?;
        if !CONFIGURED.get() {
            let cfg = TileConfig::plan();
            // SAFETY: AMX is available and permitted for this process (checked above);
            // `cfg` is a valid palette-1 configuration, 64 bytes, 64-byte aligned.
            unsafe {
                std::arch::asm!(
                    "ldtilecfg [{cfg}]",
                    cfg = in(reg) cfg.0.as_ptr(),
                    options(nostack, readonly, preserves_flags)
                );
            }
            CONFIGURED.set(true);
        }
        Some(Tiles {
            _per_thread: PhantomData,
        })
    }

    /// One 32-value block for `M` (16 or 8) tokens × 16 weight rows:
    /// `c[m][n] = Σ_k a[m·a_stride + k] · b[k/4·64 + 4n + k%4]` over k < 32, in i32, with
    /// `a` signed and `b` signed (`SIGNED_B`, `tdpbssd`) or unsigned (`tdpbsud`).
    ///
    /// # Safety
    /// `a` must be readable for `M` rows of 32 bytes `a_stride` apart, `b` for
    /// [`B_TILE_BYTES`], and `c` writable for `M` rows of [`C_ROW_BYTES`].
    #[inline(always)]
    pub(crate) unsafe fn dot_block<const M: usize, const SIGNED_B: bool>(
        &self,
        a: *const i8,
        a_stride: usize,
        b: *const u8,
        c: *mut i32,
    ) {
        macro_rules! tile_dot {
            ($a_tile:literal, $c_tile:literal, $op:literal) => {
                // SAFETY: the tiles are configured on this thread (`self`), AMX is
                // permitted, and the caller guarantees the memory ranges.
                unsafe {
                    std::arch::asm!(
                        concat!("tileloadd ", $a_tile, ", [{a} + {a_stride}*1]"),
                        "tileloadd tmm2, [{b} + {b_stride}*1]",
                        concat!("tilezero ", $c_tile),
                        concat!($op, " ", $c_tile, ", ", $a_tile, ", tmm2"),
                        concat!("tilestored [{c} + {c_stride}*1], ", $c_tile),
                        a = in(reg) a,
                        a_stride = in(reg) a_stride,
                        b = in(reg) b,
                        b_stride = in(reg) 64usize,
                        c = in(reg) c,
                        c_stride = in(reg) C_ROW_BYTES,
                        options(nostack, preserves_flags)
                    )
                }
            };
        }
        match (M, SIGNED_B) {
            (16, true) => tile_dot!("tmm0", "tmm3", "tdpbssd"),
            (16, false) => tile_dot!("tmm0", "tmm3", "tdpbsud"),
            (8, true) => tile_dot!("tmm1", "tmm4", "tdpbssd"),
            (8, false) => tile_dot!("tmm1", "tmm4", "tdpbsud"),
            _ => unreachable!("tile kernels run 16 or 8 tokens"),
        }
    }

    /// [`Tiles::dot_block`] for 16 tokens and two blocks at once, on separate tiles so
    /// the two multiplies overlap: block 0 from `a` and `b` into `c`, block 1 from
    /// `a + 32` and `b_next` into `c + 256` (the next 16 rows of 64 bytes).
    ///
    /// # Safety
    /// As [`Tiles::dot_block`] for each block; `c` writable for 32 rows.
    #[inline(always)]
    pub(crate) unsafe fn dot_block_pair<const SIGNED_B: bool>(
        &self,
        a: *const i8,
        a_stride: usize,
        b: *const u8,
        b_next: *const u8,
        c: *mut i32,
    ) {
        macro_rules! tile_dot2 {
            ($op:literal) => {
                // SAFETY: as in `dot_block`, for both blocks.
                unsafe {
                    std::arch::asm!(
                        "tileloadd tmm0, [{a} + {a_stride}*1]",
                        "tileloadd tmm2, [{b} + {b_stride}*1]",
                        "tilezero tmm3",
                        concat!($op, " tmm3, tmm0, tmm2"),
                        "tileloadd tmm5, [{a} + {a_stride}*1 + 32]",
                        "tileloadd tmm6, [{b_next} + {b_stride}*1]",
                        "tilezero tmm7",
                        concat!($op, " tmm7, tmm5, tmm6"),
                        "tilestored [{c} + {c_stride}*1], tmm3",
                        "tilestored [{c} + {c_stride}*1 + 1024], tmm7",
                        a = in(reg) a,
                        a_stride = in(reg) a_stride,
                        b = in(reg) b,
                        b_next = in(reg) b_next,
                        b_stride = in(reg) 64usize,
                        c = in(reg) c,
                        c_stride = in(reg) C_ROW_BYTES,
                        options(nostack, preserves_flags)
                    )
                }
            };
        }
        if SIGNED_B {
            tile_dot2!("tdpbssd")
        } else {
            tile_dot2!("tdpbsud")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_dot_matches_integer_reference() {
        let Some(tiles) = Tiles::for_this_thread() else {
            eprintln!(
                "notice: skipping the AMX tile test: {}",
                availability().as_ref().unwrap_err()
            );
            return;
        };
        let stride = 40;
        let a: Vec<i8> = (0..16 * stride)
            .map(|i| (i * 37 % 255) as u8 as i8)
            .collect();
        let b: Vec<u8> = (0..B_TILE_BYTES).map(|i| (i * 91 % 256) as u8).collect();
        let check = |m_rows: usize, signed: bool, c: &[i32]| {
            for m in 0..m_rows {
                for n in 0..16 {
                    let want: i32 = (0..32)
                        .map(|k| {
                            let w = b[k / 4 * 64 + 4 * n + k % 4];
                            let w = if signed {
                                i32::from(w as i8)
                            } else {
                                i32::from(w)
                            };
                            i32::from(a[m * stride + k]) * w
                        })
                        .sum();
                    assert_eq!(c[16 * m + n], want, "M {m_rows} signed {signed} [{m}][{n}]");
                }
            }
        };
        let mut c = vec![0i32; 256];
        // SAFETY: a holds 16 rows of `stride` >= 32 bytes, b 512 bytes, c 16 × 64 bytes.
        unsafe {
            tiles.dot_block::<16, true>(a.as_ptr(), stride, b.as_ptr(), c.as_mut_ptr());
            check(16, true, &c);
            tiles.dot_block::<16, false>(a.as_ptr(), stride, b.as_ptr(), c.as_mut_ptr());
            check(16, false, &c);
            tiles.dot_block::<8, true>(a.as_ptr(), stride, b.as_ptr(), c.as_mut_ptr());
            check(8, true, &c);
            tiles.dot_block::<8, false>(a.as_ptr(), stride, b.as_ptr(), c.as_mut_ptr());
            check(8, false, &c);
        }
        // Two blocks at once: the second reads A from 32 bytes on and B from `b_next`.
        let mut c2 = vec![0i32; 512];
        let b_next: Vec<u8> = (0..B_TILE_BYTES).map(|i| (i * 53 % 256) as u8).collect();
        let stride = 64;
        let a: Vec<i8> = (0..16 * stride)
            .map(|i| (i * 29 % 255) as u8 as i8)
            .collect();
        for signed in [true, false] {
            // SAFETY: a holds 16 rows of 64 bytes, b and b_next 512 bytes, c2 32 rows.
            unsafe {
                let (a, b, next, c) = (a.as_ptr(), b.as_ptr(), b_next.as_ptr(), c2.as_mut_ptr());
                if signed {
                    tiles.dot_block_pair::<true>(a, stride, b, next, c);
                } else {
                    tiles.dot_block_pair::<false>(a, stride, b, next, c);
                }
            }
            for (half, weights) in [&b, &b_next].into_iter().enumerate() {
                for m in 0..16 {
                    for n in 0..16 {
                        let want: i32 = (0..32)
                            .map(|k| {
                                let w = weights[k / 4 * 64 + 4 * n + k % 4];
                                let w = if signed {
                                    i32::from(w as i8)
                                } else {
                                    i32::from(w)
                                };
                                i32::from(a[m * stride + 32 * half + k]) * w
                            })
                            .sum();
                        assert_eq!(c2[256 * half + 16 * m + n], want, "pair {half} [{m}][{n}]");
                    }
                }
            }
        }
    }
}

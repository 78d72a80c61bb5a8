//! The E4M3 number format (the `fn` variant of the OCP FP8 formats: 4 exponent bits,
//! bias 7, 3 mantissa bits, no infinities, largest finite value ±448) and the
//! quantization of a matrix to it with one scale. The GPU engine's FP8 weights
//! (`--quantization fp8`) are made here at load; `e4m3_code` in the CUDA kernels is
//! [`e4m3_from_f32`] for the activations. Quantizing saturates.

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The E4M3 code nearest to `x`, ties to even, saturating at ±448 (a NaN saturates
/// too). `e4m3_code` in the CUDA kernels (kernels.cu) is the same function.
pub fn e4m3_from_f32(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    let code = if a < 2f32.powi(-6) {
        // Subnormals: steps of 2^-9; 8 steps is the smallest normal's code.
        (a * 512.0).round_ties_even() as u32
    } else {
        let bits = a.to_bits();
        let rounded = bits + 0x7_ffff + ((bits >> 20) & 1);
        (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
    };
    sign | code as u8
}

/// The value of an E4M3 code (`0x7f`/`0xff`, the NaNs, read as ±480: never produced).
pub fn e4m3_to_f32(code: u8) -> f32 {
    let exponent = i32::from((code >> 3) & 0xf);
    let mantissa = f32::from(code & 7);
    let magnitude = if exponent == 0 {
        mantissa * 2f32.powi(-9)
    } else {
        (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    };
    if code & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// A matrix quantized with one scale: `values[i] ≈ e4m3_to_f32(codes[i]) · scale`.
pub struct QuantizedMatrix {
    pub codes: Vec<u8>,
    pub scale: f32,
}

/// Quantizes `values` with the scale that maps their largest magnitude to 448 (1 for an
/// all-zero matrix), as the CUDA kernels' `fp8_quantize` does for activations.
pub fn quantize(values: &[f32]) -> QuantizedMatrix {
    let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (scale, inverse) = if amax > 0.0 {
        (amax / E4M3_MAX, E4M3_MAX / amax)
    } else {
        (1.0, 1.0)
    };
    QuantizedMatrix {
        codes: values.iter().map(|&v| e4m3_from_f32(v * inverse)).collect(),
        scale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every finite code, read back and quantized again, is itself.
    #[test]
    fn every_code_round_trips() {
        for code in 0..=255u8 {
            if code & 0x7f == 0x7f {
                continue;
            }
            assert_eq!(e4m3_from_f32(e4m3_to_f32(code)), code, "code {code:#04x}");
        }
    }

    /// Between two neighbouring codes, values go to the nearer, and a value halfway to
    /// the one with an even mantissa.
    #[test]
    fn values_go_to_the_nearest_code_and_ties_to_even() {
        for code in 0..0x7eu8 {
            let (low, high) = (e4m3_to_f32(code), e4m3_to_f32(code + 1));
            let middle = (low + high) / 2.0;
            let even = if code % 2 == 0 { code } else { code + 1 };
            assert_eq!(e4m3_from_f32(middle), even, "between {low} and {high}");
            let below = f32::from_bits(middle.to_bits() - 1);
            let above = f32::from_bits(middle.to_bits() + 1);
            assert_eq!(e4m3_from_f32(below), code, "just under {middle}");
            assert_eq!(e4m3_from_f32(above), code + 1, "just over {middle}");
            assert_eq!(e4m3_from_f32(-below), 0x80 | code);
        }
    }

    #[test]
    fn large_values_saturate() {
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_from_f32(1e9), 0x7e);
        assert_eq!(e4m3_from_f32(-500.0), 0xfe);
        assert_eq!(e4m3_from_f32(f32::INFINITY), 0x7e);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    }

    /// The largest magnitude lands on 448 and every value within half a step (relative
    /// 2^-4 for normals) of its original.
    #[test]
    fn a_matrix_quantizes_within_half_a_step() {
        let mut values: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.37).sin() * 0.05).collect();
        values[77] = -0.5;
        let q = quantize(&values);
        let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(q.scale, amax / E4M3_MAX);
        assert_eq!(q.codes[77], 0xfe);
        for (&v, &code) in values.iter().zip(&q.codes) {
            let back = e4m3_to_f32(code) * q.scale;
            let step = (v.abs() / 16.0).max(2f32.powi(-10) * q.scale);
            assert!((back - v).abs() <= step * 1.0001, "{v} came back as {back}");
        }
        assert_eq!(quantize(&[0.0; 8]).scale, 1.0);
    }
}

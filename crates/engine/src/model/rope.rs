//! Rotary position embeddings: per-frequency angles (with Llama 3 scaling or GGUF
//! frequency factors) and their application to query and key heads.

use super::config::{Llama3RopeScaling, ModelConfig, RopeStyle};

/// The inverse frequencies of one head's rotation pairs.
pub struct Rope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
    head_dim: usize,
}

impl Rope {
    pub fn new(config: &ModelConfig, freq_factors: Option<&[f32]>) -> Self {
        let half = config.head_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                config
                    .rope_theta
                    .powf(-2.0 * i as f32 / config.head_dim as f32)
            })
            .collect();
        if let Some(scaling) = config.rope_scaling {
            for f in &mut inv_freq {
                *f = llama3_scaled(*f, scaling);
            }
        }
        if let Some(factors) = freq_factors {
            for (f, factor) in inv_freq.iter_mut().zip(factors) {
                *f /= factor;
            }
        }
        Self {
            inv_freq,
            style: config.rope_style,
            head_dim: config.head_dim,
        }
    }

    /// The inverse frequency of each rotation pair (angle = position × frequency).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `(cos, sin)` of every pair's angle at `position`, written to `cos` and `sin`
    /// (each `head_dim / 2` long).
    pub fn angles(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let theta = position as f32 * f;
            (*s, *c) = theta.sin_cos();
        }
    }

    /// Rotates every head in `heads` (`[n_heads][head_dim]`) by the given angles.
    pub fn apply(&self, heads: &mut [f32], cos: &[f32], sin: &[f32]) {
        let d = self.head_dim;
        let half = d / 2;
        for head in heads.chunks_exact_mut(d) {
            match self.style {
                RopeStyle::Interleaved => {
                    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * cos[i] - b * sin[i];
                        pair[1] = a * sin[i] + b * cos[i];
                    }
                }
                RopeStyle::HalfSplit => {
                    let (lo, hi) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = a * sin[i] + b * cos[i];
                    }
                }
            }
        }
    }
}

/// Llama 3.1's frequency-dependent scaling: long wavelengths are slowed by `factor`,
/// short ones kept, and the band between interpolated.
fn llama3_scaled(inv_freq: f32, s: Llama3RopeScaling) -> f32 {
    let original = s.original_max_position_embeddings as f32;
    let low_freq_wavelen = original / s.low_freq_factor;
    let high_freq_wavelen = original / s.high_freq_factor;
    let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / s.factor
    } else {
        let smooth =
            (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}

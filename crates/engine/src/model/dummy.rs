//! `--load-format dummy`: a named model's exact shapes with random weights, as vLLM's
//! `--load-format dummy`, so that speed and memory at a model's size can be measured
//! without its weights. Its text is meaningless. The weights are f16, uniform in
//! ±0.05 (norms 1), drawn from a seed per tensor name, so two workers with the same
//! preset hold the same model and can hand KV to each other.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::GgmlDType;

use super::config::{Llama3RopeScaling, ModelConfig, RopeStyle};
use super::source::{RawTensor, TensorSource};
use super::weights::TensorNames;
use crate::error::ModelError;

/// A published model's shape (from its `config.json`).
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    rope_theta: f32,
    max_position: usize,
    /// The output head is the embedding.
    tied: bool,
    /// Llama 3.1's long-context RoPE scaling factor (others: none).
    llama3_rope_factor: Option<f32>,
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "llama-3.1-8b",
        hidden: 4096,
        intermediate: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        vocab: 128_256,
        rope_theta: 500_000.0,
        max_position: 131_072,
        tied: false,
        llama3_rope_factor: Some(8.0),
    },
    Preset {
        name: "llama-3.1-70b",
        hidden: 8192,
        intermediate: 28672,
        layers: 80,
        heads: 64,
        kv_heads: 8,
        head_dim: 128,
        vocab: 128_256,
        rope_theta: 500_000.0,
        max_position: 131_072,
        tied: false,
        llama3_rope_factor: Some(8.0),
    },
    Preset {
        name: "llama-3.2-1b",
        hidden: 2048,
        intermediate: 8192,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        vocab: 128_256,
        rope_theta: 500_000.0,
        max_position: 131_072,
        tied: true,
        llama3_rope_factor: Some(32.0),
    },
    Preset {
        name: "smollm2-135m",
        hidden: 576,
        intermediate: 1536,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        vocab: 49_152,
        rope_theta: 100_000.0,
        max_position: 8192,
        tied: true,
        llama3_rope_factor: None,
    },
];

impl Preset {
    pub fn find(name: &str) -> Result<&'static Preset, ModelError> {
        PRESETS
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ModelError::UnknownPreset {
                name: name.into(),
                known: PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            name: format!("{} (dummy weights)", self.name),
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab,
            rms_norm_eps: 1e-5,
            rope_theta: self.rope_theta,
            rope_style: RopeStyle::HalfSplit,
            rope_scaling: self.llama3_rope_factor.map(|factor| Llama3RopeScaling {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            max_position_embeddings: self.max_position,
        }
    }

    /// Bytes of its weights as the dummy holds them (f16 matrices).
    pub fn weight_bytes(&self) -> usize {
        let c = self.config();
        let per_layer = c.hidden_size * (2 * c.q_dim() + 2 * c.kv_dim())
            + 3 * c.hidden_size * c.intermediate_size;
        let heads = if self.tied { 1 } else { 2 };
        2 * (c.num_layers * per_layer + heads * c.vocab_size * c.hidden_size)
    }
}

/// What a dummy tensor holds.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Norm weights: ones.
    Ones,
    Random,
}

/// The tensors of a preset, in Hugging Face names, made on demand.
pub struct DummySource {
    origin: PathBuf,
    tensors: HashMap<String, (Vec<usize>, Fill)>,
    seed: u64,
}

impl DummySource {
    pub fn new(preset: &Preset, seed: u64) -> Self {
        let c = preset.config();
        let names = &TensorNames::HF;
        let hidden = c.hidden_size;
        let mut tensors = HashMap::new();
        let mut add = |name: String, shape: Vec<usize>, fill| {
            tensors.insert(name, (shape, fill));
        };
        add(names.embed.into(), vec![c.vocab_size, hidden], Fill::Random);
        if !preset.tied {
            add(
                names.lm_head.into(),
                vec![c.vocab_size, hidden],
                Fill::Random,
            );
        }
        add(names.final_norm.into(), vec![hidden], Fill::Ones);
        for i in 0..c.num_layers {
            for (name, shape, is_norm) in names.layer_shapes(i, &c) {
                add(name, shape, if is_norm { Fill::Ones } else { Fill::Random });
            }
        }
        Self {
            origin: PathBuf::from(format!("dummy:{}", preset.name)),
            tensors,
            seed,
        }
    }
}

impl TensorSource for DummySource {
    fn path_of(&self, _name: &str) -> PathBuf {
        self.origin.clone()
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn read(&self, name: &str) -> Result<RawTensor, ModelError> {
        let (shape, fill) = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.origin.clone(),
                tensor: name.into(),
            })?;
        let count: usize = shape.iter().product();
        let bytes = match fill {
            Fill::Ones => (0..count).flat_map(|_| 1.0f32.to_le_bytes()).collect(),
            Fill::Random => random_f16_bytes(count, self.seed ^ name_hash(name)),
        };
        let dtype = match fill {
            Fill::Ones => GgmlDType::F32,
            Fill::Random => GgmlDType::F16,
        };
        Ok(RawTensor {
            dtype,
            shape: shape.clone(),
            bytes,
        })
    }
}

/// FNV-1a of the name: each tensor its own stream of numbers.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `count` f16 values uniform in ±0.05 (xorshift64*), little-endian.
fn random_f16_bytes(count: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(2 * count);
    for _ in 0..count {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let unit = (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
        bytes.extend_from_slice(&half::f16::from_f32(0.1 * unit - 0.05).to_le_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_their_published_sizes() {
        // Llama-3.1-8B: 8.03 B parameters, 16.06 GB in bf16.
        let bytes = Preset::find("llama-3.1-8b").unwrap().weight_bytes() as f64;
        assert!((bytes / 1e9 - 16.06).abs() < 0.05, "{bytes}");
        // SmolLM2-135M: 134.5 M parameters (tied embeddings).
        let bytes = Preset::find("smollm2-135m").unwrap().weight_bytes() as f64;
        assert!((bytes / 2e6 - 134.5).abs() < 0.5, "{bytes}");
        assert!(
            Preset::find("gpt-9")
                .unwrap_err()
                .to_string()
                .contains("llama-3.1-8b")
        );
    }

    #[test]
    fn tensors_are_reproducible_per_name_and_seed() {
        let preset = Preset::find("smollm2-135m").unwrap();
        let a = DummySource::new(preset, 7);
        let b = DummySource::new(preset, 7);
        let name = "model.layers.3.self_attn.k_proj.weight";
        let (ra, rb) = (a.read(name).unwrap(), b.read(name).unwrap());
        assert_eq!(ra.shape, vec![192, 576]);
        assert_eq!(ra.bytes, rb.bytes);
        assert_ne!(
            ra.bytes,
            DummySource::new(preset, 8).read(name).unwrap().bytes
        );
        assert!(!a.contains("lm_head.weight"), "tied");
        let norm = a.read("model.norm.weight").unwrap();
        assert_eq!(norm.bytes[..4], 1.0f32.to_le_bytes());
    }
}

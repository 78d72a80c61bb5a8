//! Assembles a Llama model's weights from a [`TensorSource`], checking every shape
//! against the config, and lays them out for the forward pass: Q/K/V fused into one
//! projection and gate/up into another (when their types match), so a layer makes
//! four matrix products instead of seven.

use candle_core::quantized::GgmlDType;

use super::config::ModelConfig;
use super::source::{RawTensor, TensorSource, float_values};
use crate::error::ModelError;
use crate::kernels::{Linear, QMatrix};

/// Tensor names in one checkpoint format.
pub struct TensorNames {
    pub embed: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    pub rope_freqs: Option<&'static str>,
    /// `(prefix, attn_norm, q, k, v, o, ffn_norm, gate, up, down)` with `{}` = layer index.
    layer: [&'static str; 9],
    layer_prefix: &'static str,
}

impl TensorNames {
    pub const GGUF: TensorNames = TensorNames {
        embed: "token_embd.weight",
        final_norm: "output_norm.weight",
        lm_head: "output.weight",
        rope_freqs: Some("rope_freqs.weight"),
        layer_prefix: "blk.",
        layer: [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ],
    };

    pub const HF: TensorNames = TensorNames {
        embed: "model.embed_tokens.weight",
        final_norm: "model.norm.weight",
        lm_head: "lm_head.weight",
        rope_freqs: None,
        layer_prefix: "model.layers.",
        layer: [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ],
    };

    /// Layer `index`'s tensors: name, shape, and whether it is a norm vector.
    pub fn layer_shapes(&self, index: usize, c: &ModelConfig) -> Vec<(String, Vec<usize>, bool)> {
        let (hidden, inter) = (c.hidden_size, c.intermediate_size);
        [
            (LayerTensor::AttnNorm, vec![hidden]),
            (LayerTensor::Q, vec![c.q_dim(), hidden]),
            (LayerTensor::K, vec![c.kv_dim(), hidden]),
            (LayerTensor::V, vec![c.kv_dim(), hidden]),
            (LayerTensor::O, vec![hidden, c.q_dim()]),
            (LayerTensor::FfnNorm, vec![hidden]),
            (LayerTensor::Gate, vec![inter, hidden]),
            (LayerTensor::Up, vec![inter, hidden]),
            (LayerTensor::Down, vec![hidden, inter]),
        ]
        .into_iter()
        .map(|(which, shape)| {
            let is_norm = shape.len() == 1;
            (self.layer(index, which), shape, is_norm)
        })
        .collect()
    }

    pub(crate) fn layer(&self, index: usize, which: LayerTensor) -> String {
        format!(
            "{}{index}.{}",
            self.layer_prefix, self.layer[which as usize]
        )
    }
}

/// One of a transformer layer's tensors.
#[derive(Clone, Copy)]
pub(crate) enum LayerTensor {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// Several weight matrices applied to the same input whose outputs are concatenated.
pub enum Projection {
    /// One matrix whose rows are the parts' rows back to back.
    Fused(Linear),
    /// Parts of different types, applied one by one.
    Split(Vec<Linear>),
}

impl Projection {
    pub fn parts(&self) -> &[Linear] {
        match self {
            Projection::Fused(linear) => std::slice::from_ref(linear),
            Projection::Split(parts) => parts,
        }
    }
}

pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    /// Output `[q | k | v]`.
    pub qkv: Projection,
    pub attn_out: Linear,
    pub ffn_norm: Vec<f32>,
    /// Output `[gate | up]`.
    pub gate_up: Projection,
    pub down: Linear,
}

pub struct LlamaWeights {
    /// `None` when the embedding is tied to the output head.
    embed: Option<QMatrix>,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    pub lm_head: Linear,
    /// Per-frequency divisors for Llama 3 long-context RoPE, when the file has them.
    pub rope_freq_factors: Option<Vec<f32>>,
}

/// Options that trade memory for speed when loading.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Keep a dequantized f32 copy of each layer matrix for fast batched prefill
    /// (GEMM) when the copies of all layers fit in this many bytes; 0 disables.
    pub dense_weights_budget: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dense_weights_budget: 2 << 30,
        }
    }
}

impl LlamaWeights {
    pub fn embedding(&self) -> &QMatrix {
        self.embed
            .as_ref()
            .unwrap_or_else(|| self.lm_head.qmatrix())
    }

    pub fn load(
        source: &dyn TensorSource,
        names: &TensorNames,
        config: &ModelConfig,
        options: LoadOptions,
    ) -> Result<Self, ModelError> {
        let loader = Loader { source, config };
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let dense_bytes = 4 * config.num_layers * layer_params(config);
        let dense = dense_bytes <= options.dense_weights_budget;
        let embed = loader.matrix(names.embed, vocab, hidden)?;
        let (embed, lm_head) = if source.contains(names.lm_head) {
            let head = loader.matrix(names.lm_head, vocab, hidden)?;
            (Some(embed), head)
        } else {
            (None, embed)
        };
        let layers = (0..config.num_layers)
            .map(|i| loader.layer(names, i, dense))
            .collect::<Result<Vec<_>, _>>()?;
        let rope_freq_factors = match names.rope_freqs {
            Some(name) if source.contains(name) => Some(loader.vector(name, config.head_dim / 2)?),
            _ => None,
        };
        Ok(Self {
            embed,
            layers,
            final_norm: loader.vector(names.final_norm, hidden)?,
            lm_head: Linear::new(lm_head, false),
            rope_freq_factors,
        })
    }
}

/// Parameters in one transformer layer's matrices.
fn layer_params(c: &ModelConfig) -> usize {
    let attn = c.hidden_size * (2 * c.q_dim() + 2 * c.kv_dim());
    let ffn = 3 * c.hidden_size * c.intermediate_size;
    attn + ffn
}

/// Reads tensors of the expected shapes from a source (shared with the GPU loader).
pub(crate) struct Loader<'a> {
    pub source: &'a dyn TensorSource,
    pub config: &'a ModelConfig,
}

impl Loader<'_> {
    fn layer(
        &self,
        names: &TensorNames,
        i: usize,
        dense: bool,
    ) -> Result<LayerWeights, ModelError> {
        let c = self.config;
        let (hidden, inter) = (c.hidden_size, c.intermediate_size);
        let name = |which| names.layer(i, which);
        let qkv = self.projection(
            &[
                (name(LayerTensor::Q), c.q_dim()),
                (name(LayerTensor::K), c.kv_dim()),
                (name(LayerTensor::V), c.kv_dim()),
            ],
            hidden,
            dense,
        )?;
        let gate_up = self.projection(
            &[
                (name(LayerTensor::Gate), inter),
                (name(LayerTensor::Up), inter),
            ],
            hidden,
            dense,
        )?;
        Ok(LayerWeights {
            attn_norm: self.vector(&name(LayerTensor::AttnNorm), hidden)?,
            qkv,
            attn_out: Linear::new(
                self.matrix(&name(LayerTensor::O), hidden, c.q_dim())?,
                dense,
            ),
            ffn_norm: self.vector(&name(LayerTensor::FfnNorm), hidden)?,
            gate_up,
            down: Linear::new(self.matrix(&name(LayerTensor::Down), hidden, inter)?, dense),
        })
    }

    /// Reads `parts` (name, rows) of width `cols` and fuses them when their types match.
    fn projection(
        &self,
        parts: &[(String, usize)],
        cols: usize,
        dense: bool,
    ) -> Result<Projection, ModelError> {
        let raws = parts
            .iter()
            .map(|(name, rows)| self.raw_matrix(name, *rows, cols))
            .collect::<Result<Vec<_>, _>>()?;
        let dtype = raws[0].1.dtype;
        if raws.iter().all(|(_, raw)| raw.dtype == dtype) {
            let rows = parts.iter().map(|(_, rows)| rows).sum();
            let bytes = raws
                .iter()
                .flat_map(|(_, raw)| raw.bytes.iter().copied())
                .collect();
            let fused = RawTensor {
                dtype,
                shape: vec![rows, cols],
                bytes,
            };
            let matrix = self.to_qmatrix(&parts[0].0, fused)?;
            return Ok(Projection::Fused(Linear::new(matrix, dense)));
        }
        let linears = raws
            .into_iter()
            .map(|(name, raw)| Ok(Linear::new(self.to_qmatrix(&name, raw)?, dense)))
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Projection::Split(linears))
    }

    pub(crate) fn raw_matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<(String, RawTensor), ModelError> {
        let raw = self.source.read(name)?;
        if raw.shape != [rows, cols] {
            return Err(ModelError::ShapeMismatch {
                path: self.source.path_of(name),
                tensor: name.into(),
                expected: vec![rows, cols],
                actual: raw.shape,
            });
        }
        Ok((name.to_string(), raw))
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix, ModelError> {
        let (name, raw) = self.raw_matrix(name, rows, cols)?;
        self.to_qmatrix(&name, raw)
    }

    fn to_qmatrix(&self, name: &str, raw: RawTensor) -> Result<QMatrix, ModelError> {
        let (rows, cols) = (raw.shape[0], raw.shape[1]);
        QMatrix::from_raw(raw.dtype, rows, cols, &raw.bytes).map_err(|e| {
            ModelError::UnsupportedDType {
                path: self.source.path_of(name),
                tensor: name.into(),
                dtype: format!("{:?} ({e})", raw.dtype),
            }
        })
    }

    /// A 1-D tensor (norm weights, RoPE factors) as f32.
    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let raw = self.source.read(name)?;
        if raw.shape != [len] {
            return Err(ModelError::ShapeMismatch {
                path: self.source.path_of(name),
                tensor: name.into(),
                expected: vec![len],
                actual: raw.shape,
            });
        }
        let values = match raw.dtype {
            GgmlDType::F32 | GgmlDType::F16 => {
                float_values(raw.dtype, &raw.bytes).expect("an unquantized type")
            }
            other => {
                return Err(ModelError::UnsupportedDType {
                    path: self.source.path_of(name),
                    tensor: name.into(),
                    dtype: format!("{other:?} (1-D tensors must be F32 or F16)"),
                });
            }
        };
        Ok(values)
    }
}

//! A Llama model's weights in GPU memory: every matrix in the weight type (f16 or
//! bf16; quantized GGUF matrices are dequantized at load), Q/K/V and gate/up fused
//! into one matrix each as on the CPU, norms and RoPE frequencies in f32.
//!
//! Layers are read, converted and uploaded by several threads at once: a
//! Llama-3.1-8B-sized model is 16 GB, and one thread converting it would dominate the
//! start-up.

use std::sync::Mutex;

use super::gpu::{DeviceBuffer, Gpu, GpuError, WeightDtype};
use crate::error::ModelError;
use crate::kernels::QMatrix;
use crate::model::config::ModelConfig;
use crate::model::rope::Rope;
use crate::model::source::{RawTensor, TensorSource, float_values};
use crate::model::weights::{LayerTensor, Loader, TensorNames};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

pub struct GpuLayer {
    pub attn_norm: DeviceBuffer,
    /// `[q | k | v]` rows × hidden.
    pub qkv: DeviceBuffer,
    /// hidden × q_dim.
    pub attn_out: DeviceBuffer,
    pub ffn_norm: DeviceBuffer,
    /// `[gate | up]` rows × hidden.
    pub gate_up: DeviceBuffer,
    /// hidden × intermediate.
    pub down: DeviceBuffer,
}

pub struct GpuWeights {
    /// vocab × hidden; also the output head when the model ties them.
    pub embed: DeviceBuffer,
    /// vocab × hidden, when not tied to the embedding.
    pub lm_head: Option<DeviceBuffer>,
    pub layers: Vec<GpuLayer>,
    pub final_norm: DeviceBuffer,
    /// head_dim / 2 inverse frequencies (RoPE scaling and GGUF factors applied).
    pub inv_freq: DeviceBuffer,
    /// Bytes of matrices on the GPU.
    pub matrix_bytes: usize,
}

impl GpuWeights {
    pub fn head(&self) -> &DeviceBuffer {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Reads every tensor of `config`'s shapes from `source`, checking shapes as the CPU
    /// loader does, and uploads them.
    pub fn load(
        gpu: &Gpu,
        source: &(dyn TensorSource + Sync),
        names: &TensorNames,
        config: &ModelConfig,
    ) -> Result<Self, LoadError> {
        let loader = Loader { source, config };
        let dtype = gpu.weight_dtype;
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let embed = upload_matrix(gpu, &loader, &[(names.embed, vocab)], hidden)?;
        let lm_head = if source.contains(names.lm_head) {
            Some(upload_matrix(
                gpu,
                &loader,
                &[(names.lm_head, vocab)],
                hidden,
            )?)
        } else {
            None
        };
        let layers = load_layers(gpu, source, names, config)?;
        let freq_factors = match names.rope_freqs {
            Some(name) if source.contains(name) => Some(loader.vector(name, config.head_dim / 2)?),
            _ => None,
        };
        let rope = Rope::new(config, freq_factors.as_deref());
        let matrix_bytes = 2
            * (vocab * hidden * (1 + usize::from(lm_head.is_some()))
                + config.num_layers * layer_elements(config));
        tracing::info!(
            model = config.name,
            dtype = dtype.name(),
            gib = matrix_bytes as f64 / (1u64 << 30) as f64,
            "weights on the GPU"
        );
        Ok(Self {
            embed,
            lm_head,
            layers,
            final_norm: DeviceBuffer::from_slice(
                &gpu.ctx,
                &loader.vector(names.final_norm, hidden)?,
            )?,
            inv_freq: DeviceBuffer::from_slice(&gpu.ctx, rope.inv_freq())?,
            matrix_bytes,
        })
    }
}

/// Matrix elements of one layer.
fn layer_elements(c: &ModelConfig) -> usize {
    let h = c.hidden_size;
    h * (c.q_dim() + 2 * c.kv_dim()) + c.q_dim() * h + 3 * h * c.intermediate_size
}

/// Loads the layers on several threads, in any order, into their slots.
fn load_layers(
    gpu: &Gpu,
    source: &(dyn TensorSource + Sync),
    names: &TensorNames,
    config: &ModelConfig,
) -> Result<Vec<GpuLayer>, LoadError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(config.num_layers.max(1));
    let next = Mutex::new(0usize);
    let slots: Mutex<Vec<Option<GpuLayer>>> =
        Mutex::new((0..config.num_layers).map(|_| None).collect());
    let first_error: Mutex<Option<LoadError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let index = {
                        let mut next = next.lock().expect("loader lock");
                        if *next >= config.num_layers
                            || first_error.lock().expect("loader lock").is_some()
                        {
                            return;
                        }
                        *next += 1;
                        *next - 1
                    };
                    match load_layer(gpu, source, names, config, index) {
                        Ok(layer) => slots.lock().expect("loader lock")[index] = Some(layer),
                        Err(err) => {
                            first_error.lock().expect("loader lock").get_or_insert(err);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(err) = first_error.into_inner().expect("loader lock") {
        return Err(err);
    }
    Ok(slots
        .into_inner()
        .expect("loader lock")
        .into_iter()
        .map(|slot| slot.expect("every layer loaded"))
        .collect())
}

fn load_layer(
    gpu: &Gpu,
    source: &(dyn TensorSource + Sync),
    names: &TensorNames,
    c: &ModelConfig,
    i: usize,
) -> Result<GpuLayer, LoadError> {
    let loader = Loader { source, config: c };
    let name = |which| names.layer(i, which);
    let hidden = c.hidden_size;
    let (q, k, v) = (
        name(LayerTensor::Q),
        name(LayerTensor::K),
        name(LayerTensor::V),
    );
    let (gate, up) = (name(LayerTensor::Gate), name(LayerTensor::Up));
    Ok(GpuLayer {
        attn_norm: DeviceBuffer::from_slice(
            &gpu.ctx,
            &loader.vector(&name(LayerTensor::AttnNorm), hidden)?,
        )?,
        qkv: upload_matrix(
            gpu,
            &loader,
            &[(&q, c.q_dim()), (&k, c.kv_dim()), (&v, c.kv_dim())],
            hidden,
        )?,
        attn_out: upload_matrix(gpu, &loader, &[(&name(LayerTensor::O), hidden)], c.q_dim())?,
        ffn_norm: DeviceBuffer::from_slice(
            &gpu.ctx,
            &loader.vector(&name(LayerTensor::FfnNorm), hidden)?,
        )?,
        gate_up: upload_matrix(
            gpu,
            &loader,
            &[(&gate, c.intermediate_size), (&up, c.intermediate_size)],
            hidden,
        )?,
        down: upload_matrix(
            gpu,
            &loader,
            &[(&name(LayerTensor::Down), hidden)],
            c.intermediate_size,
        )?,
    })
}

/// Reads `parts` (name, rows) of width `cols`, stacks their rows into one matrix in
/// the GPU's weight type, and uploads it.
fn upload_matrix(
    gpu: &Gpu,
    loader: &Loader,
    parts: &[(&str, usize)],
    cols: usize,
) -> Result<DeviceBuffer, LoadError> {
    let rows: usize = parts.iter().map(|p| p.1).sum();
    let mut buffer = DeviceBuffer::zeroed(&gpu.ctx, 2 * rows * cols)?;
    let mut offset = 0;
    for &(name, part_rows) in parts {
        let (_, raw) = loader.raw_matrix(name, part_rows, cols)?;
        let values = to_f32(loader, name, raw)?;
        let converted = gpu.weight_dtype.convert(&values);
        drop(values);
        buffer.upload(offset, &converted)?;
        offset += 2 * converted.len();
    }
    Ok(buffer)
}

/// A matrix's values as f32 (dequantized when quantized).
fn to_f32(loader: &Loader, name: &str, raw: RawTensor) -> Result<Vec<f32>, ModelError> {
    if let Some(values) = float_values(raw.dtype, &raw.bytes) {
        return Ok(values);
    }
    let (rows, cols) = (raw.shape[0], raw.shape[1]);
    Ok(QMatrix::from_raw(raw.dtype, rows, cols, &raw.bytes)
        .map_err(|e| ModelError::UnsupportedDType {
            path: loader.source.path_of(name),
            tensor: name.into(),
            dtype: format!("{:?} ({e})", raw.dtype),
        })?
        .dequantize())
}

/// The weight type `auto` picks for a model: f16 for GGUF files (their quantized values
/// keep more precision in f16), bf16 for Hugging Face checkpoints and dummy presets
/// (what they are published in).
pub fn auto_dtype(is_gguf: bool) -> WeightDtype {
    if is_gguf {
        WeightDtype::F16
    } else {
        WeightDtype::Bf16
    }
}

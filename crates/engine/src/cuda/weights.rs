//! A Llama model's weights in GPU memory: every matrix in the weight type (f16 or
//! bf16; quantized GGUF matrices are dequantized at load), or with `--quantization
//! fp8` the layers' matrices as E4M3 codes with one scale each ([`crate::e4m3`]);
//! Q/K/V and gate/up fused into one matrix each as on the CPU, norms and RoPE
//! frequencies in f32.
//!
//! Layers are read, converted and uploaded by several threads at once: a
//! Llama-3.1-8B-sized model is 16 GB, and one thread converting it would dominate the
//! start-up.

use std::sync::Mutex;

use super::gemv::MatrixRef;
use super::gpu::{DeviceBuffer, Gpu, GpuError, WeightDtype};
use crate::e4m3;
use crate::error::ModelError;
use crate::exec::Quantization;
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

/// One weight matrix on the GPU, row-major.
pub struct GpuMatrix {
    /// Elements in the weight type, or E4M3 codes.
    pub data: DeviceBuffer,
    /// For E4M3 codes: the one f32 that turns them back into weights (on the device,
    /// where the kernels and cuBLASLt read it).
    pub fp8_scale: Option<DeviceBuffer>,
}

impl GpuMatrix {
    /// The matrix as the products take it.
    pub fn as_ref(&self) -> MatrixRef {
        MatrixRef {
            ptr: self.data.ptr(),
            fp8_scale: self.fp8_scale.as_ref().map(DeviceBuffer::ptr),
        }
    }
}

pub struct GpuLayer {
    pub attn_norm: DeviceBuffer,
    /// `[q | k | v]` rows × hidden.
    pub qkv: GpuMatrix,
    /// hidden × q_dim.
    pub attn_out: GpuMatrix,
    pub ffn_norm: DeviceBuffer,
    /// `[gate | up]` rows × hidden.
    pub gate_up: GpuMatrix,
    /// hidden × intermediate.
    pub down: GpuMatrix,
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
    /// How the layers' matrices are stored.
    pub quantization: Quantization,
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
        quantization: Quantization,
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
        let layers = load_layers(gpu, source, names, config, quantization)?;
        let freq_factors = match names.rope_freqs {
            Some(name) if source.contains(name) => Some(loader.vector(name, config.head_dim / 2)?),
            _ => None,
        };
        let rope = Rope::new(config, freq_factors.as_deref());
        let matrix_bytes = embed.bytes()
            + lm_head.as_ref().map_or(0, DeviceBuffer::bytes)
            + layers
                .iter()
                .flat_map(|l| [&l.qkv, &l.attn_out, &l.gate_up, &l.down])
                .map(|m| m.data.bytes())
                .sum::<usize>();
        tracing::info!(
            model = config.name,
            dtype = dtype.name(),
            quantization = quantization.name(),
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
            quantization,
            matrix_bytes,
        })
    }
}

/// Loads the layers on several threads, in any order, into their slots.
fn load_layers(
    gpu: &Gpu,
    source: &(dyn TensorSource + Sync),
    names: &TensorNames,
    config: &ModelConfig,
    quantization: Quantization,
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
                    match load_layer(gpu, source, names, config, index, quantization) {
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
    quantization: Quantization,
) -> Result<GpuLayer, LoadError> {
    let loader = Loader { source, config: c };
    let matrix = |parts: &[(&str, usize)], cols| {
        upload_layer_matrix(gpu, &loader, parts, cols, quantization)
    };
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
        qkv: matrix(
            &[(&q, c.q_dim()), (&k, c.kv_dim()), (&v, c.kv_dim())],
            hidden,
        )?,
        attn_out: matrix(&[(&name(LayerTensor::O), hidden)], c.q_dim())?,
        ffn_norm: DeviceBuffer::from_slice(
            &gpu.ctx,
            &loader.vector(&name(LayerTensor::FfnNorm), hidden)?,
        )?,
        gate_up: matrix(
            &[(&gate, c.intermediate_size), (&up, c.intermediate_size)],
            hidden,
        )?,
        down: matrix(&[(&name(LayerTensor::Down), hidden)], c.intermediate_size)?,
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

/// A layer's matrix of `parts` as [`upload_matrix`] stacks them, in the weight type or
/// quantized to E4M3 as one matrix (Q, K and V share one scale, as do gate and up).
fn upload_layer_matrix(
    gpu: &Gpu,
    loader: &Loader,
    parts: &[(&str, usize)],
    cols: usize,
    quantization: Quantization,
) -> Result<GpuMatrix, LoadError> {
    if quantization == Quantization::None {
        return Ok(GpuMatrix {
            data: upload_matrix(gpu, loader, parts, cols)?,
            fp8_scale: None,
        });
    }
    let rows: usize = parts.iter().map(|p| p.1).sum();
    let mut values = Vec::with_capacity(rows * cols);
    for &(name, part_rows) in parts {
        let (_, raw) = loader.raw_matrix(name, part_rows, cols)?;
        values.extend(to_f32(loader, name, raw)?);
    }
    let quantized = e4m3::quantize(&values);
    drop(values);
    Ok(GpuMatrix {
        data: DeviceBuffer::from_slice(&gpu.ctx, &quantized.codes)?,
        fp8_scale: Some(DeviceBuffer::from_slice(&gpu.ctx, &[quantized.scale])?),
    })
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

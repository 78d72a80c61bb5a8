//! Where a model's forward passes run: on the CPU (the engine's own kernels over a
//! host KV store) or, with the `cuda` feature, on a GPU (cuBLAS and tandem's kernels
//! over a KV cache in GPU memory). The engine loop, the block pool and the hand-off
//! protocol are the same for both; only [`Executor::forward`] and where the blocks'
//! bytes live ([`KvBlocks`]) differ.

#[cfg(feature = "cuda")]
use std::sync::Arc;

use crate::kernels::ThreadPool;
use crate::kv::{KvBlocks, KvLayout, KvOptions, KvStore};
use crate::model::{ForwardError, ForwardScratch, Llama, ModelConfig, SeqInput};
use crate::sample::DeviceDraw;

/// Whether this build can run models on GPUs (the `cuda` feature).
pub const GPU_SUPPORT: bool = cfg!(feature = "cuda");

/// Where to run a model: `cpu`, or `cuda`/`cuda:N` (GPU N; needs the `cuda` feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Element type of a GPU model's weights and of its matrix products' inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F16,
    Bf16,
}

impl WeightDtype {
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
        }
    }

    /// Converts f32 values to this type's bit patterns.
    pub fn convert(self, values: &[f32]) -> Vec<u16> {
        match self {
            WeightDtype::F16 => values
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect(),
            WeightDtype::Bf16 => values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect(),
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f16" | "float16" | "half" => Ok(WeightDtype::F16),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            _ => Err(format!("`{s}` is not a GPU weight type: use f16 or bf16")),
        }
    }
}

/// How a GPU model stores its layers' matrices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Quantization {
    /// In the weight type.
    #[default]
    None,
    /// FP8 (E4M3) with one f32 scale per matrix, activations quantized per step with
    /// one scale per product (vLLM's `--quantization fp8`); embeddings, the output
    /// head and norms stay in the weight type. Needs compute capability 8.9 or newer.
    Fp8,
}

impl Quantization {
    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Fp8 => "fp8",
        }
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fp8" => Ok(Quantization::Fp8),
            "none" => Ok(Quantization::None),
            _ => Err(format!("`{s}` is not a GPU quantization: use fp8 or none")),
        }
    }
}

/// How a GPU model holds its weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightFormat {
    /// The weights' and the products' inputs' element type (`None`: f16 for GGUF files,
    /// bf16 otherwise).
    pub dtype: Option<WeightDtype>,
    pub quantization: Quantization,
}

impl From<Option<WeightDtype>> for WeightFormat {
    fn from(dtype: Option<WeightDtype>) -> Self {
        Self {
            dtype,
            quantization: Quantization::None,
        }
    }
}

/// A loaded model, on the device its forward passes will run on.
// One value per worker: the variants' sizes don't matter.
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Cpu(Llama),
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::CudaModel>),
}

impl From<Llama> for Model {
    fn from(model: Llama) -> Self {
        Model::Cpu(model)
    }
}

impl Model {
    pub fn config(&self) -> &ModelConfig {
        match self {
            Model::Cpu(model) => model.config(),
            #[cfg(feature = "cuda")]
            Model::Cuda(model) => model.config(),
        }
    }

    /// The KV layout this model needs with the given block size and element type.
    pub fn kv_layout(&self, options: KvOptions) -> KvLayout {
        KvLayout::for_model(self.config(), options)
    }

    /// The CPU model, when the model runs on the CPU.
    pub fn cpu(&self) -> Option<&Llama> {
        match self {
            Model::Cpu(model) => Some(model),
            #[cfg(feature = "cuda")]
            Model::Cuda(_) => None,
        }
    }

    /// `cpu` or `cuda:N`.
    pub fn device(&self) -> String {
        match self {
            Model::Cpu(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Model::Cuda(model) => format!("cuda:{}", model.gpu.ctx.ordinal()),
        }
    }
}

/// Runs the engine loop's forward passes and owns the KV memory they use.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Executor {
    Cpu {
        model: Llama,
        pool: ThreadPool,
        kv: KvStore,
        scratch: ForwardScratch,
    },
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::GpuRunner>),
}

impl Executor {
    pub(crate) fn config(&self) -> &ModelConfig {
        match self {
            Executor::Cpu { model, .. } => model.config(),
            #[cfg(feature = "cuda")]
            Executor::Cuda(runner) => runner.config(),
        }
    }

    /// Blocks the KV memory holds (what the block pool hands out).
    pub(crate) fn num_blocks(&self) -> usize {
        self.kv_blocks().num_blocks()
    }

    pub(crate) fn kv_layout(&self) -> KvLayout {
        self.kv_blocks().layout()
    }

    /// The KV memory, for the hand-off.
    pub(crate) fn kv_blocks(&self) -> KvBlocks {
        match self {
            Executor::Cpu { kv, .. } => KvBlocks::Host(kv.memory()),
            #[cfg(feature = "cuda")]
            Executor::Cuda(runner) => KvBlocks::Device(runner.kv().clone()),
        }
    }

    /// Where the KV cache lives, as vLLM's KV events name it (`medium`): `"CPU"` for
    /// host memory, `"GPU"` for CUDA memory (vLLM's block pool says `"GPU"`; its
    /// offloading connectors say `"CPU"` for host copies).
    pub(crate) fn kv_medium(&self) -> &'static str {
        match self {
            Executor::Cpu { .. } => "CPU",
            #[cfg(feature = "cuda")]
            Executor::Cuda(_) => "GPU",
        }
    }

    /// The logits of the last forward pass.
    pub(crate) fn last_logits(&self) -> &[f32] {
        match self {
            Executor::Cpu { scratch, .. } => scratch.logits(),
            #[cfg(feature = "cuda")]
            Executor::Cuda(runner) => runner.last_logits(),
        }
    }

    /// Whether [`Executor::forward_sampled`] can serve steps whose every sequence samples
    /// without reporting its logits: on a GPU, where it saves bringing them back.
    pub(crate) fn samples_on_device(&self) -> bool {
        match self {
            Executor::Cpu { .. } => false,
            #[cfg(feature = "cuda")]
            Executor::Cuda(runner) => runner.samples_on_device(),
        }
    }

    /// Runs the batch; returns, per requested position in batch order, the token its
    /// draw picks (as the host sampler would with the same draw). Only where
    /// [`Executor::samples_on_device`]; the CPU's steps go through [`Executor::forward`]
    /// and the sampler.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn forward_sampled(
        &mut self,
        batch: &[SeqInput],
        draws: &[DeviceDraw],
    ) -> Result<&[u32], ForwardError> {
        match self {
            Executor::Cpu { .. } => Err(ForwardError::Device(
                "a CPU model's tokens are picked by the sampler".into(),
            )),
            #[cfg(feature = "cuda")]
            Executor::Cuda(runner) => runner.forward_sampled(batch, draws),
        }
    }

    /// Runs the batch; returns one `vocab_size` row of logits per requested position, in
    /// batch order.
    pub(crate) fn forward(&mut self, batch: &[SeqInput]) -> Result<&[f32], ForwardError> {
        match self {
            Executor::Cpu {
                model,
                pool,
                kv,
                scratch,
            } => model.forward(pool, batch, kv, scratch),
            #[cfg(feature = "cuda")]
            Executor::Cuda(runner) => runner.forward(batch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Device, WeightDtype};

    #[test]
    fn devices_parse_as_vllm_and_torch_name_them() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(err.contains("cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn weight_types_round_to_their_precision() {
        assert_eq!("bfloat16".parse::<WeightDtype>(), Ok(WeightDtype::Bf16));
        assert!("int8".parse::<WeightDtype>().is_err());
        // 1 + 2⁻¹⁰ is exact in f16 and rounds to 1 in bf16 (7 fraction bits).
        let x = [1.0 + 1.0 / 1024.0];
        assert_eq!(WeightDtype::F16.convert(&x), [0x3c01]);
        assert_eq!(WeightDtype::Bf16.convert(&x), [0x3f80]);
    }
}

//! NVIDIA GPUs (the `cuda` feature). The driver API and cuBLAS are loaded at run time
//! (cudarc's dynamic loading) and the kernels are embedded as PTX, so the feature
//! builds on machines without CUDA; running needs the driver (`libcuda.so.1`) and
//! `libcublas`.
//!
//! - [`gpu`]: one GPU — context, stream, allocations, kernel module, cuBLAS.
//! - `kernels.cu` (PTX in [`ptx`]): embedding, RMSNorm, RoPE + KV store, SiLU·up,
//!   paged flash attention (softmax state in `mma.sync` registers), matrix–vector
//!   products of small steps (bf16/f16 or E4M3 weights), FP8 activation quantization,
//!   greedy argmax and sampling, block copies.
//! - [`gemv`]: who runs a forward pass's matrix products — matrix–vector kernels for
//!   steps of a few tokens, cuBLAS (cuBLASLt for FP8) for the rest.
//! - [`fp8`]: FP8 (E4M3) weights' products for larger steps: activations quantized on
//!   the GPU, cuBLASLt's scaled FP8 GEMM.
//! - [`weights`]: a model's weights uploaded in f16/bf16, or the layers' in E4M3.
//! - [`kv`]: the KV cache in GPU memory and its hand-off copies.
//! - [`model`]: the forward pass over ragged batches, with CUDA graphs for decode,
//!   bringing back logits or, for greedy steps, only the picked token ids.
//! - [`bench`]: what the engine reaches on a GPU, against those ceilings.
//! - [`limits`]: what a GPU can do at most, measured — the ceilings every GPU
//!   performance figure of tandem is reported against.
//! - [`decode_gemm`]: what a decode step's matrix products reach at a model's shapes,
//!   through cuBLAS and through [`gemv`]'s kernels, against that ceiling.

pub mod bench;
pub mod decode_gemm;
pub mod fp8;
pub mod gemv;
pub mod gpu;
pub mod kv;
pub mod limits;
pub mod model;
pub mod ptx;
pub mod weights;

pub use gpu::{Gpu, GpuError, ProductOut, WeightDtype};
pub use kv::DeviceKv;
pub use model::{CudaModel, GpuRunner, RunnerLimits};

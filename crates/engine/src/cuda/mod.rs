//! NVIDIA GPUs (the `cuda` feature). The driver API and cuBLAS are loaded at run time
//! (cudarc's dynamic loading), so the feature builds on machines without CUDA; running
//! needs the driver (`libcuda.so.1`) and, for GEMMs, `libcublas`.
//!
//! - [`limits`]: what a GPU can do at most, measured — the ceilings every GPU
//!   performance figure of tandem is reported against.
//! - [`decode_gemm`]: what cuBLAS alone reaches on a decode step's matrix products at
//!   a model's shapes, against that ceiling.

pub mod decode_gemm;
pub mod limits;

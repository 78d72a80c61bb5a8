//! What cuBLAS alone reaches on the matrix products of a decode step at a model's
//! shapes: every layer's Q/K/V, O, gate/up and down products and the output head, for
//! a batch of `tokens`, in bf16 — against the memory roofline (weight bytes per step
//! over the device-to-device copy traffic measured in the same run). The baseline a
//! GPU decode path must beat, before attention, norms and launch overheads.

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaSlice};
use half::bf16;
use serde::Serialize;

use super::limits::{self, LimitsError, Probe};
use crate::model::ModelConfig;

/// One batch size's result.
#[derive(Debug, Clone, Serialize)]
pub struct DecodePoint {
    pub tokens: usize,
    /// Seconds for all of one step's matrix products.
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    /// Weight bytes per step / step time.
    pub weight_bytes_per_second: f64,
    /// That, over the copy traffic (read + write) measured in the same run.
    pub fraction_of_copy_traffic: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeGemms {
    pub model: String,
    pub weight_bytes: usize,
    /// Device-to-device copy, read + write bytes per second.
    pub copy_traffic_bytes_per_second: f64,
    pub points: Vec<DecodePoint>,
}

/// The products of one layer (rows, cols) and the output head.
fn matrices(c: &ModelConfig) -> (Vec<(usize, usize)>, (usize, usize)) {
    let (hidden, inter) = (c.hidden_size, c.intermediate_size);
    let layer = vec![
        (c.q_dim() + 2 * c.kv_dim(), hidden),
        (hidden, c.q_dim()),
        (2 * inter, hidden),
        (hidden, inter),
    ];
    (layer, (c.vocab_size, hidden))
}

/// Times a step's products for each batch size in `tokens` on GPU `ordinal`. One
/// layer's weights are allocated and run `num_layers` times: at hundreds of MB per
/// layer they stream from memory every time, as distinct layers would.
pub fn measure(
    ordinal: usize,
    config: &ModelConfig,
    tokens: &[usize],
    repeats: usize,
) -> Result<DecodeGemms, LimitsError> {
    let probe = Probe {
        ordinal,
        copy_bytes: 1 << 30,
        gemm_size: 0,
        repeats,
    };
    let copy = limits::dtod_on(&probe)?;
    let ctx = CudaContext::new(ordinal)?;
    let stream = ctx.default_stream();
    let (layer, head) = matrices(config);
    let weights: Vec<CudaSlice<bf16>> = layer
        .iter()
        .chain(std::iter::once(&head))
        .enumerate()
        .map(|(i, &(rows, cols))| {
            stream.clone_htod(&limits::random_bf16(rows * cols, 10 + i as u64))
        })
        .collect::<Result<_, _>>()?;
    let blas = CudaBlas::new(stream.clone())?;
    let widest = layer
        .iter()
        .chain(std::iter::once(&head))
        .map(|m| m.0.max(m.1))
        .max()
        .unwrap_or(0);
    let max_tokens = tokens.iter().copied().max().unwrap_or(1);
    let input = stream.clone_htod(&limits::random_bf16(widest * max_tokens, 3))?;
    let mut output = stream.alloc_zeros::<bf16>(widest * max_tokens)?;
    let weight_elements: usize =
        layer.iter().map(|(r, c)| r * c).sum::<usize>() * config.num_layers + head.0 * head.1;
    let weight_bytes = 2 * weight_elements;
    let mut points = Vec::new();
    for &t in tokens {
        let seconds = limits::best_seconds(&stream, repeats, || {
            for _ in 0..config.num_layers {
                for (w, &(rows, cols)) in weights.iter().zip(&layer) {
                    product(&blas, w, &input, &mut output, rows, cols, t)?;
                }
            }
            product(
                &blas,
                &weights[layer.len()],
                &input,
                &mut output,
                head.0,
                head.1,
                t,
            )
        })?;
        let bandwidth = weight_bytes as f64 / seconds;
        points.push(DecodePoint {
            tokens: t,
            step_seconds: seconds,
            tokens_per_second: t as f64 / seconds,
            weight_bytes_per_second: bandwidth,
            fraction_of_copy_traffic: bandwidth / (2.0 * copy),
        });
    }
    Ok(DecodeGemms {
        model: config.name.clone(),
        weight_bytes,
        copy_traffic_bytes_per_second: 2.0 * copy,
        points,
    })
}

/// `Y[t × rows] = X[t × cols] · Wᵀ` for a row-major `W[rows × cols]`: in cuBLAS's
/// column-major terms `Yᵀ = op(W) · Xᵀ` with W read transposed.
fn product(
    blas: &CudaBlas,
    w: &CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
    rows: usize,
    cols: usize,
    tokens: usize,
) -> Result<(), LimitsError> {
    let config = GemmConfig {
        transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
        transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
        m: rows as i32,
        n: tokens as i32,
        k: cols as i32,
        alpha: bf16::ONE,
        lda: cols as i32,
        ldb: cols as i32,
        beta: bf16::ZERO,
        ldc: rows as i32,
    };
    // SAFETY: w holds rows × cols, x at least cols × tokens, y at least rows × tokens
    // values (allocated for the widest matrix and the largest batch).
    unsafe { blas.gemm(config, w, x, y)? };
    Ok(())
}

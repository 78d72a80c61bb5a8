//! What a decode step's matrix products reach at a model's shapes — every layer's
//! Q/K/V, O, gate/up and down products and the output head, for a batch of `tokens`,
//! in bf16 — run the two ways the engine can run them ([`super::gemv::Products`]):
//! cuBLAS as the engine calls it (f32 out), and the matrix–vector kernels for the
//! batch sizes they serve; both against the memory roofline (weight bytes per step
//! over the device-to-device copy traffic measured in the same run). The baseline a
//! GPU decode path must beat, before attention, norms and launch overheads.

use serde::Serialize;

use super::gemv::{MatrixRef, Products};
use super::gpu::{DeviceBuffer, Gpu, ProductOut, WeightDtype};
use super::limits::{self, LimitsError, Probe};
use crate::model::ModelConfig;

/// One way of running a step's products, timed.
#[derive(Debug, Clone, Serialize)]
pub struct ProductsTiming {
    /// Seconds for all of one step's matrix products.
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    /// Weight bytes per step / step time.
    pub weight_bytes_per_second: f64,
    /// That, over the copy traffic (read + write) measured in the same run.
    pub fraction_of_copy_traffic: f64,
}

/// One batch size's result.
#[derive(Debug, Clone, Serialize)]
pub struct DecodePoint {
    pub tokens: usize,
    /// cuBLAS, bf16 in and f32 out, as the engine calls it.
    pub cublas: ProductsTiming,
    /// The matrix–vector kernels, for the batch sizes they serve.
    pub gemv: Option<ProductsTiming>,
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
    let gpu = Gpu::open(ordinal, WeightDtype::Bf16)?;
    let (layer, head) = matrices(config);
    let all: Vec<(usize, usize)> = layer.iter().copied().chain([head]).collect();
    let weights: Vec<DeviceBuffer> = all
        .iter()
        .enumerate()
        .map(|(i, &(rows, cols))| {
            DeviceBuffer::from_slice(&gpu.ctx, &limits::random_bf16(rows * cols, 10 + i as u64))
        })
        .collect::<Result<_, _>>()?;
    let widest = all.iter().map(|m| m.0.max(m.1)).max().unwrap_or(0);
    let max_tokens = tokens.iter().copied().max().unwrap_or(1);
    let input = DeviceBuffer::from_slice(&gpu.ctx, &limits::random_bf16(widest * max_tokens, 3))?;
    let output = DeviceBuffer::zeroed(&gpu.ctx, 4 * widest * max_tokens)?;
    let weight_elements: usize =
        layer.iter().map(|(r, c)| r * c).sum::<usize>() * config.num_layers + head.0 * head.1;
    let weight_bytes = 2 * weight_elements;
    let ways = [Products::new(&gpu, false)?, Products::new(&gpu, true)?];
    let step = |products: &Products, t: usize| -> Result<(), LimitsError> {
        let run = |w: &DeviceBuffer, (rows, cols): (usize, usize)| {
            // SAFETY: w holds rows × cols values, the input at least cols × t and the
            // output rows × t (allocated for the widest matrix and the largest batch).
            unsafe {
                products.matmul(
                    &gpu,
                    MatrixRef::plain(w.ptr()),
                    rows,
                    cols,
                    input.ptr(),
                    t,
                    output.ptr(),
                    ProductOut::F32,
                )
            }
        };
        for _ in 0..config.num_layers {
            for (w, &shape) in weights.iter().zip(&layer) {
                run(w, shape)?;
            }
        }
        Ok(run(&weights[layer.len()], head)?)
    };
    let timing = |seconds: f64, t: usize| {
        let bandwidth = weight_bytes as f64 / seconds;
        ProductsTiming {
            step_seconds: seconds,
            tokens_per_second: t as f64 / seconds,
            weight_bytes_per_second: bandwidth,
            fraction_of_copy_traffic: bandwidth / (2.0 * copy),
        }
    };
    let mut points = Vec::new();
    for &t in tokens {
        let cublas = limits::best_seconds(&gpu.stream, repeats, || step(&ways[0], t))?;
        let gemv = if ways[1].uses_gemv(t) {
            Some(limits::best_seconds(&gpu.stream, repeats, || {
                step(&ways[1], t)
            })?)
        } else {
            None
        };
        points.push(DecodePoint {
            tokens: t,
            cublas: timing(cublas, t),
            gemv: gemv.map(|s| timing(s, t)),
        });
    }
    Ok(DecodeGemms {
        model: config.name.clone(),
        weight_bytes,
        copy_traffic_bytes_per_second: 2.0 * copy,
        points,
    })
}

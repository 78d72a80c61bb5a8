//! Kernel benchmark: SmolLM2-135M-shaped matmuls (Q4_1 layers, Q8_0 lm_head) in decode
//! (1 token) and prefill (512 tokens) form, with 1 and 2 threads, against candle's stock
//! `QMatMul` on the same weights in the same run.
//!
//! `cargo bench -p tandem-engine --bench kernels [-- quick] [dispatch|decode|step|step8|ceiling|tiles|crossover|prefill|prefill-step]...`
//!
//! `TANDEM_BENCH_PROMPT_TOKENS` (512) sets the prefill sections' token count: a step's
//! matmuls cost more per token once their outputs no longer fit the caches
//! (`docs/benchmarks.md`, issue 20).
//!
//! Times are the best of several trials (the machine is shared); ratios > 1 mean tandem
//! is faster.

#[path = "common/env.rs"]
mod env;
#[path = "common/stream.rs"]
mod stream;

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use tandem_engine::kernels::{
    GEMM_MIN_TOKENS, Linear, MatmulPath, QMatrix, ThreadPool, matmul, matmul_many, matmul_many_with,
};

const HIDDEN: usize = 576;
const INTER: usize = 1536;
const KV: usize = 192;
const VOCAB: usize = 49152;
const LAYERS: usize = 30;

/// A weight shape of the model and how many times one forward pass applies it.
struct Shape {
    name: &'static str,
    rows: usize,
    cols: usize,
    dtype: GgmlDType,
}

const SHAPES: [Shape; 6] = [
    Shape {
        name: "attn_q/o 576x576",
        rows: HIDDEN,
        cols: HIDDEN,
        dtype: GgmlDType::Q4_1,
    },
    Shape {
        name: "attn_k/v 192x576",
        rows: KV,
        cols: HIDDEN,
        dtype: GgmlDType::Q4_1,
    },
    Shape {
        name: "qkv fused 960x576",
        rows: HIDDEN + 2 * KV,
        cols: HIDDEN,
        dtype: GgmlDType::Q4_1,
    },
    Shape {
        name: "gate+up 3072x576",
        rows: 2 * INTER,
        cols: HIDDEN,
        dtype: GgmlDType::Q4_1,
    },
    Shape {
        name: "down 576x1536",
        rows: HIDDEN,
        cols: INTER,
        dtype: GgmlDType::Q4_1,
    },
    Shape {
        name: "lm_head 49152x576",
        rows: VOCAB,
        cols: HIDDEN,
        dtype: GgmlDType::Q8_0,
    },
];

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Best time per call over `trials` trials of calls filling about `budget` each.
/// Tokens of the prefill sections: `TANDEM_BENCH_PROMPT_TOKENS`, else 512.
fn prompt_tokens() -> usize {
    match env::env_usize("TANDEM_BENCH_PROMPT_TOKENS", 512) {
        0 => 512,
        n => n,
    }
}

fn best_time(budget: Duration, trials: usize, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().max(Duration::from_nanos(100));
    let iters = (budget.as_secs_f64() / once.as_secs_f64()).clamp(1.0, 100_000.0) as u32;
    (0..trials)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed() / iters
        })
        .min()
        .unwrap_or_default()
}

struct Bench {
    budget: Duration,
    trials: usize,
    pools: Vec<ThreadPool>,
    step_weights: std::cell::OnceCell<StepWeights>,
}

fn candle_qmatmul(w: &QMatrix) -> QMatMul {
    let storage =
        QStorage::from_data(w.ggml_bytes(), &Device::Cpu, w.dtype()).expect("candle storage");
    let tensor = QTensor::new(storage, (w.rows(), w.cols())).expect("candle qtensor");
    QMatMul::from_qtensor(tensor).expect("candle qmatmul")
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Bench {
    fn decode(&self) {
        println!("\n## Decode-shaped mat-vec (1 token)\n");
        println!(
            "| shape | dtype | MB | tandem 1T µs | tandem 2T µs | 2T GB/s | candle µs | tandem 2T / candle |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for shape in &SHAPES {
            let w = QMatrix::from_f32(
                shape.dtype,
                shape.rows,
                shape.cols,
                &pseudo_random(shape.rows * shape.cols, 1),
            )
            .expect("weights");
            let mb = w.storage_bytes() as f64 / 1e6;
            let linear = Linear::new(w.clone(), false);
            let x = pseudo_random(shape.cols, 2);
            let mut y = vec![0f32; shape.rows];
            let times: Vec<Duration> = self
                .pools
                .iter()
                .map(|pool| {
                    best_time(self.budget, self.trials, || {
                        matmul(pool, &linear, &x, 1, &mut y).expect("matmul");
                        black_box(&y);
                    })
                })
                .collect();
            let candle = candle_qmatmul(&w);
            let xt = Tensor::from_slice(&x, (1, shape.cols), &Device::Cpu).expect("tensor");
            let candle_time = best_time(self.budget, self.trials, || {
                black_box(candle.forward(&xt).expect("candle forward"));
            });
            let two = times[times.len() - 1];
            println!(
                "| {} | {:?} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x |",
                shape.name,
                shape.dtype,
                mb,
                us(times[0]),
                us(two),
                mb / 1e3 / two.as_secs_f64(),
                us(candle_time),
                candle_time.as_secs_f64() / two.as_secs_f64()
            );
        }
    }

    /// All matmuls of one decode step of the model (fused qkv and gate/up, 30 layers,
    /// lm_head), back to back: an upper bound on decode tok/s from matmuls alone.
    fn decode_step(&self) {
        println!("\n## One decode step's matmuls (30 layers + lm_head), 1 token\n");
        let StepWeights { layers, head } = self.step_weights();
        let candle_layers: Vec<Vec<QMatMul>> = layers
            .iter()
            .map(|ls| ls.iter().map(|l| candle_qmatmul(l.qmatrix())).collect())
            .collect();
        let candle_head = candle_qmatmul(head.qmatrix());
        let x = pseudo_random(INTER, 3);
        let mut y = vec![0f32; VOCAB];
        let bytes = self.step_weights().bytes();
        for pool in &self.pools {
            let t = best_time(self.budget * 4, self.trials, || {
                for layer in layers {
                    for linear in layer {
                        let n = linear.rows();
                        matmul(pool, linear, &x[..linear.cols()], 1, &mut y[..n]).expect("matmul");
                    }
                }
                matmul(pool, head, &x[..HIDDEN], 1, &mut y).expect("matmul");
                black_box(&y);
            });
            println!(
                "- tandem, {} thread(s): {:.2} ms/step = {:.0} steps/s ({:.1} GB/s of weights)",
                pool.n_threads(),
                t.as_secs_f64() * 1e3,
                1.0 / t.as_secs_f64(),
                bytes as f64 / 1e9 / t.as_secs_f64()
            );
        }
        let inputs: Vec<Tensor> = [HIDDEN, INTER]
            .iter()
            .map(|&c| Tensor::from_slice(&x[..c], (1, c), &Device::Cpu).expect("tensor"))
            .collect();
        let t = best_time(self.budget * 4, self.trials, || {
            for layer in &candle_layers {
                for (i, m) in layer.iter().enumerate() {
                    black_box(m.forward(&inputs[usize::from(i == 3)]).expect("forward"));
                }
            }
            black_box(candle_head.forward(&inputs[0]).expect("forward"));
        });
        println!(
            "- candle QMatMul (its own threads): {:.2} ms/step = {:.0} steps/s",
            t.as_secs_f64() * 1e3,
            1.0 / t.as_secs_f64()
        );
    }

    fn prefill(&self) {
        let prompt = prompt_tokens();
        println!("\n## Prefill-shaped matmul ({prompt} tokens), GFLOP/s\n");
        println!("| shape | tandem 1T | tandem 2T | f32 GEMM 2T | candle | tandem 2T / candle |");
        println!("|---|---|---|---|---|---|");
        for shape in SHAPES.iter().filter(|s| s.rows < VOCAB) {
            let values = pseudo_random(shape.rows * shape.cols, 1);
            let w =
                QMatrix::from_f32(shape.dtype, shape.rows, shape.cols, &values).expect("weights");
            let flops = 2.0 * (prompt * shape.rows * shape.cols) as f64;
            let gflops = |d: Duration| flops / 1e9 / d.as_secs_f64();
            let linear = Linear::new(w.clone(), false).with_dense();
            let x = pseudo_random(prompt * shape.cols, 2);
            let mut y = vec![0f32; prompt * shape.rows];
            let mut run = |pool: &ThreadPool, path: MatmulPath| {
                best_time(self.budget, self.trials, || {
                    matmul_many_with(pool, &[&linear], &x, prompt, &mut [&mut y], path)
                        .expect("matmul");
                    black_box(&y);
                })
            };
            let auto: Vec<Duration> = self
                .pools
                .iter()
                .map(|p| run(p, MatmulPath::Auto))
                .collect();
            let last = self.pools.last().expect("pools");
            let gemm = run(last, MatmulPath::Gemm);
            let candle = candle_qmatmul(&w);
            let xt = Tensor::from_slice(&x, (prompt, shape.cols), &Device::Cpu).expect("tensor");
            let candle_time = best_time(self.budget, self.trials, || {
                black_box(candle.forward(&xt).expect("candle forward"));
            });
            let two = auto[auto.len() - 1];
            println!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x |",
                shape.name,
                gflops(auto[0]),
                gflops(two),
                gflops(gemm),
                gflops(candle_time),
                candle_time.as_secs_f64() / two.as_secs_f64()
            );
        }
    }

    /// All layer matmuls of a 512-token prefill (fused qkv and gate/up, 30 layers; the
    /// lm_head only for the last token): an upper bound on prefill tok/s from matmuls.
    fn prefill_step(&self) {
        let prompt = prompt_tokens();
        println!("\n## One {prompt}-token prefill's matmuls (30 layers + last-token lm_head)\n");
        let layer_shapes = [
            (HIDDEN + 2 * KV, HIDDEN),
            (HIDDEN, HIDDEN),
            (2 * INTER, HIDDEN),
            (HIDDEN, INTER),
        ];
        let layers: Vec<Vec<Linear>> = (0..LAYERS)
            .map(|l| {
                layer_shapes
                    .iter()
                    .enumerate()
                    .map(|(i, &(rows, cols))| {
                        let values = pseudo_random(rows * cols, (l * 8 + i) as u64);
                        let w = QMatrix::from_f32(GgmlDType::Q4_1, rows, cols, &values);
                        Linear::new(w.expect("w"), false)
                    })
                    .collect()
            })
            .collect();
        let head = QMatrix::from_f32(
            GgmlDType::Q8_0,
            VOCAB,
            HIDDEN,
            &pseudo_random(VOCAB * HIDDEN, 9),
        );
        let head = Linear::new(head.expect("w"), false);
        let x = pseudo_random(prompt * INTER, 3);
        let mut y = vec![0f32; prompt * 2 * INTER];
        for pool in &self.pools {
            let t = best_time(self.budget, self.trials.min(3), || {
                for layer in &layers {
                    for linear in layer {
                        let (n, c) = (linear.rows(), linear.cols());
                        matmul(pool, linear, &x[..prompt * c], prompt, &mut y[..prompt * n])
                            .expect("matmul");
                    }
                }
                matmul(pool, &head, &x[..HIDDEN], 1, &mut y[..VOCAB]).expect("matmul");
                black_box(&y);
            });
            println!(
                "- tandem, {} thread(s): {:.0} ms = {:.0} prompt tok/s from matmuls alone",
                pool.n_threads(),
                t.as_secs_f64() * 1e3,
                prompt as f64 / t.as_secs_f64()
            );
        }
    }

    /// The 8-token/1-token throughput ratio of a step's matrix products when each step
    /// runs at its floor, both measured here: a 1-token step reads every weight byte
    /// once (floor: the machine's streaming bandwidth); an 8-token step does every
    /// multiply-add (floor: the 8-token tiles' rate with the matrix resident in L2, on
    /// every thread). The engine's batching target (8 streams >= 4x one stream) needs
    /// this ratio above 4; the line says how much faster the tiles would have to be.
    fn ceiling(&self) {
        println!("\n## A step's matmuls at their floors: 8 tokens vs 1\n");
        let pool = self.pools.last().expect("pools");
        let single = self.pools.first().expect("pools");
        let weights = self.step_weights();
        let StepWeights { layers, head } = weights;
        let step_bytes = weights.bytes();
        let layer_macs: usize = layers.iter().flatten().map(|l| l.rows() * l.cols()).sum();
        let head_macs = head.rows() * head.cols();

        let bandwidth = stream::stream_bandwidth(pool, self.trials);
        // 512 rows x 576: 184 KB (Q4_1) and 313 KB (Q8_0), both inside one core's L2.
        let resident_rate = |dtype: GgmlDType| {
            let (rows, n) = (512, 8);
            let w = QMatrix::from_f32(dtype, rows, HIDDEN, &pseudo_random(rows * HIDDEN, 5))
                .expect("weights");
            let linear = Linear::new(w, false);
            let x = pseudo_random(n * HIDDEN, 6);
            let mut y = vec![0f32; n * rows];
            let time = best_time(self.budget, self.trials, || {
                matmul(single, &linear, &x, n, &mut y).expect("matmul");
                black_box(&y);
            });
            (rows * HIDDEN * n) as f64 / time.as_secs_f64()
        };
        let (q4_rate, q8_rate) = (
            resident_rate(GgmlDType::Q4_1),
            resident_rate(GgmlDType::Q8_0),
        );
        let threads = pool.n_threads() as f64;
        let floor_1 = step_bytes as f64 / bandwidth;
        let floor_8 = 8.0 * (layer_macs as f64 / q4_rate + head_macs as f64 / q8_rate) / threads;
        println!(
            "- weights {:.1} MB streamed at {:.1} GB/s ({} threads): 1-token step >= {:.2} ms",
            step_bytes as f64 / 1e6,
            bandwidth / 1e9,
            pool.n_threads(),
            floor_1 * 1e3
        );
        println!(
            "- 8-token tiles, matrix in L2, 1 thread: Q4_1 {:.1} GMAC/s, Q8_0 {:.1} GMAC/s: 8-token step >= {:.2} ms on {} threads",
            q4_rate / 1e9,
            q8_rate / 1e9,
            floor_8 * 1e3,
            pool.n_threads()
        );
        let ratio = 8.0 * floor_1 / floor_8;
        println!(
            "- at both floors, 8-token throughput is {ratio:.2}x of 1-token; 4x needs 8-token tiles {:.2}x as fast",
            4.0 / ratio
        );
    }

    /// The model-shaped weights of the step sections, built on first use.
    fn step_weights(&self) -> &StepWeights {
        self.step_weights.get_or_init(StepWeights::build)
    }
}

/// The model's layer matrices (fused qkv and gate/up, 30 layers) and its lm_head.
struct StepWeights {
    layers: Vec<Vec<Linear>>,
    head: Linear,
}

impl StepWeights {
    fn build() -> Self {
        let layer_shapes = [
            (HIDDEN + 2 * KV, HIDDEN),
            (HIDDEN, HIDDEN),
            (2 * INTER, HIDDEN),
            (HIDDEN, INTER),
        ];
        let layers = (0..LAYERS)
            .map(|l| {
                layer_shapes
                    .iter()
                    .enumerate()
                    .map(|(i, &(rows, cols))| {
                        let values = pseudo_random(rows * cols, (l * 8 + i) as u64);
                        let w = QMatrix::from_f32(GgmlDType::Q4_1, rows, cols, &values);
                        Linear::new(w.expect("w"), false)
                    })
                    .collect()
            })
            .collect();
        let head = QMatrix::from_f32(
            GgmlDType::Q8_0,
            VOCAB,
            HIDDEN,
            &pseudo_random(VOCAB * HIDDEN, 99),
        );
        Self {
            layers,
            head: Linear::new(head.expect("w"), false),
        }
    }

    /// Bytes of every matrix: what one 1-token step reads.
    fn bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .flatten()
            .map(|l| l.qmatrix().storage_bytes())
            .sum();
        layers + self.head.qmatrix().storage_bytes()
    }
}

impl Bench {
    /// One step's matmuls (30 layers + lm_head for every token) at 1 and 8 tokens, on
    /// each pool: how far batched decode is from 8x the single-token throughput.
    fn decode_step8(&self) {
        println!("\n## One decode step's matmuls at 1 and 8 tokens (lm_head for every token)\n");
        let StepWeights { layers, head } = self.step_weights();
        for pool in &self.pools {
            let time = |n: usize| {
                let x = pseudo_random(n * INTER, 3);
                let mut y = vec![0f32; n * VOCAB];
                let step = best_time(self.budget * 4, self.trials, || {
                    for layer in layers {
                        for linear in layer {
                            let (rows, cols) = (linear.rows(), linear.cols());
                            matmul(pool, linear, &x[..n * cols], n, &mut y[..n * rows])
                                .expect("matmul");
                        }
                    }
                    matmul(pool, head, &x[..n * HIDDEN], n, &mut y).expect("matmul");
                    black_box(&y);
                });
                let head_time = best_time(self.budget, self.trials, || {
                    matmul(pool, head, &x[..n * HIDDEN], n, &mut y).expect("matmul");
                    black_box(&y);
                });
                (step, head_time)
            };
            let (one, one_head) = time(1);
            let (eight, eight_head) = time(8);
            println!(
                "- {} threads: 1 token {:.2} ms (lm_head {:.2}) | 8 tokens {:.2} ms (lm_head {:.2}) | 8-token throughput {:.2}x of 1-token",
                pool.n_threads(),
                one.as_secs_f64() * 1e3,
                one_head.as_secs_f64() * 1e3,
                eight.as_secs_f64() * 1e3,
                eight_head.as_secs_f64() * 1e3,
                8.0 * one.as_secs_f64() / eight.as_secs_f64()
            );
        }
    }

    /// The panel kernels on the model's shapes at small batches, GFLOP/s.
    fn tiles(&self) {
        println!("\n## Panel kernels at small batches (GFLOP/s)\n");
        let sizes = [1usize, 2, 4, 5, 8, 9];
        let header: Vec<String> = sizes.iter().map(|n| format!("{n} tok")).collect();
        println!("| shape | dtype | threads | {} |", header.join(" | "));
        println!("|---|---|---|{}", "---|".repeat(sizes.len()));
        for shape in SHAPES.iter().filter(|s| s.rows != KV) {
            let values = pseudo_random(shape.rows * shape.cols, 1);
            let w = QMatrix::from_f32(shape.dtype, shape.rows, shape.cols, &values);
            let linear = Linear::new(w.expect("w"), false);
            for pool in &self.pools {
                let cells: Vec<String> = sizes
                    .iter()
                    .map(|&n| {
                        let x = pseudo_random(n * shape.cols, 5);
                        let mut y = vec![0f32; n * shape.rows];
                        let t = best_time(self.budget, self.trials, || {
                            matmul(pool, &linear, &x, n, &mut y).expect("matmul");
                            black_box(&y);
                        });
                        let flops = 2.0 * (n * shape.rows * shape.cols) as f64;
                        format!("{:.0}", flops / 1e9 / t.as_secs_f64())
                    })
                    .collect();
                println!(
                    "| {} | {:?} | {} | {} |",
                    shape.name,
                    shape.dtype,
                    pool.n_threads(),
                    cells.join(" | ")
                );
            }
        }
    }

    /// Quantized path vs GEMM across batch sizes and formats: where the GEMM path pays.
    fn crossover(&self) {
        let pool = self.pools.last().expect("pools");
        println!(
            "\n## Quantized path vs GEMM (3072x768, {} threads, GFLOP/s; GEMM_MIN_TOKENS = {GEMM_MIN_TOKENS})\n",
            pool.n_threads()
        );
        let sizes = [1usize, 4, 8, 16, 32, 64, 512];
        let header: Vec<String> = sizes.iter().map(|n| format!("{n} tok")).collect();
        println!("| dtype | path | {} |", header.join(" | "));
        println!("|---|---|{}", "---|".repeat(sizes.len()));
        // 768 columns: a whole number of K-quant super-blocks.
        let (rows, cols) = (2 * INTER, 768);
        let values = pseudo_random(rows * cols, 1);
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::F16,
            GgmlDType::F32,
        ] {
            let w = QMatrix::from_f32(dtype, rows, cols, &values).expect("w");
            let linear = Linear::new(w, false).with_dense();
            for path in [MatmulPath::Quantized, MatmulPath::Gemm] {
                let cells: Vec<String> = sizes
                    .iter()
                    .map(|&n| {
                        let x = pseudo_random(n * cols, 5);
                        let mut y = vec![0f32; n * rows];
                        let t = best_time(self.budget, self.trials, || {
                            matmul_many_with(pool, &[&linear], &x, n, &mut [&mut y], path)
                                .expect("matmul");
                        });
                        format!(
                            "{:.0}",
                            2.0 * (n * rows * cols) as f64 / 1e9 / t.as_secs_f64()
                        )
                    })
                    .collect();
                println!("| {dtype:?} | {path:?} | {} |", cells.join(" | "));
            }
        }
    }

    /// Dispatch overhead: an empty job and a fused 3-matrix matmul_many.
    fn dispatch(&self) {
        println!("\n## Dispatch overhead\n");
        for pool in &self.pools {
            let t = best_time(self.budget, self.trials, || {
                pool.run(pool.n_threads(), |i| {
                    black_box(i);
                })
            });
            println!(
                "- empty job, {} thread(s): {:.2} µs",
                pool.n_threads(),
                us(t)
            );
        }
        let make = |rows| {
            Linear::new(
                QMatrix::from_f32(
                    GgmlDType::Q4_1,
                    rows,
                    HIDDEN,
                    &pseudo_random(rows * HIDDEN, 7),
                )
                .expect("w"),
                false,
            )
        };
        let (q, k, v) = (make(HIDDEN), make(KV), make(KV));
        let x = pseudo_random(HIDDEN, 8);
        let (mut yq, mut yk, mut yv) = (vec![0f32; HIDDEN], vec![0f32; KV], vec![0f32; KV]);
        let pool = self.pools.last().expect("pools");
        let fused = best_time(self.budget, self.trials, || {
            matmul_many(pool, &[&q, &k, &v], &x, 1, &mut [&mut yq, &mut yk, &mut yv])
                .expect("matmul");
        });
        let separate = best_time(self.budget, self.trials, || {
            matmul(pool, &q, &x, 1, &mut yq).expect("matmul");
            matmul(pool, &k, &x, 1, &mut yk).expect("matmul");
            matmul(pool, &v, &x, 1, &mut yv).expect("matmul");
        });
        println!(
            "- q/k/v 1 token, {} threads: matmul_many {:.1} µs vs 3 matmuls {:.1} µs",
            pool.n_threads(),
            us(fused),
            us(separate)
        );
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let max_threads = tandem_engine::kernels::pool::available_threads().min(2);
    let pools = (1..=max_threads)
        .map(|n| ThreadPool::new(n).expect("pool"))
        .collect();
    let bench = Bench {
        budget: Duration::from_millis(if quick { 40 } else { 150 }),
        trials: if quick { 3 } else { 7 },
        pools,
        step_weights: Default::default(),
    };
    println!(
        "# tandem kernels ({} threads max; candle uses its own pool of {} threads)",
        max_threads,
        candle_core::utils::get_num_threads()
    );
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-') && a != "quick")
        .collect();
    let wanted = |name: &str| sections.is_empty() || sections.iter().any(|s| s == name);
    if wanted("dispatch") {
        bench.dispatch();
    }
    if wanted("decode") {
        bench.decode();
    }
    if wanted("step") {
        bench.decode_step();
    }
    if wanted("step8") {
        bench.decode_step8();
    }
    if wanted("ceiling") {
        bench.ceiling();
    }
    if wanted("tiles") {
        bench.tiles();
    }
    if wanted("crossover") {
        bench.crossover();
    }
    if wanted("prefill") {
        bench.prefill();
    }
    if wanted("prefill-step") {
        bench.prefill_step();
    }
}

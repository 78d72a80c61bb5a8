//! The GPU engine (the `cuda` feature) against independent references: the CPU forward
//! pass on the same weights (a tiny model the test writes, in both head sizes the GPU
//! kernels have, batched every way the engine loop batches), and llama.cpp's outputs for
//! the default model. Also the hand-off copies of GPU KV blocks.
//!
//! Needs an NVIDIA GPU: without one every test skips with a notice, unless
//! `TANDEM_REQUIRE_GPU=1` (set on the GPU machines), where a missing GPU fails.
//!
//! Run there with `cargo test --release --features cuda -p tandem-engine --test gpu`
//! (docs/gpu.md).
#![cfg(feature = "cuda")]

mod common;

use std::path::Path;
use std::sync::Arc;

use tandem_engine::cuda::model::KvBudget;
use tandem_engine::cuda::{CudaModel, GpuRunner, ProductOut, RunnerLimits, WeightDtype};
use tandem_engine::exec::{Quantization, WeightFormat};
use tandem_engine::kernels::ThreadPool;
use tandem_engine::kv::{BlockId, KvDtype, KvOptions, KvStore};
use tandem_engine::model::{ForwardScratch, Llama, LoadOptions, LogitsFor, SeqInput};
use tandem_engine::sample::{Sampler, SamplingParams, argmax};

fn gpu_present() -> bool {
    let count = tandem_engine::cuda::limits::device_count().unwrap_or(0);
    if count > 0 {
        return true;
    }
    if std::env::var("TANDEM_REQUIRE_GPU").as_deref() == Ok("1") {
        panic!("no GPU found, and TANDEM_REQUIRE_GPU=1");
    }
    eprintln!("skipping: no GPU");
    false
}

/// A tiny Llama with random f32 weights, as a Hugging Face folder.
struct Tiny {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    inter: usize,
    layers: usize,
    vocab: usize,
}

impl Tiny {
    fn write(&self, dir: &Path, seed: u64) {
        let mut rng = Lcg(seed);
        let head_dim = self.hidden / self.heads;
        let (h, kv) = (self.hidden, self.kv_heads * head_dim);
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n: usize = shape.iter().product();
            let values = (0..n).map(|_| offset + scale * rng.uniform()).collect();
            tensors.push((name, shape, values));
        };
        add(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, h],
            1.0,
            0.0,
        );
        add("lm_head.weight".into(), vec![self.vocab, h], 0.2, 0.0);
        add("model.norm.weight".into(), vec![h], 0.2, 1.0);
        for l in 0..self.layers {
            let p = format!("model.layers.{l}.");
            add(format!("{p}input_layernorm.weight"), vec![h], 0.2, 1.0);
            add(
                format!("{p}post_attention_layernorm.weight"),
                vec![h],
                0.2,
                1.0,
            );
            let s = 1.0 / (h as f32).sqrt();
            add(
                format!("{p}self_attn.q_proj.weight"),
                vec![h, h],
                2.0 * s,
                0.0,
            );
            add(
                format!("{p}self_attn.k_proj.weight"),
                vec![kv, h],
                2.0 * s,
                0.0,
            );
            add(format!("{p}self_attn.v_proj.weight"), vec![kv, h], s, 0.0);
            add(format!("{p}self_attn.o_proj.weight"), vec![h, h], s, 0.0);
            add(
                format!("{p}mlp.gate_proj.weight"),
                vec![self.inter, h],
                s,
                0.0,
            );
            add(
                format!("{p}mlp.up_proj.weight"),
                vec![self.inter, h],
                s,
                0.0,
            );
            let s_down = 1.0 / (self.inter as f32).sqrt();
            add(
                format!("{p}mlp.down_proj.weight"),
                vec![h, self.inter],
                s_down,
                0.0,
            );
        }
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
            .iter()
            .map(|(n, s, b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap();
                (n.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.hidden,
            "intermediate_size": self.inter,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": false,
            "torch_dtype": "float32"
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    }
}

struct Lcg(u64);

impl Lcg {
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The same model on the CPU (f32 weights, f16 KV) and on the GPU, with the same block
/// ids in both caches.
struct Pair {
    cpu: Llama,
    cpu_kv: KvStore,
    pool: ThreadPool,
    scratch: ForwardScratch,
    gpu: GpuRunner,
    vocab: usize,
}

const BLOCKS: usize = 160;

impl Pair {
    fn new(dir: &Path, format: impl Into<WeightFormat>, graphs: bool) -> Self {
        let cpu = tandem_engine::model::load_hf_dir(
            dir,
            LoadOptions {
                dense_weights_budget: 0,
            },
        )
        .unwrap();
        let options = KvOptions {
            block_size: 16,
            dtype: KvDtype::F16,
        };
        let layout = cpu.kv_layout(options);
        let model = Arc::new(CudaModel::load(dir, 0, format.into()).unwrap());
        let gpu = GpuRunner::new(
            model,
            layout,
            KvBudget::Bytes(BLOCKS * layout.bytes_per_block()),
            RunnerLimits {
                max_tokens: 1024,
                max_seqs: 16,
                max_model_len: 2048,
                cuda_graphs: graphs,
            },
        )
        .unwrap();
        assert_eq!(gpu.kv().num_blocks(), BLOCKS);
        Self {
            vocab: cpu.config().vocab_size,
            cpu_kv: KvStore::new(layout, BLOCKS),
            cpu,
            pool: ThreadPool::new(2).unwrap(),
            scratch: ForwardScratch::default(),
            gpu,
        }
    }

    /// Runs the batch on both; returns (cpu, gpu) logits rows.
    fn run(&mut self, batch: &[SeqInput]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let cpu = self
            .cpu
            .forward(&self.pool, batch, &mut self.cpu_kv, &mut self.scratch)
            .unwrap()
            .chunks_exact(self.vocab)
            .map(<[f32]>::to_vec)
            .collect();
        let gpu = self
            .gpu
            .forward(batch)
            .unwrap()
            .chunks_exact(self.vocab)
            .map(<[f32]>::to_vec)
            .collect::<Vec<_>>();
        // The same step again, its greedy tokens picked on the GPU (the step rewrites
        // the same keys and values): the host sampler's argmax of the logits above.
        let picked = self.gpu.forward_greedy(batch).unwrap().to_vec();
        let expected: Vec<u32> = gpu.iter().map(|row| argmax(row)).collect();
        assert_eq!(picked, expected, "greedy tokens picked on the GPU");
        (cpu, gpu)
    }
}

/// The GPU's greedy pick follows the host sampler's rules where they matter: the first
/// index on ties, NaN skipped, -inf still a candidate, 0 for a row of NaN.
#[test]
fn greedy_ids_follow_the_host_argmax() {
    if !gpu_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    D64.write(dir.path(), 7);
    let mut pair = Pair::new(dir.path(), Some(WeightDtype::F16), false);
    let vocab = pair.vocab;
    let mut noise = Lcg(11);
    let mut rows: Vec<Vec<f32>> = (0..6)
        .map(|_| (0..vocab).map(|_| noise.uniform()).collect())
        .collect();
    rows[0][3] = 9.0;
    rows[0][400] = 9.0; // a tie: the first index wins
    rows[1][0] = f32::NAN;
    rows[1][vocab - 1] = 5.0; // NaN skipped, the last index wins
    rows[2].fill(f32::NAN);
    rows[3].fill(f32::NEG_INFINITY);
    rows[4].fill(f32::NEG_INFINITY);
    rows[4][0] = f32::NAN;
    rows[4][7] = f32::NAN; // the first -inf after a NaN: index 1
    rows[5][vocab / 2] = f32::INFINITY;
    let flat: Vec<f32> = rows.concat();
    let picked = pair.gpu.argmax_rows(&flat).unwrap();
    let expected: Vec<u32> = rows.iter().map(|row| argmax(row)).collect();
    assert_eq!(expected, [3, vocab as u32 - 1, 0, 0, 1, vocab as u32 / 2]);
    assert_eq!(picked, expected);
}

/// Sampling on the GPU picks the host sampler's token for the same draw: temperature,
/// top-k, min-p, top-p and their mixes, greedy and sampled rows with penalties, logit
/// bias and end tokens held back, eight sequences (seeds) a step, each sampler's
/// history carried from step to step.
#[test]
fn sampled_ids_follow_the_host_sampler() {
    if !gpu_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A vocabulary that is no multiple of the kernel's 1,024 threads.
    SAMPLING.write(dir.path(), 7);
    let mut pair = Pair::new(dir.path(), Some(WeightDtype::F16), false);
    let vocab = pair.vocab;
    let base = SamplingParams::default();
    let configs = [
        SamplingParams { ..base.clone() },
        SamplingParams {
            temperature: 0.7,
            top_k: 50,
            ..base.clone()
        },
        SamplingParams {
            top_p: 0.9,
            ..base.clone()
        },
        SamplingParams {
            temperature: 1.3,
            top_k: 200,
            top_p: 0.5,
            ..base.clone()
        },
        SamplingParams {
            min_p: 0.05,
            ..base.clone()
        },
        SamplingParams {
            temperature: 0.8,
            top_k: 1000,
            top_p: 0.95,
            min_p: 0.1,
            ..base.clone()
        },
        SamplingParams {
            top_k: 1,
            ..base.clone()
        },
        SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            repetition_penalty: 1.2,
            logit_bias: vec![(5, 2.0), (17, -100.0)],
            ..base.clone()
        },
        SamplingParams {
            top_p: 0.8,
            presence_penalty: 0.4,
            frequency_penalty: 0.2,
            repetition_penalty: 1.3,
            logit_bias: vec![(9, 3.0)],
            min_tokens: 4,
            ..base.clone()
        },
    ];
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 % vocab) as u32).collect();
    let end_tokens = [2u32, 3];
    let (mut draws_made, mut agreed) = (0, 0);
    let mut noise = Lcg(23);
    for params in &configs {
        let seeds = 0..8u64;
        let sampler = |seed| {
            let params = SamplingParams {
                seed: Some(seed),
                ..params.clone()
            };
            Sampler::for_sequence(params, &prompt, &end_tokens)
        };
        let mut host: Vec<Sampler> = seeds.clone().map(sampler).collect();
        let mut device: Vec<Sampler> = seeds.map(sampler).collect();
        for _step in 0..8 {
            // Peaked rows: logits spread over ±6.
            let rows: Vec<Vec<f32>> = (0..host.len())
                .map(|_| (0..vocab).map(|_| 6.0 * noise.uniform()).collect())
                .collect();
            let draws: Vec<_> = device
                .iter_mut()
                .map(|s| s.device_draw().unwrap())
                .collect();
            let picked = pair.gpu.sample_rows(&rows.concat(), &draws).unwrap();
            for (i, row) in rows.iter().enumerate() {
                let expected = host[i].sample(row);
                draws_made += 1;
                agreed += usize::from(picked[i] == expected);
                assert!((picked[i] as usize) < vocab);
                // Both histories take the host's token, so one miss does not spread.
                device[i].record_device_token(expected);
            }
        }
    }
    // Float sums in another order may move a boundary by a rounding error: a draw
    // landing there may pick the neighbour. Nothing else may differ.
    assert!(
        agreed * 100 >= draws_made * 99,
        "{agreed} of {draws_made} draws picked the host's token"
    );
}

/// ‖gpu − cpu‖ / ‖cpu‖ of every row, checked below `limit`; also the argmax wherever
/// the CPU's top-1 leads clearly.
fn assert_close(what: &str, cpu: &[Vec<f32>], gpu: &[Vec<f32>], limit: f64) -> f64 {
    assert_eq!(cpu.len(), gpu.len(), "{what}: rows");
    let mut worst = 0.0f64;
    for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{what}: row {i} has NaN/inf"
        );
        let num: f64 = c.iter().zip(g).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = c.iter().map(|a| (*a as f64).powi(2)).sum();
        let rel = (num / den.max(1e-30)).sqrt();
        worst = worst.max(rel);
        assert!(
            rel < limit,
            "{what}: row {i} relative error {rel:.2e} ≥ {limit:.0e}"
        );
        let mut sorted: Vec<f32> = c.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 0.05 * sorted[0].abs().max(1.0) {
            assert_eq!(argmax(c), argmax(g), "{what}: row {i} top-1");
        }
    }
    eprintln!(
        "{what}: {} rows, worst relative error {worst:.2e}",
        cpu.len()
    );
    worst
}

fn seq<'a>(
    tokens: &'a [u32],
    start_pos: usize,
    block_table: &'a [BlockId],
    logits: LogitsFor,
) -> SeqInput<'a> {
    SeqInput {
        tokens,
        start_pos,
        block_table,
        logits,
    }
}

fn tokens(n: usize, salt: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(salt * 97) >> 7) % vocab as u32)
        .collect()
}

/// Every way the engine loop batches: a prompt, its continuation over a cached prefix,
/// a long prompt over scattered blocks (several key tiles), decode steps of several
/// sequences (graphs or not; one sequence alone splits its keys), and a mixed step.
fn batching_scenarios(tiny: &Tiny, format: impl Into<WeightFormat>, graphs: bool, limit: f64) {
    let dir = tempfile::tempdir().unwrap();
    tiny.write(dir.path(), 7);
    let format = format.into();
    let mut pair = Pair::new(dir.path(), format, graphs);
    let vocab = tiny.vocab;
    let label = format!(
        "head_dim {} {:?} {} graphs={graphs}",
        tiny.hidden / tiny.heads,
        format.dtype,
        format.quantization.name()
    );
    // Sequence A: blocks 0..; B: scattered, descending; C: from 100.
    let table_a: Vec<BlockId> = (0..40).collect();
    let table_b: Vec<BlockId> = (40..90).rev().collect();
    let table_c: Vec<BlockId> = (100..150).collect();
    let a = tokens(37, 1, vocab);
    let (cpu, gpu) = pair.run(&[seq(&a, 0, &table_a, LogitsFor::All)]);
    assert_close(&format!("{label}: prompt"), &cpu, &gpu, limit);
    let a2 = tokens(29, 2, vocab);
    let (cpu, gpu) = pair.run(&[seq(&a2, a.len(), &table_a, LogitsFor::All)]);
    assert_close(&format!("{label}: continuation"), &cpu, &gpu, limit);
    let b = tokens(700, 3, vocab);
    let (cpu, gpu) = pair.run(&[seq(&b, 0, &table_b, LogitsFor::All)]);
    assert_close(&format!("{label}: 700-token prompt"), &cpu, &gpu, limit);
    // One long sequence decoding alone: its keys split across thread blocks.
    let mut b_len = b.len();
    for step in 0..3 {
        let t = tokens(1, 10 + step, vocab);
        let (cpu, gpu) = pair.run(&[seq(&t, b_len, &table_b, LogitsFor::Last)]);
        assert_close(&format!("{label}: decode alone {step}"), &cpu, &gpu, limit);
        b_len += 1;
    }
    let c = tokens(5, 4, vocab);
    let (cpu, gpu) = pair.run(&[seq(&c, 0, &table_c, LogitsFor::Last)]);
    assert_close(&format!("{label}: short prompt"), &cpu, &gpu, limit);
    // Decode steps of three sequences of different lengths.
    let (mut a_len, mut c_len) = (a.len() + a2.len(), c.len());
    for step in 0..4 {
        let (ta, tb, tc) = (
            tokens(1, 20 + step, vocab),
            tokens(1, 30 + step, vocab),
            tokens(1, 40 + step, vocab),
        );
        let (cpu, gpu) = pair.run(&[
            seq(&ta, a_len, &table_a, LogitsFor::Last),
            seq(&tb, b_len, &table_b, LogitsFor::Last),
            seq(&tc, c_len, &table_c, LogitsFor::Last),
        ]);
        assert_close(&format!("{label}: decode batch {step}"), &cpu, &gpu, limit);
        a_len += 1;
        b_len += 1;
        c_len += 1;
    }
    // A mixed step: two decodes and a prefill chunk that needs no logits.
    let (ta, tc, more) = (
        tokens(1, 50, vocab),
        tokens(1, 51, vocab),
        tokens(20, 52, vocab),
    );
    let (cpu, gpu) = pair.run(&[
        seq(&ta, a_len, &table_a, LogitsFor::Last),
        seq(&more, b_len, &table_b, LogitsFor::None),
        seq(&tc, c_len, &table_c, LogitsFor::Last),
    ]);
    assert_close(&format!("{label}: mixed step"), &cpu, &gpu, limit);
}

const D64: Tiny = Tiny {
    hidden: 256,
    heads: 4,
    kv_heads: 2,
    inter: 512,
    layers: 2,
    vocab: 512,
};

/// D64 with a vocabulary of 20,000 tokens, for sampling.
const SAMPLING: Tiny = Tiny {
    vocab: 20_000,
    ..D64
};

const D128: Tiny = Tiny {
    hidden: 1024,
    heads: 8,
    kv_heads: 2,
    inter: 1024,
    layers: 2,
    vocab: 512,
};

/// Eight query heads to a KV head: a chunk of 3 tokens is 24 rows, the prompt kernel's
/// tile, and short enough that its keys are split across thread blocks. Its FFN width is
/// not a multiple of 8, so SiLU·up takes its one-element path and the down product
/// (whose rows are then not whole 16-byte chunks) goes to cuBLAS at every step size.
const D128_G8: Tiny = Tiny {
    hidden: 1024,
    heads: 8,
    kv_heads: 1,
    inter: 1004,
    layers: 2,
    vocab: 512,
};

/// The prompt-tile attention kernel with its keys split (and some splits left without
/// keys), merged by the combine kernel: a short chunk after a long prompt.
#[test]
fn short_chunks_of_a_wide_group_split_their_keys() {
    if !gpu_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    D128_G8.write(dir.path(), 9);
    let mut pair = Pair::new(dir.path(), Some(WeightDtype::F16), true);
    let table: Vec<BlockId> = (0..40).collect();
    let prompt = tokens(300, 7, D128_G8.vocab);
    let (cpu, gpu) = pair.run(&[seq(&prompt, 0, &table, LogitsFor::Last)]);
    assert_close("group 8: prompt", &cpu, &gpu, F16_LIMIT);
    let chunk = tokens(3, 8, D128_G8.vocab);
    let (cpu, gpu) = pair.run(&[seq(&chunk, prompt.len(), &table, LogitsFor::All)]);
    assert_close("group 8: 3-token chunk, keys split", &cpu, &gpu, F16_LIMIT);
}

/// f16 rounding of weights and activations: ~1e-3 relative per product.
const F16_LIMIT: f64 = 2e-2;
/// bf16 keeps 8 bits: ~4e-3 per product.
const BF16_LIMIT: f64 = 6e-2;

#[test]
fn head_dim_64_matches_the_cpu() {
    if gpu_present() {
        batching_scenarios(&D64, Some(WeightDtype::F16), true, F16_LIMIT);
    }
}

#[test]
fn head_dim_128_matches_the_cpu() {
    if gpu_present() {
        batching_scenarios(&D128, Some(WeightDtype::F16), true, F16_LIMIT);
    }
}

#[test]
fn bf16_and_eager_steps_match_the_cpu() {
    if gpu_present() {
        batching_scenarios(&D128, Some(WeightDtype::Bf16), false, BF16_LIMIT);
        batching_scenarios(&D64, Some(WeightDtype::F16), false, F16_LIMIT);
    }
}

/// Blocks written to GPU memory read back unchanged, and blocks copied between two
/// caches (what a same-host hand-off does) carry a prefilled sequence: decoding from
/// the copy gives the original's logits, bit for bit.
#[test]
fn kv_blocks_move_between_gpu_caches() {
    if !gpu_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    D128.write(dir.path(), 9);
    let mut p = Pair::new(dir.path(), Some(WeightDtype::F16), true);
    let mut d = Pair::new(dir.path(), Some(WeightDtype::F16), true);
    let layout = p.gpu.kv().layout();
    let per_block = layout.bytes_per_block();
    // Host round trip.
    let pattern: Vec<u8> = (0..3 * per_block).map(|i| (i * 31 % 251) as u8).collect();
    unsafe { p.gpu.kv().write_blocks(&[5, 9, 2], &pattern) }.unwrap();
    let mut back = vec![0u8; 3 * per_block];
    unsafe { p.gpu.kv().read_blocks(&[5, 9, 2], &mut back) }.unwrap();
    assert!(back == pattern, "blocks read back differ");
    // Prefill on P, copy its blocks into other ids on D, decode on both.
    let prompt = tokens(150, 5, D128.vocab);
    let p_table: Vec<BlockId> = (10..20).collect();
    let d_table: Vec<BlockId> = (60..70).rev().collect();
    p.gpu
        .forward(&[seq(&prompt, 0, &p_table, LogitsFor::Last)])
        .unwrap();
    let used = layout.blocks_for(prompt.len());
    unsafe {
        d.gpu
            .kv()
            .copy_from_peer(p.gpu.kv().base(), &p_table[..used], &d_table[..used])
    }
    .unwrap();
    let next = tokens(1, 6, D128.vocab);
    let step = |pair: &mut Pair, table: &[BlockId]| {
        pair.gpu
            .forward(&[seq(&next, prompt.len(), table, LogitsFor::Last)])
            .unwrap()
            .to_vec()
    };
    let from_p = step(&mut p, &p_table);
    let from_d = step(&mut d, &d_table);
    assert!(from_p == from_d, "decode from copied blocks differs");
    // And through the host, as across hosts.
    let mut staged = vec![0u8; used * per_block];
    unsafe { p.gpu.kv().read_blocks(&p_table[..used], &mut staged) }.unwrap();
    let d2_table: Vec<BlockId> = (120..130).collect();
    unsafe { d.gpu.kv().write_blocks(&d2_table[..used], &staged) }.unwrap();
    assert!(
        step(&mut d, &d2_table) == from_p,
        "decode from staged blocks differs"
    );
}

/// The default model on GPU 0 in `format`, with room for llama.cpp's fixture cases.
fn default_model_runner(path: &Path, format: WeightFormat) -> GpuRunner {
    let model = Arc::new(CudaModel::load(path, 0, format).unwrap());
    let layout = model.kv_layout(KvOptions::default());
    GpuRunner::new(
        model,
        layout,
        KvBudget::Bytes(256 << 20),
        RunnerLimits {
            max_tokens: 512,
            max_seqs: 8,
            max_model_len: 1024,
            cuda_graphs: true,
        },
    )
    .unwrap()
}

/// The default model on the GPU against llama.cpp: teacher-forced top-1 wherever
/// llama.cpp's choice is clear, and greedy continuations, as the CPU path is checked
/// (crates/engine/tests/llamacpp_reference.rs).
#[test]
fn default_model_agrees_with_llamacpp() {
    if !gpu_present() {
        return;
    }
    let Some(path) = common::default_model() else {
        return;
    };
    let mut runner = default_model_runner(&path, Some(WeightDtype::F16).into());
    let vocab = runner.config().vocab_size;
    let table: Vec<BlockId> = (0..64).collect();
    let (mut agree, mut total) = (0usize, 0usize);
    for (case_index, case) in common::llamacpp_cases().iter().enumerate() {
        let (prompt, greedy) = (&case.prompt_ids, &case.greedy_ids);
        // Teacher-forced: prompt + llama.cpp's greedy continuation in one pass.
        let sequence = case.sequence();
        let logits = runner
            .forward(&[seq(&sequence, 0, &table, LogitsFor::All)])
            .unwrap()
            .to_vec();
        assert_eq!(
            logits.len(),
            vocab * case.top1.len(),
            "one reference row per position"
        );
        for (k, row) in logits.chunks_exact(vocab).enumerate() {
            let top1 = case.top1[k];
            let ours = argmax(row);
            total += 1;
            agree += usize::from(ours == top1);
            if case.margin[k] >= common::CLEAR_MARGIN {
                assert_eq!(
                    ours, top1,
                    "case {case_index}, position {k}: clear choice differs"
                );
            }
        }
        // Greedy decoding token by token (decode steps replayed from graphs).
        let mut produced = Vec::new();
        let mut last = runner
            .forward(&[seq(prompt, 0, &table, LogitsFor::Last)])
            .unwrap()
            .to_vec();
        for i in 0..greedy.len() {
            let token = argmax(&last);
            produced.push(token);
            last = runner
                .forward(&[seq(&[token], prompt.len() + i, &table, LogitsFor::Last)])
                .unwrap()
                .to_vec();
        }
        let same = produced
            .iter()
            .zip(greedy)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "case {case_index}: greedy ids equal for {same} of {} tokens",
            greedy.len()
        );
        // Up to llama.cpp's first near-tie, the continuation must be llama.cpp's.
        let first_tie = (0..greedy.len())
            .find(|&i| case.margin[prompt.len() - 1 + i] < common::CLEAR_MARGIN)
            .unwrap_or(greedy.len());
        assert!(
            same >= first_tie.min(16),
            "case {case_index}: greedy diverges at {same}, before llama.cpp's first near-tie ({first_tie})"
        );
    }
    let rate = agree as f64 / total as f64;
    eprintln!("teacher-forced top-1 agreement with llama.cpp: {agree}/{total} = {rate:.3}");
    assert!(rate >= 0.95, "agreement {rate:.3} < 0.95");
}

/// The value of `dtype`'s 16 bits.
fn from_bits(dtype: WeightDtype, bits: u16) -> f32 {
    match dtype {
        WeightDtype::Bf16 => half::bf16::from_bits(bits).to_f32(),
        WeightDtype::F16 => half::f16::from_bits(bits).to_f32(),
    }
}

/// Checks a fused gate/up pass's `tokens × inter` results in `act_gpu` (the GPU's
/// weight type) against SiLU(gate)·up computed on the host from `dot(row, token)`:
/// within 1% plus `slack`.
fn assert_silu_up(
    gpu: &tandem_engine::cuda::gpu::Gpu,
    act_gpu: &tandem_engine::cuda::gpu::DeviceBuffer,
    (tokens, inter): (usize, usize),
    dot: impl Fn(usize, usize) -> f64,
    slack: f64,
    label: &str,
) {
    gpu.synchronize().unwrap();
    let mut act = vec![0u16; tokens * inter];
    act_gpu.download(0, &mut act).unwrap();
    for t in 0..tokens {
        for j in 0..inter {
            let (g, u) = (dot(j, t), dot(inter + j, t));
            let want = g / (1.0 + (-g).exp()) * u;
            let got = f64::from(from_bits(gpu.weight_dtype, act[t * inter + j]));
            assert!(
                (got - want).abs() <= 1e-2 * want.abs() + slack,
                "{label}: act[{t}][{j}] = {got}, want {want}"
            );
        }
    }
}

/// The matrix–vector kernels of small steps against the product computed on the host
/// in f64 from the same rounded weights: every token count they serve, rows that do not
/// fill a block, rows that are not whole 256-column passes of a warp, accumulation into
/// an existing result, the gate/up pass with SiLU·up folded in, and a width they cannot
/// take (cols not a multiple of 8), which goes to cuBLAS.
#[test]
fn gemv_products_match_the_host() {
    use tandem_engine::cuda::gemv::{GEMV_MAX_TOKENS, MatrixRef, Products};
    use tandem_engine::cuda::gpu::{DeviceBuffer, Gpu};

    if !gpu_present() {
        return;
    }
    for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
        let gpu = Gpu::open(0, dtype).unwrap();
        let products = Products::new(&gpu, true).unwrap();
        let round = |v: f32| from_bits(dtype, dtype.convert(&[v])[0]);
        let upload =
            |values: &[f32]| DeviceBuffer::from_slice(&gpu.ctx, &dtype.convert(values)).unwrap();
        let mut rng = Lcg(5);
        for (rows, cols) in [(37, 8), (300, 264), (1000, 2088), (64, 12)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| round(rng.uniform())).collect();
            let x: Vec<f32> = (0..GEMV_MAX_TOKENS * cols)
                .map(|_| round(rng.uniform()))
                .collect();
            let prior: Vec<f32> = (0..GEMV_MAX_TOKENS * rows).map(|_| rng.uniform()).collect();
            let dot = |r: usize, t: usize| -> f64 {
                (0..cols)
                    .map(|c| f64::from(w[r * cols + c]) * f64::from(x[t * cols + c]))
                    .sum()
            };
            let (w_gpu, x_gpu) = (upload(&w), upload(&x));
            for tokens in 1..=GEMV_MAX_TOKENS {
                for accumulate in [false, true] {
                    let y_gpu = DeviceBuffer::from_slice(&gpu.ctx, &prior).unwrap();
                    // SAFETY: the buffers hold rows × cols, tokens × cols and tokens × rows.
                    unsafe {
                        products
                            .matmul(
                                &gpu,
                                MatrixRef::plain(w_gpu.ptr()),
                                rows,
                                cols,
                                x_gpu.ptr(),
                                tokens,
                                y_gpu.ptr(),
                                if accumulate {
                                    ProductOut::F32Accumulate
                                } else {
                                    ProductOut::F32
                                },
                            )
                            .unwrap();
                    }
                    gpu.synchronize().unwrap();
                    let mut y = vec![0f32; tokens * rows];
                    y_gpu.download(0, &mut y).unwrap();
                    for t in 0..tokens {
                        for r in 0..rows {
                            let base = if accumulate {
                                f64::from(prior[t * rows + r])
                            } else {
                                0.0
                            };
                            let want = base + dot(r, t);
                            let got = f64::from(y[t * rows + r]);
                            assert!(
                                (got - want).abs()
                                    <= 1e-4 * (cols as f64).sqrt() + 1e-5 * want.abs(),
                                "{dtype:?} {rows}×{cols}, {tokens} tokens, accumulate {accumulate}: \
                                 y[{t}][{r}] = {got}, want {want}"
                            );
                        }
                    }
                }
                if rows % 2 != 0 {
                    continue;
                }
                let inter = rows / 2;
                let act_gpu = DeviceBuffer::zeroed(&gpu.ctx, 2 * tokens * inter).unwrap();
                // SAFETY: as above; act holds tokens × inter values.
                let fused = unsafe {
                    products
                        .gate_up_silu(
                            &gpu,
                            MatrixRef::plain(w_gpu.ptr()),
                            inter,
                            cols,
                            x_gpu.ptr(),
                            tokens,
                            act_gpu.ptr(),
                        )
                        .unwrap()
                };
                assert_eq!(fused, cols % 8 == 0, "{rows}×{cols}: fused pass taken");
                if !fused {
                    continue;
                }
                let label = format!("{dtype:?} {rows}×{cols}, {tokens} tokens");
                let slack = 1e-3 * (cols as f64).sqrt();
                assert_silu_up(&gpu, &act_gpu, (tokens, inter), dot, slack, &label);
            }
        }
    }
}

/// FP8 weights (`--quantization fp8`) through every batching scenario, against the CPU's
/// f32 forward pass of the unquantized model: the E4M3 weights (3 mantissa bits, one
/// scale per matrix) and, above four tokens a step, E4M3 activations put an error of a
/// few percent on the logits; a wrong scale or code would put one of order 1.
const FP8_LIMIT: f64 = 0.15;

#[test]
fn fp8_steps_match_the_cpu() {
    if !gpu_present() {
        return;
    }
    for (tiny, dtype, graphs) in [
        (&D128, WeightDtype::Bf16, true),
        (&D64, WeightDtype::F16, false),
    ] {
        let format = WeightFormat {
            dtype: Some(dtype),
            quantization: Quantization::Fp8,
        };
        batching_scenarios(tiny, format, graphs, FP8_LIMIT);
    }
}

/// A model whose matrix sides are not whole 16-byte rows of E4M3 is refused with the
/// side named.
#[test]
fn fp8_refuses_unaligned_shapes() {
    if !gpu_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    D128_G8.write(dir.path(), 7);
    let format = WeightFormat {
        dtype: None,
        quantization: Quantization::Fp8,
    };
    let err = CudaModel::load(dir.path(), 0, format)
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("intermediate size of 1004"),
        "{err}"
    );
}

/// The FP8 products against the host in f64: the E4M3 matrix–vector kernels (1 to 4
/// tokens, plain and with SiLU·up) against the dequantized weights, and the cuBLASLt
/// GEMM (more tokens, f32 out with and without accumulation, weight-type out) against
/// the dequantized weights times the activations quantized on the host as the GPU
/// quantizes them (one scale for the product).
#[test]
fn fp8_products_match_the_host() {
    use tandem_engine::cuda::gemv::{GEMV_MAX_TOKENS, MatrixRef, Products};
    use tandem_engine::cuda::gpu::{DeviceBuffer, Gpu};
    use tandem_engine::e4m3;

    if !gpu_present() {
        return;
    }
    const MAX_TOKENS: usize = 300;
    for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
        let gpu = Gpu::open(0, dtype).unwrap();
        let products = Products::new(&gpu, true)
            .unwrap()
            .with_fp8(&gpu, MAX_TOKENS, 2048)
            .unwrap();
        let mut rng = Lcg(11);
        for (rows, cols) in [(48, 32), (320, 272), (1024, 2048)] {
            let weights: Vec<f32> = (0..rows * cols).map(|_| 0.1 * rng.uniform()).collect();
            let q = e4m3::quantize(&weights);
            let w: Vec<f64> = q
                .codes
                .iter()
                .map(|&c| f64::from(e4m3::e4m3_to_f32(c) * q.scale))
                .collect();
            let w_codes = DeviceBuffer::from_slice(&gpu.ctx, &q.codes).unwrap();
            let w_scale = DeviceBuffer::from_slice(&gpu.ctx, &[q.scale]).unwrap();
            let matrix = MatrixRef {
                ptr: w_codes.ptr(),
                fp8_scale: Some(w_scale.ptr()),
            };
            let x_values: Vec<f32> = (0..MAX_TOKENS * cols)
                .map(|_| 2.0 * rng.uniform())
                .collect();
            let x_bits = dtype.convert(&x_values);
            let x_gpu = DeviceBuffer::from_slice(&gpu.ctx, &x_bits).unwrap();
            let prior: Vec<f32> = (0..MAX_TOKENS * rows).map(|_| rng.uniform()).collect();
            for tokens in (1..=GEMV_MAX_TOKENS).chain([5, 64, MAX_TOKENS]) {
                let x: Vec<f32> = x_bits[..tokens * cols]
                    .iter()
                    .map(|&b| from_bits(dtype, b))
                    .collect();
                // What a product sees of x: itself in the matrix–vector kernels, its E4M3
                // codes times one scale in the GEMM (every step above 4 tokens, and every
                // product written in the weight type).
                let x_plain: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
                let qx = e4m3::quantize(&x);
                let x_quantized: Vec<f64> = qx
                    .codes
                    .iter()
                    .map(|&c| f64::from(e4m3::e4m3_to_f32(c) * qx.scale))
                    .collect();
                let dot = |r: usize, t: usize, gemm: bool| -> f64 {
                    let x_seen = if gemm { &x_quantized } else { &x_plain };
                    (0..cols)
                        .map(|c| w[r * cols + c] * x_seen[t * cols + c])
                        .sum()
                };
                let label = format!("{dtype:?} {rows}×{cols}, {tokens} tokens");
                for out in [
                    ProductOut::F32,
                    ProductOut::F32Accumulate,
                    ProductOut::WeightType,
                ] {
                    let gemm = tokens > GEMV_MAX_TOKENS || out == ProductOut::WeightType;
                    // cuBLASLt's FP8 tensor cores add in shorter runs than f32.
                    let slack = if gemm { 2e-3 } else { 1e-4 };
                    let y_gpu = DeviceBuffer::from_slice(&gpu.ctx, &prior).unwrap();
                    // SAFETY: the buffers hold rows × cols codes, tokens × cols values
                    // and tokens × rows results (f32 or narrower).
                    unsafe {
                        products
                            .matmul(
                                &gpu,
                                matrix,
                                rows,
                                cols,
                                x_gpu.ptr(),
                                tokens,
                                y_gpu.ptr(),
                                out,
                            )
                            .unwrap();
                    }
                    gpu.synchronize().unwrap();
                    let y: Vec<f64> = if out == ProductOut::WeightType {
                        let mut bits = vec![0u16; tokens * rows];
                        y_gpu.download(0, &mut bits).unwrap();
                        bits.iter()
                            .map(|&b| f64::from(from_bits(dtype, b)))
                            .collect()
                    } else {
                        let mut y = vec![0f32; tokens * rows];
                        y_gpu.download(0, &mut y).unwrap();
                        y.iter().map(|&v| f64::from(v)).collect()
                    };
                    let rounding = if out == ProductOut::WeightType {
                        1e-2
                    } else {
                        1e-5
                    };
                    for t in 0..tokens {
                        for r in 0..rows {
                            let base = if out == ProductOut::F32Accumulate {
                                f64::from(prior[t * rows + r])
                            } else {
                                0.0
                            };
                            let want = base + dot(r, t, gemm);
                            let got = y[t * rows + r];
                            assert!(
                                (got - want).abs()
                                    <= slack * (cols as f64).sqrt() * 0.2 + rounding * want.abs(),
                                "{label}, {out:?}: y[{t}][{r}] = {got}, want {want}"
                            );
                        }
                    }
                }
                if tokens > GEMV_MAX_TOKENS {
                    continue;
                }
                let inter = rows / 2;
                let act_gpu = DeviceBuffer::zeroed(&gpu.ctx, 2 * tokens * inter).unwrap();
                // SAFETY: as above; act holds tokens × inter values.
                let fused = unsafe {
                    products
                        .gate_up_silu(
                            &gpu,
                            matrix,
                            inter,
                            cols,
                            x_gpu.ptr(),
                            tokens,
                            act_gpu.ptr(),
                        )
                        .unwrap()
                };
                assert!(fused, "{label}: the fused E4M3 pass");
                let slack = 1e-4 * (cols as f64).sqrt();
                let gemv_dot = |r: usize, t: usize| dot(r, t, false);
                assert_silu_up(&gpu, &act_gpu, (tokens, inter), gemv_dot, slack, &label);
            }
        }
    }
}

/// FP8 weights on the default model against f16 weights on the same GPU, both
/// teacher-forced through llama.cpp's fixture cases: how often each picks llama.cpp's
/// top-1, how often FP8 picks what f16 picks, the mean KL divergence of FP8's next-token
/// distribution from f16's, and each one's perplexity of the cases' tokens. The figures
/// are printed (docs/benchmarks.md reports them); the test holds FP8 to agreeing with
/// llama.cpp wherever llama.cpp's choice is clear.
#[test]
fn fp8_default_model_accuracy_against_f16() {
    if !gpu_present() {
        return;
    }
    let Some(path) = common::default_model() else {
        return;
    };
    let run = |quantization: Quantization| -> Vec<Vec<Vec<f32>>> {
        let format = WeightFormat {
            dtype: Some(WeightDtype::F16),
            quantization,
        };
        let mut runner = default_model_runner(&path, format);
        let vocab = runner.config().vocab_size;
        let table: Vec<BlockId> = (0..64).collect();
        common::llamacpp_cases()
            .iter()
            .map(|case| {
                let sequence = case.sequence();
                runner
                    .forward(&[seq(&sequence, 0, &table, LogitsFor::All)])
                    .unwrap()
                    .chunks_exact(vocab)
                    .map(<[f32]>::to_vec)
                    .collect()
            })
            .collect()
    };
    let (f16, fp8) = (run(Quantization::None), run(Quantization::Fp8));
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        row.iter().map(|&v| v as f64 - max - sum.ln()).collect()
    };
    let (mut positions, mut f16_agree, mut fp8_agree, mut same) = (0usize, 0, 0, 0);
    let (mut clear, mut fp8_clear_agree) = (0usize, 0usize);
    let (mut kl_sum, mut f16_nll, mut fp8_nll, mut scored) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for ((case, rows16), rows8) in common::llamacpp_cases().iter().zip(&f16).zip(&fp8) {
        let sequence = case.sequence();
        for (i, (r16, r8)) in rows16.iter().zip(rows8).enumerate() {
            let (l16, l8) = (log_softmax(r16), log_softmax(r8));
            kl_sum += l16
                .iter()
                .zip(&l8)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>();
            if let Some(&next) = sequence.get(i + 1) {
                f16_nll -= l16[next as usize];
                fp8_nll -= l8[next as usize];
                scored += 1;
            }
            same += usize::from(argmax(r16) == argmax(r8));
            let top1 = case.top1[i];
            positions += 1;
            f16_agree += usize::from(argmax(r16) == top1);
            fp8_agree += usize::from(argmax(r8) == top1);
            if case.margin[i] >= common::CLEAR_MARGIN {
                clear += 1;
                fp8_clear_agree += usize::from(argmax(r8) == top1);
            }
        }
    }
    eprintln!(
        "fp8 vs f16, default model: top-1 = llama.cpp's at {positions} positions: f16 {f16_agree}, \
         fp8 {fp8_agree} (clear choices: fp8 {fp8_clear_agree}/{clear}); fp8 top-1 = f16 top-1 at \
         {same}/{positions}; mean KL(f16 ‖ fp8) {:.4} nats; perplexity of the cases' tokens: \
         f16 {:.3}, fp8 {:.3}",
        kl_sum / positions as f64,
        (f16_nll / scored as f64).exp(),
        (fp8_nll / scored as f64).exp()
    );
    assert!(
        fp8_clear_agree as f64 >= 0.95 * clear as f64,
        "fp8 picks llama.cpp's clear choice at only {fp8_clear_agree} of {clear} positions"
    );
}

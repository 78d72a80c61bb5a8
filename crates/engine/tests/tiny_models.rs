//! Tiny random-weight Llama models written by the test in both formats (GGUF F32 and
//! Hugging Face safetensors) must give the same logits as each other and as a naive f32
//! forward pass written here, independently of the engine's kernels. Also: ragged
//! batches, paging and chunked prefill must not change the numbers, and broken files
//! must give errors that name the file and the problem.

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use tandem_engine::ModelError;
use tandem_engine::kernels::ThreadPool;
use tandem_engine::kv::{KvDtype, KvOptions, KvStore};
use tandem_engine::model::{self, ForwardScratch, Llama, LoadOptions, LogitsFor, SeqInput};

const HIDDEN: usize = 64;
const INTER: usize = 96;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const VOCAB: usize = 128;
const THETA: f32 = 10_000.0;
const EPS: f32 = 1e-5;

/// Weights in Hugging Face naming and layout (row-major `[out, in]`).
struct TinyWeights {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl TinyWeights {
    fn random(seed: u64) -> Self {
        let mut rng = Lcg(seed);
        let mut tensors = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|_| exact_in_half_precisions(offset + scale * rng.next()))
                .collect();
            tensors.push((name, shape, data));
        };
        add(
            "model.embed_tokens.weight".into(),
            vec![VOCAB, HIDDEN],
            1.0,
            0.0,
        );
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            add(
                format!("{p}.input_layernorm.weight"),
                vec![HIDDEN],
                0.2,
                1.0,
            );
            add(
                format!("{p}.self_attn.q_proj.weight"),
                vec![HIDDEN, HIDDEN],
                0.25,
                0.0,
            );
            add(
                format!("{p}.self_attn.k_proj.weight"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
                0.25,
                0.0,
            );
            add(
                format!("{p}.self_attn.v_proj.weight"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
                0.25,
                0.0,
            );
            add(
                format!("{p}.self_attn.o_proj.weight"),
                vec![HIDDEN, HIDDEN],
                0.25,
                0.0,
            );
            add(
                format!("{p}.post_attention_layernorm.weight"),
                vec![HIDDEN],
                0.2,
                1.0,
            );
            add(
                format!("{p}.mlp.gate_proj.weight"),
                vec![INTER, HIDDEN],
                0.25,
                0.0,
            );
            add(
                format!("{p}.mlp.up_proj.weight"),
                vec![INTER, HIDDEN],
                0.25,
                0.0,
            );
            add(
                format!("{p}.mlp.down_proj.weight"),
                vec![HIDDEN, INTER],
                0.25,
                0.0,
            );
        }
        add("model.norm.weight".into(), vec![HIDDEN], 0.2, 1.0);
        add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.5, 0.0);
        Self { tensors }
    }

    fn get(&self, name: &str) -> &[f32] {
        &self.tensors.iter().find(|t| t.0 == name).unwrap().2
    }

    fn write_hf_dir(&self, dir: &Path, shards: usize, dtype: safetensors::Dtype) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), hf_config_json()).unwrap();
        let per_shard = self.tensors.len().div_ceil(shards);
        let mut weight_map = serde_json::Map::new();
        for (i, chunk) in self.tensors.chunks(per_shard).enumerate() {
            let file = if shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
            };
            let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
                .iter()
                .map(|(name, shape, data)| (name.clone(), shape.clone(), encode(data, dtype)))
                .collect();
            let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
                .iter()
                .map(|(name, shape, data)| {
                    let view =
                        safetensors::tensor::TensorView::new(dtype, shape.clone(), data).unwrap();
                    (name.clone(), view)
                })
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
            for (name, _, _) in chunk {
                weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
            }
        }
        if shards > 1 {
            let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
    }

    /// Writes the weights as llama.cpp's converter would: GGUF names, and Q/K rows
    /// permuted so that adjacent-pair RoPE equals Hugging Face's half-split RoPE.
    /// The weights as a GGUF of `dtype` holds them: matrices quantized and dequantized
    /// (by candle, independently of the engine's kernels), vectors untouched.
    fn requantized(&self, dtype: GgmlDType) -> Self {
        let tensors = self
            .tensors
            .iter()
            .map(|(name, shape, data)| {
                if shape.len() == 1 {
                    return (name.clone(), shape.clone(), data.clone());
                }
                let tensor =
                    Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu).unwrap();
                let back = QTensor::quantize(&tensor, dtype)
                    .unwrap()
                    .dequantize(&Device::Cpu)
                    .unwrap();
                let values = back.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (name.clone(), shape.clone(), values)
            })
            .collect();
        Self { tensors }
    }

    fn write_gguf(&self, path: &Path, arch: &str, dtype: GgmlDType) {
        let gguf_name = |hf: &str| -> String {
            let renames = [
                ("model.embed_tokens.weight", "token_embd.weight"),
                ("model.norm.weight", "output_norm.weight"),
                ("lm_head.weight", "output.weight"),
            ];
            if let Some((_, g)) = renames.iter().find(|(h, _)| *h == hf) {
                return g.to_string();
            }
            let rest = hf.strip_prefix("model.layers.").unwrap();
            let (layer, tail) = rest.split_once('.').unwrap();
            let tail = match tail {
                "input_layernorm.weight" => "attn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                other => panic!("unexpected {other}"),
            };
            format!("blk.{layer}.{tail}")
        };
        let qtensors: Vec<(String, QTensor)> = self
            .tensors
            .iter()
            .map(|(name, shape, data)| {
                let data = if name.ends_with("q_proj.weight") {
                    permute_for_gguf(data, HEADS)
                } else if name.ends_with("k_proj.weight") {
                    permute_for_gguf(data, KV_HEADS)
                } else {
                    data.clone()
                };
                let tensor = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu).unwrap();
                // Like llama.cpp's files: norms stay F32 whatever the matrices are.
                let dtype = if shape.len() == 1 {
                    GgmlDType::F32
                } else {
                    dtype
                };
                (gguf_name(name), QTensor::quantize(&tensor, dtype).unwrap())
            })
            .collect();
        let u32v = gguf_file::Value::U32;
        let metadata: Vec<(String, gguf_file::Value)> = vec![
            (
                "general.architecture".into(),
                gguf_file::Value::String(arch.into()),
            ),
            (format!("{arch}.block_count"), u32v(LAYERS as u32)),
            (format!("{arch}.context_length"), u32v(256)),
            (format!("{arch}.embedding_length"), u32v(HIDDEN as u32)),
            (format!("{arch}.feed_forward_length"), u32v(INTER as u32)),
            (format!("{arch}.attention.head_count"), u32v(HEADS as u32)),
            (
                format!("{arch}.attention.head_count_kv"),
                u32v(KV_HEADS as u32),
            ),
            (
                format!("{arch}.rope.freq_base"),
                gguf_file::Value::F32(THETA),
            ),
            (
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                gguf_file::Value::F32(EPS),
            ),
            (format!("{arch}.vocab_size"), u32v(VOCAB as u32)),
        ];
        let meta_refs: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
    }
}

fn encode(data: &[f32], dtype: safetensors::Dtype) -> Vec<u8> {
    match dtype {
        safetensors::Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        safetensors::Dtype::F16 => data
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        safetensors::Dtype::BF16 => data
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => panic!("test writes no {other:?}"),
    }
}

fn hf_config_json() -> String {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "rms_norm_eps": EPS,
        "rope_theta": THETA,
        "max_position_embeddings": 256,
        "tie_word_embeddings": false,
        "torch_dtype": "float32"
    })
    .to_string()
}

/// llama.cpp's converter permutation: within each head, rows `[half0 | half1]` become
/// interleaved `[h0[0], h1[0], h0[1], h1[1], …]`.
fn permute_for_gguf(w: &[f32], n_heads: usize) -> Vec<f32> {
    let rows = w.len() / HIDDEN;
    let d = rows / n_heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src = h * d + j * (d / 2) + i;
                let dst = h * d + 2 * i + j;
                out[dst * HIDDEN..(dst + 1) * HIDDEN]
                    .copy_from_slice(&w[src * HIDDEN..(src + 1) * HIDDEN]);
            }
        }
    }
    out
}

/// Rounds to a value that bf16 and f16 both represent exactly, so a checkpoint stored
/// in any of f32/f16/bf16 holds the very numbers the reference computes with.
fn exact_in_half_precisions(v: f32) -> f32 {
    if v.abs() < 1e-3 {
        return 0.0;
    }
    half::bf16::from_f32(v).to_f32()
}

/// Deterministic uniform numbers in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A textbook Llama forward in f64 over the Hugging Face weights: full causal
/// attention, half-split RoPE; returns logits for every position.
fn naive_forward(w: &TinyWeights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let t = tokens.len();
    let get = |n: &str| w.get(n).iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let matvec = |m: &[f64], x: &[f64], rows: usize| -> Vec<f64> {
        let cols = x.len();
        (0..rows)
            .map(|r| (0..cols).map(|c| m[r * cols + c] * x[c]).sum())
            .collect()
    };
    let rms = |x: &[f64], g: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + EPS as f64).sqrt();
        x.iter().zip(g).map(|(v, g)| v * inv * g).collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        let half = HEAD_DIM / 2;
        for head in v.chunks_mut(HEAD_DIM) {
            for i in 0..half {
                let freq = (THETA as f64).powf(-2.0 * i as f64 / HEAD_DIM as f64);
                let (s, c) = (pos as f64 * freq).sin_cos();
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c - b * s;
                head[i + half] = a * s + b * c;
            }
        }
    };
    let embed = get("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&tok| embed[tok as usize * HIDDEN..(tok as usize + 1) * HIDDEN].to_vec())
        .collect();
    for l in 0..LAYERS {
        let p = |n: &str| get(&format!("model.layers.{l}.{n}"));
        let (wq, wk, wv, wo) = (
            p("self_attn.q_proj.weight"),
            p("self_attn.k_proj.weight"),
            p("self_attn.v_proj.weight"),
            p("self_attn.o_proj.weight"),
        );
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let h = rms(x, &p("input_layernorm.weight"));
            let mut q = matvec(&wq, &h, HIDDEN);
            let mut k = matvec(&wk, &h, KV_HEADS * HEAD_DIM);
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&wv, &h, KV_HEADS * HEAD_DIM));
        }
        for i in 0..t {
            let mut attn = vec![0.0; HIDDEN];
            for h in 0..HEADS {
                let g = h / (HEADS / KV_HEADS);
                let q = &qs[i][h * HEAD_DIM..(h + 1) * HEAD_DIM];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = &ks[j][g * HEAD_DIM..(g + 1) * HEAD_DIM];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (HEAD_DIM as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for (j, e) in exps.iter().enumerate() {
                    for dd in 0..HEAD_DIM {
                        attn[h * HEAD_DIM + dd] += e / total * vs[j][g * HEAD_DIM + dd];
                    }
                }
            }
            let o = matvec(&wo, &attn, HIDDEN);
            for (x, o) in xs[i].iter_mut().zip(o) {
                *x += o;
            }
        }
        for x in xs.iter_mut() {
            let h = rms(x, &p("post_attention_layernorm.weight"));
            let gate = matvec(&p("mlp.gate_proj.weight"), &h, INTER);
            let up = matvec(&p("mlp.up_proj.weight"), &h, INTER);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(&p("mlp.down_proj.weight"), &act, HIDDEN);
            for (x, d) in x.iter_mut().zip(down) {
                *x += d;
            }
        }
    }
    let head = get("lm_head.weight");
    xs.iter()
        .map(|x| matvec(&head, &rms(x, &get("model.norm.weight")), VOCAB))
        .collect()
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + salt * 11 + 5) % VOCAB as u32)
        .collect()
}

/// Small blocks so that short prompts span several; f32 so that results are exact.
fn kv_f32() -> KvOptions {
    KvOptions {
        block_size: 4,
        dtype: KvDtype::F32,
    }
}

/// Runs `tokens` through `model` in chunks, with a shuffled block table.
fn engine_logits(model: &Llama, tokens: &[u32], chunk: usize) -> Vec<Vec<f32>> {
    engine_logits_with(model, tokens, chunk, kv_f32())
}

fn engine_logits_with(model: &Llama, tokens: &[u32], chunk: usize, kv: KvOptions) -> Vec<Vec<f32>> {
    let pool = ThreadPool::new(2).unwrap();
    let layout = model.kv_layout(kv);
    let num_blocks = layout.blocks_for(tokens.len()) + 3;
    let mut kv = KvStore::new(layout, num_blocks);
    // Non-contiguous, out-of-order blocks exercise the paging.
    let table: Vec<u32> = (0..num_blocks as u32).rev().collect();
    let mut scratch = ForwardScratch::default();
    let mut out = Vec::new();
    let mut start = 0;
    for part in tokens.chunks(chunk) {
        let input = [SeqInput {
            tokens: part,
            start_pos: start,
            block_table: &table,
            logits: LogitsFor::All,
        }];
        let logits = model.forward(&pool, &input, &mut kv, &mut scratch).unwrap();
        out.extend(logits.chunks_exact(VOCAB).map(|r| r.to_vec()));
        start += part.len();
    }
    out
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

struct Models {
    _dir: tempfile::TempDir,
    weights: TinyWeights,
    gguf: PathBuf,
    hf: PathBuf,
    hf_sharded_bf16: PathBuf,
    hf_f16: PathBuf,
}

fn write_models() -> Models {
    let dir = tempfile::tempdir().unwrap();
    let weights = TinyWeights::random(7);
    let gguf = dir.path().join("tiny.gguf");
    weights.write_gguf(&gguf, "llama", GgmlDType::F32);
    let hf = dir.path().join("hf");
    weights.write_hf_dir(&hf, 1, safetensors::Dtype::F32);
    let hf_sharded_bf16 = dir.path().join("hf-sharded-bf16");
    weights.write_hf_dir(&hf_sharded_bf16, 3, safetensors::Dtype::BF16);
    let hf_f16 = dir.path().join("hf-f16");
    weights.write_hf_dir(&hf_f16, 1, safetensors::Dtype::F16);
    Models {
        _dir: dir,
        weights,
        gguf,
        hf,
        hf_sharded_bf16,
        hf_f16,
    }
}

fn load_gguf(path: &Path, options: LoadOptions) -> Result<Llama, ModelError> {
    let source = model::source::GgufSource::open(path)?;
    model::load_gguf(&source, path, options)
}

#[test]
fn gguf_and_safetensors_match_a_naive_reference() {
    let m = write_models();
    let tokens = prompt(40, 1);
    let reference = naive_forward(&m.weights, &tokens);
    let no_dense = LoadOptions {
        dense_weights_budget: 0,
    };
    let models = [
        ("gguf", load_gguf(&m.gguf, LoadOptions::default()).unwrap()),
        ("gguf quantized path", load_gguf(&m.gguf, no_dense).unwrap()),
        (
            "safetensors",
            model::load_hf_dir(&m.hf, LoadOptions::default()).unwrap(),
        ),
        (
            "safetensors sharded bf16",
            model::load_hf_dir(&m.hf_sharded_bf16, LoadOptions::default()).unwrap(),
        ),
        (
            "safetensors f16",
            model::load_hf_dir(&m.hf_f16, LoadOptions::default()).unwrap(),
        ),
    ];
    for (name, model) in &models {
        // Whole prompt (GEMM path), odd chunks (prefill continuing over cached blocks),
        // and one token at a time (decode path).
        for chunk in [40, 7, 1] {
            let ours = engine_logits(model, &tokens, chunk);
            let diff = max_abs_diff(&ours, &reference);
            assert!(
                diff < 1e-4,
                "{name}, chunk {chunk}: max |logit diff| {diff:e}"
            );
        }
    }
}

#[test]
fn an_f16_kv_store_stays_close_to_the_reference() {
    let m = write_models();
    let tokens = prompt(40, 5);
    let reference = naive_forward(&m.weights, &tokens);
    let model = load_gguf(&m.gguf, LoadOptions::default()).unwrap();
    let scale = reference
        .iter()
        .flatten()
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let kv = KvOptions {
        block_size: 4,
        dtype: KvDtype::F16,
    };
    for chunk in [40, 1] {
        let diff = max_abs_diff(&engine_logits_with(&model, &tokens, chunk, kv), &reference);
        // f16 keeps 11 significant bits: a few parts in ten thousand per value.
        assert!(
            diff < 5e-3 * scale,
            "chunk {chunk}: max |logit diff| {diff:e} (scale {scale:.2})"
        );
    }
}

#[test]
fn quantized_gguf_matches_the_reference_on_its_dequantized_weights() {
    let m = write_models();
    let tokens = prompt(40, 4);
    for dtype in [
        GgmlDType::F16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
    ] {
        let path = m._dir.path().join(format!("tiny-{dtype:?}.gguf"));
        m.weights.write_gguf(&path, "llama", dtype);
        let reference = naive_forward(&m.weights.requantized(dtype), &tokens);
        let model = load_gguf(&path, LoadOptions::default()).unwrap();
        // Activations meet quantized weights as 8-bit integers (as in llama.cpp) in
        // the token-by-token path and in the output head, which costs about a percent;
        // F16 weights keep activations in f32.
        let scale = reference
            .iter()
            .flatten()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        let tolerance = if dtype == GgmlDType::F16 {
            1e-3
        } else {
            0.03 * scale
        };
        for chunk in [40, 1] {
            let diff = max_abs_diff(&engine_logits(&model, &tokens, chunk), &reference);
            assert!(
                diff < tolerance,
                "{dtype:?}, chunk {chunk}: max |logit diff| {diff:e} (scale {scale:.2})"
            );
        }
    }
}

#[test]
fn a_ragged_batch_equals_its_sequences_run_alone() {
    let m = write_models();
    let model = load_gguf(&m.gguf, LoadOptions::default()).unwrap();
    let pool = ThreadPool::new(2).unwrap();
    let layout = model.kv_layout(kv_f32());
    let (a, b) = (prompt(30, 2), prompt(9, 3));
    let alone_a = engine_logits(&model, &a, 30);
    let alone_b = engine_logits(&model, &b, 9);

    // Sequence a: first 20 tokens earlier, then 10 more together with b's whole prompt
    // and then a single decode-style token of each.
    let mut kv = KvStore::new(layout, 32);
    let table_a: Vec<u32> = (0..16).map(|i| i * 2).collect();
    let table_b: Vec<u32> = (0..16).map(|i| i * 2 + 1).collect();
    let mut scratch = ForwardScratch::default();
    let first = [SeqInput {
        tokens: &a[..20],
        start_pos: 0,
        block_table: &table_a,
        logits: LogitsFor::None,
    }];
    model.forward(&pool, &first, &mut kv, &mut scratch).unwrap();
    let batch = [
        SeqInput {
            tokens: &a[20..29],
            start_pos: 20,
            block_table: &table_a,
            logits: LogitsFor::All,
        },
        SeqInput {
            tokens: &b[..8],
            start_pos: 0,
            block_table: &table_b,
            logits: LogitsFor::Last,
        },
    ];
    let logits = model
        .forward(&pool, &batch, &mut kv, &mut scratch)
        .unwrap()
        .to_vec();
    assert_eq!(logits.len(), 10 * VOCAB);
    for (i, row) in logits.chunks_exact(VOCAB).take(9).enumerate() {
        assert_close(row, &alone_a[20 + i], "a in batch");
    }
    assert_close(&logits[9 * VOCAB..], &alone_b[7], "b last");
    let step = [
        SeqInput {
            tokens: &a[29..30],
            start_pos: 29,
            block_table: &table_a,
            logits: LogitsFor::Last,
        },
        SeqInput {
            tokens: &b[8..9],
            start_pos: 8,
            block_table: &table_b,
            logits: LogitsFor::Last,
        },
    ];
    let logits = model
        .forward(&pool, &step, &mut kv, &mut scratch)
        .unwrap()
        .to_vec();
    assert_close(&logits[..VOCAB], &alone_a[29], "a decode");
    assert_close(&logits[VOCAB..], &alone_b[8], "b decode");
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "{what}: max diff {diff:e}");
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let m = write_models();
    let model = load_gguf(&m.gguf, LoadOptions::default()).unwrap();
    let pool = ThreadPool::new(1).unwrap();
    let mut kv = KvStore::new(model.kv_layout(kv_f32()), 4);
    let mut scratch = ForwardScratch::default();
    let table = [0u32, 1, 2, 3];
    let mut run = |tokens: &[u32], start_pos: usize, table: &[u32]| {
        let input = [SeqInput {
            tokens,
            start_pos,
            block_table: table,
            logits: LogitsFor::Last,
        }];
        model
            .forward(&pool, &input, &mut kv, &mut scratch)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(run(&[VOCAB as u32], 0, &table).contains("outside the vocabulary"));
    assert!(run(&[1; 17], 0, &table).contains("block table"));
    assert!(run(&[1], 0, &[9]).contains("outside the KV store"));
    assert!(run(&[], 0, &table).contains("no tokens"));
    assert!(run(&[1], 300, &table).contains("context"));
}

fn load_error(path: &Path) -> String {
    match model::ModelFormat::detect(path) {
        Err(e) => e.to_string(),
        Ok(model::ModelFormat::Gguf(p)) => load_gguf(&p, LoadOptions::default())
            .err()
            .unwrap()
            .to_string(),
        Ok(model::ModelFormat::HfDir(p)) => model::load_hf_dir(&p, LoadOptions::default())
            .err()
            .unwrap()
            .to_string(),
    }
}

#[test]
fn broken_files_name_the_file_and_the_problem() {
    let m = write_models();
    let dir = m._dir.path();

    let missing = dir.join("nope.gguf");
    assert!(load_error(&missing).contains("nope.gguf"));

    let bytes = std::fs::read(&m.gguf).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = load_error(&truncated);
    assert!(
        err.contains("truncated.gguf") && err.contains("truncated"),
        "{err}"
    );

    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    let err = load_error(&garbage);
    assert!(
        err.contains("garbage.gguf") && err.contains("GGUF"),
        "{err}"
    );

    let gpt2 = dir.join("gpt2.gguf");
    m.weights.write_gguf(&gpt2, "gpt2", GgmlDType::F32);
    let err = load_error(&gpt2);
    assert!(
        err.contains("gpt2.gguf") && err.contains("unsupported architecture `gpt2`"),
        "{err}"
    );

    let no_config = dir.join("no-config");
    m.weights
        .write_hf_dir(&no_config, 1, safetensors::Dtype::F32);
    std::fs::remove_file(no_config.join("config.json")).unwrap();
    let err = load_error(&no_config);
    assert!(
        err.contains("config.json") && err.contains("missing"),
        "{err}"
    );

    let lost_shard = dir.join("lost-shard");
    m.weights
        .write_hf_dir(&lost_shard, 3, safetensors::Dtype::F32);
    std::fs::remove_file(lost_shard.join("model-00002-of-00003.safetensors")).unwrap();
    let err = load_error(&lost_shard);
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");

    let wrong_shape = dir.join("wrong-shape");
    m.weights
        .write_hf_dir(&wrong_shape, 1, safetensors::Dtype::F32);
    let config = hf_config_json().replace(
        &format!("\"intermediate_size\":{INTER}"),
        "\"intermediate_size\":64",
    );
    std::fs::write(wrong_shape.join("config.json"), config).unwrap();
    let err = load_error(&wrong_shape);
    assert!(
        err.contains("model.safetensors") && err.contains("gate_proj") && err.contains("shape"),
        "{err}"
    );

    let corrupt_st = dir.join("corrupt-st");
    m.weights
        .write_hf_dir(&corrupt_st, 1, safetensors::Dtype::F32);
    std::fs::write(
        corrupt_st.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
    )
    .unwrap();
    let err = load_error(&corrupt_st);
    assert!(
        err.contains("model.safetensors") && err.contains("safetensors"),
        "{err}"
    );
}

//! The Llama forward pass over a ragged batch.
//!
//! A batch is a list of sequences, each bringing some new tokens, the position of the
//! first one, and its block table. All new tokens of all sequences go through each
//! layer's matrix products together (so one weight read serves the whole batch); only
//! attention is per sequence. Keys and values are written into the [`KvStore`] through
//! the block tables, and the output head runs only for the positions whose logits the
//! caller asked for.

use super::attention::{self, AttnSeq, AttnShape};
use super::config::ModelConfig;
use super::rope::Rope;
use super::weights::{LlamaWeights, Projection};
use crate::kernels::{self, KernelError, Linear, ThreadPool};
use crate::kv::{BlockId, KvLayout, KvOptions, KvStore};

/// Which positions of a sequence need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
}

/// One sequence's part of a forward batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions before it must already be in the KV store.
    pub start_pos: usize,
    /// Blocks holding positions `0..start_pos + tokens.len()`.
    pub block_table: &'a [BlockId],
    pub logits: LogitsFor,
}

/// A batch the model cannot run; the caller's bug or a client's bad input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    #[error("sequence {seq}: token id {token} is outside the vocabulary ({vocab})")]
    TokenOutOfRange {
        seq: usize,
        token: u32,
        vocab: usize,
    },
    #[error("sequence {seq}: {positions} positions exceed the model's context ({max})")]
    ContextExceeded {
        seq: usize,
        positions: usize,
        max: usize,
    },
    #[error("sequence {seq}: block table covers {covered} positions, {needed} needed")]
    BlockTableTooShort {
        seq: usize,
        covered: usize,
        needed: usize,
    },
    #[error("sequence {seq}: block {block} is outside the KV store ({num_blocks} blocks)")]
    BlockOutOfRange {
        seq: usize,
        block: BlockId,
        num_blocks: usize,
    },
    #[error("KV store layout {store:?} does not match the model's {model:?}")]
    LayoutMismatch { store: KvLayout, model: KvLayout },
    #[error("sequence {seq} has no tokens")]
    EmptySequence { seq: usize },
    /// A shape the kernels reject: an engine bug, reported rather than panicking.
    #[error("internal kernel error: {0}")]
    Kernel(#[from] KernelError),
    /// The GPU failed (a driver or cuBLAS error); the message is the device's.
    #[error("GPU error: {0}")]
    Device(String),
}

/// A loaded Llama-family model.
pub struct Llama {
    config: ModelConfig,
    weights: LlamaWeights,
    rope: Rope,
}

/// Activation buffers reused across forward calls, so steady-state decoding does not
/// allocate.
#[derive(Default)]
pub struct ForwardScratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    part: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    logit_rows: Vec<usize>,
    head_in: Vec<f32>,
    logits: Vec<f32>,
}

impl ForwardScratch {
    /// The logits of the last forward pass that used this scratch.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
}

impl Llama {
    pub fn new(config: ModelConfig, weights: LlamaWeights) -> Self {
        let rope = Rope::new(&config, weights.rope_freq_factors.as_deref());
        Self {
            config,
            weights,
            rope,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The KV layout this model needs with the given block size and element type.
    pub fn kv_layout(&self, options: KvOptions) -> KvLayout {
        KvLayout::for_model(&self.config, options)
    }

    /// Runs the batch, writing its keys and values into `kv`, and returns the logits
    /// asked for: one `vocab_size` row per requested position, in batch order.
    pub fn forward<'s>(
        &self,
        pool: &ThreadPool,
        batch: &[SeqInput],
        kv: &mut KvStore,
        scratch: &'s mut ForwardScratch,
    ) -> Result<&'s [f32], ForwardError> {
        self.validate(batch, kv)?;
        let c = &self.config;
        let n: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let positions: Vec<usize> = batch
            .iter()
            .flat_map(|s| s.start_pos..s.start_pos + s.tokens.len())
            .collect();
        self.embed(batch, n, scratch)?;
        self.rope_tables(&positions, scratch);
        let mut row = 0;
        let attn_seqs: Vec<AttnSeq> = batch
            .iter()
            .map(|s| {
                let seq = AttnSeq {
                    row,
                    n_tokens: s.tokens.len(),
                    start_pos: s.start_pos,
                    block_table: s.block_table,
                };
                row += s.tokens.len();
                seq
            })
            .collect();
        for layer in 0..c.num_layers {
            self.attention_block(pool, layer, &attn_seqs, &positions, kv, scratch)?;
            self.ffn_block(pool, layer, n, scratch)?;
        }
        self.output_head(pool, batch, scratch)?;
        Ok(&scratch.logits)
    }

    fn validate(&self, batch: &[SeqInput], kv: &KvStore) -> Result<(), ForwardError> {
        let layout = kv.layout();
        let expected = self.kv_layout(KvOptions {
            block_size: layout.block_size,
            dtype: layout.dtype,
        });
        if layout != expected {
            return Err(ForwardError::LayoutMismatch {
                store: layout,
                model: expected,
            });
        }
        check_batch(&self.config, layout, kv.num_blocks(), batch)
    }

    fn embed(
        &self,
        batch: &[SeqInput],
        n: usize,
        scratch: &mut ForwardScratch,
    ) -> Result<(), KernelError> {
        let d = self.config.hidden_size;
        resize(&mut scratch.x, n * d);
        let table = self.weights.embedding();
        let tokens = batch.iter().flat_map(|s| s.tokens.iter());
        for (row, &token) in scratch.x.chunks_exact_mut(d).zip(tokens) {
            table.dequantize_row(token as usize, row)?;
        }
        Ok(())
    }

    fn rope_tables(&self, positions: &[usize], scratch: &mut ForwardScratch) {
        let half = self.config.head_dim / 2;
        resize(&mut scratch.cos, positions.len() * half);
        resize(&mut scratch.sin, positions.len() * half);
        for ((&pos, cos), sin) in positions
            .iter()
            .zip(scratch.cos.chunks_exact_mut(half))
            .zip(scratch.sin.chunks_exact_mut(half))
        {
            self.rope.angles(pos, cos, sin);
        }
    }

    fn attention_block(
        &self,
        pool: &ThreadPool,
        layer: usize,
        seqs: &[AttnSeq],
        positions: &[usize],
        kv: &mut KvStore,
        scratch: &mut ForwardScratch,
    ) -> Result<(), KernelError> {
        let c = &self.config;
        let w = &self.weights.layers[layer];
        let (d, n) = (c.hidden_size, positions.len());
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let qkv_width = q_dim + 2 * kv_dim;
        resize(&mut scratch.normed, n * d);
        kernels::ops::rms_norm_rows(
            &scratch.x,
            &w.attn_norm,
            c.rms_norm_eps,
            &mut scratch.normed,
        )?;
        resize(&mut scratch.qkv, n * qkv_width);
        project(
            pool,
            &w.qkv,
            &scratch.normed,
            n,
            &mut scratch.qkv,
            &mut scratch.part,
        )?;

        let half = c.head_dim / 2;
        for (t, row) in scratch.qkv.chunks_exact_mut(qkv_width).enumerate() {
            let (cos, sin) = (
                &scratch.cos[t * half..][..half],
                &scratch.sin[t * half..][..half],
            );
            self.rope.apply(&mut row[..q_dim + kv_dim], cos, sin);
        }
        let block_size = kv.layout().block_size;
        let mut t = 0;
        for seq in seqs {
            for i in 0..seq.n_tokens {
                let pos = seq.start_pos + i;
                let row = &scratch.qkv[t * qkv_width..(t + 1) * qkv_width];
                let block = seq.block_table[pos / block_size];
                kv.write(
                    layer,
                    block,
                    pos % block_size,
                    &row[q_dim..q_dim + kv_dim],
                    &row[q_dim + kv_dim..],
                );
                t += 1;
            }
        }

        resize(&mut scratch.attn, n * q_dim);
        let shape = AttnShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size,
            q_stride: qkv_width,
        };
        attention::attend(
            pool,
            &shape,
            seqs,
            layer,
            &scratch.qkv,
            kv,
            &mut scratch.attn,
        );
        resize(&mut scratch.proj, n * d);
        kernels::matmul(pool, &w.attn_out, &scratch.attn, n, &mut scratch.proj)?;
        kernels::ops::add_assign(&mut scratch.x, &scratch.proj)?;
        Ok(())
    }

    fn ffn_block(
        &self,
        pool: &ThreadPool,
        layer: usize,
        n: usize,
        scratch: &mut ForwardScratch,
    ) -> Result<(), KernelError> {
        let c = &self.config;
        let w = &self.weights.layers[layer];
        let (d, inter) = (c.hidden_size, c.intermediate_size);
        kernels::ops::rms_norm_rows(&scratch.x, &w.ffn_norm, c.rms_norm_eps, &mut scratch.normed)?;
        resize(&mut scratch.gate_up, n * 2 * inter);
        project(
            pool,
            &w.gate_up,
            &scratch.normed,
            n,
            &mut scratch.gate_up,
            &mut scratch.part,
        )?;
        resize(&mut scratch.act, n * inter);
        for (row, out) in scratch
            .gate_up
            .chunks_exact(2 * inter)
            .zip(scratch.act.chunks_exact_mut(inter))
        {
            let (gate, up) = row.split_at(inter);
            kernels::ops::silu_mul(gate, up, out)?;
        }
        kernels::matmul(pool, &w.down, &scratch.act, n, &mut scratch.proj)?;
        kernels::ops::add_assign(&mut scratch.x, &scratch.proj[..n * d])?;
        Ok(())
    }

    fn output_head(
        &self,
        pool: &ThreadPool,
        batch: &[SeqInput],
        scratch: &mut ForwardScratch,
    ) -> Result<(), KernelError> {
        let c = &self.config;
        let d = c.hidden_size;
        scratch.logit_rows.clear();
        let mut row = 0;
        for s in batch {
            let len = s.tokens.len();
            match s.logits {
                LogitsFor::None => {}
                LogitsFor::Last => scratch.logit_rows.push(row + len - 1),
                LogitsFor::All => scratch.logit_rows.extend(row..row + len),
            }
            row += len;
        }
        let m = scratch.logit_rows.len();
        resize(&mut scratch.head_in, m * d);
        for (out, &r) in scratch.head_in.chunks_exact_mut(d).zip(&scratch.logit_rows) {
            kernels::ops::rms_norm_rows(
                &scratch.x[r * d..(r + 1) * d],
                &self.weights.final_norm,
                c.rms_norm_eps,
                out,
            )?;
        }
        resize(&mut scratch.logits, m * c.vocab_size);
        if m > 0 {
            kernels::matmul(
                pool,
                &self.weights.lm_head,
                &scratch.head_in,
                m,
                &mut scratch.logits,
            )?;
        }
        Ok(())
    }
}

/// Applies a (possibly split) projection, writing rows of concatenated part outputs.
fn project(
    pool: &ThreadPool,
    projection: &Projection,
    input: &[f32],
    n: usize,
    out: &mut [f32],
    part_out: &mut Vec<f32>,
) -> Result<(), KernelError> {
    match projection {
        Projection::Fused(linear) => kernels::matmul(pool, linear, input, n, out),
        Projection::Split(parts) => {
            let width: usize = parts.iter().map(Linear::rows).sum();
            let mut offset = 0;
            for part in parts {
                let rows = part.rows();
                resize(part_out, n * rows);
                kernels::matmul(pool, part, input, n, part_out)?;
                for (dst, src) in out.chunks_exact_mut(width).zip(part_out.chunks_exact(rows)) {
                    dst[offset..offset + rows].copy_from_slice(src);
                }
                offset += rows;
            }
            Ok(())
        }
    }
}

fn resize(buf: &mut Vec<f32>, len: usize) {
    buf.resize(len, 0.0);
}

/// Checks a batch against the model and a KV store of `num_blocks` blocks of `layout`
/// (every device runs the same checks before its forward pass).
pub(crate) fn check_batch(
    c: &ModelConfig,
    layout: KvLayout,
    num_blocks: usize,
    batch: &[SeqInput],
) -> Result<(), ForwardError> {
    for (seq, s) in batch.iter().enumerate() {
        if s.tokens.is_empty() {
            return Err(ForwardError::EmptySequence { seq });
        }
        if let Some(&token) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ForwardError::TokenOutOfRange {
                seq,
                token,
                vocab: c.vocab_size,
            });
        }
        let positions = s.start_pos + s.tokens.len();
        if positions > c.max_position_embeddings {
            return Err(ForwardError::ContextExceeded {
                seq,
                positions,
                max: c.max_position_embeddings,
            });
        }
        let needed_blocks = layout.blocks_for(positions);
        if s.block_table.len() < needed_blocks {
            return Err(ForwardError::BlockTableTooShort {
                seq,
                covered: s.block_table.len() * layout.block_size,
                needed: positions,
            });
        }
        if let Some(&block) = s.block_table[..needed_blocks]
            .iter()
            .find(|&&b| b as usize >= num_blocks)
        {
            return Err(ForwardError::BlockOutOfRange {
                seq,
                block,
                num_blocks,
            });
        }
    }
    Ok(())
}

//! Log probabilities in the shapes vLLM answers them: completions'
//! `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` and chat's
//! `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`, and the prompt's
//! (`prompt_logprobs`). Tokens are named
//! by decoding each id alone, special tokens included (vLLM's way).

use serde_json::{Map, Value, json};

use super::generation::{OutputToken, PromptLogprobs};
use crate::tokenizer::Tokenizer;

/// Names tokens and writes their log probabilities; keeps a choice's text offset.
#[derive(Clone)]
pub struct LogprobsWriter {
    tokenizer: Tokenizer,
}

impl LogprobsWriter {
    pub fn new(tokenizer: Tokenizer) -> Self {
        Self { tokenizer }
    }

    fn name(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false)
    }

    /// Completions' shape for `tokens`; `offset` is where their text starts in the
    /// choice's output (in characters), moved past them.
    pub fn completion(&self, tokens: &[OutputToken], offset: &mut usize) -> Value {
        let (mut names, mut logprobs, mut tops, mut offsets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for token in tokens {
            let name = self.name(token.id);
            offsets.push(*offset);
            *offset += name.chars().count();
            let Some(lp) = &token.logprobs else {
                names.push(name);
                logprobs.push(Value::Null);
                tops.push(Value::Null);
                continue;
            };
            // The sampled token is among the top ones, as vLLM lists them.
            let mut top = Map::new();
            top.insert(name.clone(), json!(lp.logprob));
            for &(id, logprob) in &lp.top {
                top.entry(self.name(id)).or_insert(json!(logprob));
            }
            names.push(name);
            logprobs.push(json!(lp.logprob));
            tops.push(Value::Object(top));
        }
        json!({"text_offset": offsets, "token_logprobs": logprobs, "tokens": names,
               "top_logprobs": tops})
    }

    /// Chat's shape for `tokens`.
    pub fn chat(&self, tokens: &[OutputToken]) -> Value {
        let content: Vec<Value> = tokens
            .iter()
            .map(|token| {
                let lp = token.logprobs.as_deref();
                let top: Vec<Value> = lp
                    .map(|lp| lp.top.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|&(id, logprob)| self.entry(id, logprob))
                    .collect();
                let mut entry = self.entry(token.id, lp.map_or(-9999.0, |lp| lp.logprob));
                entry["top_logprobs"] = json!(top);
                entry
            })
            .collect();
        json!({"content": content})
    }

    /// vLLM's `prompt_logprobs`: `null` for the first prompt token (nothing predicts
    /// it), then for each later one a map from token id to `{"logprob", "rank",
    /// "decoded_token"}`, holding the prompt's token and the top tokens.
    pub fn prompt(&self, prompt: &PromptLogprobs) -> Value {
        let mut positions = vec![Value::Null];
        for (&id, lp) in prompt.ids[1..].iter().zip(&prompt.logprobs) {
            let mut entries = Map::new();
            entries.insert(id.to_string(), self.ranked(id, lp.logprob, lp.rank));
            for (rank, &(top_id, logprob)) in lp.top.iter().enumerate() {
                entries
                    .entry(top_id.to_string())
                    .or_insert_with(|| self.ranked(top_id, logprob, rank as u32 + 1));
            }
            positions.push(Value::Object(entries));
        }
        Value::Array(positions)
    }

    fn ranked(&self, id: u32, logprob: f32, rank: u32) -> Value {
        json!({"logprob": logprob, "rank": rank, "decoded_token": self.name(id)})
    }

    fn entry(&self, id: u32, logprob: f32) -> Value {
        let name = self.name(id);
        let bytes: Vec<u8> = name.as_bytes().to_vec();
        json!({"token": name, "logprob": logprob, "bytes": bytes})
    }
}

//! What a caller hands the engine loop and what it gets back: the contract between the
//! HTTP layer and the scheduler. The scheduler deals in token ids only; text (chat
//! templates, detokenization, stop strings) stays with the caller.

use crate::constrain::OutputConstraint;
use crate::sample::{SamplingParams, TokenLogprobs};
use crate::transfer::{Handoff, KvRole};

use super::SeqId;

/// One generation to run.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Caller's id, for logs and metrics (the `X-Request-Id`, or a generated one).
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Tokens that end the generation (not reported as output). Empty with `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
    /// Its part in a prefill/decode hand-off, if any.
    pub kv: KvRole,
    /// The grammar the output must follow (structured output), if any.
    pub constraint: Option<OutputConstraint>,
    /// Report the log probability of each prompt token (after the first) and of this
    /// many most likely tokens at its place. The prompt is then computed whole, not
    /// taken from the prefix cache.
    pub prompt_logprobs: Option<usize>,
    /// Admit it only once this sequence's prompt is computed (or it has left), so that
    /// the prompt's KV comes from the prefix cache: the further choices of a prompt
    /// whose KV the first one pulls from a prefill worker.
    pub after_prompt_of: Option<SeqId>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (or, decided by the caller, a stop string).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller went away or asked to stop.
    Aborted,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Aborted => "abort",
        }
    }
}

/// Token accounting of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// What the engine reports about one request, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// A new output token.
    Token(u32),
    /// A new output token with its log probabilities (`SamplingParams::logprobs`).
    TokenWithLogprobs(u32, Box<TokenLogprobs>),
    /// With `prompt_logprobs`, before the first token: the log probabilities of the
    /// prompt's tokens after the first, in order.
    PromptLogprobs(Vec<TokenLogprobs>),
    /// The last event of a request that ran. `handoff`: where the KV of a
    /// [`KvRole::RemoteDecode`] request is held for its decode worker.
    Finished {
        reason: FinishReason,
        usage: Usage,
        handoff: Option<Handoff>,
        /// The stop token that ended it, if one did (not part of the output).
        stop_token: Option<u32>,
        /// Its log probabilities, when asked for.
        stop_logprobs: Option<Box<TokenLogprobs>>,
    },
    /// The engine could not run the request (the last event).
    Failed(String),
}

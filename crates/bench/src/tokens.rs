//! Random prompts of exact token counts, drawn as `vllm bench serve --dataset-name
//! random` draws them, and the tokenizer they are counted in.
//!
//! The tokenizer is local ([`PromptTokenizer::load`]: a `tokenizer.json`, a model
//! folder holding one, or a GGUF file, read by tandem-engine's tokenizer) or the
//! server's own ([`PromptTokenizer::server`]: `POST /tokenize` and `POST /detokenize`,
//! which vLLM and `tandem serve`/`tandem route` answer). [`choose`] picks one for a run,
//! or says why prompts fall back to words.
//!
//! Drawing ([`draft`], then [`realize`]) follows vLLM's `RandomDataset`: each request's
//! input and output lengths are uniform integers in `[floor(l·(1−r)), ceil(l·(1+r))]`
//! (the input length less the special tokens the server adds, such as BOS); its ids
//! are consecutive non-special ids from a random start, after a prefix of random ids
//! shared by its group; the ids are decoded to text, re-encoded, and cut or topped up
//! with random ids until the text encodes to the target length (at most
//! [`MAX_ADJUSTMENTS`] times, as vLLM). The prompt is sent as that text. Unlike vLLM,
//! no two requests get the same start, so none shares a prefix-cache block with
//! another by accident (vLLM's offset + index can collide), and top-up ids are drawn
//! from the non-special ids only.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use futures_util::{StreamExt, TryStreamExt, stream};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tandem_engine::ModelError;
use tandem_engine::tokenizer::Tokenizer;

use crate::client::Prompt;

/// Rounds of decode, re-encode and adjust before a prompt is taken as it is (vLLM's
/// `max_retry`).
pub const MAX_ADJUSTMENTS: usize = 10;

/// Requests in flight to a server's tokenizer endpoints while prompts are drawn.
const SERVER_CONCURRENCY: usize = 16;

/// Why prompts could not be drawn in tokens.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("--tokenizer {path}: {error}")]
    Load { path: PathBuf, error: ModelError },
    #[error("--tokenizer {path}: no such file or folder")]
    Missing { path: PathBuf },
    #[error(
        "--tokenizer {path}: not a tokenizer.json file, a model folder with one, or a GGUF \
         file"
    )]
    Unrecognized { path: PathBuf },
    #[error("encoding a prompt: {0}")]
    Encode(ModelError),
    #[error("the server's {endpoint}: {message}")]
    Server {
        endpoint: &'static str,
        message: String,
    },
    #[error(
        "an input length of {input_len} leaves no token to draw: the tokenizer adds \
         {special} special token(s), the range ratio is {range_ratio} and the prefix is \
         {prefix_len} tokens; raise the input length or the prefix, or lower the ratio"
    )]
    TooShort {
        input_len: usize,
        special: usize,
        range_ratio: f64,
        prefix_len: usize,
    },
    #[error("the tokenizer has no non-special token to draw from")]
    EmptyVocabulary,
}

/// The ids prompts are drawn from.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    /// Token ids `0..size` exist.
    pub size: usize,
    /// The non-special ids, ascending.
    pub allowed: Vec<u32>,
    /// Ids the server adds around a text prompt (BOS: 1 for Llama models).
    pub num_special: usize,
}

/// A tokenizer to count prompts in.
pub enum PromptTokenizer {
    Local {
        tokenizer: Tokenizer,
        vocab: Vocabulary,
    },
    Server(ServerTokenizer),
}

/// A server's `/tokenize` and `/detokenize`.
pub struct ServerTokenizer {
    client: reqwest::Client,
    base_url: String,
    model: Option<String>,
    vocab: Vocabulary,
}

impl PromptTokenizer {
    /// A `tokenizer.json` file, a folder holding one (a Hugging Face model), or a GGUF
    /// file (its `tokenizer.ggml.*` metadata).
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let load_error = |error| TokensError::Load {
            path: path.to_owned(),
            error,
        };
        let tokenizer = if !path.exists() {
            return Err(TokensError::Missing {
                path: path.to_owned(),
            });
        } else if path.is_dir() {
            Tokenizer::from_hf_dir(path).map_err(load_error)?
        } else if is_gguf(path) {
            Tokenizer::from_gguf_file(path).map_err(load_error)?
        } else if path.extension().is_some_and(|e| e == "json") {
            Tokenizer::from_tokenizer_json(path).map_err(load_error)?
        } else {
            return Err(TokensError::Unrecognized {
                path: path.to_owned(),
            });
        };
        let special = tokenizer.special_token_ids();
        let size = tokenizer.vocab_size();
        let vocab = Vocabulary {
            size,
            allowed: (0..size as u32)
                .filter(|id| !special.contains(id))
                .collect(),
            num_special: tokenizer.num_special_tokens_to_add(),
        };
        Ok(Self::Local { tokenizer, vocab })
    }

    /// The server's tokenizer, through its `POST /tokenize` and `POST /detokenize`
    /// (an error when it has no such endpoints, or they answer in another shape).
    pub async fn server(base_url: &str, model: Option<&str>) -> Result<Self, TokensError> {
        ServerTokenizer::connect(base_url, model)
            .await
            .map(Self::Server)
    }

    pub fn vocabulary(&self) -> &Vocabulary {
        match self {
            Self::Local { vocab, .. } => vocab,
            Self::Server(server) => &server.vocab,
        }
    }

    /// Where the tokenizer came from, for the run's notes.
    pub fn describe(&self) -> String {
        match self {
            Self::Local { tokenizer, vocab } => format!(
                "the tokenizer of {} ({} ids)",
                tokenizer.source().display(),
                vocab.size
            ),
            Self::Server(server) => format!(
                "the server's /tokenize and /detokenize ({} ids)",
                server.vocab.size
            ),
        }
    }

    /// What `tandem bench --json` records as `tokenizer_id`: the file or folder, or
    /// `server` for the server's endpoints.
    pub fn id(&self) -> String {
        match self {
            Self::Local { tokenizer, .. } => tokenizer.source().display().to_string(),
            Self::Server(_) => "server".into(),
        }
    }

    /// `text`'s ids, without the special tokens a server adds.
    pub async fn encode(&self, text: &str) -> Result<Vec<u32>, TokensError> {
        match self {
            Self::Local { tokenizer, .. } => {
                tokenizer.encode(text, false).map_err(TokensError::Encode)
            }
            Self::Server(server) => server.encode(text, false).await,
        }
    }

    /// The text of `ids`, special tokens written out.
    pub async fn decode(&self, ids: &[u32]) -> Result<String, TokensError> {
        match self {
            Self::Local { tokenizer, .. } => Ok(tokenizer.decode(ids, false)),
            Self::Server(server) => server.decode(ids).await,
        }
    }
}

/// Whether `path` is a GGUF file (by its magic; by its extension when unreadable, so
/// that the error says why).
fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    match read {
        Ok(()) => &magic == b"GGUF",
        Err(_) => path.extension().is_some_and(|e| e == "gguf"),
    }
}

impl ServerTokenizer {
    async fn connect(base_url: &str, model: Option<&str>) -> Result<Self, TokensError> {
        let mut server = Self {
            client: reqwest::Client::new(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            model: model.map(str::to_owned),
            vocab: Vocabulary {
                size: 0,
                allowed: Vec::new(),
                num_special: 0,
            },
        };
        const PROBE: &str = "Hello world";
        let with_special = server.encode(PROBE, true).await?;
        let plain = server.encode(PROBE, false).await?;
        let Some(&highest) = plain.iter().chain(&with_special).max() else {
            return Err(TokensError::Server {
                endpoint: "/tokenize",
                message: format!("no ids for {PROBE:?}"),
            });
        };
        server.decode(&[highest]).await?;
        let size = server.vocab_size(highest).await;
        server.vocab = Vocabulary {
            size,
            allowed: (0..size as u32).collect(),
            num_special: with_special.len().saturating_sub(plain.len()),
        };
        Ok(server)
    }

    /// The vocabulary's size: one more than the highest id `/detokenize` takes (found by
    /// doubling from `known`, a valid id, then bisecting). Servers refuse ids past the
    /// vocabulary (tandem) or decode them to nothing (Hugging Face tokenizers).
    async fn vocab_size(&self, known: u32) -> usize {
        const LIMIT: u32 = 1 << 24;
        let (mut valid, mut invalid) = (known, known.max(1).saturating_mul(2));
        while invalid < LIMIT && self.decodes(invalid).await {
            valid = invalid;
            invalid = invalid.saturating_mul(2);
        }
        while invalid - valid > 1 {
            let mid = valid + (invalid - valid) / 2;
            if self.decodes(mid).await {
                valid = mid;
            } else {
                invalid = mid;
            }
        }
        valid as usize + 1
    }

    async fn decodes(&self, id: u32) -> bool {
        self.decode(&[id]).await.is_ok_and(|text| !text.is_empty())
    }

    async fn post(&self, endpoint: &'static str, mut body: Value) -> Result<Value, TokensError> {
        if let Some(model) = &self.model {
            body["model"] = json!(model);
        }
        let failed = |message: String| TokensError::Server { endpoint, message };
        let response = self
            .client
            .post(format!("{}{endpoint}", self.base_url))
            .json(&body)
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| failed(e.to_string()))?;
        if !status.is_success() {
            return Err(failed(format!(
                "HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        serde_json::from_str(&text).map_err(|e| failed(format!("not JSON ({e})")))
    }

    async fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokensError> {
        let answer = self
            .post(
                "/tokenize",
                json!({"prompt": text, "add_special_tokens": add_special_tokens}),
            )
            .await?;
        serde_json::from_value(answer["tokens"].clone()).map_err(|e| TokensError::Server {
            endpoint: "/tokenize",
            message: format!("no `tokens` list of ids ({e})"),
        })
    }

    async fn decode(&self, ids: &[u32]) -> Result<String, TokensError> {
        let answer = self.post("/detokenize", json!({"tokens": ids})).await?;
        answer["prompt"]
            .as_str()
            .map(str::to_owned)
            .ok_or(TokensError::Server {
                endpoint: "/detokenize",
                message: "no `prompt` text".into(),
            })
    }
}

/// What a run's random prompts are made of.
pub enum PromptSource {
    /// Exact token counts in this tokenizer.
    Tokens(PromptTokenizer),
    /// Words (about one token each), and why no tokenizer was found.
    Words { why: String },
}

impl PromptSource {
    /// The line a run prints about its prompts.
    pub fn describe(&self) -> String {
        match self {
            Self::Tokens(tokenizer) => format!(
                "prompts: random token ids drawn as vllm bench serve's random dataset, \
                 counted in {}",
                tokenizer.describe()
            ),
            Self::Words { why } => format!(
                "note: prompts are random words, so their token counts are approximate \
                 ({why}); give --tokenizer (a tokenizer.json, model folder or GGUF file) \
                 for exact counts"
            ),
        }
    }

    pub fn tokenizer(&self) -> Option<&PromptTokenizer> {
        match self {
            Self::Tokens(tokenizer) => Some(tokenizer),
            Self::Words { .. } => None,
        }
    }
}

/// `path`'s tokenizer when given; else the server's at `base_url` when it has one;
/// else words.
pub async fn choose(
    path: Option<&Path>,
    base_url: &str,
    model: Option<&str>,
) -> Result<PromptSource, TokensError> {
    if let Some(path) = path {
        return PromptTokenizer::load(path).map(PromptSource::Tokens);
    }
    Ok(match PromptTokenizer::server(base_url, model).await {
        Ok(tokenizer) => PromptSource::Tokens(tokenizer),
        Err(e) => PromptSource::Words {
            why: format!("no --tokenizer, and no tokenizer at {base_url}: {e}"),
        },
    })
}

/// The lengths of a random token workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomTokens {
    /// Tokens per prompt after the prefix, as the server counts them (special tokens
    /// it adds included).
    pub input_len: usize,
    pub output_len: usize,
    /// Lengths vary uniformly within ±ratio.
    pub range_ratio: f64,
    /// Tokens of the shared prefix in front of each prompt (0: none).
    pub prefix_len: usize,
    /// Distinct prefixes, taken in turn (prompt `i` gets prefix `i % groups`).
    pub prefix_groups: usize,
}

/// One prompt's ids before the decode/re-encode round trip.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub ids: Vec<u32>,
    /// Tokens the text should encode to (without the special tokens a server adds).
    pub target_len: usize,
    pub max_tokens: usize,
    /// Seeds the ids drawn to top up a prompt that re-encodes short.
    pub fill_seed: u64,
}

/// `count` prompts' ids and lengths, continuing `rng`; `starts` holds positions in
/// `vocab.allowed` already taken (by an earlier call of the same workload), which no
/// prompt here starts at while any is free.
pub fn draft(
    vocab: &Vocabulary,
    spec: &RandomTokens,
    count: usize,
    rng: &mut StdRng,
    starts: &mut HashSet<usize>,
) -> Result<Vec<Draft>, TokensError> {
    let allowed = &vocab.allowed;
    if allowed.is_empty() {
        return Err(TokensError::EmptyVocabulary);
    }
    let ratio = spec.range_ratio;
    let real_input = spec.input_len.saturating_sub(vocab.num_special);
    let input_low = (real_input as f64 * (1.0 - ratio)).floor() as usize;
    let input_high = (real_input as f64 * (1.0 + ratio)).ceil() as usize;
    let output_low = ((spec.output_len as f64 * (1.0 - ratio)).floor() as usize).max(1);
    let output_high = ((spec.output_len as f64 * (1.0 + ratio)).ceil() as usize).max(1);
    if spec.prefix_len + input_low < 1 {
        return Err(TokensError::TooShort {
            input_len: spec.input_len,
            special: vocab.num_special,
            range_ratio: ratio,
            prefix_len: spec.prefix_len,
        });
    }
    let input_lens: Vec<usize> = (0..count)
        .map(|_| rng.random_range(input_low..=input_high))
        .collect();
    let output_lens: Vec<usize> = (0..count)
        .map(|_| rng.random_range(output_low..=output_high))
        .collect();
    let prompt_starts: Vec<usize> = (0..count)
        .map(|_| {
            if starts.len() >= allowed.len() {
                starts.clear();
            }
            loop {
                let start = rng.random_range(0..allowed.len());
                if starts.insert(start) {
                    return start;
                }
            }
        })
        .collect();
    let prefixes: Vec<Vec<u32>> = (0..spec.prefix_groups.max(1))
        .map(|_| {
            (0..spec.prefix_len)
                .map(|_| allowed[rng.random_range(0..allowed.len())])
                .collect()
        })
        .collect();
    Ok((0..count)
        .map(|i| {
            let prefix = &prefixes[i % prefixes.len()];
            let ids = prefix
                .iter()
                .copied()
                .chain((0..input_lens[i]).map(|k| allowed[(prompt_starts[i] + k) % allowed.len()]))
                .collect();
            Draft {
                ids,
                target_len: spec.prefix_len + input_lens[i],
                max_tokens: output_lens[i],
                fill_seed: rng.random(),
            }
        })
        .collect())
}

/// Prompts drawn in tokens, and how far their encodings miss their targets.
#[derive(Debug, Clone, Default)]
pub struct Realized {
    pub prompts: Vec<Prompt>,
    /// Prompt tokens beyond the targets, summed (negative: short), for prompts whose
    /// round trips did not settle (vLLM's `token_mismatch`).
    pub token_mismatch: i64,
}

/// Each draft's text: decoded, re-encoded, then cut to its target length or topped up
/// with random allowed ids and decoded again, until its text encodes to exactly the
/// target (or [`MAX_ADJUSTMENTS`] rounds pass). Prompts stay in order.
pub async fn realize(
    tokenizer: &PromptTokenizer,
    drafts: Vec<Draft>,
) -> Result<Realized, TokensError> {
    let concurrency = match tokenizer {
        PromptTokenizer::Local { .. } => 1,
        PromptTokenizer::Server(_) => SERVER_CONCURRENCY,
    };
    let done: Vec<(Prompt, i64)> = stream::iter(drafts)
        .map(|draft| settle(tokenizer, draft))
        .buffered(concurrency)
        .try_collect()
        .await?;
    let token_mismatch = done.iter().map(|(_, miss)| miss).sum();
    Ok(Realized {
        prompts: done.into_iter().map(|(prompt, _)| prompt).collect(),
        token_mismatch,
    })
}

async fn settle(tokenizer: &PromptTokenizer, draft: Draft) -> Result<(Prompt, i64), TokensError> {
    let allowed = &tokenizer.vocabulary().allowed;
    let mut rng = StdRng::seed_from_u64(draft.fill_seed);
    let target = draft.target_len;
    let mut ids = draft.ids;
    let mut rounds = 0;
    let text = loop {
        let text = tokenizer.decode(&ids).await?;
        ids = tokenizer.encode(&text).await?;
        if ids.len() == target || rounds == MAX_ADJUSTMENTS {
            break text;
        }
        if ids.len() > target {
            ids.truncate(target);
        } else {
            let missing = target - ids.len();
            ids.extend((0..missing).map(|_| allowed[rng.random_range(0..allowed.len())]));
        }
        rounds += 1;
    };
    let miss = ids.len() as i64 - target as i64;
    Ok((
        Prompt {
            text,
            max_tokens: draft.max_tokens,
        },
        miss,
    ))
}

/// `count` random prompts in `tokenizer`'s tokens (see the module doc).
pub async fn random(
    tokenizer: &PromptTokenizer,
    spec: &RandomTokens,
    count: usize,
    seed: u64,
) -> Result<Realized, TokensError> {
    random_parts(tokenizer, &[(*spec, count)], seed).await
}

/// Random prompts in parts, each `(lengths, count)`, in order (the shift workload's
/// two halves; multi-turn chat's first and later turns); no two prompts share a start.
pub async fn random_parts(
    tokenizer: &PromptTokenizer,
    parts: &[(RandomTokens, usize)],
    seed: u64,
) -> Result<Realized, TokensError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut starts = HashSet::new();
    let mut drafts = Vec::new();
    for (spec, count) in parts {
        drafts.extend(draft(
            tokenizer.vocabulary(),
            spec,
            *count,
            &mut rng,
            &mut starts,
        )?);
    }
    realize(tokenizer, drafts).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(size: u32, special: &[u32], num_special: usize) -> Vocabulary {
        Vocabulary {
            size: size as usize,
            allowed: (0..size).filter(|id| !special.contains(id)).collect(),
            num_special,
        }
    }

    fn spec(input_len: usize, output_len: usize, range_ratio: f64) -> RandomTokens {
        RandomTokens {
            input_len,
            output_len,
            range_ratio,
            prefix_len: 0,
            prefix_groups: 1,
        }
    }

    fn drafts(vocab: &Vocabulary, spec: &RandomTokens, count: usize, seed: u64) -> Vec<Draft> {
        let mut rng = StdRng::seed_from_u64(seed);
        draft(vocab, spec, count, &mut rng, &mut HashSet::new()).unwrap()
    }

    #[test]
    fn lengths_are_uniform_over_vllms_ranges() {
        // input 100 with one special token (BOS): 99 drawn, ±50% → [49, 149] (floor
        // and ceil of 49.5 and 148.5); output 20 ±50% → [10, 30].
        let vocab = vocab(1000, &[0, 1, 2], 1);
        let drawn = drafts(&vocab, &spec(100, 20, 0.5), 4000, 3);
        let inputs: Vec<usize> = drawn.iter().map(|d| d.target_len).collect();
        let outputs: Vec<usize> = drawn.iter().map(|d| d.max_tokens).collect();
        assert_eq!(inputs.iter().min(), Some(&49));
        assert_eq!(inputs.iter().max(), Some(&149));
        assert_eq!(outputs.iter().min(), Some(&10));
        assert_eq!(outputs.iter().max(), Some(&30));
        // Uniform: the mean is the range's middle (sd of the mean ≈ 0.46 for inputs).
        let mean = inputs.iter().sum::<usize>() as f64 / inputs.len() as f64;
        assert!((mean - 99.0).abs() < 2.5, "{mean}");
        assert!(drawn.iter().all(|d| d.ids.len() == d.target_len));
        // Ratio 0: every prompt exactly input_len less the special token.
        let exact = drafts(&vocab, &spec(64, 8, 0.0), 50, 1);
        assert!(
            exact
                .iter()
                .all(|d| d.target_len == 63 && d.max_tokens == 8)
        );
    }

    #[test]
    fn ids_run_consecutively_over_the_non_special_ids() {
        let special = [0, 1, 5, 9];
        let vocab = vocab(10, &special, 0);
        for d in drafts(&vocab, &spec(25, 4, 0.0), 6, 2) {
            assert!(d.ids.iter().all(|id| !special.contains(id)), "{:?}", d.ids);
            for pair in d.ids.windows(2) {
                let (a, b) = (
                    vocab.allowed.iter().position(|x| *x == pair[0]).unwrap(),
                    vocab.allowed.iter().position(|x| *x == pair[1]).unwrap(),
                );
                assert_eq!(b, (a + 1) % vocab.allowed.len());
            }
        }
    }

    #[test]
    fn drawing_is_seeded() {
        let vocab = vocab(5000, &[0], 1);
        let spec = RandomTokens {
            prefix_len: 7,
            prefix_groups: 2,
            ..spec(40, 10, 0.3)
        };
        assert_eq!(drafts(&vocab, &spec, 20, 9), drafts(&vocab, &spec, 20, 9));
        assert_ne!(drafts(&vocab, &spec, 20, 9), drafts(&vocab, &spec, 20, 10));
    }

    #[test]
    fn no_two_prompts_start_alike() {
        // 300 prompts over 400 ids: vLLM's random offsets would repeat a start (and so
        // a whole prompt) with probability ~1 - e^(-300²/800) ≈ 1.
        let vocab = vocab(400, &[], 0);
        let drawn = drafts(&vocab, &spec(16, 4, 0.0), 300, 5);
        let firsts: HashSet<u32> = drawn.iter().map(|d| d.ids[0]).collect();
        assert_eq!(firsts.len(), 300);
        // Across the two halves of a shifted workload too.
        let mut rng = StdRng::seed_from_u64(1);
        let mut starts = HashSet::new();
        let mut both = draft(&vocab, &spec(16, 4, 0.0), 200, &mut rng, &mut starts).unwrap();
        both.extend(draft(&vocab, &spec(8, 4, 0.0), 200, &mut rng, &mut starts).unwrap());
        let firsts: HashSet<u32> = both.iter().map(|d| d.ids[0]).collect();
        assert_eq!(firsts.len(), 400);
        // More prompts than ids: starts repeat only once every id has been used.
        let drawn = drafts(&vocab, &spec(4, 4, 0.0), 800, 6);
        let firsts: HashSet<u32> = drawn[..400].iter().map(|d| d.ids[0]).collect();
        assert_eq!(firsts.len(), 400);
    }

    #[test]
    fn prefixes_are_shared_within_a_group_and_differ_between_groups() {
        let vocab = vocab(3000, &[0], 0);
        let spec = RandomTokens {
            prefix_len: 12,
            prefix_groups: 3,
            ..spec(10, 4, 0.0)
        };
        let drawn = drafts(&vocab, &spec, 9, 4);
        for (i, d) in drawn.iter().enumerate() {
            assert_eq!(d.target_len, 22);
            assert_eq!(d.ids[..12], drawn[i % 3].ids[..12]);
            assert_ne!(d.ids[12], drawn[(i + 1) % 9].ids[12]);
        }
        assert_ne!(drawn[0].ids[..12], drawn[1].ids[..12]);
        assert_ne!(drawn[1].ids[..12], drawn[2].ids[..12]);
    }

    #[test]
    fn lengths_that_leave_nothing_are_refused() {
        let vocab = vocab(100, &[], 1);
        let mut rng = StdRng::seed_from_u64(0);
        let refused = draft(&vocab, &spec(1, 4, 0.0), 3, &mut rng, &mut HashSet::new());
        assert!(matches!(refused, Err(TokensError::TooShort { .. })));
        let empty = Vocabulary {
            allowed: Vec::new(),
            ..vocab.clone()
        };
        let refused = draft(&empty, &spec(10, 4, 0.0), 3, &mut rng, &mut HashSet::new());
        assert!(matches!(refused, Err(TokensError::EmptyVocabulary)));
    }

    /// A word-level tokenizer.json (ids 0..=2 special, 3..=202 words that decode
    /// joined by spaces), written to `dir` and loaded.
    fn word_tokenizer(dir: &Path) -> PromptTokenizer {
        word_tokenizer_with(dir, Value::Null)
    }

    fn word_tokenizer_with(dir: &Path, post_processor: Value) -> PromptTokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, word) in ["<s>", "</s>", "<unk>"].iter().enumerate() {
            vocab.insert((*word).into(), json!(i));
        }
        for i in 3..203 {
            vocab.insert(format!("w{i}"), json!(i));
        }
        let special = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        let file = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(0, "<s>"), special(1, "</s>"), special(2, "<unk>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": post_processor,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        let path = dir.join("words.json");
        std::fs::write(&path, file.to_string()).unwrap();
        PromptTokenizer::load(&path).unwrap()
    }

    #[tokio::test]
    async fn a_local_tokenizer_gives_exact_lengths_and_distinct_starts() {
        let dir = std::env::temp_dir().join(format!("tandem-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokenizer = word_tokenizer(&dir);
        let vocab = tokenizer.vocabulary();
        assert_eq!((vocab.size, vocab.allowed.len()), (203, 200));
        assert_eq!(vocab.num_special, 0);
        let spec = spec(30, 5, 0.2);
        let realized = random(&tokenizer, &spec, 50, 7).await.unwrap();
        assert_eq!(realized.token_mismatch, 0);
        let mut firsts = HashSet::new();
        for prompt in &realized.prompts {
            let ids = tokenizer.encode(&prompt.text).await.unwrap();
            assert!((24..=36).contains(&ids.len()), "{}", ids.len());
            assert!(ids.iter().all(|&id| id >= 3), "no special ids");
            firsts.insert(ids[0]);
        }
        assert_eq!(firsts.len(), 50, "every prompt starts with its own token");
        let again = random(&tokenizer, &spec, 50, 7).await.unwrap();
        let texts = |r: &Realized| r.prompts.iter().map(|p| p.text.clone()).collect::<Vec<_>>();
        assert_eq!(texts(&realized), texts(&again));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bare_tokenizer_json_counts_the_bos_its_post_processor_adds() {
        let dir = std::env::temp_dir().join(format!("tandem-tokens-bos-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bos = json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
        let post_processor = json!({
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
        });
        let tokenizer = word_tokenizer_with(&dir, post_processor);
        assert_eq!(tokenizer.vocabulary().num_special, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn paths_that_are_no_tokenizer_are_refused() {
        let missing = PromptTokenizer::load(Path::new("/nonexistent/tokenizer.bin"));
        assert!(matches!(missing, Err(TokensError::Missing { .. })));
        let dir = std::env::temp_dir().join(format!("tandem-not-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let other = dir.join("weights.bin");
        std::fs::write(&other, b"nope").unwrap();
        let refused = PromptTokenizer::load(&other);
        assert!(matches!(refused, Err(TokensError::Unrecognized { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! llama.cpp's pre-tokenizer regex sets, keyed by GGUF `tokenizer.ggml.pre`.
//!
//! Each regex in a set splits every piece left by the previous one, keeping both
//! the matches and the text between them (Hugging Face `Split` with `Isolated`).

/// How a byte-level BPE vocabulary splits text into words before merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PreTokenizerSpec {
    pub regexes: &'static [&'static str],
    /// A word that is itself in the vocabulary becomes one token without merging.
    pub ignore_merges: bool,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const DEFAULT_SET: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"];
const GPT2_SET: &[&str] = &[GPT2];
const DIGITS_THEN_GPT2_SET: &[&str] = &[r"\p{N}", GPT2];
const LLAMA3_SET: &[&str] = &[LLAMA3];
const QWEN2_SET: &[&str] = &[QWEN2];
const FALCON_SET: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"];

/// The names this module knows, for error messages.
pub(super) const SUPPORTED: &str = "default, gpt2, gpt-2, phi-2, mpt, olmo, jais, roberta-bpe, \
     smollm, starcoder, refact, command-r, codeshell, exaone, minerva-7b, llama3, llama-v3, \
     llama-bpe, falcon3, dbrx, smaug-bpe, qwen2, stablelm2, megrez, falcon";

/// The regex set for a `tokenizer.ggml.pre` value; `None` when the name is unknown.
/// A missing value means llama.cpp's default set.
pub(super) fn spec_for(pre: Option<&str>) -> Option<PreTokenizerSpec> {
    let (regexes, ignore_merges) = match pre.unwrap_or("default") {
        "default" => (DEFAULT_SET, false),
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "roberta-bpe" => (GPT2_SET, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (DIGITS_THEN_GPT2_SET, false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" => {
            (LLAMA3_SET, true)
        }
        "qwen2" | "stablelm2" | "megrez" => (QWEN2_SET, false),
        "falcon" => (FALCON_SET, false),
        _ => return None,
    };
    Some(PreTokenizerSpec {
        regexes,
        ignore_merges,
    })
}

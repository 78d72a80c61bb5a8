//! Structured output: constraining what a sequence may generate to a JSON schema, a
//! regular expression, a list of choices or a grammar.
//!
//! The constraint engine is llguidance (the one vLLM and llama.cpp use); this module
//! owns the bridge to it and nothing of grammar compiling itself:
//! - [`OutputGrammar`]: what a request asked for, parsed from the API's fields.
//! - [`Constrainer`]: built once per tokenizer (the vocabulary as bytes, in a trie);
//!   compiles an [`OutputGrammar`] into an [`OutputConstraint`].
//! - [`OutputConstraint`]: one sequence's state, which the sampler asks for the tokens
//!   allowed next and tells each token it chose.

mod vocab;

use std::fmt;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::tokenizer::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputGrammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid under this schema.
    JsonSchema(Value),
    /// Text matching this regular expression (whole).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A context-free grammar in llguidance's Lark syntax.
    Lark(String),
}

/// Options that change how JSON is written (vLLM's `disable_any_whitespace`,
/// `whitespace_pattern`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonLayout {
    /// No whitespace between JSON tokens at all.
    pub compact: bool,
    /// A regular expression for the whitespace allowed between JSON tokens.
    pub whitespace_pattern: Option<String>,
}

/// Why a constraint could not be built or followed.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The grammar, schema or expression is invalid or unsupported.
    #[error("{0}")]
    Invalid(String),
    /// The tokenizer cannot be used for structured output.
    #[error("structured output is unavailable for this model: {0}")]
    Unavailable(String),
    /// The constraint failed while generating (e.g. a mask exceeded its work limits).
    #[error("the output constraint failed: {0}")]
    Failed(String),
}

/// Compiles grammars for one tokenizer. Cheap to clone; build it once per model.
#[derive(Clone)]
pub struct Constrainer {
    factory: Arc<ParserFactory>,
    end_tokens: Arc<[u32]>,
}

impl Constrainer {
    /// Builds the token trie of `tokenizer`'s vocabulary, padded to the model's
    /// `vocab_size` (the length of a logits row). Takes tens of milliseconds.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self, ConstraintError> {
        let env: TokEnv = Arc::new(vocab::TokenizerBridge::new(tokenizer, vocab_size)?);
        let end_tokens = env.tok_trie().eos_tokens().into();
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Unavailable(e.to_string()))?;
        // Errors come back to the caller; nothing goes to stderr.
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            end_tokens,
        })
    }

    /// Compiles `grammar` (CPU work of up to tens of milliseconds for large schemas:
    /// call it off the async runtime).
    pub fn compile(
        &self,
        grammar: &OutputGrammar,
        layout: &JsonLayout,
    ) -> Result<OutputConstraint, ConstraintError> {
        if let OutputGrammar::Lark(text) = grammar
            && text.contains("::=")
        {
            return Err(ConstraintError::Invalid(
                "GBNF/EBNF grammars (`rule ::= ...`) are not supported; write the grammar in \
                 llguidance's Lark syntax (`rule: ...`)"
                    .into(),
            ));
        }
        let top = top_level_grammar(grammar, layout);
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| ConstraintError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(ConstraintError::Invalid(error));
        }
        Ok(OutputConstraint {
            grammar: Arc::new(grammar.clone()),
            matcher,
            end_tokens: Arc::clone(&self.end_tokens),
            finished: false,
        })
    }
}

impl fmt::Debug for Constrainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constrainer").finish_non_exhaustive()
    }
}

fn top_level_grammar(grammar: &OutputGrammar, layout: &JsonLayout) -> TopLevelGrammar {
    match grammar {
        OutputGrammar::JsonObject => json_grammar(json!({"type": "object"}), layout),
        OutputGrammar::JsonSchema(schema) => json_grammar(schema.clone(), layout),
        OutputGrammar::Regex(regex) => TopLevelGrammar::from_regex(regex),
        OutputGrammar::Choice(choices) => {
            let alternatives: Vec<String> = choices.iter().map(|c| escape_regex(c)).collect();
            TopLevelGrammar::from_regex(&alternatives.join("|"))
        }
        OutputGrammar::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
    }
}

/// A JSON schema grammar; the layout goes in llguidance's `x-guidance` options.
fn json_grammar(mut schema: Value, layout: &JsonLayout) -> TopLevelGrammar {
    close_listed_objects(&mut schema);
    if let Some(object) = schema.as_object_mut()
        && !object.contains_key("x-guidance")
        && (layout.compact || layout.whitespace_pattern.is_some())
    {
        let mut options = json!({"whitespace_flexible": !layout.compact});
        if let Some(pattern) = &layout.whitespace_pattern {
            options["whitespace_pattern"] = json!(pattern);
        }
        object.insert("x-guidance".into(), options);
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// Gives every object schema that lists its `properties` and says nothing of others
/// `"additionalProperties": false`, as vLLM's default grammar backend (xgrammar, in its
/// strict mode) reads such schemas: a tool's parameters or a response format name the
/// keys the client will read, and a small model left free invents others. Branches of
/// `allOf` stay open, as closing each would refuse the keys the others add.
fn close_listed_objects(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    if object.contains_key("properties")
        && !object.contains_key("additionalProperties")
        && !object.contains_key("patternProperties")
        && !object.contains_key("unevaluatedProperties")
    {
        object.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (key, value) in object.iter_mut() {
        match key.as_str() {
            "properties" | "$defs" | "definitions" => {
                value
                    .as_object_mut()
                    .into_iter()
                    .flatten()
                    .for_each(|(_, v)| close_listed_objects(v));
            }
            "anyOf" | "oneOf" | "prefixItems" => {
                value
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                    .for_each(close_listed_objects);
            }
            "items" | "additionalProperties" | "not" => close_listed_objects(value),
            _ => {}
        }
    }
}

/// `text` as a regular expression matching exactly it.
fn escape_regex(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// One sequence's progress through its grammar.
#[derive(Clone)]
pub struct OutputConstraint {
    grammar: Arc<OutputGrammar>,
    matcher: Matcher,
    /// The model's end-of-generation ids.
    end_tokens: Arc<[u32]>,
    /// An end token was chosen while the grammar allowed ending.
    finished: bool,
}

/// The tokens a constraint allows next.
pub enum Allowed {
    /// These tokens (a bit per token id; end-of-generation ids when the output may
    /// end here).
    Tokens(SimpleVob),
    /// Nothing more: the output is complete.
    Complete,
}

impl OutputConstraint {
    /// The tokens that may come next.
    pub fn allowed(&mut self) -> Result<Allowed, ConstraintError> {
        if self.is_complete() {
            return Ok(Allowed::Complete);
        }
        let mask = self
            .matcher
            .compute_mask()
            .map_err(|e| ConstraintError::Failed(e.to_string()))?;
        if self.matcher.is_stopped() {
            return Ok(Allowed::Complete);
        }
        Ok(Allowed::Tokens(mask))
    }

    /// Moves past `token`, which [`Self::allowed`] allowed. An end-of-generation token
    /// completes the output.
    pub fn accept(&mut self, token: u32) -> Result<(), ConstraintError> {
        if self.end_tokens.contains(&token) {
            self.finished = true;
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Failed(e.to_string()))
    }

    /// Whether the output is complete: nothing may follow.
    pub fn is_complete(&self) -> bool {
        self.finished || self.matcher.is_stopped()
    }
}

impl fmt::Debug for OutputConstraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputConstraint")
            .field("grammar", &self.grammar)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// Two constraints are equal when built from the same grammar (their progress aside).
impl PartialEq for OutputConstraint {
    fn eq(&self, other: &Self) -> bool {
        self.grammar == other.grammar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_matched_literally() {
        assert_eq!(escape_regex("a.b"), "a\\.b");
        assert_eq!(escape_regex("(x|y)?"), "\\(x\\|y\\)\\?");
        assert_eq!(escape_regex("plain words"), "plain words");
    }

    #[test]
    fn objects_that_list_their_properties_admit_no_others() {
        let mut schema = json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "stops": {"type": "array", "items": {"properties": {"at": {}}}},
                "extra": {"type": "object", "properties": {}, "additionalProperties": true}
            },
            "$defs": {"place": {"anyOf": [{"properties": {"x": {}}}, {"type": "string"}]}},
            "allOf": [{"properties": {"y": {}}}]
        });
        close_listed_objects(&mut schema);
        assert_eq!(schema["additionalProperties"], json!(false));
        let properties = &schema["properties"];
        assert_eq!(
            properties["stops"]["items"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(properties["extra"]["additionalProperties"], json!(true));
        assert_eq!(properties["city"].get("additionalProperties"), None);
        assert_eq!(
            schema["$defs"]["place"]["anyOf"][0]["additionalProperties"],
            json!(false)
        );
        assert_eq!(schema["allOf"][0].get("additionalProperties"), None);
    }

    #[test]
    fn json_layout_becomes_llguidance_options_unless_the_schema_sets_them() {
        let compact = JsonLayout {
            compact: true,
            whitespace_pattern: None,
        };
        let TopLevelGrammar { grammars, .. } = json_grammar(json!({"type": "object"}), &compact);
        let schema = grammars[0].json_schema.as_ref().unwrap();
        assert_eq!(schema["x-guidance"]["whitespace_flexible"], json!(false));
        let own = json!({"type": "object", "x-guidance": {"lenient": true}});
        let TopLevelGrammar { grammars, .. } = json_grammar(own.clone(), &compact);
        assert_eq!(grammars[0].json_schema.as_ref().unwrap(), &own);
    }
}

//! Reading a request's structured-output fields into the grammar its output must
//! follow: OpenAI's `response_format`, vLLM's `structured_outputs` and vLLM's older
//! `guided_*` fields. A request may use one of them; every part of them is either
//! honoured or refused by name.

use serde_json::{Map, Value};
use tandem_protocol::openai::{ApiError, SamplingFields};

use crate::constrain::{JsonLayout, OutputGrammar};

/// A grammar a request asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedGrammar {
    /// The field it came from, for errors about it.
    pub field: &'static str,
    pub grammar: OutputGrammar,
    pub layout: JsonLayout,
}

/// The grammar a request asks for; `None` for free text.
pub fn requested_grammar(fields: &SamplingFields) -> Result<Option<RequestedGrammar>, ApiError> {
    let mut found: Vec<(&str, (OutputGrammar, JsonLayout))> = Vec::new();
    if let Some(format) = fields.response_format.as_ref().filter(|v| !v.is_null())
        && let Some(grammar) = response_format(format)?
    {
        found.push(("response_format", (grammar, JsonLayout::default())));
    }
    if let Some(outputs) = fields.structured_outputs.as_ref().filter(|v| !v.is_null()) {
        found.push(("structured_outputs", structured_outputs(outputs)?));
    }
    for (field, grammar) in guided_fields(fields)? {
        found.push((field, (grammar, guided_layout(fields)?)));
    }
    if found.len() > 1 {
        return Err(ApiError::invalid_param(
            found[1].0,
            format!(
                "Only one kind of structured output per request: `{}` and `{}` are both set.",
                found[0].0, found[1].0
            ),
        ));
    }
    if found.is_empty() {
        check_guided_options_alone(fields)?;
    }
    Ok(found
        .pop()
        .map(|(field, (grammar, layout))| RequestedGrammar {
            field,
            grammar,
            layout,
        }))
}

fn response_format(format: &Value) -> Result<Option<OutputGrammar>, ApiError> {
    let object = object_at("response_format", format)?;
    known_keys("response_format", object, &["type", "json_schema"])?;
    match object.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputGrammar::JsonObject)),
        Some("json_schema") => {
            let spec = object.get("json_schema").ok_or_else(|| {
                ApiError::invalid_param(
                    "response_format.json_schema",
                    "`response_format.json_schema` is required with type `json_schema`.",
                )
            })?;
            let spec = object_at("response_format.json_schema", spec)?;
            known_keys(
                "response_format.json_schema",
                spec,
                &["name", "schema", "strict", "description"],
            )?;
            let schema = spec.get("schema").ok_or_else(|| {
                ApiError::invalid_param(
                    "response_format.json_schema.schema",
                    "`response_format.json_schema.schema` is required.",
                )
            })?;
            Ok(Some(OutputGrammar::JsonSchema(json_schema(
                "response_format.json_schema.schema",
                schema,
            )?)))
        }
        Some("structural_tag") => Err(ApiError::invalid_param(
            "response_format.type",
            "`response_format` of type `structural_tag` is not supported by tandem serve.",
        )),
        _ => Err(ApiError::invalid_param(
            "response_format.type",
            "`response_format.type` must be `text`, `json_object` or `json_schema`.",
        )),
    }
}

/// vLLM's `structured_outputs` object.
fn structured_outputs(value: &Value) -> Result<(OutputGrammar, JsonLayout), ApiError> {
    const KINDS: &[&str] = &["json", "regex", "choice", "grammar", "json_object"];
    let object = object_at("structured_outputs", value)?;
    known_keys(
        "structured_outputs",
        object,
        &[
            "json",
            "regex",
            "choice",
            "grammar",
            "json_object",
            "structural_tag",
            "disable_fallback",
            "disable_any_whitespace",
            "disable_additional_properties",
            "whitespace_pattern",
        ],
    )?;
    refuse_set(object, "structured_outputs", "structural_tag")?;
    // Objects that list their properties admit no others either way, as with vLLM's
    // default backend (`constrain::close_listed_objects`): `true` asks for what is done.
    if !matches!(
        object.get("disable_additional_properties"),
        None | Some(Value::Null | Value::Bool(_))
    ) {
        return Err(ApiError::invalid_param(
            "structured_outputs.disable_additional_properties",
            "`structured_outputs.disable_additional_properties` must be a boolean.",
        ));
    }
    let set: Vec<&str> = KINDS
        .iter()
        .copied()
        .filter(|kind| match object.get(*kind) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(_) => true,
        })
        .collect();
    let kind = match set.as_slice() {
        [one] => *one,
        [] => {
            return Err(ApiError::invalid_param(
                "structured_outputs",
                "`structured_outputs` needs one of `json`, `regex`, `choice`, `grammar` or \
                 `json_object`.",
            ));
        }
        [first, second, ..] => {
            return Err(ApiError::invalid_param(
                &format!("structured_outputs.{second}"),
                format!(
                    "`structured_outputs` takes one kind of constraint: `{first}` and `{second}` are both set."
                ),
            ));
        }
    };
    let param = format!("structured_outputs.{kind}");
    let value = &object[kind];
    let grammar = match kind {
        "json" => OutputGrammar::JsonSchema(json_schema(&param, value)?),
        "regex" => OutputGrammar::Regex(string_at(&param, value)?),
        "choice" => OutputGrammar::Choice(choices(&param, value)?),
        "grammar" => OutputGrammar::Lark(string_at(&param, value)?),
        _ => match value {
            Value::Bool(true) => OutputGrammar::JsonObject,
            _ => {
                return Err(ApiError::invalid_param(
                    &param,
                    format!("`{param}` must be a boolean."),
                ));
            }
        },
    };
    let layout = JsonLayout {
        compact: bool_at(object, "structured_outputs", "disable_any_whitespace")?,
        whitespace_pattern: optional_string(object, "structured_outputs", "whitespace_pattern")?,
    };
    // `disable_fallback` picks between vLLM's backends; there is one here.
    bool_at(object, "structured_outputs", "disable_fallback")?;
    Ok((grammar, layout))
}

/// vLLM's `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`.
fn guided_fields(fields: &SamplingFields) -> Result<Vec<(&'static str, OutputGrammar)>, ApiError> {
    let mut found = Vec::new();
    let set = |value: &Option<Value>| value.as_ref().filter(|v| !v.is_null()).cloned();
    if let Some(value) = set(&fields.guided_json) {
        found.push((
            "guided_json",
            OutputGrammar::JsonSchema(json_schema("guided_json", &value)?),
        ));
    }
    if let Some(value) = set(&fields.guided_regex) {
        found.push((
            "guided_regex",
            OutputGrammar::Regex(string_at("guided_regex", &value)?),
        ));
    }
    if let Some(value) = set(&fields.guided_choice) {
        found.push((
            "guided_choice",
            OutputGrammar::Choice(choices("guided_choice", &value)?),
        ));
    }
    if let Some(value) = set(&fields.guided_grammar) {
        found.push((
            "guided_grammar",
            OutputGrammar::Lark(string_at("guided_grammar", &value)?),
        ));
    }
    Ok(found)
}

fn guided_layout(fields: &SamplingFields) -> Result<JsonLayout, ApiError> {
    let pattern = match fields
        .guided_whitespace_pattern
        .as_ref()
        .filter(|v| !v.is_null())
    {
        Some(value) => Some(string_at("guided_whitespace_pattern", value)?),
        None => None,
    };
    check_backend(fields)?;
    Ok(JsonLayout {
        compact: false,
        whitespace_pattern: pattern,
    })
}

/// `guided_whitespace_pattern` and `guided_decoding_backend` without a `guided_*`
/// constraint ask for nothing; they are still checked.
fn check_guided_options_alone(fields: &SamplingFields) -> Result<(), ApiError> {
    guided_layout(fields).map(|_| ())
}

/// The backend is llguidance (vLLM calls it `guidance`); asking for another is refused.
fn check_backend(fields: &SamplingFields) -> Result<(), ApiError> {
    match fields.guided_decoding_backend.as_ref() {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(name))
            if matches!(name.as_str(), "auto" | "guidance" | "llguidance") =>
        {
            Ok(())
        }
        Some(_) => Err(ApiError::invalid_param(
            "guided_decoding_backend",
            "tandem serve's structured output backend is llguidance: `guided_decoding_backend` \
             may be `auto`, `guidance` or `llguidance`.",
        )),
    }
}

/// A JSON schema: an object, or a string holding one.
fn json_schema(param: &str, value: &Value) -> Result<Value, ApiError> {
    let schema = match value {
        Value::String(text) => serde_json::from_str(text).map_err(|e| {
            ApiError::invalid_param(param, format!("`{param}` is not valid JSON: {e}"))
        })?,
        other => other.clone(),
    };
    match schema {
        Value::Object(_) | Value::Bool(true) => Ok(schema),
        _ => Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be a JSON schema object."),
        )),
    }
}

fn choices(param: &str, value: &Value) -> Result<Vec<String>, ApiError> {
    let list = value
        .as_array()
        .filter(|list| !list.is_empty())
        .ok_or_else(|| {
            ApiError::invalid_param(
                param,
                format!("`{param}` must be a non-empty list of strings."),
            )
        })?;
    list.iter().map(|item| string_at(param, item)).collect()
}

fn object_at<'a>(param: &str, value: &'a Value) -> Result<&'a Map<String, Value>, ApiError> {
    value
        .as_object()
        .ok_or_else(|| ApiError::invalid_param(param, format!("`{param}` must be an object.")))
}

fn string_at(param: &str, value: &Value) -> Result<String, ApiError> {
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| ApiError::invalid_param(param, format!("`{param}` must be a string.")))
}

fn bool_at(object: &Map<String, Value>, parent: &str, key: &str) -> Result<bool, ApiError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(ApiError::invalid_param(
            &format!("{parent}.{key}"),
            format!("`{parent}.{key}` must be a boolean."),
        )),
    }
}

fn optional_string(
    object: &Map<String, Value>,
    parent: &str,
    key: &str,
) -> Result<Option<String>, ApiError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => string_at(&format!("{parent}.{key}"), value).map(Some),
    }
}

fn known_keys(parent: &str, object: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match object.keys().find(|key| !known.contains(&key.as_str())) {
        Some(key) => Err(ApiError::invalid_param(
            &format!("{parent}.{key}"),
            format!("`{parent}.{key}` is not supported by tandem serve."),
        )),
        None => Ok(()),
    }
}

fn refuse_set(object: &Map<String, Value>, parent: &str, key: &str) -> Result<(), ApiError> {
    match object.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(_) => Err(ApiError::invalid_param(
            &format!("{parent}.{key}"),
            format!("`{parent}.{key}` is not supported by tandem serve."),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grammar_of(body: Value) -> Result<Option<OutputGrammar>, String> {
        let fields: SamplingFields = serde_json::from_value(body).unwrap();
        requested_grammar(&fields)
            .map(|found| found.map(|requested| requested.grammar))
            .map_err(|e| e.body().error.param.unwrap_or_default())
    }

    #[test]
    fn each_way_of_asking_gives_its_grammar() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            grammar_of(json!({"response_format": {"type": "text"}})),
            Ok(None)
        );
        assert_eq!(
            grammar_of(json!({"response_format": {"type": "json_object"}})),
            Ok(Some(OutputGrammar::JsonObject))
        );
        assert_eq!(
            grammar_of(json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": true}}})),
            Ok(Some(OutputGrammar::JsonSchema(schema.clone())))
        );
        assert_eq!(
            grammar_of(json!({"structured_outputs": {"json": schema.to_string()}})),
            Ok(Some(OutputGrammar::JsonSchema(schema.clone())))
        );
        assert_eq!(
            grammar_of(json!({"structured_outputs": {"choice": ["yes", "no"]}})),
            Ok(Some(OutputGrammar::Choice(vec!["yes".into(), "no".into()])))
        );
        assert_eq!(
            grammar_of(json!({"guided_regex": "[0-9]+"})),
            Ok(Some(OutputGrammar::Regex("[0-9]+".into())))
        );
        assert_eq!(
            grammar_of(json!({"guided_grammar": "start: \"a\""})),
            Ok(Some(OutputGrammar::Lark("start: \"a\"".into())))
        );
    }

    #[test]
    fn malformed_or_conflicting_requests_name_the_field() {
        let refused = |body| grammar_of(body).unwrap_err();
        assert_eq!(
            refused(json!({"response_format": {"type": "xml"}})),
            "response_format.type"
        );
        assert_eq!(
            refused(json!({"response_format": {"type": "json_schema"}})),
            "response_format.json_schema"
        );
        assert_eq!(
            refused(json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": 3}}})),
            "response_format.json_schema.schema"
        );
        assert_eq!(
            refused(json!({"response_format": {"type": "json_object"}, "guided_regex": "a"})),
            "guided_regex"
        );
        assert_eq!(
            refused(json!({"structured_outputs": {"regex": "a", "choice": ["a"]}})),
            "structured_outputs.choice"
        );
        assert_eq!(
            refused(json!({"structured_outputs": {"choice": []}})),
            "structured_outputs.choice"
        );
        assert_eq!(
            refused(json!({"structured_outputs": {"lark": "x"}})),
            "structured_outputs.lark"
        );
        assert_eq!(
            refused(json!({"structured_outputs": {"structural_tag": "{}"}})),
            "structured_outputs.structural_tag"
        );
        assert_eq!(refused(json!({"guided_json": "{not json"})), "guided_json");
        assert_eq!(
            refused(json!({"guided_decoding_backend": "xgrammar"})),
            "guided_decoding_backend"
        );
    }
}

//! A chat request's `tools`, `tool_choice` and `parallel_tool_calls`: checked, offered
//! to the model (through the chat template, or a system message when the template has
//! no place for them), enforced with structured output when a call is required, and
//! read back out of the output ([`crate::tools`]) into `tool_calls`.

use serde_json::{Value, json};
use tandem_protocol::openai::{ApiError, ChatCompletionRequest};

use super::structured::RequestedGrammar;
use crate::constrain::{JsonLayout, OutputGrammar};
use crate::tools::{ToolCallExtractor, ToolCallFormat};

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Plain text; calls are not read out of it.
    None,
    /// The model decides; calls are read out of the text.
    Auto,
    /// At least one call (a JSON array of calls, forced).
    Required,
    /// A call of this function (its arguments, forced).
    Named(String),
}

/// The tools of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    /// OpenAI's tool objects, as sent.
    pub tools: Vec<Value>,
    pub choice: ToolChoice,
    /// Whether `required` may make several calls.
    pub parallel: bool,
}

impl ToolUse {
    /// The request's tools; `None` when it has none.
    pub fn from_request(request: &ChatCompletionRequest) -> Result<Option<Self>, ApiError> {
        let tools = match request.tools.as_ref() {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(tools)) => tools.clone(),
            Some(_) => return Err(ApiError::invalid_param("tools", "`tools` must be a list.")),
        };
        for (index, tool) in tools.iter().enumerate() {
            check_tool(index, tool)?;
        }
        let choice = tool_choice(request.tool_choice.as_ref(), &tools)?;
        if tools.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            tools,
            choice,
            parallel: request.parallel_tool_calls.unwrap_or(true),
        }))
    }

    /// The grammar a required or named call forces on the output.
    pub fn forced_grammar(&self) -> Option<RequestedGrammar> {
        let schema = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Named(name) => parameters_of(self.function(name)?),
            ToolChoice::Required => self.calls_schema(),
        };
        Some(RequestedGrammar {
            field: "tool_choice",
            grammar: OutputGrammar::JsonSchema(schema),
            layout: JsonLayout::default(),
        })
    }

    /// Reads calls out of a choice's output; `None` with `tool_choice: "none"`.
    pub fn extractor(&self, format: ToolCallFormat) -> Option<ToolCallExtractor> {
        match &self.choice {
            ToolChoice::None => None,
            ToolChoice::Auto => Some(ToolCallExtractor::auto(format)),
            ToolChoice::Required => Some(ToolCallExtractor::required()),
            ToolChoice::Named(name) => Some(ToolCallExtractor::named(name)),
        }
    }

    fn function(&self, name: &str) -> Option<&Value> {
        self.tools
            .iter()
            .map(|tool| &tool["function"])
            .find(|function| function["name"] == name)
    }

    /// A JSON array of one or more `{"name", "parameters"}` calls of the tools.
    fn calls_schema(&self) -> Value {
        let calls: Vec<Value> = self
            .tools
            .iter()
            .map(|tool| {
                let function = &tool["function"];
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [function["name"]]},
                        "parameters": parameters_of(function),
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
        if !self.parallel {
            schema["maxItems"] = json!(1);
        }
        schema
    }
}

fn parameters_of(function: &Value) -> Value {
    match function.get("parameters") {
        Some(parameters @ Value::Object(_)) => parameters.clone(),
        _ => json!({"type": "object"}),
    }
}

fn check_tool(index: usize, tool: &Value) -> Result<(), ApiError> {
    let at = |field: &str| format!("tools[{index}]{field}");
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid_param(
            &at(".type"),
            "Only tools of type `function` are supported.",
        ));
    }
    let function = tool
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            ApiError::invalid_param(&at(".function"), "A tool needs a `function` object.")
        })?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let valid_name = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid_name {
        return Err(ApiError::invalid_param(
            &at(".function.name"),
            "A function name is 1 to 64 letters, digits, `_` or `-`.",
        ));
    }
    match function.get("parameters") {
        None | Some(Value::Null) | Some(Value::Object(_)) => Ok(()),
        Some(_) => Err(ApiError::invalid_param(
            &at(".function.parameters"),
            "`parameters` must be a JSON schema object.",
        )),
    }
}

fn tool_choice(value: Option<&Value>, tools: &[Value]) -> Result<ToolChoice, ApiError> {
    let default = if tools.is_empty() {
        ToolChoice::None
    } else {
        ToolChoice::Auto
    };
    let choice = match value {
        None | Some(Value::Null) => default,
        Some(Value::String(mode)) => match mode.as_str() {
            "none" => ToolChoice::None,
            "auto" => default,
            "required" => ToolChoice::Required,
            _ => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    "`tool_choice` must be `none`, `auto`, `required` or a named function.",
                ));
            }
        },
        Some(Value::Object(object)) => {
            let name = object
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| object.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "tool_choice",
                        "A named `tool_choice` is `{\"type\": \"function\", \"function\": {\"name\": ...}}`.",
                    )
                })?;
            if !tools.iter().any(|tool| tool["function"]["name"] == name) {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("`tool_choice` names `{name}`, which is not among `tools`."),
                ));
            }
            ToolChoice::Named(name.to_owned())
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "`tool_choice` must be a string or an object.",
            ));
        }
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err(ApiError::invalid_param(
            "tool_choice",
            "`tool_choice` asks for a tool call, but the request has no `tools`.",
        ));
    }
    Ok(choice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: Value) -> ChatCompletionRequest {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        serde_json::from_value(body).unwrap()
    }

    fn add_tool() -> Value {
        json!({"type": "function", "function": {"name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}})
    }

    fn refused(extra: Value) -> String {
        ToolUse::from_request(&request(extra))
            .unwrap_err()
            .body()
            .error
            .param
            .unwrap()
    }

    #[test]
    fn choices_default_to_auto_with_tools() {
        let tools = ToolUse::from_request(&request(json!({"tools": [add_tool()]})))
            .unwrap()
            .unwrap();
        assert_eq!(tools.choice, ToolChoice::Auto);
        assert!(tools.forced_grammar().is_none());
        assert!(
            ToolUse::from_request(&request(json!({"tool_choice": "auto"})))
                .unwrap()
                .is_none()
        );
        let named = ToolUse::from_request(&request(json!({"tools": [add_tool()],
            "tool_choice": {"type": "function", "function": {"name": "add"}}})))
        .unwrap()
        .unwrap();
        let forced = named.forced_grammar().unwrap();
        assert_eq!(
            forced.grammar,
            OutputGrammar::JsonSchema(add_tool()["function"]["parameters"].clone())
        );
    }

    #[test]
    fn required_forces_an_array_of_calls_one_when_not_parallel() {
        let tools = ToolUse::from_request(&request(json!({"tools": [add_tool()],
            "tool_choice": "required", "parallel_tool_calls": false})))
        .unwrap()
        .unwrap();
        let OutputGrammar::JsonSchema(schema) = tools.forced_grammar().unwrap().grammar else {
            panic!("a schema")
        };
        assert_eq!(schema["minItems"], 1);
        assert_eq!(schema["maxItems"], 1);
        assert_eq!(
            schema["items"]["anyOf"][0]["properties"]["name"]["enum"],
            json!(["add"])
        );
    }

    #[test]
    fn bad_tools_and_choices_are_refused_by_name() {
        assert_eq!(refused(json!({"tools": {"a": 1}})), "tools");
        assert_eq!(
            refused(json!({"tools": [{"type": "retrieval"}]})),
            "tools[0].type"
        );
        assert_eq!(
            refused(json!({"tools": [{"type": "function", "function": {"name": "a b"}}]})),
            "tools[0].function.name"
        );
        assert_eq!(refused(json!({"tool_choice": "required"})), "tool_choice");
        assert_eq!(
            refused(
                json!({"tools": [add_tool()], "tool_choice": {"type": "function",
                "function": {"name": "sub"}}})
            ),
            "tool_choice"
        );
        assert_eq!(
            refused(json!({"tools": [add_tool()], "tool_choice": "always"})),
            "tool_choice"
        );
    }
}

//! Tool calling on a real `tandem serve` and through a real P/D router: `required` and
//! named `tool_choice` force calls with structured output; with `auto`, calls the
//! model writes (here made certain with a regular expression, as the default model is
//! too small to call tools on its own) are read out of its text in the
//! `--tool-call-parser` format, whole and streamed; a conversation carrying earlier
//! calls and their results goes back in; bad tools are refused by name.

mod common;

use common::{Server, default_model_present};
use serde_json::{Value, json};

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": false
        }
    }})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": false
        }
    }})
}

fn ask(extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "What is the weather in Paris, and the time?"}],
        "tools": [weather_tool(), time_tool()],
        "max_tokens": 60,
        "temperature": 0,
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

/// A call's name and parsed arguments, checked against the two tools' schemas.
fn checked_call(call: &Value) -> (String, Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-tool-")),
        "{call}"
    );
    let name = call["function"]["name"].as_str().unwrap().to_owned();
    let text = call["function"]["arguments"].as_str().unwrap();
    let arguments: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    match name.as_str() {
        "get_weather" => assert!(
            arguments["city"].is_string() && arguments.as_object().unwrap().len() == 1,
            "{arguments}"
        ),
        "get_time" => assert!(
            ["UTC", "CET"].contains(&arguments["zone"].as_str().unwrap()),
            "{arguments}"
        ),
        other => panic!("not a tool: {other}"),
    }
    (name, arguments)
}

/// The message of a whole answer, or one assembled from a stream's deltas.
async fn message_of(server: &Server, body: &Value) -> (Value, String) {
    if body["stream"] != json!(true) {
        let (status, answer) = server.post("/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{answer}");
        let choice = &answer["choices"][0];
        return (
            choice["message"].clone(),
            choice["finish_reason"].as_str().unwrap().to_owned(),
        );
    }
    let payloads = server.post_stream("/v1/chat/completions", body).await;
    let (mut content, mut calls, mut finish) = (String::new(), Vec::new(), String::new());
    for payload in &payloads[..payloads.len() - 1] {
        let chunk: Value = serde_json::from_str(payload).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(text) = choice["delta"]["content"].as_str() {
            content.push_str(text);
        }
        for call in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(
                call["index"],
                json!(calls.len()),
                "calls are numbered in order"
            );
            calls.push(call.clone());
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.to_owned();
        }
    }
    let message = json!({"content": (!content.is_empty()).then_some(content),
        "tool_calls": (!calls.is_empty()).then_some(calls)});
    (message, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_and_written_calls_come_back_as_tool_calls_alone_and_through_pd() {
    if !default_model_present() {
        return;
    }
    let alone = Server::start(&["--threads", "1", "--max-model-len", "1024"]);
    let prefill = Server::start(&[
        "--threads",
        "1",
        "--kv-port",
        "0",
        "--max-model-len",
        "1024",
    ]);
    let decode = Server::start(&["--threads", "1", "--max-model-len", "1024"]);
    let router =
        Server::start_router(&["--prefill", &prefill.url(""), "--decode", &decode.url("")]);
    for server in [&alone, &router] {
        for stream in [false, true] {
            // Required: one or more calls of the tools, finish_reason tool_calls.
            let (message, finish) = message_of(
                server,
                &ask(json!({"tool_choice": "required", "stream": stream})),
            )
            .await;
            let calls = message["tool_calls"]
                .as_array()
                .unwrap_or_else(|| panic!("{message}"));
            assert!(!calls.is_empty());
            calls.iter().for_each(|call| drop(checked_call(call)));
            assert_eq!(message["content"], Value::Null);
            assert_eq!(finish, "tool_calls");
            // Not parallel: exactly one.
            let (message, _) = message_of(
                server,
                &ask(json!({"tool_choice": "required", "parallel_tool_calls": false, "stream": stream})),
            )
            .await;
            assert_eq!(
                message["tool_calls"].as_array().unwrap().len(),
                1,
                "{message}"
            );
            // Named: that function's call, finish_reason stop (as OpenAI's).
            let named = json!({"type": "function", "function": {"name": "get_time"}});
            let (message, finish) = message_of(
                server,
                &ask(json!({"tool_choice": named, "stream": stream})),
            )
            .await;
            let calls = message["tool_calls"].as_array().unwrap();
            assert_eq!(calls.len(), 1);
            assert_eq!(checked_call(&calls[0]).0, "get_time");
            assert_eq!(finish, "stop");
            // Auto: a call the model writes in the hermes format, amid text.
            let written = "Let me check\\. <tool_call>\n\\{\"name\": \"get_weather\", \"arguments\": \\{\"city\": \"(Paris|Lyon)\"\\}\\}\n</tool_call>";
            let (message, finish) = message_of(
                server,
                &ask(json!({"guided_regex": written, "stream": stream})),
            )
            .await;
            assert_eq!(message["content"], "Let me check. ", "{message}");
            let calls = message["tool_calls"].as_array().unwrap();
            assert_eq!(calls.len(), 1);
            let (name, arguments) = checked_call(&calls[0]);
            assert_eq!(name, "get_weather");
            assert!(["Paris", "Lyon"].contains(&arguments["city"].as_str().unwrap()));
            assert_eq!(finish, "tool_calls");
            // tool_choice none: the same text stays text.
            let (message, finish) = message_of(
                server,
                &ask(json!({"guided_regex": written, "tool_choice": "none", "stream": stream})),
            )
            .await;
            assert!(
                message["content"].as_str().unwrap().contains("<tool_call>"),
                "{message}"
            );
            assert_eq!(message["tool_calls"], Value::Null);
            assert_eq!(finish, "stop");
        }
    }

    // The tools are offered in the prompt (the default model's template has no place
    // for them, so they go in the system message).
    let (_, with_tools) = alone
        .post("/v1/chat/completions", &ask(json!({"max_tokens": 1})))
        .await;
    let mut bare = ask(json!({"max_tokens": 1}));
    bare.as_object_mut().unwrap().remove("tools");
    let (_, without) = alone.post("/v1/chat/completions", &bare).await;
    let prompt = |answer: &Value| answer["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt(&with_tools) > prompt(&without) + 50,
        "{with_tools} {without}"
    );

    // A conversation with an earlier call and its result goes back in.
    let follow_up = json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}
        ],
        "tools": [weather_tool()],
        "max_tokens": 8,
        "temperature": 0,
    });
    for server in [&alone, &router] {
        let (status, answer) = server.post("/v1/chat/completions", &follow_up).await;
        assert_eq!(status, 200, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llama3_json_parser_reads_bare_json_calls() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&[
        "--threads",
        "1",
        "--max-model-len",
        "1024",
        "--tool-call-parser",
        "llama3_json",
    ]);
    let written = "\\{\"name\": \"get_time\", \"parameters\": \\{\"zone\": \"(UTC|CET)\"\\}\\}";
    for stream in [false, true] {
        let (message, finish) = message_of(
            &server,
            &ask(json!({"guided_regex": written, "stream": stream})),
        )
        .await;
        let calls = message["tool_calls"]
            .as_array()
            .unwrap_or_else(|| panic!("{message}"));
        assert_eq!(checked_call(&calls[0]).0, "get_time");
        assert_eq!(message["content"], Value::Null);
        assert_eq!(finish, "tool_calls");
    }
}

#[tokio::test]
async fn bad_tools_are_refused_by_name() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "1", "--max-model-len", "1024"]);
    let refused = [
        (
            json!({"tools": [{"type": "function", "function": {"name": "has space"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": [{"type": "code_interpreter"}]}),
            "tools[0].type",
        ),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "1"}]}]}),
            "messages[1].tool_calls",
        ),
    ];
    for (extra, param) in refused {
        let (status, answer) = server
            .post("/v1/chat/completions", &ask(extra.clone()))
            .await;
        assert_eq!(status, 400, "{extra}: {answer}");
        assert_eq!(answer["error"]["param"], json!(param), "{extra}: {answer}");
    }
}

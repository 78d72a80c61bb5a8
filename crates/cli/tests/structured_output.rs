//! Structured output on a real `tandem serve` and through a real P/D router: every way
//! of asking (OpenAI's `response_format`, vLLM's `structured_outputs` and `guided_*`)
//! gives output that follows its grammar, streamed or whole, one choice or several,
//! greedy or sampled; grammars that cannot be used are refused by the field's name.

mod common;

use common::{Server, default_model_present, streamed_text, text_of};
use serde_json::{Value, json};

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "pets": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": false
    })
}

/// Checks `text` against [`person_schema`] by hand (an independent check of the
/// grammar the engine followed).
fn assert_person(text: &str) {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {text}"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "name", "pets"], "{text}");
    assert!(
        object["name"]
            .as_str()
            .is_some_and(|n| n.chars().count() <= 20),
        "{text}"
    );
    assert!(
        object["age"].as_u64().is_some_and(|age| age <= 150),
        "{text}"
    );
    let pets = object["pets"].as_array().unwrap();
    assert!(
        pets.len() <= 3 && pets.iter().all(Value::is_string),
        "{text}"
    );
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "Describe a person as JSON with their name, age and pets."}],
        "max_tokens": 80,
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

fn completion(prompt: &str, extra: Value) -> Value {
    let mut body = json!({"prompt": prompt, "max_tokens": 16});
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

async fn texts(server: &Server, path: &str, body: &Value) -> Vec<String> {
    if body["stream"] == json!(true) {
        let payloads = server.post_stream(path, body).await;
        let n = body["n"].as_u64().unwrap_or(1) as usize;
        return (0..n)
            .map(|index| {
                let mut own: Vec<String> = payloads
                    .iter()
                    .filter(|p| {
                        serde_json::from_str::<Value>(p)
                            .is_ok_and(|v| v["choices"][0]["index"] == json!(index))
                    })
                    .cloned()
                    .collect();
                own.push("[DONE]".into());
                streamed_text(&own)
            })
            .collect();
    }
    let (status, answer) = server.post(path, body).await;
    assert_eq!(status, 200, "{answer}");
    let choices = answer["choices"].as_array().unwrap();
    choices
        .iter()
        .map(|choice| text_of(&json!({"choices": [choice]})))
        .collect()
}

/// Whether JSON text has no whitespace outside its strings.
fn is_compact(text: &str) -> bool {
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => in_string = !in_string,
            (false, _, c) if c.is_whitespace() => return false,
            _ => {}
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_follows_each_grammar_alone_and_through_a_pd_router() {
    if !default_model_present() {
        return;
    }
    let alone = Server::start(&["--threads", "1", "--max-model-len", "512"]);
    let prefill = Server::start(&["--threads", "1", "--kv-port", "0", "--max-model-len", "512"]);
    let decode = Server::start(&["--threads", "1", "--max-model-len", "512"]);
    let router =
        Server::start_router(&["--prefill", &prefill.url(""), "--decode", &decode.url("")]);
    let schema_format = json!({"type": "json_schema",
        "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});

    for server in [&alone, &router] {
        // JSON schema, OpenAI's and vLLM's ways, greedy and sampled, whole and streamed.
        let asks = [
            json!({"temperature": 0, "response_format": schema_format}),
            json!({"temperature": 0, "response_format": schema_format, "stream": true}),
            json!({"temperature": 1.0, "seed": 7, "n": 3, "response_format": schema_format}),
            json!({"temperature": 1.0, "seed": 8, "n": 2, "stream": true,
                   "structured_outputs": {"json": person_schema(), "disable_any_whitespace": true}}),
            json!({"temperature": 0.7, "seed": 9, "guided_json": person_schema().to_string()}),
        ];
        for extra in asks {
            for text in texts(server, "/v1/chat/completions", &chat(extra.clone())).await {
                assert_person(&text);
                if extra["structured_outputs"]["disable_any_whitespace"] == json!(true) {
                    assert!(is_compact(&text), "{text}");
                }
            }
        }
        // Any JSON object.
        for text in texts(
            server,
            "/v1/chat/completions",
            &chat(json!({"temperature": 0, "response_format": {"type": "json_object"}})),
        )
        .await
        {
            let value: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(value.is_object(), "{text}");
        }
        // A choice, a regular expression and a Lark grammar, on completions.
        let choices = ["positive", "negative", "neutral"];
        for seed in 0..3 {
            let body = completion(
                "Review: I loved this film. Sentiment:",
                json!({"temperature": 1.0, "seed": seed, "structured_outputs": {"choice": choices}}),
            );
            let text = &texts(server, "/v1/completions", &body).await[0];
            assert!(choices.contains(&text.as_str()), "{text:?}");
        }
        let body = completion(
            "The year the war ended was",
            json!({"temperature": 0.9, "seed": 3,
            "guided_regex": " (1[89]|20)[0-9]{2}"}),
        );
        let text = &texts(server, "/v1/completions", &body).await[0];
        let digits = text.trim_start();
        assert!(text.starts_with(' ') && digits.len() == 4, "{text:?}");
        assert!(
            digits.chars().all(|c| c.is_ascii_digit()) && ("1800".."2100").contains(&digits),
            "{text:?}"
        );
        let lark = "start: item (\", \" item)*\nitem: /[a-z]{1,8}/";
        let body = completion(
            "Three fruits:",
            json!({"temperature": 0.8, "seed": 5, "max_tokens": 24,
            "stream": true, "guided_grammar": lark}),
        );
        let text = &texts(server, "/v1/completions", &body).await[0];
        // Cut at max_tokens, the text may end inside a separator.
        let whole_items = text.trim_end_matches([',', ' ']);
        for item in whole_items.split(", ") {
            assert!(
                (1..=8).contains(&item.len()) && item.chars().all(|c| c.is_ascii_lowercase()),
                "{text:?}"
            );
        }
    }

    // Greedy structured output through P/D is the single worker's, token for token.
    let body = chat(json!({"temperature": 0, "response_format": schema_format}));
    assert_eq!(
        texts(&alone, "/v1/chat/completions", &body).await,
        texts(&router, "/v1/chat/completions", &body).await
    );
}

#[tokio::test]
async fn grammars_that_cannot_be_used_are_refused_by_name() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "1", "--max-model-len", "512"]);
    let refused = [
        (json!({"guided_regex": "[0-9"}), "guided_regex"),
        (
            json!({"guided_grammar": "root ::= \"a\""}),
            "guided_grammar",
        ),
        (
            json!({"guided_grammar": "start: undefined_rule"}),
            "guided_grammar",
        ),
        (
            json!({"structured_outputs": {"json": {"type": "frobnicate"}}}),
            "structured_outputs",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
            "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}}}}),
            "response_format",
        ),
        (
            json!({"structured_outputs": {"choice": [1, 2]}}),
            "structured_outputs.choice",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}),
            "guided_choice",
        ),
    ];
    for (extra, param) in refused {
        let (status, answer) = server
            .post("/v1/completions", &completion("x", extra.clone()))
            .await;
        assert_eq!(status, 400, "{extra}: {answer}");
        assert_eq!(answer["error"]["param"], json!(param), "{extra}: {answer}");
        assert_eq!(answer["error"]["type"], "BadRequestError");
    }
    // The server is unharmed.
    let (status, answer) = server
        .post(
            "/v1/completions",
            &completion("x", json!({"guided_choice": ["a", "b"]})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
}

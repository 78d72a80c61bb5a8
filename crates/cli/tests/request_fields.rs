//! Every field of vLLM's completions and chat requests, sent to a real `tandem serve`
//! with a value that asks for something: the server honours it (200) or refuses it
//! with a 400 that names it. None is silently dropped. The fields are vLLM's
//! (`vllm/entrypoints/openai/*/protocol.py`, 0.26) plus the OpenAI fields vLLM's chat
//! request accepts. Then the sampling fields tandem added are checked by their effect,
//! against greedy outputs of the same server.

mod common;

use common::{Server, default_model_present};
use serde_json::{Value, json};

/// What `tandem serve` does with a field.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Honoured,
    Refused,
}
use Expect::{Honoured, Refused};

/// Fields both endpoints have, with a value that asks for something.
fn shared_fields() -> Vec<(&'static str, Value, Expect)> {
    vec![
        ("frequency_penalty", json!(0.5), Honoured),
        ("presence_penalty", json!(0.5), Honoured),
        ("logit_bias", json!({"100": 5}), Honoured),
        ("max_tokens", json!(3), Honoured),
        ("n", json!(2), Refused),
        ("seed", json!(1), Honoured),
        ("stop", json!(["x"]), Honoured),
        ("stream", json!(true), Honoured),
        // Without `stream`, refused (vLLM's rule), by name.
        ("stream_options", json!({"include_usage": true}), Refused),
        ("temperature", json!(0.5), Honoured),
        ("top_p", json!(0.9), Honoured),
        ("user", json!("u-1"), Honoured),
        ("use_beam_search", json!(true), Refused),
        ("top_k", json!(5), Honoured),
        ("min_p", json!(0.1), Honoured),
        ("repetition_penalty", json!(1.1), Honoured),
        ("length_penalty", json!(0.5), Refused),
        ("stop_token_ids", json!([5]), Honoured),
        ("include_stop_str_in_output", json!(true), Refused),
        ("ignore_eos", json!(true), Honoured),
        ("min_tokens", json!(1), Honoured),
        ("skip_special_tokens", json!(false), Refused),
        ("spaces_between_special_tokens", json!(false), Refused),
        ("truncate_prompt_tokens", json!(5), Refused),
        ("truncation_side", json!("left"), Refused),
        ("allowed_token_ids", json!([1, 2]), Refused),
        ("prompt_logprobs", json!(1), Refused),
        ("logprob_token_ids", json!([1]), Refused),
        ("bad_words", json!(["x"]), Refused),
        ("response_format", json!({"type": "json_object"}), Refused),
        ("structured_outputs", json!({"regex": "a+"}), Refused),
        ("guided_json", json!({"type": "object"}), Refused),
        ("guided_regex", json!("a+"), Refused),
        ("guided_choice", json!(["a", "b"]), Refused),
        ("guided_grammar", json!("root ::= \"a\""), Refused),
        ("guided_decoding_backend", json!("xgrammar"), Refused),
        ("guided_whitespace_pattern", json!(" "), Refused),
        ("priority", json!(1), Refused),
        ("request_id", json!("mine"), Refused),
        ("logits_processors", json!(["x"]), Refused),
        ("return_tokens_as_token_ids", json!(true), Refused),
        ("return_token_ids", json!(true), Honoured),
        ("return_token_offsets", json!(true), Refused),
        ("cache_salt", json!("salt"), Refused),
        ("vllm_xargs", json!({"a": 1}), Refused),
        ("ec_transfer_params", json!({"a": 1}), Refused),
        ("repetition_detection", json!({"n": 3}), Refused),
        ("thinking_token_budget", json!(10), Refused),
        ("prompt_embeds", json!("AAAA"), Refused),
        ("frobnicate", json!(1), Refused),
    ]
}

fn completions_fields() -> Vec<(&'static str, Value, Expect)> {
    let mut fields = shared_fields();
    fields.extend([
        ("echo", json!(true), Refused),
        ("logprobs", json!(1), Refused),
        ("best_of", json!(2), Refused),
        ("suffix", json!("end"), Refused),
        ("add_special_tokens", json!(false), Honoured),
    ]);
    fields
}

fn chat_fields() -> Vec<(&'static str, Value, Expect)> {
    let mut fields = shared_fields();
    fields.extend([
        ("echo", json!(true), Refused),
        ("logprobs", json!(true), Refused),
        ("top_logprobs", json!(2), Refused),
        ("max_completion_tokens", json!(3), Honoured),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
            Refused,
        ),
        ("tool_choice", json!("required"), Refused),
        ("functions", json!([{"name": "f"}]), Refused),
        ("function_call", json!({"name": "f"}), Refused),
        ("parallel_tool_calls", json!(false), Honoured),
        ("reasoning_effort", json!("low"), Refused),
        ("include_reasoning", json!(false), Honoured),
        ("add_generation_prompt", json!(false), Honoured),
        ("add_special_tokens", json!(true), Refused),
        ("documents", json!([{"title": "t", "text": "x"}]), Refused),
        ("chat_template", json!("{{ messages }}"), Refused),
        (
            "chat_template_kwargs",
            json!({"enable_thinking": false}),
            Refused,
        ),
        ("mm_processor_kwargs", json!({"a": 1}), Refused),
        ("store", json!(true), Refused),
        ("metadata", json!({"a": "b"}), Refused),
        ("service_tier", json!("flex"), Refused),
        ("modalities", json!(["audio"]), Refused),
        ("audio", json!({"voice": "x"}), Refused),
        ("prediction", json!({"type": "content"}), Refused),
        ("web_search_options", json!({}), Refused),
        ("verbosity", json!("low"), Refused),
        ("prompt_cache_key", json!("k"), Honoured),
        ("safety_identifier", json!("s"), Honoured),
    ]);
    fields
}

async fn walk(server: &Server, path: &str, base: Value, fields: Vec<(&str, Value, Expect)>) {
    for (field, value, expect) in fields {
        let mut body = base.clone();
        body[field] = value.clone();
        let (status, answer) = server.post(path, &body).await;
        match expect {
            Honoured => assert_eq!(status, 200, "{path} {field}={value}: {answer}"),
            Refused => {
                assert_eq!(
                    status, 400,
                    "{path} {field}={value} must be refused: {answer}"
                );
                assert_eq!(
                    answer["error"]["param"],
                    json!(field),
                    "{path} {field}: the 400 names the field: {answer}"
                );
            }
        }
    }
}

#[tokio::test]
async fn every_vllm_field_is_honoured_or_refused_by_name() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--max-model-len", "512"]);
    walk(
        &server,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 2}),
        completions_fields(),
    )
    .await;
    walk(
        &server,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        chat_fields(),
    )
    .await;

    // Parts of a message the model cannot take are refused where they are.
    let image = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]});
    let (status, answer) = server.post("/v1/chat/completions", &image).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"]["param"], "messages[0].content[1]");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no vision input"),
        "{answer}"
    );
}

/// The ids of a greedy completion of `prompt` with `extra` fields.
async fn completion_ids(server: &Server, prompt: &str, extra: Value) -> (Vec<u64>, Value) {
    let mut body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0,
                          "return_token_ids": true});
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    let (status, answer) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let ids = answer["choices"][0]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap())
        .collect();
    (ids, answer)
}

#[tokio::test]
async fn the_new_sampling_fields_change_the_output_as_vllm_defines_them() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--max-model-len", "512"]);
    // llama.cpp's greedy text for this prompt repeats a sentence (the fixture).
    let prompt = "The capital of France is";
    let (greedy, _) = completion_ids(&server, prompt, json!({})).await;

    // min_p 1 keeps only the most likely token: sampling at temperature 1 is greedy.
    let (min_p, _) = completion_ids(
        &server,
        prompt,
        json!({"temperature": 1.0, "seed": 9, "min_p": 1.0}),
    )
    .await;
    assert_eq!(min_p, greedy);

    // A +100 bias makes a token the greedy choice at every step.
    let (biased, _) = completion_ids(&server, prompt, json!({"logit_bias": {"42": 100}})).await;
    assert!(biased.iter().all(|&id| id == 42), "{biased:?}");

    // The repetition penalty moves the greedy output off what it already said.
    let (penalised, _) = completion_ids(&server, prompt, json!({"repetition_penalty": 1.5})).await;
    assert_ne!(penalised, greedy);

    // A short answer that ends itself, then the same held to 8 tokens more.
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Say hi."}],
                              "max_tokens": 64, "temperature": 0});
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        body
    };
    let (_, short) = server.post("/v1/chat/completions", &chat(json!({}))).await;
    let short_tokens = short["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(short["choices"][0]["finish_reason"], "stop", "{short}");
    let min_tokens = short_tokens + 8;
    let (_, held) = server
        .post(
            "/v1/chat/completions",
            &chat(json!({"min_tokens": min_tokens})),
        )
        .await;
    assert!(
        held["usage"]["completion_tokens"].as_u64().unwrap() >= min_tokens,
        "{held}"
    );
}

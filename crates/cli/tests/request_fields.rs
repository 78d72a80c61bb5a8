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
        ("n", json!(2), Honoured),
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
        ("include_stop_str_in_output", json!(true), Honoured),
        ("ignore_eos", json!(true), Honoured),
        ("min_tokens", json!(1), Honoured),
        ("skip_special_tokens", json!(false), Honoured),
        ("spaces_between_special_tokens", json!(false), Refused),
        ("truncate_prompt_tokens", json!(5), Refused),
        ("truncation_side", json!("left"), Refused),
        ("allowed_token_ids", json!([1, 2]), Refused),
        ("prompt_logprobs", json!(1), Honoured),
        ("logprob_token_ids", json!([1]), Refused),
        ("bad_words", json!(["x"]), Refused),
        ("response_format", json!({"type": "json_object"}), Honoured),
        ("structured_outputs", json!({"regex": "a+"}), Honoured),
        ("guided_json", json!({"type": "object"}), Honoured),
        ("guided_regex", json!("a+"), Honoured),
        ("guided_choice", json!(["a", "b"]), Honoured),
        ("guided_grammar", json!("start: \"a\""), Honoured),
        // A GBNF grammar is refused (the grammar syntax is llguidance's Lark).
        ("guided_grammar", json!("root ::= \"a\""), Refused),
        // The backend is llguidance; asking for xgrammar is refused by name.
        ("guided_decoding_backend", json!("xgrammar"), Refused),
        ("guided_decoding_backend", json!("guidance"), Honoured),
        ("guided_whitespace_pattern", json!(" "), Honoured),
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
        ("echo", json!(true), Honoured),
        ("logprobs", json!(1), Honoured),
        ("logprobs", json!(21), Refused),
        ("best_of", json!(2), Honoured),
        ("n", json!(65), Refused),
        ("suffix", json!("end"), Refused),
        ("add_special_tokens", json!(false), Honoured),
    ]);
    fields
}

fn chat_fields() -> Vec<(&'static str, Value, Expect)> {
    let mut fields = shared_fields();
    fields.extend([
        ("echo", json!(true), Refused),
        ("logprobs", json!(true), Honoured),
        // Without `logprobs: true`, refused (vLLM's rule), by name.
        ("top_logprobs", json!(2), Refused),
        ("max_completion_tokens", json!(3), Honoured),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
            Honoured,
        ),
        // Without `tools`, there is nothing to call: refused by name.
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

    // echo: the prompt's text, then the output; streamed, with the first output.
    let (_, plain) = server
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 5, "temperature": 0}),
        )
        .await;
    let output = plain["choices"][0]["text"].as_str().unwrap();
    let echoed = json!({"prompt": prompt, "max_tokens": 5, "temperature": 0, "echo": true});
    let (_, whole) = server.post("/v1/completions", &echoed).await;
    assert_eq!(whole["choices"][0]["text"], format!("{prompt}{output}"));
    let mut streamed = echoed.clone();
    streamed["stream"] = json!(true);
    let payloads = server.post_stream("/v1/completions", &streamed).await;
    assert_eq!(
        common::streamed_text(&payloads),
        format!("{prompt}{output}")
    );
    let first: Value = serde_json::from_str(&payloads[0]).unwrap();
    assert!(first["choices"][0]["text"].as_str().unwrap().len() > prompt.len());
    // echo with logprobs: the prompt's tokens first (the first with no log
    // probability), then the output's, each as a request without echo reports it.
    let scored = json!({"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 1});
    let (_, unechoed) = server.post("/v1/completions", &scored).await;
    let unechoed = &unechoed["choices"][0]["logprobs"];
    let mut echoed = scored.clone();
    echoed["echo"] = json!(true);
    let (status, whole) = server.post("/v1/completions", &echoed).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["choices"][0]["text"], format!("{prompt}{output}"));
    let logprobs = &whole["choices"][0]["logprobs"];
    let prompt_tokens = whole["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let tokens = logprobs["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), prompt_tokens + 5);
    assert_eq!(
        tokens[prompt_tokens..],
        unechoed["tokens"].as_array().unwrap()[..]
    );
    assert_eq!(
        tokens[..prompt_tokens]
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        prompt
    );
    assert_eq!(logprobs["token_logprobs"][0], Value::Null);
    assert_eq!(logprobs["top_logprobs"][0], Value::Null);
    assert_eq!(logprobs["text_offset"][0], json!(0));
    for (position, logprob) in unechoed["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let echoed = logprobs["token_logprobs"][prompt_tokens + position]
            .as_f64()
            .unwrap();
        // The same logits, computed in a prompt's batch or a decode step.
        assert!(
            (echoed - logprob.as_f64().unwrap()).abs() < 1e-3,
            "{logprobs}"
        );
    }
    for position in 1..prompt_tokens {
        let logprob = logprobs["token_logprobs"][position].as_f64().unwrap();
        assert!(logprob < 0.0 && logprobs["top_logprobs"][position].is_object());
    }
    // The prompt is computed again, not taken from the prefix cache: the same answer.
    let (_, again) = server.post("/v1/completions", &echoed).await;
    assert_eq!(again["choices"][0]["logprobs"], *logprobs);
    echoed["stream"] = json!(true);
    let payloads = server.post_stream("/v1/completions", &echoed).await;
    let mut streamed_tokens = Vec::new();
    let mut streamed_logprobs = Vec::new();
    for payload in &payloads[..payloads.len() - 1] {
        let chunk: Value = serde_json::from_str(payload).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(tokens) = choice["logprobs"]["tokens"].as_array() {
            streamed_tokens.extend(tokens.iter().cloned());
            streamed_logprobs.extend(
                choice["logprobs"]["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .cloned(),
            );
        }
    }
    assert_eq!(streamed_tokens, *tokens);
    assert_eq!(Value::from(streamed_logprobs), logprobs["token_logprobs"]);

    // continuous_usage_stats: every chunk carries its usage so far, ending at the total.
    let continuous = json!({"prompt": prompt, "max_tokens": 5, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true,
                                           "continuous_usage_stats": true}});
    let payloads = server.post_stream("/v1/completions", &continuous).await;
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let counts: Vec<u64> = chunks
        .iter()
        .map(|chunk| {
            chunk["usage"]["completion_tokens"]
                .as_u64()
                .expect("usage on every chunk")
        })
        .collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    assert_eq!(counts.last(), Some(&5));
    assert_eq!(
        chunks[0]["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );

    // include_stop_str_in_output: the output ends with the stop string that ended it.
    let stop = output.split_whitespace().next().unwrap().to_owned();
    let stopped = |include: bool| {
        json!({"prompt": prompt, "max_tokens": 5, "temperature": 0, "stop": [stop],
               "include_stop_str_in_output": include})
    };
    let (_, without) = server.post("/v1/completions", &stopped(false)).await;
    let (_, with) = server.post("/v1/completions", &stopped(true)).await;
    let without = without["choices"][0]["text"].as_str().unwrap();
    assert_eq!(with["choices"][0]["text"], format!("{without}{stop}"));
    assert_eq!(with["choices"][0]["stop_reason"], json!(stop));

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

#[tokio::test]
async fn n_choices_are_the_seeded_single_choices_and_the_prompt_counts_once() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--max-model-len", "512"]);
    let body = |n: u64, seed: u64| {
        json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0,
               "seed": seed, "n": n})
    };
    let (status, three) = server.post("/v1/completions", &body(3, 5)).await;
    assert_eq!(status, 200, "{three}");
    let choices = three["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut completion_tokens = 0;
    let mut prompt_tokens = 0;
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        // Choice i samples with seed + i: the single request with that seed.
        let (_, single) = server.post("/v1/completions", &body(1, 5 + i as u64)).await;
        assert_eq!(choice["text"], single["choices"][0]["text"], "choice {i}");
        completion_tokens += single["usage"]["completion_tokens"].as_u64().unwrap();
        prompt_tokens = single["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    assert_eq!(
        three["usage"]["prompt_tokens"], prompt_tokens,
        "the prompt counts once"
    );
    assert_eq!(three["usage"]["completion_tokens"], completion_tokens);

    // best_of: the n candidates (seeded as n choices are) with the highest mean log
    // probability per token, most likely first; every candidate's output counts.
    let mut candidates = body(4, 9);
    candidates["logprobs"] = json!(0);
    let (_, all) = server.post("/v1/completions", &candidates).await;
    let mut ranked: Vec<(f64, String)> = all["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|choice| {
            let logprobs = choice["logprobs"]["token_logprobs"].as_array().unwrap();
            let sum: f64 = logprobs.iter().map(|lp| lp.as_f64().unwrap()).sum();
            (
                sum / logprobs.len() as f64,
                choice["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut best = body(2, 9);
    best["best_of"] = json!(4);
    let (status, answer) = server.post("/v1/completions", &best).await;
    assert_eq!(status, 200, "{answer}");
    let texts: Vec<&str> = answer["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|choice| choice["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, [ranked[0].1.as_str(), ranked[1].1.as_str()]);
    assert_eq!(answer["choices"][1]["index"], 1);
    assert_eq!(
        answer["choices"][0]["logprobs"],
        Value::Null,
        "not asked for"
    );
    assert_eq!(
        answer["usage"]["completion_tokens"],
        all["usage"]["completion_tokens"]
    );
    for (refused, field) in [
        (json!({"best_of": 1, "n": 2}), "best_of"),
        (json!({"best_of": 65}), "best_of"),
        (json!({"best_of": 2, "stream": true}), "best_of"),
    ] {
        let mut body = json!({"prompt": "x", "max_tokens": 2});
        body.as_object_mut()
            .unwrap()
            .extend(refused.as_object().unwrap().clone());
        let (status, error) = server.post("/v1/completions", &body).await;
        assert_eq!(
            (status, &error["error"]["param"]),
            (400, &json!(field)),
            "{body}"
        );
    }

    // Streamed chat: a role chunk per choice, then each choice's text under its index.
    let chat = json!({"messages": [{"role": "user", "content": "Name a colour."}],
                      "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 2,
                      "stream": true, "stream_options": {"include_usage": true}});
    let payloads = server.post_stream("/v1/chat/completions", &chat).await;
    let mut texts = [String::new(), String::new()];
    let mut roles = 0;
    for payload in &payloads[..payloads.len() - 1] {
        let chunk: Value = serde_json::from_str(payload).unwrap();
        for choice in chunk["choices"].as_array().unwrap() {
            let index = choice["index"].as_u64().unwrap() as usize;
            roles += usize::from(choice["delta"].get("role").is_some());
            texts[index].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(roles, 2);
    let mut whole = chat.clone();
    whole["stream"] = json!(false);
    whole.as_object_mut().unwrap().remove("stream_options");
    let (_, answer) = server.post("/v1/chat/completions", &whole).await;
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(answer["choices"][i]["message"]["content"], json!(text));
    }
}

#[tokio::test]
async fn greedy_logprobs_rank_and_space_tokens_as_llamacpps_logits_do() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--max-model-len", "512"]);
    let fixture = common::llamacpp_fixture();
    let mut names = std::collections::HashMap::new();
    for case in fixture["generation"].as_array().unwrap() {
        // The engine's own fixture test holds greedy tokens equal for 16 positions.
        let positions = 16;
        let body = json!({"prompt": case["prompt_ids"], "max_tokens": positions,
                          "temperature": 0, "logprobs": 5});
        let (status, answer) = server.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        let logprobs = &answer["choices"][0]["logprobs"];
        let tops = logprobs["top_logprobs"].as_array().unwrap();
        assert_eq!(tops.len(), positions);
        // llama.cpp's logits cover every position of prompt and output; the one that
        // predicts output token j is the prompt's last position plus j.
        let first = case["prompt_ids"].as_array().unwrap().len() - 1;
        for (position, top) in tops.iter().enumerate() {
            let reference = case["top5_logits_per_position"][first + position]
                .as_array()
                .unwrap();
            let logit = |i: usize| reference[i][1].as_f64().unwrap();
            let mut name = async |id: &Value| -> String {
                let id = id.as_u64().unwrap();
                if let Some(name) = names.get(&id) {
                    return String::clone(name);
                }
                let (_, text) = server.post("/detokenize", &json!({"tokens": [id]})).await;
                let name = text["prompt"].as_str().unwrap().to_owned();
                names.insert(id, name.clone());
                name
            };
            let best = name(&reference[0][0]).await;
            let best_logprob = top[&best]
                .as_f64()
                .unwrap_or_else(|| panic!("position {position}: {best:?} not in {top}"));
            assert_eq!(
                logprobs["token_logprobs"][position].as_f64(),
                Some(best_logprob),
                "position {position}: the sampled token is llama.cpp's top one"
            );
            for (i, entry) in reference.iter().enumerate().skip(1) {
                let other = name(&entry[0]).await;
                let Some(logprob) = top[&other].as_f64() else {
                    continue; // Another token nearly tied with it took its place.
                };
                // Log probabilities differ as the logits do; llama.cpp's logits carry
                // ~0.15 of noise (the engine's fixture test), so 0.5 is generous.
                let ours = best_logprob - logprob;
                let theirs = logit(0) - logit(i);
                assert!(
                    (ours - theirs).abs() < 0.5,
                    "position {position}, {other:?}: {ours} vs llama.cpp's {theirs}"
                );
            }
        }
        let total: f64 = tops[0]
            .as_object()
            .unwrap()
            .values()
            .map(|lp| lp.as_f64().unwrap().exp())
            .sum();
        assert!(
            total <= 1.0 + 1e-4,
            "probabilities of the top tokens sum to {total}"
        );
    }

    // Chat's shape, streamed: one entry per token, each with its top alternatives.
    let chat = json!({"messages": [{"role": "user", "content": "Name a colour."}],
                      "max_tokens": 6, "temperature": 0, "logprobs": true,
                      "top_logprobs": 3, "stream": true});
    let payloads = server.post_stream("/v1/chat/completions", &chat).await;
    let mut entries = Vec::new();
    for payload in &payloads[..payloads.len() - 1] {
        let chunk: Value = serde_json::from_str(payload).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(content) = choice["logprobs"]["content"].as_array() {
            entries.extend(content.iter().cloned());
        }
    }
    assert_eq!(entries.len(), 6, "{payloads:?}");
    for entry in &entries {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(
            top[0]["token"], entry["token"],
            "greedy: the top token is the one chosen"
        );
        assert!(entry["bytes"].is_array());
    }
}

#[tokio::test]
async fn echoed_prompt_logprobs_rank_as_llamacpps_logits_do() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--max-model-len", "1024"]);
    let fixture = common::llamacpp_fixture();
    let mut deviations = Vec::new();
    for case in fixture["generation"].as_array().unwrap() {
        let prompt_ids = case["prompt_ids"].as_array().unwrap();
        // lm-eval's log-likelihood request: token ids, echo, one output token.
        let body = json!({"prompt": [prompt_ids], "max_tokens": 1, "temperature": 0,
                          "echo": true, "logprobs": 5});
        let (status, answer) = server.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        assert!(!answer["choices"][0]["text"].as_str().unwrap().is_empty());
        let logprobs = &answer["choices"][0]["logprobs"];
        let tops = logprobs["top_logprobs"].as_array().unwrap();
        assert_eq!(tops.len(), prompt_ids.len() + 1);
        assert_eq!(tops[0], Value::Null);
        // Top entry `p` predicts token `p` from the ones before it: llama.cpp's
        // position `p - 1`.
        for (p, top) in tops.iter().enumerate().skip(1) {
            let reference = case["top5_logits_per_position"][p - 1].as_array().unwrap();
            let logit = |i: usize| reference[i][1].as_f64().unwrap();
            let top = top.as_object().unwrap();
            let mut ours = Vec::new();
            for entry in reference {
                let (_, text) = server
                    .post("/detokenize", &json!({"tokens": [entry[0]]}))
                    .await;
                ours.push(
                    top.get(text["prompt"].as_str().unwrap())
                        .and_then(Value::as_f64),
                );
            }
            let best = top
                .values()
                .filter_map(Value::as_f64)
                .fold(f64::MIN, f64::max);
            if logit(0) - logit(1) > 0.5 {
                assert_eq!(
                    ours[0],
                    Some(best),
                    "case {}, position {p}: {top:?}",
                    case["prompt"]
                );
            }
            // Log probabilities differ as llama.cpp's logits do, within its noise:
            // llama.cpp rounds activations to 8 bits for its quantized products
            // (seen here: median 0.12, worst 0.66 on long chat prompts).
            for i in 1..reference.len() {
                if let (Some(first), Some(other)) = (ours[0], ours[i]) {
                    let (mine, theirs) = (first - other, logit(0) - logit(i));
                    assert!(
                        (mine - theirs).abs() < 1.0,
                        "position {p}: {mine} vs {theirs}"
                    );
                    deviations.push((mine - theirs).abs());
                }
            }
        }
        // The prompt's own token at each position is reported with its log
        // probability, one of the top entries whenever llama.cpp ranks it there.
        for (p, id) in prompt_ids.iter().enumerate().skip(1) {
            let reference = case["top5_logits_per_position"][p - 1].as_array().unwrap();
            let logprob = logprobs["token_logprobs"][p].as_f64().unwrap();
            if reference.iter().any(|entry| entry[0] == *id) {
                let (_, text) = server.post("/detokenize", &json!({"tokens": [id]})).await;
                let name = text["prompt"].as_str().unwrap();
                assert_eq!(tops[p][name].as_f64(), Some(logprob), "position {p}");
            }
        }
        let output = logprobs["tokens"][prompt_ids.len()].clone();
        let (_, greedy) = server
            .post("/detokenize", &json!({"tokens": [case["greedy_ids"][0]]}))
            .await;
        assert_eq!(
            output, greedy["prompt"],
            "the output is llama.cpp's greedy token"
        );
    }
    assert!(
        deviations.len() > 100,
        "only {} gaps compared",
        deviations.len()
    );
    let mean = deviations.iter().sum::<f64>() / deviations.len() as f64;
    assert!(
        mean < 0.2,
        "log-probability gaps off llama.cpp's by {mean} on average"
    );

    // A long prompt is computed in chunks (256 positions a step when every position's
    // logits are kept): each position's top tokens are those a request ending there
    // gets for its first output token, computed in one piece.
    let long: Vec<u32> = (0..600).map(|i| 300 + (i * 37) % 5000).collect();
    let body = json!({"prompt": long, "max_tokens": 1, "echo": true, "logprobs": 3});
    let (status, whole) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    let tops = &whole["choices"][0]["logprobs"]["top_logprobs"];
    for end in [100, 255, 256, 257, 300, 512, 513, 599] {
        let body = json!({"prompt": &long[..end], "max_tokens": 1, "temperature": 0,
                          "logprobs": 3});
        let (_, next) = server.post("/v1/completions", &body).await;
        let expected = next["choices"][0]["logprobs"]["top_logprobs"][0]
            .as_object()
            .unwrap();
        let echoed = tops[end].as_object().unwrap();
        for (token, logprob) in expected {
            let echoed = echoed.get(token).and_then(Value::as_f64);
            let logprob = logprob.as_f64().unwrap();
            assert!(
                echoed.is_some_and(|echoed| (echoed - logprob).abs() < 1e-3),
                "position {end}, {token:?}: {echoed:?} vs {logprob}"
            );
        }
    }
}

#[tokio::test]
async fn vllms_prompt_logprobs_are_the_echoed_ones_in_vllms_shape() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--max-model-len", "512"]);
    let prompt = "The capital of France is";
    let echoed = json!({"prompt": prompt, "max_tokens": 2, "temperature": 0,
                        "echo": true, "logprobs": 1});
    let (_, echoed) = server.post("/v1/completions", &echoed).await;
    let echoed = &echoed["choices"][0]["logprobs"]["token_logprobs"];
    // Both asked for: each keeps its own number of top tokens.
    let body = json!({"prompt": prompt, "max_tokens": 2, "temperature": 0,
                      "prompt_logprobs": 3, "echo": true, "logprobs": 1});
    let (status, answer) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let choice = &answer["choices"][0];
    assert_eq!(choice["logprobs"]["token_logprobs"], *echoed);
    assert!(
        choice["logprobs"]["top_logprobs"][1]
            .as_object()
            .unwrap()
            .len()
            <= 2
    );
    let (_, tokenized) = server.post("/tokenize", &json!({"prompt": prompt})).await;
    let ids = tokenized["tokens"].as_array().unwrap();
    let positions = choice["prompt_logprobs"].as_array().unwrap();
    assert_eq!(positions.len(), ids.len());
    assert_eq!(positions[0], Value::Null);
    for (p, entries) in positions.iter().enumerate().skip(1) {
        let entries = entries.as_object().unwrap();
        let own = &entries[&ids[p].to_string()];
        assert_eq!(own["logprob"], echoed[p], "position {p}");
        let rank = own["rank"].as_u64().unwrap();
        assert!(rank >= 1);
        let mut tops: Vec<_> = entries
            .values()
            .map(|e| (e["rank"].as_u64().unwrap(), e["logprob"].as_f64().unwrap()))
            .collect();
        tops.sort_by_key(|&(rank, _)| rank);
        assert_eq!(tops[0].0, 1, "the most likely token is listed: {entries:?}");
        assert!(
            tops.windows(2).all(|w| w[0].1 >= w[1].1),
            "ranked by logprob: {tops:?}"
        );
        assert!(
            entries.len() == 3 || (entries.len() == 4 && rank > 3),
            "{entries:?}"
        );
        let name = &own["decoded_token"];
        let (_, text) = server
            .post("/detokenize", &json!({"tokens": [ids[p]]}))
            .await;
        assert_eq!(*name, text["prompt"]);
    }
    // Chat: on the response, for the templated prompt.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                      "prompt_logprobs": 0});
    let (status, answer) = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{answer}");
    let positions = answer["prompt_logprobs"].as_array().unwrap();
    assert_eq!(
        positions.len() as u64,
        answer["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert!(
        positions[1..]
            .iter()
            .all(|entries| entries.as_object().unwrap().len() == 1)
    );
    for (body, endpoint) in [
        (
            json!({"prompt": "x", "prompt_logprobs": 1, "stream": true}),
            "/v1/completions",
        ),
        (
            json!({"prompt": "x", "prompt_logprobs": -1}),
            "/v1/completions",
        ),
        (
            json!({"prompt": "x", "prompt_logprobs": 21}),
            "/v1/completions",
        ),
        (
            json!({"messages": [], "prompt_logprobs": "all"}),
            "/v1/chat/completions",
        ),
    ] {
        let (status, error) = server.post(endpoint, &body).await;
        assert_eq!(
            (status, &error["error"]["param"]),
            (400, &json!("prompt_logprobs")),
            "{body}"
        );
    }
}

/// A prompt of several KV blocks (16 tokens each, the default).
const LONG_PROMPT: &str = "The history of the city goes back to a small fishing village on \
    the banks of a wide river, where traders from the north met farmers from the south \
    every spring to exchange grain, salt and cloth.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_and_logprobs_come_through_a_pd_router_as_from_one_worker() {
    if !default_model_present() {
        return;
    }
    let alone = Server::start(&["--threads", "1", "--max-model-len", "512"]);
    let prefill = Server::start(&["--threads", "1", "--kv-port", "0", "--max-model-len", "512"]);
    let decode = Server::start(&["--threads", "1", "--max-model-len", "512"]);
    let router =
        Server::start_router(&["--prefill", &prefill.url(""), "--decode", &decode.url("")]);
    let requests = [
        // Handed from P to D: the decode worker's logprobs.
        json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
               "logprobs": 3}),
        // Several choices decode from one prefilled prompt: the first pulls its KV, the
        // others find it in the decode worker's prefix cache.
        json!({"prompt": LONG_PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 11,
               "n": 3}),
        json!({"prompt": LONG_PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 5,
               "best_of": 3, "n": 2}),
        // The prompt's log probabilities come from computing it: on the decode worker.
        json!({"prompt": [[504, 3575, 282, 4649, 314]], "max_tokens": 1, "temperature": 0,
               "echo": true, "logprobs": 1}),
    ];
    for body in &requests {
        let (status, direct) = alone.post("/v1/completions", body).await;
        assert_eq!(status, 200, "{direct}");
        let (status, routed) = router.post("/v1/completions", body).await;
        assert_eq!(status, 200, "{routed}");
        assert_eq!(
            routed["choices"].as_array().unwrap().len(),
            direct["choices"].as_array().unwrap().len()
        );
        for (a, b) in routed["choices"]
            .as_array()
            .unwrap()
            .iter()
            .zip(direct["choices"].as_array().unwrap())
        {
            assert_eq!(a["text"], b["text"], "{body}");
            assert_eq!(a["logprobs"]["tokens"], b["logprobs"]["tokens"], "{body}");
            assert_eq!(
                a["logprobs"]["token_logprobs"],
                b["logprobs"]["token_logprobs"]
            );
        }
    }
    let metrics = router.metrics().await;
    let decided =
        |decision: &str, reason: &str| common::disagg_decisions(&metrics, decision, reason);
    assert_eq!(decided("remote", "always"), Some(3.0));
    // The prefill worker computed each prompt once; the decode worker pulled it once
    // per request and its other sequences (2 + 2) took its full blocks from the cache.
    let hits = common::metric_value(&decode.metrics().await, "vllm:prefix_cache_hits_total");
    let full_blocks = |tokens: f64| (tokens / 16.0).floor() * 16.0;
    let (_, tokenized) = alone
        .post("/tokenize", &json!({"prompt": LONG_PROMPT}))
        .await;
    let prompt_tokens = tokenized["count"].as_f64().unwrap();
    assert!(
        hits.unwrap_or(0.0) >= 4.0 * full_blocks(prompt_tokens - 1.0),
        "prefix cache hits {hits:?} for a {prompt_tokens}-token prompt"
    );
    assert_eq!(decided("local", "prompt_logprobs"), Some(1.0));
    // lm-eval's `tokenizer_backend=remote` reads the tokenizer through the router.
    let info: Value = reqwest::get(router.url("/tokenizer_info"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["eos_token"], "<|im_end|>");
    assert!(info["chat_template"].as_str().unwrap().contains("im_start"));
}

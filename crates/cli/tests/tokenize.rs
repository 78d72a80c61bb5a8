//! `tandem serve`'s `/tokenize` and `/detokenize`, and the router's client for them
//! (`tandem_router::prompt_tokens`), against a real server on the default model:
//! text prompts tokenize to llama.cpp's ids (the independent reference), a
//! conversation to the ids its chat completion is fed, ids detokenize back to the
//! text, and bad bodies get OpenAI errors with the right status. Answers with
//! `return_token_ids` carry the same ids.

mod common;

use std::time::Duration;

use common::{Server, assert_error, default_model_present};
use serde_json::{Map, Value, json};
use tandem_router::disagg::Endpoint;
use tandem_router::prompt_tokens::{PromptTokens, PromptTokensError};
use tandem_router::secret::Secret;
use tandem_router::tokens::TokenCounter;

const MAX_MODEL_LEN: usize = 256;
const WORKER_KEY: &str = "tokenize-test-worker-key";

fn start_server(extra: &[&str]) -> Server {
    let max_model_len = MAX_MODEL_LEN.to_string();
    let mut args = vec![
        "--threads",
        "2",
        "--served-model-name",
        "smol",
        "--max-model-len",
        &max_model_len,
        "--kv-cache-memory",
        "64MiB",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// llama.cpp's tokenizations of the default model: (text, ids).
fn llamacpp_tokenizations() -> Vec<(String, Vec<u32>)> {
    let fixture = common::llamacpp_fixture();
    fixture["tokenizer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let text = case["text"].as_str().unwrap().to_owned();
            (text, serde_json::from_value(case["ids"].clone()).unwrap())
        })
        .collect()
}

fn conversation() -> Value {
    json!([
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Name a colour."}
    ])
}

#[tokio::test]
async fn prompts_tokenize_as_llamacpp_does_and_detokenize_back() {
    if !default_model_present() {
        return;
    }
    let server = start_server(&[]);
    for (text, ids) in llamacpp_tokenizations() {
        let (status, answer) = server
            .post("/tokenize", &json!({"model": "smol", "prompt": text}))
            .await;
        if text.is_empty() {
            // Refused as /v1/completions refuses it: the same function decides.
            assert_error(status, &answer, 400);
            continue;
        }
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["tokens"], json!(ids), "{text:?}");
        assert_eq!(answer["count"], json!(ids.len()));
        assert_eq!(answer["max_model_len"], json!(MAX_MODEL_LEN));
        assert_eq!(answer["token_strs"], Value::Null);

        let (status, back) = server.post("/detokenize", &json!({"tokens": ids})).await;
        assert_eq!(status, 200, "{back}");
        assert_eq!(back, json!({"prompt": text}));
    }

    let body = json!({"prompt": "Hello, world!", "return_token_strs": true});
    let (_, answer) = server.post("/tokenize", &body).await;
    assert_eq!(answer["token_strs"], json!(["Hello", ",", "Ġworld", "!"]));
    let body = json!({"prompt": "Hello", "add_special_tokens": false});
    let (status, answer) = server.post("/tokenize", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["count"], 1);
}

#[tokio::test]
async fn chat_tokenizes_to_what_its_chat_completion_is_fed() {
    if !default_model_present() {
        return;
    }
    let server = start_server(&[]);
    let (status, tokenized) = server
        .post("/tokenize", &json!({"messages": conversation()}))
        .await;
    assert_eq!(status, 200, "{tokenized}");
    let ids = tokenized["tokens"].clone();

    let chat = json!({"messages": conversation(), "max_tokens": 6, "temperature": 0});
    let (status, completion) = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["usage"]["prompt_tokens"], tokenized["count"]);
    // The same ids as a completions prompt give the same greedy text: they are what
    // the chat completion fed the model.
    let same = json!({"prompt": ids, "max_tokens": 6, "temperature": 0});
    let (status, by_ids) = server.post("/v1/completions", &same).await;
    assert_eq!(status, 200, "{by_ids}");
    assert_eq!(
        by_ids["choices"][0]["text"],
        completion["choices"][0]["message"]["content"]
    );
    let (_, text) = server.post("/detokenize", &json!({"tokens": ids})).await;
    assert_eq!(
        text["prompt"],
        "<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    );

    // Without the generation prompt, both endpoints agree again.
    let (_, bare) = server
        .post(
            "/tokenize",
            &json!({"messages": conversation(), "add_generation_prompt": false}),
        )
        .await;
    let chat = json!({"messages": conversation(), "max_tokens": 1,
        "add_generation_prompt": false});
    let (status, completion) = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["usage"]["prompt_tokens"], bare["count"]);
    assert!(bare["count"].as_u64() < tokenized["count"].as_u64());
}

#[tokio::test]
async fn bad_bodies_get_openai_errors() {
    if !default_model_present() {
        return;
    }
    let server = start_server(&[]);
    let messages = conversation();
    let cases = [
        (
            json!({"prompt": "a", "messages": messages}),
            400,
            Some("messages"),
        ),
        (json!({"model": "smol"}), 400, None),
        (json!({"prompt": 5}), 400, None),
        (json!({"prompt": ["a", "b"]}), 400, None),
        (json!({"messages": "hi"}), 400, None),
        (
            json!({"prompt": "a", "add_special_tokens": "yes"}),
            400,
            None,
        ),
        (
            json!({"prompt": "a", "add_special_token": false}),
            400,
            Some("add_special_token"),
        ),
        (
            json!({"prompt": "a", "messages_": []}),
            400,
            Some("messages_"),
        ),
        (
            json!({"messages": messages, "max_tokens": 3}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"messages": messages, "tools": [{"type": "function"}]}),
            400,
            Some("tools"),
        ),
        (
            json!({"messages": messages, "chat_template_kwargs": {"enable_thinking": true}}),
            400,
            Some("chat_template_kwargs"),
        ),
        (
            json!({"messages": messages, "continue_final_message": true}),
            400,
            Some("continue_final_message"),
        ),
        (json!({"messages": []}), 400, Some("messages")),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages"),
        ),
        (json!({"prompt": "a", "model": "gpt-4"}), 404, Some("model")),
        (
            json!({"messages": messages, "model": "gpt-4"}),
            404,
            Some("model"),
        ),
        (json!([1, 2]), 400, None),
    ];
    for (body, status_wanted, param) in cases {
        let (status, answer) = server.post("/tokenize", &body).await;
        assert_error(status, &answer, status_wanted);
        if let Some(param) = param {
            assert_eq!(answer["error"]["param"], param, "{body} -> {answer}");
        }
    }
    let too_long = "word ".repeat(MAX_MODEL_LEN * 2);
    let (status, answer) = server.post("/tokenize", &json!({"prompt": too_long})).await;
    assert_error(status, &answer, 400);

    let cases = [
        (json!({"tokens": [49152]}), 400, Some("tokens")),
        (json!({"tokens": [4294967295u32]}), 400, Some("tokens")),
        (json!({"tokens": [-1]}), 400, None),
        (json!({"tokens": ["a"]}), 400, None),
        (
            json!({"tokens": [1], "skip_special_tokens": true}),
            400,
            Some("skip_special_tokens"),
        ),
        (
            json!({"tokens": vec![1; MAX_MODEL_LEN + 1]}),
            400,
            Some("tokens"),
        ),
        (json!({}), 400, None),
        (json!({"tokens": [1], "model": "gpt-4"}), 404, Some("model")),
    ];
    for (body, status_wanted, param) in cases {
        let (status, answer) = server.post("/detokenize", &body).await;
        assert_error(status, &answer, status_wanted);
        if let Some(param) = param {
            assert_eq!(answer["error"]["param"], param, "{body} -> {answer}");
        }
    }
    let (status, answer) = server.post_raw("/tokenize", "{\"prompt\":".into()).await;
    assert_error(status, &answer, 400);
    let status = server
        .client
        .get(server.url("/tokenize"))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 405);
}

fn object(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

#[tokio::test]
async fn the_routers_client_learns_the_ids_the_worker_feeds_its_model() {
    if !default_model_present() {
        return;
    }
    let server = start_server(&["--api-key", WORKER_KEY]);
    let base = server.url("");
    let client = reqwest::Client::new();
    let key = Secret::new(WORKER_KEY);
    let estimate = TokenCounter::Estimate;
    let tokens = PromptTokens {
        local: &estimate,
        client: &client,
        worker_key: Some(&key),
        timeout: Duration::from_secs(30),
    };

    // /tokenize is behind the worker's key.
    let unauthorized = client
        .post(format!("{base}/tokenize"))
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    for (text, ids) in llamacpp_tokenizations()
        .into_iter()
        .filter(|(text, _)| !text.is_empty())
    {
        let body = object(json!({"prompt": text, "max_tokens": 1}));
        let learnt = tokens
            .for_request(Endpoint::Completions, &body, &base)
            .await;
        assert_eq!(learnt.unwrap(), Some(ids), "{text:?}");
    }

    let chat = json!({"model": "smol", "messages": conversation(), "max_tokens": 1,
        "temperature": 0});
    let learnt = tokens
        .for_request(Endpoint::Chat, &object(chat.clone()), &base)
        .await
        .unwrap()
        .expect("a chat request has one prompt");
    let answer = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(WORKER_KEY)
        .json(&chat)
        .send()
        .await
        .unwrap();
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["usage"]["prompt_tokens"], json!(learnt.len()));

    let ids = object(json!({"prompt": [1, 2, 3]}));
    let known = tokens.for_request(Endpoint::Completions, &ids, "http://127.0.0.1:9");
    assert_eq!(known.await.unwrap(), Some(vec![1, 2, 3]));
    let many = object(json!({"prompt": ["a", "b"]}));
    let none = tokens
        .for_request(Endpoint::Completions, &many, &base)
        .await;
    assert_eq!(none.unwrap(), None);

    let wrong_key = Secret::new("not-the-key");
    let refused = PromptTokens {
        worker_key: Some(&wrong_key),
        ..tokens
    };
    let error = refused
        .for_request(Endpoint::Chat, &object(chat), &base)
        .await
        .unwrap_err();
    assert!(
        matches!(error, PromptTokensError::Status { status: 401 }),
        "{error}"
    );
}

/// The ids of every chunk's choice, the prompt ids seen, and the text.
fn streamed_ids(payloads: &[String]) -> (Vec<u64>, Vec<Value>, String) {
    let (mut ids, mut prompts) = (Vec::new(), Vec::new());
    for payload in &payloads[..payloads.len() - 1] {
        let chunk: Value = serde_json::from_str(payload).unwrap();
        prompts.extend(chunk.get("prompt_token_ids").cloned());
        for choice in chunk["choices"].as_array().unwrap() {
            prompts.extend(choice.get("prompt_token_ids").cloned());
            if choice["delta"].get("role").is_some() {
                // vLLM's chat role chunk carries no output.
                continue;
            }
            let chunk_ids = choice["token_ids"]
                .as_array()
                .unwrap_or_else(|| panic!("no token_ids in {payload}"));
            ids.extend(chunk_ids.iter().map(|id| id.as_u64().unwrap()));
        }
    }
    (ids, prompts, common::streamed_text(payloads))
}

#[tokio::test]
async fn answers_with_return_token_ids_carry_the_prompts_ids_and_the_texts() {
    if !default_model_present() {
        return;
    }
    let server = start_server(&[]);
    let (text, prompt_ids) = llamacpp_tokenizations().swap_remove(1);
    let body = json!({"prompt": text, "max_tokens": 24, "temperature": 0,
                      "return_token_ids": true});
    let (status, whole) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(choice["prompt_token_ids"], json!(prompt_ids));
    let ids = choice["token_ids"].as_array().unwrap().clone();
    assert_eq!(
        ids.len() as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let (_, back) = server.post("/detokenize", &json!({"tokens": ids})).await;
    assert_eq!(back["prompt"], choice["text"]);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let payloads = server.post_stream("/v1/completions", &streamed).await;
    let (stream_ids, prompts, stream_text) = streamed_ids(&payloads);
    assert_eq!(json!(stream_ids), json!(ids));
    assert_eq!(
        prompts,
        vec![json!(prompt_ids)],
        "the prompt's ids come once"
    );
    assert_eq!(stream_text, choice["text"].as_str().unwrap());

    // Chat: the ids at the top level (the first chunk when streamed), as vLLM has them.
    let chat = json!({"messages": conversation(), "max_tokens": 8, "temperature": 0,
                      "return_token_ids": true});
    let (_, tokenized) = server
        .post("/tokenize", &json!({"messages": conversation()}))
        .await;
    let (status, whole) = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["prompt_token_ids"], tokenized["tokens"]);
    let ids = whole["choices"][0]["token_ids"].clone();
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let payloads = server.post_stream("/v1/chat/completions", &streamed).await;
    let (stream_ids, prompts, _) = streamed_ids(&payloads);
    assert_eq!(json!(stream_ids), ids);
    assert_eq!(prompts, vec![tokenized["tokens"].clone()]);

    // Without the field, no ids.
    let (_, plain) = server
        .post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}))
        .await;
    assert!(plain["choices"][0].get("token_ids").is_none());
    assert!(plain["choices"][0].get("prompt_token_ids").is_none());
}

#[tokio::test]
async fn the_router_serves_tokenize_detokenize_version_and_ping() {
    if !default_model_present() {
        return;
    }
    let worker = start_server(&[]);
    let router = Server::start_router(&["--worker", &worker.url("")]);
    let (text, ids) = llamacpp_tokenizations().swap_remove(0);
    let (status, tokenized) = router
        .post("/tokenize", &json!({"prompt": text, "model": "smol"}))
        .await;
    assert_eq!(status, 200, "{tokenized}");
    assert_eq!(tokenized["tokens"], json!(ids));
    let (status, back) = router.post("/detokenize", &json!({"tokens": ids})).await;
    assert_eq!(status, 200);
    assert_eq!(back["prompt"], json!(text));
    // The worker's own 400s come back as it said them.
    let (status, refused) = router
        .post("/tokenize", &json!({"prompt": "x", "bogus": 1}))
        .await;
    assert_error(status, &refused, 400);

    for server in [&worker, &router] {
        let version: Value = reqwest::get(server.url("/version"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let ping = server
                .client
                .request(method, server.url("/ping"))
                .send()
                .await
                .unwrap();
            assert_eq!(ping.status(), 200);
        }
        // A POST route asked with GET: 405 with an OpenAI body, not an empty one.
        let wrong = reqwest::get(server.url("/v1/completions")).await.unwrap();
        assert_eq!(wrong.status(), 405);
        let body: Value = wrong.json().await.unwrap();
        assert_eq!(body["error"]["code"], 405, "{body}");
    }
}

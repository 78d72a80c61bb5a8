//! Chat templates: the default model's GGUF template against llama.cpp's chat prompt,
//! Hugging Face template idioms (Python string methods, `raise_exception`, `tojson`,
//! block trimming), `tokenizer_config.json` sources, and template errors.

mod common;

use std::fs;

use candle_core::quantized::gguf_file::Content;
use serde_json::json;
use tandem_engine::ModelError;
use tandem_engine::chat::{ChatMessage, ChatTemplate};

const SMOLLM_SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

fn smollm_template() -> Option<ChatTemplate> {
    let path = common::default_model()?;
    let mut file = fs::File::open(&path).expect("open model");
    let content = Content::read(&mut file).expect("GGUF metadata");
    let template = ChatTemplate::from_gguf(&content, "<|im_start|>", "<|im_end|>")
        .expect("template compiles")
        .expect("the default model has a chat template");
    Some(template)
}

/// The chat prompt llama.cpp was given in the fixture (an independent reference).
fn fixture_chat_prompt() -> String {
    let fixture = common::llamacpp_fixture();
    let prompts = fixture["generation"].as_array().expect("generation cases");
    prompts
        .iter()
        .filter_map(|case| case["prompt"].as_str())
        .find(|prompt| prompt.starts_with("<|im_start|>"))
        .expect("fixture has a chat prompt")
        .to_owned()
}

#[test]
fn smollm_template_renders_the_fixture_chat_prompt() {
    let Some(template) = smollm_template() else {
        return;
    };
    let messages = [
        ChatMessage::new("system", SMOLLM_SYSTEM),
        ChatMessage::new("user", "What is a REST API?"),
    ];
    let prompt = template.render(&messages, true).expect("render");
    assert_eq!(prompt, fixture_chat_prompt());
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is a REST API?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn smollm_template_inserts_its_default_system_prompt() {
    let Some(template) = smollm_template() else {
        return;
    };
    let messages = [ChatMessage::new("user", "What is a REST API?")];
    assert_eq!(
        template.render(&messages, true).expect("render"),
        fixture_chat_prompt()
    );
    let without_prompt = template.render(&messages, false).expect("render");
    assert!(without_prompt.ends_with("What is a REST API?<|im_end|>\n"));
}

const LLAMA3_STYLE: &str = r#"{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'].strip() %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" + system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if not message['role'].startswith('u') and message['role'] != 'assistant' %}
        {{- raise_exception('Unknown role ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

fn llama3() -> ChatTemplate {
    ChatTemplate::new(LLAMA3_STYLE, "<|begin_of_text|>", "<|eot_id|>").expect("compiles")
}

#[test]
fn llama3_style_template_with_python_methods() {
    let messages = [
        ChatMessage::new("system", "  Be brief.\n"),
        ChatMessage::new("user", " Hi "),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "Bye"),
    ];
    assert_eq!(
        llama3().render(&messages, true).expect("render"),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn raise_exception_becomes_a_chat_template_error_with_its_message() {
    let messages = [
        ChatMessage::new("user", "one"),
        ChatMessage::new("user", "two"),
    ];
    let err = llama3()
        .render(&messages, true)
        .expect_err("roles do not alternate");
    let ModelError::ChatTemplate { detail } = &err else {
        panic!("expected a chat template error, got {err:?}");
    };
    assert!(
        detail.contains("Conversation roles must alternate user/assistant/user/assistant/..."),
        "{detail}"
    );
}

#[test]
fn syntax_errors_are_reported_when_compiling() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "")
        .expect_err("unclosed for");
    assert!(matches!(err, ModelError::ChatTemplate { .. }), "{err:?}");
}

#[test]
fn blocks_are_trimmed_like_transformers() {
    let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content }}\n    {% endif %}\n{% endfor %}";
    let template = ChatTemplate::new(source, "", "").expect("compiles");
    let messages = [
        ChatMessage::new("user", "hi"),
        ChatMessage::new("assistant", "ignored"),
        ChatMessage::new("user", "bye"),
    ];
    assert_eq!(
        template.render(&messages, false).expect("render"),
        "U: hi\nU: bye\n"
    );
}

#[test]
fn tojson_formats_like_python_json_dumps() {
    let source = "{{ messages[0] | tojson }}|{{ [1, 'é<>'] | tojson }}|{{ {'b': 1, 'a': 2} | tojson }}|{{ {'a': [1]} | tojson(indent=2) }}";
    let template = ChatTemplate::new(source, "", "").expect("compiles");
    let messages = [ChatMessage::new("user", "say \"hi\" & <b>")];
    assert_eq!(
        template.render(&messages, false).expect("render"),
        "{\"role\": \"user\", \"content\": \"say \\\"hi\\\" & <b>\"}|[1, \"é<>\"]|{\"b\": 1, \"a\": 2}|{\n  \"a\": [\n    1\n  ]\n}"
    );
}

#[test]
fn python_string_methods_are_available() {
    let source = "{{ messages[0].content.split(',') | join('|') }} {{ messages[0].content.upper() }} {{ messages[0].content.endswith('c') }}";
    let template = ChatTemplate::new(source, "", "").expect("compiles");
    let messages = [ChatMessage::new("user", "a,b,c")];
    assert_eq!(
        template.render(&messages, false).expect("render"),
        "a|b|c A,B,C True"
    );
}

#[test]
fn tokenizer_config_template_as_string_or_named_list() {
    let source = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}";
    let messages = [ChatMessage::new("user", "hi")];

    let config = json!({"chat_template": source});
    let template = ChatTemplate::from_tokenizer_config_json(&config, "<s>", "</s>")
        .expect("compiles")
        .expect("has a template");
    assert_eq!(
        template.render(&messages, false).expect("render"),
        "[user]hi</s>"
    );

    let config = json!({"chat_template": [
        {"name": "tool_use", "template": "{{ raise_exception('wrong template') }}"},
        {"name": "default", "template": source},
    ]});
    let template = ChatTemplate::from_tokenizer_config_json(&config, "<s>", "</s>")
        .expect("compiles")
        .expect("has a default template");
    assert_eq!(
        template.render(&messages, false).expect("render"),
        "[user]hi</s>"
    );

    let none = ChatTemplate::from_tokenizer_config_json(&json!({"eos_token": "</s>"}), "", "")
        .expect("no template is not an error");
    assert!(none.is_none());

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer_config.json");
    fs::write(&path, json!({"chat_template": source}).to_string()).expect("write");
    let template = ChatTemplate::from_tokenizer_config(&path, "<s>", "</s>")
        .expect("loads")
        .expect("has a template");
    assert_eq!(
        template.render(&messages, false).expect("render"),
        "[user]hi</s>"
    );

    fs::write(&path, "{").expect("write");
    let err = ChatTemplate::from_tokenizer_config(&path, "", "").expect_err("corrupt");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

#[test]
fn chat_messages_serialize_as_role_and_content() {
    let message: ChatMessage =
        serde_json::from_value(json!({"role": "user", "content": "hi"})).expect("deserialize");
    assert_eq!(message, ChatMessage::new("user", "hi"));
    assert_eq!(
        serde_json::to_value(&message).expect("serialize"),
        json!({"role": "user", "content": "hi"})
    );
}

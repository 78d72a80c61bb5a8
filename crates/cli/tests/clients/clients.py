"""The clients users already have, run against a tandem router: the openai SDK (sync
and async, streamed), LangChain (`with_structured_output`, `bind_tools`), litellm and
lm-eval (`local-completions` and `local-chat-completions`, over tasks written here as
YAML on local JSONL files). The expected answers are llama.cpp's, from its fixture for
the default model.

Usage: clients.py BASE_URL API_KEY FIXTURE_JSON WORK_DIR [CHECK ...]
Checks: openai, langchain, litellm, lm_eval (all when none is named).
"""

import asyncio
import json
import os
import pathlib
import subprocess
import sys

BASE, API_KEY, FIXTURE, WORK = sys.argv[1], sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])
CHECKS = sys.argv[5:] or ["openai", "langchain", "litellm", "lm_eval"]

with open(FIXTURE) as f:
    CASES = json.load(f)["generation"]
# llama.cpp's greedy continuations: a completion prompt and the chat one.
FRANCE = next(case for case in CASES if case["prompt"] == "The capital of France is")
HTTP = next(case for case in CASES if case["prompt"].startswith("Explain how HTTP"))
REST = next(case for case in CASES if "REST API" in case["prompt"])
REST_QUESTION = "What is a REST API?"


def first_clause(text):
    """The text before its first '.' or ',' (the generation tasks stop there)."""
    cut = min((text.find(mark) for mark in ".," if mark in text), default=len(text))
    return text[:cut]


def check_openai():
    import openai

    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key=API_KEY)
    model = client.models.list().data[0].id
    # Completions, greedy: llama.cpp's first tokens, whole and streamed.
    expected = FRANCE["greedy_text"][:7]  # " Paris."
    answer = client.completions.create(
        model=model, prompt=FRANCE["prompt"], max_tokens=2, temperature=0
    )
    assert answer.choices[0].text == expected[: len(answer.choices[0].text)], answer
    assert answer.choices[0].text.startswith(" Paris"), answer
    stream = client.completions.create(
        model=model,
        prompt=FRANCE["prompt"],
        max_tokens=2,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert streamed == answer.choices[0].text, chunks
    assert chunks[-1].usage.completion_tokens == 2, chunks[-1]
    # Chat, greedy, with logprobs: the model's own answer to the fixture's question.
    messages = [{"role": "user", "content": REST_QUESTION}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    text = chat.choices[0].message.content
    assert REST["greedy_text"].startswith(text), (text, REST["greedy_text"])
    content = chat.choices[0].logprobs.content
    assert len(content) == 8 and all(entry.top_logprobs[0].token == entry.token for entry in content)
    # n choices and a seed: reproducible, and different from each other.
    seeded = dict(model=model, messages=messages, max_tokens=8, temperature=1.0, seed=7, n=2)
    first = [c.message.content for c in client.chat.completions.create(**seeded).choices]
    again = [c.message.content for c in client.chat.completions.create(**seeded).choices]
    assert first == again and len(first) == 2, (first, again)

    async def concurrent_streams():
        aclient = openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key=API_KEY)

        async def one():
            stream = await aclient.chat.completions.create(
                model=model, messages=messages, max_tokens=8, temperature=0, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        return await asyncio.gather(*(one() for _ in range(4)))

    assert asyncio.run(concurrent_streams()) == [text] * 4
    try:
        client.chat.completions.create(model=model, messages=messages, top_logprobs=2)
        raise AssertionError("top_logprobs without logprobs accepted")
    except openai.BadRequestError as error:
        assert "top_logprobs" in str(error), error


def check_langchain():
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    llm = ChatOpenAI(
        model=model_name(), base_url=f"{BASE}/v1", api_key=API_KEY, temperature=0, max_tokens=96
    )

    class City(BaseModel):
        name: str
        country: str

    # A JSON schema, strict: the answer parses into the model.
    city = llm.with_structured_output(City).invoke("Name a city in France.")
    assert isinstance(city, City) and city.name and city.country, city

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    @tool
    def get_time(timezone: str) -> str:
        """The current time in a timezone."""
        return "noon"

    question = "What is the weather like in Paris?"
    named = llm.bind_tools([get_weather, get_time], tool_choice="get_weather").invoke(question)
    assert [call["name"] for call in named.tool_calls] == ["get_weather"], named
    assert isinstance(named.tool_calls[0]["args"]["city"], str), named
    required = llm.bind_tools([get_weather, get_time], tool_choice="any").invoke(question)
    assert required.tool_calls, required
    assert required.tool_calls[0]["name"] in {"get_weather", "get_time"}, required
    # Streamed: the call comes back in chunks LangChain puts together.
    chunks = list(llm.bind_tools([get_weather], tool_choice="get_weather").stream(question))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert [call["name"] for call in whole.tool_calls] == ["get_weather"], whole


def check_litellm():
    import litellm

    messages = [{"role": "user", "content": REST_QUESTION}]
    common = dict(
        model=f"openai/{model_name()}",
        api_base=f"{BASE}/v1",
        api_key=API_KEY,
        messages=messages,
        temperature=0,
        max_tokens=8,
    )
    whole = litellm.completion(**common).choices[0].message.content
    assert REST["greedy_text"].startswith(whole), whole
    streamed = "".join(
        chunk.choices[0].delta.content or "" for chunk in litellm.completion(stream=True, **common)
    )
    assert streamed == whole, (streamed, whole)


def model_name():
    import openai

    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=API_KEY).models.list().data[0].id


def detokenize(ids):
    import urllib.request

    request = urllib.request.Request(
        f"{BASE}/detokenize",
        data=json.dumps({"tokens": ids}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["prompt"]


def multiple_choice_docs():
    """Questions whose answer llama.cpp's logits settle: at a position of a fixture
    generation, the five tokens llama.cpp ranks highest, its top one by a clear margin,
    each a word after a space. Returns the docs and llama.cpp's logit gaps."""
    docs = []
    for case in (FRANCE, HTTP):
        ids = case["prompt_ids"] + case["greedy_ids"]
        first = len(case["prompt_ids"]) - 1
        for position in range(first, first + 24):
            top = case["top5_logits_per_position"][position]
            if top[0][1] - top[1][1] < 1.0:
                continue
            choices = [detokenize([token]) for token, _ in top]
            if not all(c.startswith(" ") and c[1:].isalpha() for c in choices):
                continue
            context = detokenize(ids[: position + 1])
            gaps = [top[0][1] - logit for _, logit in top]
            docs.append({"context": context, "choices": choices, "gold": 0, "gaps": gaps})
    assert len(docs) >= 3, docs
    return docs


def write_task(name, docs, body):
    data = WORK / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (WORK / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n" + body
    )


GENERATION = (
    "output_type: generate_until\n"
    "doc_to_text: prompt\n"
    "doc_to_target: answer\n"
    'target_delimiter: ""\n'
    "generation_kwargs:\n"
    '  until: [".", ","]\n'
    "  max_gen_toks: 48\n"
    "  do_sample: false\n"
    "  temperature: 0\n"
    "metric_list:\n"
    "  - metric: exact_match\n"
    '    regexes_to_ignore: ["\\\\s"]\n'
)


def run_lm_eval(model, base_url, tasks, *extra):
    out = WORK / f"out-{model}"
    command = [
        sys.executable, "-m", "lm_eval",
        "--model", model,
        "--model_args", f"model={model_name()},base_url={base_url},{','.join(extra[0])}",
        "--tasks", ",".join(tasks),
        "--include_path", str(WORK),
        "--output_path", str(out),
        "--log_samples",
        *extra[1:],
    ]  # fmt: skip
    env = dict(os.environ, OPENAI_API_KEY=API_KEY)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    results = {}
    samples = {}
    for path in out.rglob("*.json*"):
        if path.name.startswith("results_"):
            results.update(json.loads(path.read_text())["results"])
        elif path.name.startswith("samples_"):
            task = path.name[len("samples_"):].rsplit("_", 1)[0]
            samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return results, samples


def check_lm_eval():
    mc_docs = multiple_choice_docs()
    write_task(
        "tandem_mc",
        mc_docs,
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n",
    )
    completion_docs = [
        {"prompt": case["prompt"], "answer": first_clause(case["greedy_text"])}
        for case in (FRANCE, HTTP)
    ]
    write_task("tandem_gen", completion_docs, GENERATION)
    chat_docs = [{"prompt": REST_QUESTION, "answer": first_clause(REST["greedy_text"])}]
    write_task("tandem_chat_gen", chat_docs, GENERATION)

    results, samples = run_lm_eval(
        "local-completions",
        f"{BASE}/v1/completions",
        ["tandem_mc", "tandem_gen"],
        # The tokenizer is the server's (/tokenizer_info, /tokenize), behind its key.
        ["tokenizer_backend=remote", f"auth_token={API_KEY}", "tokenized_requests=True",
         "num_concurrent=2"],
    )
    assert results["tandem_mc"]["acc,none"] == 1.0, results
    assert results["tandem_gen"]["exact_match,none"] == 1.0, (results, samples.get("tandem_gen"))
    # Each choice's log-likelihood trails the best one's as llama.cpp's logit does.
    scored = sorted(samples["tandem_mc"], key=lambda sample: sample["doc_id"])
    for sample, doc in zip(scored, mc_docs):
        loglikelihoods = [float(resp[0][0]) for resp in sample["resps"]]
        for ours, theirs in zip(loglikelihoods, doc["gaps"]):
            assert abs((loglikelihoods[0] - ours) - theirs) < 1.0, (loglikelihoods, doc)

    results, samples = run_lm_eval(
        "local-chat-completions",
        f"{BASE}/v1/chat/completions",
        ["tandem_chat_gen"],
        ["num_concurrent=1"],
        "--apply_chat_template",
    )
    assert results["tandem_chat_gen"]["exact_match,none"] == 1.0, (results, samples)


for check in CHECKS:
    globals()[f"check_{check}"]()
    print(f"{check}: ok", flush=True)

"""End-to-end checks of esft-serve with the official `openai` Python client.

Run by tests/server_process.rs against a real server process. Every completion is greedy
and compared with `esft-serve generate` on the same input: text, token counts and finish
reason must be equal.
"""

import json
import os
import subprocess

import openai
from openai import OpenAI

URL = os.environ["ESFT_URL"]
BIN = os.environ["ESFT_BIN"]
MODEL_DIR = os.environ["ESFT_MODEL_DIR"]
ADAPTERS = os.environ["ESFT_ADAPTERS_DIR"]
BASE = os.environ["ESFT_BASE_ID"]

admin = OpenAI(base_url=URL + "/v1", api_key=os.environ["ESFT_ADMIN_KEY"], max_retries=0)
acme = OpenAI(base_url=URL + "/v1", api_key=os.environ["ESFT_TENANT_KEY"], max_retries=0)

passed = 0

PROMPT = "The quick brown fox"
N = 16


def check(cond, what):
    global passed
    if not cond:
        raise AssertionError(what)
    passed += 1


def generate(*args, adapter=None):
    cmd = [BIN, "generate", "--model", MODEL_DIR, "--json", *args]
    if adapter:
        cmd += ["--adapter", os.path.join(ADAPTERS, adapter)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def adapter_of(model):
    name = model.split(":", 1)[1] if model.startswith(BASE + ":") else model
    return None if name == BASE else name


# Models: the tenant sees the base, its own adapter and the public one.
ids = [m.id for m in acme.models.list().data]
check(ids == [BASE, "acme-a", "shared"], f"tenant models {ids}")
admin_ids = [m.id for m in admin.models.list().data]
# The admin names tenants' adapters TENANT/NAME (each tenant has its own namespace).
check(set(admin_ids) == {BASE, "acme/acme-a", "globex/globex-a", "shared"}, f"admin models {admin_ids}")

want = generate("--prompt", PROMPT, "--max-tokens", str(N), "--ignore-eos", adapter="acme-a")
r = admin.completions.create(
    model="acme/acme-a", prompt=PROMPT, max_tokens=N, temperature=0, extra_body={"ignore_eos": True}
)
check(r.choices[0].text == want["text"], f"admin on acme/acme-a: {r.choices[0].text!r}")
check(admin.models.retrieve("acme/acme-a").owned_by == "acme", "admin retrieves acme/acme-a")

for model in [BASE, "acme-a", "shared", BASE + ":shared"]:
    want = generate("--prompt", PROMPT, "--max-tokens", str(N), "--ignore-eos", adapter=adapter_of(model))
    r = acme.completions.create(
        model=model, prompt=PROMPT, max_tokens=N, temperature=0, extra_body={"ignore_eos": True}
    )
    c = r.choices[0]
    check(c.text == want["text"], f"{model}: {c.text!r} != generate {want['text']!r}")
    check(c.finish_reason == "length", f"{model}: finish {c.finish_reason}")
    check(r.model == model, f"echoed model {r.model}")
    check(r.usage.prompt_tokens == len(want["prompt_ids"]), f"{model}: prompt tokens {r.usage}")
    check(r.usage.completion_tokens == N, f"{model}: completion tokens {r.usage}")
    check(r.usage.total_tokens == len(want["prompt_ids"]) + N, f"{model}: total {r.usage}")

    # The same, streamed.
    text, usage, finish = "", None, None
    for chunk in acme.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=N,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    check(text == want["text"], f"{model} streamed: {text!r}")
    check(finish == "length", f"{model} streamed finish {finish}")
    check(usage is not None and usage.completion_tokens == N, f"{model} streamed usage {usage}")
    check(usage.prompt_tokens == len(want["prompt_ids"]), f"{model} streamed usage {usage}")

# Token ids are used verbatim (no BOS added); without ignore_eos the EOS ends it as `stop`.
ids = [5, 17, 42, 99, 7]
want = generate("--prompt-ids", ",".join(map(str, ids)), "--max-tokens", "24")
r = acme.completions.create(model=BASE, prompt=ids, max_tokens=24, temperature=0)
check(r.choices[0].text == want["text"], "token-id prompt text")
check(r.usage.prompt_tokens == len(ids), "token-id prompt: no BOS added")
check(r.usage.completion_tokens == len(want["new_ids"]), "token-id completion tokens")
stopped = len(want["new_ids"]) < 24
check(r.choices[0].finish_reason == ("stop" if stopped else "length"), "token-id finish")

# Chat, with the model's template, against `generate --chat --system`.
SYSTEM, USER = "You are terse.", "What is a mixture of experts?"
messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
for model in [BASE, "acme-a"]:
    want = generate("--chat", USER, "--system", SYSTEM, "--max-tokens", "12", "--ignore-eos", adapter=adapter_of(model))
    r = acme.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    m = r.choices[0].message
    check(m.role == "assistant" and m.content == want["text"], f"chat {model}: {m.content!r} vs {want['text']!r}")
    check(r.usage.prompt_tokens == len(want["prompt_ids"]), f"chat {model} prompt tokens {r.usage}")
    check(r.usage.completion_tokens == 12, f"chat {model} completion tokens {r.usage}")
    check(r.choices[0].finish_reason == "length", "chat finish")
    content, role, usage = "", None, None
    for chunk in acme.chat.completions.create(
        model=model,
        messages=messages,
        max_completion_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        if chunk.choices:
            d = chunk.choices[0].delta
            role = d.role or role
            content += d.content or ""
        if chunk.usage:
            usage = chunk.usage
    check(role == "assistant" and content == want["text"], f"chat {model} streamed {content!r}")
    check(usage.completion_tokens == 12 and usage.prompt_tokens == len(want["prompt_ids"]), f"{usage}")

# n, seed, logprobs, a stop string.
r = acme.completions.create(
    model=BASE, prompt=PROMPT, max_tokens=8, temperature=0.9, seed=11, n=3, logprobs=2,
    extra_body={"ignore_eos": True},
)
check([c.index for c in r.choices] == [0, 1, 2], "n = 3 choices")
check(r.usage.completion_tokens == 24, f"n = 3 usage {r.usage}")
again = acme.completions.create(
    model=BASE, prompt=PROMPT, max_tokens=8, temperature=0.9, seed=11, n=3, logprobs=2,
    extra_body={"ignore_eos": True},
)
check([c.text for c in r.choices] == [c.text for c in again.choices], "seeded sampling repeats")
lp = r.choices[0].logprobs
check(len(lp.token_logprobs) == 8 and all(x <= 0 for x in lp.token_logprobs), "logprobs")
check(all(len(t) >= 1 for t in lp.top_logprobs), "top logprobs")
greedy = acme.completions.create(model=BASE, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
full = greedy.choices[0].text
stop = full[len(full) // 2 : len(full) // 2 + 2]
if stop:
    cut = acme.completions.create(model=BASE, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    check(cut.choices[0].finish_reason == "stop", "stop string finish")
    check(cut.choices[0].text == full[: full.index(stop)], "stop string cut")
cr = acme.chat.completions.create(model=BASE, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
check(len(cr.choices[0].logprobs.content) == cr.usage.completion_tokens, "chat logprobs per token")
check(all(len(t.top_logprobs) == 3 for t in cr.choices[0].logprobs.content), "chat top_logprobs")

# Errors, as the client raises them.
def raises(exc, f, what):
    try:
        f()
    except exc as e:
        check(True, what)
        return e
    raise AssertionError(f"{what}: no {exc.__name__}")

e = raises(openai.NotFoundError, lambda: acme.completions.create(model="globex-a", prompt="x", max_tokens=1), "another tenant's adapter")
check(e.body["code"] == "model_not_found", f"{e.body}")
raises(openai.NotFoundError, lambda: acme.completions.create(model="nope", prompt="x", max_tokens=1), "unknown model")
bad = OpenAI(base_url=URL + "/v1", api_key="wrong", max_retries=0)
raises(openai.AuthenticationError, lambda: bad.models.list(), "wrong key")
e = raises(openai.BadRequestError, lambda: acme.completions.create(model=BASE, prompt="x", max_tokens=0), "max_tokens 0")
check(e.body["param"] == "max_tokens", f"{e.body}")
e = raises(openai.BadRequestError, lambda: acme.chat.completions.create(model=BASE, messages=[], max_tokens=1), "empty messages")
check(e.body["param"] == "messages", f"{e.body}")
e = raises(openai.BadRequestError, lambda: acme.completions.create(model=BASE, prompt="x", n=1000), "n too large")
check(e.body["param"] == "n", f"{e.body}")

# Files: upload training data, list, retrieve, read back, delete; tenants see only theirs.
import tempfile

TRAIN = (
    json.dumps({"messages": [{"role": "user", "content": "turn on the light"},
                             {"role": "assistant", "content": "{\"intent\": \"on\"}"}]}) + "\n"
    + json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n"
    + json.dumps({"text": "plain text to learn"}) + "\n"
).encode()
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "train.jsonl")
    with open(path, "wb") as f:
        f.write(TRAIN)
    with open(path, "rb") as f:
        up = acme.files.create(file=f, purpose="fine-tune")
    check(up.id.startswith("file-") and len(up.id) == 29, f"file id {up.id}")
    check(up.object == "file" and up.purpose == "fine-tune", f"file object {up}")
    check(up.bytes == len(TRAIN) and up.filename == "train.jsonl", f"file object {up}")
    check(up.status == "processed", f"file status {up.status}")
    listed = acme.files.list()
    check([x.id for x in listed.data] == [up.id], f"files.list {listed.data}")
    got = acme.files.retrieve(up.id)
    check(got.id == up.id and got.bytes == up.bytes and got.created_at == up.created_at, f"retrieve {got}")
    check(acme.files.content(up.id).read() == TRAIN, "file content equals the upload")
    check(up.id in [x.id for x in admin.files.list().data], "the admin sees the tenant's file")
    # Refusals, as the client raises them.
    bad = os.path.join(tmp, "bad.jsonl")
    with open(bad, "wb") as f:
        f.write(TRAIN + b'{"messages": [{"role": "system", "content": "x"}]}\n')
    with open(bad, "rb") as f:
        e = raises(openai.BadRequestError, lambda: acme.files.create(file=f, purpose="fine-tune"), "bad line")
    check(e.body["code"] == "invalid_file" and "line 4" in e.body["message"], f"{e.body}")
    with open(path, "rb") as f:
        e = raises(openai.BadRequestError, lambda: acme.files.create(file=f, purpose="assistants"), "wrong purpose")
    check(e.body["param"] == "purpose", f"{e.body}")
    d = acme.files.delete(up.id)
    check(d.id == up.id and d.deleted, f"files.delete {d}")
    raises(openai.NotFoundError, lambda: acme.files.retrieve(up.id), "deleted file")
    check(acme.files.list().data == [], "no files left")

print(f"{passed} checks passed")

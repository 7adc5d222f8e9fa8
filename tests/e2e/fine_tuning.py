"""The fine-tuning API through the official `openai` client, unchanged, against a running
esft server on the demo model (driven by tests/fine_tuning_process.rs):

1. tenant A uploads task data, starts a job with a suffix, polls it to `succeeded`, reads
   its events (every phase, with losses) and checkpoints, and its `fine_tuned_model`
   answers held-out items of the task far better than the base does;
2. a second job is cancelled while it trains: it ends `cancelled` with no adapter;
3. tenant B sees none of A's files, jobs, events or adapter.

Environment: ESFT_URL, ESFT_TENANT_KEY (A), ESFT_OTHER_KEY (B), ESFT_BASE_ID, ESFT_TRAIN
(training JSONL), ESFT_EVAL (held-out `{"prompt", "answers"}` JSONL), ESFT_STEPS (steps of
the job), ESFT_ITEMS (held-out items asked), ESFT_MARGIN
(exact-match points the adapter must gain), ESFT_MAX_TOKENS (longest answer, default 48). Prints a JSON line of the numbers, then "checks passed".
"""

import json
import os
import sys
import time

import openai
from openai import OpenAI

URL = os.environ["ESFT_URL"] + "/v1"
A = OpenAI(base_url=URL, api_key=os.environ["ESFT_TENANT_KEY"], max_retries=0)
B = OpenAI(base_url=URL, api_key=os.environ["ESFT_OTHER_KEY"], max_retries=0)
BASE = os.environ["ESFT_BASE_ID"]
STEPS = int(os.environ["ESFT_STEPS"])
ITEMS = int(os.environ["ESFT_ITEMS"])
MARGIN = float(os.environ["ESFT_MARGIN"])
TERMINAL = ("succeeded", "failed", "cancelled")


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)


def wait(job_id, until, limit_s):
    start = time.time()
    while True:
        job = A.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        check(time.time() - start < limit_s, f"job {job_id} stuck at {job.status}")
        time.sleep(0.5)


def matches(prediction, answer):
    p, a = prediction.strip(), answer.strip()
    if p == a:
        return True
    try:
        want = json.loads(a)
        if isinstance(want, (dict, list)):
            got, _ = json.JSONDecoder().raw_decode(p)
            return got == want
    except ValueError:
        pass
    return False


def ask(client, model, question):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=int(os.environ.get("ESFT_MAX_TOKENS", "48")),
        temperature=0,
    )
    return r.choices[0].message.content or ""


def not_found(call, what):
    try:
        call()
    except openai.NotFoundError:
        return
    check(False, f"{what} was visible to another tenant")


started = time.time()
with open(os.environ["ESFT_TRAIN"], "rb") as f:
    uploaded = A.files.create(file=f, purpose="fine-tune")
check(uploaded.purpose == "fine-tune" and uploaded.bytes > 0, f"file: {uploaded}")

# 1. A job to success.
job = A.fine_tuning.jobs.create(
    model=BASE,
    training_file=uploaded.id,
    suffix="law",
    seed=7,
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto"}}},
    extra_body={"esft": {"steps": STEPS}},
)
check(job.id.startswith("ftjob-") and job.status in ("validating_files", "queued"), f"created: {job}")
created = time.time()
job = wait(job.id, lambda j: j.status in TERMINAL, 900)
check(job.status == "succeeded", f"the job ended {job.status}: {job.error}")
check(job.fine_tuned_model and job.fine_tuned_model.startswith(f"ft:{BASE}:law:"), f"{job}")
check(job.trained_tokens and job.trained_tokens > 0, f"trained tokens: {job.trained_tokens}")
selection = job.model_extra["esft"]["selection"]
check(selection["selected_experts"] > 0 and selection["trainable_params"] > 0, f"{selection}")
job_seconds = time.time() - created

events = list(A.fine_tuning.jobs.list_events(job.id, limit=50))
log = [e.message for e in reversed(events)]
for phase in ("Validating training file", "Files validated", "Fine-tuning job started",
              "Scored the experts", "Selected", "Training ", "Training done",
              "successfully completed"):
    check(any(phase in m for m in log), f"no {phase!r} event in {log}")
# Metrics events at a bounded rate (the first step, the last, a few between); every step
# is in the job's result file, OpenAI's CSV.
metrics = [e for e in events if e.type == "metrics"]
check(2 <= len(metrics) < STEPS, f"{len(metrics)} metrics events for {STEPS} steps")
check(all(e.data["train_loss"] is not None for e in metrics), "a metrics event without a loss")
check((metrics[-1].data["step"], metrics[0].data["step"]) == (1, STEPS),
      f"metrics events from step {metrics[-1].data['step']} to {metrics[0].data['step']}")
check(len(job.result_files) == 1, f"result files: {job.result_files}")
result = A.files.retrieve(job.result_files[0])
check(result.purpose == "fine-tune-results", f"result file: {result}")
rows = A.files.content(job.result_files[0]).text.strip().split("\n")
check(rows[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy",
      f"result header: {rows[0]!r}")
steps = [r.split(",") for r in rows[1:]]
check([int(s[0]) for s in steps] == list(range(1, STEPS + 1)), f"{len(steps)} result rows")
first, last = float(steps[0][1]), float(steps[-1][1])
check(last < first, f"the loss did not fall: {first} -> {last}")
checkpoints = list(A.fine_tuning.jobs.checkpoints.list(job.id))
check(checkpoints and checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model,
      f"checkpoints: {checkpoints}")
check(checkpoints[0].step_number == STEPS, f"last checkpoint at {checkpoints[0].step_number}")
check(job.fine_tuned_model in [m.id for m in A.models.list()], "the adapter is not listed")

items = []
with open(os.environ["ESFT_EVAL"]) as f:
    for line in f:
        items.append(json.loads(line))
items = items[:ITEMS]
base_right = adapter_right = 0
for item in items:
    q = item["prompt"].removeprefix("User: ").removesuffix("\n\nAssistant:")
    base_right += any(matches(ask(A, BASE, q), a) for a in item["answers"])
    adapter_right += any(matches(ask(A, job.fine_tuned_model, q), a) for a in item["answers"])
gain = (adapter_right - base_right) / len(items)
check(gain >= MARGIN, f"adapter {adapter_right}/{len(items)} vs base {base_right}/{len(items)}")

# 2. A job cancelled while it trains leaves no adapter.
doomed = A.fine_tuning.jobs.create(
    model=BASE, training_file=uploaded.id, suffix="doomed", extra_body={"esft": {"steps": 100000}}
)
start = time.time()
while not any(e.type == "metrics" for e in A.fine_tuning.jobs.list_events(doomed.id, limit=5)):
    check(time.time() - start < 300, "the second job never trained")
    time.sleep(0.5)
cancelled = A.fine_tuning.jobs.cancel(doomed.id)
check(cancelled.status == "cancelled", f"cancel answered {cancelled.status}")
doomed = wait(doomed.id, lambda j: j.status in TERMINAL, 30)
check(doomed.status == "cancelled" and doomed.fine_tuned_model is None, f"{doomed}")
check(not any(":doomed:" in m.id for m in A.models.list()), "a cancelled job left an adapter")
try:
    A.fine_tuning.jobs.cancel(doomed.id)
    check(False, "a finished job was cancelled again")
except openai.BadRequestError:
    pass

# 3. Tenant B sees nothing of A's.
not_found(lambda: B.files.retrieve(uploaded.id), "the file")
not_found(lambda: B.fine_tuning.jobs.retrieve(job.id), "the job")
not_found(lambda: list(B.fine_tuning.jobs.list_events(job.id)), "the events")
not_found(lambda: list(B.fine_tuning.jobs.checkpoints.list(job.id)), "the checkpoints")
not_found(lambda: B.fine_tuning.jobs.cancel(doomed.id), "cancel")
not_found(lambda: ask(B, job.fine_tuned_model, "hello"), "the adapter")
check(not list(B.files.list()), "B lists A's files")
check(not list(B.fine_tuning.jobs.list()), "B lists A's jobs")
check(job.fine_tuned_model not in [m.id for m in B.models.list()], "B lists A's adapter")

print(json.dumps({
    "base_right": base_right,
    "adapter_right": adapter_right,
    "items": len(items),
    "job_seconds": round(job_seconds, 1),
    "total_seconds": round(time.time() - started, 1),
    "selected_experts": selection["selected_experts"],
    "total_experts": selection["total_experts"],
}))
print("checks passed")

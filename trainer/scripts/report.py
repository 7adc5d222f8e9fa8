"""Tables of docs/reproduction.md from a reproduce.sh work directory (printed as Markdown).

    python3 trainer/scripts/report.py WORK_DIR MODEL_DIR
"""
import json
import sys
from pathlib import Path

work, model = Path(sys.argv[1]), Path(sys.argv[2])
TASKS = ["intent", "translation", "law"]
GENERAL = ["grammar", "arithmetic", "programs"]
METHODS = [("base", "Base (no fine-tuning)"), ("fft", "FFT"), ("token", "ESFT-Token (p = 0.2)"),
           ("gate", "ESFT-Gate (p = 0.1)"), ("random", "ESFT-Random (as many as Token)")]

results = [json.loads(l) for l in open(work / "results.jsonl")]
runs = [json.loads(l) for l in open(work / "runs.jsonl")]
cfg = json.load(open(model / "config.json"))
routing = json.load(open(work / "plots" / "routing_summary.json"))


def em(method, task, domain):
    for r in results:
        if r["method"] == method and r["domain"] == domain and (method == "base" or r["task"] == task):
            return 100.0 * r["result"]["score"]
    return None


def fmt(v):
    return "-" if v is None else f"{v:.1f}"


def mean(vs):
    vs = [v for v in vs if v is not None]
    return sum(vs) / len(vs) if vs else None


print("### Downstream tasks (exact match, %)\n")
print("| Method | " + " | ".join(TASKS) + " | Average |")
print("|---|" + "---|" * (len(TASKS) + 1))
for m, name in METHODS:
    row = [em(m, t, t) for t in TASKS]
    print(f"| {name} | " + " | ".join(fmt(v) for v in row) + f" | {fmt(mean(row))} |")

print("\n### Downstream tasks: held-out loss (mean nats per answer token, the best eval "
      "checkpoint's)\n")
print("| Method | " + " | ".join(TASKS) + " | Average |")
print("|---|" + "---|" * (len(TASKS) + 1))
base_loss = {}
if (work / "base_loss.jsonl").exists():
    for line in open(work / "base_loss.jsonl"):
        r = json.loads(line)
        base_loss[r["task"]] = r["loss"]["score"]
if base_loss:
    row = [base_loss.get(t) for t in TASKS]
    cells = " | ".join("-" if v is None else f"{v:.3f}" for v in row)
    print(f"| Base | {cells} | " + ("-" if mean(row) is None else f"{mean(row):.3f}") + " |")
for m, name in METHODS[1:]:
    row = []
    for t in TASKS:
        r = [x for x in runs if x["method"] == m and x["task"] == t]
        row.append(r[0]["best_eval_loss"] if r and r[0]["best_eval_loss"] is not None else None)
    cells = " | ".join("-" if v is None else f"{v:.3f}" for v in row)
    print(f"| {name} | {cells} | " + ("-" if mean(row) is None else f"{mean(row):.3f}") + " |")

print("\n### General domains (exact match, %; fine-tuned rows average the three task models)\n")
print("| Method | " + " | ".join(GENERAL) + " | Average |")
print("|---|" + "---|" * (len(GENERAL) + 1))
for m, name in METHODS:
    if m == "base":
        row = [em(m, None, d) for d in GENERAL]
    else:
        row = [mean([em(m, t, d) for t in TASKS]) for d in GENERAL]
    print(f"| {name} | " + " | ".join(fmt(v) for v in row) + f" | {fmt(mean(row))} |")

print("\n### General domains per fine-tuned model (exact match, %)\n")
print("| Method | Task | " + " | ".join(GENERAL) + " | Average |")
print("|---|---|" + "---|" * (len(GENERAL) + 1))
for m, name in METHODS[1:]:
    for t in TASKS:
        row = [em(m, t, d) for d in GENERAL]
        print(f"| {name} | {t} | " + " | ".join(fmt(v) for v in row) + f" | {fmt(mean(row))} |")

total_params = None
st = model / "model.safetensors"
if st.exists():
    import struct
    with open(st, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    total_params = sum(
        eval("*".join(str(d) for d in v["shape"]) or "1") for k, v in header.items() if k != "__metadata__")

print("\n### Cost (mean over the three tasks)\n")
print("| Method | Trainable parameters | Share of the model | Training time (s) | Output size (MB) |")
print("|---|---|---|---|---|")
for m, name in METHODS[1:]:
    rs = [r for r in runs if r["method"] == m]
    if not rs:
        continue
    p = mean([r["trainable_params"] for r in rs])
    share = f"{100.0 * p / total_params:.1f}%" if total_params else "-"
    print(f"| {name} | {p:,.0f} | {share} | {mean([r['seconds'] for r in rs]):.0f} | "
          f"{mean([r['bytes'] for r in rs]) / 1e6:.2f} |")

print("\n### Selected experts\n")
experts = cfg["n_routed_experts"]
print("| Task | Function | Selected | Per MoE layer | Share of routed experts |")
print("|---|---|---|---|---|")
for t in TASKS:
    for fn in ["token", "gate"]:
        c = json.load(open(work / "configs" / f"{fn}-{t}.json"))["experts"]
        n = sum(len(v) for v in c.values())
        print(f"| {t} | {fn} | {n} | {n / len(c):.1f} | {100.0 * n / (experts * len(c)):.1f}% |")

print(f"\n### Routing concentration (token scores; top {routing['top_experts']} of "
      f"{routing['experts']} experts = {100 * routing['top_fraction']:.0f}%)\n")
print("| Domain | Share of routing on its top experts, mean over layers | per MoE layer |")
print("|---|---|---|")
for task in routing["tasks"]:
    shares = task["top_share"]
    per = ", ".join(f"{100 * shares[k]:.0f}" for k in sorted(shares, key=int))
    print(f"| {task['name']} | {100 * task['mean_top_share']:.1f}% | {per} |")
names = [t["name"] for t in routing["tasks"]]
print("\nOverlap of the top experts between domains (|A ∩ B| / |A|, mean over layers, %):\n")
print("| | " + " | ".join(names) + " |")
print("|---|" + "---|" * len(names))
ov = {(p["a"], p["b"]): p["mean_overlap"] for p in routing["pairs"]}
for a in names:
    cells = []
    for b in names:
        v = 1.0 if a == b else ov.get((a, b), ov.get((b, a)))
        cells.append("-" if v is None else f"{100 * v:.0f}")
    print(f"| {a} | " + " | ".join(cells) + " |")
print(f"\nChance overlap of two random top sets: {100 * routing['top_experts'] / routing['experts']:.0f}%.")


def distribution(path):
    """Per MoE layer, the token scores normalised to a distribution over experts."""
    scores = json.load(open(path))["token_scores"]
    out = {}
    for layer, experts in scores.items():
        total = sum(experts.values())
        out[layer] = {e: v / total for e, v in experts.items()}
    return out


def distance(a, b):
    """Total-variation distance between two routing distributions, mean over layers."""
    per_layer = []
    for layer in a:
        experts = set(a[layer]) | set(b[layer])
        per_layer.append(0.5 * sum(abs(a[layer].get(e, 0.0) - b[layer].get(e, 0.0)) for e in experts))
    return sum(per_layer) / len(per_layer)


dist = {n: distribution(work / "scores" / f"{n}.json") for n in names}
resample = {n: distribution(work / "scores" / f"{n}.resample.json") for n in names
            if (work / "scores" / f"{n}.resample.json").exists()}
if resample:
    print("\nHow far domains route apart: total-variation distance between their routing "
          "distributions (token scores per layer, normalised), mean over layers, %. The "
          "diagonal is the distance between two random samples of the same domain (seeds "
          "0 and 1): the noise floor.\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for a in names:
        cells = []
        for b in names:
            if a == b:
                cells.append(f"({100 * distance(dist[a], resample[a]):.1f})" if a in resample else "-")
            else:
                cells.append(f"{100 * distance(dist[a], dist[b]):.1f}")
        print(f"| {a} | " + " | ".join(cells) + " |")

"""Training memory: what each technique saves on 7B/8B shapes, and what it costs on a real fine-tune.

    python experiments/train_memory.py --part=compile      # (a) llama2-7b / llama3-8b, compile only
    python experiments/train_memory.py --part=finetune     # (b) SmolLM2-135M on Austen, real steps
    python experiments/train_memory.py                     # both

(a) Compile-only memory table.  Each row is one training step (bf16 weights,
batch ``--batch`` x ``--seq`` tokens) lowered from abstract shapes and compiled,
never allocated: XLA's ``memory_analysis()`` (argument, output, alias, temp;
peak = argument + output - alias + temp) beside the exact bytes of params,
gradients and optimizer state, and the analytic optimizer-state formula.  The
baseline is full fine-tuning with fp32-state AdamW, the logits-materializing
loss and no rematerialization; every other row changes one thing, and the last
rows combine them.  The papers' anchors are printed beside:
GaLore (7B pre-training within 24 GB, with 8-bit GaLore and per-layer weight
updates), APOLLO-Mini (7B under 12 GB), 8-bit optimizers (-75% optimizer state).

(b) Real fine-tune of SmolLM2-135M-Instruct on Austen's training books with
AdamW, 8-bit AdamW, GaLore, APOLLO, LoRA and QLoRA (NF4 base) at equal steps and
learning-rate schedule: loss curves, held-out loss on *Northanger Abbey*, and
each run's compiled step memory.  Writes results/train_memory.json and
results/train_memory.png.
"""
from __future__ import annotations

import contextlib
import time

import jax
import numpy as np
from absl import app, flags

import memlab as ml
from memlab import results
from memlab.memory.bytes import fmt_bytes, tree_bytes

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "all", ["all", "compile", "finetune"], "Which part to run; each part "
                  "updates its own key of the output JSON.")
flags.DEFINE_list("models", ["llama2-7b", "llama3-8b"], "Abstract models for the compile table.")
flags.DEFINE_integer("batch", 1, "Compile table: sequences per step.")
flags.DEFINE_integer("seq", 2048, "Compile table: tokens per sequence.")
flags.DEFINE_list("rows", [], "Compile table: subset of row names (default: all).")
flags.DEFINE_integer("steps", 150, "Fine-tune: optimizer steps per run.")
flags.DEFINE_integer("ft_batch", 4, "Fine-tune: sequences per step.")
flags.DEFINE_integer("ft_seq", 128, "Fine-tune: tokens per sequence.")
flags.DEFINE_float("lr", 1e-4, "Fine-tune: peak learning rate of full-parameter runs.")
flags.DEFINE_float("lora_lr", 1e-3, "Fine-tune: peak learning rate of LoRA / QLoRA runs.")
flags.DEFINE_list("runs", [], "Fine-tune: subset of run names (default: all).")
flags.DEFINE_string("out", "results/train_memory.json", "Output JSON.")

GiB = 2**30


# ---------------------------------------------------------------------------
# (a) compile-only table
# ---------------------------------------------------------------------------
def _qlora_base():
    # The head stays bf16 so cut cross-entropy can read it (QLoRA quantizes the
    # linear layers of the blocks; embeddings and head are kept, as in the paper).
    return ml.passes.quantize(ml.quant.nf4(64, double_quant=True),
                              rules={r"lm_head|embed": None})


def compile_rows() -> dict:
    """Row name -> (passes, optimizer name, optimizer kwargs, loss impl)."""
    lora_all = dict(rank=64, alpha=16.0, rules=ml.passes.lora.ALL_LINEAR, dtype="bfloat16")
    remat = ml.passes.remat("nothing_saveable")
    rows = {
        "adamw (baseline)": ([], "adamw", {}, "naive"),
        "adamw bf16 state": ([], "adamw", {"state_dtype": "bfloat16"}, "naive"),
        "adamw8bit": ([], "adamw8bit", {}, "naive"),
        "adam4bit": ([], "adam4bit", {}, "naive"),
        "galore r=1024": ([], "galore", {"rank": 1024}, "naive"),
        "galore8bit r=1024": ([], "galore", {"rank": 1024, "base": "adamw8bit"}, "naive"),
        "apollo r=256": ([], "apollo", {"rank": 256}, "naive"),
        "apollo_mini": ([], "apollo_mini", {}, "naive"),
        "came": ([], "came", {}, "naive"),
        "remat nothing_saveable": ([remat], "adamw", {}, "naive"),
        "remat dots_no_batch": ([ml.passes.remat("dots_with_no_batch_dims_saveable")], "adamw", {},
                                "naive"),
        "cut cross-entropy": ([], "adamw", {}, "chunked"),
        "minisequence mlp x4": ([ml.passes.minisequence(4)], "adamw", {}, "naive"),
        "lora r=64 (all linear)": ([ml.passes.lora(**lora_all)], "adamw", {}, "naive"),
        "qlora nf4 + lora r=64": ([_qlora_base(), ml.passes.lora(**lora_all)], "adamw", {}, "naive"),
        "best full: apollo_mini+remat+cce": ([remat], "apollo_mini", {}, "chunked"),
        "best full: galore8bit+remat+cce": ([remat], "galore", {"rank": 1024, "base": "adamw8bit"},
                                            "chunked"),
        "best: qlora+remat+cce": ([_qlora_base(), ml.passes.lora(**lora_all), remat], "adamw", {},
                                  "chunked"),
    }
    if FLAGS.rows:
        rows = {k: v for k, v in rows.items() if k in FLAGS.rows}
    return rows


def _optimizer(name: str, kwargs: dict):
    kw = dict(kwargs)
    if isinstance(kw.get("base"), str):   # GaLore over another registered optimizer
        kw["base"] = kw["base"]
    return ml.optim.get(name, **kw), kw


def compile_row(model, name, passes, opt_name, opt_kwargs, loss_impl) -> dict:
    from memlab.model import split_trainable
    m = ml.compose(*passes)(model) if passes else model
    tx, kw = _optimizer(opt_name, opt_kwargs)
    trainable = split_trainable(m, m.params)[0]
    analytic_state = ml.optim.state_bytes(opt_name, trainable, **kw)
    ctx = ml.nn.use_cross_entropy(loss_impl)
    with ctx:
        rep = ml.memory.profile(m, "train", batch=FLAGS.batch, seq=FLAGS.seq, optimizer=tx,
                                name=f"{model.spec.name} {name}")
    cats = rep.by_category
    row = {"row": name, "optimizer": opt_name, "optimizer_kwargs": {k: str(v) for k, v in kw.items()},
           "loss": loss_impl, "passes": [p.name for p in passes],
           "argument_bytes": rep.argument_bytes, "output_bytes": rep.output_bytes,
           "alias_bytes": rep.alias_bytes, "temp_bytes": rep.temp_bytes, "peak_bytes": rep.peak_bytes,
           "params_bytes": cats["params"], "gradients_bytes": cats["gradients"],
           "optimizer_state_bytes": cats["optimizer_state"],
           "optimizer_state_analytic": analytic_state,
           "optimizer_state_exact": cats["optimizer_state"] == analytic_state,
           "compile_seconds": rep.compile_seconds}
    return row


def run_compile() -> dict:
    out = {}
    for mname in FLAGS.models:
        model = ml.models.abstract(mname, dtype="bfloat16", param_dtype="bfloat16")
        rows = []
        for name, (passes, opt, kw, loss) in compile_rows().items():
            t0 = time.perf_counter()
            try:
                row = compile_row(model, name, passes, opt, kw, loss)
            except Exception as e:  # noqa: BLE001 -- a row that fails to compile is a result
                row = {"row": name, "error": f"{type(e).__name__}: {e}"[:500]}
                print(f"{mname:10s} {name:36s} ERROR {row['error'][:200]}")
                rows.append(row)
                continue
            rows.append(row)
            print(f"{mname:10s} {name:36s} peak {fmt_bytes(row['peak_bytes']):>10}  "
                  f"state {fmt_bytes(row['optimizer_state_bytes']):>10}  "
                  f"temp {fmt_bytes(row['temp_bytes']):>10}  ({time.perf_counter() - t0:.0f}s)")
        base = next((r for r in rows if r["row"] == "adamw (baseline)" and "peak_bytes" in r), None)
        if base is not None:
            for r in rows:
                if "peak_bytes" in r:
                    r["peak_vs_baseline"] = r["peak_bytes"] / base["peak_bytes"]
                    r["state_vs_baseline"] = r["optimizer_state_bytes"] / base["optimizer_state_bytes"]
                    r["temp_vs_baseline"] = r["temp_bytes"] / max(base["temp_bytes"], 1)
        out[mname] = rows
    out["anchors"] = {
        "galore": "LLaMA-7B pre-training on a 24 GB GPU (8-bit GaLore, per-layer weight updates)",
        "apollo_mini": "LLaMA-7B pre-training under 12 GB (APOLLO-Mini with 8-bit weights/grads)",
        "8bit_optimizers": "optimizer state -75% vs 32-bit Adam",
    }
    out["settings"] = {"batch": FLAGS.batch, "seq": FLAGS.seq, "dtype": "bfloat16"}
    return out


# ---------------------------------------------------------------------------
# (b) real fine-tune
# ---------------------------------------------------------------------------
def finetune_runs() -> dict:
    """Run name -> (passes, optimizer name, optimizer kwargs, lr)."""
    lora = dict(rank=16, alpha=32.0, rules=ml.passes.lora.ALL_LINEAR)
    runs = {
        "adamw": ([], "adamw", {}, FLAGS.lr),
        "adamw8bit": ([], "adamw8bit", {}, FLAGS.lr),
        "adamw8bit-stable-embed": ([], "adamw8bit", {"stable_embedding": True}, FLAGS.lr),
        "galore": ([], "galore", {"rank": 144}, FLAGS.lr),
        "apollo": ([], "apollo", {"rank": 144}, FLAGS.lr),
        "lora": ([ml.passes.lora(**lora)], "adamw", {}, FLAGS.lora_lr),
        "qlora": ([ml.passes.quantize(ml.quant.nf4(64, double_quant=True), rules={r"embed": None}),
                   ml.passes.lora(**lora)], "adamw", {}, FLAGS.lora_lr),
    }
    if FLAGS.runs:
        runs = {k: v for k, v in runs.items() if k in FLAGS.runs}
    return runs


def run_finetune() -> dict:
    from memlab import data
    from memlab.evaluate import perplexity
    from memlab.train import TrainConfig, train

    base = ml.models.load("smollm2-135m")
    corpus = data.load_corpus("austen")
    train_tokens = data.tokenize(corpus, "train", base.tokenizer)
    val = data.eval_windows(data.tokenize(corpus, "validation", base.tokenizer), FLAGS.ft_seq,
                            max_windows=16)
    out = {"settings": {"model": "smollm2-135m (float32)", "steps": FLAGS.steps,
                        "batch": FLAGS.ft_batch, "seq": FLAGS.ft_seq, "lr": FLAGS.lr,
                        "lora_lr": FLAGS.lora_lr, "warmup": 10, "schedule": "warmup + cosine",
                        "validation": "16 windows of Northanger Abbey"}}
    before = perplexity(base, val)
    out["validation_before"] = before
    print(f"validation perplexity before fine-tuning: {before['perplexity']:.3f}")
    runs = []
    for name, (passes, opt, kw, lr) in finetune_runs().items():
        model = ml.compose(*passes)(base) if passes else base
        cfg = TrainConfig(steps=FLAGS.steps, batch=FLAGS.ft_batch, seq=FLAGS.ft_seq, optimizer=opt,
                          optimizer_kwargs=kw, lr=lr, warmup=10, log_every=10, seed=0)
        rep = ml.memory.profile(model, "train", batch=FLAGS.ft_batch, seq=FLAGS.ft_seq,
                                optimizer=ml.optim.get(opt, **kw))
        t0 = time.perf_counter()
        res = train(model, cfg, train_tokens)
        secs = time.perf_counter() - t0
        after = perplexity(res.model, val)
        row = {"run": name, "optimizer": opt, "optimizer_kwargs": kw, "lr": lr,
               "passes": [p.name for p in passes], "losses": [float(x) for x in res.losses],
               "final_loss_avg10": float(np.mean(res.losses[-10:])),
               "validation_perplexity": after["perplexity"], "seconds": secs,
               "peak_bytes": rep.peak_bytes, "temp_bytes": rep.temp_bytes,
               "params_bytes": rep.by_category["params"],
               "gradients_bytes": rep.by_category["gradients"],
               "optimizer_state_bytes": rep.by_category["optimizer_state"]}
        runs.append(row)
        out["runs"] = _merge_runs(FLAGS.out, out["settings"], runs)
        results.write(FLAGS.out, out, key="finetune")      # after every run: nothing is lost
        print(f"{name:10s} loss(last10) {row['final_loss_avg10']:.4f}  val ppl "
              f"{row['validation_perplexity']:.3f}  state {fmt_bytes(row['optimizer_state_bytes'])}"
              f"  peak {fmt_bytes(row['peak_bytes'])}  {secs:.0f}s")
    return out


def _merge_runs(path: str, settings: dict, runs: list) -> list:
    """Runs of this call, plus earlier runs (same settings) of names not rerun."""
    import json
    import os
    if not os.path.exists(path):
        return list(runs)
    with open(path) as f:
        old = json.load(f).get("finetune", {})
    if old.get("settings") != settings:
        return list(runs)
    names = {r["run"] for r in runs}
    return [r for r in old.get("runs", []) if r["run"] not in names] + list(runs)


def plot(ft: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ft.get("runs", []):
        losses = np.asarray(r["losses"])
        k = 5
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=r["run"])
        bx.bar(r["run"], r["peak_bytes"] / 2**20)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (5-step mean)")
    ax.set_title("SmolLM2-135M fine-tune on Austen")
    ax.legend()
    bx.set_ylabel("compiled step peak (MiB, XLA memory_analysis)")
    bx.set_title("step memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(_):
    out = {}
    if FLAGS.part in ("all", "compile"):
        out["compile"] = run_compile()
        results.write(FLAGS.out, out["compile"], key="compile")
    if FLAGS.part in ("all", "finetune"):
        out["finetune"] = run_finetune()
        plot(out["finetune"], FLAGS.out.replace(".json", ".png"))


if __name__ == "__main__":
    app.run(main)

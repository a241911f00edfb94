"""memlab against PyTorch/transformers on this CPU, side by side in one process.

    make bench                                   # builds .venv-bench, writes results/bench_cpu.json
    .venv-bench/bin/python benchmarks/vs_transformers.py --parts=prefill --prefill=512

torch (CPU) and transformers come from the ``bench`` extra (``make bench-env`` puts them
in ``.venv-bench``; they are never part of ``make test``).  Both libraries run the same
weights: memlab's model is written as a Hugging Face checkpoint
(:func:`memlab.models.hf.save`) and read back by ``AutoModelForCausalLM`` in float32,
with the same thread count and the same token inputs.  Before anything is timed the two
models' logits are compared.

Each measurement is the median of ``--repeats`` runs after a warm-up at the identical
shape (memlab's compile and PyTorch's first-call costs excluded); the ratio is
memlab's speed over transformers' (above 1: memlab is faster).

* **prefill** at each ``--prefill`` length, batch 1: the prompt into an empty cache and
  the next token's logits (transformers: ``logits_to_keep=1``, as its ``generate`` does).
* **decode**: greedy tokens/s at each ``--batches`` size and ``--contexts`` length L:
  a prompt of ``L - new_tokens`` tokens is prefilled (not timed), then ``--new_tokens``
  tokens are decoded, so the last step attends over L positions.  memlab: its
  generation engine (:func:`memlab.generate.decode`) on a cache of L slots;
  transformers: its cache and greedy loop (the model called one token at a time,
  ``argmax`` of the last logits, as ``generate`` does without its logits processors).
* **train**: one step, forward + backward + AdamW, at ``--train_batch`` x ``--train_seq``
  tokens (memlab: the train step of :func:`memlab.train.train`, donated state;
  transformers: ``loss.backward()`` and ``torch.optim.AdamW``).
* **throughput** (memlab only): Austen perplexity, teacher-forced decode perplexity and
  the fine-tune step, in tokens/s.

Peak RSS: the process's resident set is sampled every millisecond while each
measurement runs; ``rss_peak_mib`` is its peak, ``rss_added_mib`` the peak above the
resident set when the measurement started (both libraries share the process).
"""
import contextlib
import json
import os
import platform
import tempfile
import threading
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "smollm2-135m", ["smollm2-135m", "gemma3-270m"],
                  "Real model measured (memlab.models.load name).")
flags.DEFINE_integer("threads", 2, "Threads for both libraries (torch.set_num_threads; XLA:CPU "
                     "uses the cores it is given).", lower_bound=1)
flags.DEFINE_list("parts", ["prefill", "decode", "train", "throughput"],
                  "Which measurements to run.")
flags.DEFINE_list("prefill", ["128", "512", "2048"], "Prefill lengths (batch 1).")
flags.DEFINE_list("batches", ["1", "8", "32"], "Decode batch sizes.")
flags.DEFINE_list("contexts", ["256", "2048"], "Decode context lengths (cache length).")
flags.DEFINE_integer("new_tokens", 32, "Tokens decoded per decode measurement.", lower_bound=2)
flags.DEFINE_integer("train_batch", 4, "Train step batch.", lower_bound=1)
flags.DEFINE_integer("train_seq", 512, "Train step sequence length.", lower_bound=8)
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (the median is kept).",
                     lower_bound=1)
flags.DEFINE_float("tolerance", 1e-4, "Largest logit difference allowed between the two "
                   "libraries, relative to the largest logit.")
flags.DEFINE_string("json", "results/bench_cpu.json", "Results file.")
flags.DEFINE_string("key", "vs_transformers", "Key of this run in the results file.")
flags.DEFINE_string("table", None, "Print the README's Markdown tables from this results file "
                    "and measure nothing.")

PARTS = ("prefill", "decode", "train", "throughput")


def _need_peer():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"benchmarks/vs_transformers.py needs PyTorch and transformers ({e}). "
                         "Install the bench extra: `make bench-env` (a .venv-bench of its own) "
                         "or `pip install 'memlab[bench]'`, then run it with that Python.")


def _ints(name, values, low=1):
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise flags.ValidationError(f"--{name} must be integers, got {values}") from None
    if any(v < low for v in out):
        raise flags.ValidationError(f"--{name} values must be >= {low}, got {out}")
    return out


class RSS:
    """Peak resident set size while a block runs (sampled by a thread)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    @contextlib.contextmanager
    def peak(self, into: dict):
        start, top, stop = self.now(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                top[0] = max(top[0], self.now())
                time.sleep(0.001)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            top[0] = max(top[0], self.now())
            into["rss_peak_mib"] = round(top[0] / 2**20, 1)
            into["rss_added_mib"] = round((top[0] - start) / 2**20, 1)


def median_time(fn, repeats, setup=None):
    """Median seconds of ``fn(setup())`` over ``repeats`` runs after one warm-up run."""
    import numpy as np
    times = []
    for i in range(repeats + 1):
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg)
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
    return float(np.median(times)), [round(t, 4) for t in times]


def table(path: str) -> str:
    """The README's tables: memlab against transformers, and memlab's research loops."""
    with open(path) as f:
        res = json.load(f)
    r = res["vs_transformers"]
    lines = [f"{r['model']} float32, {r['threads']} threads on {r['cpu']}; torch "
             f"{r['torch']}, transformers {r['transformers']} ({r['transformers_attention']}); "
             f"logits agree to {r['agreement']['relative']:.1e} (relative); medians of "
             f"{r['repeats']} runs:", "",
             "| measurement | memlab | transformers | memlab speed-up | peak RSS added, memlab / "
             "transformers |", "|---|---|---|---|---|"]
    mem = lambda row: (f"{row['memlab_mem']['rss_added_mib']:.0f} / "  # noqa: E731
                       f"{row['transformers_mem']['rss_added_mib']:.0f} MiB")
    for row in r.get("prefill", []):
        lines.append(f"| prefill {row['tokens']} tokens | {row['memlab_s']:.3f} s | "
                     f"{row['transformers_s']:.3f} s | **{row['speedup']:.2f}×** | {mem(row)} |")
    for row in r.get("decode", []):
        lines.append(f"| decode batch {row['batch']}, context {row['context']} | "
                     f"{row['memlab_tok_s']:.1f} tok/s | {row['transformers_tok_s']:.1f} tok/s | "
                     f"**{row['speedup']:.2f}×** | {mem(row)} |")
    for row in r.get("train", []):
        lines.append(f"| train step {row['batch']}×{row['seq']} (AdamW) | {row['memlab_s']:.2f} s "
                     f"| {row['transformers_s']:.2f} s | **{row['speedup']:.2f}×** | {mem(row)} |")
    before, after = res.get("throughput_before"), r.get("throughput")
    if before and after:
        lines += ["", "memlab's research loops on Austen, tokens/s (`throughput`; before: the "
                  "same script on the engine before this work, `throughput_before`):", "",
                  "| loop | before | after | ratio |", "|---|---|---|---|"]
        names = {"perplexity": "perplexity, 4×512 windows",
                 "decode_perplexity": "decode perplexity, 4×256 (prefix 128)",
                 "finetune_step": "fine-tune step, 4×512 (AdamW)"}
        for k, name in names.items():
            b, a = before["throughput"][k]["tokens_s"], after[k]["tokens_s"]
            lines.append(f"| {name} | {b:.0f} | {a:.0f} | **{a / b:.2f}×** |")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.table:
        print(table(FLAGS.table))
        return
    if not set(FLAGS.parts) <= set(PARTS):
        raise app.UsageError(f"--parts must be a subset of {PARTS}, got {FLAGS.parts}")
    prefills = _ints("prefill", FLAGS.prefill, 2)
    batches = _ints("batches", FLAGS.batches)
    contexts = _ints("contexts", FLAGS.contexts, FLAGS.new_tokens + 1)
    peer = bool(set(FLAGS.parts) - {"throughput"})
    if peer:
        _need_peer()
    os.environ.setdefault("OMP_NUM_THREADS", str(FLAGS.threads))

    import jax
    import jax.numpy as jnp
    import numpy as np

    import memlab as ml
    from memlab import generate as gen
    from memlab.models import hf

    rss = RSS()
    model = ml.models.load(FLAGS.model)
    vocab = model.spec.vocab_size
    rng = np.random.default_rng(0)
    out = {"model": FLAGS.model, "threads": FLAGS.threads, "repeats": FLAGS.repeats,
           "cpu": _cpu_name(), "cores": os.cpu_count(), "machine": platform.machine()}

    if peer:
        import torch
        import transformers
        torch.set_num_threads(FLAGS.threads)
        out["torch"], out["transformers"] = torch.__version__, transformers.__version__
        tmp = tempfile.TemporaryDirectory()
        hf.save(model, tmp.name)
        peer_model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp.name, dtype=torch.float32).eval()
        out["transformers_attention"] = peer_model.config._attn_implementation
        out["agreement"] = _agreement(model, peer_model, rng, vocab)
        print(f"logits agree: max |diff| / max |logit| = {out['agreement']['relative']:.2e}")
        if out["agreement"]["relative"] > FLAGS.tolerance:
            raise SystemExit(f"the two libraries' logits differ by {out['agreement']['relative']:.2e}"
                             f" > --tolerance={FLAGS.tolerance}: not timing different models")

    def record(section, row):
        out.setdefault(section, []).append(row)
        print(section, json.dumps(row))

    if "prefill" in FLAGS.parts:
        for n in prefills:
            ids = rng.integers(0, vocab, (1, n)).astype(np.int32)
            row = {"tokens": n}
            with rss.peak(mem := {}):
                t, runs = median_time(lambda _: jax.block_until_ready(
                    gen.prefill(model, ids, cache_len=n)), FLAGS.repeats)
            row["memlab_s"], row["memlab_runs"], row["memlab_mem"] = t, runs, mem
            with torch.inference_mode(), rss.peak(mem := {}):
                t, runs = median_time(lambda _: peer_model(
                    torch.from_numpy(ids.astype(np.int64)), use_cache=True, logits_to_keep=1),
                    FLAGS.repeats)
            row["transformers_s"], row["transformers_runs"], row["transformers_mem"] = t, runs, mem
            row["speedup"] = round(row["transformers_s"] / row["memlab_s"], 3)
            record("prefill", row)

    if "decode" in FLAGS.parts:
        steps = FLAGS.new_tokens
        for ctx in contexts:
            for b in batches:
                prompt = rng.integers(0, vocab, (b, ctx - steps)).astype(np.int32)
                row = {"batch": b, "context": ctx, "new_tokens": steps}
                first, cache = gen.prefill(model, prompt, cache_len=ctx)

                def run_memlab(state):
                    toks = gen.decode(model, *state, steps)
                    assert toks.shape == (b, steps)
                with rss.peak(mem := {}):
                    t, runs = median_time(run_memlab, FLAGS.repeats,
                                          setup=lambda: jax.tree.map(jnp.copy, (first, cache)))
                row["memlab_tok_s"] = round(b * steps / t, 2)
                row["memlab_runs"], row["memlab_mem"] = runs, mem
                ours = gen.decode(model, *jax.tree.map(jnp.copy, (first, cache)), steps)
                del cache
                with torch.inference_mode():
                    tprompt = torch.from_numpy(prompt.astype(np.int64))
                    pcache = transformers.DynamicCache(config=peer_model.config)
                    plogits = peer_model(tprompt, past_key_values=pcache, use_cache=True,
                                         logits_to_keep=1).logits[:, -1]
                    n0 = tprompt.shape[1]

                    def rewind():          # back to the prefilled prompt
                        extra = pcache.get_seq_length() - n0
                        if extra > 0:
                            pcache.crop(-extra)

                    def run_peer(_):
                        rewind()
                        return _peer_greedy(peer_model, plogits, pcache, steps)
                    with rss.peak(mem := {}):
                        t, runs = median_time(run_peer, FLAGS.repeats)
                    rewind()
                    theirs = _peer_greedy(peer_model, plogits, pcache, steps).numpy()
                    del pcache
                row["transformers_tok_s"] = round(b * steps / t, 2)
                row["transformers_runs"], row["transformers_mem"] = runs, mem
                row["same_tokens"] = float(np.mean(ours == theirs))
                row["speedup"] = round(row["memlab_tok_s"] / row["transformers_tok_s"], 3)
                record("decode", row)

    if "train" in FLAGS.parts:
        b, s = FLAGS.train_batch, FLAGS.train_seq
        batch = rng.integers(0, vocab, (b, s + 1)).astype(np.int32)
        row = {"batch": b, "seq": s}
        with rss.peak(mem := {}):
            t, runs, loss = _memlab_train(model, batch)
        row.update(memlab_s=t, memlab_runs=runs, memlab_mem=mem, memlab_loss=loss)
        with rss.peak(mem := {}):
            t, runs, loss = _peer_train(peer_model, batch)
        row.update(transformers_s=t, transformers_runs=runs, transformers_mem=mem,
                   transformers_loss=loss)
        row["speedup"] = round(row["transformers_s"] / row["memlab_s"], 3)
        record("train", row)

    if "throughput" in FLAGS.parts:
        out["throughput"] = _throughput(model, rss)
        print("throughput", json.dumps(out["throughput"]))

    from memlab import results
    results.write(FLAGS.json, out, key=FLAGS.key)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _agreement(model, peer_model, rng, vocab):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    ids = rng.integers(0, vocab, (2, 128)).astype(np.int32)
    ours = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(ids)))
    with torch.inference_mode():
        theirs = peer_model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
    diff = float(np.abs(ours - theirs).max())
    return {"tokens": list(ids.shape), "max_abs_diff": diff,
            "relative": diff / float(np.abs(theirs).max())}


def _peer_greedy(peer_model, logits, cache, steps):
    import torch
    toks = []
    nxt = logits.argmax(-1)
    for i in range(steps):
        toks.append(nxt)
        if i == steps - 1:
            break
        logits = peer_model(nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        nxt = logits.argmax(-1)
    return torch.stack(toks, 1)


def _memlab_train(model, batch):
    """memlab's train step (the one :func:`memlab.train.train` runs) with AdamW."""
    import jax
    from memlab import train as T
    from memlab import train_step
    from memlab.model import split_trainable
    config = T.TrainConfig(steps=1, batch=batch.shape[0], seq=batch.shape[1] - 1,
                           optimizer="adamw", lr=1e-5, clip_norm=None, log_every=1)
    trainable, frozen = split_trainable(model)
    built = train_step.build(model, T.make_optimizer(config, trainable), config.step_options)
    state = {"params": jax.tree.map(lambda x: x.copy(), trainable)}
    state["opt"] = built.init_state(state["params"], frozen)
    rng = jax.random.key_data(jax.random.key(0))
    tokens = built.place_batch(batch)
    losses = []
    step = built.jit()

    def one(_):
        state["params"], state["opt"], _, metrics = step(
            state["params"], state["opt"], frozen, rng, tokens)
        losses.append(float(metrics["loss"]))          # waits for the step
    t, runs = median_time(one, FLAGS.repeats)
    return t, runs, losses[0]


def _peer_train(peer_model, batch):
    import numpy as np
    import torch
    peer_model.train()
    opt = torch.optim.AdamW(peer_model.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.from_numpy(batch.astype(np.int64))
    losses = []

    def one(_):
        logits = peer_model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    t, runs = median_time(one, FLAGS.repeats)
    peer_model.eval()
    return t, runs, losses[0]


def _throughput(model, rss):
    """memlab's research loops in tokens/s: Austen perplexity (4 x 512), decode perplexity
    (4 x 256, prefix 128) and the fine-tune step (4 x 512)."""
    from memlab import data, evaluate
    tokens = data.tokenize(data.load_corpus("austen"), "test", model.tokenizer)
    bos = data.bos_id(model.tokenizer)
    res = {}
    win = data.eval_windows(tokens, 512, max_windows=4, bos=bos)
    with rss.peak(mem := {}):
        t, runs = median_time(lambda _: evaluate.perplexity(model, win, batch_size=4),
                              FLAGS.repeats)
    res["perplexity"] = {"windows": list(win.shape), "tokens_s": round(win.size / t, 1),
                         "runs": runs, "mem": mem}
    short = data.eval_windows(tokens, 256, max_windows=4, bos=bos)
    with rss.peak(mem := {}):
        t, runs = median_time(
            lambda _: evaluate.decode_perplexity(model, short, 128, batch_size=4), FLAGS.repeats)
    res["decode_perplexity"] = {"windows": list(short.shape), "prefix": 128,
                                "tokens_s": round(short.shape[0] * (256 - 128) / t, 1),
                                "runs": runs, "mem": mem}
    with rss.peak(mem := {}):
        t, runs, loss = _memlab_train(model, win)
    res["finetune_step"] = {"batch": list(win.shape), "tokens_s": round(
        win.shape[0] * (win.shape[1] - 1) / t, 1), "runs": runs, "mem": mem, "loss": loss}
    return res


if __name__ == "__main__":
    app.run(main)

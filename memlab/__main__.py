"""memlab command line (absl flags).

    python -m memlab profile --model=llama2-7b --task=train --batch=1 --seq=2048 --dtype=bfloat16
    python -m memlab generate --model=smollm2-135m --prompt="The capital of France is"
    python -m memlab perplexity --model=smollm2-135m --corpus=austen --split=test
    python -m memlab demo          # the `make demo` job
    python -m memlab fetch         # download the Austen corpus into ~/.cache/memlab
    python -m memlab plan --model=llama2-7b --task=train --budget=24GB
    python -m memlab profile --target=h100 --model=llama2-7b --task=train --seq=2048
    python -m memlab train --model=smollm2-135m --optimizer=adamw --steps=200 --batch=4 \
        --seq=256 --ckpt_dir=runs/a --resume
    python -m memlab train --model=llama2-7b --lora_rank=16 --quantize=nf4 --batch=4 \
        --accum=2 --precision=bf16 --dry_run      # the step train runs, compiled: its memory
"""
from __future__ import annotations

import itertools
import os
import sys
import time

from absl import app, flags

COMMANDS = ("profile", "generate", "perplexity", "demo", "fetch", "train", "plan")

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model name (see memlab.models.names()), a Hugging "
                    "Face checkpoint directory or a .gguf file.")
flags.DEFINE_enum("task", "train", ["train", "prefill", "decode", "finetune", "inference"],
                  "Step to profile (plan also takes finetune = LoRA, inference = decode).")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("seq", 512, "Sequence length (train/prefill) or KV cache length (decode).")
DTYPES = ["float32", "bfloat16", "float16"]
flags.DEFINE_enum("dtype", None, DTYPES, "Weight and compute dtype (default: float32 for real "
                  "models, bfloat16 for abstract ones).")
flags.DEFINE_string("optimizer", "adamw", "Optimizer for task=train (state in float32).")
flags.DEFINE_string("prompt", "The capital of France is", "Prompt for generate.")
flags.DEFINE_integer("max_new_tokens", 24, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the smallest token set reaching this mass.")
flags.DEFINE_string("kv", None, "KV-cache policy for generate/profile, e.g. kivi2, kivi4, "
                    "snapkv:budget=256 (see memlab.kv.names()); default dense.")
flags.DEFINE_string("corpus", "austen", "Corpus: austen, pydoc, or a path to a text file.")
flags.DEFINE_string("split", "test", "Corpus split for perplexity.")
flags.DEFINE_integer("eval_seq", 512, "Window length for perplexity.")
flags.DEFINE_integer("eval_windows", 16, "Number of windows for perplexity (0 = all).")
flags.DEFINE_string("json", None, "Also write the result as JSON to this path.")
# train (memlab.train)
flags.DEFINE_integer("steps", 200, "train: optimizer steps.")
flags.DEFINE_float("lr", 3e-4, "train: peak learning rate.")
flags.DEFINE_integer("warmup", 0, "train: linear warmup steps before the cosine decay.")
flags.DEFINE_integer("accum", 1, "train: gradient-accumulation micro-batches per step.")
flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16"],
                  "train: bf16 = bfloat16 compute with float32 master weights and state.")
flags.DEFINE_float("clip_norm", 1.0, "train: global gradient-norm clip (0 = off).")
flags.DEFINE_enum("nan_policy", "skip", ["skip", "stop"], "train: on a non-finite loss.")
flags.DEFINE_integer("log_every", 10, "train: steps between log records.")
flags.DEFINE_string("ckpt_dir", None, "train: checkpoint (and log) directory.")
flags.DEFINE_integer("ckpt_every", 0, "train: steps between checkpoints (0 = at the end).")
flags.DEFINE_integer("keep", 3, "train: checkpoints kept.")
flags.DEFINE_bool("resume", False, "train: continue from the latest checkpoint in --ckpt_dir.")
flags.DEFINE_integer("stop_at", None, "train: stop after this step (the schedule still spans "
                     "--steps; resume later with --resume).")
flags.DEFINE_integer("seed", 0, "train: data-order seed.")
flags.DEFINE_bool("fused", False, "train: fused backward-update (LOMO, memlab.fused): each layer "
                  "updated inside the backward, no whole-model gradient; full training only.")
flags.DEFINE_bool("dry_run", False, "train: compile the step train would run (on abstract "
                  "shapes, nothing allocated) and print its memory table, the same as profile "
                  "--task=train with these flags; no training.")
flags.DEFINE_integer("lora_rank", 0, "train: LoRA adapters of this rank (0 = full fine-tune).")
flags.DEFINE_string("quantize", None, "train: QLoRA base format (nf4, int4, int8); needs "
                    "--lora_rank.")
# plan (memlab.memory.plan)
flags.DEFINE_string("budget", "24GB", "plan: device memory budget, e.g. 24GB, 24GiB, 12e9.")
flags.DEFINE_enum("objective", "speed", ["speed", "quality"], "plan: what to rank by.")
flags.DEFINE_integer("verify", 3, "plan: candidates compiled to verify (0 = analytic only).")
flags.DEFINE_integer("devices", 1, "plan: devices to shard over (FSDP / DP candidates).")
flags.DEFINE_string("target", None, "profile/plan: compile for this device on this machine "
                    "(memlab.targets: h100, a100, h200, h100x8, v5e, v6e, v5e:4x4, ...); needs "
                    "the targets environment (make targets-env).")


def _load(name: str, dtype: str | None):
    import memlab as ml
    if name in ml.models.REAL_WEIGHTS or os.path.exists(name):  # real weights: float32
        return ml.models.load(name, dtype=dtype or "float32")
    return ml.models.load(name, dtype=dtype or "bfloat16")


def _with_kv(model):
    import memlab as ml
    return ml.passes.kv_compress(FLAGS.kv)(model) if FLAGS.kv else model


def cmd_profile() -> dict:
    import memlab as ml
    if FLAGS.task == "train":  # the step train runs with these flags (as train --dry_run)
        return _profile_train(_with_kv(_train_model(abstract=True)))
    model = _with_kv(_load(FLAGS.model, FLAGS.dtype))
    report = ml.memory.profile(model, FLAGS.task, batch=FLAGS.batch, seq=FLAGS.seq,
                               optimizer=FLAGS.optimizer, target=FLAGS.target)
    print(report.table())
    return {"profile": report.to_dict()}


def _eval_windows(model, corpus: str, split: str, seq: int, n: int):
    from memlab import data
    tokens = data.tokenize(data.load_corpus(corpus), split, model.tokenizer)
    return data.eval_windows(tokens, seq, max_windows=n or None, bos=data.bos_id(model.tokenizer))


def cmd_perplexity() -> dict:
    from memlab.evaluate import perplexity
    model = _load(FLAGS.model, FLAGS.dtype)
    windows = _eval_windows(model, FLAGS.corpus, FLAGS.split, FLAGS.eval_seq, FLAGS.eval_windows)
    res = perplexity(model, windows, progress=True)
    print(f"{FLAGS.model} perplexity on {FLAGS.corpus}/{FLAGS.split}: {res['perplexity']:.3f} "
          f"({res['tokens']} tokens, windows of {FLAGS.eval_seq})")
    return {"perplexity": res, "corpus": FLAGS.corpus, "split": FLAGS.split,
            "eval_seq": FLAGS.eval_seq}


def cmd_generate() -> dict:
    from memlab.generate import stream
    model = _with_kv(_load(FLAGS.model, FLAGS.dtype))
    tok = model.tokenizer
    special = dict(model.extra("special_tokens", ()))
    ids, shown = [], ""
    rows = stream(model, [tok.encode(FLAGS.prompt).ids], FLAGS.max_new_tokens,
                  temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                  stop_tokens=[special["eos"]] if "eos" in special else [])
    # the first step checks the flags (lengths, the policy against the cache) and builds the
    # cache: an error then is one line of its own, not glued to the printed prompt
    first = next(rows)
    print(FLAGS.prompt, end="", flush=True)
    for row in itertools.chain([first], rows):
        if row[0] is None:
            break
        ids.append(row[0])
        text = tok.decode(ids, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)      # stream the new characters
        shown = text
    print()
    return {"prompt": FLAGS.prompt, "completion": shown, "kv": FLAGS.kv or "dense"}


def cmd_fetch() -> dict:
    from memlab import data
    path = data.fetch_austen()
    books = data.austen_books()
    print(f"Austen corpus at {path}: " + ", ".join(f"{t} ({len(x.split())} words)"
                                                   for t, x in books.items()))
    return {"path": str(path)}


def cmd_demo() -> dict:
    """Load SmolLM2, profile prefill/decode/train, perplexity on Austen, generate."""
    import memlab as ml
    from memlab.evaluate import perplexity
    from memlab.generate import generate

    t0 = time.perf_counter()
    print("Loading SmolLM2-135M-Instruct (real weights, dequantized from GGUF to float32)...")
    model = ml.models.load("smollm2-135m")
    n = sum(x.size for x in __import__("jax").tree_util.tree_leaves(model.params))
    print(f"  {n:,} parameters, {ml.memory.fmt_bytes(ml.memory.tree_bytes(model.params))} "
          f"in float32; loaded in {time.perf_counter() - t0:.1f}s\n")
    reports = {}
    for task, batch, seq in (("prefill", 1, 2048), ("decode", 8, 2048), ("train", 4, 512)):
        r = ml.memory.profile(model, task, batch=batch, seq=seq)
        reports[task] = r.to_dict()
        print(r.table(), "\n")
    bf16 = ml.compose(ml.passes.cast("bfloat16", compute=True))(model)
    r = ml.memory.profile(bf16, "decode", batch=8, seq=2048, name="smollm2-135m + cast(bf16)")
    reports["decode_bf16"] = r.to_dict()
    print(r.table(), "\n")

    windows = _eval_windows(model, "austen", "test", FLAGS.eval_seq, FLAGS.eval_windows)
    ppl = perplexity(model, windows, progress=True)
    print(f"Perplexity on held-out Austen (Persuasion), {ppl['tokens']} tokens in windows of "
          f"{FLAGS.eval_seq}: {ppl['perplexity']:.3f}\n")
    text = generate(model, FLAGS.prompt, FLAGS.max_new_tokens, progress=True)
    print(f"Greedy generation:\n  {FLAGS.prompt}{text}\n")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return {"profiles": reports, "perplexity": ppl, "prompt": FLAGS.prompt, "completion": text,
            "eval_seq": FLAGS.eval_seq}


def _train_tokens(model, corpus: str):
    """Training tokens: the corpus's train split with the model's tokenizer, or its UTF-8
    bytes for a model without one (e.g. ``tiny``, vocabulary 256)."""
    import numpy as np

    from memlab import data
    c = data.load_corpus(corpus)
    if model.tokenizer is not None:
        return data.tokenize(c, "train", model.tokenizer)
    vocab = getattr(model.spec, "vocab_size", 0)
    if vocab < 256:
        raise ValueError(f"--model={FLAGS.model} has no tokenizer and a vocabulary of {vocab} < "
                         "256, so it cannot be trained on text bytes")
    return np.frombuffer(c.text("train").encode("utf-8"), np.uint8).astype(np.int32)


def _train_model(abstract: bool = False):
    """The model train runs for the flags (``abstract``: its shapes, nothing allocated or
    read: what train --dry_run and profile --task=train compile)."""
    import importlib

    import memlab as ml
    if abstract:  # the shapes of what load / init give below
        dt = FLAGS.dtype or "float32"
        model = ml.models.abstract(FLAGS.model, param_dtype=dt, dtype=dt)
    elif FLAGS.model in ml.models.REAL_WEIGHTS or os.path.exists(FLAGS.model):
        model = ml.models.load(FLAGS.model, dtype=FLAGS.dtype or "float32")
    else:  # shapes-only names train from a random init
        import jax
        dt = {"param_dtype": FLAGS.dtype, "dtype": FLAGS.dtype} if FLAGS.dtype else {}
        model = ml.models.init(FLAGS.model, jax.random.key(FLAGS.seed), **dt)
    if FLAGS.quantize:
        if not FLAGS.lora_rank:
            raise ValueError("--quantize trains adapters over a frozen quantized base (QLoRA) "
                             "and needs --lora_rank=R")
        formats = {"nf4": lambda: ml.quant.nf4(64, double_quant=True),
                   "int4": lambda: ml.quant.int4(64), "int8": lambda: ml.quant.int8()}
        if FLAGS.quantize not in formats:
            raise ValueError(f"--quantize={FLAGS.quantize!r}: choose one of {sorted(formats)}")
        # QLoRA: the base's linear layers are quantized, the output head stays float
        model = ml.passes.quantize(formats[FLAGS.quantize](), rules={r"lm_head": None})(model)
    if FLAGS.lora_rank:
        if "lora" not in ml.passes.names():
            raise ValueError("--lora_rank needs the lora pass (memlab.passes.lora), which this "
                             "memlab does not have")
        rules = importlib.import_module("memlab.passes.lora").ALL_LINEAR if FLAGS.quantize \
            else None
        model = ml.passes.lora(rank=FLAGS.lora_rank, rules=rules)(model)
    return model


def _train_config():
    from memlab.train import TrainConfig
    return TrainConfig(steps=FLAGS.steps, batch=FLAGS.batch, seq=FLAGS.seq, accum=FLAGS.accum,
                       optimizer=FLAGS.optimizer, lr=FLAGS.lr, warmup=FLAGS.warmup,
                       precision=FLAGS.precision, clip_norm=FLAGS.clip_norm or None,
                       nan_policy=FLAGS.nan_policy, log_every=FLAGS.log_every,
                       ckpt_every=FLAGS.ckpt_every, ckpt_dir=FLAGS.ckpt_dir, keep=FLAGS.keep,
                       seed=FLAGS.seed, fused=FLAGS.fused)


def _profile_train(model) -> dict:
    """Compile the step train runs for the flags (memlab.train_step) and print its table."""
    import memlab as ml
    cfg = _train_config()
    report = ml.memory.profile(model, "train", batch=cfg.batch, seq=cfg.seq, config=cfg,
                               target=FLAGS.target)
    print(report.table())
    return {"profile": report.to_dict()}


# train flags a dry run cannot honour: (flag, why)
_NOT_IN_DRY_RUN = (("resume", "a dry run compiles the step and resumes nothing"),
                   ("stop_at", "a dry run runs no steps"),
                   ("kv", "train has no KV cache (the policy applies to prefill/decode)"))


def _dry_run() -> dict:
    for flag, why in _NOT_IN_DRY_RUN:
        if FLAGS[flag].present:
            raise ValueError(f"--{flag} with --dry_run: {why}; drop --{flag}")
    if FLAGS.task != "train":
        raise ValueError(f"--task={FLAGS.task} with train --dry_run, which compiles the train "
                         f"step; use profile --task={FLAGS.task} for that step")
    return _profile_train(_train_model(abstract=True))


def cmd_train() -> dict:
    from absl import logging

    from memlab.train import train
    if FLAGS.dry_run:
        return _dry_run()
    if FLAGS.target:
        raise ValueError(f"--target={FLAGS.target} compiles for a device this machine does not "
                         "have, so train cannot run there; add --dry_run to compile the step")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    cfg = _train_config()
    model = _train_model()
    tokens = _train_tokens(model, FLAGS.corpus)
    res = train(model, cfg, tokens, resume=FLAGS.resume, stop_at=FLAGS.stop_at)
    if len(res.steps):
        print(f"trained {FLAGS.model} steps {res.start_step + 1}-{int(res.steps[-1])}: loss "
              f"{res.losses[0]:.4f} -> {res.losses[-1]:.4f}, {res.steps_per_second:.2f} steps/s "
              f"after a {res.compile_seconds:.1f}s first step; skipped {res.skipped or 'none'}; "
              f"checkpoints {res.checkpoints or 'none'}")
    return {"train": {"config": cfg.to_dict(), "start_step": res.start_step,
                      "steps": res.steps.tolist(), "losses": res.losses.tolist(),
                      "lrs": res.lrs.tolist(), "grad_norms": res.grad_norms.tolist(),
                      "skipped": res.skipped, "checkpoints": res.checkpoints,
                      "steps_per_second": res.steps_per_second,
                      "compile_seconds": res.compile_seconds}}


def cmd_plan() -> dict:
    import memlab as ml
    seq = FLAGS.seq if FLAGS["seq"].present else None
    plan = ml.memory.plan(FLAGS.model, FLAGS.task, FLAGS.budget, batch=FLAGS.batch, seq=seq,
                          objective=FLAGS.objective, verify=FLAGS.verify, devices=FLAGS.devices,
                          target=FLAGS.target)
    print(plan.table())
    return {"plan": plan.to_dict()}


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m memlab {{{'|'.join(COMMANDS)}}} [--flags]")
    if FLAGS.target and not os.environ.get("JAX_PLATFORMS"):
        # compile-only: the CUDA plugin must register without starting a GPU runtime (on a
        # machine without one it would fail and be dropped); JAX has no backend yet here
        import jax
        jax.config.update("jax_platforms", "cpu")
    try:
        result = globals()[f"cmd_{argv[1]}"]()
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as e:
        # user mistakes and missing artifacts: one clear line, no XLA traceback
        print(f"memlab {argv[1]}: error: {e}", file=sys.stderr)
        return 2
    result.update(command=argv[1],
                  flags={k: FLAGS[k].value for k in ("model", "task", "batch", "seq", "dtype",
                                                      "optimizer", "target")})
    if FLAGS.json:
        from memlab import results
        results.write(FLAGS.json, result)
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()

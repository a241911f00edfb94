"""memlab.train: accumulation, NaN policies, logs, bit-exact resume, crash safety, CLI.

Most runs share one config (``CFG``) so every train() call compiles the same step
HLO (the persistent compilation cache then serves it); data are a low-entropy
Markov token stream (16 symbols) on the tiny Llama (vocabulary 256), so the loss falls.
"""
import dataclasses
import importlib
import json
import os
import shutil
import struct
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import memlab as ml
from memlab.checkpoint import CheckpointError, Checkpointer
from memlab.train import (LOG_NAME, NonFiniteError, TrainConfig, compute_model, lr_schedule,
                          make_optimizer, make_step, token_batches, train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = TrainConfig(steps=12, batch=4, seq=24, accum=2, optimizer="adamw", lr=1e-2, warmup=2,
                  clip_norm=1.0, log_every=1, ckpt_every=3, seed=3)


@pytest.fixture(scope="module")
def model():
    return ml.models.init("tiny", jax.random.key(11))


@pytest.fixture(scope="module")
def stream():
    """16 symbols (token ids 1, 17, 33, ...), each followed by one of 3 successors drawn
    from a random table: a model can go from log(256) to about log(3) nats."""
    rng = np.random.default_rng(0)
    table = rng.integers(0, 16, (16, 3))
    state = np.empty(6000, np.int64)
    state[0] = 0
    choice = rng.integers(0, 3, state.shape[0])
    for i in range(1, state.shape[0]):
        state[i] = table[state[i - 1], choice[i]]
    return (1 + 16 * state).astype(np.int32)


@pytest.fixture(scope="module")
def straight(model, stream, tmp_path_factory):
    """12 uninterrupted steps with checkpoints every 3 (the reference run)."""
    d = str(tmp_path_factory.mktemp("straight"))
    return train(model, dataclasses.replace(CFG, ckpt_dir=d), stream, progress=False), d


def _read_events(log_dir):
    """Scalars from tensorboard event files, parsed independently of tensorboardX's writer:
    TFRecord framing (u64 length, u32 crc, data, u32 crc) then the Event proto."""
    from tensorboardX.proto import event_pb2
    out = {}
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        blob = open(os.path.join(log_dir, name), "rb").read()
        pos = 0
        while pos < len(blob):
            (n,) = struct.unpack("<Q", blob[pos:pos + 8])
            ev = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def _poisoned(factory, bad_index, vocab):
    """Batches of ``factory`` with token id ``vocab`` (out of range: the embedding lookup
    fills NaN) in batch ``bad_index``."""
    def f(start=0):
        for i, b in enumerate(factory(start), start):
            if i == bad_index:
                b = b.copy()
                b[0, 3] = vocab
            yield b
    return f


# ---------------------------------------------------------------------------
def test_accumulation_equals_one_full_batch_step(model, stream):
    """accum=4 micro-batches of 2 == one plain SGD step on the batch of 8 (naive reference)."""
    cfg = TrainConfig(steps=1, batch=8, seq=24, accum=4, optimizer="sgd", lr=0.5,
                      schedule="constant", clip_norm=None, log_every=1, seed=5)
    batch = token_batches(stream, 8, 24, seed=5).at(0)
    res = train(model, cfg, stream, progress=False)
    loss = importlib.import_module("memlab.memory.profile").loss_fn(model)
    value, grads = jax.jit(jax.value_and_grad(loss))(model.params, jnp.asarray(batch))
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, model.params, grads)
    chex.assert_trees_all_close(res.model.params, expected, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(res.losses[0], value, rtol=1e-5)
    np.testing.assert_allclose(res.grad_norms[0], optax.tree.norm(grads), rtol=1e-4)
    # the step really moved the params (the comparison above is not vacuous)
    assert float(optax.tree.norm(grads)) > 1e-2


def test_loss_decreases_and_logs(straight):
    res, d = straight
    print(f"\ntiny, batch {CFG.batch} x seq {CFG.seq}, accum {CFG.accum}: loss "
          f"{res.losses[0]:.3f} -> {res.losses[-1]:.3f}, {res.steps_per_second:.1f} steps/s "
          f"after a {res.compile_seconds:.1f}s first step")
    assert res.steps.tolist() == list(range(1, 13)) and res.skipped == []
    assert res.losses[-3:].mean() < res.losses[0] - 2.0, res.losses
    np.testing.assert_allclose(res.lrs, [float(lr_schedule(CFG)(i)) for i in range(12)])
    assert res.checkpoints == [3, 6, 9, 12]
    assert Checkpointer(d).steps() == [6, 9, 12]  # keep=3
    records = [json.loads(ln) for ln in open(os.path.join(d, LOG_NAME))]
    assert [r["step"] for r in records] == list(range(1, 13))
    np.testing.assert_array_equal(np.float32([r["loss"] for r in records]), res.losses)
    events = _read_events(d)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/skipped"} <= set(events)
    np.testing.assert_array_equal(np.float32([events["train/loss"][s] for s in range(1, 13)]),
                                  res.losses)
    np.testing.assert_allclose([events["train/grad_norm"][s] for s in range(1, 13)],
                               res.grad_norms, rtol=1e-6)


HEAD_CFG = dataclasses.replace(CFG, steps=3, warmup=1, optimizer="sgd", lr=0.5)


@pytest.fixture(scope="module")
def head_sgd(model, stream):
    """SGD on the output head only (the model's trainable patterns)."""
    m = model.with_extras(trainable=(r"lm_head",))
    return m, train(m, HEAD_CFG, stream, progress=False)


def test_params_and_opt_state_cover_the_trainable_tree_only(model, head_sgd):
    """With a trainable pattern, frozen params are untouched and have no optimizer state."""
    _, res = head_sgd
    flat = jax.tree_util.tree_flatten_with_path(res.params)[0]
    assert [ml.path_str(p) for p, _ in flat] == ["lm_head/kernel"]
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), res.model.params,
                                   model.params)
    assert moved["lm_head"]["kernel"] and not moved["embed"]["embedding"]
    assert not any(jax.tree_util.tree_leaves(moved["layers"]))


def test_optimizer_that_needs_a_float_learning_rate_gets_the_schedule(stream, head_sgd,
                                                                      monkeypatch):
    """An optimizer whose update computes ``-learning_rate * g`` (fails on a callable) runs
    at lr 1 then scaled by the schedule: bitwise the same as SGD driven by the schedule."""
    def float_lr_sgd(learning_rate=0.1):
        def update(g, state, params=None):
            return jax.tree_util.tree_map(lambda x: -learning_rate * x, g), state
        return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

    monkeypatch.setitem(ml.optim.OPTIMIZERS._items, "float_lr_sgd", float_lr_sgd)
    m, ref = head_sgd
    res = train(m, dataclasses.replace(HEAD_CFG, optimizer="float_lr_sgd"), stream,
                progress=False)
    np.testing.assert_array_equal(res.lrs, ref.lrs)
    assert len(set(res.lrs.tolist())) == 3  # warmup then cosine: the schedule is not constant
    chex.assert_trees_all_equal(res.params, ref.params)


def test_qlora_trains_and_checkpoints_the_adapters_only(model, stream, straight, tmp_path):
    lora = importlib.import_module("memlab.passes.lora")
    qlora = ml.compose(ml.passes.quantize(ml.quant.nf4(64, double_quant=True),
                                          rules={r"lm_head": None}),
                       ml.passes.lora(rank=4, rules=lora.ALL_LINEAR))(model)
    cfg = dataclasses.replace(CFG, ckpt_dir=str(tmp_path))
    res = train(qlora, cfg, stream, stop_at=3, progress=False)
    paths = [ml.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(res.params)[0]]
    assert paths and all(p.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for p in paths)
    assert res.losses[-1] < res.losses[0]
    chex.assert_trees_all_equal(ml.model.split_trainable(res.model)[1],
                                ml.model.split_trainable(qlora)[1])  # frozen base untouched
    adapters = ml.memory.tree_bytes(res.params)
    assert ml.memory.tree_bytes(res.opt_state) < 2 * adapters + 64  # mu, nu + counters

    def on_disk(d):
        return sum(os.path.getsize(os.path.join(a, f)) for a, _, fs in os.walk(d) for f in fs)

    lora_bytes, full_bytes = on_disk(tmp_path / "3" / "state"), on_disk(
        os.path.join(straight[1], "12", "state"))
    print(f"\ncheckpoint state on disk: QLoRA adapters {lora_bytes} B vs full tiny {full_bytes} B; "
          f"adapters {adapters} B in memory")
    assert lora_bytes < full_bytes / 4
    with pytest.raises(CheckpointError, match="trainable set differs"):
        train(model, cfg, stream, resume=True, progress=False)


def test_resume_reproduces_the_uninterrupted_run_bitwise(model, stream, straight, tmp_path):
    ref, _ = straight
    cfg = dataclasses.replace(CFG, ckpt_dir=str(tmp_path))
    first = train(model, cfg, stream, stop_at=6, progress=False)
    assert first.checkpoints == [3, 6]
    second = train(model, cfg, stream, resume=True, progress=False)
    assert second.start_step == 6 and second.steps.tolist() == list(range(7, 13))
    np.testing.assert_array_equal(np.concatenate([first.losses, second.losses]), ref.losses)
    chex.assert_trees_all_equal(second.params, ref.params)
    chex.assert_trees_all_equal(second.opt_state, ref.opt_state)
    chex.assert_trees_all_equal(second.rng, ref.rng)
    # the JSONL log of the staged run reads like the straight one
    records = [json.loads(ln) for ln in open(tmp_path / LOG_NAME)]
    np.testing.assert_array_equal(np.float32([r["loss"] for r in records]), ref.losses)


def test_crash_during_save_keeps_the_last_good_checkpoint(model, stream, straight, tmp_path,
                                                          monkeypatch):
    ref, _ = straight
    cfg = dataclasses.replace(CFG, ckpt_dir=str(tmp_path), keep=1)  # step 3 is the only copy
    orig = ocp.JsonCheckpointHandler.async_save

    async def crash_at_step_6(self, directory, *args, **kwargs):
        futures = await orig(self, directory, *args, **kwargs)
        if "6.orbax-checkpoint-tmp" in str(directory):
            for f in futures or []:
                f.result()  # step 6's metadata is on disk; then the save dies before finalize
            raise OSError("simulated crash while writing step 6")
        return futures

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", crash_at_step_6)
    with pytest.raises(Exception, match="simulated crash"):
        train(model, cfg, stream, progress=False)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", orig)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith("6.orbax-checkpoint-tmp")]
    assert leftovers, os.listdir(tmp_path)  # the save really was cut off mid-way
    # a killed process leaves such partial directories too: add one that looks further along
    partial = tmp_path / "9.orbax-checkpoint-tmp-1234" / "state"
    partial.mkdir(parents=True)
    (partial / "manifest.ocdbt").write_bytes(b"\x00partial")
    assert Checkpointer(tmp_path).steps() == [3]
    resumed = train(model, cfg, stream, resume=True, progress=False)
    assert resumed.start_step == 3
    np.testing.assert_array_equal(resumed.losses, ref.losses[3:])
    chex.assert_trees_all_equal(resumed.params, ref.params)


def test_nan_batch_is_skipped_and_leaves_state_bitwise_unchanged(model, stream, tmp_path):
    vocab = model.spec.vocab_size
    good = token_batches(stream, CFG.batch, CFG.seq, CFG.seed)
    cfg = dataclasses.replace(CFG, log_dir=str(tmp_path))
    res = train(model, cfg, _poisoned(good, 4, vocab), progress=False)
    assert res.skipped == [5]
    assert not np.isfinite(res.losses[4]) and np.isfinite(np.delete(res.losses, 4)).all()
    records = [json.loads(ln) for ln in open(tmp_path / LOG_NAME)]
    assert [r["step"] for r in records if r["skipped"]] == [5]
    # the optimizer's schedule did not advance on the skipped step
    assert res.lrs[5] == pytest.approx(float(lr_schedule(CFG)(4)))
    assert _read_events(str(tmp_path))["train/skipped"][5] == 1.0

    # Reference: the same run without batch 4 at all, stopped one step earlier.
    def without_bad(start=0):
        i = start
        while True:
            yield good.at(i if i < 4 else i + 1)
            i += 1

    ref = train(model, CFG, without_bad, stop_at=11, progress=False)
    np.testing.assert_array_equal(np.delete(res.losses, 4), ref.losses)
    chex.assert_trees_all_equal(res.params, ref.params)
    chex.assert_trees_all_equal(res.opt_state, ref.opt_state)


def test_nan_stop_raises_naming_the_step_after_the_last_good_checkpoint(model, stream, tmp_path):
    good = token_batches(stream, CFG.batch, CFG.seq, CFG.seed)
    cfg = dataclasses.replace(CFG, nan_policy="stop", ckpt_dir=str(tmp_path))
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradients at step 8.*"
                                             r"last good checkpoint is step 6") as info:
        train(model, cfg, _poisoned(good, 7, model.spec.vocab_size), progress=False)
    assert info.value.step == 8 and info.value.last_checkpoint == 6
    ck = Checkpointer(tmp_path)
    assert ck.steps() == [3, 6]
    assert ck.read_meta(6)["data_position"] == 6


@pytest.mark.parametrize("change, message", [
    ("shapes", r"param 'layers/mlp/\w+_proj/kernel': checkpoint has shape "
               r"\(2, (64, 128|128, 64)\)"),
    ("optimizer", r"optimizer: checkpoint was trained with 'adamw', this run uses 'sgd'"),
    ("trainable", r"trainable set differs: \d+ param\(s\) train in one and are frozen"),
])
def test_incompatible_checkpoint_is_a_clear_error(model, stream, straight, change, message):
    _, d = straight
    cfg = dataclasses.replace(CFG, ckpt_dir=d)
    if change == "shapes":
        other, cfg = ml.models.init("tiny", jax.random.key(1), d_ff=96), cfg
    elif change == "optimizer":
        other, cfg = model, dataclasses.replace(cfg, optimizer="sgd")
    else:
        other = model.with_extras(trainable=(r"lm_head",))
    with pytest.raises(CheckpointError, match=message):
        train(other, cfg, stream, resume=True, progress=False)


@pytest.mark.parametrize("damage", ["arrays", "meta"])
def test_corrupt_checkpoint_is_a_clear_error(model, stream, straight, tmp_path, damage):
    _, d = straight
    shutil.copytree(d, tmp_path / "c")
    step = tmp_path / "c" / "12" / ("state" if damage == "arrays" else "meta")
    for root, _, files in os.walk(step):
        for f in files:
            if f != "commit_success.txt":
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.write(b"\xff" * 16)
    cfg = dataclasses.replace(CFG, ckpt_dir=str(tmp_path / "c"))
    with pytest.raises(CheckpointError, match=r"checkpoint step 12 .* is corrupt or incomplete.*"
                                              r"delete .*12 to resume from step 9"):
        train(model, cfg, stream, resume=True, progress=False)


def test_existing_checkpoints_need_resume(model, stream, straight):
    _, d = straight
    with pytest.raises(ValueError, match=r"already holds checkpoints .* pass resume=True"):
        train(model, dataclasses.replace(CFG, ckpt_dir=d), stream, progress=False)
    with pytest.raises(ValueError, match="resume=True needs config.ckpt_dir"):
        train(model, CFG, stream, resume=True, progress=False)


def test_config_change_on_resume_is_reported(model, stream, straight, tmp_path):
    from memlab import checkpoint as ck
    a, b = CFG.trajectory_dict(), dataclasses.replace(CFG, lr=3e-3, seed=4).trajectory_dict()
    assert ck.config_changes(a, b) == ["lr: 0.01 -> 0.003", "seed: 3 -> 4"]
    assert ck.fingerprint(a) != ck.fingerprint(b)
    assert ck.fingerprint(a) == ck.fingerprint(dataclasses.replace(CFG, log_every=5)
                                               .trajectory_dict())


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be a positive int, got 0"),
    ({"steps": 10, "accum": 3, "batch": 8}, "accum=3 does not divide batch=8"),
    ({"steps": 10, "optimizer": "adamm"}, "unknown optimizer 'adamm'"),
    ({"steps": 10, "precision": "fp16"}, r"precision must be one of \('fp32', 'bf16'\)"),
    ({"steps": 10, "nan_policy": "ignore"}, "nan_policy must be one of"),
    ({"steps": 10, "lr": -1.0}, "lr must be a positive float"),
    ({"steps": 10, "warmup": 10}, "warmup=10 must be below steps=10"),
    ({"steps": 10, "optimizer_kwargs": {"learning_rate": 0.1}}, "set the learning rate with lr="),
])
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_bad_batches_raise_clear_errors(model):
    def wrong(start=0):
        while True:
            yield np.zeros((CFG.batch, CFG.seq), np.int32) + 1
    with pytest.raises(ValueError, match=r"batch for step 1 has shape \(4, 24\).*expected "
                                         r"integer tokens of shape \(4, 25\)"):
        train(model, CFG, wrong, progress=False)
    with pytest.raises(ValueError, match="need at least seq \\+ 1 = 25 tokens"):
        train(model, CFG, np.arange(10), progress=False)
    with pytest.raises(ValueError, match="stop_at must be a positive int"):
        train(model, CFG, None, stop_at=0, progress=False)


def test_bf16_computes_in_bf16_over_fp32_master_weights(model, stream, straight):
    ref, _ = straight
    cfg = dataclasses.replace(CFG, precision="bf16")
    assert compute_model(model, "bf16").spec.dtype == "bfloat16"
    res = train(model, cfg, stream, stop_at=2, progress=False)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((res.params, res.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    # same first loss up to bf16 rounding, but not bit-equal: the compute really was bf16
    np.testing.assert_allclose(res.losses[0], ref.losses[0], rtol=2e-2)
    assert res.losses[0] != ref.losses[0]


def test_step_donates_params_and_optimizer_state(model, stream):
    cfg = dataclasses.replace(CFG, ckpt_dir=None)
    tx = make_optimizer(cfg)
    trainable, frozen = ml.model.split_trainable(model)
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)
    opt_state = tx.init(trainable)
    rng = jax.random.key_data(jax.random.key(0))
    step = make_step(model, tx, cfg)
    tokens = jnp.asarray(token_batches(stream, cfg.batch, cfg.seq).at(0))
    lowered = step.lower(trainable, opt_state, frozen, rng, tokens)
    ma = lowered.compile().memory_analysis()
    donated = ml.memory.tree_bytes((trainable, opt_state))
    print(f"\nstep: argument {ma.argument_size_in_bytes} B, alias {ma.alias_size_in_bytes} B, "
          f"temp {ma.temp_size_in_bytes} B; params+opt_state {donated} B")
    assert ma.alias_size_in_bytes >= donated


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def test_cli_train_smoke(tmp_path):
    out, ck = tmp_path / "t.json", tmp_path / "ck"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"))
    r = subprocess.run([sys.executable, "-m", "memlab", "train", "--model=tiny",
                        "--corpus=pydoc", "--steps=3", "--batch=2", "--seq=16", "--accum=2",
                        "--log_every=1", f"--ckpt_dir={ck}", f"--json={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained tiny steps 1-3" in r.stdout
    res = json.loads(out.read_text())["train"]
    assert res["steps"] == [1, 2, 3] and len(res["losses"]) == 3
    assert all(np.isfinite(res["losses"])) and res["checkpoints"] == [3]
    assert Checkpointer(ck).steps() == [3]
    assert len(open(ck / LOG_NAME).readlines()) == 3


def test_cli_train_user_errors(capsys):
    from absl import flags

    from memlab.__main__ import main
    FLAGS = flags.FLAGS
    try:
        for args, message in ((["--model=tiny", "--quantize=nf4"], "needs --lora_rank"),
                              (["--model=tiny", "--batch=4", "--accum=3"],
                               "accum=3 does not divide batch=4"),
                              (["--model=tiny", "--steps=0"], "steps must be a positive int")):
            FLAGS.unparse_flags()
            FLAGS(["memlab", *args])
            assert main(["memlab", "train"]) == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, err
    finally:
        FLAGS.unparse_flags()

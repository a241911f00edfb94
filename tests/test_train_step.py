"""memlab.train_step: the one step that train(), profile(task="train"), the planner and
`python -m memlab train --dry_run` compile.

* the dry run, `profile --task=train` with the same flags and the step train() jits on
  real arrays report the same XLA numbers;
* accum=1 adds no scan and no float32 accumulator to the gradient;
* train() honours the shard pass (8 simulated CPU devices, tests/conftest.py) and the
  offload pass with no wrapping by the caller, and its losses equal the plain run's.
"""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags

import memlab as ml
from memlab import train_step
from memlab.model import split_trainable
from memlab.train import TrainConfig, make_optimizer, make_step, train

FLAGS = flags.FLAGS
NUMBERS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "by_category",
           "analytic", "host_argument_bytes", "host_temp_bytes")


@pytest.fixture(scope="module")
def tiny():
    return ml.models.init("tiny", jax.random.key(2))


def _cli(command, args):
    """``cmd_<command>()`` of the CLI in this process, with ``args`` parsed as its flags."""
    import memlab.__main__ as cli
    FLAGS.unparse_flags()
    try:
        FLAGS(["memlab", *args])
        return getattr(cli, f"cmd_{command}")()
    finally:
        FLAGS.unparse_flags()


def _strip_time(table: str) -> str:
    head, rest = table.split("\n", 1)
    return head.rsplit(" · compiled in", 1)[0] + "\n" + rest


def test_dry_run_equals_profile_and_the_step_train_jits(capsys):
    args = ["--model=tiny", "--batch=4", "--seq=16", "--accum=2", "--precision=bf16",
            "--lora_rank=4", "--optimizer=adamw", "--steps=5"]
    dry = _cli("train", args + ["--dry_run"])["profile"]
    dry_out = capsys.readouterr().out
    prof = _cli("profile", args + ["--task=train"])["profile"]
    prof_out = capsys.readouterr().out
    assert {k: dry[k] for k in NUMBERS} == {k: prof[k] for k in NUMBERS}
    assert _strip_time(dry_out) == _strip_time(prof_out) and "optimizer_state" in dry_out
    # the program train() jits for these flags, lowered on real arrays: the same numbers
    FLAGS(["memlab", *args])
    try:
        import memlab.__main__ as cli
        model, cfg = cli._train_model(), cli._train_config()
    finally:
        FLAGS.unparse_flags()
    trainable, frozen = split_trainable(model)
    built = train_step.build(model, make_optimizer(cfg, trainable), cfg.step_options)
    state = built.init_state(trainable, frozen)
    rng = jax.random.key_data(jax.random.key(0))
    tokens = jnp.zeros((cfg.batch, cfg.seq + 1), jnp.int32)
    ma = make_step(model, built.tx, cfg).lower(trainable, state, frozen, rng,
                                               tokens).compile().memory_analysis()
    got = {"argument_bytes": ma.argument_size_in_bytes, "output_bytes": ma.output_size_in_bytes,
           "alias_bytes": ma.alias_size_in_bytes, "temp_bytes": ma.temp_size_in_bytes}
    assert got == {k: dry[k] for k in got}
    assert dry["by_category"]["optimizer_state"] == ml.memory.tree_bytes(state)


@pytest.mark.parametrize("args, flag", [
    (["--resume"], "--resume"), (["--stop_at=3"], "--stop_at"), (["--kv=kivi2"], "--kv"),
    (["--task=decode"], "--task=decode")])
def test_dry_run_refuses_flags_it_cannot_honour(args, flag, capsys):
    from memlab.__main__ import main
    FLAGS.unparse_flags()
    try:
        FLAGS(["memlab", "--model=tiny", "--dry_run", *args])
        assert main(["memlab", "train"]) == 2
        FLAGS.unparse_flags()
        FLAGS(["memlab", "--model=tiny", "--target=h100"])  # a target only compiles
        assert main(["memlab", "train"]) == 2
    finally:
        FLAGS.unparse_flags()
    err = capsys.readouterr().err
    assert flag in err and "--target=h100" in err and "--dry_run" in err
    assert "Traceback" not in err


def test_accum_one_adds_no_scan_and_no_float32_accumulator():
    """bf16 params, 2 x 8 tokens (activations small beside the weights): accum=1 has the
    model's scans only, accum=2 one more, and its float32 gradient accumulator (twice the
    bf16 weights' bytes) shows in XLA's temp."""
    model = ml.models.init("tiny", jax.random.key(2), param_dtype="bfloat16", dtype="bfloat16")
    tx = optax.sgd(0.1)
    trainable, frozen = split_trainable(model)
    args = (trainable, tx.init(trainable), frozen, jnp.zeros((2,), jnp.uint32),
            jnp.zeros((2, 9), jnp.int32))
    grad_only = jax.make_jaxpr(jax.grad(ml.memory.loss_fn(model)))(model.params, args[-1])
    one, two = (train_step.step_fn(model, tx, train_step.StepOptions(accum=a)) for a in (1, 2))
    scans = lambda f: str(jax.make_jaxpr(f)(*args)).count("scan[")  # noqa: E731
    assert scans(one) == str(grad_only).count("scan[") and scans(two) == scans(one) + 1
    temp = lambda f: jax.jit(f, donate_argnums=(0, 1)).lower(  # noqa: E731
        *args).compile().memory_analysis().temp_size_in_bytes
    assert temp(two) - temp(one) >= 2 * ml.memory.tree_bytes(trainable)


def test_options_validate_with_clear_errors():
    for kw, msg in ((dict(accum=0), "accum"), (dict(precision="fp16"), "precision"),
                    (dict(fused=True, accum=2), "accum=1"),
                    (dict(clip_norm=1.0), "clip_by_global_norm"),
                    (dict(fused=True, clip_norm=-1.0), "clip_norm")):
        with pytest.raises(ValueError, match=msg):
            train_step.StepOptions(**kw)


def _placements(model, kind):
    """The shard or offload pass over ``model`` (the tiny Llama)."""
    if kind == "fsdp8":
        mesh = ml.shard.mesh((8,), ("data",))
        return ml.passes.shard(mesh, ml.shard.fsdp("data", min_size=256))(model)
    return ml.passes.offload(1, 1, optimizer_state=True)(model)


@pytest.mark.parametrize("kind, accum", [("fsdp8", 1), ("offload", 2)])
def test_train_honours_shard_and_offload_and_matches_the_plain_run(tiny, kind, accum):
    if kind == "fsdp8" and len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    # eps: Adam's step on a near-zero gradient (an embedding row the batch barely uses) is a
    # ratio of rounding-level numbers without it
    cfg = TrainConfig(steps=2, batch=8, seq=16, accum=accum, optimizer="adamw", lr=1e-2,
                      optimizer_kwargs={"eps": 1e-4}, log_every=1, seed=4)
    ref = train(tiny, cfg, progress=False)
    placed = _placements(tiny, kind)
    res = train(placed, cfg, progress=False)
    np.testing.assert_allclose(res.losses, ref.losses, rtol=1e-5)
    np.testing.assert_allclose(res.grad_norms, ref.grad_norms, rtol=1e-4)
    chex.assert_trees_all_close(jax.device_get(res.params), jax.device_get(ref.params),
                                rtol=1e-4, atol=1e-5)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                   jax.device_get(res.params), split_trainable(tiny)[0])
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-3  # every leaf trained: not vacuous
    kernel = res.params["layers"]["mlp"]["up_proj"]["kernel"]
    moments = [x for x in jax.tree_util.tree_leaves(res.opt_state) if x.shape == kernel.shape]
    assert len(moments) >= 2  # adamw's mu and nu of that kernel (and of gate_proj)
    for x in [kernel, *moments]:
        if kind == "fsdp8":  # created and kept in their shards (ZeRO)
            assert x.sharding.shard_shape(x.shape) != x.shape
        else:  # the layers' params and state in host memory, as the pass asked
            assert x.sharding.memory_kind == "pinned_host"


def test_profile_of_a_config_is_the_step_train_runs(tiny):
    """profile(config=TrainConfig) compiles make_step's program: same XLA numbers."""
    cfg = TrainConfig(steps=3, batch=2, seq=8, accum=2, optimizer="sgd", lr=0.1)
    rep = ml.memory.profile(tiny, "train", batch=2, seq=8, config=cfg)
    trainable, frozen = split_trainable(tiny)
    built = train_step.build(tiny, make_optimizer(cfg, trainable), cfg.step_options)
    ma = make_step(tiny, built.tx, cfg).lower(
        trainable, built.init_state(trainable, frozen), frozen, jnp.zeros((2,), jnp.uint32),
        jnp.zeros((2, 9), jnp.int32)).compile().memory_analysis()
    assert (rep.temp_bytes, rep.argument_bytes, rep.output_bytes) == (
        ma.temp_size_in_bytes, ma.argument_size_in_bytes, ma.output_size_in_bytes)
    with pytest.raises(ValueError, match="batch=4"):
        ml.memory.profile(tiny, "train", batch=4, seq=8, config=cfg)
    with pytest.raises(ValueError, match="drop optimizer="):
        ml.memory.profile(tiny, "train", batch=2, seq=8, config=cfg, optimizer="adamw")
    with pytest.raises(TypeError, match="TrainConfig"):
        ml.memory.profile(tiny, "train", batch=2, seq=8, config=dataclasses.asdict(cfg))

"""memlab.checkpoint: bit-exact round trips, a process killed mid-save, clear errors."""
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from memlab import checkpoint as ck
from memlab.checkpoint import CheckpointError, Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed):
    rng = np.random.default_rng(seed)
    return {"params": {"a": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
                       "frozen": None,
                       "b": jnp.asarray(rng.standard_normal(7), jnp.bfloat16),
                       "codes": jnp.asarray(rng.integers(-8, 8, (4, 6)), jnp.int4)},
            "opt_state": (jnp.asarray(seed, jnp.int32), {"mu": jnp.asarray(rng.random(7))}),
            "rng": jax.random.key_data(jax.random.key(seed)),
            "step": np.int64(seed)}


def test_round_trip_is_bit_exact_with_none_leaves_and_packed_dtypes(tmp_path):
    state = _state(3)
    with Checkpointer(tmp_path, keep=2) as c:
        c.save(3, state, {"data_position": 3})
        c.save(5, _state(5), {"data_position": 5})
        c.wait()
        assert c.steps() == [3, 5]
        back, meta = c.restore(3, _state(0))
    chex.assert_trees_all_equal(back, state)  # bf16, int4, uint32 keys, None kept as None
    assert back["params"]["frozen"] is None
    assert meta["data_position"] == 3 and meta["format"] == ck.FORMAT and meta["step"] == 3


def test_process_killed_mid_save_keeps_the_last_good_step(tmp_path):
    """A real crash: the child dies (os._exit, no cleanup) during the step-2 save, with
    keep=1, so the old step must survive until the new one is finalized."""
    script = textwrap.dedent("""
        import os, sys
        import numpy as np
        import orbax.checkpoint as ocp
        from memlab.checkpoint import Checkpointer
        c = Checkpointer(sys.argv[1], keep=1)
        w = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
        c.save(1, {"w": w}, {"data_position": 1})
        c.wait()
        orig = ocp.JsonCheckpointHandler.async_save
        async def die(self, directory, *args, **kwargs):
            for f in await orig(self, directory, *args, **kwargs) or []:
                f.result()  # step 2's metadata is on disk, its finalize never comes
            os._exit(17)
        ocp.JsonCheckpointHandler.async_save = die
        c.save(2, {"w": w + 1}, {"data_position": 2})
        c.wait()
        print("unreachable")
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 17, r.stderr[-2000:]
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in os.listdir(tmp_path))
    c = Checkpointer(tmp_path, keep=1)
    assert c.steps() == [1]
    w = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
    back, meta = c.restore(1, {"w": np.zeros(4096, np.float32)})
    np.testing.assert_array_equal(np.asarray(back["w"]), w)
    assert meta["data_position"] == 1
    c.close()


def test_signature_differences_are_named():
    f32 = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    saved = ck.signature({"w": f32(3, 4), "v": f32(2)}, {"e": f32(5)}, (f32(3, 4),), "adamw")
    now = ck.signature({"w": f32(3, 5), "u": f32(2)}, {"e": f32(5)}, (f32(3, 5),), "sgd")
    lines = ck.incompatibilities(saved, now)
    assert lines[0] == "optimizer: checkpoint was trained with 'adamw', this run uses 'sgd'"
    assert "trainable param: 1 path(s) only in the checkpoint, e.g. ['v']" in lines
    assert "trainable param: 1 path(s) only in this run, e.g. ['u']" in lines
    assert ("trainable param 'w': checkpoint has shape (3, 4) float32, this run (3, 5) float32"
            in lines)
    moved = ck.signature({"e": f32(5)}, {"w": f32(3, 4), "v": f32(2)}, (), "adamw")
    assert ck.incompatibilities(saved, moved)[0].startswith(
        "trainable set differs: 3 param(s) train in one and are frozen in the other")
    assert ck.incompatibilities(saved, saved) == []
    # same params and optimizer, differently shaped state (e.g. other optimizer kwargs)
    other_state = ck.signature({"w": f32(3, 4), "v": f32(2)}, {"e": f32(5)},
                               (jnp.zeros((3, 4), jnp.bfloat16),), "adamw")
    assert ck.incompatibilities(saved, other_state) == [
        "optimizer state '0': checkpoint has shape (3, 4) float32, this run (3, 4) bfloat16"]


def test_foreign_missing_and_bad_arguments_are_clear_errors(tmp_path):
    plain = ocp.CheckpointManager(str(tmp_path / "plain"), item_names=("state", "meta"),
                                  options=ocp.CheckpointManagerOptions(create=True))
    plain.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.ones(3)}),
                                          meta=ocp.args.JsonSave({"hello": 1})))
    plain.wait_until_finished()
    plain.close()
    with Checkpointer(tmp_path / "plain") as c:
        with pytest.raises(CheckpointError, match="not a memlab training checkpoint"):
            c.read_meta(1)
        with pytest.raises(CheckpointError, match=r"no finalized checkpoint for step 4 .* "
                                                  r"finalized steps: \[1\]"):
            c.restore(4, {"x": np.ones(3)})
    with pytest.raises(ValueError, match="keep must be a positive int"):
        Checkpointer(tmp_path / "k", keep=0)
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "absent", create=False)

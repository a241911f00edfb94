"""Multi-host for real: two Python processes on this machine join one JAX cluster
(``jax.distributed.initialize``, coordinator on 127.0.0.1, gloo CPU collectives), build a
2 x 2 mesh over their 4 CPU devices and run one sharded (FSDP x TP) AdamW training step
of the tiny Llama; both must report the loss and new-params checksum of a single-process
unsharded reference.  The children are killed on a timeout, so this can never hang."""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memlab as ml
from memlab.memory.profile import train_step_fn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _distributed_case import CFG, LR, SEED, make_tokens  # noqa: E402

TIMEOUT_S = 150  # both children together; an idle 2-core machine needs ~20 s


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference():
    base = ml.models.init(CFG, jax.random.key(SEED))
    tx = optax.adamw(LR)
    new_params, _, loss = jax.jit(train_step_fn(base, tx))(base.params, tx.init(base.params),
                                                           make_tokens())
    checksum = sum(float(jnp.sum(x.astype(jnp.float32) ** 2))
                   for x in jax.tree_util.tree_leaves(new_params))
    return float(loss), checksum


def test_two_process_sharded_train_step_equals_single_process(tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # memlab sets its own; no forced device count in the children
    env.setdefault("JAX_COMPILATION_CACHE_DIR",
                   os.path.join(os.path.dirname(HERE), ".cache", "jax"))
    outs = [tmp_path / f"proc{i}.json" for i in range(2)]
    logs = [open(tmp_path / f"proc{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_distributed_worker.py"),
                               str(i), str(port), str(outs[i])],
                              stdout=logs[i], stderr=subprocess.STDOUT, env=env,
                              cwd=os.path.dirname(HERE))
             for i in range(2)]
    try:
        expect_loss, expect_sum = _reference()  # overlaps with the children's startup
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        tails = []
        for i, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- process {i} ---\n" + log.read()[-3000:])
        pytest.fail(f"two-process run did not finish within {TIMEOUT_S}s (children killed)\n"
                    + "\n".join(tails))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log.read()[-4000:]}"
        log.close()
    results = [json.loads(o.read_text()) for o in outs]
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert r["global_devices"] == 4 and r["local_devices"] == 2
        # q_proj [L, d, H*hd] split 2-way (FSDP) x 2-way (TP); each process holds 2 shards
        assert r["q_shard_shape"] == [CFG.n_layers, CFG.d_model // 2,
                                      CFG.n_heads * CFG.head_dim // 2]
        assert r["q_addressable_shards"] == 2
    assert results[0]["loss"] == results[1]["loss"]
    assert results[0]["checksum"] == results[1]["checksum"]
    np.testing.assert_allclose(results[0]["loss"], expect_loss, rtol=1e-5)
    np.testing.assert_allclose(results[0]["checksum"], expect_sum, rtol=1e-5)

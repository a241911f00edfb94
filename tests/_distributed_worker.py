"""One process of the two-process sharded training test (tests/test_distributed.py).

    python tests/_distributed_worker.py PROCESS_ID PORT OUT_JSON

Joins a JAX cluster through ``jax.distributed.initialize`` (coordinator on
127.0.0.1:PORT, 2 processes, 2 CPU devices each, gloo collectives), builds a
2 x 2 (data, model) mesh over the 4 global devices, runs one FSDP x TP AdamW
step of the tiny Llama and writes the loss and a checksum of the new params.
"""
import json
import sys
import time

T0 = time.time()


def log(what):
    print(f"[{time.time() - T0:6.1f}s] {what}", flush=True)

import jax

LOCAL_DEVICES = 2
NUM_PROCESSES = 2


def main(process_id: int, port: int, out: str) -> None:
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=NUM_PROCESSES, process_id=process_id,
                               initialization_timeout=60)
    log("initialized")
    import jax.numpy as jnp
    import optax

    import memlab as ml
    from _distributed_case import CFG, make_tokens, SEED, LR
    from memlab.memory.profile import train_step_fn

    log("imported memlab")
    assert jax.process_count() == NUM_PROCESSES and len(jax.devices()) == 4, jax.devices()
    mesh = ml.shard.mesh((2, 2), ("data", "model"))
    base = ml.models.init(CFG, jax.random.key(SEED))
    log("model initialized")
    model = ml.passes.shard(mesh, ml.shard.fsdp_tp("data", "model"))(base)
    shard = model.extra("shard")
    log("params sharded")
    tx = optax.adamw(LR)
    state = shard.put_state(tx.init(base.params), model.params)  # same value on every process
    tokens = shard.put_batch(make_tokens())
    log("model, state and batch sharded")
    step = train_step_fn(model, tx)

    def step_and_checksum(params, state, tokens):
        new_params, _, loss = step(params, state, tokens)
        checksum = sum(jnp.sum(x.astype(jnp.float32) ** 2)
                       for x in jax.tree_util.tree_leaves(new_params))
        return new_params, loss, checksum

    new_params, loss, checksum = jax.jit(step_and_checksum)(model.params, state, tokens)
    log("train step done")
    q = new_params["layers"]["attn"]["q_proj"]["kernel"]
    result = {"process": jax.process_index(), "loss": float(loss.addressable_data(0)),
              "checksum": float(checksum.addressable_data(0)),
              "global_devices": len(jax.devices()), "local_devices": jax.local_device_count(),
              "q_shard_shape": list(q.sharding.shard_shape(q.shape)),
              "q_addressable_shards": len(q.addressable_shards)}
    with open(out, "w") as f:
        json.dump(result, f)
    log("result written")
    jax.distributed.shutdown()
    log("shut down")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

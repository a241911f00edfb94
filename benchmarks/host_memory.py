"""Device vs host bytes of the planner's host-memory plans, as XLA:GPU compiles them.

    python benchmarks/host_memory.py                       # on a GPU: the 7B/8B plans
    python benchmarks/host_memory.py --models=small        # any backend (CPU: no split)

XLA:CPU has one memory, so the planner confirms plans that keep weights, optimizer
state or the KV cache in ``pinned_host`` only on device + host together.  XLA:GPU's
``memory_analysis()`` reports the host part separately (``host_argument_size_in_bytes``,
``host_temp_size_in_bytes``, ...), so there the planner's compiled peak
(``argument + output - alias + temp``) is the device part alone.  This script compiles
each plan's step through ``memlab.memory.planner.verify_candidate`` and writes the
compiled device bytes beside the predicted ones to ``results/host_memory.json`` with the
device name.
"""
import time

import jax
from absl import app, flags

import memlab as ml
from memlab import results
from memlab.memory import planner as P

FLAGS = flags.FLAGS
flags.DEFINE_enum("models", "large", ["small", "large"], "7B/8B plans, or small shapes.")
flags.DEFINE_string("out", "results/host_memory.json", "Output JSON.")


def _small():
    return ml.models.config("tiny", d_model=256, d_ff=688, n_layers=4, vocab_size=1000,
                            n_heads=4, n_kv_heads=2, head_dim=64, dtype="bfloat16",
                            param_dtype="bfloat16", max_seq_len=4096)


def cases():
    C = P.Candidate
    if FLAGS.models == "small":
        cfg = _small()
        return [(cfg, "train", C("bf16", "nothing_saveable", "apollo_mini", offload=(1, 0),
                                 fused=True), 1, 512),
                (cfg, "train", C("bf16", "nothing_saveable", "adamw", offload=(1, 1)), 1, 512),
                (cfg, "decode", C("bf16", kv="headinfer:heads=1"), 1, 4096)]
    l7, l8 = P._config("llama2-7b")[1], P._config("llama3-8b")[1]
    return [(l7, "train", C("bf16", "nothing_saveable", "apollo_mini", offload=(1, 0),
                            fused=True), 1, 2048),
            (l7, "train", C("bf16", "nothing_saveable", "adamw", offload=(1, 1)), 1, 2048),
            (l8, "decode", C("bf16", kv="headinfer:heads=1", offload=(1, 1)), 1, 2**20)]


def main(_):
    dev = jax.devices()[0]
    rows = []
    for cfg, task, c, b, s in cases():
        t0 = time.perf_counter()
        e = P.estimate(cfg, c, task, b, s)
        v = P.verify_candidate(cfg, c, e, task, b, s)
        row = dict(model=cfg.name, task=task, candidate=c.label(), batch=b, seq=s,
                   predicted_device_bytes=e.device_bytes, predicted_host_bytes=e.host_bytes,
                   compiled_peak_bytes=v.compiled_peak_bytes,
                   compiled_device_bytes=v.compiled_device_bytes,
                   relative_error=v.relative_error, error=v.error)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(row, flush=True)
    if dev.platform == "cpu":
        print("XLA:CPU has one memory: no device/host split here; run this on a GPU.")
    results.write(FLAGS.out, {"benchmark": "host_memory", "device": dev.device_kind,
                              "platform": dev.platform, "rows": rows})


if __name__ == "__main__":
    app.run(main)

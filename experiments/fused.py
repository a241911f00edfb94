"""The fused backward-update step (LOMO) at 7B: what XLA compiles, per optimizer.

    python experiments/fused.py            # ~3 min on a 2-core CPU (abstract shapes)

Compiles ``memlab.fused.step_fn`` for llama2-7b (bf16 weights, batch 1 x 2048 tokens,
chunked loss) with the params and state donated, and the plain step with
``remat("nothing_saveable")`` (the same saved activations) beside it, and writes
results/fused.json: arguments, temp and ``peak = argument + output - alias + temp``.
The anchors: GaLore pre-trains LLaMA-7B on a 24 GB GPU with 8-bit GaLore and
per-layer weight updates; APOLLO(-Mini) likewise with less state.
"""
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import memlab as ml
from memlab import fused, optim, results
from memlab.memory.bytes import tree_bytes
from memlab.memory.profile import train_step_fn

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama2-7b", "Model name.")
flags.DEFINE_integer("seq", 2048, "Tokens per row.")
flags.DEFINE_list("optimizers", ["apollo_mini", "apollo", "galore8bit", "adam4bit", "adamw8bit",
                                 "adamw"], "ml.optim names (or a name in OPTIMIZERS).")

# the papers' settings: 8-bit GaLore at rank 1024 (GaLore's 7B run)
OPTIMIZERS = {"galore8bit": ("galore", {"rank": 1024, "base": "adamw8bit"})}
flags.DEFINE_bool("plain", True, "Also compile the plain (unfused) step.")
flags.DEFINE_string("out", "results/fused.json", "Output JSON.")


def _stats(compiled) -> dict:
    m = compiled.memory_analysis()
    d = dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
             alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes))
    d["peak"] = d["argument"] + d["output"] - d["alias"] + d["temp"]
    return d


def main(_):
    from memlab.memory import planner as P
    cfg = P._config(FLAGS.model)[1]
    model = ml.models.abstract(cfg)
    tokens = jax.ShapeDtypeStruct((1, FLAGS.seq + 1), jnp.int32)
    layers = tree_bytes(model.params["layers"])
    rows = []
    for name in FLAGS.optimizers:
        base, kw = OPTIMIZERS.get(name, (name, {}))
        tx = optim.get(base, **kw)
        row = dict(optimizer=name, params=tree_bytes(model.params))
        t0 = time.perf_counter()
        state = fused.init(model, tx)
        with ml.nn.use_cross_entropy("chunked"):
            c = jax.jit(fused.step_fn(model, tx), donate_argnums=(0, 1)).lower(
                model.params, state, tokens).compile()
        row.update(state=fused.state_bytes(state), fused=_stats(c), fits_24GB=None)
        row["fits_24GB"] = row["fused"]["peak"] <= 24e9
        if FLAGS.plain:
            remat = ml.passes.remat("nothing_saveable")(model)
            with ml.nn.use_cross_entropy("chunked"):
                c = jax.jit(train_step_fn(remat, tx), donate_argnums=(0, 1)).lower(
                    remat.params, jax.eval_shape(tx.init, remat.params), tokens).compile()
            row["plain"] = _stats(c)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        f = row["fused"]
        print(f"{name:<12} state {row['state'] / 1e9:6.2f} GB  fused peak {f['peak'] / 1e9:6.2f} GB "
              f"(temp {f['temp'] / 1e9:6.2f})"
              + (f"  plain peak {row['plain']['peak'] / 1e9:6.2f} GB" if FLAGS.plain else ""),
              flush=True)
    results.write(FLAGS.out, {"experiment": "fused", "memlab": ml.__version__, "model": FLAGS.model,
                              "seq": FLAGS.seq, "layers_bytes": layers, "rows": rows})


if __name__ == "__main__":
    app.run(main)

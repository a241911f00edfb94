"""The training loop: a jitted, donated step with in-jit gradient accumulation, NaN
policies, tensorboard/JSONL logs and bit-exact checkpoint/resume.

    import memlab as ml
    from memlab.train import TrainConfig, train
    cfg = TrainConfig(steps=200, batch=8, seq=256, accum=2, optimizer="adamw", lr=3e-4,
                      warmup=20, ckpt_dir="runs/a", ckpt_every=50)
    result = train(ml.models.load("smollm2-135m"), cfg, tokens)    # tokens: 1-D int array
    result = train(model, cfg, tokens, resume=True)                  # continues from the latest

What one step does (all inside one ``jax.jit``, params and optimizer state donated):
the one train step of :mod:`memlab.train_step`, the program ``memlab.memory.profile(
model, "train", config=cfg)`` and ``python -m memlab train --dry_run`` compile:

* with ``accum > 1`` the batch ``[batch, seq+1]`` is reshaped to ``[accum, batch/accum,
  seq+1]`` and ``lax.scan`` sums the loss and the gradients of each micro-batch (float32
  accumulators), then divides by ``accum`` (micro-batches hold equal token counts, so
  this is the full batch's mean loss and gradient); ``accum=1`` has no scan and no
  accumulators;
* the model's passes are honoured without wrapping by the caller: ``ml.passes.shard``
  (state created in its shards, batches split over the data axes, ZeRO constraints on the
  gradients and the new state) and ``ml.passes.offload`` (the optimizer wrapped by
  :func:`memlab.offload.host_optimizer`, its state in host memory with
  ``optimizer_state=True``);
* only the trainable params are differentiated (:func:`memlab.model.split_trainable`:
  LoRA-style passes mark them); optimizer state exists for them alone;
* the loss is :func:`memlab.memory.profile.loss_fn` of the model (next-token
  cross-entropy), so whatever that function computes the trainer trains;
* a non-finite loss or gradient norm selects the *old* params and optimizer state
  (``jnp.where``), so a skipped step leaves them bitwise unchanged; ``nan_policy="stop"``
  then raises :class:`NonFiniteError` naming the step, after pending checkpoint saves
  finished.  The optimizer's own step count does not advance on a skipped step, so its
  learning-rate schedule is indexed by applied updates (as with ``optax.apply_if_finite``).

Precision: ``"fp32"`` computes in the model's own dtypes.  ``"bf16"`` is mixed precision
with float32 master weights: params and optimizer state stay float32, the forward and
backward compute in bfloat16 (a memlab Llama gets ``dtype="bfloat16"``: every matmul
casts weights and activations to bf16; other models see their float params cast to
bf16 inside the loss), and gradients arrive in float32.

Data order is a pure function of ``(seed, step)``: batch ``s`` of :func:`token_batches`
draws its window offsets from ``numpy.random.default_rng([seed, s])``, so resuming needs
no iterator state beyond the step.  Any ``batches(start_step) -> iterator`` factory
with that property resumes exactly too.

Checkpoints (:mod:`memlab.checkpoint`, orbax): trainable params, optimizer state, step,
RNG key, data position and config fingerprint; a crash during a save leaves the last
good step intact, and an incompatible checkpoint (other shapes, optimizer or trainable
set) is an error naming what differs.  Training 12 steps straight and 6 + resume + 6
gives bitwise equal losses and params (tested).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memlab import checkpoint as ckpt
from memlab import train_step
from memlab.model import Model, merge_trainable, split_trainable
from memlab.train_step import PRECISIONS, compute_model  # noqa: F401  (public here too)
NAN_POLICIES = ("skip", "stop")
SCHEDULES = ("cosine", "linear", "constant")
LOG_NAME = "train_log.jsonl"

BatchFactory = Callable[[int], Iterator[np.ndarray]]


class NonFiniteError(RuntimeError):
    """Raised by ``nan_policy="stop"``: a step produced a non-finite loss or gradient."""

    def __init__(self, message: str, step: int, last_checkpoint: Optional[int]):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


def _pos_int(name: str, v: Any, allow_zero: bool = False, where: str = "TrainConfig") -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if allow_zero else 1):
        bound = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{where}: {name} must be {bound} int, got {v!r}")
    return int(v)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run.

    ``steps`` optimizer steps of ``batch`` sequences of ``seq + 1`` tokens, each split
    into ``accum`` micro-batches.  ``optimizer`` is a name in ``memlab.optim`` built with
    ``optimizer_kwargs`` and ``learning_rate=`` the schedule (``warmup`` linear steps
    from 0 to ``lr``, then ``schedule`` decay to ``lr * end_lr_ratio`` at ``steps``).
    ``clip_norm`` clips the global gradient norm (None: no clipping).  ``log_every``:
    JSONL/tensorboard/progress-bar records (skipped steps are always recorded).
    ``ckpt_every``: save every N steps (0: only at the end) into ``ckpt_dir`` (None: no
    checkpoints), keeping the ``keep`` latest.  ``log_dir`` defaults to ``ckpt_dir``.
    ``fused``: the fused backward-update (:mod:`memlab.fused`, LOMO: each layer updated
    inside the backward, no whole-model gradient) for full training of memlab's Llama;
    ``clip_norm`` is then LOMO's two-pass clipping, which also gives ``nan_policy="skip"``
    its skip; needs ``accum=1``.
    """

    steps: int
    batch: int = 8
    seq: int = 128
    accum: int = 1
    optimizer: str = "adamw"
    optimizer_kwargs: Any = ()
    lr: float = 1e-3
    warmup: int = 0
    schedule: str = "cosine"
    end_lr_ratio: float = 0.1
    precision: str = "fp32"
    clip_norm: Optional[float] = 1.0
    nan_policy: str = "skip"
    log_every: int = 10
    ckpt_every: int = 0
    ckpt_dir: Optional[str] = None
    keep: int = 3
    seed: int = 0
    log_dir: Optional[str] = None
    fused: bool = False

    def __post_init__(self):
        _pos_int("steps", self.steps)
        _pos_int("batch", self.batch)
        _pos_int("seq", self.seq)
        _pos_int("accum", self.accum)
        if self.batch % self.accum:
            raise ValueError(f"TrainConfig: accum={self.accum} does not divide batch={self.batch}; "
                             "each micro-batch must hold batch/accum sequences (choose a divisor)")
        _pos_int("warmup", self.warmup, allow_zero=True)
        if self.warmup >= self.steps and self.schedule != "constant":
            raise ValueError(f"TrainConfig: warmup={self.warmup} must be below steps={self.steps}")
        _pos_int("log_every", self.log_every)
        _pos_int("ckpt_every", self.ckpt_every, allow_zero=True)
        _pos_int("keep", self.keep)
        if not isinstance(self.fused, bool):
            raise ValueError(f"TrainConfig: fused must be True or False, got {self.fused!r}")
        if self.fused and self.accum != 1:
            raise ValueError(f"TrainConfig: fused=True updates each layer inside its backward, so "
                             f"there is no gradient to accumulate; use accum=1 (got "
                             f"{self.accum}) or fused=False")
        if self.fused and self.nan_policy == "skip" and self.clip_norm is None:
            raise ValueError("TrainConfig: fused=True with nan_policy='skip' needs clip_norm (its "
                             "first pass finds a non-finite gradient before any layer updates); "
                             "set clip_norm or nan_policy='stop'")
        _pos_int("seed", self.seed, allow_zero=True)
        for name, value, choices in (("precision", self.precision, PRECISIONS),
                                     ("nan_policy", self.nan_policy, NAN_POLICIES),
                                     ("schedule", self.schedule, SCHEDULES)):
            if value not in choices:
                raise ValueError(f"TrainConfig: {name} must be one of {choices}, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"TrainConfig: lr must be a positive float, got {self.lr!r}")
        if not 0 <= self.end_lr_ratio <= 1:
            raise ValueError(f"TrainConfig: end_lr_ratio must be in [0, 1], "
                             f"got {self.end_lr_ratio!r}")
        if self.clip_norm is not None and not (isinstance(self.clip_norm, (int, float))
                                               and self.clip_norm > 0):
            raise ValueError(f"TrainConfig: clip_norm must be a positive float or None, "
                             f"got {self.clip_norm!r}")
        kw = self.optimizer_kwargs
        items = tuple(sorted((kw or {}).items())) if isinstance(kw, Mapping) else tuple(kw)
        if any(not (isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str))
               for it in items):
            raise ValueError("TrainConfig: optimizer_kwargs must be a dict of keyword arguments")
        if "learning_rate" in dict(items):
            raise ValueError("TrainConfig: set the learning rate with lr= (and warmup/schedule), "
                             "not optimizer_kwargs['learning_rate']")
        object.__setattr__(self, "optimizer_kwargs", items)
        from memlab import optim
        factory = optim.OPTIMIZERS.get(self.optimizer)  # unknown names: the registry's error
        params = inspect.signature(factory).parameters
        if "learning_rate" not in params and not any(
                p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"TrainConfig: optimizer {self.optimizer!r} takes no learning_rate "
                             "argument, so the trainer cannot give it its schedule")

    @property
    def micro_batch(self) -> int:
        return self.batch // self.accum

    @property
    def step_options(self) -> "train_step.StepOptions":
        """What the step does (:class:`memlab.train_step.StepOptions`): accumulation,
        precision, the fused variant with its two-pass clip."""
        return train_step.StepOptions(
            accum=self.accum, precision=self.precision, fused=self.fused,
            clip_norm=float(self.clip_norm) if self.fused and self.clip_norm is not None
            else None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optimizer_kwargs"] = dict(self.optimizer_kwargs)
        return d

    def trajectory_dict(self) -> dict:
        """The fields that determine the loss trajectory (what the fingerprint hashes),
        JSON-safe (values JSON cannot hold, e.g. a dtype in optimizer_kwargs, become str)."""
        d = self.to_dict()
        for k in ("log_every", "ckpt_every", "ckpt_dir", "keep", "log_dir"):
            d.pop(k)
        return json.loads(json.dumps(d, default=str))


# ---------------------------------------------------------------------------
# Data: batches as a pure function of (seed, step)
# ---------------------------------------------------------------------------
def token_batches(tokens: np.ndarray, batch: int, seq: int, seed: int = 0) -> BatchFactory:
    """Factory ``f(start) -> iterator``: batch ``s`` is ``[batch, seq+1]`` windows of
    ``tokens`` at offsets drawn from ``default_rng([seed, s])``."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token_batches: tokens must be a 1-D integer array, got shape "
                         f"{tokens.shape} dtype {tokens.dtype}")
    if tokens.shape[0] < seq + 1:
        raise ValueError(f"token_batches: need at least seq + 1 = {seq + 1} tokens, got "
                         f"{tokens.shape[0]}; use a shorter seq or more text")
    tokens = tokens.astype(np.int32)
    offsets = np.arange(seq + 1)[None, :]
    n_starts = tokens.shape[0] - seq

    def at(step: int) -> np.ndarray:
        starts = np.random.default_rng([seed, step]).integers(0, n_starts, size=batch)
        return tokens[starts[:, None] + offsets]

    def factory(start: int = 0):
        step = start
        while True:
            yield at(step)
            step += 1

    factory.at = at
    return factory


def random_batches(vocab: int, batch: int, seq: int, seed: int = 0) -> BatchFactory:
    """Factory of uniform random tokens in ``[0, vocab)``; batch ``s`` comes from
    ``default_rng([seed, s])``."""
    def at(step: int) -> np.ndarray:
        return np.random.default_rng([seed, step]).integers(0, vocab, (batch, seq + 1),
                                                             dtype=np.int32)

    def factory(start: int = 0):
        step = start
        while True:
            yield at(step)
            step += 1

    factory.at = at
    return factory


def _as_factory(batches, model: Model, config: TrainConfig) -> BatchFactory:
    if batches is None:
        vocab = getattr(model.spec, "vocab_size", None)
        if vocab is None:
            raise ValueError("train: batches=None draws random tokens from model.spec.vocab_size, "
                             "which this model lacks; pass token ids or a batch factory")
        return random_batches(vocab, config.batch, config.seq, config.seed)
    if isinstance(batches, (np.ndarray, jax.Array, list)):
        return token_batches(np.asarray(batches), config.batch, config.seq, config.seed)
    if callable(batches):
        return batches
    raise TypeError(f"train: batches must be None, a 1-D token array or a factory "
                    f"start_step -> iterator of [batch, seq+1] arrays, "
                    f"got {type(batches).__name__}")


def _check_batch(x, config: TrainConfig, step: int) -> np.ndarray:
    x = np.asarray(x)
    want = (config.batch, config.seq + 1)
    if x.shape != want or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"train: the batch for step {step + 1} has shape {x.shape} dtype "
                         f"{x.dtype}; expected integer tokens of shape {want} "
                         "(batch, seq + 1)")
    return x.astype(np.int32)


# ---------------------------------------------------------------------------
# Optimizer and step
# ---------------------------------------------------------------------------
def lr_schedule(config: TrainConfig) -> optax.Schedule:
    peak, end = float(config.lr), float(config.lr) * float(config.end_lr_ratio)
    if config.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, config.steps - config.warmup,
                                           alpha=config.end_lr_ratio)
    else:
        main = optax.linear_schedule(peak, end, config.steps - config.warmup)
    if config.warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, config.warmup), main],
                                [config.warmup])


def make_optimizer(config: TrainConfig, params: Any = None) -> optax.GradientTransformation:
    """Clip (optional), then the registry optimizer driven by :func:`lr_schedule`.

    The schedule is passed as ``learning_rate=``.  An optimizer that needs a number
    there (its update fails on a callable: checked with ``jax.eval_shape`` over
    ``params`` when given) runs at ``learning_rate=1`` followed by
    ``optax.scale_by_schedule``, the same update for any optimizer whose step is
    proportional to its learning rate.
    """
    from memlab import optim
    kw = dict(config.optimizer_kwargs)
    schedule = lr_schedule(config)

    def clipped(inner):
        if config.clip_norm is None or config.fused:  # fused: memlab.fused's two-pass clip
            return inner
        # optax.clip_by_global_norm's rule and state, over host-memory gradients too
        return optax.chain(train_step.clip_by_global_norm(float(config.clip_norm)), inner)

    try:
        tx = clipped(optim.get(config.optimizer, learning_rate=schedule, **kw))
        if params is not None:
            abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                              params)
            jax.eval_shape(lambda p: tx.update(p, tx.init(p), p), abstract)
        return tx
    except TypeError:
        return clipped(optax.chain(optim.get(config.optimizer, learning_rate=1.0, **kw),
                                   optax.scale_by_schedule(schedule)))


def make_step(model: Model, tx: optax.GradientTransformation, config: TrainConfig) -> Callable:
    """``step(trainable, opt_state, frozen, rng, tokens[batch, seq+1]) ->
    (trainable, opt_state, rng, metrics)``, jitted with trainable and opt_state donated.

    ``metrics``: ``loss``, ``grad_norm`` (before clipping) and ``ok`` (finite).  The one
    train step (:func:`memlab.train_step.step_fn`) with ``config.step_options``; ``tx`` as
    given (:func:`train` passes it through :func:`memlab.train_step.optimizer`).
    """
    return jax.jit(train_step.step_fn(model, tx, config.step_options), donate_argnums=(0, 1))


def _fused_step(model: Model, tx: optax.GradientTransformation, config: TrainConfig) -> Callable:
    """:func:`make_step` of a ``fused=True`` config (kept for callers of the old name)."""
    if not config.fused:
        raise ValueError("_fused_step: config.fused is False; use make_step")
    return make_step(model, tx, config)


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------
class _Logs:
    """JSONL + tensorboard event files under ``log_dir`` (both optional)."""

    def __init__(self, log_dir: Optional[str], start: int):
        self.path = self.tb = None
        if log_dir is None:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, LOG_NAME)
        if start and os.path.exists(self.path):  # drop records past the resumed step
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
        elif not start and os.path.exists(self.path):
            os.remove(self.path)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(log_dir, purge_step=start if start else None)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k in ("loss", "lr", "grad_norm", "skipped"):
            self.tb.add_scalar(f"train/{k}", float(record[k]), record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    """What a :func:`train` call did: per-step arrays cover the steps this call ran."""

    model: Model                 # the input model with the trained params merged in
    params: Any                  # trainable params (None where frozen)
    opt_state: Any
    rng: Any                     # uint32 key data after the last step
    steps: np.ndarray            # global step numbers (1-based) run by this call
    losses: np.ndarray
    grad_norms: np.ndarray
    lrs: np.ndarray
    skipped: list                # steps whose update was skipped (non-finite)
    start_step: int              # 0, or the checkpoint step this call resumed from
    checkpoints: list            # steps saved by this call
    seconds: float
    compile_seconds: float

    @property
    def steps_per_second(self) -> float:
        """Steps per second after the first (compiling) step."""
        n = len(self.steps) - 1
        return n / max(self.seconds - self.compile_seconds, 1e-9) if n > 0 else float("nan")


def _signature(trainable, frozen, opt_state, config):
    return ckpt.signature(trainable, frozen, opt_state, config.optimizer)


def train(model: Model, config: TrainConfig, batches=None, *, resume: bool = False,
          stop_at: Optional[int] = None, callbacks: Sequence[Callable[[dict], None]] = (),
          progress: bool = True) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps (from the latest checkpoint if ``resume``).

    ``batches``: None (random tokens in the model's vocabulary), a 1-D token array
    (windows via :func:`token_batches`), or a factory ``start_step -> iterator`` of
    ``[batch, seq+1]`` int arrays whose batches depend on the step only.  ``stop_at``
    ends this call after that global step (a checkpoint is written there) while the
    schedule still spans ``config.steps``: a staged run resumes to the same result as
    an uninterrupted one.  ``callbacks`` get every logged record (a dict with step, loss,
    lr, grad_norm, skipped, time) after that step's checkpoint was started.
    """
    if not isinstance(model, Model):
        raise TypeError(f"train: model must be a memlab.Model, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig, got {type(config).__name__}")
    if model.abstract:
        raise ValueError("train: the model is abstract (ShapeDtypeStruct params); load or init "
                         "real weights first (memlab.models.load / init)")
    if stop_at is not None:
        _pos_int("stop_at", stop_at, where="train")
    end = config.steps if stop_at is None else min(int(stop_at), config.steps)
    factory = _as_factory(batches, model, config)
    trainable, frozen = split_trainable(model)
    if not jax.tree_util.tree_leaves(trainable):
        raise ValueError("train: the model has no trainable float params (its `trainable` "
                         "patterns match nothing)")
    # the one step (memlab.train_step): tx wrapped for the offload pass, the state placed
    # in host memory / in the shard pass's shards
    built = train_step.build(model, make_optimizer(config, trainable), config.step_options)
    tx = built.tx
    # Fresh buffers: the step donates them, the caller's model keeps its own.
    trainable = _copy(trainable)
    opt_state = built.init_state(trainable, frozen)
    rng = jax.random.key_data(jax.random.key(config.seed))
    sig = _signature(trainable, frozen, opt_state, config)
    traj = config.trajectory_dict()

    manager = ckpt.Checkpointer(config.ckpt_dir, config.keep) if config.ckpt_dir else None
    start = 0
    try:
        if manager is not None:
            latest = manager.latest()
            if latest is not None and not resume:
                raise ValueError(f"train: {manager.directory} already holds checkpoints (steps "
                                 f"{manager.steps()}); pass resume=True (CLI --resume) to "
                                 "continue, or choose an empty ckpt_dir")
            if latest is not None:
                like = {"params": trainable, "opt_state": opt_state, "rng": rng,
                        "step": np.int64(0)}
                state, meta = manager.restore(latest, like, sig)
                changed = ckpt.config_changes(meta.get("config", {}), traj)
                if changed:
                    warnings.warn(f"train: resuming step {latest} with a changed config ("
                                  + "; ".join(changed) + "): the run will not reproduce an "
                                  "uninterrupted one", UserWarning, stacklevel=2)
                trainable, opt_state = _placed_like(state["params"], trainable), \
                    _placed_like(state["opt_state"], opt_state)
                rng = state["rng"]
                start = int(meta["data_position"])
                if int(state["step"]) != latest or start != latest:
                    raise ckpt.CheckpointError(
                        f"checkpoint step {latest} in {manager.directory} is inconsistent: its "
                        f"arrays say step {int(state['step'])}, its metadata data position "
                        f"{start}; delete {manager.step_path(latest)}")
                if start >= end:
                    warnings.warn(f"train: checkpoint step {start} is not below the last step "
                                  f"{end}; nothing to train", UserWarning, stacklevel=2)
        elif resume:
            raise ValueError("train: resume=True needs config.ckpt_dir")
        return _loop(model, config, factory, tx, trainable, frozen, opt_state, rng, start, end,
                     manager, sig, traj, callbacks, progress, built.place_batch)
    finally:
        if manager is not None:
            manager.wait()
            manager.close()


def _copy(tree):
    """Fresh buffers in the same placement (device, host memory kind, shards)."""
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


def _placed_like(tree, like):
    """``tree``'s arrays (restored from a checkpoint on the default device) in the
    placement of ``like``'s (host memory under offload, shards under shard)."""
    return jax.tree_util.tree_map(
        lambda x, ref: jax.device_put(x, ref.sharding) if isinstance(ref, jax.Array) else x,
        tree, like)


def _loop(model, config, factory, tx, trainable, frozen, opt_state, rng, start, end, manager,
          sig, traj, callbacks, progress, place_batch=lambda x: x) -> TrainResult:
    step_fn = make_step(model, tx, config)
    schedule = lr_schedule(config)
    logs = _Logs(config.log_dir or config.ckpt_dir, start)
    rows, skipped, saved = [], [], []
    applied = start  # updates applied so far (the optimizer's schedule index)
    if manager is not None and start:
        applied = int(manager.read_meta(start).get("applied_updates", start))
    last_ckpt = start if start else None
    t0, t_compile = time.perf_counter(), 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step")
    data = factory(start)
    try:
        for step in range(start, end):
            tokens = place_batch(jnp.asarray(_check_batch(next(data), config, step)))
            lr = float(schedule(applied))
            trainable, opt_state, rng, m = step_fn(trainable, opt_state, frozen, rng, tokens)
            m = jax.device_get(m)
            if step == start:
                t_compile = time.perf_counter() - t0
            done = step + 1
            ok = bool(m["ok"])
            applied += int(ok)
            rows.append((done, float(m["loss"]), float(m["grad_norm"]), lr))
            if not ok:
                skipped.append(done)
            record = {"step": done, "loss": float(m["loss"]), "lr": lr,
                      "grad_norm": float(m["grad_norm"]), "skipped": int(not ok),
                      "time": round(time.perf_counter() - t0, 4)}
            if not ok and config.nan_policy == "stop":
                logs.write(record)
                if manager is not None:
                    manager.wait()
                where = (f"the last good checkpoint is step {last_ckpt} in {manager.directory}"
                         if manager is not None and last_ckpt else "no checkpoint was written")
                raise NonFiniteError(
                    f"train: non-finite loss or gradients at step {done} (loss={record['loss']}, "
                    f"grad norm={record['grad_norm']}); nan_policy='stop': params and optimizer "
                    f"state were not updated at this step and training stopped; {where}. Lower "
                    "lr, set clip_norm, or use nan_policy='skip'.", done, last_ckpt)
            if manager is not None and ((config.ckpt_every and done % config.ckpt_every == 0)
                                        or done == end):
                manager.save(done, {"params": trainable, "opt_state": opt_state, "rng": rng,
                                    "step": np.int64(done)},
                             {"data_position": done, "applied_updates": applied,
                              "seed": config.seed, "config": traj,
                              "fingerprint": ckpt.fingerprint(traj), "signature": sig})
                saved.append(done)
                last_ckpt = done
            if done % config.log_every == 0 or not ok or done == end:
                logs.write(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                for cb in callbacks:
                    cb(record)
            if bar is not None:
                bar.update(1)
    finally:
        logs.close()
        if bar is not None:
            bar.close()
    arr = np.asarray(rows, np.float64).reshape(-1, 4)
    params_full = merge_trainable(trainable, frozen)
    return TrainResult(
        model=model.replace(params=params_full), params=trainable, opt_state=opt_state, rng=rng,
        steps=arr[:, 0].astype(np.int64), losses=arr[:, 1].astype(np.float32),
        grad_norms=arr[:, 2], lrs=arr[:, 3], skipped=skipped, start_step=start,
        checkpoints=saved, seconds=time.perf_counter() - t0, compile_seconds=t_compile)

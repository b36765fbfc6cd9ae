"""The memory estimate (ofe/plan/memory.py) against what training really holds, counted on CPU runs: the
model's parameter list, the bytes of every parameter, gradient and optimiser-state tensor after real
steps, the bytes autograd saves for backward, and the peak of live tensor bytes over real training
steps (one process, and two FSDP or DDP processes)."""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import socket
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ofe.config import ModelConfig, OptimConfig, RunConfig, TrainConfig
from ofe.core.model import GPT
from ofe.core.optim import OPTIMIZERS
from ofe.plan import memory, presets

BLOCK_VARIANTS = [({}, b) for b in presets.BLOCKS] + [
    ({"beta_trainable": True}, "op"), ({"first_norm": "embed_stream"}, "pre_ln"), ({"qk_bias": False}, "pre_ln"),
    ({"qk_norm": "rms_torch"}, "pre_ln"), ({"logit_cap": 30.0}, "pre_ln")] + [
    ({"attention": a}, "pre_ln") for a in ("clipped_softmax", "gated_headwise", "gated_elementwise", "softmax1",
                                           "learned_sink", "softpick")] + [({"attention": "gated_elementwise"}, "op")]


def model_config(block: str = "pre_ln", **over) -> ModelConfig:
    base = {**presets.resolve("tiny", block)["model"], "n_layer": 3, "d_model": 64, "n_head": 4, "context": 32}
    return ModelConfig(**{**base, **over})


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a view and its base count once)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def state_tensors(opt) -> list[torch.Tensor]:
    """Every tensor an optimiser keeps: state values, and the tensors in list values (SOAP's GG, Q)."""
    parts = opt.parts.values() if hasattr(opt, "parts") else [opt]
    out = []
    for part in parts:
        for state in part.state.values():
            for v in state.values():
                vs = v if isinstance(v, list) else [v]
                out += [t for t in vs if torch.is_tensor(t)]
    return out


# ---- the model's tensors ----------------------------------------------------------------------------

@pytest.mark.parametrize("over, block", BLOCK_VARIANTS)
def test_parameter_and_buffer_shapes_are_the_models(over, block):
    m = model_config(block, **over)
    model = GPT(m)
    assert dict(memory.param_shapes(m)) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert dict(memory.buffer_shapes(m)) == {n: tuple(b.shape) for n, b in model.named_buffers()}


def test_the_7b_preset_has_the_standard_shape_and_16_bytes_per_parameter_on_one_process():
    """Closed form: 12 L d^2 block weights + V d + T d embeddings; AdamW's static memory on one process
    is 16 bytes per parameter (weight, gradient, two moments) plus a 4-byte step per tensor."""
    resolved = presets.resolve("7b", "pre_ln")
    m = ModelConfig(**{**resolved["model"], "vocab_size": 16384})
    assert (m.n_layer, m.d_model, m.n_head, m.context) == (32, 4096, 32, 512)
    assert presets.resolve("7b", "op")["model"]["beta"] == pytest.approx(0.2 * math.sqrt(12 / 32))
    n = sum(math.prod(s) for _, s in memory.param_shapes(m))
    vectors = sum(math.prod(s) for _, s in memory.param_shapes(m) if len(s) == 1)
    assert n == 12 * 32 * 4096**2 + 16384 * 4096 + 512 * 4096 + vectors
    assert 6.4e9 < n < 6.6e9
    e = memory.estimate(m, OptimConfig(), TrainConfig(**{**resolved["train"], "parallel": "ddp"}), 1, cuda=True)
    tensors = len(memory.param_shapes(m))
    assert e.params - 4 * 2 * 32 == 4 * n and e.grads == 4 * n  # buffers: each block's 2 betas
    assert e.optimizer == 8 * n + 4 * tensors


# ---- static memory: counted tensor bytes after real steps --------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZERS)
def test_params_grads_and_optimiser_state_are_the_counted_bytes(name):
    """Exact: the bytes of every parameter, buffer, gradient and optimiser-state tensor after two steps
    (SOAP's and rotated Adafactor's first step only builds their eigenbases). max_precond_dim 64 leaves
    the 128-wide MLP side and the 256-token vocabulary unrotated and rotates the 64-wide ones."""
    from ofe.core.optim import build_optimizer

    torch.manual_seed(0)
    m = model_config("op", context=16)
    model = GPT(m)
    optim = OptimConfig(name=name, max_precond_dim=64, lr=1e-3)
    opt = build_optimizer(model, optim)
    x = torch.randint(0, 256, (2, 16))
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(x, x)[1].backward()
        opt.step()
    e = memory.estimate(m, optim, TrainConfig(batch_size=2), 1)
    assert e.params == storage_bytes([*model.parameters(), *model.buffers()])
    assert e.grads == storage_bytes([p.grad for p in model.parameters()])
    assert e.optimizer == storage_bytes(state_tensors(opt))


# ---- activations: the bytes autograd saves for backward -------------------------------------------

def saved_bytes(m: ModelConfig, batch: int, bf16: bool) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters and buffers excluded),
    plus the logits the caller holds."""
    torch.manual_seed(0)
    model = GPT(m)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, m.vocab_size, (batch, m.context))
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)):
        logits, _ = model(x, x)
    seen[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("over, block", BLOCK_VARIANTS)
def test_saved_activations_are_the_formulas(over, block, bf16):
    """The per-token formulas of `block_activation_bytes` and `head_activation_bytes`, times the tokens,
    against the bytes saved for backward. They leave out the position ids (8 bytes per position) and a
    4-byte scalar, 0.02% here, hence 0.1%. Under autocast the bf16 weight copies are saved too: they are
    the estimate's `extra`. QK-norm 'rms_torch' and the explicit (logit_cap) path are approximate (CPU
    makes one more copy of the attention output, or of v; CPU autocast keeps softmax in bf16 where CUDA
    keeps fp32): 6% and 15%."""
    m = model_config(block, **over)
    batch, s, c = 4, 4, 2 if bf16 else 4
    tokens = batch * m.context
    expected = memory.activation_bytes(m, tokens, s, c) - tokens * memory.backward_peak_bytes(m, c)
    if bf16:
        expected += memory.extra_bytes(m, TrainConfig(precision="bf16"), 1, cuda=False)
    tolerance = 0.15 if "logit_cap" in over and bf16 else 0.06 if over.keys() & {"qk_norm", "logit_cap"} else 1e-3
    assert expected == pytest.approx(saved_bytes(m, batch, bf16), rel=tolerance)


# ---- the peak over real training steps --------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """The bytes of live tensor storages: every storage an op returns, counted until it is freed, at its
    current size (FSDP frees gathered parameters by resizing their storage to 0); `peak` is the maximum
    of their sum. A storage is counted once, whatever views it has."""

    def __init__(self) -> None:
        super().__init__()
        self.size: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.now = self.peak = 0

    def _set(self, key: int, n: int) -> None:
        self.now += n - self.size.get(key, 0)
        self.size[key] = n
        self.peak = max(self.peak, self.now)

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self.refs:
            return

        def freed(_: object, key: int = key) -> None:
            self.refs.pop(key, None)
            self.now -= self.size.pop(key, 0)

        self.refs[key] = weakref.ref(st, freed)
        self._set(key, st.nbytes())

    def __enter__(self) -> LiveBytes:
        resize = self._resize = torch.UntypedStorage.resize_

        def tracked_resize(st: torch.UntypedStorage, size: int) -> None:
            resize(st, size)
            if id(st) in self.refs:
                self._set(id(st), st.nbytes())

        torch.UntypedStorage.resize_ = tracked_resize
        return super().__enter__()

    def __exit__(self, *args: object) -> None:
        torch.UntypedStorage.resize_ = self._resize
        super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):  # let DTensor run its local ops, which are counted
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def measured_peak(cfg: RunConfig, out: Path) -> tuple[int, int]:
    """(live bytes before, peak of live bytes during) two training steps of the real trainer, after a
    first step that creates the optimiser state; counted from the trainer's construction, so the
    wrappers' own buffers (DDP's buckets) are in. The process group, if any, stays for the caller."""
    from ofe.train.trainer import Trainer

    with LiveBytes() as live:
        tr = Trainer(cfg, out)
        tr.procs.owns_group = False  # a second trainer in this process reuses the group
        tr.train_step()
        tr.state.step += 1
        tr.opt.zero_grad(set_to_none=True)
        before = live.peak = live.now
        for _ in range(2):
            tr.train_step()
            tr.state.step += 1
    return before, live.peak


# The estimate without its reserve (an allowance for what is not a tensor) must bound the peak from
# above and stay within 15% of it: it counts every gradient, though at the peak (backward's start) few
# exist yet (with one micro-batch), and it takes the larger of backward's two transients, which do not
# coexist. 0.5% to 9% measured here, where activations are most of the memory, as on GPUs.
@pytest.mark.parametrize("block, name, size, micro, precision", [
    ("pre_ln", "adamw", (64, 2, 64, 8), None, "fp32"),
    ("pre_ln", "adamw", (128, 4, 128, 16), None, "fp32"),
    ("op", "soap", (128, 4, 128, 16), None, "fp32"),
    ("pre_ln", "muon", (128, 4, 128, 16), 4, "fp32"),
    ("op", "adamw", (128, 4, 128, 16), 2, "fp32"),
    ("pre_ln", "adamw", (128, 4, 128, 16), None, "bf16"),
])
def test_the_estimate_bounds_the_peak_of_training(data_dir, tmp_path, block, name, size, micro, precision):
    d, layers, context, batch = size
    m = model_config(block, d_model=d, n_layer=layers, context=context)
    cfg = RunConfig(model=m, optim=OptimConfig(name=name, lr=1e-3),
                    train=TrainConfig(steps=4, batch_size=batch, micro_batch_size=micro, threads=1,
                                      precision=precision),
                    data_dir=str(data_dir))
    before, peak = measured_peak(cfg, tmp_path)
    e = memory.estimate(m, cfg.optim, cfg.train, 1, cuda=False)
    assert before == e.params + e.optimizer  # gradients were set to None before the step
    counted = e.static + max(e.activations, e.step_temporaries) + e.extra  # training only: no evaluation
    assert peak <= counted <= 1.15 * peak, (peak, counted)


def _two_processes(rank: int, port: int, data_dir: str, results: str) -> None:
    """One of two gloo processes: the real trainer under fsdp, then under ddp; rank 0 writes its
    (held, peak) bytes for each."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    m = model_config("pre_ln", d_model=128, n_layer=6, context=64)
    out = {}
    for parallel in ("fsdp", "ddp"):
        cfg = RunConfig(model=m, optim=OptimConfig(lr=1e-3),
                        train=TrainConfig(steps=4, batch_size=8, threads=1, parallel=parallel), data_dir=data_dir)
        out[parallel] = measured_peak(cfg, Path(results).parent / f"{parallel}-rank{rank}")
    if rank == 0:
        Path(results).write_text(repr(out))
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # starts two training processes
def test_two_processes_shard_under_fsdp_and_add_buckets_under_ddp(data_dir, tmp_path):
    """Two processes: under fsdp each holds its half of every parameter and AdamW moment, exactly the
    sharded bytes; under ddp the whole model, its moments and DDP's gradient buckets, exactly. The peak
    is bounded from above, within 25%: here the static memory is as large as the activations, so
    counting every gradient (few exist at the peak, backward's start) and FSDP's gather allowance (the
    root and two blocks, their parameters and gradients) weighs more than in one process: 15% (ddp)
    and 19% (fsdp) measured."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = tmp_path / "peaks.txt"
    mp.spawn(_two_processes, args=(port, str(data_dir), str(results)), nprocs=2)
    got = ast.literal_eval(results.read_text())  # our own repr of two tuples of ints
    m = model_config("pre_ln", d_model=128, n_layer=6, context=64)
    estimates = {p: memory.estimate(m, OptimConfig(lr=1e-3), TrainConfig(batch_size=8, parallel=p), 2)
                 for p in got}
    for parallel, (held, peak) in got.items():
        e = estimates[parallel]
        counted = e.static + max(e.activations, e.step_temporaries) + e.extra  # training only: no evaluation
        assert peak <= counted <= 1.25 * peak, (parallel, peak, counted)
    fsdp, ddp = estimates["fsdp"], estimates["ddp"]
    # FSDP's own bookkeeping beside its shards: a few bytes (56 here)
    assert 0 <= got["fsdp"][0] - (fsdp.params + fsdp.optimizer) < 1000
    assert got["ddp"][0] == ddp.params + ddp.optimizer + ddp.extra  # the buckets: a copy of every gradient
    one = memory.estimate(m, OptimConfig(), TrainConfig(batch_size=8), 1)
    assert ddp.extra == one.grads and ddp.params + ddp.optimizer == one.params + one.optimizer
    assert got["fsdp"][0] < 0.51 * (one.params + one.optimizer)  # half, plus the betas and step counters


def test_fsdp_divides_params_grads_and_state_by_the_processes():
    """Closed form: a 7b process's share of the 16 bytes per parameter is ceil(rows / N) rows of each
    tensor; with N = 8 that is one eighth, up to the rows' rounding and the per-tensor step counters."""
    m = ModelConfig(**presets.resolve("7b", "pre_ln")["model"])
    t = TrainConfig(**presets.resolve("7b", "pre_ln")["train"])
    one = memory.estimate(m, OptimConfig(), dataclasses.replace(t, parallel="ddp"), 8, cuda=True)
    eight = memory.estimate(m, OptimConfig(), t, 8, cuda=True)
    expected = sum(4 * math.ceil(s[0] / 8) * math.prod(s[1:]) for _, s in memory.param_shapes(m))
    assert eight.grads == expected and eight.params == expected + 4 * 2 * m.n_layer
    assert eight.optimizer == 2 * expected + 4 * len(memory.param_shapes(m))
    assert eight.grads == pytest.approx(one.grads / 8, rel=1e-3)
    assert eight.micro_batch == one.micro_batch == 8  # 64 sequences over 8 processes


# ---- evaluation: validation and the probe, between steps ---------------------------------------------

def measured_evaluation(cfg: RunConfig, out: Path) -> dict[str, int]:
    """The peak of live tensor bytes above those held between steps, during the real trainer's
    validation and during its probe (metrics included), after a first step (gradients and optimiser
    state exist)."""
    from ofe.train.trainer import Trainer

    peaks = {}
    with LiveBytes() as live:
        tr = Trainer(cfg, out)
        tr.train_step()
        for name, run in (("validation", tr.log_val), ("probe", tr.log_probe)):
            before = live.peak = live.now
            run()
            peaks[name] = live.peak - before
    return peaks


@pytest.mark.parametrize("block, vocab, micro, precision", [
    ("pre_ln", 256, None, "fp32"),   # a block's MLP is validation's peak
    ("pre_ln", 4096, 2, "fp32"),     # the logits and log-probabilities are, at the micro-batch
    ("pre_ln", 4096, 2, "bf16"),     # and their fp32 copy under autocast: 10V bytes per token
    ("op", 256, None, "fp32"),       # QK-norm: q and k are the norm's outputs
    ("pre_ln", 4096, None, "fp32"),  # no micro-batch: the process's whole batch at once
])
def test_the_evaluation_term_bounds_validation_and_the_probe(data_dir, tmp_path, block, vocab, micro, precision):
    """Validation runs in micro-batches (here 2 of 8 sequences, or all 8) and the probe at its 4
    sequences; each peak of live bytes above what training keeps between steps is bounded by its
    formula (plus, under autocast, the bf16 weight copies that are the estimate's `extra`), within 20%:
    measured 0-0.6% above, 18% for bf16 validation (CPU's cross-entropy holds 9V bytes per token, the
    formula counts 10V: the logits, their fp32 copy and the log-probabilities)."""
    m = model_config(block, vocab_size=vocab, d_model=64, n_layer=3, context=32)
    cfg = RunConfig(model=m, optim=OptimConfig(lr=1e-3),
                    train=TrainConfig(steps=4, batch_size=8, micro_batch_size=micro, eval_batches=2,
                                      probe_batch_size=4, threads=1, precision=precision),
                    data_dir=str(data_dir))
    got = measured_evaluation(cfg, tmp_path)
    s, c = (4, 2) if precision == "bf16" else (4, 4)
    copies = memory.extra_bytes(m, cfg.train, 1, cuda=False)  # autocast's weight copies (0 in fp32)
    want = {"validation": memory.validation_bytes(m, cfg.train, 1, s, c) + copies,
            "probe": memory.probe_bytes(m, 4 * m.context, s, c) + copies}
    for name in got:
        assert got[name] <= want[name] <= 1.2 * got[name], (name, got[name], want[name])
    e = memory.estimate(m, cfg.optim, cfg.train, 1)
    assert e.evaluation == max(want.values()) - copies

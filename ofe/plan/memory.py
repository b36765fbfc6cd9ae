"""How much memory one training process needs: pure arithmetic on a run's config, no torch.

`estimate(model, optim, train, processes, cuda)` gives the bytes one process holds at its peak,
in seven parts (every figure is per process, i.e. per GPU on a GPU node):

- params: every parameter and buffer in fp32 (weights stay fp32; bf16 is a compute copy), the list
  `param_shapes` gives, which is `ofe.core.model.GPT`'s (tests/unit/plan/test_memory.py checks it against the model).
- grads: one fp32 gradient per parameter (under fsdp its shard: with micro-batches every one
  reduce-scatters, `ofe.train.parallel.grad_sync`, so no rank accumulates unsharded gradients).
- optimizer: what each optimiser keeps per parameter tensor of n entries and shape (r, c), fp32
  (`optimizer_state_bytes`):
    adamw              exp_avg, exp_avg_sq: 8n, plus a 4-byte step tensor
    adafactor          exp_avg 4n + step 4; matrices a factored second moment, row and column: 4(r + c);
                       vectors exp_avg_sq 4n (ofe.core.factored.FactoredAdam)
    rotated_adafactor  adafactor's, plus for each side of a matrix no larger than optim.max_precond_dim
                       its statistic (L = EMA(G G^T) for rows, R = EMA(G^T G) for columns) and its
                       eigenbasis (Q_L, Q_R): 2 x 4 r^2 and 2 x 4 c^2
    soap               exp_avg, exp_avg_sq 8n, plus the same statistics and eigenbases (pytorch-optimizer's
                       SOAP: GG and Q); no step tensor (it counts steps per group)
    muon               the blocks' linear weights: one momentum buffer 4n (torch.optim.Muon); embeddings and
                       vectors: adamw's (ofe.core.optim.muon_param_groups)
  Under `train.parallel: fsdp` each process keeps 1/N of every tensor (dim 0 split in ceil(rows / N)
  rows, as FSDP2 shards), so params, grads and optimiser state are divided by the processes; under ddp
  every process keeps all of them.
- activations: what autograd keeps for backward at one micro-batch of m sequences of T tokens
  (m = train.micro_batch_size, or the process's whole share of the batch), plus backward's own peak
  (`activation_bytes`; per block `block_activation_bytes`, e.g. Pre-LN with SDPA: (2s + 10c) d + 4H +
  16 bytes per token, s and c the stream and compute element sizes, 4 and 4 in fp32, 4 and 2 under
  bf16 autocast, on every path). Attention runs in SDPA, which stores no T x T scores; only the
  explicit path (`explicit_attention`: `model.logit_cap`, or a non-softmax `model.attention`) does.
- step temporaries: on CUDA, torch's foreach AdamW holds one fp32 temporary per parameter it updates.
  The step runs after backward has freed the activations, so the peak holds the larger of the two.
- evaluation: validation's and the probe's no-grad forward passes (`evaluation_bytes`): validation
  runs at the training micro-batch, its peak the logits and cross-entropy's fp32 temporaries (10V bytes
  per token under autocast); the probe at probe_batch_size, with the stream, q and k tensors it keeps
  and the metrics' attention-entropy temporaries. Evaluation runs between steps.
- extra: memory a wrapper adds (`extra_bytes`): DDP's gradient buckets (a second fp32 copy of every
  gradient, with more than one process) or FSDP's gathered fp32 parameters and their unsharded fp32
  gradients (the root, and two blocks at a time with more than one process: the current one and the
  one prefetched); and autocast's bf16 copies of the matmul weights, the whole model's even under
  fsdp (each is saved for backward, so it outlives the gathered weight it was cast from).
- reserve: an allowance, not a count: on a GPU 1 GiB (CUDA context, cuBLAS and NCCL workspaces) plus
  10% of the rest (the caching allocator's fragmentation); on a CPU 0.5 GiB (the interpreter and its
  libraries).

`total` = params + grads + optimizer + max(activations, step temporaries, evaluation) + extra +
reserve. Without the reserve it bounds the measured peak of live tensors from above
(tests/unit/plan/test_memory.py, CPU): over training steps by 0.5-9% in one process, 15% (ddp) and 19% (fsdp)
in two processes of a model whose static memory is as large as its activations; over validation and
the probe by 0-0.6% (18% for bf16 validation). With one micro-batch the gradients appear while backward frees the
activations, so the true peak is lower by up to min(grads, activations).
"""

from __future__ import annotations

from dataclasses import dataclass

from ofe.config import ModelConfig, OptimConfig, TrainConfig
# the model's tensors and the optimisers' state per tensor; re-exported: the plan's callers use them from here
from ofe.plan.memshapes import (FP32, Shape, buffer_shapes, explicit_attention, gate_width, is_muon_param,  # noqa: F401
                                numel, optimizer_state_bytes, param_shapes, shard)

BF16, INT64 = 2, 8
GIB = 2**30
GPU_RESERVE_FIXED = 1 * GIB  # CUDA context + cuBLAS/NCCL workspaces (an allowance; not measured here)
GPU_RESERVE_FRACTION = 0.10  # the caching allocator's fragmentation (an allowance)
CPU_RESERVE = GIB // 2  # python, torch and the data loader's process memory (an allowance)



@dataclass(frozen=True)
class Estimate:
    """Bytes one process needs at its peak, by part (see the module docstring for each formula)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    step_temporaries: int
    """The optimiser step's own temporaries; the step runs once backward has freed the activations, so
    the peak holds the larger of the two."""
    evaluation: int
    """Validation's or the probe's no-grad forward (`evaluation_bytes`); between steps, so the peak holds
    the largest of activations, step temporaries and evaluation."""
    extra: int
    reserve: int
    micro_batch: int
    """Sequences per forward/backward (the activations' m)."""

    @property
    def total(self) -> int:
        return self.static + self.transient + self.extra + self.reserve

    @property
    def static(self) -> int:
        """What every moment holds: parameters, gradients (kept from one step to the next) and state."""
        return self.params + self.grads + self.optimizer

    @property
    def transient(self) -> int:
        """The largest of the three parts that never coexist."""
        return max(self.activations, self.step_temporaries, self.evaluation)


# ---- activations ---------------------------------------------------------------------------------

def _dtypes(train: TrainConfig, cuda: bool) -> tuple[int, int]:
    """(stream, compute) bytes per element of saved activations.

    fp32: 4 and 4. bf16 is autocast on every path (ofe.train.parallel: ddp and fsdp, CPU and CUDA): the
    residual stream stays fp32 (embeddings and the residual sums are fp32), matmul inputs and outputs
    are bf16 copies: 4 and 2."""
    bf16 = train.precision == "bf16" or (train.precision == "auto" and cuda)
    return (FP32, BF16) if bf16 else (FP32, FP32)


NORM_STATS = {"layernorm": 2 * FP32, "rmsnorm": FP32, "srms": FP32, "single_scale": FP32, "none": 0}  # per token


def norm_activation_bytes(kind: str, d: int, s: int) -> int:
    """Per token, what a norm on the residual stream saves: its input, s d, and its statistics (LayerNorm
    mean and rstd, RMSNorm rstd, fp32); torch's RMSNorm with a gain, and the single-scale one, also keep
    the normalised input, 4d in fp32, for the gain's gradient."""
    if kind == "none":
        return 0
    return s * d + NORM_STATS[kind] + (FP32 * d if kind in ("rmsnorm", "single_scale") else 0)


def block_activation_bytes(m: ModelConfig, first: bool, s: int, c: int) -> int:
    """Bytes one block saves for backward, per token; s, c: stream and compute element sizes.

    Per token, d = d_model, H = heads, r = mlp_ratio, T = context:
      the norms (`norm_activation_bytes`): pre and post two each, none none except a LayerNorm on block
        0's attention input under first_norm 'block0_attn_input'
      matmul and ReLU inputs, c bytes each: the qkv input d, q k v 3d, the attention output d (SDPA
        keeps it for backward; it is laid out (B, T, H, hd), so the projection's input is the same
        storage), the MLP input d and the ReLU output r d (the MLP projection's input): (6 + r) d
      SDPA's log-sum-exp: 4H
      QK-norm, per q and per k: 'rms' (the public code's) the fp32 quotient 4d, the output c d, rms and
        its denominator 8H; 'rms_torch' the normalised input 4d, the output c d, rstd 4H; both an fp32
        copy of the input 4d when c is 2
      trainable beta: each branch output is kept too, 2 c d
      explicit attention (`explicit_attention`): no log-sum-exp, the same d count (q, k, v and the output
        copied for bmm), per query and head T scores: the tanh output c (logit cap), the softmax output s
        (fp32, T + 1 wide, for the sinks) and its c copy for probs @ v if c != s, or the clipped softmax's 2
        or softpick's 4 fp32 tensors (3 fp32 per row) and c weights; the causal mask, T^2 per forward. SDPA
        keeps none. Within 5% in fp32. The gate (w = `gate_width`): sigmoid c w, product c d, x recast c d
    """
    d, H, r, T = m.d_model, m.n_head, m.mlp_ratio, m.context
    if m.norm != "none":
        out = 2 * norm_activation_bytes(m.norm, d, s)
    elif first and m.first_norm == "block0_attn_input":
        out = norm_activation_bytes("layernorm", d, s)
    else:
        out = 0
    out += c * d * (6 + r)
    per_row = {"softmax1": 1, "learned_sink": 1, "softpick": 3}.get(m.attention, 0) if explicit_attention(m) else 1
    out += FP32 * H * per_row  # SDPA's log-sum-exp; or the sinks' column, softpick's max, exp(-max) and sum
    if explicit_attention(m):
        kept = {"clipped_softmax": 2 * FP32, "softpick": 4 * FP32}.get(m.attention)
        w = FP32 if m.attention in ("softmax1", "learned_sink") else s
        out += T * H * ((c if m.logit_cap is not None else 0) + (kept + c if kept else w + (c if c != w else 0)))
    out += c * (gate_width(m) + d) + (c * d if c != FP32 else 0) if gate_width(m) else 0  # autocast: x cast again
    copy = FP32 * d if c != FP32 else 0
    if m.qk_norm == "rms":
        out += 2 * (FP32 * d + c * d + copy + 2 * FP32 * H)
    elif m.qk_norm == "rms_torch":
        out += 2 * (FP32 * d + c * d + copy + FP32 * H)
    if m.beta_trainable:
        out += 2 * c * d
    return out


def head_activation_bytes(m: ModelConfig, s: int, c: int) -> int:
    """Bytes per token outside the blocks that forward keeps: the token ids and targets (int64, 16);
    an embed_stream LayerNorm and the final norm (`norm_activation_bytes`); the head's input c d; the
    logits c V (the training step holds them until its next forward returns); the fp32
    log-probabilities cross-entropy saves, 4V; with the embedding projections (embed_proj) the input of
    each, c d apiece (the embeddings sum and the final norm's output, or their bf16 copies)."""
    d, V = m.d_model, m.vocab_size
    out = 2 * INT64 + c * d + c * V + FP32 * V + (2 * c * d if m.embed_proj else 0)
    if m.first_norm == "embed_stream":
        out += norm_activation_bytes("layernorm", d, s)
    return out + norm_activation_bytes(m.final_norm, d, s)


def backward_peak_bytes(m: ModelConfig, c: int) -> int:
    """Per token, what backward adds on top of the saved activations where it peaks, the larger of:
    at its start, the gradients of the log-probabilities and of the logits, fp32, 8V (plus their c copy
    when c is 2); in the last block's MLP, the gradients of its ReLU output and its hidden
    pre-activation, 2 c r d, by which time the 4V log-probabilities are freed."""
    V, rd = m.vocab_size, m.mlp_ratio * m.d_model
    return max(2 * FP32 * V + (c * V if c != FP32 else 0), 2 * c * rd - FP32 * V)


def activation_bytes(m: ModelConfig, tokens: int, s: int = FP32, c: int = FP32, micro_batches: int = 1) -> int:
    """Activations at the peak of one forward/backward over `tokens` tokens (micro-batch x context):
    per token, the blocks' and the head's saved bytes and backward's own peak; with more than one
    micro-batch, the previous micro-batch's logits (c V), alive until the next forward returns; per
    forward, the explicit path's causal masks."""
    per_token = block_activation_bytes(m, True, s, c) + (m.n_layer - 1) * block_activation_bytes(m, False, s, c)
    per_token += head_activation_bytes(m, s, c) + backward_peak_bytes(m, c)
    per_token += c * m.vocab_size if micro_batches > 1 else 0
    masks = m.n_layer * m.context**2 if explicit_attention(m) else 0
    return tokens * per_token + masks


# ---- evaluation: validation's and the probe's no-grad forward passes --------------------------------

def _qk_bytes(m: ModelConfig, c: int) -> int:
    """Bytes per element of q and k: an fp32 Q/K bias added to the projection promotes them to fp32."""
    return FP32 if m.qk_bias else c


def forward_transient_bytes(m: ModelConfig, s: int, c: int) -> int:
    """Per token, what a no-grad forward holds inside a block besides the block's input: the stream
    after attention s d, the norm's fp32 output 4d and the MLP's hidden pre-activation and ReLU output
    2 r c d; the explicit attention (`explicit_attention`) instead, where larger, about four fp32 T x T
    score tensors per head, 16 H T."""
    d = m.d_model
    mlp = s * d + (FP32 * d if m.norm != "none" else 0) + 2 * m.mlp_ratio * c * d
    return max(mlp, 4 * FP32 * m.n_head * m.context) if explicit_attention(m) else mlp


def validation_bytes(m: ModelConfig, train: TrainConfig, processes: int, s: int, c: int) -> int:
    """The peak of validation (`ofe.train.trainer.Trainer.log_val`): the token ids and targets of its eval_batches
    batches (int64, 16 bytes per token), and per token of one forward at the training micro-batch the
    larger of a block's bytes (its input s d and `forward_transient_bytes`) and the loss's: the final
    norm's fp32 output 4d, the logits c V, their fp32 copy 4V (when c is 2) and cross-entropy's fp32
    log-probabilities 4V: 10V bytes per token under autocast, 8V in fp32."""
    d, V = m.d_model, m.vocab_size
    head = FP32 * d + c * V + (FP32 * V if c != FP32 else 0) + FP32 * V
    ids = 2 * INT64 * train.eval_batches * train.batch_size * m.context
    per_token = max(s * d + forward_transient_bytes(m, s, c), head)
    return ids + micro_batch(train, processes) * m.context * per_token


def probe_bytes(m: ModelConfig, tokens: int, s: int, c: int) -> int:
    """The peak of the probe over `tokens` tokens (probe_batch_size x context): what it stores, per token
    the L + 1 residual streams (L block inputs, the final stream) s d, the final norm's fp32 output 4d,
    and each layer's q and k (views of the qkv projection, 3 q d, or the QK-norm's two outputs, 2 q d;
    q = `_qk_bytes`) and the token ids (int64); plus the larger of the forward's transients
    (`forward_transient_bytes`; the logits c V and, under autocast, the head input's bf16 copy c d) and
    the metrics' (attention entropy's five fp32 B x H x T x T tensors, 20 H T per token; the stream
    metrics' fp32 copies, 12 d); once, the position ids 8T and the entropy's causal mask T^2. The probe's
    forward runs the explicit attention (`ofe.core.probe.collect`): its scores and weights, about 16 H T,
    and the sink hook's two boolean masks, 2 H T, stay under the entropy's 20 H T, so they need no term
    (measured at T = 256, H = 8: the same peak as without the sink metrics, to 0.001%)."""
    d, L = m.d_model, m.n_layer
    stored = INT64 + (L + 1) * s * d + (FP32 * d if m.final_norm != "none" else 0)
    stored += L * (2 if m.qk_norm != "none" else 3) * _qk_bytes(m, c) * d
    head = c * m.vocab_size + (c * d if c != FP32 else 0)
    transient = max(forward_transient_bytes(m, s, c), head, 5 * FP32 * m.n_head * m.context, 3 * FP32 * d)
    return tokens * (stored + transient) + INT64 * m.context + m.context**2


def evaluation_bytes(m: ModelConfig, train: TrainConfig, processes: int, s: int, c: int) -> int:
    """Validation at the training micro-batch (`ofe.train.trainer.Trainer.log_val`) or the probe at
    probe_batch_size, whichever needs more; they never run at once."""
    return max(validation_bytes(m, train, processes, s, c),
               probe_bytes(m, train.probe_batch_size * m.context, s, c))


# ---- the estimate --------------------------------------------------------------------------------

def micro_batch(train: TrainConfig, processes: int) -> int:
    """Sequences per forward/backward: train.micro_batch_size, or the process's share of the batch."""
    return train.micro_batch_size or max(1, train.batch_size // processes)


def extra_bytes(m: ModelConfig, train: TrainConfig, processes: int, cuda: bool) -> int:
    """What a wrapper adds (module docstring): DDP buckets or FSDP gathers, autocast weight copies."""
    shapes = param_shapes(m)
    _, c = _dtypes(train, cuda)
    if train.parallel == "fsdp":
        per_block = sum(numel(sh) for n, sh in shapes if n.startswith("blocks.0."))
        root = sum(numel(sh) for n, sh in shapes if not n.startswith("blocks."))
        blocks = min(2, m.n_layer) if processes > 1 else 0  # one process gathers nothing from others
        out = 2 * FP32 * (root + blocks * per_block)  # gathered fp32 params + unsharded fp32 grads
    else:
        out = FP32 * sum(numel(sh) for _, sh in shapes) if processes > 1 else 0  # DDP's buckets
    if c != FP32:  # autocast: bf16 copies of every matmul weight (the linears and the tied head), whole
        # even under fsdp: each is saved for backward, outliving the gathered fp32 weight it was cast from
        out += BF16 * sum(numel(sh) for n, sh in shapes if len(sh) == 2 and n != "wpe.weight")
    return out


def step_temporary_bytes(optim: OptimConfig, local_params: dict[str, Shape], cuda: bool) -> int:
    """The optimiser step's temporaries: on CUDA torch's AdamW runs foreach, which holds one fp32
    temporary per parameter it updates (sqrt(v) over the whole list); on CPU it goes one tensor at a time,
    as ofe.core.factored, SOAP and Muon always do (negligible next to the activations)."""
    if not cuda or optim.name not in ("adamw", "muon"):
        return 0
    return FP32 * sum(numel(sh) for n, sh in local_params.items()
                      if optim.name == "adamw" or not is_muon_param(n, sh))


def estimate(m: ModelConfig, optim: OptimConfig, train: TrainConfig, processes: int = 1,
             cuda: bool = False) -> Estimate:
    """Peak bytes of one of `processes` training processes (module docstring for the formulas)."""
    n = processes if train.parallel == "fsdp" else 1
    local = {name: shard(full, n) for name, full in param_shapes(m)}
    params = grads = opt = 0
    for name, full in param_shapes(m):
        params += FP32 * numel(local[name])
        grads += FP32 * numel(local[name])
        opt += optimizer_state_bytes(optim.name, name, local[name], optim.max_precond_dim, full)
    params += sum(FP32 * numel(sh) for _, sh in buffer_shapes(m))  # buffers are not sharded
    mb = micro_batch(train, processes)
    s, c = _dtypes(train, cuda)
    acts = activation_bytes(m, mb * m.context, s, c, micro_batches=max(1, train.batch_size // processes // mb))
    extra = extra_bytes(m, train, processes, cuda)
    temps = step_temporary_bytes(optim, local, cuda)
    evaluation = evaluation_bytes(m, train, processes, s, c)
    counted = params + grads + opt + extra + max(acts, temps, evaluation)
    reserve = int(GPU_RESERVE_FIXED + GPU_RESERVE_FRACTION * counted) if cuda else CPU_RESERVE
    return Estimate(params=params, grads=grads, optimizer=opt, activations=acts, step_temporaries=temps,
                    evaluation=evaluation, extra=extra, reserve=reserve, micro_batch=mb)

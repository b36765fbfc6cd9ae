"""Super-weight detection (Yu et al. 2024, "The Super Weight in Large Language Models", arXiv 2411.07191;
docs/inspect.md, "Super weights"): one forward pass with hooks on every MLP's down projection, each recording
the largest-magnitude entry of its input and of its output; a layer where both spike above the threshold
has its super weight at (the output's channel, the input's channel) of that down projection's weight.

Transcribed from the authors' code (github.com/mengxiayu/LLMSuperWeight, `analyze.py`:
`check_module_hidden_states` and `plot_down_proj_input_output`): a forward hook on each layer's
`mlp.down_proj` keeps its input (or output) tensor; `torch.max` of |x| over every entry gives the layer's
largest activation, kept signed, with its (batch, token, channel) index; a layer "spikes" where
|value| > 50; on the prompt "Apple Inc. is a worldwide tech company." (tokenised with the model's own
tokenizer and its default special tokens), in one forward pass. The coordinates are then read off by
hand there: the row is the output spike's channel, the column the input spike's (the Llama-7B super
weight at layer 2, (3968, 7003), is one such pair). Here that reading is automatic: every layer where
both spike is reported, and the earliest is the headline, since a super weight creates the super
activation that every later layer carries (later co-spikes, such as the last layers that cancel it,
are listed too).

The hooks only reduce each tensor to its peak (`peak`, a pure function) so no layer's activations are
kept; everything else here is a pure function of those peaks and of the weights.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ofe.core.hooks import dotted_attr, first_tensor

PROMPT = "Apple Inc. is a worldwide tech company."  # the authors' detection prompt (analyze.py)
SPIKE_THRESHOLD = 50.0  # the authors' |activation| above which a layer spikes (absolute: their fp16 7B models)

# The MLP's down projection (width d_ff -> d) inside each decoder layer, by transformers' model_type: the
# one place this mapping lives. Families not listed use Llama's name, which most recent decoders share
# (Mistral, Qwen2, Gemma, OLMo, Phi-3); "ofe" is ofe's own GPT (`ofe.core.model.MLP`).
DOWN_PROJ = {
    "gpt_neox": "mlp.dense_4h_to_h",  # Pythia
    "gpt2": "mlp.c_proj",  # a Conv1D: its weight is stored (in, out), see `weight_entry`
    "gpt_neo": "mlp.c_proj",
    "gptj": "mlp.fc_out",
    "opt": "fc2",
    "falcon": "mlp.dense_4h_to_h",
    "bloom": "mlp.dense_4h_to_h",
    "ofe": "mlp.proj",
}
DEFAULT_DOWN_PROJ = "mlp.down_proj"


class Peak(NamedTuple):
    """The largest-magnitude entry of a tensor (..., C), as the authors record it: its signed value, its
    channel (the last dimension) and its token (the leading dimensions flattened: batch, then position)."""

    value: float
    channel: int
    token: int


def peak(x: Tensor) -> Peak:
    """The entry of largest |x| over every token and channel of `x` (..., C) (the first such entry on a tie)."""
    flat = x.detach().reshape(-1, x.shape[-1])
    index = int(flat.abs().float().reshape(-1).argmax())
    token, channel = divmod(index, flat.shape[-1])
    return Peak(float(flat[token, channel]), channel, token)


class SuperWeight(NamedTuple):
    """A super weight: entry (row, col) of layer `layer`'s down-projection weight, in nn.Linear's
    (out, in) convention: row = the output channel that spikes, col = the input channel that spikes."""

    layer: int
    row: int
    col: int


def find_super_weights(inputs: Sequence[Peak], outputs: Sequence[Peak],
                       threshold: float = SPIKE_THRESHOLD) -> list[SuperWeight]:
    """Every layer (in order) whose down projection's input and output both spike (|peak| > threshold,
    strictly, as the authors compare), with the super weight at (output channel, input channel)."""
    return [SuperWeight(layer, out.channel, inp.channel)
            for layer, (inp, out) in enumerate(zip(inputs, outputs))
            if abs(inp.value) > threshold and abs(out.value) > threshold]


def weight_entry(module: nn.Module, row: int, col: int) -> float:
    """The down projection's weight at (output row, input col). transformers' Conv1D (GPT-2) stores its
    weight transposed, (in, out), and computes x @ W; nn.Linear stores (out, in) and computes x @ W^T."""
    weight = module.weight.detach()
    return float(weight[col, row] if type(module).__name__ == "Conv1D" else weight[row, col])


def down_projections(layers: Sequence[nn.Module], model_type: str) -> tuple[str, list[nn.Module] | None]:
    """(the module path inside each decoder layer, the module of every layer) or (path, None) where some
    layer has no such module with a weight (a mixture of experts, an unknown family)."""
    path = DOWN_PROJ.get(model_type, DEFAULT_DOWN_PROJ)
    modules = [dotted_attr(layer, path) for layer in layers]
    if not modules or any(not isinstance(m, nn.Module) or not isinstance(getattr(m, "weight", None), Tensor)
                          for m in modules):
        return path, None
    return path, modules


def _peak_dict(p: Peak) -> dict[str, Any]:
    return {"value": p.value, "channel": p.channel, "token": p.token}


@torch.no_grad()
def scan(layers: Sequence[nn.Module], model_type: str, run: Callable[[], Any],
         threshold: float = SPIKE_THRESHOLD) -> dict[str, Any]:
    """Hook every layer's down projection, call `run` (one forward pass of the model on the prompt) and
    report, as JSON-ready data: the module searched, the threshold, each layer's input and output peak,
    every super weight found (layer, row, col, the weight's value and the two peaks) and a note where the
    model could not be scanned (then nothing is found, and nothing fails)."""
    path, modules = down_projections(layers, model_type)
    report: dict[str, Any] = {"module": path, "threshold": threshold, "prompt": PROMPT, "layers": [],
                              "found": [], "note": None}
    if modules is None:
        report["note"] = (f"no down projection `{path}` with a weight in every decoder layer of this "
                          f"{model_type!r} model (ofe.pretrained.superweight.DOWN_PROJ maps each family's "
                          "name): super weights were not searched for")
        return report
    inputs: dict[int, Peak] = {}
    outputs: dict[int, Peak] = {}

    def hook(i: int) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple, out: Any) -> None:
            inputs[i], outputs[i] = peak(args[0]), peak(first_tensor(out))
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if len(inputs) != len(modules):  # a layer the forward pass skipped: its peaks are unknown
        report["note"] = (f"the forward pass did not reach `{path}` in layers "
                          f"{sorted(set(range(len(modules))) - set(inputs))}: super weights were not searched for")
        return report
    ins, outs = [inputs[i] for i in range(len(modules))], [outputs[i] for i in range(len(modules))]
    report["layers"] = [{"layer": i, "input": _peak_dict(a), "output": _peak_dict(b)}
                        for i, (a, b) in enumerate(zip(ins, outs))]
    report["found"] = [{"layer": sw.layer, "row": sw.row, "col": sw.col,
                        "weight": weight_entry(modules[sw.layer], sw.row, sw.col),
                        "input": ins[sw.layer].value, "output": outs[sw.layer].value}
                       for sw in find_super_weights(ins, outs, threshold)]
    return report


def headline(report: dict[str, Any]) -> dict[str, Any] | None:
    """The earliest super weight of a `scan` report (the one that creates the super activation), or None."""
    return report["found"][0] if report.get("found") else None

"""Tiny random transformers models and a local tokenizer for the `ofe inspect` tests: nothing comes from
a hub. Each family's config class builds a d 32, 2-layer model; the tokenizer is a byte-level BPE
trained on a few strings and saved beside the model, as save_pretrained would leave a real one."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

VOCAB = 320  # the model's embeddings; the tokenizer uses the first ~300 ids
D, LAYERS, HEADS, POSITIONS = 32, 2, 2, 128
FAMILIES = ("gpt_neox", "opt", "gpt2", "llama")

_TRAINING_STRINGS = ["def foo(x):\n    return x + 1\n", "import os\nclass A:\n    pass\n",
                     "for i in range(10):\n    print(i)\n", "the quick brown fox jumps over the lazy dog\n"]


def tokenizer():
    """A byte-level BPE (any text encodes) with <|endoftext|> as id 0, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(_TRAINING_STRINGS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def config(family: str, **overrides):
    import transformers as t

    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt_neox":
        cfg = t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              intermediate_size=4 * D, max_position_embeddings=POSITIONS, **ids)
    elif family == "opt":
        cfg = t.OPTConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          ffn_dim=4 * D, max_position_embeddings=POSITIONS, word_embed_proj_dim=D, **ids)
    elif family == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS, **ids)
    elif family == "llama":  # grouped-query attention: 2 query heads share 1 K/V head
        cfg = t.LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            num_key_value_heads=1, intermediate_size=2 * D, max_position_embeddings=POSITIONS, **ids)
    elif family == "gemma2":  # soft-capped attention logits: the quantising attention must refuse it
        cfg = t.Gemma2Config(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             num_key_value_heads=1, head_dim=D // HEADS, intermediate_size=2 * D,
                             max_position_embeddings=POSITIONS, **ids)
    elif family == "bert":  # a causal-LM head on an encoder: no decoder layer list
        cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=4 * D, is_decoder=True)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(family), attn_implementation="eager").eval()


def save(model, folder: Path, tok=None) -> Path:
    """model + tokenizer in `folder`, as save_pretrained writes them."""
    model.save_pretrained(folder)
    (tok or tokenizer()).save_pretrained(folder)
    return folder


def text_file(folder: Path, chars: int = 60_000) -> Path:
    """Python source (this repository's) as the text to measure on."""
    root = Path(__file__).resolve().parents[2] / "ofe"
    text = "".join(p.read_text() for p in sorted(root.rglob("*.py")))  # every module, in its subpackage too
    path = folder / "text.txt"
    path.write_text((text * (chars // len(text) + 1))[:chars])
    return path


def plant_outlier(model, r: float, s: float = 0.05, channel: int = 7, seed: int = 1):
    """Embeddings of +-s in every channel (random signs) and one channel of +-r*s, learned positions
    zeroed: the stream entering layer 0 is then the token's embedding, whatever the tokens, so its
    kurtosis is `planted_kurtosis(r)` exactly (rotary models have no position embedding to zero)."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        signs = torch.randint(0, 2, emb.shape, generator=torch.Generator().manual_seed(seed)) * 2.0 - 1
        emb.copy_(signs * s)
        emb[:, channel] *= r
        for name, p in model.named_parameters():
            if name.endswith(("wpe.weight", "embed_positions.weight")):
                p.zero_()
    return model


def planted_kurtosis(r: float, d: int = D) -> float:
    """Kurt = mean(s_j^4) / mean(s_j^2)^2 with s_j^2 = s^2 for d - 1 channels and r^2 s^2 for one:
    d (r^4 + d - 1) / (r^2 + d - 1)^2 (1 for r = 1; 18.70 for d = 32, r = 10)."""
    return d * (r**4 + d - 1) / (r**2 + d - 1) ** 2


def fake_hub_cache(root: Path, model_dir: Path, repo: str, refs: dict[str, str]) -> Path:
    """The layout huggingface_hub leaves after a download: models--org--name/{refs/REV, snapshots/SHA}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    for ref, sha in refs.items():
        if not (folder / "snapshots" / sha).exists():
            shutil.copytree(model_dir, folder / "snapshots" / sha)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(sha)
    return root


def sharpen_attention(model, family: str, factor: float = 60.0):
    """Queries and keys scaled by `factor` (logits by factor^2): a random tiny model's attention is
    nearly uniform (every head's first-token mass near the same value), this makes it peaked, so heads
    differ in their first-token mass (some above Gu et al.'s 0.3, some below) and some weights underflow
    to exactly 0: every attention metric is away from its trivial value."""
    d = D
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                p.mul_(factor)
            elif name.endswith("c_attn.weight"):  # GPT-2's Conv1D: (d, 3d), columns q | k | v
                p[:, : 2 * d].mul_(factor)
            elif name.endswith("c_attn.bias"):
                p[: 2 * d].mul_(factor)
            elif name.endswith("query_key_value.weight") or name.endswith("query_key_value.bias"):
                # GPT-NeoX interleaves per head: rows [h * 3 hd, (h + 1) * 3 hd) are q, k, v of head h
                hd = d // HEADS
                for h in range(HEADS):
                    p[h * 3 * hd: h * 3 * hd + 2 * hd].mul_(factor)
    return model


def plant_super_weight(model, family: str, layer: int, row: int, col: int, weight: float = 5.0,
                       spike: float = 100.0):
    """A super weight, written directly into the down projection of decoder layer `layer`: entry
    (row, col) (output row, input column) set to `weight`, and the down projection's input channel `col`
    made to spike. Families with an MLP bias (GPT-NeoX, OPT, GPT-2): the up projection's row `col` zeroed
    and its bias set to `spike`, so that input channel is act(spike) = spike for every token (GELU and
    ReLU pass 100 through). Llama (no biases): the gate and up rows `col` both read channel 0 of the normed
    stream, s (entries of order 1), times g = `spike` / 5, so that input channel is silu(g s) g s, about
    (g s)^2: thousands at the token where s is largest. Every other input channel stays below 1 and every
    other entry of column `col` below about 0.1 (the 0.02 init), so the output spikes at `row`."""
    base = model.base_model
    with torch.no_grad():
        if family == "gpt_neox":
            mlp = base.layers[layer].mlp
            mlp.dense_h_to_4h.weight[col] = 0
            mlp.dense_h_to_4h.bias[col] = spike
            mlp.dense_4h_to_h.weight[row, col] = weight
        elif family == "opt":
            blk = base.decoder.layers[layer]
            blk.fc1.weight[col] = 0
            blk.fc1.bias[col] = spike
            blk.fc2.weight[row, col] = weight
        elif family == "gpt2":  # Conv1D weights are stored (in, out)
            mlp = base.h[layer].mlp
            mlp.c_fc.weight[:, col] = 0
            mlp.c_fc.bias[col] = spike
            mlp.c_proj.weight[col, row] = weight
        elif family == "llama":
            mlp = base.layers[layer].mlp
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight[col] = 0
                lin.weight[col, 0] = spike / 5
            mlp.down_proj.weight[row, col] = weight
        else:
            raise ValueError(family)
    return model

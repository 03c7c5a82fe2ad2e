"""Two decoder-only transformers built from `utils.attention` (lesson 04).

* `GPT(GPTConfig(...))`: nanoGPT-style (GPT-2 architecture): learned positions, LayerNorm,
  GELU MLP, pre-LN blocks (post-LN, as in the original transformer, with `pre_ln=False`), and the
  output layer tied to the token embedding. Lesson 05 pretrains it.
* `Llama(LlamaConfig(...))`: the modern block that Llama, Mistral, Qwen and SmolLM2 use: RMSNorm,
  rotary positions (RoPE), a SwiGLU MLP, grouped-query attention (fewer key/value heads than query
  heads). `Llama.from_hf(hf_model)` copies the weights of a transformers LlamaForCausalLM
  (SmolLM2), and the course's code then gives the same logits.

Both: `forward(input_ids, kv_cache=None) -> logits (B, T, vocab_size)`. With a `KVCache` the
input holds only the NEW tokens; their positions start at `kv_cache.length`, and the cache is
updated in place (lesson 06's `generate` relies on this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.attention import (
    ATTENTION_IMPLS,
    CausalSelfAttention,
    KVCache,
    merge_heads,
    scaled_dot_product_attention,
)
from utils.checks import check_positive_int
from utils.positions import apply_rope, rope_frequencies


def check_input_ids(input_ids, vocab_size: int, block_size: int, past: int) -> None:
    """Shared checks of forward(): shape (B, T), integer ids in range, fits in the context."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids (torch.long), got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, time) with time >= 1, got "
                         f"{tuple(input_ids.shape)} (use ids.unsqueeze(0) for a single sequence)")
    T = input_ids.shape[1]
    if past + T > block_size:
        where = f"{past} cached + {T} new = {past + T}" if past else f"{T}"
        raise ValueError(f"sequence length {where} tokens exceeds the model's context "
                         f"(block_size) of {block_size} tokens; crop the input to the last "
                         f"{block_size - past} tokens")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


# --------------------------------------------------------------------------------------------
# GPT (nanoGPT / GPT-2 style)
# --------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    """The shape of a GPT (nanoGPT's names). Shown in lesson 04."""

    vocab_size: int = 50304
    block_size: int = 256    # context length: the longest sequence the model accepts
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True        # biases in Linear and LayerNorm layers (GPT-2 has them)
    pre_ln: bool = True      # LayerNorm before each sublayer (GPT-2 onward); False = post-LN
    attn_impl: str = "torch"  # "torch": torch's fused attention (faster); "course": utils.attention's

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                             f"each head gets n_embd // n_head channels")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {sorted(ATTENTION_IMPLS)}, got {self.attn_impl!r}")


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back. Shown in lesson 04."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One transformer block: attention (tokens talk) then MLP (each token thinks), each with a
    residual connection. pre-LN: x + f(LN(x)); post-LN (original transformer): LN(x + f(x)). Shown in lesson 04."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.pre_ln = config.pre_ln
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, bias=config.bias,
                                        dropout=config.dropout, layer_idx=layer_idx,
                                        impl=config.attn_impl)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        if self.pre_ln:
            x = x + self.attn(self.ln_1(x), kv_cache=kv_cache)
            x = x + self.mlp(self.ln_2(x))
        else:
            x = self.ln_1(x + self.attn(x, kv_cache=kv_cache))
            x = self.ln_2(x + self.mlp(x))
        return x


class GPT(nn.Module):
    """GPT-2 as nanoGPT writes it: token + learned position embeddings, n_layer pre-LN blocks, a final
    LayerNorm and an output layer tied to the token embeddings. Shown in lesson 04."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            # pre-LN leaves the residual stream un-normalised, so a final LayerNorm is needed;
            # in post-LN the last block already ends with one.
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias) if config.pre_ln else nn.Identity(),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one matrix, two uses
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied matrix counts once); optionally without position embeddings,
        as nanoGPT reports it (the token embedding is reused as the output layer, so it stays)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        past = 0 if kv_cache is None else kv_cache.length  # read before any layer updates it
        if kv_cache is not None and kv_cache.n_layers != self.config.n_layer:
            raise ValueError(f"kv_cache has {kv_cache.n_layers} layers, the model has "
                             f"{self.config.n_layer}: make it with KVCache(config.n_layer)")
        check_input_ids(input_ids, self.config.vocab_size, self.config.block_size, past)
        B, T = input_ids.shape
        pos = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache=kv_cache)
        x = self.transformer.ln_f(x)
        # (B, T, vocab_size): a score for every possible next token, at every position
        return self.lm_head(x)


def count_gpt_parameters(config: GPTConfig) -> int:
    """GPT's parameter count from its config alone: 12·C² per block plus small terms. Shown in lesson 04."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    per_block = 12 * C * C                      # q,k,v (3C²) + attention out (C²) + MLP (4C² + 4C²)
    per_block += (9 * C + 4 * C) if config.bias else 2 * C  # Linear biases (9C) + 2 LayerNorms
    final_ln = (2 * C if config.bias else C) if config.pre_ln else 0
    # token and position embeddings + blocks + final norm; the tied output layer adds nothing
    return V * C + config.block_size * C + L * per_block + final_ln


# --------------------------------------------------------------------------------------------
# Llama (SmolLM2)
# --------------------------------------------------------------------------------------------

@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    block_size: int = 8192       # context length (max_position_embeddings)
    n_layer: int = 30
    n_head: int = 9              # query heads
    n_kv_head: int = 3           # key/value heads (grouped-query attention: n_head % n_kv_head == 0)
    n_embd: int = 576
    n_hidden: int = 1536         # SwiGLU width (intermediate_size)
    head_dim: int | None = None  # defaults to n_embd // n_head
    rope_base: float = 100000.0  # rope_theta
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # The defaults above are SmolLM2-135M's.

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "n_hidden"):
            check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.n_embd % self.n_head != 0:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                                 f"unless head_dim is given")
            self.head_dim = self.n_embd // self.n_head
        check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE (dims rotate in pairs), got {self.head_dim}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}): "
                             f"each key/value head serves a group of n_head // n_kv_head query heads")

    @classmethod
    def from_hf(cls, hf_config) -> LlamaConfig:
        """The same architecture as a transformers LlamaConfig (transformers 4 or 5)."""
        rope = getattr(hf_config, "rope_parameters", None) or {}
        scaling = getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", "default"))
        if rope_type != "default":
            raise ValueError(f"only the default RoPE is implemented, this model uses {rope_type!r}")
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise ValueError("models with attention or MLP biases are not supported")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"only SiLU (SwiGLU) MLPs are supported, got {hf_config.hidden_act!r}")
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return cls(vocab_size=hf_config.vocab_size, block_size=hf_config.max_position_embeddings,
                   n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
                   n_kv_head=hf_config.num_key_value_heads, n_embd=hf_config.hidden_size,
                   n_hidden=hf_config.intermediate_size,
                   head_dim=getattr(hf_config, "head_dim", None), rope_base=float(theta),
                   norm_eps=hf_config.rms_norm_eps, tie_embeddings=hf_config.tie_word_embeddings)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean subtraction and the bias.

    Shown in lesson 04.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in float32, even for a bfloat16 model
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP; the gate decides, per channel, how much passes.

    Shown in lesson 04.
    """

    def __init__(self, n_embd: int, n_hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, n_hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, n_hidden, bias=False)
        self.down_proj = nn.Linear(n_hidden, n_embd, bias=False)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GroupedQueryAttention(nn.Module):
    """Causal attention with n_head query heads sharing n_kv_head key/value heads, and RoPE.

    Only the n_kv_head key/value heads are computed and cached (the KV cache is n_head/n_kv_head
    times smaller); each is repeated for its group of query heads just before attending.

    Shown in lesson 04.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # positions enter here, not in x
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, T_past + T, d)
        group = self.n_head // self.n_kv_head
        k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, d): kv head j serves query heads j*group..
        v = v.repeat_interleave(group, dim=1)
        y = scaled_dot_product_attention(q, k, v, causal=True)  # (B, H, T, d)
        # (B, T, C): mix the heads
        return self.o_proj(merge_heads(y))


class LlamaBlock(nn.Module):
    """One Llama layer: RMSNorm -> grouped-query attention with RoPE -> residual, RMSNorm -> SwiGLU ->
    residual. Shown in lesson 04."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = GroupedQueryAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.n_hidden)

    def forward(self, x, cos, sin, kv_cache=None):  # pre-norm, as GPT-2
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache=kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """A Llama-architecture decoder (SmolLM2's): embeddings, n_layer LlamaBlocks, RMSNorm, output layer.
    `Llama.from_hf(hf_model)` copies a transformers model's weights into it. Shown in lesson 04."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)  # no position table
        self.layers = nn.ModuleList([LlamaBlock(config, i) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for module in self.modules():  # a random init, for training from scratch (from_hf overwrites)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        # a tied matrix counts once: parameters() yields each Parameter once
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        past = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None and kv_cache.n_layers != self.config.n_layer:
            raise ValueError(f"kv_cache has {kv_cache.n_layers} layers, the model has "
                             f"{self.config.n_layer}: make it with KVCache(config.n_layer)")
        check_input_ids(input_ids, self.config.vocab_size, self.config.block_size, past)
        T = input_ids.shape[1]
        cos, sin = rope_frequencies(self.config.head_dim, T, self.config.rope_base, start=past)
        cos, sin = cos.to(input_ids.device), sin.to(input_ids.device)  # (T, head_dim) each
        x = self.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache=kv_cache)
        # (B, T, vocab_size)
        return self.lm_head(self.norm(x))

    @classmethod
    def from_hf(cls, hf_model, copy: bool = True) -> "Llama":
        """A Llama with the weights of a transformers LlamaForCausalLM (e.g. SmolLM2).

        The module names above follow transformers' on purpose, so the state dicts line up key
        by key once the leading "model." is dropped. copy=True clones the weights (training ours
        leaves the HF model alone); copy=False shares the same tensors (no extra memory).
        """
        if not hasattr(hf_model, "config") or not hasattr(hf_model, "state_dict"):
            raise TypeError(f"hf_model must be a transformers LlamaForCausalLM, got {type(hf_model).__name__}")
        model_type = getattr(hf_model.config, "model_type", None)
        if model_type != "llama":
            raise ValueError(f"from_hf copies Llama-architecture models, got model_type={model_type!r}")
        config = LlamaConfig.from_hf(hf_model.config)
        with torch.device("meta"):  # shapes only: no time spent on a random init we overwrite
            model = cls(config)
        state = {k.removeprefix("model."): v.detach() for k, v in hf_model.state_dict().items()
                 if not k.endswith("rotary_emb.inv_freq")}
        ours = model.state_dict()
        if config.tie_embeddings:  # one tensor serves both: load it as embed_tokens.weight
            state.pop("lm_head.weight", None)
            ours.pop("lm_head.weight")
        missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        if missing or unexpected:
            raise ValueError(f"weights do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, tensor in state.items():
            if ours[name].shape != tensor.shape:
                raise ValueError(f"{name}: expected shape {tuple(ours[name].shape)}, got {tuple(tensor.shape)}")
        if copy:
            state = {name: tensor.clone() for name, tensor in state.items()}
        model.load_state_dict(state, strict=False, assign=True)  # take the tensors as they are
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight  # re-tie: assign replaced the Parameter
        return model.eval()


def count_llama_parameters(config: LlamaConfig) -> int:
    """Llama's parameter count from its config alone (SmolLM2-135M: 134,515,008). Shown in lesson 04."""
    C, V, d = config.n_embd, config.vocab_size, config.head_dim
    attention = C * config.n_head * d * 2 + C * config.n_kv_head * d * 2  # q and o; k and v (GQA)
    mlp = 3 * C * config.n_hidden  # gate, up, down
    per_layer = attention + mlp + 2 * C  # + two RMSNorm weight vectors
    output = 0 if config.tie_embeddings else V * C
    # embeddings + layers + the final RMSNorm + an untied output layer
    return V * C + config.n_layer * per_layer + C + output

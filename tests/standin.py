"""A tiny stand-in for SmolLM2 (as nanochat's tests use): same interfaces, none of the weight.

`tiny_chat_model()` returns (model, tokenizer) that behave like the course's chat model for code paths:
a transformers `LlamaForCausalLM` (2 layers, 32 wide, random but seeded weights) and a byte-level
`PreTrainedTokenizerFast` with ChatML special tokens (`<|im_start|>`, `<|im_end|>`) and a ChatML chat
template, like SmolLM2's. It loads in milliseconds, so generation, serving and RAG-answer code can be
tested for real (outputs, not only arguments) without the 135M model.

`ScriptedModel(tokenizer, text)` is a model whose logits always put all mass on the next token of a
fixed text (then on eos): generation code that is fed it must return exactly that text.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + 3 special tokens; eos = <|im_end|> (as SmolLM2-Instruct), pad = <|endoftext|>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_chat_model(seed: int = 0):
    """(model, tokenizer): a seeded 2-layer Llama over the byte tokenizer above, in eval mode."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def random_llama(tokenizer, seed: int = 0):
    """A 1-layer Llama with large random weights over `tokenizer`'s vocabulary: peaked, arbitrary
    preferences, so whatever keeps its output valid (a grammar) is not the model."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             initializer_range=1.0)
        return LlamaForCausalLM(config).eval()


class ScriptedModel(torch.nn.Module):
    """Always continues with the next token of `text` (then eos), whatever came before: a model whose
    greedy output is known exactly.

    Call it like a HF causal LM (input_ids, attention_mask, position_ids, past_key_values, use_cache).
    At each position it finds how much of the script the sequence already ends with and predicts the
    next script token, so each row of a padded batch follows the script from where its own reply began.
    Its "KV cache" (`SeenTokens`) is simply the token ids seen so far, per row.
    """

    def __init__(self, tokenizer, text: str):
        super().__init__()
        self.script = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        self.vocab_size = len(tokenizer)
        self.config = LlamaConfig(vocab_size=self.vocab_size, max_position_embeddings=4096)
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # so that .parameters() and .device work

    @property
    def device(self):
        return self.dummy.device

    def next_script_token(self, seen: list[int]) -> int:
        for done in range(min(len(seen), len(self.script) - 1), 0, -1):
            if seen[-done:] == self.script[:done]:
                return self.script[done]
        return self.script[0]

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                **kwargs):
        B, T = input_ids.shape
        seen = past_key_values.rows if past_key_values is not None else [[] for _ in range(B)]
        logits = torch.full((B, T, self.vocab_size), -1e4)
        rows = []
        for b in range(B):
            row = list(seen[b])
            for t in range(T):
                row.append(int(input_ids[b, t]))
                logits[b, t, self.next_script_token(row)] = 0.0
            rows.append(row)
        return CausalLMOutputWithPast(logits=logits, past_key_values=SeenTokens(rows) if use_cache else None)


class SeenTokens:
    """ScriptedModel's KV-cache stand-in: the token ids each row has seen."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def batch_repeat_interleave(self, repeats: int) -> None:  # what a shared-prefix cache is asked to do
        self.rows = [list(row) for row in self.rows for _ in range(repeats)]

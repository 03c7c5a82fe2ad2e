"""Prompting, measured: what the model really sees, and answers scored by log-likelihood. Lesson 07.

* `chat_prompt` renders messages with the model's own chat template: the exact text the model sees.
* `show_tokens` lists the tokens of a text as the model receives them.
* `score_choices` / `classify` score a fixed set of answers by log-likelihood: one batched forward
  pass instead of generating text, and the answer is always one of the labels.

Generating replies for a data set is `utils.generation.generate_batch`; constrained output formats are
`utils.constrained`; reading replies is `utils.answers`; intervals and paired tests are `utils.stats`.
"""

from __future__ import annotations

import copy

import torch

from utils.checks import check_positive_int, check_text, check_text_list
from utils.generation import SharedPrefix, encode_prompts, pad_token_id

# ------------------------------------------------------------------------------------------------
# What the model really sees


def chat_prompt(tokenizer, user: str, system: str | None = None, examples=()) -> str:
    """The prompt text for one user turn, rendered by the model's chat template.

    examples: (user, assistant) pairs shown as earlier turns of the conversation (few-shot).
    system=None lets the template insert its default system prompt (SmolLM2's does).
    Example: chat_prompt(tok, "Hi", system="Be brief.")
             -> "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    """
    check_text("user", user)
    messages = [{"role": "system", "content": check_text("system", system)}] if system is not None else []
    for question, answer in examples:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def show_tokens(tokenizer, text: str) -> list[tuple[int, str]]:
    """(token id, token text) for every token of `text`, as the model receives it.

    Example: show_tokens(tok, "Hello world") -> [(19556, 'Hello'), (905, ' world')] (SmolLM2's ids).
    """
    check_text("text", text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [(i, tokenizer.decode([i])) for i in ids]


# ------------------------------------------------------------------------------------------------
# Scoring fixed answers by log-likelihood


@torch.no_grad()
def score_choices(model, tokenizer, prompts, choices, batch_size: int = 16) -> torch.Tensor:
    """Log-likelihood of each choice after each prompt: a (len(prompts), len(choices)) tensor.

    score[i, j] = sum over the tokens of choices[j] of log p(token | prompts[i], earlier tokens).
    Nothing is generated, so the answer is always one of the choices, and all prompts go through
    the model in a few batched forward passes (the shared prompt prefix once).
    """
    prompts = check_text_list("prompts", prompts)
    batch_size = check_positive_int("batch_size", batch_size)
    choices = check_text_list("choices", choices)
    if len(choices) < 2:
        raise ValueError(f"choices must hold at least two strings (something to choose between), got {choices!r}")
    prompt_ids = encode_prompts(tokenizer, prompts)
    choice_ids = encode_prompts(tokenizer, choices)
    pad = pad_token_id(tokenizer)
    scores = torch.empty(len(prompts), len(choices))
    prefix = SharedPrefix(model, prompt_ids)
    for start in range(0, len(prompts), batch_size):
        chunk = [p[prefix.length:] for p in prompt_ids[start:start + batch_size]]
        b = len(chunk)
        out, mask, position = prefix.run(chunk, pad)  # each prompt runs once, whatever the choices
        first = out.logits[:, -1].float().log_softmax(-1).cpu()  # (b, vocab): the choice's first token
        for j, c in enumerate(choice_ids):
            total = first[:, c[0]].clone()  # (b,)
            if len(c) > 1:  # later tokens: feed the choice on a copy of the prompts' KV cache
                rest = torch.tensor(c[1:])
                ids = torch.tensor([c[:-1]]).expand(b, -1)  # (b, n-1)
                ext = torch.cat([mask, torch.ones((b, len(c) - 1), dtype=mask.dtype, device=mask.device)], 1)
                pos = position + torch.arange(1, len(c), device=position.device)  # (b, n-1)
                more = model(input_ids=ids.to(mask.device), attention_mask=ext, position_ids=pos,
                             past_key_values=copy.deepcopy(out.past_key_values), use_cache=True)
                logp = more.logits.float().log_softmax(-1).cpu()  # (b, n-1, vocab)
                total += logp[:, torch.arange(len(c) - 1), rest].sum(-1)
            scores[start:start + b, j] = total
    return scores


def classify(model, tokenizer, prompts, labels, batch_size: int = 16) -> list[str]:
    """The most likely label for each prompt (argmax of `score_choices`).

    Example: classify(model, tok, [chat_prompt(tok, "Great film! Sentiment?")], ["positive", "negative"])
             -> ["positive"]
    """
    best = score_choices(model, tokenizer, prompts, labels, batch_size).argmax(-1)
    return [labels[i] for i in best.tolist()]

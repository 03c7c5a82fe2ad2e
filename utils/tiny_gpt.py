"""Lesson 05's model, kept for later lessons: a character-level GPT trained on Shakespeare.

Lesson 05 trains it and saves it in the course cache; lessons 06 and 12 (and utils.distributed) load it
with `pretrained_tiny_gpt()`. A learner may run those lessons first, so if the cache holds no (intact)
copy, it is trained here with lesson 05's seed, data and configuration (about 2 minutes on 2 CPU
cores), and saved.

* `shakespeare_char_data()`: lesson 05's data: (CharTokenizer, train ids, validation ids).
* `build_tiny_gpt(vocab_size)`: a freshly initialised GPT of lesson 05's shape, seeded.
* `train_tiny_gpt()`: lesson 05's run, with `TINY_TRAIN_CONFIG`.
* `save_pretrained` / `load_pretrained`: model.safetensors + config.json (shape, characters, sha256).
* `pretrained_tiny_gpt()`: load from the cache, or train and save.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch

from utils.training import VAL_WORKS, CharTokenizer, History, TrainConfig, split_by_work, train

TINY_GPT_SEED = 0
# Lesson 05's model: nanoGPT's CPU configuration (utils.training.NANOGPT_CPU_CONFIG) with one change,
# a 3x higher peak learning rate (lesson 05 trains both and compares their validation loss).
TINY_TRAIN_CONFIG = TrainConfig(lr=3e-3, min_lr=3e-4)
TINY_MODEL_SHAPE = dict(n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
TINY_GPT_NAME = "tiny-shakespeare-char-gpt-v1"  # its folder in the course cache


def shakespeare_char_data(val_works=VAL_WORKS):
    """(tokenizer, train_ids, val_ids): the character-level Shakespeare data of lesson 05.

    The character set is that of the whole corpus (84 characters): knowing which characters
    exist is not knowing the validation text, and it keeps every validation character encodable.
    """
    from utils.data import shakespeare

    works = shakespeare()
    train_text, val_text = split_by_work(works, val_works)
    tokenizer = CharTokenizer.from_text(train_text + val_text)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    return tokenizer, train_ids, val_ids


def build_tiny_gpt(vocab_size: int, block_size: int = TINY_TRAIN_CONFIG.block_size, seed: int = TINY_GPT_SEED,
                   **shape):
    """A freshly initialised GPT of lesson 05's shape (seeded, so every learner starts equal)."""
    from utils.gpt import GPT, GPTConfig

    shape = {**TINY_MODEL_SHAPE, **shape}
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, **shape))


def save_pretrained(directory, model, tokenizer: CharTokenizer, info: dict | None = None) -> Path:
    """model.safetensors + config.json (model shape, characters, and whatever `info` says)."""
    from safetensors.torch import save_model

    from utils.models import sha256_of

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    config = {"gpt_config": asdict(model.config), "chars": "".join(tokenizer.chars), "info": info or {},
              "sha256": sha256_of(directory / "model.safetensors")}  # checked by load_pretrained
    # config.json is written last: a folder without it is an unfinished save
    (directory / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return directory


MAX_TINY_GPT_PARAMETERS = 100_000_000  # lesson 05's model has ~0.8M; a config.json asking for more is refused


def load_pretrained(directory):
    """(model, tokenizer, info) saved by save_pretrained; the model is in eval mode.

    config.json is checked before a model is built from it (keys, types, a parameter budget), and
    the weights' safetensors header before a tensor is read (names, shapes, dtypes)."""
    from safetensors.torch import load_model

    from utils.checkpoints import check_tensors_fit, read_json_object, require_keys
    from utils.gpt import GPT, GPTConfig, count_gpt_parameters
    from utils.models import ModelIntegrityError, sha256_of

    directory = Path(directory)
    where = str(directory / "config.json")
    config = read_json_object(directory / "config.json", max_bytes=1_000_000)
    require_keys(config, ("gpt_config", "chars", "info", "sha256"), where)
    weights = directory / "model.safetensors"
    if sha256_of(weights) != config["sha256"]:
        raise ModelIntegrityError(f"{weights} does not match the sha256 recorded in config.json when it was "
                                  f"saved (changed or partly written); delete {directory} and save it again")
    if not isinstance(config["gpt_config"], dict) or not isinstance(config["chars"], str):
        raise ValueError(f"{where}: gpt_config must be an object and chars a string")
    known = {f.name for f in fields(GPTConfig)}  # tolerate fields added to or dropped from GPTConfig later
    try:
        gpt_config = GPTConfig(**{k: v for k, v in config["gpt_config"].items() if k in known})
    except TypeError as err:
        raise ValueError(f"{where}: bad gpt_config: {err}") from None
    if count_gpt_parameters(gpt_config) > MAX_TINY_GPT_PARAMETERS or gpt_config.vocab_size != len(config["chars"]):
        raise ValueError(f"{where}: a GPT of {count_gpt_parameters(gpt_config):,} parameters with vocab_size "
                         f"{gpt_config.vocab_size} for {len(config['chars'])} characters is not a tiny GPT "
                         f"(at most {MAX_TINY_GPT_PARAMETERS:,} parameters, one token per character)")
    model = GPT(gpt_config)
    check_tensors_fit(weights, model.state_dict())
    load_model(model, str(weights))
    return model.eval(), CharTokenizer(config["chars"]), config["info"]


def tiny_gpt_dir() -> Path:
    """Where lesson 05's model is kept: <course cache>/tiny-shakespeare-char-gpt-v1."""
    from utils.models import cache_dir

    return cache_dir() / TINY_GPT_NAME


def pretrained_tiny_gpt(progress: bool = True):
    """(model, tokenizer): lesson 05's character-level GPT trained on Shakespeare.

    Loaded from the course cache if lesson 05 (or an earlier call) saved it there; otherwise
    trained now with lesson 05's seed and configuration (about 2 minutes on 2 CPU cores) and
    saved, so that a later lesson works even when it is run before lesson 05.
    """
    from utils.models import ModelIntegrityError

    folder = tiny_gpt_dir()
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        try:
            model, tokenizer, _ = load_pretrained(folder)
            return model, tokenizer
        except ModelIntegrityError:
            pass  # a damaged or unfinished save: train again and overwrite it
    model, tokenizer, history = train_tiny_gpt(progress=progress)
    save_pretrained(folder, model, tokenizer, tiny_gpt_info(history))
    return model, tokenizer


def train_tiny_gpt(progress: bool = True):
    """Lesson 05's run: (model, tokenizer, history)."""
    tokenizer, train_ids, val_ids = shakespeare_char_data()
    model = build_tiny_gpt(tokenizer.vocab_size)
    history = train(model, train_ids, val_ids, TINY_TRAIN_CONFIG, progress=progress)
    return model, tokenizer, history


def tiny_gpt_info(history: History) -> dict:
    """What config.json records about the run: its configuration, seed, validation works and final losses."""
    return {"train_config": asdict(TINY_TRAIN_CONFIG), "seed": TINY_GPT_SEED,
            "val_works": list(VAL_WORKS), "final_val_loss": history.val_loss[-1],
            "final_train_loss": history.train_loss[-1]}

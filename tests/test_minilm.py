"""utils.minilm: the from-scratch MiniLM encoder equals transformers' BertModel and sentence-transformers."""

import numpy as np
import pytest
import torch

from utils.minilm import MiniLM, assign_weights, load_minilm, our_name

TINY = {"hidden_size": 32, "layer_norm_eps": 1e-12, "vocab_size": 30522, "max_position_embeddings": 64,
        "type_vocab_size": 2, "num_attention_heads": 4, "intermediate_size": 48, "num_hidden_layers": 2,
        "pad_token_id": 0}


@pytest.fixture(scope="module")
def bert_tokenizer():
    from tokenizers import Tokenizer

    from utils.models import embedder_folder

    tokenizer = Tokenizer.from_file(str(embedder_folder() / "tokenizer.json"))
    tokenizer.enable_truncation(64)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


@pytest.fixture(scope="module")
def tiny_pair(bert_tokenizer):
    """A random tiny BertModel (transformers) and our MiniLM holding the same weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(**TINY, hidden_act="gelu")
    bert = BertModel(config, add_pooling_layer=False).eval()
    ours = assign_weights(MiniLM(TINY, bert_tokenizer), bert.state_dict())
    return bert, ours


def test_checkpoint_names_map_to_ours():
    assert our_name("encoder.layer.3.output.dense.weight") == "layers.3.down.weight"
    assert our_name("encoder.layer.0.attention.output.dense.bias") == "layers.0.out.bias"
    assert our_name("encoder.layer.5.attention.self.query.weight") == "layers.5.query.weight"
    assert our_name("embeddings.LayerNorm.weight") == "ln.weight"
    assert our_name("pooler.dense.weight") is None  # MiniLM's sentence vector does not use BERT's pooler
    assert our_name("embeddings.position_ids") is None


def test_same_mean_pooled_vectors_as_transformers_bert(tiny_pair, bert_tokenizer):
    bert, ours = tiny_pair
    texts = ["Where is the calibration lab?", "a much longer sentence, with more words in it than the first one", ""]
    encodings = bert_tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    assert (mask == 0).any()  # padding is exercised
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
    weights = mask[:, :, None].float()
    reference = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1).numpy()
    got = ours.encode(texts)
    assert got.shape == (3, TINY["hidden_size"]) and got.dtype == np.float32
    assert np.abs(got - reference).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # a batch's padding does not change a text's vector
    assert np.abs(ours.encode(texts[:1]) - got[:1]).max() < 1e-5
    assert np.abs(ours.encode(texts, batch_size=1) - got).max() < 1e-5


def test_encode_refuses_bad_input(tiny_pair):
    _, ours = tiny_pair
    assert ours.encode("one text").shape == (TINY["hidden_size"],)  # a single string: one vector
    with pytest.raises(TypeError):
        ours.encode(123)
    with pytest.raises(TypeError):
        ours.encode(["ok", None])
    with pytest.raises(ValueError, match="batch_size"):
        ours.encode(["ok"], batch_size=0)
    with pytest.raises(ValueError, match="normalize_embeddings=True"):
        ours.encode(["ok"], normalize_embeddings=False)


def test_a_checkpoint_with_a_wrong_or_missing_tensor_is_refused(tiny_pair, bert_tokenizer):
    bert, _ = tiny_pair
    state = dict(bert.state_dict())
    bad = dict(state, **{"encoder.layer.0.intermediate.dense.weight": torch.zeros(10**3, 32)})
    with pytest.raises(ValueError, match=r"intermediate.dense.weight has shape \(1000, 32\), expected \(48, 32\)"):
        assign_weights(MiniLM(TINY, bert_tokenizer), bad)
    missing = {k: v for k, v in state.items() if "layer.1.output.LayerNorm" not in k}
    with pytest.raises(ValueError, match="lacks 2 tensors"):
        assign_weights(MiniLM(TINY, bert_tokenizer), missing)
    extra = dict(state, **{"encoder.layer.7.output.dense.weight": torch.zeros(32, 48)})
    with pytest.raises(ValueError, match="no such tensor"):
        assign_weights(MiniLM(TINY, bert_tokenizer), extra)


@pytest.mark.slow
def test_same_vectors_as_sentence_transformers():
    from utils.models import load_embedder

    texts = ["Where is the calibration lab?", "", "word " * 400, "Ünïcödé, emoji 🙂 and    spaces", "lost security key"]
    ours = load_minilm().encode(texts)  # "word " * 400 is truncated at 256 tokens by both
    reference = load_embedder().encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.shape == (5, 384)
    assert np.abs(ours - reference).max() < 1e-5

"""Text encoders: offline MiniLM with its real vocabulary, layer truncation, pooling, and the hub
(CLIP) code path exercised on a tiny CLIP saved to a temporary directory."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from remamber.models import TEXT_ENCODERS, build_text_encoder
from remamber.models.text import minilm_dir


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_registry_names():
    assert set(TEXT_ENCODERS) == {"clip-vit-large-patch14", "bert-base-uncased", "minilm-l6", "tiny-random-bert"}
    with pytest.raises(KeyError, match="gpt-2.*known text encoders.*minilm-l6"):
        build_text_encoder("gpt-2")


def test_minilm_tokenizes_real_words_offline():
    enc = build_text_encoder("minilm-l6", text_layers=2)
    texts = ["the red circle left of the blue square", "a " + "very " * 40 + "long sentence"]
    ids, mask = enc.tokenize(texts)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (2, 20)
    tok = enc.tokenizer
    words = tok.convert_ids_to_tokens(ids[0][mask[0].bool()].tolist())
    assert words == ["[CLS]", "the", "red", "circle", "left", "of", "the", "blue", "square", "[SEP]"]
    assert tok.unk_token_id not in ids.tolist()[0]
    assert mask[0].sum() == 10 and mask[0, 10:].sum() == 0 and (ids[0, 10:] == tok.pad_token_id).all()
    assert mask[1].all()  # truncated to 20
    assert enc.width == 384


def test_minilm_layer_truncation_keeps_pretrained_weights():
    enc = build_text_encoder("minilm-l6", text_layers=2)
    assert len(enc.model.encoder.layer) == 2
    shipped = load_file(os.path.join(minilm_dir(), "model.safetensors"))
    own = enc.model.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.weight"):
        torch.testing.assert_close(own[key], shipped[key], rtol=0, atol=0)
    assert not any(k.startswith("encoder.layer.2.") for k in own)
    with pytest.raises(ValueError, match="text_layers must be in 1..6"):
        build_text_encoder("minilm-l6", text_layers=7)


def test_minilm_mean_pooling_honours_the_padding_switch():
    enc = build_text_encoder("minilm-l6", text_layers=1).eval()
    ids, mask = enc.tokenize(["blue square", "the small green triangle on the right"])
    with torch.no_grad():
        tokens, pooled = enc(ids, mask, mask_padding=True)
        _, pooled_all = enc(ids, mask, mask_padding=False)
    for b in range(2):
        n = int(mask[b].sum())
        torch.testing.assert_close(pooled[b], tokens[b, :n].mean(0))
        torch.testing.assert_close(pooled_all[b], tokens[b].mean(0))
    assert not torch.allclose(pooled[0], pooled_all[0])


def test_tiny_random_bert_is_fixed_and_pools_with_the_bert_pooler():
    torch.manual_seed(123)
    a = build_text_encoder("tiny-random-bert").eval()
    torch.manual_seed(456)
    b = build_text_encoder("tiny-random-bert").eval()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    ids, mask = a.tokenize(["the yellow star"])
    with torch.no_grad():
        tokens, pooled = a(ids, mask)
    pooler = a.model.pooler.dense
    torch.testing.assert_close(pooled, torch.tanh(pooler(tokens[:, 0])))
    assert tokens.shape == (1, 20, 32)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet (written out here so the test needs no hub file)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@pytest.fixture
def tiny_clip_dir(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _bytes_to_unicode().values():
        vocab[c] = len(vocab)
    for c in _bytes_to_unicode().values():
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("r", "e"), ("re", "d</w>")]
    for m in merges:
        vocab["".join(m)] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_clip_hub_code_path_from_a_saved_directory(tiny_clip_dir):
    enc = build_text_encoder("clip-vit-large-patch14", text_layers=2, source=tiny_clip_dir).eval()
    layer_ids = {n.split(".layers.")[1].split(".")[0] for n, _ in enc.model.named_parameters() if ".layers." in n and n.endswith("q_proj.weight")}
    assert enc.width == 32 and layer_ids == {"0", "1"}
    ids, mask = enc.tokenize(["the red ball", "red"])
    assert ids.shape == (2, 20)
    assert enc.tokenizer.convert_ids_to_tokens(ids[0, :4].tolist()) == ["<|startoftext|>", "the</w>", "red</w>", "b"]
    with torch.no_grad():
        tokens, pooled = enc(ids, mask)
    # F_t^CLS of CLIP is the final hidden state at the (first) end-of-text token
    for b in range(2):
        eos = int((ids[b] == 1).nonzero()[0])
        assert eos == int(mask[b].sum()) - 1
        torch.testing.assert_close(pooled[b], tokens[b, eos])


def test_hub_failure_names_the_source(tmp_path):
    with pytest.raises(OSError, match="empty-dir"):
        build_text_encoder("bert-base-uncased", source=tmp_path / "empty-dir")


def test_tokenize_rejects_a_bare_string():
    enc = build_text_encoder("tiny-random-bert")
    with pytest.raises(TypeError, match="list of strings"):
        enc.tokenize("a string")


@pytest.mark.parametrize("name", ["tiny-random-bert", "minilm-l6"])  # pooler and mean pooling
def test_frozen_encoder_remembers_sentences_and_encodes_the_rest(name):
    """remember(): remembered sentences are answered from the features encoded then (the weights changed
    afterwards in place show it), the others are encoded now, the mix keeps the batch order; loading
    weights forgets; a trained encoder refuses."""
    enc = build_text_encoder(name, text_layers=2 if name == "minilm-l6" else None, max_text_len=12)
    with pytest.raises(RuntimeError, match="frozen"):
        enc.remember(["a cat"])
    enc.freeze()
    known = ["the red cat on the left", "a dog", "man in a blue shirt", "a dog"]  # a repeat: kept once
    ids, mask = enc.tokenize(known[:3])
    before = enc(ids, mask)
    assert enc.remember(known, batch_size=2) == 3
    for a, b in zip(enc(ids, mask), before):  # sorted, in batches of 2: the same features up to rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        enc.model.embeddings.word_embeddings.weight.mul_(2.0)  # in place: no load, nothing forgotten
    mixed = ["man in a blue shirt", "a new sentence", "the red cat on the left"]
    ids_m, mask_m = enc.tokenize(mixed)
    tokens, pooled = enc(ids_m, mask_m)
    memo_tokens, _ = enc(ids, mask)
    assert torch.equal(tokens[0], memo_tokens[2]) and torch.equal(tokens[2], memo_tokens[0])
    enc.forget()
    fresh_tokens, fresh_pooled = enc(ids_m, mask_m)  # the doubled embeddings, encoded now (a batch of 3,
    torch.testing.assert_close(tokens[1], fresh_tokens[1], rtol=1e-4, atol=1e-5)  # not 1: rounding)
    torch.testing.assert_close(pooled[1], fresh_pooled[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(tokens[0], fresh_tokens[0])
    enc.remember(known)
    enc.load_state_dict(enc.state_dict())
    assert not enc._memo
    assert enc.remember(known, max_bytes=10) == 0 and not enc._memo  # too large: nothing kept

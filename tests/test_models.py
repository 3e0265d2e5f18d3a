import logging

import pytest

from safesteer import SafeSteerError, check_compatible, checkpoints, load_model, models
from safesteer.architectures import resolve_architecture
from safesteer.identity import ModelIdentity


def test_local_folder_loads_once_and_is_shared(tiny_folder, tiny_lm):
    assert load_model(str(tiny_folder), "fp32") is tiny_lm
    assert tiny_lm.identity.n_layers == 4 and tiny_lm.identity.hidden_size == 64
    assert tiny_lm.identity.revision.startswith("config-sha256:")
    assert tiny_lm.tokenizer.padding_side == "left"


def test_nf4_uses_bitsandbytes_linear4bit(tiny_folder):
    import bitsandbytes as bnb

    lm = load_model(str(tiny_folder), "nf4")
    assert lm.identity.precision == "nf4"
    assert isinstance(lm.architecture.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_nf4_falls_back_with_one_clear_log_line(tiny_folder, monkeypatch, caplog):
    monkeypatch.setitem(models._BNB_PROBLEM, "cpu", "ImportError: no bitsandbytes here")
    monkeypatch.setattr(models, "_LOADED", {})
    with caplog.at_level(logging.WARNING, logger="safesteer.models"):
        lm = load_model(str(tiny_folder), "nf4", device="cpu")
    assert lm.identity.precision == "fp32"
    messages = [r.getMessage() for r in caplog.records if r.name == "safesteer.models"]
    assert messages == ["4-bit NF4 is unavailable on cpu (ImportError: no bitsandbytes here); loading fp32 instead"]


def test_unreachable_models_name_themselves(tmp_path):
    with pytest.raises(SafeSteerError, match=r"cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model", "fp32")
    with pytest.raises(SafeSteerError, match=r"has no config\.json"):
        load_model(str(tmp_path), "fp32")
    with pytest.raises(SafeSteerError, match="no such GGUF file"):
        load_model(str(tmp_path / "x.gguf"), "fp32")
    with pytest.raises(SafeSteerError, match="unknown precision"):
        load_model(str(tmp_path), "int3")  # type: ignore[arg-type]


def test_compatibility_is_about_shapes(tiny_lm):
    same_shape = ModelIdentity("another/model", None, "nf4", "llama", 4, 64)
    check_compatible(same_shape, tiny_lm.identity)
    other = ModelIdentity("big/model", None, "nf4", "llama", 30, 576)
    with pytest.raises(SafeSteerError, match=r"made for big/model .* cannot be applied to"):
        check_compatible(other, tiny_lm.identity)


def test_unknown_architectures_are_refused_clearly():
    import torch

    with pytest.raises(SafeSteerError, match="unsupported model architecture"):
        resolve_architecture(torch.nn.Linear(2, 2))


def test_embedded_gguf_is_found_without_importing_its_package():
    import sys

    path = checkpoints.embedded_gguf_path()
    assert path.name == checkpoints.EMBEDDED_GGUF_NAME and path.stat().st_size > 50_000_000
    assert checkpoints.EMBEDDED_PACKAGE not in sys.modules


def test_column_head_matches_the_plain_head_and_keeps_weights_tied():
    import torch
    from torch import nn

    from safesteer.speedups import ColumnHead, use_column_head

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 50, bias=False)
            self.head.weight = self.embed.weight

        def get_output_embeddings(self):
            return self.head

        def set_output_embeddings(self, module):
            self.head = module

    toy = Toy()
    x = torch.randn(3, 5, 8)
    expected = toy.head(x)
    assert use_column_head(toy)
    assert isinstance(toy.head, ColumnHead) and toy.head.weight is toy.embed.weight
    torch.testing.assert_close(toy.head(x), expected)
    torch.testing.assert_close(toy.head(x[:1, :1]), expected[:1, :1])
    assert not use_column_head(toy)  # already swapped: nothing to do

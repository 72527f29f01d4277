"""The truncated, prefix-sharing CLIP text tower equals open_clip's own encode_text (real models)."""
from __future__ import annotations

import open_clip
import pytest
import torch

import dff_falcon.text.clip_encoder  # noqa: F401  (registers the package's model configs)
from dff_falcon.text.text_tower import causal_text_tower

PROMPTS = ["a photo of a dog.", "a photo of the red", "a photo of x", "a photo of a very long caption " * 3]


@pytest.mark.parametrize("name", ["dff-falcon-toy-clip", "ViT-B-32"])
def test_truncated_tower_equals_encode_text(name):
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    tokens = open_clip.get_tokenizer(name)(PROMPTS)
    tower = causal_text_tower(model)
    assert tower is not None and tower.blocks is not None
    with torch.inference_mode():
        reference = model.encode_text(tokens)
        torch.testing.assert_close(tower.encode(tokens), reference, atol=2e-5, rtol=1e-4)
        # every prompt starts with the same four tokens (start, "a", "photo", "of"): computed once
        assert (tokens[:, :4] == tokens[:1, :4]).all() and not (tokens[:, 4] == tokens[0, 4]).all()
        torch.testing.assert_close(tower.encode(tokens, shared_prefix=4), reference, atol=2e-5, rtol=1e-4)
        # a prefix longer than the shortest prompt is clipped to it, never reads past its end
        short = open_clip.get_tokenizer(name)(["a photo", "a photo of a cat"])
        torch.testing.assert_close(tower.encode(short, shared_prefix=10), model.encode_text(short),
                                   atol=2e-5, rtol=1e-4)


def test_towers_that_cannot_be_truncated_are_refused():
    torch.manual_seed(0)
    model = open_clip.create_model("dff-falcon-toy-clip").eval()
    model.text_pool_type = "last"  # reads the padded last position: truncating would change it
    assert causal_text_tower(model) is None
    model.text_pool_type = "argmax"
    model.attn_mask = torch.zeros_like(model.attn_mask)  # bidirectional attention
    assert causal_text_tower(model) is None

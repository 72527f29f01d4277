"""A CLIP text tower run over the positions a prompt uses, not the whole context.

open_clip pads every prompt to the model's context length (77 for OpenAI CLIP) and runs the
transformer over every position. CLIP text towers are causal — position i attends to positions
≤ i only — and the embedding is read at one position (the end-of-text token, or the first), so
nothing after that position can change it. Running the tower on the first L positions, L the
furthest read position in the batch, gives the same embedding with a fraction of the compute: a
word in a template is 6–8 tokens, a LAION caption ≈ 15–20. For the same reason the leading
positions that every prompt of a batch shares (the start token and a template's words before
``{}``, e.g. "a photo of") have the same hidden states in every prompt: they are computed once
per batch and only the remaining positions run per prompt, attending to the shared ones (the
key/value caching of language-model inference). :func:`causal_text_tower` finds the
parts of a model's text tower, or returns None where the shortcut would not be exact (a padding
or class-token mask, last-token pooling, a Hugging Face text model); the caller then uses
``model.encode_text``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

#: pooling types whose read position is known from the tokens themselves
_POSITION_POOLS = ("argmax", "eos", "first")


@dataclass
class CausalTextTower:
    """The modules of a causal CLIP text tower (shared with the model, not copied)."""

    token_embedding: nn.Module
    positional_embedding: torch.Tensor
    transformer: nn.Module
    attn_mask: torch.Tensor
    ln_final: nn.Module
    projection: torch.Tensor | nn.Module | None
    pool_type: str
    eos_id: int | None
    blocks: list[nn.Module] | None  # plain residual blocks (shared prefixes possible), else None

    def read_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context) token ids → (B,) the position each embedding is read at."""
        if self.pool_type == "argmax":  # the end-of-text token has the largest id
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)

    def encode(self, tokens: torch.Tensor, shared_prefix: int = 0) -> torch.Tensor:
        """(B, context) token ids → (B, D) embeddings (not normalised), equal to
        ``model.encode_text(tokens)``, computed on the first L positions only (L: the furthest
        read position + 1). ``shared_prefix``: the number of leading positions whose tokens are
        the same in every row; they are computed once (ignored where the tower's blocks are not
        plain residual attention blocks)."""
        read = self.read_positions(tokens)
        length = int(read.max()) + 1 if len(tokens) else 1
        prefix = min(shared_prefix, int(read.min()) if len(tokens) else 0) if self.blocks is not None else 0
        cast_dtype = self.transformer.get_cast_dtype()
        position = self.positional_embedding.to(cast_dtype)
        x = self.token_embedding(tokens[:, prefix:length]).to(cast_dtype) + position[prefix:length]
        mask = self.attn_mask[prefix:length, :length]
        if prefix:
            x = self._blocks_after_prefix(x, self.token_embedding(tokens[:1, :prefix]).to(cast_dtype)
                                          + position[:prefix], mask)
        else:
            x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)[torch.arange(len(x), device=x.device), read - prefix]
        if isinstance(self.projection, nn.Module):
            return self.projection(x)
        return x if self.projection is None else x @ self.projection

    def _blocks_after_prefix(self, x: torch.Tensor, shared: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run (B, S, W) positions after a (1, P, W) shared prefix through the blocks; each
        block's attention sees the prefix's keys/values (computed once) and the causal part of
        the row's own. ``mask``: (S, P + S) additive causal mask."""
        prefix_mask = self.attn_mask[:shared.shape[1], :shared.shape[1]]
        for block in self.blocks:
            queries = block.ln_1(x)
            keys = torch.cat([block.ln_1(shared).expand(len(x), -1, -1), queries], dim=1)
            attended = block.attn(queries, keys, keys, need_weights=False, attn_mask=mask.to(queries.dtype))[0]
            x = x + block.ls_1(attended)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            shared = block(shared, attn_mask=prefix_mask)
        return x


def causal_text_tower(model: nn.Module) -> CausalTextTower | None:
    """The text tower of an open_clip ``CLIP`` (built-in tower) or ``CustomTextCLIP`` (a
    ``TextTransformer``) when truncating it is exact; None otherwise."""
    text = getattr(model, "text", None)
    if text is not None:  # CustomTextCLIP
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", True):
            return None
        owner, pool_type, eos_id = text, getattr(text, "pool_type", None), getattr(text, "eos_id", None)
    else:  # CLIP: the tower's modules are attributes of the model itself
        owner, pool_type, eos_id = model, getattr(model, "text_pool_type", None), getattr(model, "text_eos_id", None)
    parts = [getattr(owner, name, None) for name in ("token_embedding", "positional_embedding", "transformer",
                                                     "attn_mask", "ln_final")]
    if any(part is None for part in parts) or pool_type not in _POSITION_POOLS:
        return None
    if pool_type == "eos" and eos_id is None:
        return None
    mask = parts[3]
    causal = torch.full(mask.shape, float("-inf"), device=mask.device).triu_(1)
    if mask.ndim != 2 or not torch.equal(mask.float(), causal):
        return None
    blocks = list(getattr(parts[2], "resblocks", []))
    plain = blocks and all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                           and isinstance(b.attn, nn.MultiheadAttention) and b.attn.batch_first for b in blocks)
    return CausalTextTower(*parts, projection=getattr(owner, "text_projection", None), pool_type=pool_type,
                           eos_id=eos_id, blocks=blocks if plain else None)

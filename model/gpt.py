"""GPT-2 / nanoGPT decoder in torch, written to trace to ONNX unchanged.

The KV cache enters and leaves `forward` as tensors, one (key, value) pair per layer, each
(B, n_head, P, head_dim). One code path serves prefill (P = 0) and decode; the causal mask is
built from absolute cache slots, so it is right whatever the query length and past length are.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig.preset("tiny")).eval()
    logits, present = model(input_ids)                       # prefill
    logits, present = model(next_ids, past=present)          # decode one step
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
from torch.nn import functional as F

from .checkpoints import load_state, random_spec, read_checkpoint
from .config import GPTConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each (B, nh, P, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: KV) -> tuple[torch.Tensor, KV]:
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)
        v = v.view(B, T, nh, hs).transpose(1, 2)
        k = torch.cat([past[0], k], dim=2)  # (B, nh, P+T, hs)
        v = torch.cat([past[1], v], dim=2)
        # boolean mask (B, 1, T, P+T); never is_causal=True: it is top-left aligned, wrong once P > 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, past: KV):
        a, present = self.attn(self.ln_1(x), mask, past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


def keep_positions(attention_mask: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """(B, min(T, k)) indices of the k new positions ending at each row's last real token (the last 1 among the
    mask's T new columns; a row without one ends at T - 1). A row with fewer than k positions up to it starts at
    0. Tensor ops only, so it traces into the graph: left padding and none give the last k columns, as a slice."""
    new = (attention_mask[:, -T:] != 0).long()  # (B, T)
    last = (T - 1) - new.flip(-1).argmax(-1)  # (B,): argmax finds the first 1 from the right (0 when none)
    if k == 1:
        return last[:, None]
    idx = torch.arange(T, device=new.device)[-k:][None, :] + (last - (T - 1))[:, None]  # (B, min(T, k))
    return idx - idx.amin(-1, keepdim=True).clamp(max=0)  # shift a window that would start before 0


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, stored once

    def init_weights(self, seed: int = 0) -> GPT:
        """GPT-2's initialisation (normal 0.02, residual projections scaled by 1/sqrt(2 n_layer))."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # LayerNorm weight
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weight counted once

    def empty_past(self, batch_size: int, device=None, dtype=None) -> tuple[KV, ...]:
        c = self.config
        dtype = dtype or self.lm_head.weight.dtype
        device = device or self.lm_head.weight.device
        z = torch.zeros(batch_size, c.n_head, 0, c.head_dim, device=device, dtype=dtype)
        return tuple((z, z) for _ in range(c.n_layer))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past: tuple[KV, ...] | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, tuple[KV, ...]]:
        """(B, T) token ids -> logits (B, T, vocab) and the present KV cache (B, nh, P+T, hs) per layer.

        attention_mask: (B, P+T), 1 for real tokens, 0 for (left) padding; default all ones.
        position_ids: (B, T); default derived from the mask (cumsum - 1), so left padding is right.
        past: per-layer (key, value) from the previous call; None for an empty cache.
        logits_to_keep: 0 for every position's logits; k > 0 for the k positions ending at each row's last
            real token, (B, min(T, k), vocab) (a Python int fixed at trace time: generation reads only the last
            position, and ln_f + lm_head over every prompt position is a quarter of a long prefill). Left
            padding or none: the last k columns; right padding (onnxruntime-genai): each row's own last k.
        """
        B, T = input_ids.size()
        if past is None:
            past = self.empty_past(B, device=input_ids.device)
        P = past[0][0].size(2)
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.int64, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]

        # Which cache slot may each query see: slot j <= slot i (absolute slots, P..P+T-1 for the
        # queries), and j is not padding. Each query also sees itself, so a padded query never has
        # an empty row: no NaN, and real queries never see a padded key.
        L = attention_mask.size(1)  # P + T
        k_slot = torch.arange(L, device=input_ids.device)
        q_slot = torch.arange(T, device=input_ids.device) + (L - T)
        causal = k_slot[None, :] <= q_slot[:, None]  # (T, L)
        keep = attention_mask.bool()[:, None, None, :] & causal[None, None]  # (B, 1, T, L)
        mask = keep | (k_slot[None, :] == q_slot[:, None])[None, None]

        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        present = []
        for block, layer_past in zip(self.transformer.h, past):
            x, kv = block(x, mask, layer_past)
            present.append(kv)
        if logits_to_keep:
            idx = keep_positions(attention_mask, T, logits_to_keep)  # (B, min(T, k))
            x = x.gather(1, idx[:, :, None].expand(-1, -1, x.size(2)))  # (B, min(T, k), C)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T or k, vocab)
        return logits, tuple(present)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        gelu: str | None = None) -> GPT:
        """Build a GPT from a checkpoint (model/checkpoints.py); returns it in eval mode.

        Args:
            source: a Hugging Face GPT-2 folder, a nanoGPT ckpt.pt, a hub name, or `random:PRESET[@SEED]`.
            dtype: parameter dtype of the returned model.
            gelu: override the GELU form the loader picks ("tanh" for GPT-2 weights, "exact" for nanoGPT).
        Returns:
            the model, with `model.checkpoint_files` listing the files its weights came from.
        """
        source = os.fspath(source)
        if source.startswith("random:"):
            config, seed = random_spec(source[len("random:"):])
            model, files = cls(config).init_weights(seed), []
        else:
            # shapes and values are checked before cls(config) allocates: a small file whose config claims
            # n_layer=2000, n_embd=16384 would otherwise take all memory before its first shape was compared
            config, state, files = read_checkpoint(source, gelu=gelu)
            model = cls(config)
            load_state(model, state)
        model.checkpoint_files = files
        return model.to(dtype).eval()

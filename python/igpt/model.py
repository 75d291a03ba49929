"""The iGPT model: GPT-2 with pre-norm blocks over palette tokens (Chen et al., 2020).

    h^0     = wte(x) + wpe(positions)
    a       = h + c_proj(attention(ln_1(h)))          (causal for AR, full for BERT)
    h^{l+1} = a + mlp(ln_2(a))                        (one fused ln_mlp call)
    logits  = lm_head(ln_f(h^L))

AR: the start-of-sequence id is prepended inside, so logits[:, i] predicts tokens[:, i].
BERT: token embeddings at masked positions are zeroed and attention sees both directions.
Attention and the norm-MLP are the ``igpt_kernels`` ops, which run the Triton kernels on a
GPU and the PyTorch reference elsewhere. Parameter names follow GPT-2 and transformers'
ImageGPT, so ``igpt.hf`` converts weights by name and reads and writes its directories.
Decoding runs the same block loop with one ``igpt.generation.KVCache`` per layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from igpt import generation, hf_format
from igpt._checks import check_inputs
from igpt.config import IGPTConfig
from igpt_kernels import attention, ln_mlp


class Norm(nn.Module):
    """RMS norm (x / sqrt(mean(x^2) + eps) * w, no bias) or LayerNorm, per config.norm."""

    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.kind, self.eps = config.norm, config.eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        has_bias = config.norm == "layer" and config.bias
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if has_bias else None

    def forward(self, x):
        if self.kind == "rms":
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, causal: bool, cache=None):
        """x (B, n, d). With a ``cache`` (decoding) the new keys and values are stored in it
        and the queries attend to every key it holds (bottom-right-aligned causal)."""
        B, n, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # 3 x (B, n, d)
        q, k, v = (
            t.view(B, n, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # 3 x (B, H, n, hd)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(k, v)  # 2 x (B, H, Nk, hd), mask None or (B, Nk)
        y = attention(q, k, v, causal=causal, key_padding_mask=mask)  # (B, H, n, hd)
        y = y.transpose(1, 2).reshape(B, n, d)  # (B, n, d)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.activation = config.activation

    def forward(self, x, norm: Norm):
        """x + c_proj(act(c_fc(norm(x)))), fused into one kernel call."""
        fc, proj = self.c_fc, self.c_proj
        weights = (norm.weight, norm.bias, fc.weight, fc.bias, proj.weight, proj.bias)
        return ln_mlp(
            x, *weights, norm=norm.kind, eps=norm.eps, activation=self.activation, residual=True
        )


class Block(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = SelfAttention(config)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)

    def forward(self, x, causal: bool = True, cache=None):
        x = x + self.attn(self.ln_1(x), causal, cache)
        return self.mlp(x, self.ln_2)  # x + mlp(ln_2(x)): the residual add is fused in


class IGPT(nn.Module):
    """Image GPT over palette tokens. See the module docstring for the computation."""

    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=Norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.n_colors, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2 init with depth-scaled residual projections and a zero logit head.

        Linear and token embeddings ~ N(0, 0.02), position embeddings ~ N(0, 0.01); the two
        projections that write into the residual stream per block get std 0.02 / sqrt(2L)
        so the stream's variance does not grow with depth; the output head starts at zero,
        so the first logits are uniform.
        """
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif name.endswith("wpe.weight"):
                nn.init.normal_(p, 0.0, 0.01)
            elif name == "lm_head.weight" or name.endswith(".bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def num_params(self, position_embeddings: bool = True) -> int:
        """Number of parameters; the paper's sizes match the count without ``wpe``."""
        n = sum(p.numel() for p in self.parameters())
        return n if position_embeddings else n - self.transformer.wpe.weight.numel()

    def embed(self, tokens, bert_mask=None, cache=None):
        """h^0 (B, n, d). AR input is [SOS] + tokens[:, :-1]; BERT zeroes masked tokens. With
        ``cache`` (decoding), ``tokens`` are input ids (SOS or colours) at its next positions."""
        wte, wpe = self.transformer.wte, self.transformer.wpe
        if cache is not None:
            return wte(tokens) + wpe(cache[0].positions(tokens.shape[1]))  # (B, n, d)
        tokens = check_inputs(tokens, bert_mask, self.config)
        B, n = tokens.shape
        if bert_mask is None:
            sos = tokens.new_full((B, 1), self.config.sos_id)
            h = wte(torch.cat([sos, tokens[:, :-1]], dim=1))  # (B, n, d)
        else:
            h = wte(tokens) * (~bert_mask).unsqueeze(-1).to(wte.weight.dtype)  # (B, n, d)
        return h + wpe(torch.arange(n, device=tokens.device))

    def trunk(self, tokens, bert_mask=None, *, pool_layers=(), run_all: bool = True, cache=None):
        """The one pass through the blocks that forward, features, decoding and classifiers share.

        Returns ``(n_L, pooled)``: n_L = ln_f(h^L) (B, n, d), or None when ``run_all`` is
        False; pooled (B, len(pool_layers), d) float32, or None without ``pool_layers``,
        where layer l < L pools ln_1 of block l's input and l = L pools n_L (see
        ``features``). With ``run_all=False`` the loop stops after the last pooled layer.
        ``cache``: one ``igpt.generation.KVCache`` per layer (``kv_cache``), AR only; then
        ``tokens`` are input ids appended to it (see ``embed``).
        """
        L = self.config.n_layer
        want = sorted(set(pool_layers))
        if want and not 0 <= want[0] <= want[-1] <= L:
            raise ValueError(f"pool_layers must lie in [0, {L}], got {list(pool_layers)}")
        stop = L if run_all or not want else want[-1]
        h = self.embed(tokens, bert_mask, cache)  # (B, n, d)
        caches = [None] * L if cache is None else cache
        pooled = {}
        for i, (block, layer_cache) in enumerate(zip(self.transformer.h, caches, strict=True)):
            if i in want:
                pooled[i] = block.ln_1(h).float().mean(dim=1)  # (B, d)
            if i == stop:
                break
            h = block(h, bert_mask is None, layer_cache)
        n_L = self.transformer.ln_f(h) if stop == L else None  # (B, n, d)
        if L in want:
            pooled[L] = n_L.float().mean(dim=1)
        if not want:
            return n_L, None
        return n_L, torch.stack([pooled[i] for i in pool_layers], dim=1)  # (B, P, d)

    def hidden_states(self, tokens, bert_mask=None):
        """ln_f(h^L): the final normalised hidden states (B, n, d)."""
        return self.trunk(tokens, bert_mask)[0]

    def forward(self, tokens, bert_mask=None):
        """Logits (B, n, n_colors). tokens: int (B, n), n <= n_px^2; bert_mask: bool (B, n).

        AR (bert_mask None): logits[:, i] predicts tokens[:, i] from tokens[:, :i].
        BERT: no causal mask; logits at masked positions predict the masked tokens.
        """
        return self.lm_head(self.hidden_states(tokens, bert_mask))

    def features(self, tokens, bert_mask=None):
        """Average-pooled features of every layer in one pass: (B, L + 1, d), float32.

        f^l = mean_i ln_1^l(h^l)_i for l < L (the block's own norm of its input) and
        f^L = mean_i ln_f(h^L)_i, as in the paper's linear probes (sec. 2.3-2.4). The input
        is the same as ``forward``'s: [SOS] + tokens[:, :-1] for AR.
        """
        return self.trunk(tokens, bert_mask, pool_layers=range(self.config.n_layer + 1))[1]

    def kv_cache(self, batch_size: int, device=None, dtype=None) -> list[generation.KVCache]:
        """An empty key/value cache for whole images: one ``KVCache`` per layer, all views
        of one zeroed (L, 2, B, H, n_px^2, hd) buffer."""
        w = self.transformer.wte.weight
        device, dtype = device or w.device, dtype or w.dtype
        return generation.KVCache.for_model(self.config, batch_size, device, dtype)

    def decode(self, ids, cache) -> torch.Tensor:
        """Logits (B, n_colors) after the last of the input ids (B, m) (SOS or colours),
        which are appended to ``cache`` (from ``kv_cache``)."""
        return self.lm_head(self.trunk(ids, cache=cache)[0][:, -1])

    @classmethod
    def from_pretrained(cls, path_or_hub_id) -> IGPT:
        """Load a transformers ImageGPT directory or hub id (a classifier's class head is
        dropped with a warning; ``igpt.hf.from_pretrained`` keeps it)."""
        config, weights, score = hf_format.read_pretrained(path_or_hub_id)
        return hf_format.load_converted(cls(config), weights, score=score, source=path_or_hub_id)

    def save_pretrained(self, directory, *, palette=None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` in transformers' layout to
        ``directory`` (with ``palette``, its ``preprocessor_config.json``); returns it."""
        return hf_format.save_model(directory, self.state_dict(), self.config, palette)

    @torch.no_grad()  # not inference_mode: callers may edit the returned tokens in place
    def generate(
        self,
        n: int,
        *,
        prefix=None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        device=None,
        progress: bool = False,
        cuda_graph: bool = False,
    ) -> torch.Tensor:
        """Sample ``n`` whole images (n, n_px^2) int64 left to right with a key/value cache.

        ``prefix``: palette ids (n, p), or (p,) shared by all images, copied unchanged into
        the first p raster positions. ``temperature`` divides the logits (0: greedy);
        ``top_k`` keeps the k likeliest colours, ``top_p`` the smallest set reaching that
        probability (0 < top_p <= 1). ``seed`` seeds a private generator (same seed, inputs
        and device, same images; None: torch's global one). ``device`` must be the model's
        (default). ``progress`` shows a tqdm bar. ``cuda_graph`` replays each one-token
        step as a CUDA graph attending to one of 8 fixed cache lengths, masked (eager off
        the GPU). The prefix is one causal pass filling the cache, then each position is
        one query per layer. AR models only: a BERT model has no left-to-right distribution.
        """
        return generation.sample(
            self, n, prefix, temperature, top_k, top_p, seed, device, progress, cuda_graph
        )

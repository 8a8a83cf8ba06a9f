"""A small decoder-only Transformer over pixel tokens, in the spirit of nanoGPT's model.py.

The forward pass is a plain function of a flat dict of weight tensors, so the same
code runs the source model M, a projected model P_t (weights produced by the
projection operator), the universal baseline and the per-task baselines.

Conventions
- Linear weights are stored [in, out] and applied as `x @ W + b`.
- Any weight may carry a leading batch dim (one weight set per sample): `x @ W`
  broadcasts [B, T, I] @ [B, I, O] -> [B, T, O]; biases/gains are then [B, 1, O].
  That is how one step trains the projected model on every task of a mixed batch.
- Conditioning: the first position of the sequence is a "BOS" vector (the task
  embedding). logits[:, i] is the distribution of tokens[:, i] given the task and
  tokens[:, :i], so a sequence of T pixels is scored by one pass of length T.
- For export, the BOS vector becomes an extra row (id = vocab_size) of the token
  embedding, so a single-step decoder needs only token ids.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from projectable_edge_runtime.devices.errors import ProjectableEdgeError

Weights = dict[str, torch.Tensor]
FUSED_ATTENTION = True  # benchmarks/bench_train_speed.py turns it off to measure the difference


MAX_LAYERS, MAX_WIDTH = 1024, 1 << 20  # sanity bounds: far beyond any model this project trains


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # pixel levels (17 for digits)
    block_size: int  # tokens per image (64 for 8x8 gray)
    n_layer: int
    n_head: int
    d_model: int
    d_attn: int  # attention inner width = n_head * head_dim
    d_mlp: int

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            hi = MAX_LAYERS if name == "n_layer" else MAX_WIDTH
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= hi:
                raise ProjectableEdgeError(f"model field '{name}' must be a whole number in 1..{hi}, got {v!r}")
        if self.d_attn % self.n_head:
            raise ProjectableEdgeError(f"model field 'd_attn' ({self.d_attn}) must be a multiple of 'n_head' "
                                       f"({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.d_attn // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ProjectableEdgeError(f"a model config must be a JSON object of its sizes, got {d!r}")
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the model and its shape (without any leading batch dim)."""
    d, a, m, v = cfg.d_model, cfg.d_attn, cfg.d_mlp, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte": (v, d), "wpe": (cfg.block_size, d)}
    for i in range(cfg.n_layer):
        p = f"h{i}."
        shapes.update({
            p + "ln1.w": (d,), p + "ln1.b": (d,),
            p + "wq": (d, a), p + "bq": (a,),
            p + "wk": (d, a), p + "bk": (a,),
            p + "wv": (d, a), p + "bv": (a,),
            p + "wo": (a, d), p + "bo": (d,),
            p + "ln2.w": (d,), p + "ln2.b": (d,),
            p + "w1": (d, m), p + "b1": (m,),
            p + "w2": (m, d), p + "b2": (d,),
        })
    shapes.update({"lnf.w": (d,), "lnf.b": (d,), "head": (d, v), "head_b": (v,)})
    return shapes


def init_weights(cfg: ModelConfig, generator: torch.Generator | None = None) -> Weights:
    """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2L), LN gains 1."""
    w: Weights = {}
    for name, shape in weight_shapes(cfg).items():
        leaf = name.split(".")[-1] if "." in name else name
        if name.endswith(".w") and len(shape) == 1:  # layer-norm gains
            w[name] = torch.ones(shape)
        elif len(shape) == 1:  # biases
            w[name] = torch.zeros(shape)
        else:
            std = 0.02 / math.sqrt(2 * cfg.n_layer) if leaf in ("wo", "w2") else 0.02
            w[name] = torch.randn(shape, generator=generator) * std
    return w


def count_params(cfg: ModelConfig, extra: int = 0) -> int:
    return sum(math.prod(s) for s in weight_shapes(cfg).values()) + extra


def flops_per_image(cfg: ModelConfig) -> int:
    """Forward multiply-adds x2 for one full image (T = block_size tokens)."""
    t = cfg.block_size
    per_token_linear = cfg.n_layer * (3 * cfg.d_model * cfg.d_attn + cfg.d_attn * cfg.d_model
                                      + 2 * cfg.d_model * cfg.d_mlp) + cfg.d_model * cfg.vocab_size
    attention = cfg.n_layer * 2 * t * t * cfg.d_attn  # scores + weighted sum, causal not halved
    return 2 * (t * per_token_linear + attention)


def _bias(b: torch.Tensor) -> torch.Tensor:
    # [O] stays [O]; per-sample [B, O] becomes [B, 1, O] to broadcast over time.
    return b if b.dim() == 1 else b.unsqueeze(1)


def _exporting() -> bool:
    """ONNX export traces forms that ONNX Runtime fuses into fewer kernels (the same arithmetic up to
    rounding); eager PyTorch, and so training, keeps its own forms bit for bit."""
    return torch.onnx.is_in_onnx_export()


def _layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if g.dim() == 1 and _exporting():  # one LayerNormalization node with its scale and bias
        return F.layer_norm(x, x.shape[-1:], g, b)
    return F.layer_norm(x, x.shape[-1:]) * _bias(g) + _bias(b)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    if _exporting():  # the erf pattern ONNX Runtime fuses into one Gelu kernel
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return F.gelu(x)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ w + _bias(b)


def _embed(table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """table [V, d] or per-sample [B, V, d]; tokens [B, T] -> [B, T, d]."""
    if table.dim() == 2:
        return F.embedding(tokens, table)
    rows = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1)
    return table[rows, tokens]


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    b, t, a = x.shape  # [B, T, A] -> [B, H, T, A/H]
    return x.view(b, t, n_head, a // n_head).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention: q, k, v [B, H, T, hd] -> [B, H, T, hd].

    Training and eager scoring use PyTorch's fused scaled_dot_product_attention; ONNX export
    traces the plain matmul-softmax form, whose ops every backend (TensorRT included) knows.
    """
    if FUSED_ATTENTION and not _exporting():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, T, T]
    # an additive causal mask (0 or -inf: the numbers masked_fill gives) is one broadcast Add in the
    # graph, built once for all layers
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return (att + torch.zeros(t, t, dtype=att.dtype, device=q.device).masked_fill(~causal, float("-inf"))
            ).softmax(dim=-1) @ v


def _block(w: Weights, p: str, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """One pre-norm block over x [B, T, d]."""
    b, t, _ = x.shape
    h = _layer_norm(x, w[p + "ln1.w"], w[p + "ln1.b"])
    if p + "wqkv" in w:  # export (SpecialisedModel supplies them): q, k and v from one matmul
        qkv = _linear(h, w[p + "wqkv"], w[p + "bqkv"]).view(b, t, 3 * cfg.n_head, cfg.head_dim)
        q, k, v = qkv.transpose(1, 2).split(cfg.n_head, dim=1)  # [B, H, T, hd] each
    else:
        q, k, v = (_heads(_linear(h, w[p + f"w{n}"], w[p + f"b{n}"]), cfg.n_head) for n in "qkv")
    y = _attend(q, k, v).transpose(1, 2).reshape(b, t, cfg.d_attn)  # [B, T, A]
    x = x + _linear(y, w[p + "wo"], w[p + "bo"])
    h = _layer_norm(x, w[p + "ln2.w"], w[p + "ln2.b"])
    return x + _linear(_gelu(_linear(h, w[p + "w1"], w[p + "b1"])), w[p + "w2"], w[p + "b2"])


def _head(w: Weights, x: torch.Tensor) -> torch.Tensor:
    return _linear(_layer_norm(x, w["lnf.w"], w["lnf.b"]), w["head"], w["head_b"])


def forward(w: Weights, cfg: ModelConfig, tokens: torch.Tensor, bos: torch.Tensor) -> torch.Tensor:
    """Score a batch: tokens [B, T] (T <= block_size), bos [B, d] -> logits [B, T, V].

    The input sequence is [bos, tokens[:, :-1]], so logits[:, i] predicts tokens[:, i].
    """
    b, t = tokens.shape
    x = torch.cat([bos.view(b, 1, -1), _embed(w["wte"], tokens[:, : t - 1])], dim=1)  # [B, T, d]
    pos = w["wpe"][..., :t, :]  # [T, d] or [B, T, d]
    x = x + pos
    for i in range(cfg.n_layer):
        x = _block(w, f"h{i}.", cfg, x)
    return _head(w, x)


def nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats per token."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def bits_per_dim(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-image NLL in bits per pixel token: [B]."""
    logp = logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return -logp.mean(dim=1) / math.log(2)


class SpecialisedModel(nn.Module):
    """A single-task model (a projected P_t, or one task of a baseline) ready to export.

    It implements exporters.protocol.ExportableModel (cfg, bos_id, forward, decode_step).

    The task's BOS vector is stored as row `vocab_size` of the token embedding, so
    both graphs take plain token ids: scoring `tokens [B, T] -> logits [B, T, V]`,
    and one decode step `token [B, 1], past [L, B, H, P, hd] x2 -> logits [B, V], present x2`
    (feed id `vocab_size` as the first token).
    """

    def __init__(self, cfg: ModelConfig, weights: Weights, bos: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.names = sorted(weights)
        for name in self.names:
            self.register_buffer(name.replace(".", "_"), weights[name].detach().clone().float())
        self.register_buffer("wte_ext", torch.cat([weights["wte"], bos.view(1, -1)]).detach().clone().float())
        for i in range(cfg.n_layer):  # the decode step's fused q|k|v weights (derived: not saved)
            for fused, parts in (("wqkv", ("wq", "wk", "wv")), ("bqkv", ("bq", "bk", "bv"))):
                self.register_buffer(f"h{i}_{fused}", torch.cat([getattr(self, f"h{i}_{n}") for n in parts], -1),
                                     persistent=False)

    @property
    def weights(self) -> Weights:
        return {n: getattr(self, n.replace(".", "_")) for n in self.names}

    def _qkv(self) -> Weights:
        """Each layer's fused q|k|v weights ("h0.wqkv", "h0.bqkv"): what the exported graphs multiply by."""
        return {f"h{i}.{n}": getattr(self, f"h{i}_{n}") for i in range(self.cfg.n_layer) for n in ("wqkv", "bqkv")}

    @property
    def bos_id(self) -> int:
        return self.cfg.vocab_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = {**self.weights, **self._qkv()} if _exporting() else self.weights
        b = tokens.shape[0]
        bos = self.wte_ext[self.cfg.vocab_size].expand(b, -1)
        return forward(w, self.cfg, tokens, bos)

    def bits(self, tokens: np.ndarray) -> np.ndarray:
        """Bits/dim of each sequence, tokens int64 [N, T] -> float64 [N]: the PyTorch reference every
        later step (export parity, goldens, adapted-task checks) compares against."""
        with torch.no_grad():
            x = torch.as_tensor(tokens, dtype=torch.long)
            return bits_per_dim(self(x), x).double().numpy()

    def decode_step(self, token: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        """token [B, 1] (int64), past_k/v [L, B, H, P, hd] -> logits [B, V], present_k/v [L, B, H, P+1, hd].

        `forward`'s arithmetic for one query, shaped for a small graph (a decode step is mostly per-kernel
        overhead): q, k and v from one matmul, no mask (the one query sees every key), and each layer's
        keys as [1, B, H, P+1, hd] so the present cache is one concatenation. Activations stay [B, 1, d]:
        as [B, d], a matmul and its bias become a Gemm, whose bias static INT8 quantizes to int32, which
        TensorRT cannot build."""
        cfg, w = self.cfg, {**self.weights, **self._qkv()}
        n_head, hd = cfg.n_head, cfg.head_dim
        p = past_k.shape[3]
        x = F.embedding(token, self.wte_ext) + w["wpe"][p]  # [B, 1, d]
        ks, vs = [], []
        for i in range(cfg.n_layer):
            pre = f"h{i}."
            h = _layer_norm(x, w[pre + "ln1.w"], w[pre + "ln1.b"])
            qkv = _linear(h, w[pre + "wqkv"], w[pre + "bqkv"])  # [B, 1, 3A]
            q, k, v = qkv.reshape(1, -1, 3 * n_head, 1, hd).split(n_head, dim=2)  # [1, B, H, 1, hd] each
            k, v = torch.cat([past_k[i: i + 1], k], dim=3), torch.cat([past_v[i: i + 1], v], dim=3)
            att = ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))).softmax(dim=-1)  # [1, B, H, 1, P+1]
            x = x + _linear((att @ v).reshape(-1, 1, cfg.d_attn), w[pre + "wo"], w[pre + "bo"])
            h = _layer_norm(x, w[pre + "ln2.w"], w[pre + "ln2.b"])
            x = x + _linear(_gelu(_linear(h, w[pre + "w1"], w[pre + "b1"])), w[pre + "w2"], w[pre + "b2"])
            ks.append(k)
            vs.append(v)
        return _head(w, x).reshape(-1, cfg.vocab_size), torch.cat(ks), torch.cat(vs)

"""The projection operator: source weights + task -> small model weights, in one shot.

Every weight matrix W [in, out] of the source is mapped as  W_s = A_in(t)^T W A_out(t)
by task-dependent linear maps on its input and output spaces:
- the residual-stream map R(t) [d, d_s] is shared by every layer (the residual adds across
  layers, so all blocks must read and write the same small basis);
- each layer has its own attention inner map [d_attn, d_attn_s] (shared by q, k, v, o so
  heads stay aligned) and MLP inner map [d_mlp, d_mlp_s];
- embeddings, positions, norms and biases are mapped by the map of the space they live in;
  the vocabulary space is not mapped (head bias is copied).

Each map is a mixture of K learned basis maps, A(t) = sum_k softmax(c(t))_k A_k, with the
coefficients c(t) a linear function of the source's task embedding. All K bases start as
the same selection matrix, so at step 0 every projected model is a slice of the source.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from projectable_edge.model import ModelConfig, Weights


@dataclass(frozen=True)
class ProjectionConfig:
    n_basis: int = 4  # K basis maps per space
    init_noise: float = 0.0  # std of Gaussian noise added to the selection init
    # std of the mixture logits at init. With identical bases and uniform coefficients the K
    # bases get identical gradients forever (nothing is task-specific); random coefficients
    # break that symmetry while the mixture of identical selections is still exactly a slice.
    coef_init: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProjectionConfig":
        return cls(n_basis=int(d["n_basis"]), init_noise=float(d["init_noise"]),
                   coef_init=float(d.get("coef_init", 0.0)))


def selection(n_in: int, n_out: int, index: list[int]) -> torch.Tensor:
    """[n_in, n_out] matrix whose column j picks input coordinate index[j]."""
    s = torch.zeros(n_in, n_out)
    s[torch.tensor(index), torch.arange(n_out)] = 1.0
    return s


def selection_indices(src: ModelConfig, dst: ModelConfig) -> dict[str, list[int]]:
    """Which source coordinates the small model keeps at initialisation, per space."""
    if dst.d_model > src.d_model or dst.d_mlp > src.d_mlp or dst.n_layer != src.n_layer:
        raise ValueError("the small model must be narrower than the source, with the same depth")
    if dst.n_head > src.n_head or dst.head_dim > src.head_dim:
        raise ValueError("the small model needs at most the source's heads and head width")
    if dst.vocab_size != src.vocab_size or dst.block_size != src.block_size:
        raise ValueError("source and small model must share vocabulary and block size")
    attn = [h * src.head_dim + i for h in range(dst.n_head) for i in range(dst.head_dim)]
    return {"res": list(range(dst.d_model)), "attn": attn, "mlp": list(range(dst.d_mlp))}


class Projector(nn.Module):
    """Holds the K basis maps of every space and the task -> mixture coefficients layer."""

    def __init__(self, src: ModelConfig, dst: ModelConfig, cfg: ProjectionConfig,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.src, self.dst, self.cfg = src, dst, cfg
        idx = selection_indices(src, dst)
        spaces = {"res": (src.d_model, dst.d_model, idx["res"])}
        for i in range(src.n_layer):
            spaces[f"h{i}.attn"] = (src.d_attn, dst.d_attn, idx["attn"])
            spaces[f"h{i}.mlp"] = (src.d_mlp, dst.d_mlp, idx["mlp"])
        self.bases = nn.ParameterDict()
        for name, (n_in, n_out, index) in spaces.items():
            base = selection(n_in, n_out, index).expand(cfg.n_basis, n_in, n_out).clone()
            if cfg.init_noise > 0:
                base += cfg.init_noise * torch.randn(base.shape, generator=generator)
            self.bases[name.replace(".", "_")] = nn.Parameter(base)  # [K, in, out]
        # task embeddings start at N(0, 0.02^2) (Trainables), so logits start at N(0, coef_init^2)
        self.coef = nn.Linear(src.d_model, cfg.n_basis)
        nn.init.normal_(self.coef.weight, std=cfg.coef_init / (0.02 * math.sqrt(src.d_model)), generator=generator)
        nn.init.zeros_(self.coef.bias)

    def maps(self, task_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """task_emb [N, d] -> {space: A(t) [N, in, out]}."""
        mix = self.coef(task_emb).softmax(dim=-1)  # [N, K]
        return {k.replace("_", "."): torch.einsum("nk,kio->nio", mix, b) for k, b in self.bases.items()}

    def forward(self, w: Weights, task_emb: torch.Tensor) -> tuple[Weights, torch.Tensor]:
        """Source weights + task embeddings [N, d] -> (small weights with a leading [N] dim, bos [N, d_s])."""
        a = self.maps(task_emb)
        r = a["res"]  # [N, d, d_s]
        vec_r = lambda v: v @ r  # [d] -> [N, d_s]  # noqa: E731
        out: Weights = {
            "wte": torch.einsum("vd,nds->nvs", w["wte"], r),
            "wpe": torch.einsum("pd,nds->nps", w["wpe"], r),
            "lnf.w": vec_r(w["lnf.w"]), "lnf.b": vec_r(w["lnf.b"]),
            "head": torch.einsum("nds,dv->nsv", r, w["head"]),
            "head_b": w["head_b"].expand(r.shape[0], -1),
        }
        for i in range(self.src.n_layer):
            p = f"h{i}."
            att, mlp = a[p + "attn"], a[p + "mlp"]
            for n in ("ln1.w", "ln1.b", "ln2.w", "ln2.b", "bo", "b2"):
                out[p + n] = vec_r(w[p + n])
            for n in ("wq", "wk", "wv"):  # [d, a] -> R^T W A
                out[p + n] = torch.einsum("nds,da,nae->nse", r, w[p + n], att)
            for n in ("bq", "bk", "bv"):
                out[p + n] = w[p + n] @ att
            out[p + "wo"] = torch.einsum("nae,ad,nds->nes", att, w[p + "wo"], r)
            out[p + "w1"] = torch.einsum("nds,dm,nmf->nsf", r, w[p + "w1"], mlp)
            out[p + "b1"] = w[p + "b1"] @ mlp
            out[p + "w2"] = torch.einsum("nmf,md,nds->nfs", mlp, w[p + "w2"], r)
        return out, task_emb.unsqueeze(1).matmul(r).squeeze(1)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

"""The projection operator: source weights + task -> small model weights, in one shot.

Every weight matrix W [in, out] of the source is mapped as  W_s = A_in(t)^T W A_out(t)
by task-dependent linear maps on its input and output spaces:
- the residual-stream map R(t) [d, d_s] is shared by every layer (the residual adds across
  layers, so all blocks must read and write the same small basis);
- each small layer j has its own attention inner map [d_attn, d_attn_s] (shared by q, k, v, o
  so heads stay aligned) and MLP inner map [d_mlp, d_mlp_s], applied to source layer
  round(j * L / L_s): a small model may have fewer layers than the source;
- embeddings, positions, norms and biases are mapped by the map of the space they live in;
  the vocabulary space is not mapped (head bias is copied).

Each map is a mixture of K learned basis maps, A(t) = sum_k softmax(c_space(t))_k A_k. The
coefficients c are a linear function of the source's task embedding; with `mixture="per_space"`
every space (the residual map, each layer's attention and MLP maps) has its own softmax, so a
task has (K-1) degrees of freedom per space instead of K-1 in all (see README: what was tried).
All K bases start as the same selection matrix, so at step 0 every projected model is a slice
of the source whatever the coefficients are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.model import ModelConfig, Weights, weight_shapes

MIXTURES = ("shared", "per_space")


@dataclass(frozen=True)
class ProjectionConfig:
    n_basis: int = 8  # K basis maps per space
    init_noise: float = 0.0  # std of Gaussian noise added to the selection init
    # std of the mixture logits at init. With identical bases and uniform coefficients the K
    # bases get identical gradients forever (nothing is task-specific); random coefficients
    # break that symmetry while the mixture of identical selections is still exactly a slice.
    coef_init: float = 1.0
    mixture: str = "per_space"  # one softmax per space, or one "shared" by every space
    # task-independent small-model weights added to every projection (zero at init, trained with the
    # operator): the small model = shared weights + the task's projection of M, same deployed size
    delta: bool = False

    def __post_init__(self) -> None:
        if self.mixture not in MIXTURES:
            raise ProjectableEdgeError(f"projection 'mixture' must be one of {MIXTURES}, got {self.mixture!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def layer_map(n_src: int, n_dst: int) -> list[int]:
    """Which source layer each small layer starts from: round(j * L / L_s)."""
    return [min(n_src - 1, round(j * n_src / n_dst)) for j in range(n_dst)]


def selection(n_in: int, n_out: int, index: list[int]) -> torch.Tensor:
    """[n_in, n_out] matrix whose column j picks input coordinate index[j]."""
    s = torch.zeros(n_in, n_out)
    s[torch.tensor(index), torch.arange(n_out)] = 1.0
    return s


def check_fits(src: ModelConfig, dst: ModelConfig) -> None:
    """A clear error naming both sizes when `dst` cannot be projected from `src`."""
    def shape(c: ModelConfig) -> str:
        return f"{c.n_layer} layers, width {c.d_model}, {c.n_head} heads x {c.head_dim}, MLP {c.d_mlp}"

    problems = []
    if dst.d_model > src.d_model or dst.d_mlp > src.d_mlp or dst.d_attn > src.d_attn:
        problems.append("it is wider than the source")
    if dst.n_layer > src.n_layer:
        problems.append("it has more layers than the source")
    if dst.n_head > src.n_head or dst.head_dim > src.head_dim:
        problems.append("it has more heads or wider heads than the source")
    if dst.vocab_size != src.vocab_size or dst.block_size != src.block_size:
        problems.append("its vocabulary or block size differs from the source's")
    if problems:
        raise ProjectableEdgeError(f"cannot project the source ({shape(src)}) to a small model ({shape(dst)}): "
                                   f"{'; '.join(problems)}. Choose a small size (--small, --ladder: WIDTH[xLAYERS], "
                                   f"MLP 4 x WIDTH) within the source's: here WIDTH <= "
                                   f"{min(src.d_model, src.d_attn, src.d_mlp // 4)} and LAYERS <= {src.n_layer}")


def selection_indices(src: ModelConfig, dst: ModelConfig) -> dict[str, list[int]]:
    """Which source coordinates the small model keeps at initialisation, per space."""
    check_fits(src, dst)
    attn = [h * src.head_dim + i for h in range(dst.n_head) for i in range(dst.head_dim)]
    return {"res": list(range(dst.d_model)), "attn": attn, "mlp": list(range(dst.d_mlp))}


class Projector(nn.Module):
    """Holds the K basis maps of every space and the task -> mixture coefficients layer."""

    def __init__(self, src: ModelConfig, dst: ModelConfig, cfg: ProjectionConfig,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.src, self.dst, self.cfg = src, dst, cfg
        self.layers = layer_map(src.n_layer, dst.n_layer)
        idx = selection_indices(src, dst)
        spaces = {"res": (src.d_model, dst.d_model, idx["res"])}
        for j in range(dst.n_layer):
            spaces[f"h{j}.attn"] = (src.d_attn, dst.d_attn, idx["attn"])
            spaces[f"h{j}.mlp"] = (src.d_mlp, dst.d_mlp, idx["mlp"])
        self.spaces = list(spaces)
        self.bases = nn.ParameterDict()
        for name, (n_in, n_out, index) in spaces.items():
            base = selection(n_in, n_out, index).expand(cfg.n_basis, n_in, n_out).clone()
            if cfg.init_noise > 0:
                base += cfg.init_noise * torch.randn(base.shape, generator=generator)
            self.bases[name.replace(".", "_")] = nn.Parameter(base)  # [K, in, out]
        if cfg.delta:
            self.delta = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(torch.zeros(shape))
                                           for n, shape in weight_shapes(dst).items()})
        n_mix = len(self.spaces) if cfg.mixture == "per_space" else 1
        # task embeddings start at N(0, 0.02^2) (Trainables), so logits start at N(0, coef_init^2)
        self.coef = nn.Linear(src.d_model, n_mix * cfg.n_basis)
        with torch.no_grad():
            std = cfg.coef_init / (0.02 * math.sqrt(src.d_model))
            self.coef.weight.copy_(torch.randn(self.coef.weight.shape, generator=generator) * std)
            self.coef.bias.zero_()

    def mixtures(self, task_emb: torch.Tensor) -> torch.Tensor:
        """task_emb [N, d] -> mixture weights [N, n_spaces, K] (rows sum to 1)."""
        mix = self.coef(task_emb).view(task_emb.shape[0], -1, self.cfg.n_basis).softmax(dim=-1)
        return mix.expand(-1, len(self.spaces), -1)

    def maps(self, task_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """task_emb [N, d] -> {space: A(t) [N, in, out]}."""
        mix = self.mixtures(task_emb)
        return {s: torch.einsum("nk,kio->nio", mix[:, i], self.bases[s.replace(".", "_")])
                for i, s in enumerate(self.spaces)}

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
        for j, i in enumerate(self.layers):
            p, q = f"h{j}.", f"h{i}."  # small layer j <- source layer i
            att, mlp = a[p + "attn"], a[p + "mlp"]
            for n in ("ln1.w", "ln1.b", "ln2.w", "ln2.b", "bo", "b2"):
                out[p + n] = vec_r(w[q + n])
            for n in ("wq", "wk", "wv"):  # [d, a] -> R^T W A
                out[p + n] = torch.einsum("nds,da,nae->nse", r, w[q + n], att)
            for n in ("bq", "bk", "bv"):
                out[p + n] = w[q + n] @ att
            out[p + "wo"] = torch.einsum("nae,ad,nds->nes", att, w[q + "wo"], r)
            out[p + "w1"] = torch.einsum("nds,dm,nmf->nsf", r, w[q + "w1"], mlp)
            out[p + "b1"] = w[q + "b1"] @ mlp
            out[p + "w2"] = torch.einsum("nmf,md,nds->nfs", mlp, w[q + "w2"], r)
        if self.cfg.delta:
            out = {k: v + self.delta[k.replace(".", "__")] for k, v in out.items()}
        return out, task_emb.unsqueeze(1).matmul(r).squeeze(1)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

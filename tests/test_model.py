"""The Transformer and the projection operator."""

import pytest
import torch

from projectable_edge import ProjectableEdgeError
from projectable_edge.model import (ModelConfig, SpecialisedModel, bits_per_dim, count_params, forward,
                                    init_weights, weight_shapes)
from projectable_edge.projection import ProjectionConfig, Projector, selection_indices

SRC = ModelConfig(vocab_size=17, block_size=64, n_layer=2, n_head=4, d_model=32, d_attn=32, d_mlp=64)
SMALL = ModelConfig(vocab_size=17, block_size=64, n_layer=2, n_head=2, d_model=16, d_attn=8, d_mlp=24)


def _weights(cfg, seed=0, std=None):
    w = init_weights(cfg, torch.Generator().manual_seed(seed))
    if std:  # larger weights make every position matter, so causality tests have teeth
        w = {k: torch.randn_like(v) * std if v.dim() == 2 else v for k, v in w.items()}
    return w


def test_shapes_and_param_count():
    w = _weights(SRC)
    assert {k: tuple(v.shape) for k, v in w.items()} == weight_shapes(SRC)
    assert count_params(SRC) == sum(v.numel() for v in w.values())
    tokens = torch.randint(0, 17, (3, 64))
    logits = forward(w, SRC, tokens, torch.zeros(3, SRC.d_model))
    assert logits.shape == (3, 64, 17)
    assert forward(w, SRC, tokens[:, :5], torch.zeros(3, SRC.d_model)).shape == (3, 5, 17)


def test_causality():
    """logits[:, i] must depend on tokens[:, :i] only."""
    w = _weights(SRC, std=0.3)
    bos = torch.randn(1, SRC.d_model)
    a = torch.randint(0, 17, (1, 64))
    b = a.clone()
    b[0, 20] = (a[0, 20] + 5) % 17
    la, lb = forward(w, SRC, a, bos), forward(w, SRC, b, bos)
    assert torch.equal(la[:, :21], lb[:, :21])  # positions <= 20 never see token 20
    assert not torch.allclose(la[:, 21:], lb[:, 21:])  # later ones do


def test_per_sample_weights_match_shared_weights():
    """Stacked per-sample weights (used to train every task in one batch) equal running each alone."""
    w1, w2 = _weights(SMALL, 1), _weights(SMALL, 2)
    stacked = {k: torch.stack([w1[k], w2[k], w1[k]]) for k in w1}
    tokens = torch.randint(0, 17, (3, 64))
    bos = torch.randn(3, SMALL.d_model)
    out = forward(stacked, SMALL, tokens, bos)
    assert torch.allclose(out[0], forward(w1, SMALL, tokens[:1], bos[:1])[0], atol=1e-6)
    assert torch.allclose(out[1], forward(w2, SMALL, tokens[1:2], bos[1:2])[0], atol=1e-6)


def test_kv_cache_decode_matches_full_forward():
    m = SpecialisedModel(SMALL, _weights(SMALL, std=0.2), torch.randn(SMALL.d_model))
    tokens = torch.randint(0, 17, (2, 64))
    full = m(tokens)
    k = v = torch.zeros(SMALL.n_layer, 2, SMALL.n_head, 0, SMALL.head_dim)  # an empty cache
    tok = torch.full((2, 1), m.bos_id)
    steps = []
    for i in range(64):
        logits, k, v = m.decode_step(tok, k, v)
        steps.append(logits)
        tok = tokens[:, i: i + 1]
    assert k.shape == (SMALL.n_layer, 2, SMALL.n_head, 64, SMALL.head_dim)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_bits_per_dim_of_uniform_model():
    logits = torch.zeros(2, 64, 16)
    tokens = torch.randint(0, 16, (2, 64))
    assert torch.allclose(bits_per_dim(logits, tokens), torch.full((2,), 4.0))


def _expected_slice(src_w, idx, layers):
    """What a pure selection projection must produce, written out by hand from the source."""
    r, a, m = idx["res"], idx["attn"], idx["mlp"]
    inner = {"wq": a, "wk": a, "wv": a, "bq": a, "bk": a, "bv": a, "w1": m, "b1": m}
    out = {}
    for name, w in src_w.items():
        if name[0] == "h" and name[1].isdigit():
            layer, leaf = name.split(".", 1)
            if int(layer[1:]) not in layers:
                continue
            name = f"h{layers.index(int(layer[1:]))}.{leaf}"
        else:
            leaf = name
        if name in ("wte", "wpe"):
            out[name] = w[:, r]
        elif name == "head":
            out[name] = w[r]
        elif name == "head_b":
            out[name] = w
        elif leaf in ("wq", "wk", "wv", "w1"):
            out[name] = w[r][:, inner[leaf]]
        elif leaf == "wo":
            out[name] = w[a][:, r]
        elif leaf == "w2":
            out[name] = w[m][:, r]
        elif leaf in inner:
            out[name] = w[inner[leaf]]
        else:  # norms, bo, b2: residual space
            out[name] = w[r]
    return out


@pytest.mark.parametrize("mixture", ["per_space", "shared"])
@pytest.mark.parametrize("small_layers", [2, 1])
def test_projection_at_init_is_a_slice_of_the_source(mixture, small_layers):
    small_cfg = SMALL.__class__(**{**SMALL.to_dict(), "n_layer": small_layers})
    src_w = _weights(SRC, std=0.1)
    src_w = {k: v + torch.randn_like(v) * 0.1 for k, v in src_w.items()}  # non-trivial norms and biases
    proj = Projector(SRC, small_cfg, ProjectionConfig(n_basis=3, mixture=mixture))
    assert proj.layers == ([0, 1] if small_layers == 2 else [0])
    task_emb = torch.randn(4, SRC.d_model)
    small, bos = proj(src_w, task_emb)
    expect = _expected_slice(src_w, selection_indices(SRC, small_cfg), proj.layers)
    assert set(small) == set(expect) == set(weight_shapes(small_cfg))
    for name, e in expect.items():
        for t in range(4):
            assert torch.allclose(small[name][t], e, atol=1e-6), name
    assert torch.allclose(bos, task_emb[:, selection_indices(SRC, small_cfg)["res"]])
    # and the projected model computes what the hand-sliced source weights compute
    tokens = torch.randint(0, 17, (1, 64))
    assert torch.allclose(forward({k: v[0] for k, v in small.items()}, small_cfg, tokens, bos[:1]),
                          forward(expect, small_cfg, tokens, bos[:1]), atol=1e-5)


def test_per_space_mixtures_are_independent():
    """Per-space: each space has its own softmax; shared: one softmax for all spaces."""
    emb = torch.randn(3, SRC.d_model)
    per = Projector(SRC, SMALL, ProjectionConfig(n_basis=4, mixture="per_space"), torch.Generator().manual_seed(0))
    shared = Projector(SRC, SMALL, ProjectionConfig(n_basis=4, mixture="shared"), torch.Generator().manual_seed(0))
    mp, ms = per.mixtures(emb), shared.mixtures(emb)
    n_spaces = 1 + 2 * SMALL.n_layer
    assert mp.shape == ms.shape == (3, n_spaces, 4)
    assert torch.allclose(mp.sum(-1), torch.ones(3, n_spaces)) and torch.allclose(ms.sum(-1), torch.ones(3, n_spaces))
    assert not torch.allclose(mp[:, 0], mp[:, 1])  # spaces differ
    assert torch.equal(ms[:, 0], ms[:, 1])  # one mixture for all
    assert per.coef.out_features == n_spaces * 4 and shared.coef.out_features == 4


def test_projection_is_task_dependent_after_the_coefficients_move():
    proj = Projector(SRC, SMALL, ProjectionConfig(n_basis=3, init_noise=0.05), torch.Generator().manual_seed(0))
    torch.nn.init.normal_(proj.coef.weight, std=1.0)
    src_w = _weights(SRC)
    small, _ = proj(src_w, torch.randn(2, SRC.d_model))
    assert not torch.allclose(small["h0.wq"][0], small["h0.wq"][1])


def test_projection_rejects_sizes_the_source_cannot_project_to():
    from projectable_edge_runtime.devices.errors import ProjectableEdgeError

    with pytest.raises(ProjectableEdgeError, match=r"width 32.*wider than the source"):
        selection_indices(SMALL, SRC)
    deeper = SMALL.__class__(**{**SMALL.to_dict(), "n_layer": 3})
    with pytest.raises(ProjectableEdgeError, match="3 layers.*more layers than the source"):
        Projector(SRC, deeper, ProjectionConfig())


def test_every_role_has_its_own_generator():
    """Changing the operator (mixture, K) or adding a ladder size never moves a baseline's init."""
    from projectable_edge.trainables import Trainables

    a = Trainables(SRC, SMALL, 3, ProjectionConfig(n_basis=4, mixture="shared"), seed=5)
    b = Trainables(SRC, SMALL, 3, ProjectionConfig(n_basis=8, mixture="per_space"), seed=5,
                   ladder={"8x2": SMALL.__class__(**{**SMALL.to_dict(), "d_model": 8, "d_attn": 8, "d_mlp": 16})})
    c = Trainables(SRC, SMALL, 3, ProjectionConfig(), seed=6)
    for name in ("universal.h0__wq", "universal_task", "scratch.h1__w1", "source.wte", "source_task"):
        assert torch.equal(a.state_dict()[name], b.state_dict()[name]), name
        assert not torch.equal(a.state_dict()[name], c.state_dict()[name]), name
    assert "ladder.8x2.universal.h0__wq" in b.state_dict()


def test_training_makes_the_projection_task_specific():
    """Identical bases + random mixture coefficients: one gradient step already separates tasks."""
    from projectable_edge.trainables import Trainables

    model = Trainables(SRC, SMALL, n_task=3, pcfg=ProjectionConfig(n_basis=4), seed=0)
    w0, _ = model.projected_all()
    assert torch.allclose(w0["h0.w1"][0], w0["h0.w1"][1])  # a slice for every task at init
    opt = torch.optim.SGD(model.projector.parameters(), lr=0.5)
    tokens = torch.randint(0, 17, (6, 64))
    tasks = torch.tensor([0, 0, 1, 1, 2, 2])
    model(tokens, tasks)["projected"].backward()
    opt.step()
    w1, _ = model.projected_all()
    assert not torch.allclose(w1["h0.w1"][0], w1["h0.w1"][1], atol=1e-6)


def test_distillation_adds_the_same_teacher_term_to_every_small_role():
    from projectable_edge.trainables import Trainables

    model = Trainables(SRC, SMALL, n_task=3, pcfg=ProjectionConfig(), seed=0)
    tokens, tasks = torch.randint(0, 17, (6, 64)), torch.tensor([0, 0, 1, 1, 2, 2])
    plain, kd = model(tokens, tasks), model(tokens, tasks, distill=1.0)
    assert torch.equal(plain["source"], kd["source"])  # the teacher's own loss is untouched
    for role in ("projected", "universal", "scratch"):
        assert kd[role] > plain[role], role  # + KL(source || small) > 0 for two different models
    kd["universal"].backward()
    assert all(p.grad is None for p in model.source.parameters())  # the teacher is detached


@pytest.mark.parametrize("field,value", [("n_head", 0), ("d_model", -32), ("n_layer", 10**9),
                                         ("block_size", float("nan")), ("vocab_size", True), ("d_mlp", "64")])
def test_model_config_refuses_sizes_out_of_range(field, value):
    with pytest.raises(ProjectableEdgeError, match=f"model field '{field}' must be a whole number in 1\\.\\."):
        ModelConfig(**{**SRC.to_dict(), field: value})


def test_model_config_from_dict_refuses_what_is_not_a_model():
    assert ModelConfig.from_dict(SRC.to_dict()) == SRC
    with pytest.raises(ProjectableEdgeError, match="must be a JSON object"):
        ModelConfig.from_dict("x")
    with pytest.raises(ProjectableEdgeError, match="'d_mlp' must be a whole number .*got None"):
        ModelConfig.from_dict({k: v for k, v in SRC.to_dict().items() if k != "d_mlp"})
    with pytest.raises(ProjectableEdgeError, match="multiple of 'n_head'"):
        ModelConfig(**{**SRC.to_dict(), "d_attn": 30})

"""PathoTune prompt ablations: every subset trains and predicts, and every prompt kind is live."""

from __future__ import annotations

import csv
import itertools
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsitools.attention import read_attention  # noqa: E402
from wsitools.errors import ConfigError, DataError, ModelError  # noqa: E402
from wsitools.mil.config import TrainConfig  # noqa: E402
from wsitools.mil.heads import HeadConfig, create_head  # noqa: E402
from wsitools.mil.predict import predict  # noqa: E402
from wsitools.mil.synthetic import make_bag_cohort  # noqa: E402
from wsitools.mil.train import train  # noqa: E402

TASK = """name: ablation
description: synthetic bags
stain: none
classes:
  neg: background only
  pos: planted instances
"""
SUBSETS = [c for r in (1, 2, 3) for c in itertools.combinations(("tvp", "ttp", "ivp"), r)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    bags = make_bag_cohort(root / "f", n_slides=16, n_tiles=(20, 30), dim=8, shift=6.0, seed=3)
    make_bag_cohort(root / "f2", n_slides=16, n_tiles=(20, 30), dim=5, shift=6.0, seed=3)  # a second encoder
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label", "split"])
        for i, b in enumerate(bags):
            w.writerow([b.slide_id, b.label, "train" if i < 8 else "val" if i < 12 else "test"])
    (root / "task.yaml").write_text(TASK)
    return root


@pytest.mark.parametrize("prompts", SUBSETS, ids=lambda p: "+".join(p))
def test_every_prompt_subset_trains_and_predicts(small, prompts, tmp_path):
    out = tmp_path / "head"
    summary = train(features_dir=small / "f", labels=small / "labels.csv", task=small / "task.yaml", out_dir=out,
                    head="pathotune", prompts=prompts, config=TrainConfig(epochs=2, n_boot=10), progress=False,
                    text_cache_dir=small / "text_cache", head_options={"dim": 32, "n_tvp": 3, "n_ivp": 2})
    assert summary["prompts"] == list(prompts) and summary["pooled"]["n"] == 4
    config = json.loads((out / "fold_0" / "config.json").read_text())["config"]
    assert config["prompts"] == list(prompts)
    results = predict(out, small / "f", tmp_path / "pred", progress=False)
    assert len(results) == 16
    for r in results:
        assert r.probs.shape == (2,) and r.probs.sum() == pytest.approx(1.0, abs=1e-5)
        attention = read_attention(tmp_path / "pred" / "attention" / f"{r.slide_id}.h5").attention
        assert attention.sum() == pytest.approx(1.0, abs=1e-4)


def test_ivp_from_a_second_encoder(small, tmp_path):
    out = tmp_path / "head"
    train(features_dir=small / "f", labels=small / "labels.csv", task=small / "task.yaml", out_dir=out,
          head="pathotune", prompts=("ivp",), ivp_features_dir=small / "f2", config=TrainConfig(epochs=2, n_boot=10),
          progress=False, head_options={"dim": 32, "n_ivp": 2})
    assert json.loads((out / "fold_0" / "config.json").read_text())["config"]["ivp_in_dim"] == 5
    with pytest.raises(DataError, match="--ivp-features"):
        predict(out, small / "f", tmp_path / "p1", progress=False)
    assert len(predict(out, small / "f", tmp_path / "p2", ivp_features_dir=small / "f2", progress=False)) == 16
    with pytest.raises(DataError, match="add ivp to --prompts"):
        train(features_dir=small / "f", labels=small / "labels.csv", task=small / "task.yaml", out_dir=tmp_path / "x",
              head="pathotune", prompts=("tvp",), ivp_features_dir=small / "f2", progress=False)


def test_token_counts_and_every_prompt_kind_gets_gradient():
    text = torch.randn(3, 24)  # task + 2 classes, 24-d text embeddings
    cfg = HeadConfig(head="pathotune", in_dim=8, n_classes=2, dim=16, n_heads=2, prompts=("ivp", "ttp", "tvp"),
                     n_tvp=5, n_ivp=3, text_dim=24, dropout=0.0)
    assert cfg.prompts == ("tvp", "ttp", "ivp")  # canonical order whatever the input order
    torch.manual_seed(0)
    model = create_head(cfg, text_embeddings=text)
    # The prompted paths enter through gates that start at zero (the head starts as abmil, whose
    # computation it then is); open them as training would, so the prompts reach the output.
    with torch.no_grad():
        model.cross.gate.fill_(0.5)
        model.ivp_gate.fill_(0.5)  # likewise the IVP readout
    x = torch.randn(40, 8)
    h = model.project(x)
    assert model.task_tokens().shape == (5 + 3, 16)  # the patches attend to TVP and TTP
    assert model.instance_tokens(h, None).shape == (3, 16)  # IVP feeds the logits
    out = model(x)
    out.logits[1].backward()
    for name in ("tvp", "ttp_project.0.weight", "ivp_refine.queries"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.ttp_text.grad is None and not model.ttp_text.requires_grad  # the text stays frozen
    # Different task texts change the prediction: TTP reaches the output.
    other = create_head(cfg, text_embeddings=torch.randn(3, 24))
    other.load_state_dict({**model.state_dict(), "ttp_text": torch.randn(3, 24)})
    model.eval(), other.eval()
    assert not torch.allclose(model(x).logits, other(x).logits)


def test_ivp_from_the_own_bag_is_bounded_by_its_gate_and_a_second_encoder_is_not():
    """IVP from the slide's own bag adds a cosine readout times the gate to each logit, so however
    large its weights grow, a class's logit moves by at most the gate; a second encoder's readout is
    linear in the IVP token (its evidence is new and may take the logits as far as it needs)."""
    torch.manual_seed(0)
    own = create_head(HeadConfig(head="pathotune", in_dim=8, n_classes=3, dim=16, n_heads=2, prompts=("ivp",))).eval()
    x = torch.randn(60, 8)
    with torch.no_grad():
        base = own(x).logits
        own.ivp_gate.fill_(0.3)
        for p in own.ivp_refine.mlp.parameters():
            p.mul_(50.0)
        own.ivp_classifier.weight.mul_(1000.0)  # a readout grown by memorising training slides
        moved = own(x).logits - base
        token = own.instance_tokens(own.project(x), None).mean(0)
        cosine = torch.nn.functional.cosine_similarity(own.ivp_classifier.weight, token[None], dim=-1)
    torch.testing.assert_close(moved, 0.3 * cosine)
    assert float(moved.abs().max()) <= 0.3 + 1e-6 and float(moved.abs().max()) > 0.05
    assert own.ivp_classifier.bias is None  # a cosine has no offset (it would be unbounded)

    torch.manual_seed(0)
    second = create_head(HeadConfig(head="pathotune", in_dim=8, n_classes=3, dim=16, n_heads=2, prompts=("ivp",),
                                    ivp_in_dim=5)).eval()
    ivp = torch.randn(40, 5)
    with torch.no_grad():
        base = second(x, ivp).logits
        second.ivp_gate.fill_(0.3)
        token = second.instance_tokens(second.project(x), ivp).mean(0)
        torch.testing.assert_close(second(x, ivp).logits - base, 0.3 * second.ivp_classifier(token))
        second.ivp_classifier.weight.mul_(1000.0)
        assert float((second(x, ivp).logits - base).abs().max()) > 10.0  # linear: not bounded by the gate


def test_cross_attention_is_linear_in_bag_size():
    cfg = HeadConfig(head="pathotune", in_dim=8, n_classes=2, dim=16, n_heads=2, prompts=("tvp", "ivp"))
    model = create_head(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(100_000, 8))  # a 100k-patch bag: [N, K] attention, never [N, N]
    assert out.attention.shape == (100_000,) and np.isclose(float(out.attention.sum()), 1.0, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head": "pathotune"}, "at least one prompt kind"),
        ({"head": "abmil", "prompts": ("tvp",)}, "prompts are a pathotune option"),
        ({"head": "pathotune", "prompts": ("ttp",)}, "need text_dim"),
        ({"head": "pathotune", "prompts": ("xyz",)}, "unknown prompt kinds"),
        ({"head": "transmil"}, "unknown head"),
    ],
)
def test_bad_head_configs_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HeadConfig(in_dim=8, n_classes=2, **kwargs)


def test_dropout_matches_torch_semantics_and_seed():
    from wsitools.mil.heads import Dropout

    x = torch.rand(400, 250) + 0.5  # no zeros of its own
    drop = Dropout(0.25)
    torch.manual_seed(3)
    y = drop(x)
    zeroed = (y == 0).float().mean().item()
    assert abs(zeroed - 0.25) < 0.01  # 100k draws: the sd of the fraction is 0.0014
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    torch.manual_seed(3)
    torch.testing.assert_close(drop(x), y)  # the same seed gives the same mask
    x.requires_grad_(True)
    drop(x).sum().backward()
    torch.testing.assert_close(torch.unique(x.grad), torch.tensor([0.0, 1 / 0.75]))
    drop.eval()
    assert drop(x) is x
    with pytest.raises(ModelError, match="dropout"):
        Dropout(1.0)


def test_gated_attention_uses_tanh_times_sigmoid():
    from wsitools.mil.heads import GatedAttentionPool

    torch.manual_seed(0)
    pool = GatedAttentionPool(16, 8)
    h = torch.randn(50, 16) * 3
    v, u = pool.vu(h).split(8, dim=-1)
    expected = torch.softmax(pool.w(torch.tanh(v) * torch.sigmoid(u)).squeeze(-1), dim=-1)
    torch.testing.assert_close(pool.weights(h), expected, rtol=1e-5, atol=1e-7)

"""The custom dynamics are pure: Reverse, Checkpointed and Forward give the same meta-gradient."""
from __future__ import annotations

import pytest
import torch
from learners_tasks import grads_of, image_episodes, regression_episodes

from bilevel.hypergrad import from_string

from learners.hyper_repr import HyperRepr
from learners.meta_curvature import MetaCurvature
from learners.meta_lstm import MetaLSTM
from learners.meta_sgd import MetaSGD

TINY = {"example_shape": [1], "ways": None, "backbone": "mlp", "backbone_options": {"hidden": [3]}, "inner_steps": 3}
LEARNERS = [(MetaSGD, {"inner_lr": 0.05}), (MetaCurvature, {"inner_lr": 0.05}), (MetaLSTM, {"hidden_size": 2})]


@pytest.mark.parametrize(("cls", "extra"), LEARNERS, ids=[c.__name__ for c, _ in LEARNERS])
def test_reverse_checkpointed_forward_agree(gen: torch.Generator, f64: torch.dtype, cls: type, extra: dict) -> None:
    ep = regression_episodes(gen, f64)
    grads = {}
    for hypergrad in ("reverse", "checkpointed:2", "forward"):
        torch.manual_seed(0)
        m = cls(**TINY, **extra, hypergrad=from_string(hypergrad)).to(f64)
        grads[hypergrad] = grads_of(m.meta_loss(ep)[0], m)
    assert len(grads["reverse"]) == len(list(m.parameters()))
    for hypergrad in ("checkpointed:2", "forward"):
        for k, v in grads["reverse"].items():
            torch.testing.assert_close(grads[hypergrad][k], v, rtol=1e-10, atol=1e-14, msg=f"{hypergrad} {k}")


def test_hyper_repr_checkpointed_matches_reverse(gen: torch.Generator, f64: torch.dtype) -> None:
    ep = image_episodes(gen, f64, ways=3)
    grads = {}
    for hypergrad in ("reverse", "checkpointed:2"):
        torch.manual_seed(0)
        m = HyperRepr(example_shape=[1, 16, 16], ways=3, backbone_options={"filters": 2}, inner_steps=5, hypergrad=from_string(hypergrad)).to(f64)
        grads[hypergrad] = grads_of(m.meta_loss(ep)[0], m)
    for k, v in grads["reverse"].items():
        torch.testing.assert_close(grads["checkpointed:2"][k], v, rtol=1e-10, atol=1e-14, msg=k)

"""Task batching: one solve over stacked per-task params equals the loop over tasks (float64)."""
from __future__ import annotations

import pytest
import torch

import bilevel as bl
from learners_tasks import grads_of, image_episodes, regression_episodes

from learners.maml import MAML
from learners.meta_curvature import MetaCurvature
from learners.meta_lstm import MetaLSTM
from learners.meta_sgd import MetaSGD

CASES = [
    (MAML, {"inner_lr": 0.1}), (MAML, {"inner_lr": 0.1, "hypergrad": bl.FirstOrder()}),
    (MetaSGD, {"inner_lr": 0.1}), (MetaCurvature, {"inner_lr": 0.1}),
]


@pytest.mark.parametrize("kind", ["regression", "images"])
@pytest.mark.parametrize(("cls", "extra"), CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_batched_tasks_equal_the_loop(gen, f64, cls, extra, kind):
    if kind == "regression":
        ep = regression_episodes(gen, f64, b=3)
        base = {"example_shape": [1], "ways": None, "backbone_options": {"hidden": [6, 6]}, "inner_steps": 2}
    else:
        ep = image_episodes(gen, f64, b=3, ways=3)
        base = {"example_shape": [1, 16, 16], "ways": 3, "backbone_options": {"filters": 4}, "inner_steps": 2}
    out = {}
    for mode in ("never", "always"):
        torch.manual_seed(0)
        m = cls(**base, **extra, batch_tasks=mode).to(f64)
        assert m.uses_task_batching(torch.device("cpu")) == (mode == "always")
        loss, metric = m.meta_loss(ep)
        out[mode] = (loss, metric, grads_of(loss, m))
    torch.testing.assert_close(out["always"][0], out["never"][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(out["always"][1], out["never"][1])
    for k, g in out["never"][2].items():
        torch.testing.assert_close(out["always"][2][k], g, rtol=1e-9, atol=1e-12, msg=k)


def test_auto_batching_policy():
    mlp = MAML(example_shape=[1], ways=None)
    conv = MAML(example_shape=[1, 16, 16], ways=3, backbone_options={"filters": 4})
    lstm = MetaLSTM(example_shape=[1], ways=None, hidden_size=2)
    cpu = torch.device("cpu")
    assert mlp.uses_task_batching(cpu) and not conv.uses_task_batching(cpu)
    assert conv.uses_task_batching(torch.device("cuda"))
    assert not lstm.uses_task_batching(cpu) and not lstm.uses_task_batching(torch.device("cuda"))
    with pytest.raises(ValueError, match="batch_tasks must be"):
        MAML(example_shape=[1], ways=None, batch_tasks="sometimes")

"""Task-parallel meta-gradients on CPU threads equal the single-thread ones."""
from __future__ import annotations

import pytest
import torch
from learners_tasks import grads_of, image_episodes

from bilevel.parallel import TaskThreads
from bilevel.train import DataConfig, TrainConfig, fit
from learners.maml import MAML
from learners.metaoptnet import MetaOptNet


@pytest.mark.parametrize("workers,micro_batch", [(2, None), (3, None), (2, 1), (2, 2)])
@pytest.mark.parametrize("make", [
    lambda: MAML(example_shape=[1, 16, 16], ways=3, backbone_options={"filters": 4}, inner_steps=2, inner_lr=0.1),
    lambda: MetaOptNet(example_shape=[1, 16, 16], ways=3, backbone_options={"filters": 4}, head="svm"),
], ids=["maml", "metaoptnet-svm"])
def test_threads_give_the_meta_gradient_of_the_whole_meta_batch(gen, f64, make, workers, micro_batch):
    ep = image_episodes(gen, f64, b=5, ways=3, shots=2, queries=2)
    torch.manual_seed(0)
    learner = make().to(f64)
    loss, metric = learner.meta_loss(ep)
    ref = grads_of(loss, learner)
    tt = TaskThreads(learner, workers, micro_batch=micro_batch)
    try:
        for _ in range(2):  # replicas are refreshed from the learner at every call
            got_loss, got_metric, grads = tt.meta_gradient(ep)
            torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-12, atol=0)
            torch.testing.assert_close(got_metric, metric)
            for (k, _), g in zip(learner.named_parameters(), grads):
                torch.testing.assert_close(g, ref[k], rtol=1e-10, atol=1e-13, msg=k)
            with torch.no_grad():  # an outer step: the replicas must follow
                for p in learner.parameters():
                    p.add_(0.01)
            loss, metric = learner.meta_loss(ep)
            ref = grads_of(loss, learner)
    finally:
        tt.close()
    with pytest.raises(ValueError, match="workers must be"):
        TaskThreads(learner, 0)
    with pytest.raises(ValueError, match="micro_batch must be"):
        TaskThreads(learner, 2, micro_batch=0)


def test_training_with_task_threads_follows_the_same_trajectory(tmp_path):
    """Same run with 1 and 2 task threads: the trained models make the same predictions.

    (Raw parameters are not compared: Conv-4's conv biases sit before BatchNorm, so their exact
    meta-gradient is 0 and Adam turns the rounding noise of either summation order into
    different, irrelevant, bias values.)
    """
    import bilevel

    preds = {}
    for k in (1, 2):
        out = tmp_path / str(k)
        fit("maml", {"inner_lr": 0.4, "filters": 8},
            DataConfig(dataset="glyphs", ways=3, shots=1, queries=2, meta_batch=4),
            TrainConfig(iterations=4, val_every=4, val_episodes=2, test_episodes=2, out=str(out),
                        progress=False, tensorboard=False, task_threads=k, threads=2))
        x = torch.linspace(0, 1, 6 * 28 * 28).reshape(6, 1, 28, 28)
        preds[k] = bilevel.load(out / "model.pt").predict(x[:3], torch.tensor([0, 1, 2]), x[3:])
    torch.testing.assert_close(preds[2], preds[1], rtol=1e-4, atol=1e-5)

"""Quick start: a custom inner problem and two hypergradient strategies (the README's example)."""
import torch
import torch.nn.functional as F

import bilevel as bl

g = torch.Generator().manual_seed(0)
x_tr, x_val = torch.randn(200, 20, generator=g), torch.randn(100, 20, generator=g)
w_true = torch.randn(20, 3, generator=g)
y_tr, y_val = (x_tr @ w_true).argmax(1), (x_val @ w_true).argmax(1)


def inner_loss(params, hparams, batch):  # L(w, λ): training loss + one L2 weight per feature
    x, y = batch
    return F.cross_entropy(x @ params["W"], y) + 0.5 * (hparams["log_l2"].exp()[:, None] * params["W"] ** 2).sum()


def outer_loss(params, hparams, batch):  # E(w, λ): validation loss
    x, y = batch
    return F.cross_entropy(x @ params["W"], y)


problem = bl.BilevelProblem(inner_loss, outer_loss)
hparams = {"log_l2": torch.full((20,), -2.0, requires_grad=True)}
for strategy in (bl.Reverse(), bl.Implicit(bl.CG(maxiter=20))):
    w_T = bl.solve(problem, {"W": torch.zeros(20, 3)}, hparams, (x_tr, y_tr),
                   dynamics=bl.GradientDescent(lr=0.5), steps=300, hypergrad=strategy)
    (grad,) = torch.autograd.grad(problem.outer_loss(w_T, hparams, (x_val, y_val)), hparams["log_l2"])
    print(f"{strategy!r:35} |df/dλ| = {grad.norm():.5f}")

"""One L2 weight per input feature for logistic regression, tuned by implicit hypergradients.

A grid search can tune one shared L2 weight; hypergradients tune hundreds (64 on digits, 784 on
MNIST pixels) at the price of a few grid points (Franceschi et al. 2018, §2; Pedregosa 2016).

    python examples/hpo_l2.py                              # scikit-learn digits
    python examples/hpo_l2.py --data-root ../shared/data   # MNIST (mnist10k.npz)
    python examples/hpo_l2.py --hypergrad reverse          # unrolled instead of implicit
    python examples/hpo_l2.py --hypergrad implicit-neumann:50:0.5:tol=0.01

Adapt: change the penalty in ``inner_loss``; anything in ``hparams`` that requires grad is tuned.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl
from bilevel import hpo


def parse_strategy(text):  # parsed by bilevel's one strategy grammar; argparse shows its message
    try:
        return bl.hypergrad.from_string(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data-root", default=None, help="folder with mnist10k.npz (default: scikit-learn digits)")
parser.add_argument("--out", default="runs/example-hpo-l2")
parser.add_argument("--hypergrad", type=parse_strategy, default="implicit-cg:300:0.001:tol=0.01:warm-start",
                    help="implicit-cg:K[:STOP][:tol=X][:warm-start], implicit-neumann:K[:ALPHA], reverse, checkpointed:K, … "
                         "(bilevel's strategy grammar)")
parser.add_argument("--hyper-steps", type=int, default=50)
args = parser.parse_args()

gen = torch.Generator().manual_seed(0)
x, y, k = hpo.load_dataset("mnist" if args.data_root else "digits", args.data_root)
data = hpo.split_dataset(x, y, *((1000, 2000, 4000) if args.data_root else (100, 500, 1197)), generator=gen, num_classes=k)
train, val = (data.train.x, data.train.y), (data.val.x, data.val.y)
model = hpo.logistic_regression(x.shape[1], k)  # weight [K, D], bias [K]


def inner_loss(params, hparams, batch):  # L(w, λ) = CE(train) + ½ Σ_j exp(λ_j) ‖W[:, j]‖²
    inputs, labels = batch
    penalty = (hparams["log_l2"].exp() * params["weight"] ** 2).sum()
    return F.cross_entropy(functional_call(model, params, (inputs,)), labels) + 0.5 * penalty


outer_loss = hpo.cross_entropy_loss(model)  # E(w) = CE(val)
problem = bl.BilevelProblem(inner_loss, outer_loss)
dynamics = bl.HeavyBall(lr=0.5, momentum=0.9)
w0 = hpo.init_params(model, zeros=True)


def fit(log_l2, steps=300):  # the same refit scores every λ: 300 steps from w_0 = 0
    with torch.no_grad():
        return bl.solve(problem, w0, {"log_l2": log_l2}, train, dynamics=dynamics, steps=steps)


# --- 1. grid search over one shared L2 weight ---------------------------------------------------
grid = {a: hpo.evaluate(model, fit(torch.full((x.shape[1],), math.log(a))), data.val)[0] for a in torch.logspace(-6, 0, 13).tolist()}
best = min(grid, key=grid.get)
print(f"grid: best shared L2 {best:.2e}, val loss {grid[best]:.4f}")

# --- 2. per-feature L2 by hypergradient descent, starting from the grid's best -------------------
hparams = {"log_l2": torch.full((x.shape[1],), math.log(best), requires_grad=True)}
optimizer = torch.optim.Adam(hparams.values(), lr=0.1)
strategy = args.hypergrad
if isinstance(strategy, bl.Implicit):  # warm-started and certified (HOAG): 30 steps at a time until
    steps, warm, most = 30, True, 300  # ‖∇L(w_T)‖ <= tol·‖∇L(w_0)‖, then CG from the previous solution to its STOP
else:  # unrolled through all 300 steps from w_0 = 0, exactly the refit
    steps, warm, most = 300, False, None
step = hpo.HyperStep(problem, train, val, dynamics=dynamics, steps=steps, hypergrad=strategy, warm_start=warm, max_steps=most)
history, state = hpo.hyper_loop(step, step.init(hparams, optimizer, w0), args.hyper_steps, out=args.out)
if warm:  # the certificate of every hyper-step is in the log: r_opt = ‖∇L(w_T)‖/‖∇L(w_0)‖ and ‖Au − b‖/‖b‖
    print(f"residuals: optimality <= {max(r['optimality'] for r in history):.1e}, "
          f"linear solve <= {max(r['linear_residual'] for r in history):.1e} (tol {strategy.tol:g})")

# --- 3. compare on the same refit ---------------------------------------------------------------
w_grid, w_tuned = fit(torch.full((x.shape[1],), math.log(best))), fit(state.hparams["log_l2"].detach())
for name, w in (("shared L2 (grid)", w_grid), ("per-feature L2", w_tuned)):
    (va, _), (te, acc) = hpo.evaluate(model, w, data.val), hpo.evaluate(model, w, data.test)
    print(f"{name:18s} val loss {va:.4f}  test loss {te:.4f}  test accuracy {acc:.4f}")

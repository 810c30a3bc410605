"""Data hyper-cleaning: learn one weight per training example to discount corrupted labels.

Half of the training labels are flipped. The inner problem fits logistic regression to the
training loss weighted by c_i = sigmoid(λ_i) ∈ [0, 1]; the outer problem is the validation loss
(Franceschi et al. 2017, §5.1). Examples whose weight ends below 0.5 are flagged as corrupted.

    python examples/hpo_clean.py                              # scikit-learn digits
    python examples/hpo_clean.py --data-root ../shared/data   # MNIST: 4000 / 2000 / 4000

Adapt: use your model in ``inner_loss``; the per-example weights work with any per-example loss.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl
from bilevel import hpo
from bilevel.hpo.plots import plot_weight_histogram

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data-root", default=None, help="folder with mnist10k.npz (default: scikit-learn digits)")
parser.add_argument("--out", default="runs/example-hpo-clean")
parser.add_argument("--hyper-steps", type=int, default=60)
args = parser.parse_args()

gen = torch.Generator().manual_seed(0)
x, y, k = hpo.load_dataset("mnist" if args.data_root else "digits", args.data_root)
data = hpo.split_dataset(x, y, *((4000, 2000, 4000) if args.data_root else (800, 400, 597)), generator=gen, num_classes=k)
noisy_labels, corrupted = hpo.corrupt_labels(data.train.y, 0.5, k, generator=gen)
train, val = (data.train.x, noisy_labels), (data.val.x, data.val.y)
model = hpo.logistic_regression(x.shape[1], k)


def inner_loss(params, hparams, batch):  # L(w, λ) = mean_i sigmoid(λ_i) ℓ_i(w) + 5e-4 ‖W‖²
    inputs, labels = batch
    per_example = F.cross_entropy(functional_call(model, params, (inputs,)), labels, reduction="none")
    return (torch.sigmoid(hparams["logit"]) * per_example).mean() + 5e-4 * (params["weight"] ** 2).sum()


problem = bl.BilevelProblem(inner_loss, outer_loss=hpo.cross_entropy_loss(model))  # E(w) = CE(val)
dynamics = bl.HeavyBall(lr=0.5, momentum=0.9)
hparams = {"logit": torch.zeros(len(noisy_labels), requires_grad=True)}  # c_i = 0.5 to start
optimizer = torch.optim.Adam(hparams.values(), lr=0.2)
# HOAG (Pedregosa 2016): each inner run continues from the previous w_T, 30 steps at a time, until
# ‖∇L(w_T)‖ <= 0.01·‖∇L(w_0)‖ (at most 500 steps); CG, warm-started, stops at 1e-3; certified at tol=0.01
strategy = bl.hypergrad.from_string("implicit-cg:300:0.001:tol=0.01:warm-start")


def record(h):  # logged next to val_loss, from λ before each update
    c = torch.sigmoid(h["logit"]).detach()
    return {"weight_clean": c[~corrupted].mean().item(), "weight_corrupted": c[corrupted].mean().item()}


step = hpo.HyperStep(problem, train, val, dynamics=dynamics, steps=30, hypergrad=strategy, warm_start=True, max_steps=500,
                     record=record)
state0 = step.init(hparams, optimizer, hpo.init_params(model, zeros=True))  # explicit state: λ, optimizer, w_0
history, state = hpo.hyper_loop(step, state0, args.hyper_steps, out=args.out, show=("val_loss", "weight_corrupted"))

# --- test accuracy of a refit with the learned weights, against all-ones and the oracle -----------
weights = torch.sigmoid(state.hparams["logit"]).detach()
for name, c in (("baseline (all)", torch.ones_like(weights)), ("oracle (clean only)", (~corrupted).float()), ("learned", weights)):
    logit = torch.logit(c.clamp(1e-6, 1 - 1e-6))  # the same loss with fixed weights c
    with torch.no_grad():
        w = bl.solve(problem, hpo.init_params(model, zeros=True), {"logit": logit}, train, dynamics=dynamics, steps=500)
    print(f"{name:20s} test accuracy {hpo.evaluate(model, w, data.test)[1]:.4f}")
precision, recall, f1 = hpo.f1_score(weights < 0.5, corrupted)
print(f"flagging corrupted examples (weight < 0.5): precision {precision:.3f} recall {recall:.3f} F1 {f1:.3f}")
plot_weight_histogram(weights, corrupted, f"{args.out}/weights_hist.png", threshold=0.5)

"""Tune the learning rate and momentum of SGD with momentum by hypergradient descent.

λ = (log η, logit μ) parametrises the inner dynamics itself, so its hypergradient needs the whole
training trajectory: forward mode (memory flat in T; Franceschi et al. 2017, §3.2) or reverse
mode. With ``--online`` λ is updated every few steps within ONE training run (real-time HO).

    python examples/hpo_lr.py                              # scikit-learn digits, offline
    python examples/hpo_lr.py --data-root ../shared/data   # MNIST (mnist10k.npz)
    python examples/hpo_lr.py --hypergrad reverse --online
    python examples/hpo_lr.py --hypergrad truncated:25     # any unrolled strategy: checkpointed:10, …

Adapt: replace the model and ``loss``; put whatever you want tuned in ``hparams`` and read it
from the dynamics' coefficient functions.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl
from bilevel import hpo
from bilevel.hpo.plots import plot_history


def parse_strategy(text):  # parsed by bilevel's one strategy grammar; argparse shows its message
    try:
        return bl.hypergrad.from_string(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data-root", default=None, help="folder with mnist10k.npz (default: scikit-learn digits)")
parser.add_argument("--out", default="runs/example-hpo-lr")
parser.add_argument("--hypergrad", type=parse_strategy, default="forward",
                    help="forward, reverse, checkpointed:K or truncated:K (bilevel's strategy grammar)")
parser.add_argument("--online", action="store_true", help="update λ every T steps within one run of 40·T steps")
parser.add_argument("--hyper-steps", type=int, default=40)
args = parser.parse_args()
if isinstance(args.hypergrad, (bl.Implicit, bl.NoInner, bl.FirstOrder)):  # η, μ act through the dynamics only
    parser.error(f"--hypergrad {bl.hypergrad.to_string(args.hypergrad)}: use an unrolled strategy for a learning rate")

# --- data: train (inner), val (outer), test (held out) -----------------------------------------
gen = torch.Generator().manual_seed(0)
x, y, k = hpo.load_dataset("mnist" if args.data_root else "digits", args.data_root)
data = hpo.split_dataset(x, y, *((4000, 2000, 4000) if args.data_root else (800, 400, 597)), generator=gen, num_classes=k)
val = (data.val.x, data.val.y)
model = hpo.mlp(x.shape[1], 64, k)  # its parameters live in dicts: functional_call(model, params, x)
T = 20 if args.online else 100  # inner steps per hypergradient


# --- the bilevel problem: L = E = cross-entropy; λ acts through the dynamics ---------------------
def loss(params, hparams, batch):
    inputs, labels = batch
    return F.cross_entropy(functional_call(model, params, (inputs,)), labels)


problem = bl.BilevelProblem(inner_loss=loss, outer_loss=loss)
hparams = {"log_lr": torch.tensor(math.log(0.01), requires_grad=True),
           "logit_mu": torch.tensor(0.0, requires_grad=True)}  # η = 0.01, μ = 0.5: too timid
dynamics = bl.HeavyBall(lr=lambda h: h["log_lr"].exp(), momentum=lambda h: torch.sigmoid(h["logit_mu"]))
strategy = args.hypergrad  # a bilevel.Strategy object, parsed from the text once
optimizer = torch.optim.Adam(hparams.values(), lr=0.1)


def current(h):
    return {"lr": h["log_lr"].exp().item(), "momentum": torch.sigmoid(h["logit_mu"]).item()}


# --- the hyper-loop: one hypergradient step on λ per iteration; the state is explicit ------------
if not args.online:  # offline: every hyper-step trains from scratch (new w_0, new mini-batches)

    def step(it, state):
        row = current(state.hparams)
        params0 = hpo.init_params(model, generator=gen)
        batches = hpo.minibatches(data.train, 100, T, generator=gen)  # t -> B_t
        hg = bl.hypergradient(problem, params0, state.hparams, batches, val, dynamics=dynamics, steps=T, hypergrad=strategy)
        hpo.apply_hypergradient(state.optimizer, state.hparams, hg.hparams)
        return {"val_loss": hg.value.item(), **row}, state

    state0 = hpo.HyperState(hparams, optimizer)
else:  # online: one run; state.inner carries w_t (and, in forward mode, dw_t/dλ) across segments
    state0 = hpo.HyperState(hparams, optimizer, hpo.init_params(model, generator=gen))
    batches = hpo.minibatches(data.train, 100, T * args.hyper_steps, generator=gen)

    def step(it, state):
        row = current(state.hparams)
        w_t, inner = bl.solve(problem, state.inner, state.hparams, batches, dynamics=dynamics, steps=T,
                              hypergrad=strategy, return_state=True)
        value = loss(w_t, state.hparams, val)
        grads = torch.autograd.grad(value, list(state.hparams.values()))
        hpo.apply_hypergradient(state.optimizer, state.hparams, dict(zip(state.hparams, grads)))
        return {"val_loss": value.item(), **row}, state._replace(inner=inner)


history, state = hpo.hyper_loop(step, state0, args.hyper_steps, out=args.out, show=("val_loss", "lr", "momentum"))
plot_history(history, f"{args.out}/lr.png", [("learning rate", ["lr"]), ("momentum", ["momentum"]), ("val loss", ["val_loss"])])

# --- compare the initial and the tuned λ on the same fresh run -----------------------------------
for name, h in (("initial", {"log_lr": torch.tensor(math.log(0.01)), "logit_mu": torch.tensor(0.0)}),
                ("tuned", {n: v.detach() for n, v in state.hparams.items()})):
    g = torch.Generator().manual_seed(1)
    steps = T * args.hyper_steps if args.online else T
    with torch.no_grad():
        w = bl.solve(problem, hpo.init_params(model, generator=g), h, hpo.minibatches(data.train, 100, steps, generator=g),
                     dynamics=dynamics, steps=steps)
    (tr, _), (va, _) = hpo.evaluate(model, w, data.train), hpo.evaluate(model, w, data.val)
    print(f"{name:8s} lr={current(h)['lr']:.4f} momentum={current(h)['momentum']:.3f}  train loss {tr:.4f}  val loss {va:.4f}")
print(f"log and plot in {args.out}/")

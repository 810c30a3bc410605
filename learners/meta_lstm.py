"""Meta-LSTM: Optimization as a Model for Few-Shot Learning (Ravi & Larochelle, ICLR 2017).

The inner optimiser is an LSTM applied coordinate-wise to the learner's parameters θ, whose
cell state *is* θ: with the raw gradient ∇_t = ∇_θ L_support(θ_{t−1}) as candidate −c̃_t,

    θ_t = f_t ⊙ θ_{t−1} − i_t ⊙ ∇_t,
    f_t = σ(W_f · [x_t, θ_{t−1}, f_{t−1}] + b_f),   i_t = σ(W_i · [x_t, θ_{t−1}, i_{t−1}] + b_i),

where x_t is, per coordinate, either the hidden state of a first, ordinary LSTM layer (hidden
size ``hidden_size``, the paper's two-layer design) fed the preprocessed (∇̃_t, L̃_t), or
(∇̃_t, L̃_t) itself (``hidden_size=0``). The preprocessing of Andrychowicz et al. (2016, App. A)
maps a number x to the pair

    (log|x| / P, sign x)  if |x| ≥ e^{−P},   (−1, e^P x)  otherwise,   P = 10.

All coordinates share the meta-learner's weights; θ_0 (the cell's initial state) is the learner
network's learned initialisation. Biases start at b_f ~ U[4, 5] and b_i ~ U[−5, −4] so that
f ≈ 1 and i ≈ 0.01 at first (small steps that keep θ); W_f, W_i ~ U[−0.01, 0.01].

The paper ignores the second derivatives through ∇_t and L_t ("first-order"), the default
here; ``hypergrad=Reverse()`` differentiates through them too.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import bilevel as bl
from bilevel.options import option
from learners.common import GradientConfig, GradientLearner

PREPROCESS_P = 10.0
PREFIX = "meta_lstm."


def preprocess(x: Tensor, p: float = PREPROCESS_P) -> Tensor:
    """Andrychowicz et al. (2016) gradient preprocessing: x [...] -> [..., 2].

    Invariant: (log|x|/p, sign x) where |x| ≥ e^{−p}, else (−1, e^p x); continuous in the
    second component's scale and differentiable everywhere (no NaN at x = 0).
    """
    big = x.abs() >= math.exp(-p)
    magnitude = torch.where(big, torch.log(x.abs().clamp_min(math.exp(-p))) / p, torch.full_like(x, -1.0))
    direction = torch.where(big, torch.sign(x), x * math.exp(p))
    return torch.stack([magnitude, direction], dim=-1)


class MetaLSTMState(NamedTuple):
    """State of :class:`MetaLSTMDynamics`: θ_t and, flattened over all P coordinates, the last
    gates f_t, i_t [P] and the first layer's hidden and cell states [P, H] (H may be 0)."""

    params: dict[str, Tensor]
    forget: Tensor
    input: Tensor
    hidden: Tensor
    cell: Tensor


class MetaLSTMDynamics(bl.Dynamics):
    """Φ of Meta-LSTM (Ravi & Larochelle 2017, eq. (2) and §3.2), coordinate-wise.

    Invariant: ``step`` maps (θ_{t−1}, f_{t−1}, i_{t−1}, h_{t−1}, c_{t−1}) and (∇_t, L_t) to
    θ_t = f_t ⊙ θ_{t−1} − i_t ⊙ ∇_t with the gates of the module docstring; it is a pure
    function of the state, the inner gradient/loss and the hparams ``meta_lstm.*``, so every
    hypergradient strategy applies. f_0 = i_0 = 0, h_0 = c_0 = 0.

    Args:
        hidden_size: H, units of the first LSTM layer (0: gates read (∇̃, L̃) directly).
        p: the preprocessing constant P.

    Hparams (``meta_lstm.`` + name): ``weight_ih`` [4H, 4], ``weight_hh`` [4H, H], ``bias``
    [4H] (first layer, gate order i, f, g, o as ``torch.nn.LSTMCell``; absent when H = 0);
    ``w_f``, ``w_i`` [D + 2] (D = H, or 4 when H = 0: weights of x_t, θ_{t−1}, previous gate);
    ``b_f``, ``b_i`` scalars.
    """

    def __init__(self, hidden_size: int, p: float = PREPROCESS_P) -> None:
        self.hidden_size = int(hidden_size)
        self.p = float(p)

    def init(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> MetaLSTMState:
        ref = next(iter(params.values()))
        n = sum(v.numel() for v in params.values())
        z = torch.zeros(n, dtype=ref.dtype, device=ref.device)
        zh = torch.zeros(n, self.hidden_size, dtype=ref.dtype, device=ref.device)
        return MetaLSTMState(dict(params), z, z, zh, zh)

    def step(self, state: MetaLSTMState, grads: dict[str, Tensor], hparams: dict[str, Tensor], *, t: int, loss: Tensor) -> MetaLSTMState:
        w = state.params
        theta = torch.cat([v.reshape(-1) for v in w.values()])
        g = torch.cat([grads[k].reshape(-1) for k in w])
        x = torch.cat([preprocess(g, self.p), preprocess(loss.reshape(1), self.p).expand(g.shape[0], 2)], dim=1)  # [P, 4]
        h, c = state.hidden, state.cell
        if self.hidden_size:
            gates = x @ hparams[PREFIX + "weight_ih"].T + h @ hparams[PREFIX + "weight_hh"].T + hparams[PREFIX + "bias"]
            gi, gf, gg, go = gates.chunk(4, dim=1)
            c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
            h = torch.sigmoid(go) * torch.tanh(c)
            x = h
        d = x.shape[1]
        w_f, w_i = hparams[PREFIX + "w_f"], hparams[PREFIX + "w_i"]
        f = torch.sigmoid(x @ w_f[:d] + theta * w_f[d] + state.forget * w_f[d + 1] + hparams[PREFIX + "b_f"])
        i = torch.sigmoid(x @ w_i[:d] + theta * w_i[d] + state.input * w_i[d + 1] + hparams[PREFIX + "b_i"])
        new = f * theta - i * g
        params, start = {}, 0
        for k, v in w.items():
            params[k] = new[start : start + v.numel()].reshape(v.shape)
            start += v.numel()
        return MetaLSTMState(params, f, i, h, c)


class MetaLSTMOptimizer(nn.Module):
    """The meta-learner's weights (see :class:`MetaLSTMDynamics` for their roles and shapes)."""

    def __init__(self, hidden_size: int, forget_bias: Sequence[float] = (4.0, 5.0), input_bias: Sequence[float] = (-5.0, -4.0)) -> None:
        super().__init__()
        h = int(hidden_size)
        d = h if h else 4
        if h:
            bound = 1.0 / math.sqrt(h)
            self.weight_ih = nn.Parameter(torch.empty(4 * h, 4).uniform_(-bound, bound))
            self.weight_hh = nn.Parameter(torch.empty(4 * h, h).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(4 * h).uniform_(-bound, bound))
        self.w_f = nn.Parameter(torch.empty(d + 2).uniform_(-0.01, 0.01))
        self.w_i = nn.Parameter(torch.empty(d + 2).uniform_(-0.01, 0.01))
        self.b_f = nn.Parameter(torch.empty(()).uniform_(*forget_bias))
        self.b_i = nn.Parameter(torch.empty(()).uniform_(*input_bias))


@dataclass(frozen=True)
class MetaLSTMConfig(GradientConfig):
    """Meta-LSTM's options (no inner step size: the step sizes are the learned input gates)."""

    hidden_size: int = option(20, help="Units H of the first LSTM layer (0 feeds the preprocessed gradient and "
                              "loss straight to the gates).", min=0, paper="Ravi & Larochelle 2017: 20")
    inner_steps: int = option(5, help="Inner steps T at training time (the input gates start at i ≈ 0.01).", min=1)
    hypergrad: bl.Strategy = option(bl.FirstOrder(), help="Hypergradient strategy (paper: first-order; reverse is exact).")


class MetaLSTM(GradientLearner):
    """Meta-LSTM (Ravi & Larochelle 2017): an LSTM meta-learner as the inner optimiser.

    Invariant: w_0 = θ (the network's parameters), w_t = Φ_t(w_{t−1}) with Φ the LSTM update of
    :class:`MetaLSTMDynamics`; the meta-loss gradient reaches θ and the LSTM's weights. With
    the default ``hypergrad=FirstOrder()`` the inputs ∇_t, L_t are constants (the paper's
    choice); ``Reverse()`` is exact. Options: :class:`MetaLSTMConfig`.
    """

    Config = MetaLSTMConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.meta_lstm = MetaLSTMOptimizer(self.config.hidden_size)

    # the gates read each task's own loss L_t: run tasks one by one
    supports_task_batching = False

    def hparams(self) -> dict[str, Tensor]:
        return {PREFIX + k: v for k, v in self.meta_lstm.named_parameters()}

    def dynamics(self) -> bl.Dynamics:
        return MetaLSTMDynamics(self.config.hidden_size)


__all__ = ["MetaLSTM", "MetaLSTMConfig", "MetaLSTMDynamics", "MetaLSTMOptimizer", "MetaLSTMState", "preprocess"]

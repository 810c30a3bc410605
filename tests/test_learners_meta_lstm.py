"""Meta-LSTM: preprocessing, gates at initialisation, the update rule, and the meta-gradient."""
from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from learners_tasks import directional_fd, dot, grads_of, mlp_forward, random_direction, regression_episodes

from learners.meta_lstm import MetaLSTM, MetaLSTMDynamics, preprocess

TINY = {"example_shape": [1], "ways": None, "backbone": "mlp", "backbone_options": {"hidden": [3]}}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_preprocess_values_and_gradient(f64: torch.dtype) -> None:
    x = torch.tensor([1.0, -100.0, 1e-6, 0.0, -math.exp(-10.0)], dtype=f64, requires_grad=True)
    out = preprocess(x)
    want = torch.tensor([[0.0, 1.0], [math.log(100.0) / 10, -1.0], [-1.0, 1e-6 * math.exp(10.0)], [-1.0, 0.0],
                         [-1.0, -1.0]], dtype=f64)
    torch.testing.assert_close(out.detach(), want, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert bool(torch.isfinite(g).all())
    # d/dx log|x|/10 = 1/(10x) on the large branch, e^10 on the small one
    torch.testing.assert_close(g[:4], torch.tensor([0.1, -0.001, math.exp(10.0), math.exp(10.0)], dtype=f64), rtol=1e-12, atol=0)


def test_gates_at_initialisation(gen: torch.Generator, f64: torch.dtype) -> None:
    torch.manual_seed(0)
    m = MetaLSTM(**TINY, hidden_size=20).to(f64)
    assert 4.0 <= m.meta_lstm.b_f.item() <= 5.0 and -5.0 <= m.meta_lstm.b_i.item() <= -4.0
    assert m.meta_lstm.w_f.abs().max().item() <= 0.01 and tuple(m.meta_lstm.w_f.shape) == (22,)
    params = {k: v.detach() for k, v in m.net.named_parameters()}
    grads = {k: torch.randn(v.shape, generator=gen, dtype=f64) for k, v in params.items()}
    dyn = MetaLSTMDynamics(20)
    hp = {k: v.detach() for k, v in m.hparams().items()}
    s1 = dyn.step(dyn.init(params, hp), grads, hp, t=1, loss=torch.tensor(0.7, dtype=f64))
    # |W·[h, θ, 0]| ≤ 0.01 (20 + max|θ|): the gates stay within a hair of σ(b)
    slack = 0.01 * (20 + max(float(v.abs().max()) for v in params.values()))
    lo_f, hi_f = _sigmoid(m.meta_lstm.b_f.item() - slack), _sigmoid(m.meta_lstm.b_f.item() + slack)
    assert lo_f <= float(s1.forget.min()) and float(s1.forget.max()) <= hi_f and lo_f > 0.97
    lo_i, hi_i = _sigmoid(m.meta_lstm.b_i.item() - slack), _sigmoid(m.meta_lstm.b_i.item() + slack)
    assert lo_i <= float(s1.input.min()) and float(s1.input.max()) <= hi_i and hi_i < 0.03
    assert s1.hidden.shape == (sum(v.numel() for v in params.values()), 20)


def test_update_rule_by_hand(f64: torch.dtype) -> None:
    """hidden_size = 0: f = σ(w_f · [∇̃, L̃, θ, f_prev] + b_f), θ' = f θ − i ∇, two steps by hand."""
    dyn = MetaLSTMDynamics(0)
    w_f = [0.1, -0.2, 0.3, 0.05, 0.5, 0.7]
    w_i = [-0.1, 0.2, 0.1, -0.3, 0.25, 0.6]
    hp = {"meta_lstm.w_f": torch.tensor(w_f, dtype=f64), "meta_lstm.w_i": torch.tensor(w_i, dtype=f64),
          "meta_lstm.b_f": torch.tensor(2.0, dtype=f64), "meta_lstm.b_i": torch.tensor(-1.0, dtype=f64)}
    theta, g, loss = [0.5, -1.0], [2.0, 1e-6], 3.0

    def prep(x: float) -> tuple[float, float]:
        return (math.log(abs(x)) / 10, math.copysign(1.0, x)) if abs(x) >= math.exp(-10) else (-1.0, x * math.exp(10))

    state = dyn.init({"w": torch.tensor(theta, dtype=f64)}, hp)
    f_prev, i_prev = [0.0, 0.0], [0.0, 0.0]
    for t, grad in ((1, g), (2, [-0.5, 4.0])):
        state = dyn.step(state, {"w": torch.tensor(grad, dtype=f64)}, hp, t=t, loss=torch.tensor(loss, dtype=f64))
        want_theta, want_f, want_i = [], [], []
        for c in range(2):
            x = [*prep(grad[c]), *prep(loss)]
            f = _sigmoid(sum(a * b for a, b in zip(w_f, [*x, theta[c], f_prev[c]])) + 2.0)
            i = _sigmoid(sum(a * b for a, b in zip(w_i, [*x, theta[c], i_prev[c]])) - 1.0)
            want_theta.append(f * theta[c] - i * grad[c])
            want_f.append(f)
            want_i.append(i)
        theta, f_prev, i_prev = want_theta, want_f, want_i
        torch.testing.assert_close(state.params["w"], torch.tensor(theta, dtype=f64), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(state.forget, torch.tensor(f_prev, dtype=f64), rtol=1e-13, atol=1e-15)


def test_first_layer_is_an_lstm_cell(gen: torch.Generator, f64: torch.dtype) -> None:
    """With H > 0 the gates read the hidden state of torch.nn.LSTMCell fed (∇̃, L̃)."""
    torch.manual_seed(0)
    m = MetaLSTM(**TINY, hidden_size=5).to(f64)
    cell = torch.nn.LSTMCell(4, 5).to(f64)
    with torch.no_grad():
        cell.weight_ih.copy_(m.meta_lstm.weight_ih)
        cell.weight_hh.copy_(m.meta_lstm.weight_hh)
        cell.bias_ih.copy_(m.meta_lstm.bias)
        cell.bias_hh.zero_()
    params = {k: v.detach() for k, v in m.net.named_parameters()}
    hp = {k: v.detach() for k, v in m.hparams().items()}
    dyn = MetaLSTMDynamics(5)
    state = dyn.init(params, hp)
    h = c = torch.zeros(state.hidden.shape, dtype=f64)
    for t in (1, 2):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=f64) for k, v in params.items()}
        loss = torch.tensor(0.3 * t, dtype=f64)
        theta = torch.cat([v.reshape(-1) for v in state.params.values()])
        g = torch.cat([v.reshape(-1) for v in grads.values()])
        f_prev = state.forget
        state = dyn.step(state, grads, hp, t=t, loss=loss)
        x = torch.cat([preprocess(g), preprocess(loss).expand(g.shape[0], 2)], 1)
        h, c = cell(x, (h, c))
        w_f = m.meta_lstm.w_f.detach()
        f = torch.sigmoid(h @ w_f[:5] + theta * w_f[5] + f_prev * w_f[6] + m.meta_lstm.b_f.detach())
        torch.testing.assert_close(state.hidden, h, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.forget, f, rtol=1e-12, atol=1e-14)


def test_reverse_meta_gradient_matches_finite_differences(gen: torch.Generator, f64: torch.dtype) -> None:
    ep = regression_episodes(gen, f64)
    torch.manual_seed(0)
    m = MetaLSTM(**TINY, hidden_size=4, inner_steps=3, hypergrad=bl.Reverse()).to(f64)
    with torch.no_grad():  # livelier gates so that every weight matters
        m.meta_lstm.b_i.fill_(-1.0)
        m.meta_lstm.w_f.mul_(30)
        m.meta_lstm.w_i.mul_(30)
    direction = random_direction(m, gen)
    grads = grads_of(m.meta_loss(ep)[0], m)
    assert all(float(g.abs().max()) > 0 for g in grads.values())
    analytic = dot(grads, direction)
    assert analytic == pytest.approx(directional_fd(lambda: m.meta_loss(ep)[0], m, direction), rel=1e-6)


def test_first_order_meta_gradient_matches_manual_unroll(gen: torch.Generator, f64: torch.dtype) -> None:
    """Ravi & Larochelle's gradient: ∇_t and L_t are constants, everything else is differentiated."""
    ep = regression_episodes(gen, f64, b=1)
    torch.manual_seed(0)
    m = MetaLSTM(**TINY, hidden_size=0, inner_steps=2).to(f64)
    assert m.config.hypergrad == bl.FirstOrder() and m.config.hidden_size == 0
    got = grads_of(m.meta_loss(ep)[0], m)
    lstm = m.meta_lstm
    theta = dict(m.net.named_parameters())
    keys = list(theta)
    flat = torch.cat([v.reshape(-1) for v in theta.values()])
    f_prev = i_prev = torch.zeros_like(flat)
    for _ in range(2):
        w = dict(zip(keys, torch.split(flat, [v.numel() for v in theta.values()])))
        w = {k: v.reshape(theta[k].shape) for k, v in w.items()}
        w_const = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        inner = ((mlp_forward(w_const, ep.support_x[0]) - ep.support_y[0]) ** 2).mean()
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(inner, list(w_const.values()))])
        x = torch.cat([preprocess(g), preprocess(inner.detach()).expand(g.shape[0], 2)], 1)
        f = torch.sigmoid(x @ lstm.w_f[:4] + flat * lstm.w_f[4] + f_prev * lstm.w_f[5] + lstm.b_f)
        i = torch.sigmoid(x @ lstm.w_i[:4] + flat * lstm.w_i[4] + i_prev * lstm.w_i[5] + lstm.b_i)
        flat, f_prev, i_prev = f * flat - i * g, f, i
    w = {k: v.reshape(theta[k].shape) for k, v in zip(keys, torch.split(flat, [v.numel() for v in theta.values()]))}
    want = grads_of(((mlp_forward(w, ep.query_x[0]) - ep.query_y[0]) ** 2).mean(), m)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-14, msg=k)


def test_bad_options_and_config_round_trip() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        MetaLSTM(**TINY, hidden_size=-1)
    with pytest.raises(ValueError, match="MetaLSTM has no option 'inner_lr'"):
        MetaLSTM(**TINY, inner_lr=0.1)
    m = MetaLSTM(**TINY, hidden_size=3)
    assert not hasattr(m.config, "inner_lr") and m.config.inner_steps == 5
    rebuilt = type(m).from_json(m.to_json())
    rebuilt.load_state_dict(m.state_dict())
    assert rebuilt.meta_lstm.weight_hh.shape == (12, 3)

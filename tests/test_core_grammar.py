"""The strategy grammar: ``from_string`` and its inverse ``str`` / ``to_string`` (issue 12, part 3)."""
from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.hypergrad import GRAMMAR, from_string, to_string

# (text, strategy): str(strategy) == text is the canonical form, and from_string(text) == strategy
CANONICAL = [
    ("reverse", bl.Reverse()),
    ("first-order", bl.FirstOrder()),
    ("no-inner", bl.NoInner()),
    ("forward", bl.Forward()),
    ("forward:chunk=8", bl.Forward(chunk_size=8)),
    ("forward:max-memory=none", bl.Forward(max_memory=None)),
    ("forward:chunk=1:max-memory=2GiB", bl.Forward(chunk_size=1, max_memory=2 * 1024**3)),
    ("forward:max-memory=1000", bl.Forward(max_memory=1000)),
    ("truncated:4", bl.Truncated(4)),
    ("checkpointed:10", bl.Checkpointed(10)),
    ("implicit-cg:30", bl.Implicit(bl.CG(maxiter=30))),
    ("implicit-cg:30:1e-12", bl.Implicit(bl.CG(maxiter=30, tol=1e-12))),
    ("implicit-cg:100", bl.Implicit()),
    ("implicit-neumann:50:0.5", bl.Implicit(bl.Neumann(maxiter=50, alpha=0.5))),
    ("implicit-neumann:50:0.1", bl.Implicit(bl.Neumann(maxiter=50))),
    ("implicit-fixed-point:200", bl.Implicit(bl.FixedPoint(maxiter=200))),
    ("implicit-fixed-point:200:0.0", bl.Implicit(bl.FixedPoint(maxiter=200, tol=0.0))),
    ("implicit-exact", bl.Implicit(bl.Exact())),
    ("implicit-exact:500", bl.Implicit(bl.Exact(max_size=500))),
    ("implicit-cg:30:tol=0.0001", bl.Implicit(bl.CG(30), tol=1e-4)),
    ("implicit-cg:30:tol=0.0001:on-inexact=raise", bl.Implicit(bl.CG(30), tol=1e-4, on_inexact="raise")),
    ("implicit-cg:10:warm-start", bl.Implicit(bl.CG(10), warm_start=True)),
    ("implicit-neumann:20:0.3:atol=1e-08:on-inexact=ignore:warm-start",
     bl.Implicit(bl.Neumann(20, 0.3), atol=1e-8, on_inexact="ignore", warm_start=True)),
]


@pytest.mark.parametrize("text,strategy", CANONICAL, ids=[t for t, _ in CANONICAL])
def test_canonical_text_round_trips(text, strategy):
    assert str(strategy) == text
    assert to_string(strategy) == text
    parsed = from_string(text)
    assert parsed == strategy and type(parsed) is type(strategy)
    assert from_string(str(parsed)) == parsed


# other spellings that parse to the same strategies (legacy forms, case, spaces, byte units)
ALIASES = [
    ("implicit", bl.Implicit(bl.CG(maxiter=20))),
    ("implicit-neumann:50", bl.Implicit(bl.Neumann(maxiter=50, alpha=0.1))),
    (" Reverse ", bl.Reverse()),
    ("FORWARD:Max-Memory=512M", bl.Forward(max_memory=512 * 1024**2)),
    ("forward:max-memory=2g", bl.Forward(max_memory=2 * 1024**3)),
    ("forward:max-memory=auto", bl.Forward()),
    ("implicit-cg:30:tol=1e-4", bl.Implicit(bl.CG(30), tol=1e-4)),
    ("implicit:warm-start", bl.Implicit(bl.CG(20), warm_start=True)),
]


@pytest.mark.parametrize("text,strategy", ALIASES, ids=[t for t, _ in ALIASES])
def test_other_spellings(text, strategy):
    assert from_string(text) == strategy
    assert from_string(str(from_string(text))) == strategy


ERRORS = [
    ("revers", r"unknown hypergradient 'revers'"),
    ("truncated", r"truncated needs K, e.g. truncated:10"),
    ("truncated:0", r"Truncated\(k\) needs an integer k >= 1, got 0"),
    ("truncated:four", r"K must be an integer, got 'four'"),
    ("checkpointed:3:4", r"checkpointed takes at most 1 argument"),
    ("reverse:3", r"reverse takes at most 0 argument"),
    ("forward:chunk=0", r"chunk_size=\.\.\.\) must be None or an integer >= 1, got 0"),
    ("forward:chunk=x", r"chunk must be an integer, got 'x'"),
    ("forward:max-memory=lots", r"max-memory: 'lots' is not a number of bytes"),
    ("forward:8", r"forward takes at most 0 argument"),
    ("implicit-cg", r"implicit-cg needs MAXITER"),
    ("implicit-cg:abc", r"MAXITER must be an integer, got 'abc'"),
    ("implicit-neumann:10:-1", r"Neumann alpha must be a finite number > 0"),
    ("implicit-gmres:10", r"unknown linear solver 'gmres'"),
    ("implicit-cg:10:tol=x", r"tol must be a number, got 'x'"),
    ("implicit-cg:10:on-inexact=shout", r"on-inexact must be one of warn, raise, ignore, got 'shout'"),
    ("implicit-cg:10:colour=red", r"unknown option 'colour' for implicit-cg \(options: tol, atol, on-inexact, warm-start\)"),
    ("implicit-cg:10:tol=1:tol=2", r"option 'tol' given twice"),
    ("implicit-cg:tol=1e-3:10", r"the argument '10' comes after an option"),
    ("implicit-cg:10:warm-start=yes", r"warm-start is a flag without a value"),
    ("implicit-cg:10:", r"an empty ':'-separated part"),
    ("reverse:chunk=2", r"unknown option 'chunk' for reverse \(options: none\)"),
    ("Implicit(CG(maxiter=20, tol=1e-10), condition=...)", r"looks like the repr of a strategy object.*Python callable"),
]


@pytest.mark.parametrize("text,message", ERRORS, ids=[t for t, _ in ERRORS])
def test_parse_errors_name_the_problem_and_list_the_grammar(text, message):
    with pytest.raises(ValueError, match=message) as e:
        from_string(text)
    assert f"hypergradient {text!r}" in str(e.value)
    assert str(e.value).endswith("Grammar: " + GRAMMAR)


def test_the_grammar_lists_every_form():
    for form in ("reverse", "first-order", "no-inner", "truncated:K", "checkpointed:K", "forward[:chunk=N]",
                 "max-memory=auto|none|BYTES", "implicit-cg:MAXITER", "implicit-neumann:MAXITER[:ALPHA]",
                 "implicit-fixed-point:MAXITER", "implicit-exact[:MAX_SIZE]", "on-inexact=warn|raise|ignore",
                 ":warm-start", ":tol=X", ":atol=X"):
        assert form in GRAMMAR, form


def test_non_string_input():
    with pytest.raises(TypeError, match="a strategy string is expected, got Reverse"):
        from_string(bl.Reverse())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a Strategy is expected, got str"):
        to_string("reverse")  # type: ignore[arg-type]


def _condition(p, h, b):
    return p


class _MySolver(bl.CG):
    pass


class _MyStrategy(bl.Reverse):
    pass


@pytest.mark.parametrize(
    "strategy,reason",
    [
        (bl.Implicit(bl.CG(5), condition=_condition), r"holds a Python callable \(condition=\.\.\.\)"),
        (bl.Implicit(bl.CG(5), batch=(torch.zeros(2),)), r"holds data \(batch=\.\.\.\)"),
        (bl.Implicit(_MySolver(5)), r"its linear solver _MySolver is not one of CG, Neumann, FixedPoint, Exact"),
        (_MyStrategy(), r"_MyStrategy is not a built-in strategy with a text form"),
    ],
    ids=["condition", "batch", "custom-solver", "custom-class"],
)
def test_strategies_without_a_text_form(strategy, reason):
    text = str(strategy)  # str still works (repr-like) ...
    assert text
    with pytest.raises(ValueError, match=r"cannot be written as text: (it )?" + reason):
        to_string(strategy)  # ... but it cannot be saved
    if isinstance(strategy, bl.Implicit):
        assert text == repr(strategy) and text.startswith("Implicit(")
        with pytest.raises(ValueError, match="looks like the repr of a strategy object"):
            from_string(text)


def test_linear_solvers_have_text_forms():
    assert [str(s) for s in (bl.CG(30), bl.CG(30, 1e-6), bl.Neumann(50, 0.5), bl.FixedPoint(7), bl.Exact())] == [
        "cg:30", "cg:30:1e-06", "neumann:50:0.5", "fixed-point:7", "exact"]
    for s in (bl.CG(30, 1e-6), bl.Neumann(5, 2.0), bl.FixedPoint(7, 1e-3), bl.Exact(10)):
        assert from_string(f"implicit-{s}").solver == s


def test_repr_is_unchanged_for_the_existing_forms():
    """repr stays the Python form (hpo records it in metrics.json); the new options appear only when set."""
    assert repr(bl.Implicit(bl.CG(maxiter=7))) == "Implicit(CG(maxiter=7, tol=1e-10))"
    assert repr(bl.Implicit(bl.CG(7), tol=1e-4, warm_start=True)) == "Implicit(CG(maxiter=7, tol=1e-10), tol=0.0001, warm_start=True)"
    assert repr(bl.Forward()) == "Forward(chunk_size=None)"
    assert repr(bl.Forward(chunk_size=4, max_memory=None)) == "Forward(chunk_size=4, max_memory=None)"
    assert repr(bl.Truncated(3)) == "Truncated(k=3)"

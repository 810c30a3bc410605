"""Griffe extension: the project's docstrings, rendered as Markdown by mkdocstrings.

The docstrings follow the Google style with a few reStructuredText habits (CONTRIBUTING.md,
"Docstrings"). Before mkdocstrings parses a docstring, this extension rewrites those habits into
what its Markdown renderer understands, without changing their meaning:

* ``:func:`name``` (and ``:class:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``, ``:exc:``,
  ``:obj:``) become optional cross-references: a link where the object is on the site, plain
  code otherwise. ``~`` shortens the title to the last component, as in Sphinx.
* ``a, b: text`` in an ``Args:`` / ``Attributes:`` section (several parameters sharing one
  description) becomes one entry per name, so that the strict build still checks every name
  against the signature.
* reStructuredText simple tables (``====  ====`` rules, continuation rows with an empty first
  cell) become Markdown tables; a paragraph ending in ``::`` ends in ``:``.

Loaded from ``mkdocs.yml`` (``extensions: [docs/_ext/griffe_rst.py]``); never imported by the
package.
"""
from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|exc|obj):`(~?)([^`<>]+?)(?:\(\))?`")
SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Attributes|Other Parameters|Keyword Args):\s*$")
GROUPED = re.compile(r"^(\s+)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)(\s*\([^)]*\))?:(\s.*|)$")
RULE = re.compile(r"^\s*=+(?:\s+=+)+\s*$")


def _roles(text: str, obj: Object) -> str:
    def link(m: re.Match[str]) -> str:
        short, target = m.group(2) == "~", m.group(3).strip()
        title = target.rsplit(".", 1)[-1] if short else target
        try:
            ident = obj.resolve(target) if "." not in target else target
        except Exception:  # noqa: BLE001 - an unresolvable name is shown as code, never a failure
            ident = target
        return f'<autoref identifier="{ident}" optional><code>{title}</code></autoref>'

    return ROLE.sub(link, text)


def _grouped_params(lines: list[str]) -> list[str]:
    out: list[str] = []
    in_section, section_indent = False, 0
    i = 0
    while i < len(lines):
        line = lines[i]
        head = SECTION.match(line)
        if head:
            in_section, section_indent = True, len(head.group(1))
            out.append(line)
            i += 1
            continue
        if in_section and line.strip() and len(line) - len(line.lstrip()) <= section_indent:
            in_section = False
        m = GROUPED.match(line) if in_section else None
        if not m:
            out.append(line)
            i += 1
            continue
        indent, names, kind, desc = m.group(1), m.group(2), m.group(3) or "", m.group(4)
        cont = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            if not lines[i].strip() and (i + 1 >= len(lines) or len(lines[i + 1]) - len(lines[i + 1].lstrip()) <= len(indent)):
                break
            cont.append(lines[i])
            i += 1
        for name in (n.strip() for n in names.split(",")):
            out.append(f"{indent}{name}{kind}:{desc}")
            out.extend(cont)
    return out


def _tables(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not RULE.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        rule = lines[i]
        spans = [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]
        end = i + 1
        rules = [i]
        while end < len(lines) and len(rules) < 3:
            if RULE.match(lines[end]):
                rules.append(end)
            elif not lines[end].strip():
                break
            end += 1
        if len(rules) < 3:  # not a complete simple table: leave it as it is
            out.append(lines[i])
            i += 1
            continue

        def cells(line: str) -> list[str]:
            bounds = [s for s, _ in spans[1:]] + [None]
            return [line[s:e].strip() if e is not None else line[s:].strip() for (s, _), e in zip(spans, bounds)]

        header = [cells(l) for l in lines[rules[0] + 1:rules[1]]]
        rows: list[list[str]] = []
        for l in lines[rules[1] + 1:rules[2]]:
            c = cells(l)
            if rows and not c[0]:
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], c)]
            else:
                rows.append(c)
        head = header[0] if header else [""] * len(spans)
        out.append("")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(spans))
        out.extend("| " + " | ".join(r) + " |" for r in rows)
        out.append("")
        i = rules[2] + 1
    return out


def _literal_blocks(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.rstrip().endswith("::") and not line.strip().startswith(">>>"):
            stripped = line.rstrip()[:-2].rstrip()
            out.append(stripped + ":" if stripped.strip() else "")
        else:
            out.append(line)
    return out


class RstToMarkdown(Extension):
    """Rewrite the docstrings' reStructuredText habits into Markdown before mkdocstrings parses them."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        self._rewrite(obj)

    def on_package(self, *, pkg: Object, **kwargs: Any) -> None:
        """The root package itself (``on_object`` covers its members)."""
        self._rewrite(pkg)

    @staticmethod
    def _rewrite(obj: Object) -> None:
        doc = obj.docstring
        if doc is None or obj.is_alias:
            return
        lines = _grouped_params(doc.value.splitlines())
        lines = _literal_blocks(_tables(lines))
        doc.value = _roles("\n".join(lines), obj)

"""`{placeholder}` templates for prompts, output keys and references.

Names are looked up verbatim in a dict of strings; nothing is ever evaluated, so `{0.__class__}` or
`{x[0]}` is just a name that no column has.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping

_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template is malformed or names a placeholder that has no value."""


def placeholders(template: str) -> list[str]:
    """The placeholder names in `template`, in order, or TemplateError when it is malformed."""
    return [name for _, name in _parse(template) if name is not None]


@functools.lru_cache(maxsize=1024)  # a manifest's rows mostly share their templates: each is parsed once
def _parse(template: str) -> tuple[tuple[str, str | None], ...]:
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError:
        raise TemplateError("has an unbalanced '{' or '}': write {{ or }} for a literal brace") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.strip():
            raise TemplateError("has an empty placeholder {}: put a column name inside the braces")
        if spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise TemplateError(f"placeholder {{{shown}}} has a format or conversion: write just {{{name}}}")
    return tuple((literal, name) for literal, name, _, _ in parts)


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill `template` from `values`; a name `values` lacks raises TemplateError."""
    out = []
    for literal, name in _parse(template):
        out.append(literal)
        if name is not None:
            if name not in values:
                raise TemplateError(f"placeholder {{{name}}} is not a column or variable")
            out.append(values[name])
    return "".join(out)

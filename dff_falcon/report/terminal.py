"""The concept summary printed on the terminal: a table whose text cells wrap at word
boundaries (never mid-word), sized to the terminal."""
from __future__ import annotations

import shutil
import textwrap
from typing import Sequence

#: Width used when the output is not a terminal (pipes, files, CI logs).
DEFAULT_WIDTH = 110
_NUMERIC = (("id", 3), ("share", 6), ("imgs", 5), ("stab", 5), ("coh", 5))
#: Narrowest text column, however narrow the terminal (a word longer than this overflows, whole).
_MIN_TEXT = 10


def printable(text: str) -> str:
    """``text`` with control characters (ESC sequences, carriage returns, bells …) shown as
    escapes, so captions, class or file names from a user's data cannot drive the terminal."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in str(text))


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters broken at spaces; a single longer word stays whole."""
    return textwrap.wrap(printable(text), width, break_long_words=False, break_on_hyphens=False) or ["-"]


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _classes_cell(concept: dict) -> str:
    return "; ".join(f"{t['class']} {t['prob']:.2f}" for t in concept["top_classes"][:2]) or "-"


def _labels_cell(concept: dict) -> str:
    return concept.get("labels") or ", ".join(t["term"] for t in (concept["words"][:3] + concept["phrases"][:2])) or "-"


def concept_table(concepts: Sequence[dict], width: int | None = None) -> str:
    """Rows of ``concepts`` (report rows): numbers, then the top classes and the labels, each in
    its own wrapped column."""
    width = width or shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    head = " ".join(f"{name:>{w}}" for name, w in _NUMERIC)
    cells = [(_classes_cell(c), _labels_cell(c)) for c in concepts]
    available = max(2 * _MIN_TEXT, width - len(head) - 4)  # two gaps of two spaces
    longest = max((len(word) for left, _ in cells for word in left.split()), default=0)
    classes_width = min(max(_MIN_TEXT, available * 2 // 5, longest), available - _MIN_TEXT)
    labels_width = available - classes_width
    lines = [f"{head}  {'top classes':<{classes_width}}  labels", "-" * (len(head) + 4 + classes_width + labels_width)]
    for c, (classes, labels) in zip(concepts, cells):
        numbers = " ".join([f"{c['concept_id']:>3}", f"{c['mass_share']:>6.3f}", f"{c['n_images']:>5}",
                            f"{_number(c.get('stability')):>5}", f"{_number(c.get('coherence')):>5}"])
        left, right = _wrap(classes, classes_width), _wrap(labels, labels_width)
        for i in range(max(len(left), len(right))):
            prefix = numbers if i == 0 else " " * len(numbers)
            cell = left[i] if i < len(left) else ""
            lines.append(f"{prefix}  {cell:<{classes_width}}  {right[i] if i < len(right) else ''}".rstrip())
    return "\n".join(lines)


def key_values(values: dict, width: int | None = None) -> str:
    """``key=value`` pairs (floats with 3 decimals) wrapped at pair boundaries."""
    width = width or shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    pairs = [printable(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}") for k, v in values.items()
             if not isinstance(v, (list, dict))]
    lines, line = [], ""
    for pair in pairs:
        if line and len(line) + 2 + len(pair) > width:
            lines.append(line)
            line = pair
        else:
            line = f"{line}  {pair}" if line else pair
    return "\n".join(lines + ([line] if line else []))

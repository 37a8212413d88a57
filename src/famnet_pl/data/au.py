"""Action-unit (AU) strings -> AU sets, and the AU vocabularies each dataset is scored on.

Data flow: a sheet cell (``4+L10``, ``12`` as an int, ``R14A or 17A``, ``?``) -> :func:`parse_au`
-> :class:`ParsedAU` (base AU ints + flags, raw string kept) -> :func:`au_targets` -> a multi-hot
target row and a mask row over one vocabulary.

Grammar (../shared/notes/datasets.md, section 4):

* separators ``+`` and ``,`` (spaces allowed);
* laterality / lip prefixes ``L R A B T`` (``L10``, ``T18``) and side suffixes (``10R``) -> base AU;
* intensity letters ``A``-``E`` after the number (``7C``) -> stripped;
* alternatives ``or`` and ``/`` (``R14A or 17A``) -> union of the alternatives, flagged
  ``ambiguous``; a slash between intensity letters (``10A/B``) or between sides (``A/L12``) is
  not an alternative AU;
* ``ref(...)`` -> excluded by default (its meaning is undocumented), flagged;
* a ``?`` anywhere -> ``unknown``: the sample's AU loss is masked rather than read as "no AU";
* words that are not AU codes (SAMM's ``soft focus``) -> dropped and kept in ``notes``; letters are
  case-insensitive (CAS(ME)^3's ``r18``) and a full-width comma (``4，11``, Part C) separates.

The parser is deliberately strict: a token it cannot read raises :class:`AUParseError` naming the
raw string, so a new sheet quirk is seen instead of silently producing empty targets (the classic
bug of MER multi-task code whose AU targets were all zero).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

# Vocabularies: the AUs each dataset is scored on (MEB benchmark lists, datasets.md section 4).
# The synthetic set's vocabulary is derived from its own emotion->AU table (one source of truth).
AU_VOCABULARIES: dict[str, tuple[int, ...]] = {
    "casme2": (1, 2, 4, 7, 12, 14, 15, 17),
    "samm": (2, 4, 7, 12),
    "mmew": (1, 2, 4, 5, 7, 10, 12, 14),
    "cross12": (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17),
}

_TOKEN = re.compile(r"^(?P<prefix>[LRABT]?)(?P<au>\d{1,2})(?P<suffix>[A-E]?(?:/[A-E])?[LR]?)$")
_REF = re.compile(r"ref\(([^)]*)\)", re.IGNORECASE)


class AUParseError(ValueError):
    """An AU cell the grammar cannot read."""


@dataclass(frozen=True)
class ParsedAU:
    """One parsed AU cell.

    Attributes:
        raw: the cell as text.
        aus: base AU numbers (laterality and intensity removed).
        ambiguous: the cell holds alternatives (``or`` / ``/``); ``aus`` is their union.
        unknown: the cell is (partly) ``?``: AU targets for this sample must be masked.
        refs: AUs inside ``ref(...)`` (excluded from ``aus``).
        notes: non-AU words found in the cell (``soft focus``), dropped from ``aus``.
    """

    raw: str
    aus: frozenset[int] = field(default_factory=frozenset)
    ambiguous: bool = False
    unknown: bool = False
    refs: frozenset[int] = field(default_factory=frozenset)
    notes: tuple[str, ...] = ()


# Free-text words seen inside AU cells; anything else that is not an AU code is an error.
_NOTE = re.compile(r"^[a-z][a-z ]{3,}$")


def _parse_token(token: str, raw: str) -> int:
    match = _TOKEN.match(token)
    if match is None:
        raise AUParseError(
            f"cannot read AU token {token!r} in {raw!r}: expected e.g. '12', 'L10', '7C', 'R14A'; "
            "fix the cell or extend famnet_pl.data.au"
        )
    return int(match.group("au"))


def parse_au(cell: object) -> ParsedAU:
    """Parse one AU cell of any supported sheet.

    Args:
        cell: the raw cell (``str``, ``int``, ``float``, or NaN/None for an empty cell).

    Returns:
        The parsed cell.

    Raises:
        AUParseError: a token that is not an AU code.
    """
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return ParsedAU(raw="")
    if isinstance(cell, float) and cell.is_integer():
        cell = int(cell)  # Excel hands back 12.0 for an int-typed cell
    raw = str(cell).strip()
    text = raw.replace("\uff0c", ",")
    refs: set[int] = set()
    for inner in _REF.findall(text):
        refs |= {_parse_token(t.strip(), raw) for t in re.split(r"[+,]", inner) if t.strip()}
    # Grouping parentheses, as in "(R6 or R12)+R15", carry no meaning beyond the alternatives.
    text = _REF.sub("", text).replace("(", " ").replace(")", " ")
    unknown = "?" in text
    # "A/L12": alternative *sides* of one AU, not alternative AUs -> keep the AU.
    text = re.sub(r"(?<![\w/])[LRABT]/(?=[LRABT]?\d)", "", text)
    text = text.replace("?", "")
    aus: set[int] = set()
    notes: list[str] = []
    ambiguous = False
    for part in re.split(r"[+,]", text):
        part = part.strip()
        if not part:
            continue
        if _NOTE.match(part) and not re.search(r"\d", part):
            notes.append(part)
            continue
        part = re.sub(r"(?<![a-z])([lrabt])(?=\d)", lambda m: m.group(1).upper(), part)
        # "or" alternatives, and "/" between whole tokens (not between intensity letters: 10A/B).
        alternatives = re.split(r"\s+or\s+|(?<=\d)/(?=[LRABT]?\d)|(?<=[A-E])/(?=[LRABT]\d)", part)
        if len(alternatives) > 1:
            ambiguous = True
        aus |= {_parse_token(alt.replace(" ", ""), raw) for alt in alternatives if alt.strip()}
    return ParsedAU(raw=raw, aus=frozenset(aus), ambiguous=ambiguous, unknown=unknown,
                    refs=frozenset(refs), notes=tuple(notes))


def au_targets(au_sets: list[frozenset[int] | set[int]], unknown: np.ndarray, vocab: tuple[int, ...],
               coded: list[tuple[int, ...] | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot AU targets and loss mask over a vocabulary.

    Args:
        au_sets: one set of base AUs per sample (``ParsedAU.aus``, or a manifest's ``au_set``).
        unknown: bool per sample: the AUs are unknown (``?``, or a dataset without AU coding).
        vocab: the AU numbers of the AU head (column order).
        coded: per sample, the AUs its dataset codes (``None``: all). In a composite, an AU the
            sample's dataset never codes is masked, not read as "absent".

    Returns:
        ``(targets, mask)``, both float32 ``(N, len(vocab))``.
    """
    index = {au: j for j, au in enumerate(vocab)}
    targets = np.zeros((len(au_sets), len(vocab)), dtype=np.float32)
    mask = np.ones_like(targets)
    for i, aus in enumerate(au_sets):
        for au in aus:
            if au in index:
                targets[i, index[au]] = 1.0
        if unknown[i]:
            mask[i] = 0.0
        elif coded is not None and coded[i] is not None:
            mask[i] = [au in coded[i] for au in vocab]
    return targets, mask


def parse_au_set(text: str) -> frozenset[int]:
    """Inverse of :func:`format_aus` (``1+2+12`` -> {1, 2, 12}; empty -> empty)."""
    return frozenset(int(t) for t in str(text).split("+") if t.strip().isdigit())


def format_aus(aus: frozenset[int] | set[int]) -> str:
    """Canonical text form of an AU set (``1+2+12``), used in manifests."""
    return "+".join(str(a) for a in sorted(aus))

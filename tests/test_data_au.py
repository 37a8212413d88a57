"""AU grammar: every form seen in the official sheets, targets and masks, and a property test."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from famnet_pl.data.au import AUParseError, au_targets, format_aus, parse_au
from tests.conftest import CASME2_2014, CASME2_2019


@pytest.mark.parametrize("cell, aus, ambiguous, unknown", [
    ("4+L10", {4, 10}, False, False),
    (12, {12}, False, False),            # int-typed cell
    (12.0, {12}, False, False),          # Excel float
    ("R12", {12}, False, False),
    ("L12 + 61", {12, 61}, False, False),
    ("R4,5", {4, 5}, False, False),      # Part C comma separator
    ("T18", {18}, False, False),
    ("7C", {7}, False, False),           # intensity letter
    ("4D+9B", {4, 9}, False, False),
    ("10R", {10}, False, False),         # side suffix (MMEW)
    ("(R6 or R12)+R15", {6, 12, 15}, True, False),
    ("R14A or 17A or 24A", {14, 17, 24}, True, False),
    ("10A/B", {10}, False, False),       # slash between intensities is not an alternative
    ("A/L12", {12}, False, False),
    ("12A+ref(24)", {12}, False, False),
    ("?", set(), False, True),
    ("12+15 ", {12, 15}, False, False),
    (None, set(), False, False),
    (float("nan"), set(), False, False),
])
def test_parse_au_forms(cell, aus, ambiguous, unknown):
    parsed = parse_au(cell)
    assert parsed.aus == aus
    assert parsed.ambiguous == ambiguous
    assert parsed.unknown == unknown


def test_parse_au_ref_is_kept_apart():
    assert parse_au("12A+ref(24)").refs == {24}


def test_parse_au_rejects_garbage_with_the_raw_string():
    with pytest.raises(AUParseError, match="12x9"):
        parse_au("4+12x9")


@pytest.mark.parametrize("cell, aus, notes", [
    ("R14+17+soft focus", {14, 17}, ("soft focus",)),   # SAMM: free text beside the codes
    ("r18", {18}, ()),                                   # CAS(ME)^3 full sheet: lower-case side
    ("4\uff0c11", {4, 11}, ()),                          # Part C: full-width comma
])
def test_parse_au_sheet_quirks(cell, aus, notes):
    parsed = parse_au(cell)
    assert parsed.aus == aus and parsed.notes == notes


@pytest.mark.shared
@pytest.mark.parametrize("sheet", [CASME2_2014, CASME2_2019])
def test_every_real_casme2_au_cell_parses_and_most_are_nonempty(sheet):
    cells = pd.read_excel(sheet, engine="openpyxl")["Action Units"]
    parsed = [parse_au(c) for c in cells]
    assert sum(bool(p.aus) for p in parsed) >= 0.97 * len(parsed)
    targets, mask = au_targets([p.aus for p in parsed], [p.unknown for p in parsed],
                               (1, 2, 4, 7, 12, 14, 15, 17))
    assert targets.sum(axis=1).astype(bool).mean() > 0.6          # not silently all zero
    assert (targets.sum(axis=0) > 0).all()                       # every vocabulary AU occurs
    assert mask.min() == (0.0 if any(p.unknown for p in parsed) else 1.0)


def test_au_targets_mask_unknown_rows():
    parsed = [parse_au("1+2"), parse_au("?")]
    targets, mask = au_targets([p.aus for p in parsed], [p.unknown for p in parsed], (1, 2, 4))
    np.testing.assert_array_equal(targets, [[1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 0]])


_token = st.tuples(st.sampled_from(["", "L", "R", "A", "B", "T"]), st.integers(1, 64),
                   st.sampled_from(["", "A", "B", "C", "D", "E"]))


@given(st.lists(_token, min_size=1, max_size=6), st.sampled_from(["+", " + ", ","]))
def test_parse_au_property_recovers_base_aus(tokens, sep):
    cell = sep.join(f"{p}{au}{i}" for p, au, i in tokens)
    assert parse_au(cell).aus == {au for _, au, _ in tokens}
    assert format_aus(parse_au(cell).aus) == "+".join(str(a) for a in sorted({au for _, au, _ in tokens}))


_SHEETS = {  # (file below ../shared/annotations, pandas read options, AU column)
    "samm": ("samm/SAMM_Micro_FACS_Codes_v2.xlsx", {"header": 13}, "Action Units"),
    "mmew": ("mmew/MMEW_Micro_Exp_delete_others.csv", {}, "Action Units"),
    "casme3": ("casme3/cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx", {}, "AU"),
    "casme3_full": ("casme3/CAS(ME)3_part_A_v2.xls", {"sheet_name": "AU+Emotion"}, "AU"),
    "casme3_part_c": ("casme3/CAS(ME)3_part_C_ME.xlsx", {}, "au"),
}


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(_SHEETS))
def test_every_au_cell_of_every_real_sheet_parses(name):
    from tests.conftest import SHARED

    file, options, column = _SHEETS[name]
    path = SHARED / file
    cells = (pd.read_csv(path, **options) if path.suffix == ".csv"
             else pd.read_excel(path, engine="calamine", **options))[column]
    parsed = [parse_au(c) for c in cells]
    assert sum(bool(p.aus) for p in parsed) >= 0.95 * len(parsed)

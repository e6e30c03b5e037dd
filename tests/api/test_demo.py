"""`make demo`'s pieces without the full dataset: the OpenMoji builder's filtering, split and tree on
13 bundled drawings (tests/openmoji/, CC BY-SA 4.0, see its LICENSE.txt), and the demo's table
parser and thresholds. No model runs here."""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.cache.errors import FeatcacheError

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())  # wherever this file sits
FIXTURES = REPO / "tests" / "openmoji"
sys.path.insert(0, str(REPO / "examples"))  # the demo's modules live beside its script, not in the package

import emoji_dataset as ed  # noqa: E402 (after the sys.path line above)
import emoji_demo as demo  # noqa: E402


def excerpt() -> str:
    return (FIXTURES / "emoji-test-excerpt.txt").read_text(encoding="utf-8")


def test_parse_reads_groups_statuses_and_names():
    emoji = ed.parse_emoji_test(excerpt())
    assert len(emoji) == 16  # every data line, no header or group line
    heart = next(e for e in emoji if e.codepoints == (0x2764, 0xFE0F))
    assert (heart.status, heart.group, heart.name) == ("fully-qualified", "Smileys & Emotion", "red heart")
    assert next(e for e in emoji if e.codepoints == (0x1F3FB,)).status == "component"


def test_select_keeps_single_codepoints_and_flags_and_says_why_the_rest_goes():
    kept, dropped = ed.select(ed.parse_emoji_test(excerpt()), ed.svg_stems(FIXTURES))
    assert kept == [("1F600", "smileys-emotion"), ("1F603", "smileys-emotion"), ("1F604", "smileys-emotion"),
                    ("2764", "smileys-emotion"),  # red heart: OpenMoji's file has no U+FE0F in its name
                    ("1F44B", "people-body"), ("1F436", "animals-nature"), ("1F431", "animals-nature"),
                    ("1F34E", "food-drink"), ("1F1EB-1F1F7", "flags")]
    # the skin-tone, ZWJ and keycap drawings are bundled too: they go by rule, not for lack of a drawing
    assert dropped == collections.Counter({
        "ZWJ sequence (near-duplicate of its parts)": 2,
        "not fully-qualified (a duplicate without its presentation selector)": 1,
        "skin-tone variant (near-duplicate of its base)": 1,
        "component swatch (skin tone, hair)": 1,
        "keycap (near-duplicates of each other)": 1,
        "tag-sequence flag (near-duplicates of each other)": 1,
        "OpenMoji extra, private use (no Unicode group)": 1,  # E000.svg
    })


def test_select_drops_an_emoji_without_a_drawing():
    stems = ed.svg_stems(FIXTURES) - {"1F431"}
    kept, dropped = ed.select(ed.parse_emoji_test(excerpt()), stems)
    assert "1F431" not in {s for s, _ in kept} and dropped["no OpenMoji drawing"] == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_stratified_split_is_seeded_stratified_and_complete(seed):
    labels = [c for c, n in (("a", 50), ("b", 30), ("c", 20)) for _ in range(n)]
    split = ed.stratified_split(labels, seed)
    assert split == ed.stratified_split(labels, seed)  # same seed, same split
    assert split != ed.stratified_split(labels, seed + 7)
    for cls, n in (("a", 50), ("b", 30), ("c", 20)):
        got = collections.Counter(s for s, y in zip(split, labels) if y == cls)
        assert set(got) == {"train", "val", "test"} and sum(got.values()) == n
        assert got["train"] == pytest.approx(0.6 * n, abs=1) and got["val"] == pytest.approx(0.2 * n, abs=1)


def test_stratified_split_refuses_bad_fractions():
    with pytest.raises(FeatcacheError, match="fractions"):
        ed.stratified_split(["a"] * 10, 0, fractions=(0.8, 0.3, 0.1))


def two_group_text() -> str:
    """The excerpt's 9 kept emoji regrouped into two groups of 5 and 4, enough to stratify."""
    lines = [ln for ln in excerpt().splitlines() if ln.strip() and not ln.startswith("#")]
    keep = [ln for ln in lines if ed.drop_reason(ed.parse_emoji_test(ln)[0]) is None]
    return "\n".join(["# group: Faces", *keep[:5], "# group: Things", *keep[5:]])


def test_build_writes_an_imagefolder_tree_and_reuses_it(tmp_path, monkeypatch):
    root = tmp_path / "images"
    info = ed.build(root, FIXTURES, two_group_text(), size=32, seed=0, sources="fixtures")
    pngs = sorted(root.glob("*/*/*.png"))
    assert len(pngs) == 9 and {p.parts[-3] for p in pngs} == {"train", "val", "test"}
    assert {p.parent.name for p in pngs} == {"faces", "things"}
    assert sum(sum(c.values()) for c in info.counts.values()) == 9
    img = Image.open(pngs[0])
    assert img.size == (32, 32) and img.mode == "RGB"
    assert np.asarray(img)[0, 0].tolist() == [255, 255, 255]  # drawn on opaque white
    assert json.loads((root / ed.MANIFEST).read_text())["counts"] == info.counts
    assert not list(tmp_path.glob(".images.tmp-*"))  # the hidden build folder was renamed onto root

    def no_render(*_):
        raise AssertionError("a complete tree must be reused, not re-rendered")

    monkeypatch.setattr(ed, "render_png", no_render)
    assert ed.build(root, FIXTURES, two_group_text(), size=32, seed=0, sources="fixtures") == info
    with pytest.raises(FeatcacheError, match="other settings|remove it"):
        ed.build(root, FIXTURES, two_group_text(), size=48, seed=0, sources="fixtures")


def test_contact_sheet_is_one_image_per_class_and_small(tmp_path):
    root = tmp_path / "images"
    ed.build(root, FIXTURES, two_group_text(), size=32, seed=0, sources="fixtures")
    out = ed.contact_sheet(root, tmp_path / "sheet.png", thumb=32)
    sheet = Image.open(out)
    assert sheet.width == 2 * 100 and out.stat().st_size < 200_000
    committed = REPO / "docs" / "demo-contact-sheet.png"
    if committed.exists():  # the README's picture must stay small
        assert committed.stat().st_size < 200_000


ROWS = [
    demo.Row("pixels", "scikit-learn LogisticRegression, C=0.01 of 4 on val", "raw pixels (32x32 RGB)", 0.55, 0.5303,
             9.8),
    demo.Row("final", "featcache linear probe, exact C path", "final layer (1280)", 0.7182, 0.6667, 3.1),
    demo.Row("sets", "featcache linear probe, best of 4 layer sets", "blocks.5,blocks.6 (512)", 0.7424, 0.7, 6.4),
]


def test_table_round_trips_through_surrounding_text():
    text = "# README\n\nsome words | with a bar\n\n" + demo.format_table(ROWS) + "\n\nmore text\n"
    back = demo.parse_table(text)
    assert [(r.key, r.head, r.features) for r in back] == [(r.key, r.head, r.features) for r in ROWS]
    for a, b in zip(back, ROWS):
        assert (a.val, a.test, a.seconds) == pytest.approx((b.val, b.test, b.seconds), abs=5e-5)


def test_parse_table_refuses_text_without_the_table():
    with pytest.raises(ValueError, match="no table"):
        demo.parse_table("| a | b |\n|---|---|\n| 1 | 2 |\n")


def test_thresholds_pass_when_both_claims_hold():
    assert demo.check_thresholds(ROWS) == []


def replace(rows, key, **kw):
    return [demo.Row(**{**r.__dict__, **kw}) if r.key == key else r for r in rows]


def test_thresholds_fail_under_ten_points_over_pixels():
    fails = demo.check_thresholds(replace(ROWS, "pixels", test=0.6667 - 0.09))
    assert len(fails) == 1 and "raw pixels by +9.0 test points" in fails[0]
    assert demo.check_thresholds(replace(ROWS, "pixels", test=0.5667)) == []  # exactly 10 points passes


def test_thresholds_fail_when_the_layer_set_only_ties_the_final_layer():
    fails = demo.check_thresholds(replace(ROWS, "sets", test=0.6667))
    assert len(fails) == 1 and "does not beat the final layer" in fails[0]


def test_thresholds_fail_on_a_missing_row():
    assert demo.check_thresholds(ROWS[1:]) == ["the table has no pixels row"]

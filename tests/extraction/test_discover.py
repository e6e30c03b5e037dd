"""ImageFolder discovery: splits, classes, labels, determinism and hostile folder contents."""
from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import CLASSES, SPLIT_COUNTS, UNICODE_CLASS, noisy_image, save_image

from featcache.pipeline.errors import FeatcacheError
from featcache.pipeline.extraction.discover import UNLABELED, discover


def test_split_tree(split_tree_ro):
    d = discover(split_tree_ro)
    assert d.has_splits
    assert d.class_names == tuple(sorted(CLASSES))
    n_per_class = sum(SPLIT_COUNTS.values())
    assert len(d.records) == n_per_class * len(CLASSES)
    for split, n in SPLIT_COUNTS.items():
        assert sum(r.split == split for r in d.records) == n * len(CLASSES)
    for r in d.records:
        split, cls, name = r.path.split("/")
        assert split == r.split
        assert d.class_names[r.label] == cls  # labels and paths aligned
        assert not os.path.isabs(r.path) and "\\" not in r.path
        assert (split_tree_ro / r.path).is_file()
    paths = [r.path for r in d.records]
    assert paths == sorted(paths)


def test_flat_tree_is_all_train(flat_tree_ro):
    d = discover(flat_tree_ro)
    assert not d.has_splits
    assert {r.split for r in d.records} == {"train"}
    assert d.class_names == tuple(sorted(CLASSES))
    assert all(d.class_names[r.label] == r.path.split("/")[0] for r in d.records)


def test_discovery_is_deterministic(split_tree_ro):
    assert discover(split_tree_ro) == discover(split_tree_ro)


def test_images_directly_in_root_are_unlabeled(tmp_path):
    rng = np.random.default_rng(0)
    save_image(tmp_path / "loose.png", noisy_image((1, 2, 3), rng))
    save_image(tmp_path / "cat" / "a.jpg", noisy_image((1, 2, 3), rng))
    d = discover(tmp_path)
    by_path = {r.path: r for r in d.records}
    assert by_path["loose.png"].label == UNLABELED
    assert d.class_names == ("cat",)
    assert by_path["cat/a.jpg"].label == 0


def test_uppercase_extensions_and_nested_folders(tmp_path):
    rng = np.random.default_rng(0)
    save_image(tmp_path / "cls" / "A.JPG", noisy_image((1, 2, 3), rng))
    save_image(tmp_path / "cls" / "sub" / "deeper" / "b.PNG", noisy_image((1, 2, 3), rng))
    d = discover(tmp_path)
    assert [r.path for r in d.records] == ["cls/A.JPG", "cls/sub/deeper/b.PNG"]
    assert {r.label for r in d.records} == {0}  # nested images belong to the top class folder


def test_hostile_tree(hostile_tree):
    d = discover(hostile_tree.root)  # must terminate despite the symlink loop
    paths = [r.path for r in d.records]
    assert list(d.class_names) == hostile_tree.classes  # no empty / text-only / hidden classes
    assert UNICODE_CLASS in d.class_names
    for rel in hostile_tree.ignored:
        assert rel not in paths, f"{rel} should be ignored"
    assert not any(p.split("/")[-1].startswith(".") for p in paths)
    assert not any(p.endswith(".txt") for p in paths)
    for rel in hostile_tree.good + list(hostile_tree.bad):
        assert rel in paths  # bad files are discovered (and skipped later, with a reason)
    assert len(paths) == len(set(paths))  # the loop did not duplicate anything
    assert not any("/loop/" in p for p in paths)
    uni = [r for r in d.records if r.path.startswith(UNICODE_CLASS + "/")]
    assert len(uni) == 4 and {d.class_names[r.label] for r in uni} == {UNICODE_CLASS}


def test_symlinked_class_folder_is_followed(tmp_path):
    rng = np.random.default_rng(0)
    elsewhere = tmp_path / "elsewhere"
    save_image(elsewhere / "x.png", noisy_image((1, 2, 3), rng))
    root = tmp_path / "root"
    save_image(root / "real" / "y.png", noisy_image((1, 2, 3), rng))
    os.symlink(elsewhere, root / "linked")
    d = discover(root)
    assert d.class_names == ("linked", "real")
    assert [r.path for r in d.records] == ["linked/x.png", "real/y.png"]


def test_split_folders_recognised_only_by_name(tmp_path):
    rng = np.random.default_rng(0)
    save_image(tmp_path / "train" / "a" / "1.png", noisy_image((1, 2, 3), rng))
    save_image(tmp_path / "test" / "b" / "2.png", noisy_image((1, 2, 3), rng))
    d = discover(tmp_path)
    assert d.has_splits and d.class_names == ("a", "b")
    assert {(r.path, r.split) for r in d.records} == {("train/a/1.png", "train"), ("test/b/2.png", "test")}


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_images", "only_hidden"])
def test_bad_roots_raise_one_line_errors(tmp_path, case):
    root = tmp_path / "root"
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "no_images":
        (root / "cls").mkdir(parents=True)
        (root / "cls" / "notes.txt").write_text("x")
        (root / "cls" / "data.csv").write_text("x")
    elif case == "only_hidden":
        save_image(root / "cls" / ".hidden.png", noisy_image((1, 2, 3), np.random.default_rng(0)))
        save_image(root / ".secret" / "a.png", noisy_image((1, 2, 3), np.random.default_rng(0)))
    with pytest.raises(FeatcacheError) as info:
        discover(root)
    msg = str(info.value)
    assert "\n" not in msg and str(root) in msg


def test_symlink_to_a_sibling_class_folder_keeps_that_class(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    save_image(root / "a" / "x.png", noisy_image((1, 2, 3), rng))
    save_image(root / "b" / "y.png", noisy_image((1, 2, 3), rng))
    os.symlink(root / "b", root / "a" / "link")
    d = discover(root)
    assert d.class_names == ("a", "b")
    labels = {r.path: d.class_names[r.label] for r in d.records}
    assert labels["b/y.png"] == "b"


def test_written_out_extensions_are_torchvisions_own():
    """discover.py spells out ImageFolder's tuple to avoid importing torchvision; it must not drift."""
    from torchvision.datasets.folder import IMG_EXTENSIONS as TV

    from featcache.pipeline.extraction.discover import IMAGE_EXTENSIONS, IMG_EXTENSIONS

    assert IMG_EXTENSIONS == tuple(TV) and IMAGE_EXTENSIONS[: len(TV)] == tuple(TV)


@pytest.mark.parametrize("tree", ["split_tree_ro", "flat_tree_ro"])
def test_a_relative_or_slashed_root_names_the_same_files(tree, request, monkeypatch):
    """Relative paths come from each class folder's prefix and the walked strings: the root's
    spelling (relative, './', '..', trailing slash, absolute, a symlink to it) must not change a
    single record."""
    root = request.getfixturevalue(tree)
    expected = discover(root).records
    link = root.parent.parent / f"link-to-{root.parent.name}-{root.name}"
    if not link.exists():
        link.symlink_to(root, target_is_directory=True)
    monkeypatch.chdir(root.parent)
    for spelling in (root.name, f"{root.name}/", f"./{root.name}", f"{root.name}//", str(root),
                     f"../{root.parent.name}/{root.name}", str(link), f"../{link.name}"):
        assert discover(spelling).records == expected, spelling
    monkeypatch.chdir(root)
    assert discover(".").records == expected and discover("./").records == expected


def test_two_class_names_for_one_real_folder_is_one_line(tmp_path):
    """``ln -s digit_1 digit_9`` used to drop both classes without a word (each was walked without
    entering its sibling, which was itself)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    for name in ("digit_0", "digit_1"):
        save_image(root / name / "x.png", noisy_image((1, 2, 3), rng))
    os.symlink("digit_1", root / "digit_9")
    with pytest.raises(FeatcacheError) as e:
        discover(root)
    msg = str(e.value)
    assert "'digit_1' and 'digit_9'" in msg and "one folder" in msg and "\n" not in msg


def test_one_real_folder_in_two_splits_is_one_line(tmp_path):
    rng = np.random.default_rng(0)
    save_image(tmp_path / "train" / "cat" / "1.png", noisy_image((1, 2, 3), rng))
    (tmp_path / "val").mkdir()
    os.symlink(tmp_path / "train" / "cat", tmp_path / "val" / "cat")  # its images would be in train and val
    with pytest.raises(FeatcacheError, match="'train/cat' and 'val/cat'"):
        discover(tmp_path)


def test_class_folder_linked_to_the_root_is_one_line(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    save_image(root / "a" / "x.png", noisy_image((1, 2, 3), rng))
    os.symlink(".", root / "everything")
    with pytest.raises(FeatcacheError, match="'everything' .* the image folder itself"):
        discover(root)

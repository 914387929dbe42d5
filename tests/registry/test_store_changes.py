"""StoreChanges on real folders: the mark moves for every kind of change a store can see, and
not for reads; where a change could go unreported, nothing is watched."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.registry import store_changes
from service.registry.store import ModelStore
from service.registry.store_changes import StoreChanges, mounted_filesystems

from .conftest import PublishFn


@pytest.fixture
def store(store: ModelStore, publish: PublishFn) -> ModelStore:
    publish("m", seed=1)
    publish("m", seed=2)
    store.set_alias("m", "production", 1)
    return store


@pytest.fixture
def changes(store: ModelStore) -> Iterator[StoreChanges]:
    changes = StoreChanges(store.root)
    assert changes.watch("m")
    yield changes
    changes.close()


def _rewrite_in_place(path: Path) -> None:
    with path.open("r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(first)


def _renamed_in(path: Path) -> None:
    """`path` replaced by a file written outside the store, then renamed over it (the only
    event is in `path`'s folder)."""
    outside = path.parents[2] / "outside.tmp"  # beside the store
    outside.write_bytes(path.read_bytes())
    outside.rename(path)


CHANGES: dict[str, Callable[[Path], None]] = {
    "a manifest rewritten in place": lambda m: _rewrite_in_place(m / "1" / "manifest.json"),
    "weights truncated": lambda m: os.truncate(m / "2" / "weights.safetensors", 10),
    "weights chmod-ed": lambda m: os.chmod(m / "2" / "weights.safetensors", 0o600),
    "a manifest's times touched": lambda m: (m / "2" / "manifest.json").touch(),
    "aliases replaced by a rename from outside": lambda m: _renamed_in(m / "aliases.json"),
    "a version folder added": lambda m: (m / "3").mkdir(),
    "a version folder removed": lambda m: shutil.rmtree(m / "1"),
    "a version folder renamed": lambda m: (m / "2").rename(m / "7"),
    "weights deleted": lambda m: (m / "2" / "weights.safetensors").unlink(),
    "a new model folder": lambda m: (m.parent / "other").mkdir(),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_the_mark_moves_for_each_kind_of_change(
    store: ModelStore, changes: StoreChanges, change: str
) -> None:
    before = changes.mark()
    assert changes.mark() == before  # still, while nothing changes
    CHANGES[change](store.root / "m")
    assert changes.mark() != before


def test_reading_the_store_does_not_move_the_mark(store: ModelStore, changes: StoreChanges) -> None:
    before = changes.mark()
    for path in (store.root / "m").rglob("*"):
        if path.is_file():
            path.read_bytes()
    store.load("m", 2)
    ModelStore(store.root).snapshot()
    assert changes.mark() == before


def test_a_store_reached_through_a_symbolic_link_is_not_watched(
    store: ModelStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = tmp_path / "link"
    link.symlink_to(store.root)
    changes = StoreChanges(link)
    with caplog.at_level(logging.INFO, logger=store_changes.__name__):
        assert not changes.watch("m")
    assert not changes.active
    assert "symbolic link" in caplog.text
    assert not changes.watch("m")  # refused for good


def test_a_model_with_symbolic_link_weights_is_not_watched(
    store: ModelStore, tmp_path: Path
) -> None:
    weights = store.root / "m" / "2" / "weights.safetensors"
    weights.rename(tmp_path / "elsewhere")
    weights.symlink_to(tmp_path / "elsewhere")
    changes = StoreChanges(store.root)
    assert not changes.watch("m")
    changes.close()


def test_writes_through_a_hard_link_outside_the_store_move_the_mark(
    store: ModelStore, changes: StoreChanges, tmp_path: Path
) -> None:
    outside = tmp_path / "dedup-copy"
    os.link(store.root / "m" / "2" / "weights.safetensors", outside)
    changes.watch("m")  # the link made after the first watch: the next reading watches it too
    before = changes.mark()
    _rewrite_in_place(outside)
    assert changes.mark() != before
    aliases = tmp_path / "aliases-link"
    os.link(store.root / "m" / "aliases.json", aliases)
    before = changes.mark()
    aliases.write_text('{"production": 2}')
    assert changes.mark() != before


def test_a_folder_above_the_store_swapped_by_rename_moves_the_mark(tmp_path: Path) -> None:
    release = tmp_path / "app" / "store"
    (release / "m" / "1").mkdir(parents=True)
    changes = StoreChanges(release)
    assert changes.watch("m")
    before = changes.mark()
    (tmp_path / "app").rename(tmp_path / "app.old")
    (tmp_path / "app.new" / "store" / "m").mkdir(parents=True)
    (tmp_path / "app.new").rename(tmp_path / "app")
    assert changes.mark() != before
    changes.close()


def test_a_store_that_becomes_a_symbolic_link_is_no_longer_watched(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (root / "m" / "1").mkdir(parents=True)
    changes = StoreChanges(root)
    assert changes.watch("m")
    before = changes.mark()
    shutil.rmtree(root)
    (tmp_path / "blue" / "m" / "1").mkdir(parents=True)
    root.symlink_to(tmp_path / "blue")
    assert changes.mark() != before
    assert not changes.watch("m")  # read every time from now on
    changes.close()


@pytest.mark.parametrize("name", ["..", "/tmp", "m/../m", "m\x00", ".hidden", ""])
def test_a_name_that_is_no_model_s_name_is_not_watched(
    store: ModelStore, changes: StoreChanges, name: str
) -> None:
    assert not changes.watch(name)
    assert changes.watch("m")  # the rest still are


def test_a_folder_on_a_network_filesystem_is_not_watched(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # No NFS mount here: the mount table says the store's device is one.
    device = os.stat(store.root).st_dev
    monkeypatch.setattr(store_changes, "mounted_filesystems", lambda: {device: "nfs4"})
    changes = StoreChanges(store.root)
    with caplog.at_level(logging.INFO, logger=store_changes.__name__):
        assert not changes.watch("m")
    assert "not on a local filesystem" in caplog.text
    changes.close()


def test_turned_off_nothing_is_watched(store: ModelStore) -> None:
    changes = StoreChanges(store.root, enabled=False)
    assert not changes.watch("m")
    assert not changes.active
    assert changes.mark() == changes.mark()


def test_an_unknown_model_is_not_watched_and_the_rest_still_are(
    store: ModelStore, changes: StoreChanges
) -> None:
    assert not changes.watch("absent")
    assert changes.watch("m")


def test_closed_it_watches_nothing(store: ModelStore) -> None:
    changes = StoreChanges(store.root)
    assert changes.watch("m") and changes.active
    changes.close()
    assert not changes.active
    assert not changes.watch("m")


def test_the_mount_table_is_read_with_its_optional_fields(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "30 22 0:25 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw\n"
        "41 22 0:40 / /mnt/models rw master:3 shared:7 - nfs4 host:/models rw,vers=4.2\n"
        "garbage\n"
    )
    assert mounted_filesystems(str(table)) == {
        os.makedev(253, 1): "ext4",
        os.makedev(0, 25): "tmpfs",
        os.makedev(0, 40): "nfs4",
    }
    assert os.stat("/").st_dev in mounted_filesystems()  # this machine's own table

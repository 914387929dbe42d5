"""The weights digest: checked on the bytes before anything is parsed; a bad version is refused
while the rest of the store keeps working."""

from __future__ import annotations

import grpc
import pytest

from service.errors import DigestMismatch
from service.registry import store as store_module
from service.registry.store import ModelStore
from service.registry.weights import sha256_hex

from .conftest import PublishFn, small_config


def _flip_one_byte(path, offset: int = -7) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_weights_are_refused_naming_file_and_both_digests(
    store: ModelStore, publish: PublishFn
) -> None:
    first, _ = publish("m", seed=1)
    publish("m", seed=2)
    weights = store.root / "m" / "1" / "weights.safetensors"
    _flip_one_byte(weights)
    actual = sha256_hex(weights.read_bytes())
    with pytest.raises(DigestMismatch) as info:
        store.load("m", 1)
    assert info.value.status == grpc.StatusCode.DATA_LOSS
    message = info.value.message
    assert message.startswith("m/1/weights.safetensors: ")  # within the store: it reaches clients
    assert str(store.root) not in message
    assert first.weights_sha256 in message
    assert actual in message
    assert actual != first.weights_sha256
    # The other version, and other models, still load.
    assert store.load("m", 2).manifest.version == 2


@pytest.mark.parametrize("root", ["s", "./s"])
def test_a_relative_store_names_its_files_within_it_whole(
    store: ModelStore, publish: PublishFn, monkeypatch: pytest.MonkeyPatch, root: str
) -> None:
    """`--store s`: only a path that starts with the root is cut, so `bus/1/…` stays whole (the
    root's `s/` cut out of the middle of it made it `bu1/weights.safetensors`)."""
    publish("bus")
    monkeypatch.chdir(store.root.parent)
    store.root.rename(store.root.parent / "s")
    relative = ModelStore(root)
    _flip_one_byte(relative.root / "bus" / "1" / "weights.safetensors")
    with pytest.raises(DigestMismatch) as info:
        relative.load("bus", 1)
    assert info.value.message.startswith("bus/1/weights.safetensors: "), info.value.message
    assert relative.within(f"{relative.root}/bus/1/manifest.json (and xs/bus/1)") == (
        "bus/1/manifest.json (and xs/bus/1)"
    )


def test_digest_is_checked_before_deserialization(
    store: ModelStore, publish: PublishFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish("m")
    _flip_one_byte(store.root / "m" / "1" / "weights.safetensors", offset=10)  # in the header

    def must_not_parse(data: bytes, source: str):
        raise AssertionError("deserialized unverified bytes")

    monkeypatch.setattr(store_module, "deserialize", must_not_parse)
    with pytest.raises(DigestMismatch):
        store.load("m", 1)


def test_verify_reports_each_bad_version_by_file(store: ModelStore, publish: PublishFn) -> None:
    publish("a")
    publish("a")
    publish("b", small_config("gru", "features"))
    _flip_one_byte(store.root / "a" / "2" / "weights.safetensors")
    (store.root / "b" / "2").mkdir()  # a version with no manifest
    results = {(r.name, r.version): r for r in store.verify()}
    assert set(results) == {("a", 1), ("a", 2), ("b", 1), ("b", 2)}
    assert results["a", 1].ok and results["b", 1].ok
    bad_weights = results["a", 2]
    assert not bad_weights.ok
    assert bad_weights.path == store.root / "a" / "2" / "weights.safetensors"
    assert "sha256 mismatch" in bad_weights.message
    assert str(bad_weights.path) in bad_weights.message
    no_manifest = results["b", 2]
    assert not no_manifest.ok
    assert no_manifest.path == store.root / "b" / "2" / "manifest.json"
    assert "manifest.json: missing" in no_manifest.message


def test_verify_of_a_healthy_store_is_all_ok(store: ModelStore, publish: PublishFn) -> None:
    publish("a")
    assert [(r.name, r.version, r.ok, r.message) for r in store.verify()] == [("a", 1, True, "ok")]

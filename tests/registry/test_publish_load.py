"""publish → load round trips, version numbering and what lands on disk."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import safetensors
import torch

from service.errors import (
    FailedPrecondition,
    InvalidArgument,
    VersionNotFound,
    VersionUnusable,
    WeightsMismatch,
)
from service.registry.manifest import Training
from service.registry.store import ModelStore
from service.registry.weights import serialize, sha256_hex

from .conftest import PublishFn, outputs, sample_inputs, seeded_model, small_config

ARCHITECTURES = {
    "lstm-tokens": small_config("lstm", "tokens"),
    "gru-frames-regression": small_config("gru", "features"),
    "article-gru-tokens": small_config("gru", "tokens", reset_after=False),
    "lstm-tokens-regression-1-layer": small_config(
        "lstm", "tokens", head_kind="regression", num_layers=1
    ),
}


@pytest.mark.parametrize("config", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_loaded_model_reproduces_the_published_one(
    store: ModelStore, publish: PublishFn, config
) -> None:
    manifest, original = publish("m", config)
    loaded = store.load("m", manifest.version)
    inputs = sample_inputs(config)
    torch.testing.assert_close(outputs(loaded.model, inputs), outputs(original, inputs))
    assert loaded.manifest == manifest
    assert loaded.manifest.to_config() == config
    assert loaded.fingerprint == manifest.fingerprint()
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert (loaded.tokenizer is None) == (config.input_kind == "features")
    assert loaded.load_seconds > 0


def test_versions_are_numbered_from_one_and_leave_no_temp_folders(
    store: ModelStore, publish: PublishFn
) -> None:
    versions = [publish("m", seed=s)[0].version for s in range(3)]
    assert versions == [1, 2, 3]
    assert sorted(p.name for p in (store.root / "m").iterdir()) == ["1", "2", "3"]


def test_a_broken_version_folder_keeps_its_number(store: ModelStore, publish: PublishFn) -> None:
    publish("m")
    (store.root / "m" / "2").mkdir()  # no manifest: refused, but the number is taken
    assert publish("m")[0].version == 3


def test_publishing_past_the_highest_version_number_is_refused(
    store: ModelStore, publish: PublishFn
) -> None:
    """Version folders are 1 to 999,999,999: past that, publish refuses, and leaves nothing
    (it reported a version 1000000000 the store never showed, and the next publish failed as
    "version numbers kept being taken")."""
    publish("m")
    (store.root / "m" / "999999999").mkdir()  # a broken folder: its number is taken
    with pytest.raises(FailedPrecondition, match="it has version 999999999, the highest"):
        publish("m")
    assert sorted(p.name for p in (store.root / "m").iterdir()) == ["1", "999999999"]


def test_weights_file_has_design_tensor_names_and_recorded_digest(
    store: ModelStore, publish: PublishFn
) -> None:
    manifest, _ = publish("m", small_config("lstm", "tokens", num_layers=2))
    path = store.root / "m" / "1" / "weights.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        dtypes = {f.get_tensor(n).dtype for n in names}
    expected = {"embedding.weight", "head.weight", "head.bias"} | {
        f"rnn.{p}_l{k}" for k in (0, 1) for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    }
    assert names == expected
    assert dtypes == {torch.float32}
    assert manifest.weights_sha256 == sha256_hex(path.read_bytes())
    on_disk = json.loads((store.root / "m" / "1" / "manifest.json").read_text())
    assert on_disk["weights_sha256"] == manifest.weights_sha256
    assert on_disk["created_at"].endswith("Z")


def test_frame_model_has_input_projection(store: ModelStore, publish: PublishFn) -> None:
    publish("f", small_config("gru", "features"))
    path = store.root / "f" / "1" / "weights.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert {"input_proj.weight", "input_proj.bias"} <= set(f.keys())
        assert "embedding.weight" not in set(f.keys())


@pytest.mark.parametrize(
    "name", ["", "Upper", "../escape", ".hidden", "a/b", "x" * 65, "trailing-newline\n"]
)
def test_publish_rejects_unsafe_names(store: ModelStore, name: str) -> None:
    config = small_config()
    with pytest.raises(InvalidArgument, match="invalid model name"):
        store.publish(
            name,
            config,
            seeded_model(config).state_dict(),
            description="",
            training=Training(data="x", steps=0),
        )
    assert not store.root.exists() or not any(store.root.iterdir())


def test_publish_rejects_a_state_dict_that_does_not_fit(store: ModelStore) -> None:
    state = dict(seeded_model(small_config("lstm")).state_dict())
    del state["head.bias"]
    with pytest.raises(WeightsMismatch, match=r"missing head\.bias"):
        store.publish(
            "m", small_config("lstm"), state, description="", training=Training(data="x", steps=0)
        )
    assert store.snapshot().models == {}


def test_publish_rejects_a_tokenizer_that_does_not_cover_the_vocabulary(store: ModelStore) -> None:
    config = small_config()
    with pytest.raises(InvalidArgument, match="unknown tokenizer"):
        store.publish(
            "m",
            config,
            seeded_model(config).state_dict(),
            description="",
            training=Training(data="x", steps=0),
            tokenizer="sentencepiece",
        )


def test_load_refuses_tensors_that_do_not_match_the_manifest(
    store: ModelStore, publish: PublishFn
) -> None:
    publish("m", small_config("lstm"))
    # A weights file whose digest is right but whose shapes are not what the manifest says.
    other = seeded_model(small_config("lstm", num_layers=1)).state_dict()
    data = serialize(other)
    version_dir = store.root / "m" / "1"
    (version_dir / "weights.safetensors").write_bytes(data)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest["weights_sha256"] = sha256_hex(data)
    (version_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsMismatch, match=r"missing .*rnn\.weight_ih_l1 \[32, 8\]") as info:
        store.load("m", 1)
    assert info.value.message.startswith("m/1/weights.safetensors: ")  # named within the store


def test_load_refuses_a_version_whose_weights_file_is_missing(
    store: ModelStore, publish: PublishFn
) -> None:
    publish("m")
    publish("m")
    (store.root / "m" / "1" / "weights.safetensors").unlink()
    with pytest.raises(VersionUnusable, match=r"weights\.safetensors: missing"):
        store.load("m", 1)
    assert store.load("m", 2).manifest.version == 2


def test_concurrent_publishers_get_distinct_versions(store: ModelStore) -> None:
    config = small_config()
    state = seeded_model(config).state_dict()

    def publish_one(i: int) -> int:
        training = Training(data="x", steps=i)
        return store.publish("m", config, state, description=str(i), training=training).version

    with ThreadPoolExecutor(max_workers=4) as pool:
        versions = sorted(pool.map(publish_one, range(6)))
    assert versions == [1, 2, 3, 4, 5, 6]
    snap = store.snapshot().model("m")
    assert snap.usable_versions == (1, 2, 3, 4, 5, 6)
    # Each folder holds the manifest written for its own number.
    assert all(v.manifest is not None and v.manifest.version == v.version for v in snap.versions)


@pytest.mark.parametrize("version", [0, -1, 3])
def test_load_of_a_version_that_does_not_exist(
    store: ModelStore, publish: PublishFn, version: int
) -> None:
    publish("m")
    with pytest.raises(VersionNotFound, match=f"version {version} of 'm' not found; versions: 1"):
        store.load("m", version)

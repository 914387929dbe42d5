"""The versioned model store on disk (DESIGN section 3).

    <root>/<name>/<version>/manifest.json + weights.safetensors
    <root>/<name>/aliases.json            {"production": 3, "staging": 4}

`ModelStore` publishes new versions, moves aliases, loads verified weights and re-verifies the
whole store (through `verification`; which version new sessions get is
`version_rule.VersionRule`). Everything it writes appears atomically: a version folder is built
under a hidden temp name and renamed into place, aliases.json is replaced by rename. So a
server polling `snapshot()` never sees half a version.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import ValidationError

from service.errors import (
    AliasNotFound,
    FailedPrecondition,
    InvalidArgument,
    SeqServeError,
    VersionUnusable,
    quote,
)
from service.models import ModelConfig, SequenceModel
from service.models.tokenizer import ByteTokenizer, get_tokenizer
from service.registry.aliases import (
    AliasFileError,
    aliases_locked,
    read_aliases,
    validate_alias_name,
    write_aliases,
)
from service.registry.atomic import fsync_dir, write_durably
from service.registry.checkpoint_import import ImportSpec, checkpoint_to_model
from service.registry.digests import read_verified
from service.registry.manifest import (
    MANIFEST_FILE,
    MODEL_NAME_RE,
    WEIGHTS_FILE,
    Manifest,
    TokensInput,
    Training,
)
from service.registry.snapshot import (
    ManifestError,
    ModelEntry,
    StoreSnapshot,
    check_tokenizer,
    describe_validation_error,
    model_dir_names,
    next_version,
    read_manifest,
    scan_model,
    scan_store,
)
from service.registry.verification import (
    AliasProblem,
    VerifyResult,
    alias_problems,
    check_weights,
    verify_versions,
)
from service.registry.weights import check_tensors, deserialize, serialize, sha256_hex

# How often publish retries when another publisher takes the version number it picked.
_PUBLISH_ATTEMPTS = 16


@dataclass(frozen=True)
class VerifiedModel:
    manifest: Manifest
    model: SequenceModel  # eval mode, no grad, on the requested device
    fingerprint: str  # Manifest.fingerprint(): weights digest + architecture
    tokenizer: ByteTokenizer | None  # None for a frame-input model
    load_seconds: float  # read + verify + deserialize + build


class ModelStore:
    """One store root. Cheap to construct; holds no state besides the path."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # ---- reading -------------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        """An immutable view of every model, version (with its status) and alias on disk.

        Reads folder listings, manifests and aliases.json only, never weights, so it is safe and
        cheap to call repeatedly (the server polls it). Broken entries are recorded with a
        message, never raised.
        """
        return scan_store(self.root)

    def model(self, name: str) -> ModelEntry:
        """Scan one model (cheaper than a full snapshot). Raises ModelNotFound."""
        if MODEL_NAME_RE.fullmatch(name) and (self.root / name).is_dir():  # no listing needed
            return scan_model(self.root / name)
        if name in model_dir_names(self.root):
            return scan_model(self.root / name)
        return self.snapshot().model(name)  # raises, listing what exists

    def resolve(self, name: str, spec: str = "") -> int:
        """Resolve a version spec: "" → alias `production` if set, else the latest usable
        version; "latest"; digits → that version; otherwise an alias. NotFound errors say what
        was asked and what exists."""
        return self.model(name).resolve(spec)

    def load(self, name: str, version: int, device: torch.device | str = "cpu") -> VerifiedModel:
        """Load one version: digest verified on the bytes before they are parsed, tensors
        checked against the manifest, model in eval mode on `device`.

        Raises VersionNotFound / VersionUnusable, DigestMismatch (DataLoss) or WeightsMismatch.
        """
        started = time.perf_counter()
        try:
            return self._load(name, version, device, started)
        except SeqServeError as exc:
            self.name_within(exc)
            raise

    def name_within(self, exc: SeqServeError) -> None:
        """Name the store's files in `exc` as within the store (`tok/2/weights.safetensors`),
        not by where the store is on this server, and the store itself as "the model store":
        the message reaches clients. The server passes every error of the store through here
        before a client sees it (`load`, new sessions' resolution, the ModelRegistry RPCs)."""
        exc.message = self.within(exc.message)
        exc.args = (exc.message,)

    def within(self, text: str) -> str:
        """`text` with the store's files named within it and the store as "the model store".
        Only a path that starts with the root is cut: a relative root `s` leaves `bus/1` be."""
        text = text.replace(f"the model store {self.root}", "the model store")
        return re.sub(rf"(?<![\w.~/-]){re.escape(str(self.root))}/", "", text)

    def _load(
        self, name: str, version: int, device: torch.device | str, started: float
    ) -> VerifiedModel:
        version_dir = self.model(name).usable(version).path  # raises if absent or refused
        try:  # re-read: the scan above may be a moment old
            manifest = read_manifest(version_dir, name=name, version=version)
        except ManifestError as exc:
            raise VersionUnusable(str(exc)) from exc
        weights_path = version_dir / manifest.weights_file
        data = read_verified(weights_path, manifest.weights_sha256)
        tensors = deserialize(data, str(weights_path))
        config = manifest.to_config()
        check_tensors(tensors, config, str(weights_path))
        with torch.device("meta"):  # no throwaway random init: load_state_dict assigns
            model = SequenceModel(config)
        model.load_state_dict(tensors, strict=True, assign=True)
        model.to(device).eval().requires_grad_(False)
        tokenizer = (
            get_tokenizer(manifest.input.tokenizer)
            if isinstance(manifest.input, TokensInput)
            else None
        )
        return VerifiedModel(
            manifest=manifest,
            model=model,
            fingerprint=manifest.fingerprint(),
            tokenizer=tokenizer,
            load_seconds=time.perf_counter() - started,
        )

    def verify(self) -> list[VerifyResult]:
        """Re-hash every version's weights and check its tensors; one result per version."""
        return verify_versions(self.snapshot())

    def verify_aliases(self, results: list[VerifyResult]) -> list[AliasProblem]:
        """Aliases that would refuse new sessions (see `verification.alias_problems`)."""
        return alias_problems(self.snapshot(), results)

    # ---- writing -------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        config: ModelConfig,
        state_dict: Mapping[str, torch.Tensor],
        *,
        description: str,
        training: Training,
        tokenizer: str = "bytes",
    ) -> Manifest:
        """Write `state_dict` as the next version of `name` and return its manifest."""
        self._check_name(name)
        if config.input_kind == "tokens":
            try:
                check_tokenizer(tokenizer, config.input_dim)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from exc
        check_tensors(
            {k: v.to(torch.float32) for k, v in state_dict.items()}, config, f"model {name!r}"
        )
        data = serialize(state_dict)
        digest = sha256_hex(data)
        try:
            return self._publish(name, config, data, digest, description, training, tokenizer)
        except OSError as exc:  # read-only, full, not a folder: not a bug of ours
            raise FailedPrecondition(
                f"cannot publish {quote(name)}: the model store cannot be written "
                f"({exc.strerror or type(exc).__name__})"
            ) from None

    def _publish(
        self,
        name: str,
        config: ModelConfig,
        data: bytes,
        digest: str,
        description: str,
        training: Training,
        tokenizer: str,
    ) -> Manifest:
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(_PUBLISH_ATTEMPTS):
            version = next_version(model_dir, name)
            manifest = Manifest.from_config(
                config,
                name=name,
                version=version,
                weights_sha256=digest,
                created_at=datetime.now(UTC),
                description=description,
                training=training,
                tokenizer=tokenizer,
            )
            if self._place_version(model_dir, manifest, data):
                return manifest
        raise SeqServeError(f"could not publish {name!r}: version numbers kept being taken")

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point `alias` at `version`, which must exist and be usable, and whose weights must
        pass their digest and match their manifest (as a server would load them): an alias is
        what new sessions get, and one moved to weights that fail would refuse them all."""
        validate_alias_name(alias)
        entry = self.model(name)
        usable = entry.usable(version)  # raises VersionNotFound / VersionUnusable
        assert usable.manifest is not None
        try:  # outside the lock, which orders alias writers only (versions do not take it)
            check_weights(usable.path / usable.manifest.weights_file, usable.manifest)
        except SeqServeError as exc:
            raise VersionUnusable(
                f"version {version} of {quote(name)} cannot be aliased: {exc.message}"
            ) from None
        with aliases_locked(entry.path):
            aliases = self._aliases_for_update(entry)
            aliases[alias] = version
            write_aliases(entry.path, aliases)

    def delete_alias(self, name: str, alias: str) -> None:
        validate_alias_name(alias)  # a name no alias can have is a bad argument, not "not found"
        entry = self.model(name)
        with aliases_locked(entry.path):
            aliases = self._aliases_for_update(entry)
            if alias not in aliases:
                known = ", ".join(sorted(aliases)) or "none"
                raise AliasNotFound(
                    f"alias {quote(alias)} of {quote(name)} not found; aliases: {known}"
                )
            del aliases[alias]
            write_aliases(entry.path, aliases)

    def import_checkpoint(
        self, name: str, path: Path | str, spec: ImportSpec | None = None
    ) -> Manifest:
        """Publish a `torch.save(state_dict)` checkpoint (nn.LSTM / nn.GRU weights plus input
        and head tensors) as a new version. See `checkpoint_import` for what is accepted."""
        spec = spec or ImportSpec()
        if spec.steps < 0:  # before the checkpoint is read: nothing to publish with it
            raise InvalidArgument(f"training steps must be >= 0, got {spec.steps}")
        config, state_dict = checkpoint_to_model(Path(path), spec)
        try:
            training = Training(
                data=spec.data or f"imported from {Path(path).name}",
                steps=spec.steps,
                command=spec.command,
            )
        except ValidationError as exc:  # an InvalidArgument, not a traceback, for any other
            raise InvalidArgument(
                f"invalid training record: {describe_validation_error(exc)}"
            ) from None
        return self.publish(
            name,
            config,
            state_dict,
            description=spec.description or f"imported from checkpoint {Path(path).name}",
            training=training,
            tokenizer=spec.tokenizer,
        )

    # ---- internals -----------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> None:
        if not MODEL_NAME_RE.fullmatch(name):
            raise InvalidArgument(
                f"invalid model name {quote(name)}: use lowercase letters, digits, '_', '.' or "
                "'-', starting with a letter or digit (at most 64 characters)"
            )

    @staticmethod
    def _aliases_for_update(entry: ModelEntry) -> dict[str, int]:
        try:
            return read_aliases(entry.path)
        except AliasFileError as exc:
            # Rewriting it would drop aliases someone set; a person has to look at it.
            raise FailedPrecondition(f"{exc}; fix or remove it first") from exc

    @staticmethod
    def _place_version(model_dir: Path, manifest: Manifest, data: bytes) -> bool:
        """Build the version folder under a hidden name, then rename it into place. False if
        another publisher took this version number first."""
        tmp = model_dir / f".publish-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            write_durably(tmp / WEIGHTS_FILE, data)
            body = manifest.model_dump_json(indent=2) + "\n"
            write_durably(tmp / MANIFEST_FILE, body.encode("utf-8"))
            fsync_dir(tmp)
            target = model_dir / str(manifest.version)
            if target.exists():
                return False
            try:
                os.rename(tmp, target)  # fails if a non-empty folder took the name meanwhile
            except OSError:
                return False
            fsync_dir(model_dir)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

"""The strict manifest of one model version (`model_store/<name>/<version>/manifest.json`).

Unknown fields are rejected, so a typo never silently changes what is served.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.models.config import ModelConfig

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
# Also a folder name in the store, so no separators and no leading dot.
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokensInput(_Strict):
    kind: Literal["tokens"] = "tokens"
    vocab_size: int = Field(gt=0)
    tokenizer: str = "bytes"
    """Tokenizer name; `bytes` (UTF-8 bytes, vocabulary 256) needs no files."""
    embed_dim: int = Field(gt=0)


class FeaturesInput(_Strict):
    kind: Literal["features"] = "features"
    dim: int = Field(gt=0)
    """Floats per frame."""
    embed_dim: int = Field(gt=0)


class ClassificationHead(_Strict):
    kind: Literal["classification"] = "classification"


class RegressionHead(_Strict):
    kind: Literal["regression"] = "regression"
    dim: int = Field(gt=0)


class Training(_Strict):
    """Where the weights came from."""

    data: str
    """The data set, precise enough to find it again."""
    steps: int = Field(ge=0)
    seed: int | None = None
    final_loss: float | None = None
    validation: dict[str, float] = Field(default_factory=dict)
    """Validation figures by metric name (e.g. `bits_per_byte`, `mae`)."""
    baselines: dict[str, float] = Field(default_factory=dict)
    """The same figures for a trivial baseline, for comparison."""
    command: str | None = None
    """The command that produced this version."""


class Manifest(_Strict):
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int = Field(gt=0)
    cell: Literal["lstm", "gru"]
    reset_after: bool = True
    """GRU only: true = torch/cuDNN, false = the article's GRU."""
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    input: Annotated[TokensInput | FeaturesInput, Field(discriminator="kind")]
    head: Annotated[ClassificationHead | RegressionHead, Field(discriminator="kind")]
    dtype: Literal["float32"] = "float32"
    weights_file: str = Field(default=WEIGHTS_FILE, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    """A file name inside the version folder (no path separators, so it cannot point outside)."""
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: datetime
    description: str = ""
    training: Training

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        *,
        name: str,
        version: int,
        weights_sha256: str,
        created_at: datetime,
        description: str,
        training: Training,
        tokenizer: str = "bytes",
    ) -> Manifest:
        """The manifest describing `config`; the inverse of `to_config`."""
        model_input: TokensInput | FeaturesInput
        if config.input_kind == "tokens":
            model_input = TokensInput(
                vocab_size=config.input_dim, tokenizer=tokenizer, embed_dim=config.embed_dim
            )
        else:
            model_input = FeaturesInput(dim=config.input_dim, embed_dim=config.embed_dim)
        head: ClassificationHead | RegressionHead
        if config.head_kind == "classification":
            head = ClassificationHead()
        else:
            head = RegressionHead(dim=config.output_dim)
        return cls(
            name=name,
            version=version,
            cell=config.cell,
            reset_after=config.reset_after,
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            input=model_input,
            head=head,
            weights_sha256=weights_sha256,
            created_at=created_at,
            description=description,
            training=training,
        )

    def to_config(self) -> ModelConfig:
        input_dim = self.input.vocab_size if isinstance(self.input, TokensInput) else self.input.dim
        output_dim = input_dim if isinstance(self.head, ClassificationHead) else self.head.dim
        return ModelConfig(
            cell=self.cell,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            input_kind=self.input.kind,
            input_dim=input_dim,
            embed_dim=self.input.embed_dim,
            head_kind=self.head.kind,
            output_dim=output_dim,
            reset_after=self.reset_after,
        )

    def fingerprint(self) -> str:
        """Identity of what a session's state means: the weights digest plus the architecture."""
        arch = self.model_dump(
            mode="json",
            include={"cell", "reset_after", "num_layers", "hidden_size", "input", "head"},
        )
        blob = json.dumps({"weights": self.weights_sha256, "arch": arch}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

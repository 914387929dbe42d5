"""The architecture of one served model, independent of where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CellKind = Literal["lstm", "gru"]
InputKind = Literal["tokens", "features"]
HeadKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class ModelConfig:
    cell: CellKind  # "lstm" or "gru"
    num_layers: int  # stacked recurrent layers
    hidden_size: int  # H: width of h (and c)
    input_kind: InputKind  # "tokens" (Embedding) or "features" (Linear over frames)
    input_dim: int  # vocabulary size for tokens, frame width for features
    embed_dim: int  # width fed to the first recurrent layer
    head_kind: HeadKind  # "classification" (logits over the vocabulary) or "regression"
    output_dim: int  # vocabulary size for classification, output width for regression
    reset_after: bool = True  # GRU only: True = torch/cuDNN, False = the article's GRU

    def __post_init__(self) -> None:
        assert self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}"
        assert self.hidden_size >= 1, f"hidden_size must be >= 1, got {self.hidden_size}"
        assert self.input_dim >= 1 and self.embed_dim >= 1 and self.output_dim >= 1
        if self.head_kind == "classification":
            assert self.input_kind == "tokens", "a classification head needs token input"
            assert self.output_dim == self.input_dim, "classification is over the input vocabulary"

    @property
    def gates(self) -> int:
        """Gate blocks stacked in weight_ih / weight_hh: LSTM i,f,g,o; GRU r,z,n."""
        return 4 if self.cell == "lstm" else 3

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    def state_numel(self) -> int:
        """Floats of recurrent state one session holds (h, and c for an LSTM)."""
        per = self.num_layers * self.hidden_size
        return 2 * per if self.has_cell_state else per

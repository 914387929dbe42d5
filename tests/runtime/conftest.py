"""Shared pieces for the runtime tests: the model factories and the NumPy reference of the cells
(tests/models/, loaded by path since tests/ is not a package), and tiny pools and runners over
seeded models. Everything here runs on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from service.models import ModelConfig, SequenceModel
from service.runtime.runner import ModelRunner
from service.runtime.state_pool import ByteBudget, SlotSnapshot, StatePool


def _load(name: str, filename: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "models" / filename
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


# The same module name tests/api/support.py uses, so the reference is loaded once.
ref = _load("seqserve_tests_reference", "reference.py")
factories = _load("seqserve_tests_factories", "factories.py")

ATOL: float = factories.ATOL  # float32 model against the float64 reference
CELLS: list[tuple[str, bool]] = factories.CELLS
CELL_IDS: list[str] = factories.CELL_IDS
VOCAB: int = factories.VOCAB
FRAME: int = factories.FRAME
REG_OUT: int = factories.REG_OUT
make_config = factories.make_config
make_model = factories.make_model

BIG_BUDGET = 1 << 30


def token_config(cell: str = "lstm", reset_after: bool = True, layers: int = 2) -> ModelConfig:
    return make_config(cell, reset_after, layers, "tokens", "classification")


def head_output(pool: StatePool, slot: int) -> np.ndarray:
    """What the session in `slot` predicts next: the head over its top-layer h [out]."""
    return pool.outputs(pool.h[-1, slot : slot + 1])[0].float().numpy()


def make_runner(
    config: ModelConfig, seed: int = 0, slots: int = 8, budget: ByteBudget | None = None
) -> tuple[SequenceModel, StatePool, ModelRunner]:
    model = make_model(config, seed=seed)
    pool = StatePool(
        config,
        budget or ByteBudget(BIG_BUDGET),
        initial_slots=slots,
        head=model.head,
    )
    return model, pool, ModelRunner(model, pool)


def random_snapshot(config: ModelConfig, rng: np.random.Generator) -> SlotSnapshot:
    """A nonzero state for one slot (h in (-0.9, 0.9), c wide)."""
    shape = (config.num_layers, config.hidden_size)
    return SlotSnapshot(
        h=rng.uniform(-0.9, 0.9, size=shape).astype(np.float32),
        c=rng.normal(0.0, 1.5, size=shape).astype(np.float32) if config.has_cell_state else None,
    )


def reference_run(model: SequenceModel, snap: SlotSnapshot, inputs: np.ndarray):  # type: ignore[no-untyped-def]
    """The NumPy reference from one slot's state over inputs [T] tokens or [T, D] frames.

    Returns (head outputs [T, out], h [L, H], c [L, H] or None), float64."""
    out = ref.run_model(
        ref.numpy_state_dict(model),
        model.config,
        np.asarray(inputs)[None],
        h0=snap.h[:, None],
        c0=None if snap.c is None else snap.c[:, None],
    )
    return out.outputs[0], out.h[:, 0], None if out.c is None else out.c[:, 0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)

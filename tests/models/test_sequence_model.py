"""SequenceModel (forward, step, run_chunk) against the NumPy reference, to 1e-5, from nonzero
states, over 50+ steps, for every cell × input × head and 2–3 layers; plus chunk-at-once equals
step-by-step, and the served call leaves its input state alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import service.models.sequence_model as sequence_model_module
from service.models import RecurrentState, SequenceModel

from . import reference as ref
from .factories import (
    ATOL,
    CELL_IDS,
    CELLS,
    IO_IDS,
    IO_KINDS,
    make_config,
    make_model,
    random_inputs,
    random_state,
    state_numpy,
    to_state,
)

STEPS = 55
BATCH = 4
LENGTHS = np.array([STEPS, 1, 31, STEPS - 2])  # unsorted, one full row, one single input

every_model = pytest.mark.parametrize(
    ("cell", "reset_after", "input_kind", "head_kind"),
    [(c, r, i, h) for c, r in CELLS for i, h in IO_KINDS],
    ids=[f"{c}-{i}" for c in CELL_IDS for i in IO_IDS],
)
layers_2_3 = pytest.mark.parametrize("num_layers", [2, 3])


def _setup(cell, reset_after, input_kind, head_kind, num_layers, seed):
    config = make_config(cell, reset_after, num_layers, input_kind, head_kind)
    model = make_model(config, seed=seed)
    rng = np.random.default_rng(seed)
    inputs = random_inputs(config, BATCH, STEPS, rng)
    h0, c0 = random_state(config, BATCH, rng)
    return config, model, inputs, h0, c0


def _assert_state(state: RecurrentState, expect_h, expect_c) -> None:
    h, c = state_numpy(state)
    np.testing.assert_allclose(h, expect_h, rtol=0, atol=ATOL)
    if expect_c is None:
        assert c is None
    else:
        np.testing.assert_allclose(c, expect_c, rtol=0, atol=ATOL)


def _step_all(model: SequenceModel, inputs: np.ndarray, state: RecurrentState):
    """step() over every position → (outputs [B, T, out], final state)."""
    outs = []
    for t in range(inputs.shape[1]):
        out, state = model.step(torch.from_numpy(np.ascontiguousarray(inputs[:, t])), state)
        outs.append(out)
    return torch.stack(outs, 1).numpy(), state


# ---- forward (training path) ---------------------------------------------------------------


@every_model
@layers_2_3
def test_forward_matches_reference(cell, reset_after, input_kind, head_kind, num_layers):
    config, model, inputs, h0, c0 = _setup(cell, reset_after, input_kind, head_kind, num_layers, 1)
    with torch.no_grad():
        out, state = model(torch.from_numpy(inputs), to_state(h0, c0))

    expect = ref.run_model(ref.numpy_state_dict(model), config, inputs, h0, c0)
    assert out.shape == (BATCH, STEPS, config.output_dim)
    np.testing.assert_allclose(out.numpy(), expect.outputs, rtol=0, atol=ATOL)
    _assert_state(state, expect.h, expect.c)


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_forward_from_zero_state(cell, reset_after):
    config, model, inputs, _, _ = _setup(cell, reset_after, "tokens", "classification", 2, 2)
    with torch.no_grad():
        out, state = model(torch.from_numpy(inputs))
    expect = ref.run_model(ref.numpy_state_dict(model), config, inputs)
    np.testing.assert_allclose(out.numpy(), expect.outputs, rtol=0, atol=ATOL)
    _assert_state(state, expect.h, expect.c)


# ---- step (hand-fused serving path) --------------------------------------------------------


@every_model
@layers_2_3
def test_step_matches_reference(cell, reset_after, input_kind, head_kind, num_layers):
    config, model, inputs, h0, c0 = _setup(cell, reset_after, input_kind, head_kind, num_layers, 3)
    outs, state = _step_all(model, inputs, to_state(h0, c0))
    # Token models take the folded embedding → gate table path.
    assert (model._gate_table is not None) == (input_kind == "tokens")

    expect = ref.run_model(ref.numpy_state_dict(model), config, inputs, h0, c0)
    np.testing.assert_allclose(outs, expect.outputs, rtol=0, atol=ATOL)
    _assert_state(state, expect.h, expect.c)


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_step_tokens_without_gate_table(cell, reset_after, monkeypatch):
    """A vocabulary too large for the gate table: tokens go through the embedding each step."""
    monkeypatch.setattr(sequence_model_module, "_GATE_TABLE_MAX_BYTES", 0)
    config, model, inputs, h0, c0 = _setup(cell, reset_after, "tokens", "classification", 2, 4)
    outs, state = _step_all(model, inputs, to_state(h0, c0))
    assert model._gate_table is None

    expect = ref.run_model(ref.numpy_state_dict(model), config, inputs, h0, c0)
    np.testing.assert_allclose(outs, expect.outputs, rtol=0, atol=ATOL)
    _assert_state(state, expect.h, expect.c)


@every_model
def test_step_does_not_mutate_input_state(cell, reset_after, input_kind, head_kind):
    _config, model, inputs, h0, c0 = _setup(cell, reset_after, input_kind, head_kind, 2, 5)
    state = to_state(h0, c0)
    before = RecurrentState(state.h.clone(), None if state.c is None else state.c.clone())
    _, new_state = model.step(torch.from_numpy(np.ascontiguousarray(inputs[:, 0])), state)

    assert torch.equal(state.h, before.h)
    assert state.c is None or torch.equal(state.c, before.c)
    assert not torch.equal(new_state.h, state.h)  # the step did produce a different state
    assert new_state.h.data_ptr() != state.h.data_ptr()


# ---- run_chunk (many inputs per row) -------------------------------------------------------


@every_model
@layers_2_3
@pytest.mark.parametrize("all_positions", [False, True], ids=["last", "all-positions"])
def test_run_chunk_variable_lengths_matches_reference(
    cell, reset_after, input_kind, head_kind, num_layers, all_positions
):
    config, model, inputs, h0, c0 = _setup(cell, reset_after, input_kind, head_kind, num_layers, 6)
    state = to_state(h0, c0)
    out, new_state = model.run_chunk(
        torch.from_numpy(inputs), state, torch.from_numpy(LENGTHS), all_positions=all_positions
    )

    expect = ref.run_model(ref.numpy_state_dict(model), config, inputs, h0, c0, LENGTHS)
    if all_positions:
        assert out.shape == (BATCH, STEPS, config.output_dim)
        valid = np.arange(STEPS)[None, :] < LENGTHS[:, None]  # [B, T]; past a row's end: padding
        np.testing.assert_allclose(out.numpy()[valid], expect.outputs[valid], rtol=0, atol=ATOL)
    else:
        assert out.shape == (BATCH, config.output_dim)
        np.testing.assert_allclose(out.numpy(), expect.last, rtol=0, atol=ATOL)
    _assert_state(new_state, expect.h, expect.c)
    # The input state is left alone.
    np.testing.assert_array_equal(state.h.numpy(), h0)
    if c0 is not None:
        assert state.c is not None
        np.testing.assert_array_equal(state.c.numpy(), c0)


@every_model
def test_run_chunk_full_lengths_matches_reference(cell, reset_after, input_kind, head_kind):
    config, model, inputs, h0, c0 = _setup(cell, reset_after, input_kind, head_kind, 3, 7)
    lengths = torch.full((BATCH,), STEPS)
    last, state = model.run_chunk(torch.from_numpy(inputs), to_state(h0, c0), lengths)
    every, _ = model.run_chunk(torch.from_numpy(inputs), to_state(h0, c0), lengths, True)

    expect = ref.run_model(ref.numpy_state_dict(model), config, inputs, h0, c0)
    np.testing.assert_allclose(last.numpy(), expect.last, rtol=0, atol=ATOL)
    np.testing.assert_allclose(every.numpy(), expect.outputs, rtol=0, atol=ATOL)
    _assert_state(state, expect.h, expect.c)


# ---- chunk-at-once equals step-by-step -----------------------------------------------------


@every_model
def test_chunk_at_once_equals_step_by_step(cell, reset_after, input_kind, head_kind):
    _config, model, inputs, h0, c0 = _setup(cell, reset_after, input_kind, head_kind, 3, 8)
    full = torch.full((BATCH,), STEPS)

    stepped, step_state = _step_all(model, inputs, to_state(h0, c0))
    chunked, chunk_state = model.run_chunk(torch.from_numpy(inputs), to_state(h0, c0), full, True)
    np.testing.assert_allclose(chunked.numpy(), stepped, rtol=0, atol=ATOL)
    _assert_state(chunk_state, *state_numpy(step_state))

    # The same sequence fed as three chunks (20 + 1 + 34), state carried between them.
    state = to_state(h0, c0)
    pieces = []
    for lo, hi in ((0, 20), (20, 21), (21, STEPS)):
        piece = torch.from_numpy(np.ascontiguousarray(inputs[:, lo:hi]))
        out, state = model.run_chunk(piece, state, torch.full((BATCH,), hi - lo), True)
        pieces.append(out.numpy())
    np.testing.assert_allclose(np.concatenate(pieces, 1), stepped, rtol=0, atol=ATOL)
    _assert_state(state, *state_numpy(step_state))


@every_model
def test_variable_length_chunk_equals_stepping_each_row(cell, reset_after, input_kind, head_kind):
    _config, model, inputs, h0, c0 = _setup(cell, reset_after, input_kind, head_kind, 2, 9)
    last, state = model.run_chunk(
        torch.from_numpy(inputs), to_state(h0, c0), torch.from_numpy(LENGTHS)
    )
    for b, n in enumerate(LENGTHS):
        row_state = to_state(h0[:, b : b + 1], None if c0 is None else c0[:, b : b + 1])
        row_outs, row_state = _step_all(model, inputs[b : b + 1, :n], row_state)
        np.testing.assert_allclose(last.numpy()[b], row_outs[0, -1], rtol=0, atol=ATOL)
        np.testing.assert_allclose(state.h.numpy()[:, b], row_state.h.numpy()[:, 0], atol=ATOL)
        if c0 is not None:
            assert state.c is not None and row_state.c is not None
            np.testing.assert_allclose(state.c.numpy()[:, b], row_state.c.numpy()[:, 0], atol=ATOL)


# ---- the reference reads served weights by name --------------------------------------------


@pytest.mark.parametrize(("cell", "reset_after"), CELLS, ids=CELL_IDS)
def test_reference_reads_safetensors_and_manifest_layout(cell, reset_after, tmp_path):
    config, model, inputs, h0, c0 = _setup(cell, reset_after, "features", "regression", 2, 10)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    manifest_like = {  # manifest.json's architecture fields
        "cell": cell,
        "reset_after": reset_after,
        "num_layers": 2,
        "hidden_size": config.hidden_size,
        "input": {"kind": "features", "dim": config.input_dim, "embed_dim": config.embed_dim},
        "head": {"kind": "regression", "dim": config.output_dim},
    }
    with torch.no_grad():
        out, _ = model(torch.from_numpy(inputs), to_state(h0, c0))

    expect = ref.run_model(ref.load_safetensors(path), manifest_like, inputs, h0, c0)
    np.testing.assert_allclose(out.numpy(), expect.outputs, rtol=0, atol=ATOL)

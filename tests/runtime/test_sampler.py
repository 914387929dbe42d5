"""sample(), SessionRng and SamplingParams.validate.

Greedy is the argmax; temperature / top_k / top_p restrict the support to what a NumPy
reference of the same rule keeps (and every kept token is reachable); each draw is the inverse
CDF of the kept distribution at the row's own uniform number, so a seed gives one sequence and a
row's draw does not depend on the other rows of the batch."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from service.errors import InvalidArgument
from service.runtime.sampler import (
    SamplingParams,
    SessionRng,
    ranked_tokens,
    sample,
    sort_descending,
)

V = 40


def _logits(rows: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * scale


class _FixedU:
    """An RNG stand-in returning the given uniform numbers in turn."""

    def __init__(self, *u: float) -> None:
        self._u = list(u)

    def uniform(self) -> float:
        return self._u.pop(0)


def _kept(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Reference of the rule: (kept token ids best first, their renormalised probabilities)."""
    z = np.asarray(logits, dtype=np.float64) / p.temperature
    order = np.argsort(-z, kind="stable")
    probs = np.exp(z[order] - z[order][0])
    probs /= probs.sum()
    k = p.top_k or len(z)
    before = np.cumsum(probs) - probs  # mass of strictly better tokens
    keep = (np.arange(len(z)) < k) & ((before < p.top_p) | (np.arange(len(z)) == 0))
    kept = order[keep]
    return kept, probs[keep] / probs[keep].sum()


def _reference_draw(logits: np.ndarray, p: SamplingParams, u: float) -> set[int]:
    """Tokens the inverse CDF at u may give: normally one; two when u sits within float32
    noise of a boundary between kept tokens."""
    kept, probs = _kept(logits, p)
    hi = np.cumsum(probs)
    lo = hi - probs
    tol = 1e-5
    return {int(t) for t, a, b in zip(kept, lo, hi, strict=True) if a - tol <= u < b + tol}


# ---- the support ------------------------------------------------------------------------------


def test_greedy_is_the_argmax_of_each_row() -> None:
    logits = _logits(64, seed=0)
    params = [SamplingParams(temperature=0.0)] * 64
    out = sample(logits, params, [SessionRng.seeded(i) for i in range(64)])
    assert out.dtype == torch.int64 and out.shape == (64,)
    assert out.tolist() == logits.argmax(dim=1).tolist()


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-38, 1e-45])
def test_a_temperature_near_zero_draws_the_argmax(temperature: float) -> None:
    """Inside the valid range (0, 100]: logits / 1e-38 overflowed to inf, inf - inf made the
    softmax NaN, and the draw was garbage (the least likely token, for one row)."""
    logits = _logits(16, seed=4, scale=20.0)
    params = [SamplingParams(temperature=temperature)] * 16
    draws = sample(logits, params, [SessionRng.seeded(i) for i in range(16)])
    assert draws.tolist() == logits.argmax(dim=1).tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=5.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=1e-6),
        SamplingParams(temperature=5.0, top_k=3, top_p=1e-6),
    ],
    ids=["top_k=1", "top_p tiny", "both"],
)
def test_a_cut_to_one_token_always_gives_the_argmax(params: SamplingParams) -> None:
    logits = _logits(1, seed=1, scale=0.3)  # nearly uniform: without the cut, anything goes
    best = int(logits.argmax())
    rng = SessionRng.seeded(3)
    draws = [int(sample(logits, [params], [rng])[0]) for _ in range(300)]
    assert set(draws) == {best}


def test_top_k_draws_stay_in_the_k_best_and_reach_each_of_them() -> None:
    logits = _logits(1, seed=2, scale=0.5)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    rng = SessionRng.seeded(4)
    draws = [int(sample(logits, [SamplingParams(top_k=5)], [rng])[0]) for _ in range(2000)]
    assert set(draws) == top5
    # Without the cut, the same near-uniform distribution leaves the top 5 most of the time.
    rng = SessionRng.seeded(4)
    free = [int(sample(logits, [SamplingParams()], [rng])[0]) for _ in range(200)]
    assert sum(t not in top5 for t in free) > 100


@pytest.mark.parametrize(
    ("temperature", "top_p", "expected"),
    [
        (1.0, 0.3, {0}),
        (1.0, 0.5, {0, 1}),
        (1.0, 0.56, {0, 1, 2}),
        (1.0, 0.85, {0, 1, 2, 3, 4}),
        (1.0, 1.0, {0, 1, 2, 3, 4, 5}),
        (0.5, 0.5, {0}),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_the_mass(
    temperature: float, top_p: float, expected: set[int]
) -> None:
    # Best first by id; the mass of strictly better tokens is 0, .4, .551, .7, .82, .92. At
    # temperature 0.5 they sharpen to .68, .10, ... so 0.5 is reached by the first alone.
    probs = np.array([0.4, 0.151, 0.149, 0.12, 0.1, 0.08])
    logits = torch.tensor(np.log(probs), dtype=torch.float32)[None]
    params = SamplingParams(temperature=temperature, top_p=top_p)
    kept, _ = _kept(logits[0].numpy(), params)
    assert set(kept.tolist()) == expected  # the reference of the rule agrees with the table
    rng = SessionRng.seeded(8)
    draws = {int(sample(logits, [params], [rng])[0]) for _ in range(1500)}
    assert draws == expected


def test_a_set_reaching_top_p_exactly_is_enough() -> None:
    """Two equal logits: 0.5 each, exactly. The best token alone reaches top_p = 0.5, so the
    other (its mass of better tokens is exactly 0.5, not below) is cut."""
    logits = torch.zeros(1, 2)
    rng = SessionRng.seeded(12)
    draws = {int(sample(logits, [SamplingParams(top_p=0.5)], [rng])[0]) for _ in range(100)}
    assert len(draws) == 1
    draws = {int(sample(logits, [SamplingParams(top_p=0.51)], [rng])[0]) for _ in range(100)}
    assert draws == {0, 1}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=7),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=2.0, top_k=12, top_p=0.6),
    ],
    ids=["plain", "top_k", "top_p", "both"],
)
def test_each_draw_is_the_inverse_cdf_of_the_kept_distribution(params: SamplingParams) -> None:
    """The sampler against a NumPy transcription of the rule, draw by draw: the same uniform
    number from the same seeded stream picks the same token."""
    logits = _logits(200, seed=5)
    rngs = [SessionRng.seeded(100 + i) for i in range(200)]
    out = sample(logits, [params] * 200, rngs).tolist()
    mirror = [np.random.Generator(np.random.PCG64(100 + i)) for i in range(200)]
    for i, token in enumerate(out):
        u = float(mirror[i].random())
        assert token in _reference_draw(logits[i].numpy(), params, u), (i, u)


def test_a_draw_at_either_end_of_the_uniform_range_stays_in_the_support() -> None:
    logits = _logits(1, seed=6)
    params = SamplingParams(temperature=1.0, top_k=3)
    ranked = torch.argsort(logits[0], descending=True).tolist()
    low = sample(logits, [params], [_FixedU(0.0)])  # type: ignore[list-item]
    high = sample(logits, [params], [_FixedU(1.0 - 2**-53)])  # type: ignore[list-item]
    assert int(low[0]) == ranked[0]
    assert int(high[0]) == ranked[2]  # the last kept token, never a cut one


# ---- seeds and batching -----------------------------------------------------------------------


def test_the_same_seed_gives_the_same_sequence_and_another_seed_another() -> None:
    logits = _logits(1, seed=7, scale=0.5)
    params = [SamplingParams(temperature=1.0)]

    def run(seed: int) -> list[int]:
        rng = SessionRng.seeded(seed)
        return [int(sample(logits, params, [rng])[0]) for _ in range(50)]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_a_rows_draw_does_not_depend_on_the_rest_of_the_batch() -> None:
    logits = _logits(6, seed=8, scale=0.5)
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),  # greedy rows mixed in
        SamplingParams(temperature=1.5, top_k=4),
        SamplingParams(temperature=0.8, top_p=0.7),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0, top_k=10, top_p=0.9),
    ]
    batched: list[list[int]] = []
    alone: list[list[int]] = []
    rngs = [SessionRng.seeded(40 + i) for i in range(6)]
    for _ in range(20):
        batched.append(sample(logits, params, rngs).tolist())
    rngs = [SessionRng.seeded(40 + i) for i in range(6)]
    for _ in range(20):
        alone.append([int(sample(logits[i : i + 1], [params[i]], [rngs[i]])[0]) for i in range(6)])
    assert batched == alone
    # And in another order, with other rows between them.
    rngs = [SessionRng.seeded(40 + i) for i in range(6)]
    perm = [5, 2, 0, 4, 1, 3]
    for step in range(20):
        out = sample(logits[perm], [params[i] for i in perm], [rngs[i] for i in perm]).tolist()
        assert [out[perm.index(i)] for i in range(6)] == batched[step]


def _sample_before(
    logits: torch.Tensor, params: list[SamplingParams], rngs: list[SessionRng]
) -> torch.Tensor:
    """`sample` as it was before its numpy sort and its no-cut path (commit d522e4d), kept
    verbatim as the oracle: seeded sessions must draw the very same tokens as before."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    if greedy:
        out[greedy] = logits[greedy].argmax(dim=1).cpu()
    rand = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if not rand:
        return out
    sub = logits[rand].float().cpu()
    temps = torch.tensor([params[i].temperature for i in rand]).unsqueeze(1)
    sorted_logits, order = torch.sort(sub / temps, dim=1, descending=True)
    probs = torch.softmax(sorted_logits, dim=1)
    rank = torch.arange(vocab).unsqueeze(0)
    top_k = torch.tensor([params[i].top_k or vocab for i in rand]).unsqueeze(1)
    top_p = torch.tensor([params[i].top_p for i in rand]).unsqueeze(1)
    mass_before = torch.cumsum(probs, dim=1) - probs
    keep = (rank < top_k) & ((mass_before < top_p) | (rank == 0))
    cdf = torch.cumsum(probs * keep, dim=1)
    u = torch.tensor([rngs[i].uniform() for i in rand], dtype=cdf.dtype).unsqueeze(1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=vocab - 1)
    pick = torch.minimum(pick, keep.sum(dim=1, keepdim=True) - 1)
    out[rand] = order.gather(1, pick).squeeze(1)
    return out


_MIXES = [
    [SamplingParams()],  # the defaults: no cut
    [SamplingParams(temperature=0.7)],
    [SamplingParams(top_k=5), SamplingParams(top_p=0.8), SamplingParams(temperature=0.0)],
    [SamplingParams(temperature=1.3, top_k=V), SamplingParams(temperature=2.0, top_p=0.5)],
]


@pytest.mark.parametrize("mix", range(len(_MIXES)))
@pytest.mark.parametrize("ties", [False, True])
def test_seeded_draws_are_the_same_tokens_as_before_the_faster_sort(mix: int, ties: bool) -> None:
    gen = torch.Generator().manual_seed(mix)
    for batch in (1, 3, 64):
        logits = torch.randn(batch, V, generator=gen) * 3
        if ties:  # equal logits in every row (the order among them is torch's, kept)
            logits[:, 5:15] = 0.25
            logits[0, :] = 1.0  # and a row that is all one value
            logits[-1, 20:60] = 8.0  # and one whose draws land in a long tie at the top
        params = [_MIXES[mix][i % len(_MIXES[mix])] for i in range(batch)]
        now = [SessionRng.seeded(7 + i) for i in range(batch)]
        before = [SessionRng.seeded(7 + i) for i in range(batch)]
        for _ in range(30):
            expected = _sample_before(logits, params, before).tolist()
            assert sample(logits, params, now).tolist() == expected


@pytest.mark.parametrize("ties", [False, True])
def test_sorted_values_and_each_ranks_token_are_torch_sorts(ties: bool) -> None:
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    if ties:
        x[3, 7] = x[3, 9]
        x[4, 100:140] = 0.5  # a run of equal values, long enough for torch's order to be its own
        x[5, :] = 0.0
        x[6, 0], x[6, 1] = 0.0, -0.0  # equal, though not the same bits
    values, order = sort_descending(x)
    expected = torch.sort(x, dim=1, descending=True)
    assert order is None and torch.equal(values, expected.values)
    for rank in range(x.shape[1]):
        ranks = torch.full((x.shape[0], 1), rank, dtype=torch.int64)
        tokens = ranked_tokens(x, values, ranks)
        assert tokens.dtype == torch.int64
        assert torch.equal(tokens, expected.indices[:, rank]), rank


def test_a_nan_logit_row_is_sorted_by_torch() -> None:
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    x[1, 2] = float("nan")
    values, order = sort_descending(x)
    expected = torch.sort(x, dim=1, descending=True)
    assert order is not None and torch.equal(order, expected.indices)
    assert torch.equal(values.isnan(), expected.values.isnan())


# ---- SessionRng -------------------------------------------------------------------------------


def test_session_rng_state_round_trip_continues_the_stream() -> None:
    rng = SessionRng.seeded(2**62 + 5)
    for _ in range(7):
        rng.uniform()
    state = rng.get_state()
    via_json = json.loads(json.dumps(state))  # the state travels in spill headers as JSON
    copy, restored = SessionRng.from_state(state), SessionRng.from_state(via_json)
    expected = [rng.uniform() for _ in range(10)]
    assert [copy.uniform() for _ in range(10)] == expected
    assert [restored.uniform() for _ in range(10)] == expected
    # The copies are independent streams: drawing from one does not advance another.
    assert rng.get_state() == copy.get_state() == restored.get_state()
    copy.uniform()
    assert rng.get_state() != copy.get_state()
    state["state"]["state"] = 0  # nor does editing the dict taken from it
    assert rng.uniform() == restored.uniform()


def test_a_seeded_session_rng_is_numpy_pcg64_with_that_seed() -> None:
    rng = SessionRng.seeded(123)
    mirror = np.random.Generator(np.random.PCG64(123))
    assert [rng.uniform() for _ in range(5)] == [float(mirror.random()) for _ in range(5)]
    a, b = SessionRng(), SessionRng()  # unseeded: each its own stream
    assert [a.uniform() for _ in range(4)] != [b.uniform() for _ in range(4)]


# ---- SamplingParams.validate ------------------------------------------------------------------


def test_defaults_and_the_edges_of_every_range_are_valid() -> None:
    SamplingParams().validate(V, 16)
    SamplingParams(
        temperature=0.0, top_k=0, top_p=1.0, max_tokens=1, stop_token_ids=(0, V - 1)
    ).validate(V, 16)
    SamplingParams(temperature=100.0, top_k=V + 5, top_p=1e-9, max_tokens=16).validate(V, 16)
    SamplingParams(stop_strings=("é" * 128,) * 16, stop_token_ids=(1,) * 1024).validate(V, 16)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(temperature=-0.01), "temperature must be in [0, 100]"),
        (SamplingParams(temperature=100.01), "temperature must be in [0, 100]"),
        (SamplingParams(temperature=float("nan")), "temperature must be in [0, 100]"),
        (SamplingParams(top_k=-1), "top_k must be >= 0"),
        (SamplingParams(top_p=0.0), "top_p must be in (0, 1]"),
        (SamplingParams(top_p=1.0001), "top_p must be in (0, 1]"),
        (SamplingParams(top_p=float("nan")), "top_p must be in (0, 1]"),
        (SamplingParams(max_tokens=0), "max_tokens must be in [1, 16]"),
        (SamplingParams(max_tokens=17), "max_tokens must be in [1, 16]"),
        (SamplingParams(stop_token_ids=(3, V, -1)), f"out of range [0, {V}): [{V}, -1]"),
        (SamplingParams(stop_strings=("ok", "")), "stop strings must not be empty"),
        (SamplingParams(stop_strings=("s",) * 17), "at most 16 stop strings, got 17"),
        (SamplingParams(stop_strings=("é" * 129,)), "at most 256 bytes"),
        (SamplingParams(stop_token_ids=(1,) * 1025), "at most 1024 stop token ids, got 1025"),
    ],
)
def test_validate_refuses_each_bad_field(params: SamplingParams, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        params.validate(V, 16)
    assert message in err.value.message


# ---- SessionRng held as a seed and a count until first use --------------------------------------


def test_a_seeded_rng_builds_no_generator_until_it_draws_and_skips_and_rewinds_the_same() -> None:
    lazy, eager = SessionRng.seeded(77), SessionRng.seeded(77)
    eager.uniform()  # built from here on
    eager.rewind(1)
    assert not lazy.built and eager.built
    for rng in (lazy, eager):
        rng.skip(10)
        rng.rewind(3)
    assert not lazy.built  # skipping and rewinding count, they build nothing
    assert lazy.get_state() == eager.get_state()  # nor does reading the state
    assert not lazy.built
    mirror = np.random.Generator(np.random.PCG64(77))
    mirror.bit_generator.advance(7)  # type: ignore[attr-defined]
    expected = [float(mirror.random()) for _ in range(3)]
    assert [lazy.uniform() for _ in range(3)] == expected == [eager.uniform() for _ in range(3)]
    assert lazy.built


def test_a_rewind_past_the_seed_is_the_same_stream_stepped_back() -> None:
    lazy, eager = SessionRng.seeded(5), SessionRng.seeded(5)
    eager.get_state()
    eager.uniform()
    eager.rewind(1)  # built, back at the start
    lazy.rewind(2)
    eager.rewind(2)
    assert lazy.uniform() == eager.uniform()


@pytest.mark.parametrize("built", [False, True], ids=["seed-and-count", "generator"])
def test_a_copy_continues_the_same_stream_independently(built: bool) -> None:
    rng = SessionRng.seeded(9)
    rng.skip(4)
    if built:
        rng.uniform()
    twin = rng.copy()
    assert twin.built == built and twin.get_state() == rng.get_state()
    drawn = [twin.uniform() for _ in range(3)]
    assert [rng.uniform() for _ in range(3)] == drawn  # the copy's draws did not move it


@pytest.mark.parametrize("draws", [0, 5, -2], ids=["fresh", "skipped", "rewound"])
def test_a_record_keeps_an_unbuilt_stream_as_its_seed_and_count(draws: int) -> None:
    """`record_state` of a stream never built is its seed and count (no generator built to read
    it); read back through JSON it is the same stream, still unbuilt. A built stream's record
    state is numpy's, and `from_state` reads both forms."""
    rng = SessionRng.seeded(31)
    if draws >= 0:
        rng.skip(draws)
    else:
        rng.rewind(-draws)
    state = json.loads(json.dumps(rng.record_state()))
    assert state == {"seed": 31, "draws": draws} and not rng.built
    back = SessionRng.from_state(state)
    assert not back.built
    assert [back.uniform() for _ in range(3)] == [rng.uniform() for _ in range(3)]
    assert rng.built and rng.record_state() == rng.get_state()  # numpy's form once built
    again = SessionRng.from_state(json.loads(json.dumps(rng.record_state())))
    assert again.built and again.uniform() == rng.uniform()


def test_an_unbuilt_rng_is_small() -> None:
    """The point of holding a seed: no numpy objects per session that never generates."""
    rng = SessionRng.seeded(2**62 + 1)
    assert not hasattr(rng, "__dict__")
    assert sys.getsizeof(rng) <= 64 and not rng.built


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.3, top_k=5, top_p=0.9, max_tokens=7),
        SamplingParams(stop_strings=("\n", "END"), stop_token_ids=(0, 10)),
    ],
)
def test_as_dict_is_dataclasses_asdict_and_reads_back(params: SamplingParams) -> None:
    as_dict = params.as_dict()
    assert as_dict == dataclasses.asdict(params)
    assert SamplingParams.from_dict(json.loads(json.dumps(as_dict))) == params

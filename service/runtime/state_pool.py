"""Preallocated recurrent state for every session of one loaded model version.

Layout: h [L, S, H] (and c [L, S, H] for an LSTM), nothing else per slot. The head output after
a session's last input (what generation samples from, and a spill record's `last`) is not kept:
it is a function of the state, head(h[-1]), computed when needed (`outputs`), so an idle session
costs exactly its hidden state. A session holds a slot index; the runner gathers rows by index,
runs one batched step and scatters them back. The pool grows by an eighth of its size (at least
`initial_slots`) while the server-wide byte budget allows: at most 1/8 of it is ever unused
growth.

On the CPU, h and c are views into storage reserved once for as many slots as the whole budget
holds: anonymous memory mapped without a reservation of swap, which costs nothing until a page
is written and reads as zeros before. Growing is then a longer view; nothing is copied, so a
growth does not stall the event loop that creates the session. Copying the pool into a bigger
one held the loop for 124 ms at 50,000 slots and 214 ms at 90,000 (bytes-lstm, `allocate` timed
in-process), and cost 19.6 µs a session over 100,000 creations (`StatePool.allocate` in a loop).
Where the mapping is refused (a budget past what the kernel maps) or the pool is on a GPU, the
pool grows by copying, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from service.errors import ResourceExhausted
from service.models import ModelConfig, RecurrentState
from service.runtime.reserved_memory import reserved_zeros


def slot_bytes(config: ModelConfig) -> int:
    """One session's state in a pool of `config`'s model: h (and c), float32."""
    return 4 * config.state_numel()


class ByteBudget:
    """Server-wide budget for in-memory state, shared by every version's pool."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._lock = threading.Lock()

    def try_reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.used_bytes + nbytes > self.limit_bytes:
                return False
            self.used_bytes += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used_bytes -= nbytes


@dataclass(frozen=True)
class SlotSnapshot:
    """One session's state copied out of the pool (for spill, fork and shutdown). What it
    predicts next follows from it (`StatePool.outputs` over h[-1]): nothing else is kept."""

    h: np.ndarray  # [L, H] float32
    c: np.ndarray | None  # [L, H] float32 for an LSTM


class StatePool:
    def __init__(
        self,
        config: ModelConfig,
        budget: ByteBudget,
        initial_slots: int = 64,
        device: str = "cpu",
        *,
        head: Callable[[Tensor], Tensor],
    ) -> None:
        """`head`: the model's head, top-layer h [B, H] → outputs [B, out]."""
        self.config = config
        self.device = torch.device(device)
        self._budget = budget
        self._head = head
        self._min_growth = max(1, initial_slots)
        self.lock = threading.Lock()  # held by the runner around gather/step/scatter
        self.capacity = 0
        # h and c are the first `capacity` slots of `_h_all` / `_c_all`, contiguous tensors that
        # gather and scatter index: index_select of the view itself (not contiguous once the
        # storage is mapped for more slots) copied the whole view, 21.6 ms a 64-row gather at
        # 20,000 slots against 3.3 µs on the storage.
        self._h_all, self._c_all = self._no_storage()
        self.h, self.c = self._h_all, self._c_all
        self._free: list[int] = []  # a stack: low slots on top, handed out first
        self._free_set: set[int] = set()  # the same slots, for an O(1) double-free check
        # Slots from here up have held nothing since the pool grew to them: still zero.
        self._untouched_from = 0
        # Whether `_h_all` / `_c_all` are storage mapped for every slot the budget could ever
        # hold (module docstring), so growing is a longer view; else growing copies.
        self._reserved = self.device.type == "cpu" and self._reserve()
        self._view(0)
        self._grow_to(max(1, initial_slots), required=False)

    @property
    def bytes_per_slot(self) -> int:
        return slot_bytes(self.config)

    @property
    def budget(self) -> ByteBudget:
        """The server-wide budget this pool draws from."""
        return self._budget

    @property
    def used_slots(self) -> int:
        return self.capacity - len(self._free)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_slot

    def allocate(self) -> int:
        """A fresh zeroed slot. Raises ResourceExhausted when the budget allows no growth."""
        if not self._free:
            self._grow_to(self.capacity + max(self._min_growth, self.capacity // 8), required=True)
        slot = self._free.pop()
        self._free_set.discard(slot)
        if slot < self._untouched_from:
            self.reset(slot)
        else:  # grown as zeros and never handed out: no zeroing (12 µs a creation)
            self._untouched_from = slot + 1
        return slot

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.capacity and slot not in self._free_set, f"bad free of {slot}"
        self._free.append(slot)
        self._free_set.add(slot)

    def reset(self, slot: int) -> None:
        with self.lock:
            self.h[:, slot].zero_()
            if self.c is not None:
                self.c[:, slot].zero_()

    def index(self, slots: list[int]) -> Tensor:
        """The index tensor of `slots` for `gather` / `scatter`, each checked to be one of
        this pool's: they index storage that may reach past the pool (the mapping holds the
        whole budget), where a stray slot would be written silently and handed out later as
        a fresh one. IndexError for a slot outside the pool (a bookkeeping bug)."""
        if slots and not (min(slots) >= 0 and max(slots) < self.capacity):
            raise IndexError(f"slots {slots} are not all in a pool of {self.capacity}")
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def gather(self, slots: Tensor) -> RecurrentState:
        """slots [B] (from `index`) → state with h/c [L, B, H]; copies. The caller holds
        `lock`."""
        h = self._h_all.index_select(1, slots)
        c = self._c_all.index_select(1, slots) if self._c_all is not None else None
        return RecurrentState(h, c)

    def outputs(self, h_top: Tensor) -> Tensor:
        """The head output after the last input of the sessions whose top-layer h is h_top
        [B, H] → [B, out] (what a generation samples from)."""
        with torch.inference_mode():
            return self._head(h_top)

    def scatter(self, slots: Tensor, state: RecurrentState) -> None:
        """Write `state` into `slots` (from `index`). The caller holds `lock`."""
        self._h_all.index_copy_(1, slots, state.h)
        if self._c_all is not None:
            assert state.c is not None
            self._c_all.index_copy_(1, slots, state.c)

    def snapshot(self, slot: int) -> SlotSnapshot:
        with self.lock:
            return SlotSnapshot(
                h=self.h[:, slot].cpu().numpy().copy(),
                c=self.c[:, slot].cpu().numpy().copy() if self.c is not None else None,
            )

    def snapshots(self, slots: list[int]) -> list[SlotSnapshot]:
        """`snapshot` of each slot, read together: one gather for all."""
        if len(slots) == 1:
            return [self.snapshot(slots[0])]
        index = self.index(slots)
        with self.lock:
            state = self.gather(index)  # [L, B, H] copies
        h = state.h.cpu().numpy()
        c = state.c.cpu().numpy() if state.c is not None else None
        return [
            SlotSnapshot(h=h[:, j].copy(), c=c[:, j].copy() if c is not None else None)
            for j in range(len(slots))
        ]

    def fresh_snapshot(self) -> SlotSnapshot:
        """A new session's state: zeros."""
        h = np.zeros((self.config.num_layers, self.config.hidden_size), dtype=np.float32)
        return SlotSnapshot(h=h, c=h.copy() if self.c is not None else None)

    def restore(self, slot: int, snap: SlotSnapshot) -> None:
        """Put a snapshot's state in `slot`."""
        with self.lock:
            self.h[:, slot].copy_(torch.from_numpy(snap.h))
            if self.c is not None:
                assert snap.c is not None, "an LSTM slot needs its cell state"
                self.c[:, slot].copy_(torch.from_numpy(snap.c))

    def compact(self, movable: Collection[int]) -> dict[int, int]:
        """Give unused capacity back to the budget; returns the moves made, {old slot: new}.

        In-use slots in `movable` may be moved down into free ones (their owner must update its
        slot); every other in-use slot stays put, since a running step may be writing it. The
        pool then shrinks to the highest slot still in use.
        """
        free = self._free_set
        used = [s for s in range(self.capacity) if s not in free]
        target = max(len(used), self.floor(movable))
        if target >= self.capacity:
            return {}
        movers = [s for s in used if s >= target]  # all movable: target covers every pinned slot
        holes = sorted(s for s in free if s < target)  # len(holes) >= len(movers) by counting
        moves = dict(zip(movers, holes, strict=False))
        with self.lock:
            if moves:
                src = torch.tensor(list(moves), dtype=torch.int64, device=self.device)
                dst = torch.tensor(list(moves.values()), dtype=torch.int64, device=self.device)
                self._h_all.index_copy_(1, dst, self._h_all.index_select(1, src))
                if self._c_all is not None:
                    self._c_all.index_copy_(1, dst, self._c_all.index_select(1, src))
            kept_h, kept_c = self.h[:, :target], (None if self.c is None else self.c[:, :target])
            if self._reserved and self._reserve():
                # Fresh storage with the kept slots copied in: the old mapping, tail and all,
                # goes back to the kernel with its last view, and the new tail reads as zeros.
                self._h_all[:, :target].copy_(kept_h)
                if self._c_all is not None:
                    assert kept_c is not None
                    self._c_all[:, :target].copy_(kept_c)
            else:  # clone(): a view would keep the whole old storage alive
                self._reserved = False
                self._h_all = kept_h.clone()
                self._c_all = None if kept_c is None else kept_c.clone()
            self._view(target)
            released = (self.capacity - target) * self.bytes_per_slot
            self.capacity = target
            self._untouched_from = target  # moves may have written any slot below it
            self._free = sorted(holes[len(moves) :], reverse=True)  # low slots pop first
            self._free_set = set(self._free)
        self._budget.release(released)
        return moves

    def floor(self, movable: Collection[int]) -> int:
        """The fewest slots `compact` can leave however many slots in `movable` are freed
        first: up to the highest in-use slot outside it, which stays put. Freeing a slot
        gives bytes back only while the pool is above this."""
        movable = set(movable)
        free = self._free_set
        for slot in range(self.capacity - 1, -1, -1):  # from the top: a busy one ends it
            if slot not in free and slot not in movable:
                return slot + 1
        return 0

    def close(self) -> None:
        """Give the pool's bytes back to the budget (the version is being unloaded), and its
        memory to the kernel once nothing still holds a view of it."""
        self._budget.release(self.nbytes)
        with self.lock:
            self._h_all, self._c_all = self._no_storage()
            self._reserved = False
            self._view(0)
        self.capacity = 0
        self._untouched_from = 0
        self._free.clear()
        self._free_set.clear()

    def _no_storage(self) -> tuple[Tensor, Tensor | None]:
        """Empty h and c storage (no slots)."""
        cfg = self.config
        h = torch.zeros(cfg.num_layers, 0, cfg.hidden_size, device=self.device)
        return h, (torch.zeros_like(h) if cfg.has_cell_state else None)

    def _reserve(self) -> bool:
        """Map fresh storage for every slot the budget could hold as `_h_all` / `_c_all`;
        False, with nothing changed, where that is refused."""
        cfg = self.config
        slots = self._budget.limit_bytes // self.bytes_per_slot
        shape = (cfg.num_layers, slots, cfg.hidden_size)
        h = reserved_zeros(shape)
        c = reserved_zeros(shape) if h is not None and cfg.has_cell_state else None
        if h is None or (cfg.has_cell_state and c is None):
            return False
        self._h_all, self._c_all = h, c
        return True

    def _view(self, capacity: int) -> None:
        """h and c: the first `capacity` slots of the storage."""
        self.h = self._h_all[:, :capacity]
        self.c = None if self._c_all is None else self._c_all[:, :capacity]

    def _grow_to(self, new_capacity: int, required: bool) -> None:
        extra = new_capacity - self.capacity
        # Shrink the request until it fits: a pool near the budget still gets its last slots.
        while extra > 0 and not self._budget.try_reserve(extra * self.bytes_per_slot):
            extra //= 2
        if extra <= 0:
            if required:
                raise ResourceExhausted(
                    f"state memory budget exhausted ({self._budget.limit_bytes} bytes); "
                    "close sessions or raise SEQSERVE_SESSIONS__POOL_BYTES"
                )
            return
        cfg = self.config
        with self.lock:
            old = self.capacity
            if not (self._reserved and old + extra <= self._h_all.shape[1]):
                pad = torch.zeros(cfg.num_layers, extra, cfg.hidden_size, device=self.device)
                self._h_all = torch.cat([self.h, pad], dim=1)
                if self.c is not None:
                    self._c_all = torch.cat([self.c, torch.zeros_like(pad)], dim=1)
                self._reserved = False  # grown past the mapping: copies from now on
            # else the slots past the old capacity were never written since the storage was
            # mapped (or mapped again by `compact`): zeros, at no cost.
            self._view(old + extra)
            self.capacity = old + extra
            # Hand out low slots first (pop from the end).
            self._free.extend(range(self.capacity - 1, old - 1, -1))
            self._free_set.update(range(old, self.capacity))

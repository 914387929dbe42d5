"""A model version in service, and what the versions report upward (metrics).

Names, from the store up: the registry's `VerifiedModel` is a version's weights read with their
digest checked, built into a module; a `ServedVersion` is that model in service, with its state
pool, runner and step scheduler; `ServedVersions` is the table of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.engine.step_scheduler import StepScheduler
from service.metrics.stats import StepStats
from service.models import ByteTokenizer, ModelConfig
from service.registry.store import VerifiedModel
from service.runtime.runner import ModelRunner
from service.runtime.state_pool import StatePool


@dataclass
class ServedVersion:
    name: str
    version: int
    model: VerifiedModel
    pool: StatePool  # the state of this version's sessions in memory
    runner: ModelRunner  # the only code that touches the pool's tensors
    scheduler: StepScheduler  # batches steps across this version's sessions
    sessions: int = 0  # sessions pinned to this version (in memory or spilled)
    unloading: bool = False

    @property
    def config(self) -> ModelConfig:
        return self.model.model.config

    @property
    def tokenizer(self) -> ByteTokenizer | None:
        return self.model.tokenizer

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint


class VersionObserver:
    """What the engine reports upward (metrics); the default does nothing."""

    def on_step(self, stats: StepStats) -> None: ...

    def on_token_times(
        self, model: str, version: str, firsts: list[float], gaps: list[float]
    ) -> None:
        """One step's generations: times to first token of those that started, inter-token
        gaps of the others (seconds)."""

    def on_request(self, model: str, version: str, seconds: float, count: int = 1) -> None:
        """`count` requests took `seconds` each (the feeds of one Stream message)."""

    def on_session_event(self, event: str, model: str, version: str) -> None: ...

    def on_takeover(self, model: str, version: str, seconds: float) -> None: ...

    def on_loaded(self, served: ServedVersion) -> None: ...

    def on_unloaded(self, served: ServedVersion) -> None: ...

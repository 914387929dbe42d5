"""Reading a live /metrics endpoint: fetch the text, parse it, sum samples by name and labels."""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def fetch(port: int) -> bytes:
    """One scrape of 127.0.0.1:`port`/metrics (blocking: run it off the event loop)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body


async def scrape(port: int) -> Exposition:
    """One scrape of 127.0.0.1:`port`/metrics, fetched off the event loop and parsed."""
    return Exposition.parse(await asyncio.to_thread(fetch, port))


@dataclass(frozen=True)
class Exposition:
    text: str
    types: dict[str, str]  # family name -> counter / gauge / histogram / ...
    samples: list[Sample]

    @classmethod
    def parse(cls, body: bytes) -> Exposition:
        text = body.decode()
        families = list(text_string_to_metric_families(text))
        return cls(
            text,
            {f.name: f.type for f in families},
            [s for f in families for s in f.samples],
        )

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels`; 0 if none."""
        return sum(s.value for s in self.matching(name, **labels))

    def label_values(self) -> set[str]:
        return {v for s in self.samples for v in s.labels.values()}

"""How `seqserve models` shows the store: tables, a version's manifest, JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.registry.manifest import Manifest
    from service.registry.snapshot import ModelEntry
    from service.registry.version_rule import VersionRule


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *rows]
    ]
    return "\n".join(lines)


def architecture(model: ModelEntry) -> str:
    latest = model.entry(model.latest) if model.latest is not None else None
    return manifest_arch(latest.manifest) if latest and latest.manifest else "-"


def manifest_arch(m: Manifest) -> str:
    cell = m.cell if m.cell == "lstm" else f"gru{'' if m.reset_after else ' (article)'}"
    if m.input.kind == "tokens":
        source = f"{m.input.tokenizer} tokens ({m.input.vocab_size})"
    else:
        source = f"frames of {m.input.dim}"
    target = "next token" if m.head.kind == "classification" else f"regression ({m.head.dim})"
    return f"{cell} {m.num_layers}x{m.hidden_size}, {source} → {target}"


def aliases_text(model: ModelEntry) -> str:
    if model.aliases_problem:
        return "(aliases.json unreadable)"
    return ", ".join(f"{a}→{v}" for a, v in sorted(model.aliases.items())) or "-"


def manifest_text(m: Manifest) -> str:
    t = m.training
    lines = [
        ("architecture", manifest_arch(m)),
        ("description", m.description or "-"),
        ("created", m.created_at.isoformat()),
        ("weights", f"{m.weights_file} sha256 {m.weights_sha256}"),
        ("data", t.data),
        ("steps", str(t.steps)),
    ]
    if t.final_loss is not None:
        lines.append(("final loss", f"{t.final_loss:.4g}"))
    lines += [(f"val {k}", f"{v:.4g}") for k, v in sorted(t.validation.items())]
    lines += [(f"baseline {k}", f"{v:.4g}") for k, v in sorted(t.baselines.items())]
    if t.command:
        lines.append(("command", t.command))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in lines)


def latest_version(model: ModelEntry, rule: VersionRule) -> int | None:
    """The version "latest" gets on a server: the newest usable one whose weights pass their
    digest and fit their manifest (a newest version that fails is skipped, as the server skips
    it); None when there is none."""
    from service.errors import SeqServeError
    from service.registry.version_spec import LATEST

    try:
        return rule.version_for(model, LATEST)
    except SeqServeError:
        return None


def model_json(m: ModelEntry, rule: VersionRule) -> dict[str, Any]:
    """As the table says it, by the server's rule (`rule`, which hashes the weights): `latest`
    and each version's `status` ("ok", or why it takes no new sessions, a failed digest
    included), not the manifests' word alone."""
    refusals = {v.version: rule.refusal(m, v.version) for v in m.versions}
    problems = [r for r in refusals.values() if r is not None]
    if m.aliases_problem is not None:
        problems.append(m.aliases_problem)
    return {
        "name": m.name,
        "latest": latest_version(m, rule),
        "aliases": dict(m.aliases),
        "versions": [
            {
                "version": v.version,
                "status": refusals[v.version] or "ok",
                "created_at": v.manifest.created_at.isoformat() if v.manifest else None,
                "description": v.manifest.description if v.manifest else None,
            }
            for v in m.versions
        ],
        "problems": problems,
    }

"""What only the machine can tell about a configuration, checked before anything starts: the
paths that must exist do, the state directory can be made, the device is there. Each refusal is
the one line `describe` would give, with where the value at fault came from."""

from __future__ import annotations

from pathlib import Path

from service.config_sources import InvalidSetting, Leaf, leaf_by_path
from service.settings import DATA_DIR_VARIABLES, Settings


def _fail(leaf: Leaf, why: str, sources: dict[str, str] | None = None) -> InvalidSetting:
    """The one line for a setting that cannot be used, with where its value came from (as
    `describe` says it) when that is not the default."""
    names = ", ".join((*leaf.aliases, leaf.flag, leaf.env))
    source = (sources or {}).get(leaf.name, "default")
    origin = f" [from {source}]" if source != "default" else ""
    return InvalidSetting(f"invalid setting {leaf.name} ({names}): {why}{origin}")


def check_runnable(settings: Settings, sources: dict[str, str] | None = None) -> None:
    """What only the machine can tell: the paths that must exist do, the device is there.
    Run by `serve` and `config show` before anything starts or is shown (imports torch only
    for a non-CPU device); `sources` (`Loaded.sources`) says in the error where the value at
    fault came from."""
    known = leaf_by_path()
    store = settings.model_store
    if not store.is_dir():
        raise _fail(
            known[("model_store",)],
            f"no model store at {store} (point --store or SEQSERVE_MODEL_STORE at one)",
            sources,
        )
    spill = settings.sessions.spill_dir
    blocked = _not_a_directory(spill)
    if blocked is not None:
        source = (sources or {}).get("sessions.spill_dir", "default").removeprefix("env ")
        if source in DATA_DIR_VARIABLES:  # the default, in the data directory it names
            raise InvalidSetting(
                f"invalid {source}: {blocked} is not a directory (the default state "
                f"directory, sessions.spill_dir, is {spill})"
            )
        raise _fail(known[("sessions", "spill_dir")], f"{blocked} is not a directory", sources)
    sec = settings.security
    for name in ("auth_tokens", "tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(sec, name)
        if path is not None and not path.is_file():
            raise _fail(known[("security", name)], f"no such file: {path}", sources)
    check_device(settings, sources)


def _not_a_directory(path: Path) -> Path | None:
    """`path`, or the nearest of its parents that exists, when that is not a directory: a file
    where the directory is to be, or one of its parents made. None when nothing is in the way
    (or the path cannot be looked at: making the directory will say why)."""
    try:
        for where in (path, *path.parents):
            if where.exists():
                return None if where.is_dir() else where
    except OSError:
        return None
    return None


def check_device(settings: Settings, sources: dict[str, str] | None = None) -> None:
    """The configured device is there: `serve` and `predict` refuse one torch cannot use in one
    line (imports torch only for a non-CPU device)."""
    device = settings.engine.device
    if device == "cpu":
        return
    import torch  # only here: a CPU server never pays for this check

    leaf = leaf_by_path()[("engine", "device")]
    index = int(device.partition(":")[2] or 0)
    if not torch.cuda.is_available():
        raise _fail(
            leaf,
            f"{device} is not available: this torch ({torch.__version__}) has no CUDA "
            "device; use cpu",
            sources,
        )
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise _fail(leaf, f"{device} is not available: {count} CUDA device(s)", sources)

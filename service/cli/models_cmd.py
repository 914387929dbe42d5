"""`seqserve models list|show|verify|alias|import`: manage the model store from a terminal.

Exit codes: 0 success; 1 the store refused (not found, digest mismatch, a bad version);
2 a bad argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli import models_text as text
from service.cli.settings_flags import store_path
from service.errors import (
    DigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    SeqServeError,
    VersionUnusable,
    WeightsMismatch,
)

if TYPE_CHECKING:  # the store (and torch) are imported when a command runs: --help stays fast
    from service.registry.snapshot import ModelEntry
    from service.registry.store import ModelStore
    from service.registry.version_rule import VersionRule


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models", help="manage the model store", description="Manage the versioned model store."
    )
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store", type=store_path, default=None, help="store root (default: SEQSERVE_MODEL_STORE)"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("list", parents=[common, as_json], help="models, versions and aliases")
    p.set_defaults(func=_list)

    p = sub.add_parser("show", parents=[common, as_json], help="one model in detail")
    p.add_argument("name")
    p.add_argument(
        "--version", default="", help="version, alias or 'latest' (default: production, latest)"
    )
    p.set_defaults(func=_show)

    p = sub.add_parser("verify", parents=[common, as_json], help="re-hash every version")
    p.set_defaults(func=_verify)

    p = sub.add_parser(
        "alias", parents=[common], help="set an alias (NAME ALIAS VERSION) or delete one"
    )
    p.add_argument("--delete", action="store_true", help="delete ALIAS instead of setting it")
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", nargs="?", type=int)
    p.set_defaults(func=_alias)

    p = sub.add_parser(
        "import",
        parents=[common],
        help="publish a torch.save(state_dict) checkpoint as a new version",
        description="Publish a checkpoint saved with torch.save(state_dict): nn.LSTM / nn.GRU "
        "weights (weight_ih_l0, …) plus the input layer (embedding.weight, or "
        "input_proj.weight and input_proj.bias) and head (head.weight, head.bias). The "
        "architecture is read from the tensor shapes.",
    )
    p.add_argument("name", help="model name in the store")
    p.add_argument("checkpoint", type=Path)
    p.add_argument(
        "--rename-prefix",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rename tensors starting with OLD (repeatable), e.g. fc.=head. lstm.=rnn.",
    )
    p.add_argument("--key", help="the state dict is this entry of the saved dict")
    p.add_argument("--input", choices=("tokens", "features"), help="expected input kind")
    p.add_argument(
        "--head",
        choices=("classification", "regression"),
        help="default: classification when the head's width equals the vocabulary",
    )
    p.add_argument(
        "--article-gru",
        action="store_true",
        help="GRU weights for the article's cell (reset before the matmul); torch's nn.GRU "
        "is reset-after, the default",
    )
    p.add_argument("--tokenizer", default="bytes")
    p.add_argument("--description", default="")
    p.add_argument("--data", default="", help="training data provenance for the manifest")
    p.add_argument("--steps", type=int, default=0, help="training steps, for the manifest")
    p.add_argument("--alias", help="also point this alias at the new version")
    p.set_defaults(func=_import)


def _store(args: argparse.Namespace) -> ModelStore:
    from service.registry.store import ModelStore

    if args.store is not None:
        return ModelStore(args.store)
    # The composition root for this command: its settings load as `serve`'s and `config
    # show`'s do (env, defaults), so a bad variable is the same one line naming it.
    from service.config_sources import load

    return ModelStore(load().settings.model_store)


def _existing_store(args: argparse.Namespace) -> ModelStore:
    """The store of a command that reads it: a mistyped path must not pass as an empty store
    ("no models", "0 of 0 versions ok"). Raises FailedPrecondition when it does not exist."""
    store = _store(args)
    if not store.root.exists():
        raise FailedPrecondition(f"the model store {store.root} does not exist")
    return store


def _fail(exc: SeqServeError) -> int:
    print(f"error: {exc.message}", file=sys.stderr)
    return 2 if isinstance(exc, InvalidArgument) else 1


def _list(args: argparse.Namespace) -> int:
    try:
        snap = _existing_store(args).snapshot()
    except SeqServeError as exc:  # the store root is missing or not a readable folder
        return _fail(exc)
    rule = _rule()  # one for the listing, as a server has one
    if args.json:
        print(json.dumps([text.model_json(m, rule) for m in snap.models.values()], indent=2))
        return 0
    if not snap.models:
        print(f"no models in {snap.root}")
        return 0
    rows = [
        [
            m.name,
            text.architecture(m),
            ", ".join(map(str, rule.servable_versions(m))) or "-",  # as ListModels lists
            _latest(m, rule),
            text.aliases_text(m),
        ]
        for m in snap.models.values()
    ]
    print(text.table(["MODEL", "ARCHITECTURE", "VERSIONS", "LATEST", "ALIASES"], rows))
    refusals = [  # weights that fail their digest or do not fit (the manifests' are below)
        refusal
        for m in snap.models.values()
        for v in m.usable_versions
        if (refusal := rule.refusal(m, v)) is not None
    ]
    for problem in [*snap.problems, *refusals]:
        print(f"refused: {problem}", file=sys.stderr)
    return 0


def _rule() -> VersionRule:
    """The server's rule for which versions take new sessions (it hashes the weights). Its
    verdicts are printed by the command ("refused: …", a version's status), so the rule's own
    log line for each (a server's log) is not written to the terminal bare as well."""
    import logging

    from service.registry.version_rule import VersionRule

    digests = logging.getLogger("service.registry.digests")
    if not digests.handlers:
        digests.addHandler(logging.NullHandler())
    return VersionRule()


def _latest(model: ModelEntry, rule: VersionRule) -> str:
    """The LATEST column: `latest` as a server resolves it (see `text.latest_version`)."""
    version = text.latest_version(model, rule)
    return "-" if version is None else str(version)


def _show(args: argparse.Namespace) -> int:
    rule = _rule()  # the server's word on each version
    try:
        model = _store(args).model(args.name)
        try:  # the version a new session asking for it gets (a refused newest one skipped)
            version = rule.version_for(model, args.version)
        except (DigestMismatch, WeightsMismatch, VersionUnusable):  # refused: shown, with why
            version = model.resolve(args.version)
        manifest = model.usable(version).manifest
    except SeqServeError as exc:
        return _fail(exc)
    assert manifest is not None, "usable versions have a manifest"
    if args.json:
        body = text.model_json(model, rule)
        body.update(
            version=version,
            fingerprint=manifest.fingerprint(),
            manifest=manifest.model_dump(mode="json"),
        )
        print(json.dumps(body, indent=2))
        return 0
    print(f"{model.name} version {version}    fingerprint {manifest.fingerprint()}")
    print(text.manifest_text(manifest))
    print()
    by_version: dict[int, list[str]] = {}
    for alias, v in sorted(model.aliases.items()):
        by_version.setdefault(v, []).append(alias)
    rows = [
        [
            str(v.version) + (" *" if v.version == version else ""),
            ", ".join(by_version.get(v.version, [])) or "-",
            v.manifest.created_at.strftime("%Y-%m-%d %H:%M:%SZ") if v.manifest else "-",
            refusal if (refusal := rule.refusal(model, v.version)) is not None
            else (v.manifest.description if v.manifest else ""),
        ]
        for v in model.versions
    ]  # fmt: skip
    print(text.table(["VERSION", "ALIASES", "CREATED", "DESCRIPTION / STATUS"], rows))
    if model.aliases_problem:
        print(f"refused: {model.aliases_problem}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        store = _existing_store(args)
        results = store.verify()
    except SeqServeError as exc:
        return _fail(exc)
    bad = [r for r in results if not r.ok]
    aliases = store.verify_aliases(results)  # what would refuse new sessions even so
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "model": r.name,
                        "version": r.version,
                        "ok": r.ok,
                        "path": str(r.path),
                        "message": r.message,
                    }
                    for r in results
                ]
                + [
                    {
                        "model": a.name,
                        "version": a.version,
                        "alias": a.alias,
                        "ok": False,
                        "path": str(a.path),
                        "message": a.message,
                    }
                    for a in aliases
                ],
                indent=2,
            )
        )
    else:
        rows = [[r.name, str(r.version), "ok" if r.ok else "BAD", str(r.path)] for r in results]
        if rows:
            print(text.table(["MODEL", "VERSION", "STATUS", "FILE"], rows))
        print(f"{len(results) - len(bad)} of {len(results)} versions ok")
        if aliases:
            print(f"{len(aliases)} alias problem(s)")
    problems = [(r.path, r.message) for r in bad] + [(a.path, a.message) for a in aliases]
    for path, message in problems:
        # The path once: most messages name their file already.
        print(f"bad: {message if message.startswith(str(path)) else f'{path}: {message}'}",
              file=sys.stderr)  # fmt: skip
    return 1 if bad or aliases else 0


def _alias(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        if args.delete:
            if args.version is not None:
                raise InvalidArgument("alias --delete takes NAME ALIAS, no version")
            store.delete_alias(args.name, args.alias)
            print(f"deleted alias {args.alias!r} of {args.name!r}")
        else:
            if args.version is None:
                raise InvalidArgument("usage: models alias NAME ALIAS VERSION (or --delete)")
            store.set_alias(args.name, args.alias, args.version)
            print(f"{args.name}: {args.alias} → version {args.version}")
    except SeqServeError as exc:
        return _fail(exc)
    return 0


def _import(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        from service.registry.aliases import validate_alias_name
        from service.registry.checkpoint_import import ImportSpec

        if args.alias is not None:  # before publishing: a refused alias must leave no version
            validate_alias_name(args.alias)
        if args.steps < 0:
            raise InvalidArgument(f"--steps must be >= 0, got {args.steps}")
        renames = tuple(_parse_rename(r) for r in args.rename_prefix)

        spec = ImportSpec(
            rename_prefixes=renames,
            key=args.key,
            input_kind=args.input,
            head_kind=args.head,
            reset_after=not args.article_gru,
            tokenizer=args.tokenizer,
            description=args.description,
            data=args.data,
            steps=args.steps,
        )
        manifest = store.import_checkpoint(args.name, args.checkpoint, spec)
        if args.alias:
            store.set_alias(manifest.name, args.alias, manifest.version)
    except SeqServeError as exc:
        return _fail(exc)
    print(f"published {manifest.name} version {manifest.version} ({text.manifest_arch(manifest)})")
    if args.alias:
        print(f"{manifest.name}: {args.alias} → version {manifest.version}")
    return 0


def _parse_rename(value: str) -> tuple[str, str]:
    old, sep, new = value.partition("=")
    if not sep or not old:
        raise InvalidArgument(f"--rename-prefix expects OLD=NEW, got {value!r}")
    return old, new

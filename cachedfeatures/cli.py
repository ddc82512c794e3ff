"""The ``cachedfeatures`` command: inspect and maintain a store.

    cachedfeatures info STORE [--json]
    cachedfeatures prune STORE --max-bytes 5GB [--policy mru|lru] [--dry-run] [--json]
    cachedfeatures rm STORE ENTRY [ENTRY ...] [--json]
    cachedfeatures verify STORE [--repair] [--json]

Every command takes ``--json``: one JSON object on stdout instead of text (errors stay one line
on stderr, with the same exit status).

Exit codes scripts can rely on: 0 clean, 1 problems found (``verify`` found damage, even
if ``--repair`` fixed it; ``prune`` could not reach the budget), 2 usage error (bad
arguments, a path that is not a cachedfeatures store, an unknown entry).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from cachedfeatures._version import __version__
from cachedfeatures.errors import CacheError, EntryNotFoundError
from cachedfeatures.maintenance import describe_store, remove_entry, repair_root, verify_store
from cachedfeatures.pruning import open_entries, prune, remove_orphans
from cachedfeatures.store.explore import plural, views_text
from cachedfeatures.store.feature_store import FeatureStore
from cachedfeatures.units import format_bytes, format_ratio, parse_bytes

__all__ = ["main"]

OK, PROBLEMS, USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with what the user asked for: printed on one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args, sys.stdout))
    except (UsageError, CacheError) as error:
        print(f"cachedfeatures {args.command}: error: {error}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachedfeatures",
        description="Inspect and maintain a cachedfeatures Zarr store.",
        epilog="Exit status: 0 clean, 1 problems found, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"cachedfeatures {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="list entries: rows cached, bytes, compression, last use")
    info.add_argument("store", metavar="STORE", help="path of the store (e.g. features.zarr)")
    _json_option(info)
    info.set_defaults(run=_info)

    prune = commands.add_parser("prune", help="drop whole chunks until the store fits a size budget")
    prune.add_argument("store", metavar="STORE", help="path of the store")
    prune.add_argument(
        "--max-bytes", required=True, type=_size, metavar="SIZE", help="budget, e.g. 5GB, 512MiB, 1e9"
    )
    prune.add_argument(
        "--policy",
        choices=["mru", "lru"],
        default="mru",
        help="within an entry, drop the most (mru, default) or least (lru) recently used chunk first",
    )
    prune.add_argument("--dry-run", action="store_true", help="print what would go, delete nothing")
    _json_option(prune)
    prune.set_defaults(run=_prune)

    rm = commands.add_parser("rm", help="delete entries (use 'info' to list their names)")
    rm.add_argument("store", metavar="STORE", help="path of the store")
    rm.add_argument("entries", metavar="ENTRY", nargs="+", help="entry name, as 'info' prints it")
    _json_option(rm)
    rm.set_defaults(run=_rm)

    verify = commands.add_parser(
        "verify", help="decode every chunk; report valid rows whose chunk is missing or unreadable"
    )
    verify.add_argument("store", metavar="STORE", help="path of the store")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="clear the damaged rows (and their chunks) so they are recomputed",
    )
    _json_option(verify)
    verify.set_defaults(run=_verify)
    return parser


def _json_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _write_json(report: object, out: TextIO) -> None:
    json.dump(report, out, indent=2)
    out.write("\n")


def _size(text: str) -> int:
    try:
        return parse_bytes(text, "--max-bytes")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _open(path: str, *, write: bool = False) -> FeatureStore:
    """Open an existing store; anything but a cachedfeatures store is a usage error."""
    try:
        store = FeatureStore.open(path, mode="r")
        return FeatureStore.open(path, mode="a") if write else store
    except CacheError:
        raise
    except Exception as error:  # a damaged root, an unreadable directory...
        raise UsageError(f"cannot open {path!r} as a cachedfeatures store: {error}") from None


# -- info ----------------------------------------------------------------------------------------


def _info(args: argparse.Namespace, out: TextIO) -> int:

    report = describe_store(_open(args.store))
    if args.json:
        _write_json(report, out)
        return OK
    entries = report["entries"]
    size = format_bytes(report["bytes"])
    out.write(f"{report['store']}: {plural(len(entries), 'entry')}, {size} on disk\n")
    if report["orphans"]:
        out.write(
            f"  {plural(report['orphans'], 'leftover temporary file')} (*.partial) from interrupted writes; "
            "'cachedfeatures verify --repair' removes stale ones\n"
        )
    for broken in report["broken"]:
        out.write(f"  {broken['name']}: {broken['problem']}; run 'cachedfeatures verify'\n")
    for entry in entries:
        ratio = format_ratio(entry["compression_ratio"])
        arrays = ", ".join(
            f"{array['name']} {array['dtype']} {tuple(array['shape'])}" for array in entry["arrays"]
        )
        rows = (
            entry["rows"]
            if not entry.get("views_valid")
            else entry["view_samples"] * len(entry["views_valid"])
        )
        share = entry["rows_valid"] / rows if rows else 0.0
        out.write(
            f"\n{entry['name']}\n"
            f"  module      {entry['module']}\n"
            f"  dataset     {entry['dataset']}\n"
            f"  rows        {entry['rows_valid']}/{rows} valid ({share:.1%})\n"
            + _views_line(entry)
            + f"  on disk     {format_bytes(entry['bytes'])}, compression {ratio}\n"
            f"  arrays      {arrays}\n"
            f"  chunking    {entry['chunk_rows']} rows per chunk, "
            f"{entry['chunks_stored']}/{entry['chunks']} chunks stored\n"
            f"  created     {entry['created']}\n"
            f"  last used   {entry['last_used'] or 'never recorded'}\n"
        )
    return OK


def _views_line(entry: dict[str, Any]) -> str:
    """With views: each view's share of the samples cached."""
    valid = entry.get("views_valid")
    return f"  views       {views_text(valid, entry['view_samples'])}\n" if valid else ""


# -- prune ---------------------------------------------------------------------------------------


def _prune(args: argparse.Namespace, out: TextIO) -> int:

    store = _open(args.store, write=not args.dry_run)
    report = prune(store, args.max_bytes, args.policy, dry_run=args.dry_run)
    removed = [] if args.dry_run else remove_orphans(store)
    if args.json:
        _write_json(
            {
                "store": store.location,
                "dry_run": report.dry_run,
                "policy": args.policy,
                "max_bytes": report.max_bytes,
                "bytes_before": report.bytes_before,
                "bytes_after": report.bytes_after,
                "within_budget": report.within_budget,
                "dropped": [{"entry": d.entry, "chunk": d.chunk, "bytes": d.nbytes} for d in report.dropped],
                "orphans_removed": len(removed),
                "skipped": report.skipped,
            },
            out,
        )
        return OK if report.within_budget else PROBLEMS
    verb = "would drop" if args.dry_run else "dropped"
    per_entry: dict[str, list[int]] = {}
    freed: dict[str, int] = {}
    for item in report.dropped:
        per_entry.setdefault(item.entry, []).append(item.chunk)
        freed[item.entry] = freed.get(item.entry, 0) + item.nbytes
    for name, chunks in per_entry.items():
        chunk_list = f"{plural(len(chunks), 'chunk')} ({_ranges(chunks)})"
        out.write(f"{verb} {name}: {chunk_list}, {format_bytes(freed[name])}\n")
    if removed:
        out.write(f"removed {plural(len(removed), 'stale temporary file')} (*.partial)\n")
    after = "would be" if args.dry_run else "now"
    out.write(
        f"{store.location}: {format_bytes(report.bytes_before)} before, {after} "
        f"{format_bytes(report.bytes_after)} (budget {format_bytes(report.max_bytes)})\n"
    )
    for name, why in report.skipped.items():
        out.write(f"skipped {name}: it could not be read ({why})\n")
    if not report.within_budget:
        if report.skipped:
            out.write(
                f"still over budget: {plural(len(report.skipped), 'entry')} could not be read and were "
                "not pruned; run 'cachedfeatures verify --repair' (it rebuilds or drops them) or "
                "'cachedfeatures rm' them\n"
            )
        else:
            out.write(
                "still over budget: what is left is metadata of empty entries; "
                "'cachedfeatures rm' entries you no longer need\n"
            )
        return PROBLEMS
    return OK


def _ranges(chunks: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``"1-3, 7"``."""
    ordered = sorted(chunks)
    parts: list[str] = []
    start = previous = ordered[0]
    for chunk in [*ordered[1:], None]:
        if chunk is not None and chunk == previous + 1:
            previous = chunk
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if chunk is not None:
            start = previous = chunk
    return ", ".join(parts)


# -- rm ------------------------------------------------------------------------------------------


def _rm(args: argparse.Namespace, out: TextIO) -> int:

    store = _open(args.store, write=True)
    entries, broken = open_entries(store)
    names = [entry.name for entry in entries] + list(broken)
    unknown = [name for name in args.entries if name not in names]
    if unknown:
        raise EntryNotFoundError(
            f"no entry {', '.join(map(repr, unknown))} in {store.location}; "
            f"its entries are: {', '.join(names) or 'none'}"
        )
    removed = [(name, remove_entry(store, name)) for name in args.entries]
    if args.json:
        _write_json({"store": store.location, "removed": [{"name": n, "bytes": b} for n, b in removed]}, out)
        return OK
    for name, freed in removed:
        out.write(f"removed {name} ({format_bytes(freed)})\n")
    return OK


# -- verify --------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace, out: TextIO) -> int:

    root = repair_root(args.store) if args.repair else None
    store = _open(args.store, write=args.repair)
    report = verify_store(store, repair=args.repair)
    if root is not None:
        report["problems"].insert(0, root)
        report["ok"] = False
    if args.json:
        _write_json(report, out)
    else:
        for problem in report["problems"]:
            where = problem["entry"] + (f" chunk {problem['chunk']}" if problem["chunk"] is not None else "")
            fixed = " [repaired]" if problem["repaired"] else ""
            out.write(f"{problem['kind']}: {where}: {problem['detail']}{fixed}\n")
        count = len(report["problems"])
        summary = (
            f"{report['store']}: checked {plural(report['chunks_checked'], 'chunk')} "
            f"in {plural(report['entries'], 'entry')}"
        )
        if count == 0:
            out.write(f"{summary}: ok\n")
        else:
            repaired = sum(problem["repaired"] for problem in report["problems"])
            hint = "" if args.repair else "; run with --repair to clear damaged rows so they are recomputed"
            out.write(f"{summary}: {plural(count, 'problem')}, {repaired} repaired{hint}\n")
    return OK if not report["problems"] else PROBLEMS

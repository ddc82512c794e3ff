"""The ``cachedfeatures`` command line, run as a real subprocess on real stores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from cachedfeatures import CachedFeatureDataset, FeatureStore
from cachedfeatures.pruning import measure
from cachedfeatures.units import format_bytes
from tests.helpers import Backbone, Samples, ScriptProcess, Tile

ROOT = Path(__file__).resolve().parent.parent
CHUNK_ROWS = 8


def installed_script() -> str | None:
    """The installed console script: next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent
    return shutil.which("cachedfeatures", path=os.pathsep.join([str(here), os.environ.get("PATH", "")]))


def fresh_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the command line in a new process; the installed script where there is one (nox installs it)."""
    script = installed_script()
    command = [script] if script else [sys.executable, "-m", "cachedfeatures"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)} if script is None else dict(os.environ)
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT if not script else None,
    )


# Runs ``cachedfeatures.cli.main`` once per line of JSON argv on stdin, as ``python -m
# cachedfeatures`` would (its stdout, stderr and exit status; argparse's exits; a traceback and
# status 1 for an uncaught exception), and answers one JSON line. ``catch_warnings`` restores
# the interpreter's default filters for each call and resets which warnings were shown, so a
# warning shows as in a new process, not hidden by an earlier call having shown it.
CLI_WORKER = """
import contextlib, io, json, sys, traceback, warnings
from cachedfeatures.cli import main
for line in sys.stdin:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        try:
            code = main(json.loads(line))
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (exit.code is not None)
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    print(json.dumps({"code": int(code), "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
"""


# One process runs every command of this module: each new process would import torch again
# (seconds on two loaded cores), for about 40 commands. Its own process still: the store is
# opened by another process than the test's, as a user's is. ``fresh_cli`` runs a command in a
# process of its own (and the installed script).
WORKER = ScriptProcess(CLI_WORKER)


@pytest.fixture(scope="module", autouse=True)
def _close_the_worker() -> Iterator[None]:
    yield
    WORKER.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the command line (in the module's CLI worker process)."""
    WORKER.send(list(args))
    answer = WORKER.receive()
    return subprocess.CompletedProcess(
        ["cachedfeatures", *args], answer["code"], answer["stdout"], answer["stderr"]
    )


def fill(store_path: Path, offset: float, rows: int = 40, read: int | None = None) -> CachedFeatureDataset:
    cached = CachedFeatureDataset(
        Samples(rows, "dict", offset=offset), Tile(), store_path, input_key="image", chunk_rows=CHUNK_ROWS
    )
    cached.__getitems__(list(range(rows if read is None else read)))
    cached.flush_access()
    return cached


@pytest.fixture
def two_entries(store_path: Path) -> tuple[CachedFeatureDataset, CachedFeatureDataset]:
    return fill(store_path, 0.0), fill(store_path, 1.0, rows=64, read=20)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> None:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "error:" in result.stderr


def test_installed_console_script_runs() -> None:
    script = installed_script()
    if script is None:
        pytest.skip("the cachedfeatures console script is not installed here (pip install -e .; nox does)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("cachedfeatures ")


# -- info ---------------------------------------------------------------------------------------


def test_info_lists_every_entry(store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]) -> None:
    full, partial = two_entries
    result = cli("info", str(store_path))
    assert result.returncode == 0, result.stderr
    assert full.entry_name in result.stdout and partial.entry_name in result.stdout
    assert "40/40 valid" in result.stdout and "20/64 valid" in result.stdout
    assert "features float32 (256,)" in result.stdout and "label int64 ()" in result.stdout
    assert "8 rows per chunk, 3/8 chunks stored" in result.stdout  # rows 0-19 -> chunks 0-2 of 8
    assert "Tile" in result.stdout and "Samples" in result.stdout
    assert "never recorded" not in result.stdout  # both were read, and flushed


def test_info_json(store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]) -> None:
    full, partial = two_entries
    result = cli("info", str(store_path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    usage = measure(FeatureStore.open(store_path))
    assert report["bytes"] == usage.total and report["orphans"] == 0
    entries = {entry["name"]: entry for entry in report["entries"]}
    assert entries[full.entry_name]["rows_valid"] == 40 and entries[partial.entry_name]["rows_valid"] == 20
    for entry in entries.values():
        assert entry["bytes"] == usage.entries[entry["name"]]
        assert entry["compression_ratio"] > 0.5
        assert entry["last_used"] >= entry["created"]
        assert [array["name"] for array in entry["arrays"]] == ["features", "label", "name"]


def test_info_shows_the_size_and_ratio_the_notebook_display_shows(
    store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]
) -> None:
    """One entry, three displays (``cachedfeatures info``, ``repr(entry)``, the HTML of the
    notebook): one size string and one compression ratio (they once read "2.14 MB, 1.45x"
    beside "2.0 MiB, 1.16x")."""
    result = cli("info", str(store_path))
    assert result.returncode == 0, result.stderr
    store = FeatureStore.open(store_path)
    for entry in store.entries:
        block = result.stdout.split(f"\n{entry.name}\n", 1)[1]
        line = next(line for line in block.splitlines() if line.strip().startswith("on disk"))
        shown = line.split("on disk", 1)[1].strip()  # "<size>, compression <ratio>"
        size, ratio = shown.split(", compression ")
        info = entry.info()
        assert size == format_bytes(info.nbytes_stored) and ratio == f"{info.compression_ratio:.2f}x"
        assert f"on disk  {size}, compression {ratio} (" in repr(entry)
        assert f"{size}, compression {ratio} (" in entry._repr_html_()
        assert f'<td style="padding:1px 8px;text-align:left;vertical-align:top">{ratio}</td>' in (
            store._repr_html_()
        )


BAD_PATHS = {
    "missing": ["info"],
    "file": ["verify"],
    "plain directory": ["prune", "--max-bytes", "1MB"],
    "zarr array": ["verify", "--repair"],
    "foreign zarr group": ["rm", "--", "x"],
}


def not_a_store(path: Path, kind: str) -> Path:
    """Make ``path`` a thing of ``kind`` that is not a store (``"missing"``: nothing)."""
    if kind == "file":
        path.write_text("hello")
    elif kind == "plain directory":
        (path / "sub").mkdir(parents=True)
    elif kind == "zarr array":
        zarr.create_array(str(path), shape=(3,), dtype="int32")
    elif kind == "foreign zarr group":
        zarr.open_group(str(path), mode="w").create_array("x", shape=(2,), dtype="int8")
    return path


@pytest.mark.parametrize("kind", list(BAD_PATHS))
def test_bad_paths_get_a_one_line_error(tmp_path: Path, kind: str) -> None:
    path = not_a_store(tmp_path / "thing", kind)
    command = BAD_PATHS[kind]
    assert_one_line_error(cli(command[0], str(path), *command[1:]))
    assert kind != "missing" or not path.exists()  # nothing was created


WHAT_IT_IS = {
    "file": "is a file",
    "plain directory": "non-empty directory (sub) with no zarr.json",
    "zarr array": "is a Zarr array",
    "foreign zarr group": "Zarr group that cachedfeatures did not write",
}


@pytest.mark.parametrize("kind", list(WHAT_IT_IS))
def test_info_on_a_non_store_says_what_it_is_and_what_to_pass(tmp_path: Path, kind: str) -> None:
    """Not "pass a new path" (that is what creating a cache needs): reading needs an existing store."""
    path = not_a_store(tmp_path / "thing", kind)
    result = cli("info", str(path))
    assert_one_line_error(result)
    assert WHAT_IT_IS[kind] in result.stderr
    assert "pass the path of an existing store" in result.stderr and "new path" not in result.stderr


def test_a_directory_holding_stores_is_not_a_store_that_lost_its_root(tmp_path: Path) -> None:
    """A directory whose children are stores (``/tmp`` of a user with caches in it) is not a
    store that lost its root: ``verify --repair`` would write a zarr.json into it."""
    CachedFeatureDataset(Samples(8, "tuple"), Backbone(), tmp_path / "features.zarr", spot_check=0)
    result = cli("info", str(tmp_path))
    assert_one_line_error(result)
    assert "verify --repair" not in result.stderr and "non-empty directory" in result.stderr
    assert not (tmp_path / "zarr.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [["info"], ["verify"], ["prune", "--max-bytes", "1MB"], ["rm", "--", "x"]]
)
def test_every_command_refuses_a_missing_store_without_creating_it(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "nowhere.zarr"
    assert_one_line_error(fresh_cli(command[0], str(path), *command[1:]))  # a process of its own
    assert not path.exists()


def test_usage_errors_exit_2(store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]) -> None:
    assert cli("frobnicate", str(store_path)).returncode == 2
    bad_size = cli("prune", str(store_path), "--max-bytes", "lots")
    assert bad_size.returncode == 2 and "Expected --max-bytes" in bad_size.stderr


# -- prune --------------------------------------------------------------------------------------


def test_prune_dry_run_deletes_nothing(
    store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]
) -> None:
    store = FeatureStore.open(store_path)
    before = measure(store).total
    result = cli("prune", str(store_path), "--max-bytes", str(before // 2), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would drop" in result.stdout and "dropped" not in result.stdout
    assert measure(store).total == before


def test_prune_brings_the_store_under_budget(
    store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]
) -> None:
    full, partial = two_entries
    store = FeatureStore.open(store_path)
    usage = measure(store)
    budget = usage.total - usage.entries[full.entry_name] // 2
    result = cli("prune", str(store_path), "--max-bytes", str(budget))
    assert result.returncode == 0, result.stderr
    assert "dropped" in result.stdout
    after = measure(store)
    assert after.total <= budget
    # The entry used longest ago (full, filled first) goes first; the other is untouched.
    assert len(after.chunks[partial.entry_name]) == 3
    assert len(after.chunks[full.entry_name]) < 5
    valid = FeatureStore.open(store_path).entry(full.entry_name).valid_mask()  # type: ignore[union-attr]
    assert valid.sum() == CHUNK_ROWS * len(after.chunks[full.entry_name])


def test_prune_below_the_metadata_exits_1(
    store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]
) -> None:
    result = cli("prune", str(store_path), "--max-bytes", "1kB")
    assert result.returncode == 1
    assert "still over budget" in result.stdout
    assert all(not chunks for chunks in measure(FeatureStore.open(store_path)).chunks.values())


def test_prune_json_reports_what_it_dropped(
    store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]
) -> None:
    full, _ = two_entries
    store = FeatureStore.open(store_path)
    usage = measure(store)
    budget = usage.total - usage.entries[full.entry_name] // 2
    result = cli("prune", str(store_path), "--max-bytes", str(budget), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    after = measure(store)
    assert report["within_budget"] and not report["dry_run"] and report["policy"] == "mru"
    assert report["bytes_before"] == usage.total and report["bytes_after"] == after.total <= budget
    dropped = {(item["entry"], item["chunk"]) for item in report["dropped"]}
    kept = {(name, chunk) for name, chunks in after.chunks.items() for chunk in chunks}
    assert dropped and {entry for entry, _ in dropped} == {full.entry_name} and not dropped & kept
    dry = json.loads(cli("prune", str(store_path), "--max-bytes", "1kB", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and not dry["within_budget"] and measure(store).total == after.total


def test_one_of_a_thing_is_not_plural(store_path: Path) -> None:
    fill(store_path, 0.0, rows=CHUNK_ROWS)  # one entry of one chunk
    info = cli("info", str(store_path)).stdout
    assert ": 1 entry, " in info
    verify = cli("verify", str(store_path)).stdout
    assert "checked 1 chunk in 1 entry: ok" in verify
    total = measure(FeatureStore.open(store_path)).total
    prune = cli("prune", str(store_path), "--max-bytes", str(total - 1), "--dry-run").stdout
    assert " 1 chunk (0)," in prune
    assert "entries" not in info + verify + prune and "(s)" not in info + verify + prune


# -- rm -----------------------------------------------------------------------------------------


def test_rm_removes_one_entry(store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]) -> None:
    full, partial = two_entries
    result = cli("rm", str(store_path), full.entry_name)
    assert result.returncode == 0, result.stderr
    names = [entry.name for entry in FeatureStore.open(store_path).entries]
    assert names == [partial.entry_name]
    assert not (store_path / full.entry_name).exists()


def test_rm_json(store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]) -> None:
    full, partial = two_entries
    freed = measure(FeatureStore.open(store_path)).entries[full.entry_name]
    result = cli("rm", str(store_path), full.entry_name, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["removed"] == [{"name": full.entry_name, "bytes": freed}]
    assert [entry.name for entry in FeatureStore.open(store_path).entries] == [partial.entry_name]


def test_rm_unknown_entry_lists_the_real_ones(
    store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]
) -> None:
    result = cli("rm", str(store_path), "nope")
    assert_one_line_error(result)
    assert two_entries[0].entry_name in result.stderr
    assert len(FeatureStore.open(store_path).entries) == 2


# -- verify -------------------------------------------------------------------------------------


def test_verify_clean_store(store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]) -> None:
    result = cli("verify", str(store_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": ok")
    report = json.loads(cli("verify", str(store_path), "--json").stdout)
    assert report["ok"] and report["problems"] == [] and report["chunks_checked"] == 5 + 8


def test_verify_finds_and_repairs_damage(
    store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]
) -> None:
    full, _ = two_entries
    chunks = store_path / full.entry_name / "features" / "c"
    (chunks / "1" / "0").write_bytes(b"not a blosc frame")  # unreadable
    (chunks / "3" / "0").unlink()  # valid rows, no bytes
    orphan = chunks / "0" / "0.0123abcd.partial"  # left by a killed writer, long ago
    orphan.write_bytes(b"x" * 100)
    os.utime(orphan, (0, 0))

    result = cli("verify", str(store_path), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    kinds = {(problem["kind"], problem["chunk"]) for problem in report["problems"]}
    assert kinds == {("unreadable", 1), ("missing", 3), ("orphan", None)}
    assert not any(problem["repaired"] for problem in report["problems"])

    text = cli("verify", str(store_path))
    assert text.returncode == 1 and "--repair" in text.stdout
    assert "8 rows marked valid but" in text.stdout and "(s)" not in text.stdout

    repaired = cli("verify", str(store_path), "--repair")
    assert repaired.returncode == 1  # problems were found (and fixed)
    assert repaired.stdout.count("[repaired]") == 3
    assert cli("verify", str(store_path)).returncode == 0
    assert not orphan.exists()

    # The cleared rows are recomputed, correctly, on the next read.
    entry = FeatureStore.open(store_path).entry(full.entry_name)
    assert entry is not None
    mask = entry.valid_mask()
    assert not mask[8:16].any() and not mask[24:32].any() and mask.sum() == 40 - 16
    cached = CachedFeatureDataset(
        Samples(40, "dict"), Tile(), store_path, input_key="image", chunk_rows=CHUNK_ROWS
    )
    module = cached.module
    assert isinstance(module, Tile)
    samples = cached.__getitems__(list(range(40)))
    assert module.rows_computed == 16 + len(cached.spot_checked_rows)  # and the spot check's hits
    images = np.stack([Samples(40, "dict").image(i).numpy() for i in range(40)])
    expected = np.tile(np.tanh(images.reshape(40, -1)), 2)[:, :256]
    np.testing.assert_allclose(np.stack([s["image"].numpy() for s in samples]), expected, rtol=1e-6)
    assert [s["label"] for s in samples] == [i % 7 for i in range(40)]


def test_a_damaged_entry_does_not_hide_the_others(
    store_path: Path, two_entries: tuple[CachedFeatureDataset, ...]
) -> None:
    full, partial = two_entries
    (store_path / full.entry_name / "zarr.json").write_text("{not json")
    info = cli("info", str(store_path), "--json")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert [entry["name"] for entry in report["entries"]] == [partial.entry_name]
    assert [broken["name"] for broken in report["broken"]] == [full.entry_name]
    verify = cli("verify", str(store_path), "--json")
    assert verify.returncode == 1
    assert [(p["kind"], p["entry"]) for p in json.loads(verify.stdout)["problems"]] == [
        ("metadata", full.entry_name)
    ]
    assert cli("rm", str(store_path), full.entry_name).returncode == 0
    assert not (store_path / full.entry_name).exists()
    assert [entry.name for entry in FeatureStore.open(store_path).entries] == [partial.entry_name]

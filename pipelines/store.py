"""The run store: one directory per run, stage outputs as Parquet, an atomically updated manifest.

Where it fits: every stage reads its inputs from and writes its outputs to a `RunStore`, then calls
`mark_done`; a rerun skips stages that are done (resume after a crash, a killed job, or a KubeRay
retry that recreated the cluster). Paths go through pyarrow filesystems, so a local dir, file://,
s3:// and gs:// behave alike.

Layout under <root>/<run>/:
    config.yaml              resolved config of the latest open (configs/<hash>.yaml keeps each one)
    manifest.json            seeds, versions, git sha, config history, per-round stage markers, pointers
    round_<k>/<stage>/<name>.parquet   stage tables (k = 0 is the base-model evaluation)
    adapters/round_<k>/      LoRA adapters (written by the trainer)

Atomicity: files are written to a hidden temp name (".tmp-...") and renamed into place on local and
other rename-capable filesystems; on S3/GCS a single PUT is already atomic (an object is invisible
until its upload completes), so they are written in place. A stage is complete only when its marker
is in the manifest, and the marker is written after the data: a crash mid-write leaves no marker
and no final file. The driver is the manifest's only writer (read-modify-write, no locking).

Example:
    >>> import tempfile
    >>> from pipelines.config import load_config
    >>> from pipelines.store import RunStore
    >>> store = RunStore(tempfile.mkdtemp(), "demo")
    >>> _ = store.init(load_config(None))
    >>> _ = store.write_table(1, "generate", [{"prompt_id": "p1", "sample_index": 0}])
    >>> store.mark_done(1, "generate", {"rows": 1})
    >>> store.is_done(1, "generate"), store.read_table(1, "generate").num_rows
    (True, 1)
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import posixpath
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from pipelines.config import HASH_EXCLUDE, Config, config_from_dict, config_hash, dump_config, flatten_config

MANIFEST_FORMAT = 1
POINTERS = ("best", "latest", "head")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_VERSIONED = ("torch", "transformers", "peft", "trl", "ray", "pyarrow", "numpy", "pandas")


class RunStoreError(ValueError):
    """The run dir cannot be used as asked (different config, missing data, bad name)."""


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path (relative allowed), file://, s3:// or gs:// URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def atomic_write(fs: pafs.FileSystem, path: str, write: Callable[[str], None]) -> None:
    """Run `write(target)` so that `path` appears complete or not at all (see module docstring)."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if _is_object_store(fs):
        write(path)
        return
    tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex[:8]}-{posixpath.basename(path)}")
    try:
        write(tmp)
        fs.move(tmp, path)  # rename(2) locally: atomic, replaces an existing file
    except BaseException:
        _delete_quietly(fs, tmp)
        raise


def _is_object_store(fs: pafs.FileSystem) -> bool:
    while isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    return fs.type_name in ("s3", "gcs")


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass  # the temp file may never have been created


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise RunStoreError(f"bad {kind} name {name!r}: letters, digits, . _ - only")
    return name


class RunStore:
    """One run directory. Construct cheaply (no I/O); call `init(cfg)` before writing."""

    def __init__(self, root_uri: str, run_name: str, filesystem: Optional[pafs.FileSystem] = None):
        if filesystem is None:
            self.fs, root = resolve_uri(root_uri)
        else:  # e.g. a SubTreeFileSystem or a mock in tests; root_uri is then a path inside it
            self.fs, root = filesystem, root_uri
        self.run_name = _check_name("run", run_name)
        self.root = posixpath.join(root.rstrip("/"), run_name) if root else run_name
        self.uri = root_uri.rstrip("/") + "/" + run_name

    @classmethod
    def from_config(cls, cfg: Config) -> "RunStore":
        """Open (or create) the run dir named by `cfg.run`, refusing a changed config unless forced."""
        store = cls(cfg.run.root, cfg.run.name)
        store.check_writable()
        store.init(cfg, force=cfg.run.force)
        return store

    def check_writable(self) -> None:
        """Refuse, naming run.root, a root that cannot be created or written (before anything of the
        run is written): a probe file is written next to the run dir and removed."""
        parent = posixpath.dirname(self.root) or "."
        probe = posixpath.join(parent, f".unigap-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(probe) as fh:
                fh.write(b"probe")
            self.fs.delete_file(probe)
        except (OSError, pa.ArrowException) as e:  # ArrowInvalid etc. for object stores
            root = self.uri[: -len(self.run_name) - 1]
            raise RunStoreError(f"run.root={root!r} is not writable ({type(e).__name__}: {e})") from None

    # ------------------------------------------------------------------ creation and config check

    def init(self, cfg: Config, force: bool = False) -> dict:
        """Create the run dir, or reopen it when its config hash matches (or `force`). Returns the manifest."""
        new_hash = config_hash(cfg)
        session = {"at": _now(), "config_hash": new_hash, "git_sha": _git_sha(), "versions": _versions()}
        if not self.exists():
            manifest = {"format": MANIFEST_FORMAT, "run": self.run_name, "created_at": session["at"],
                        "config_hash": new_hash, "seed": cfg.run.seed,
                        "seed_rule": "config.derive_seed(run.seed, round, stage, shard)",
                        "git_sha": session["git_sha"], "versions": session["versions"],
                        "config_history": [{"hash": new_hash, "at": session["at"], "forced": False}],
                        "sessions": [], "rounds": {}, "pointers": dict.fromkeys(POINTERS)}
        else:
            manifest = self.manifest()
            old_hash = manifest["config_hash"]
            if old_hash != new_hash:
                changed = self._config_diff(cfg)
                if changed == {}:  # the same settings under a grown schema (a new field at its default)
                    entry = {"forced": False, "schema_only": True}
                elif not force:
                    raise RunStoreError(
                        f"run {self.uri!r} was created with config hash {old_hash}, but this config "
                        f"hashes to {new_hash} (changed: {_show_changes(changed or {})}). Use another "
                        "run.name, or run.force=true to reuse it (existing data is kept).")
                else:
                    entry = {"forced": True, "changed": changed or {}}
                manifest["config_history"].append({"hash": new_hash, "at": session["at"], **entry})
                manifest["config_hash"] = new_hash
        manifest["sessions"].append(session)
        text = dump_config(cfg).encode()
        atomic_write(self.fs, self.path("configs", f"{new_hash}.yaml"), lambda p: self._put(p, text))
        atomic_write(self.fs, self.path("config.yaml"), lambda p: self._put(p, text))
        self._write_manifest(manifest)
        return manifest

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path("manifest.json")).type == pafs.FileType.File

    def _config_diff(self, cfg: Config) -> Optional[dict[str, list]]:
        """key -> [old, new] for result-changing keys; {} when every such key is equal (the hash then
        changed only because the schema grew a field); None when the old config no longer parses."""
        try:
            old = config_from_dict(yaml.safe_load(self.read_bytes("config.yaml")) or {})
        except Exception:  # written by an older schema: the hash mismatch alone is reported
            return None
        a, b = flatten_config(old), flatten_config(cfg)
        keep = [k for k in b if not any(k == x or k.startswith(x + ".") for x in HASH_EXCLUDE)]
        return {k: [a.get(k), b[k]] for k in keep if a.get(k) != b[k]}

    # ------------------------------------------------------------------ paths and raw files

    def path(self, *parts: str) -> str:
        """A path inside the run dir, on `self.fs`."""
        return posixpath.join(self.root, *parts)

    def stage_dir(self, round_: int, stage: str) -> str:
        return self.path(f"round_{int(round_)}", _check_name("stage", stage))

    def adapter_dir(self, round_: int) -> str:
        return self.path("adapters", f"round_{int(round_)}")

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Atomically write a file at `relpath` inside the run dir (e.g. a report or review.html)."""
        target = self.path(relpath)
        atomic_write(self.fs, target, lambda p: self._put(p, data))
        return target

    def read_bytes(self, relpath: str) -> bytes:
        with self.fs.open_input_stream(self.path(relpath)) as fh:
            return fh.read()

    def _put(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as fh:
            fh.write(data)

    # ------------------------------------------------------------------ stage tables

    def write_table(self, round_: int, stage: str, table: Any, name: str = "data") -> str:
        """Write `table` (pa.Table, DataFrame or list of dicts) as <stage>/<name>.parquet, atomically."""
        table = _to_arrow(table)
        target = posixpath.join(self.stage_dir(round_, stage), _check_name("table", name) + ".parquet")
        atomic_write(self.fs, target, lambda p: pq.write_table(table, p, filesystem=self.fs))
        return target

    def table_path(self, round_: int, stage: str, name: str = "data") -> str:
        """Where table `name` of a stage lives: <stage>/<name>.parquet (written by the driver), or a
        <stage>/<name>/ directory of part files (written by Ray Data workers)."""
        base = posixpath.join(self.stage_dir(round_, stage), _check_name("table", name))
        for candidate in (base + ".parquet", base):
            if self.fs.get_file_info(candidate).type != pafs.FileType.NotFound:
                return candidate
        raise RunStoreError(f"no table {name!r} for round {round_} stage {stage!r} in {self.uri}")

    def read_table(self, round_: int, stage: str, name: str = "data", columns: Optional[list[str]] = None,
                   filters: Any = None, files: Optional[Sequence[str]] = None) -> pa.Table:
        """Read a stage's table (`table_path`), optionally only some columns / rows (pyarrow
        `filters`, e.g. [("prompt_id", "in", ids)]): a projection never reads the other columns.
        `files`: only these (non-empty list of) part files of the table, e.g. `chunks.part_ranges`'."""
        source = list(files) if files is not None else self.table_path(round_, stage, name)
        return pq.read_table(source, filesystem=self.fs, columns=columns, filters=filters)  # ignores ".tmp-*" files

    def table_schema(self, round_: int, stage: str, name: str = "data") -> pa.Schema:
        """The table's schema, from the Parquet footers alone."""
        return pq.ParquetDataset(self.table_path(round_, stage, name), filesystem=self.fs).schema

    def clear_stage(self, round_: int, stage: str) -> None:
        """Remove an incomplete stage's leftovers before rerunning it; completed stages are kept."""
        if self.is_done(round_, stage):
            raise RunStoreError(f"round {round_} stage {stage!r} is complete; refusing to clear it")
        if self.fs.get_file_info(self.stage_dir(round_, stage)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.stage_dir(round_, stage))

    # ------------------------------------------------------------------ manifest, markers, pointers

    def manifest(self) -> dict:
        """The manifest as on storage (read fresh each time: cheap, and never stale after a crash)."""
        if not self.exists():
            raise RunStoreError(f"{self.uri} has no manifest.json; call init(cfg) first")
        return json.loads(self.read_bytes("manifest.json"))

    def _write_manifest(self, manifest: dict) -> None:
        manifest["updated_at"] = _now()
        text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default).encode()
        atomic_write(self.fs, self.path("manifest.json"), lambda p: self._put(p, text))

    def mark_done(self, round_: int, stage: str, info: Optional[dict] = None) -> None:
        """Record that a stage finished (call after its data is written). `info`: JSON-able dict."""
        _check_name("stage", stage)
        manifest = self.manifest()
        rnd = manifest["rounds"].setdefault(str(int(round_)), {"stages": {}})
        rnd["stages"][stage] = {"done_at": _now(), "info": dict(info or {})}
        self._write_manifest(manifest)

    def is_done(self, round_: int, stage: str) -> bool:
        return self.stage_info(round_, stage) is not None

    def stage_info(self, round_: int, stage: str) -> Optional[dict]:
        """The `info` recorded by `mark_done`, or None when the stage is not complete."""
        stages = self.manifest()["rounds"].get(str(int(round_)), {}).get("stages", {})
        entry = stages.get(stage)
        return None if entry is None else entry["info"]

    def set_pointer(self, name: str, round_: Optional[int]) -> None:
        """Point `best`, `latest` or `head` (the last round not rolled back) at a round (None clears it)."""
        if name not in POINTERS:
            raise RunStoreError(f"unknown pointer {name!r}; known: {list(POINTERS)}")
        manifest = self.manifest()
        manifest["pointers"][name] = None if round_ is None else int(round_)
        self._write_manifest(manifest)

    def pointer(self, name: str) -> Optional[int]:
        if name not in POINTERS:
            raise RunStoreError(f"unknown pointer {name!r}; known: {list(POINTERS)}")
        return self.manifest()["pointers"].get(name)


def _to_arrow(table: Any) -> pa.Table:
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, list):
        return pa.Table.from_pylist(table)
    if hasattr(table, "columns"):  # pandas DataFrame
        return pa.Table.from_pandas(table, preserve_index=False)
    raise RunStoreError(f"cannot write a {type(table).__name__} as a table")


def _show_changes(changed: dict[str, list]) -> str:
    if not changed:
        return "see config.yaml"
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars in stage info
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _versions() -> dict[str, Optional[str]]:
    """Installed versions, read from package metadata (importing torch or ray here would be slow)."""
    out: dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_sha() -> Optional[str]:
    """HEAD of the checkout this code runs from ("+dirty" when modified); None without git."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None

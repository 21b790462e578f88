"""LoRA adapters for Janus via peft: attach, save with checksums, load verified, merge for serving.

Where it fits: Ray Train attaches LoRA to the language model (and trains the generation head fully,
as `modules_to_save`), saves `adapters/round_<k>/` in the run store; generate / judge actors and
Serve replicas load it back -- always through `load_adapter`, which refuses a tampered adapter.

An adapter directory holds peft's `adapter_config.json` + `adapter_model.safetensors` and a
`SHA256SUMS` file (sha256sum format) covering both.

Example:
    >>> import tempfile
    >>> from models.tiny import build_tiny
    >>> m = build_tiny()
    >>> m = attach_lora(m, LoraSpec(r=4))
    >>> d = tempfile.mkdtemp()
    >>> _ = save_adapter(m, d)
    >>> m2 = load_adapter(build_tiny(), d)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

from models.janus import JanusUnified

CHECKSUM_FILE = "SHA256SUMS"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Attention and MLP projections of the Llama backbone only (not the SigLIP vision tower).
DEFAULT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class AdapterError(ValueError):
    """An adapter directory that is missing files, malformed, or fails its checksum."""


@dataclass
class LoraSpec:
    """What LoRA to attach. target_modules: a regex (peft full-match) or a list of module names.
    Defaults equal the config's `model.lora` (models/ does not import pipelines/; a test checks it)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = DEFAULT_TARGETS
    modules_to_save: list[str] = field(default_factory=lambda: ["generation_head"])


def check_lora_spec(spec: LoraSpec, names: list[str]) -> None:
    """ValueError, before any compute, when `spec` cannot apply to a model with these module names."""
    if spec.r < 1:
        raise ValueError(f"LoRA r must be >= 1, got {spec.r}")
    if isinstance(spec.target_modules, str):
        hits = [n for n in names if re.fullmatch(spec.target_modules, n)]
    else:
        hits = [n for n in names if any(n == t or n.endswith("." + t) for t in spec.target_modules)]
    if not hits:
        raise ValueError(f"LoRA target_modules {spec.target_modules!r} matches no module of the model")
    missing = [s for s in spec.modules_to_save if not any(n.split(".")[-1] == s for n in names)]
    if missing:
        raise ValueError(f"LoRA modules_to_save {missing} match no module of the model")


def attach_lora(m: JanusUnified, spec: LoraSpec) -> JanusUnified:
    """Wrap the model with fresh LoRA layers (peft injects them in place). Returns a new wrapper in the
    model's train / eval mode (peft's new dropout layers would otherwise be in train mode: an eval
    model would sample with LoRA dropout on)."""
    check_lora_spec(spec, [n for n, _ in m.janus.named_modules()])
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, modules_to_save=list(spec.modules_to_save))
    training = m.janus.training
    peft_model = get_peft_model(m.janus, config)
    peft_model.train(training)
    return JanusUnified(peft_model, m.processor, m.default_judge_mode, m.fast_decode)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: str | os.PathLike, files=ADAPTER_FILES) -> dict[str, str]:
    """Write SHA256SUMS for `files` in `directory`; returns {file: sha256}."""
    d = Path(directory)
    sums = {f: _sha256(d / f) for f in files}
    tmp = d / (CHECKSUM_FILE + ".tmp")
    tmp.write_text("".join(f"{h}  {f}\n" for f, h in sums.items()))
    os.replace(tmp, d / CHECKSUM_FILE)
    return sums


def fetch_adapter(directory: str | os.PathLike) -> Path:
    """A local directory for an adapter path or URI (s3://, gs://, file://): remote adapters are
    copied once into ~/.cache/unigap/adapters/<sha1 of the URI> (every load still verifies them)."""
    text = str(directory)
    if "://" not in text:
        return Path(directory)
    import pyarrow.fs as pafs

    local = Path(os.path.expanduser("~/.cache/unigap/adapters")) / hashlib.sha1(text.encode()).hexdigest()[:16]
    if not (local / CHECKSUM_FILE).is_file():
        fs, path = pafs.FileSystem.from_uri(text)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise AdapterError(f"adapter directory {text} does not exist")
        tmp = local.with_name(local.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        if local.exists():  # another process fetched it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, local)
    return local


def verify_adapter(directory: str | os.PathLike) -> dict[str, str]:
    """Check an adapter directory (path or URI) against its SHA256SUMS; raise AdapterError naming the problem."""
    d = fetch_adapter(directory)
    if not d.is_dir():
        raise AdapterError(f"adapter directory {d} does not exist")
    for f in ADAPTER_FILES + (CHECKSUM_FILE,):
        if not (d / f).is_file():
            raise AdapterError(f"adapter {d} is missing {f}")
    expected = {}
    for line in (d / CHECKSUM_FILE).read_text().splitlines():
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            raise AdapterError(f"adapter {d}: malformed {CHECKSUM_FILE} line {line!r}")
        expected[parts[1]] = parts[0]
    for f in ADAPTER_FILES:
        if f not in expected:
            raise AdapterError(f"adapter {d}: {CHECKSUM_FILE} has no entry for {f}")
        actual = _sha256(d / f)
        if actual != expected[f]:
            raise AdapterError(f"adapter {d}: checksum mismatch for {f} (expected {expected[f][:12]}..., "
                               f"got {actual[:12]}...); the file was modified or corrupted")
    try:
        json.loads((d / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter {d}: adapter_config.json is not valid JSON ({e})") from e
    return expected


def save_adapter(m: JanusUnified, directory: str | os.PathLike) -> dict[str, str]:
    """Save the LoRA adapter (safetensors) and its checksums. Returns {file: sha256}."""
    if not isinstance(m.model, PeftModel):
        raise ValueError("model has no LoRA adapter to save (call attach_lora first)")
    Path(directory).mkdir(parents=True, exist_ok=True)
    m.model.save_pretrained(str(directory), safe_serialization=True)
    return write_checksums(directory)


def load_adapter(m: JanusUnified, directory: str | os.PathLike, trainable: bool = False) -> JanusUnified:
    """Verify the checksum, then load the adapter onto `m`'s base model. Returns a new wrapper."""
    verify_adapter(directory)
    peft_model = PeftModel.from_pretrained(m.janus, str(fetch_adapter(directory)), is_trainable=trainable)
    if not trainable:
        peft_model.eval()
    return JanusUnified(peft_model, m.processor, m.default_judge_mode, m.fast_decode)


def merge_adapter(m: JanusUnified) -> JanusUnified:
    """Fold the LoRA weights into the base weights (serving: no adapter overhead per token)."""
    if not isinstance(m.model, PeftModel):
        return m
    merged = m.model.merge_and_unload()
    return JanusUnified(merged, m.processor, m.default_judge_mode, m.fast_decode)


class AdapterSet:
    """One base model and several named adapters on it (serving many rounds from one copy of the
    weights): `active(name)` is a context that yields a JanusUnified computing with that adapter
    (None = the base model, adapters disabled). Adapters are verified on `add` like `load_adapter`.

    Not thread-safe: the caller serialises `add`, `active` and model calls (Serve does so under its
    model lock). `retire(name, token)` only marks an adapter for removal; it is deleted at the next
    `active` (so an eviction from another thread never pulls weights from under a running forward),
    and only if `token` is still the one `add` returned (a stale handle cannot retire a reloaded one).

    Example:
        >>> import tempfile
        >>> from models.tiny import build_tiny
        >>> d = tempfile.mkdtemp(); _ = save_adapter(attach_lora(build_tiny(), LoraSpec(r=4)), d)
        >>> s = AdapterSet(build_tiny()); token = s.add("round_1", d)
        >>> with s.active("round_1") as m:
        ...     _ = m.generate_images(["a red circle"], num_images=1, seed=0)
        >>> s.names()
        ['round_1']
    """

    def __init__(self, base: JanusUnified):
        self.base, self.peft = base, None
        self._tokens: dict[str, int] = {}
        self._retired: set[tuple[str, int]] = set()
        self._next = 0

    def names(self) -> list[str]:
        return sorted(self._tokens)

    def add(self, name: str, directory: str | os.PathLike) -> int:
        """Load the (verified) adapter at `directory` as `name` (replacing one of that name)."""
        verify_adapter(directory)
        path = str(fetch_adapter(directory))
        if name in self._tokens:
            self.peft.delete_adapter(name)
            del self._tokens[name]
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base.janus, path, adapter_name=name)
        else:
            self.peft.load_adapter(path, adapter_name=name)
        self.peft.eval()
        self._next += 1
        self._tokens[name] = self._next
        return self._next

    def retire(self, name: str, token: int) -> None:
        self._retired.add((name, token))

    def active(self, name: str | None):
        """Context manager: the model with adapter `name` active (None: the base, adapters off)."""
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            for gone, token in list(self._retired):
                self._retired.discard((gone, token))
                if self._tokens.get(gone) == token and gone != name:
                    self.peft.delete_adapter(gone)
                    del self._tokens[gone]
            if name is None:
                if self.peft is None:
                    yield self.base
                else:
                    with self.peft.disable_adapter():
                        yield self.base
                return
            if name not in self._tokens:
                raise AdapterError(f"adapter {name!r} is not loaded (loaded: {self.names()})")
            self.peft.set_adapter(name)
            yield JanusUnified(self.peft, self.base.processor, self.base.default_judge_mode, self.base.fast_decode)
        return ctx()

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
    >>> save_adapter(m, d)
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
    """What LoRA to attach. target_modules: a regex (peft full-match) or a list of module names."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
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
    """Wrap the model with fresh LoRA layers (peft injects them in place). Returns a new wrapper."""
    check_lora_spec(spec, [n for n, _ in m.janus.named_modules()])
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, modules_to_save=list(spec.modules_to_save))
    peft_model = get_peft_model(m.janus, config)
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

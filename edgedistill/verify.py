"""Stage `verify`: load every artifact in its real runtime and compare it with the PyTorch fake-quant student.

Two comparisons per artifact, both gated (a failure fails the build, exit 1, figures in the report):
- the dequantized weights in the file against the fake-quant weights (learned scales included);
- next-token logits on held-out text, run in the artifact's runtime, against the fake-quant
  student that models the runtime's activation rounding where the runtime does it: top-1
  agreement >= eval.parity_top1 and mean KL <= eval.parity_kl. The same runtime logits against a
  weights-only reference are reported beside, to show what modelling the activations buys.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from edgedistill.data.teacher_answers import read_jsonl
from edgedistill.formats import FORMATS
from edgedistill.progress import task_progress

# a few float32 ulps of a tensor's largest value: how far two float32 dequantizations may differ
FLOAT32_SLACK = 2.0 ** -20
# logit difference (nats) under which two tokens count as tied for top-1: 0.1% in probability
TIE_NATS = 1e-3
# how far past the reference's own noise floor a runtime's KL may land, and how far the floor may
# widen the configured bounds at most (see bounds())
NOISE_FLOOR_KL_FACTOR = 1.5
MAX_WIDENING_KL = 10.0  # x eval.parity_kl
MAX_WIDENING_TOP1 = 0.09  # below eval.parity_top1
TOP1_SIGMAS = 4


def prompt_part(example: dict) -> list[int]:
    """The tokens before the first answer token: the templated prompt."""
    mask = example["loss_mask"]
    first = mask.index(1) if 1 in mask else len(mask)
    return example["input_ids"][:first]


def eval_sequences(examples: list[dict], budget: int) -> list[list[int]]:
    seqs, total = [], 0
    for ex in examples:
        if total >= budget:
            break
        ids = ex["input_ids"][: budget - total]
        if len(ids) > 1:
            seqs.append(ids)
            total += len(ids)
    return seqs


def logit_agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Top-1 agreement and mean KL(ref || got) over positions, in float64.

    The runtime agrees at a position when its top token is the reference's, or one the reference
    itself scores within TIE_NATS of its top: between tokens that close the reference has no top-1
    (a random or undertrained model has many such near-ties, and float accumulation order alone
    decides them). top1_strict counts exact argmax equality only.
    """
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    lp = ref64 - np.logaddexp.reduce(ref64, axis=-1, keepdims=True)
    lq = got64 - np.logaddexp.reduce(got64, axis=-1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top_got = got.argmax(-1)
    gap = ref64.max(-1) - ref64[np.arange(len(ref64)), top_got]
    # float64 rounding leaves a KL of identical distributions a hair below 0: it is 0
    return {"top1_agreement": float((gap <= TIE_NATS).mean()), "top1_strict": float((ref.argmax(-1) == top_got).mean()),
            "kl": max(float(kl.mean()), 0.0), "positions": int(ref.shape[0])}


def weight_parity(artifact: Path, fmt: str, reference: torch.nn.Module) -> dict:
    """The artifact's dequantized weights against the fake-quant weights, every quantized tensor.

    The exporter writes the fake-quant codes and scales themselves, and both sides compute
    (code - zero point) * scale in float32, so they should be equal; the allowance is a few float32
    ulps of the tensor's largest value (FLOAT32_SLACK), far below any one code step. A quantized
    tensor missing from the file, or of another shape, fails too.
    """
    from edgedistill.distill.qat import quantized_weight_names
    from edgedistill.export.gguf import dequantize_gguf_tensors
    from edgedistill.export.onnx import dequantize_onnx_weights

    weights = (dequantize_gguf_tensors if FORMATS[fmt].runtime == "llamacpp" else dequantize_onnx_weights)(artifact)
    state = reference.state_dict()
    expected = quantized_weight_names(reference)
    ref = {k: state[k].detach().float().numpy() for k in expected}
    missing = [k for k in expected if k not in weights or weights[k].shape != ref[k].shape]
    present = [k for k in expected if k not in missing]
    diffs = {k: float(np.abs(weights[k] - ref[k]).max()) for k in present}
    allowed = {k: FLOAT32_SLACK * float(np.abs(ref[k]).max()) for k in present}
    worst = max(present, key=lambda k: diffs[k] - allowed[k]) if present else None
    return {"tensors_compared": len(present), "tensors_expected": len(expected), "missing": missing,
            "max_abs_diff": max(diffs.values()) if diffs else None,
            "worst_tensor": worst, "worst_diff": diffs[worst] if worst else None,
            "worst_allowed": allowed[worst] if worst else None,
            "ok": bool(present) and not missing and all(diffs[k] <= allowed[k] for k in present)}


def bounds(parity: dict, top1_min: float, kl_max: float) -> dict:
    """The logit bounds this artifact is held to, and why.

    Where the runtime computes with float activations its logits can match the fake-quant student
    to float rounding, and the configured bounds apply as they are. Where it rounds activations to
    int8 (llama.cpp's Q4_0/Q8_0 kernels, MatMulNBits at accuracy_level 4) no model can match it
    position by position: a last-bit difference in accumulation order flips an int8 code, and the
    flip propagates through every later quantized matmul. The reference then cannot match *itself*
    under last-bit perturbations better than its `noise_floor` (noise_floor(), measured in the same
    build on the same text), and the bounds are the configured ones or that floor, whichever is
    wider, within MAX_WIDENING_* of the configured ones (0.90 and 1e-2 by default):

    - KL: NOISE_FLOOR_KL_FACTOR times the floor's KL (a stable statistic: measured runtime/floor
      ratios 1.0-1.2 for all four formats on the default build);
    - top-1: the floor's less TOP1_SIGMAS standard errors of the difference of two agreement
      rates, counting half the positions as independent (next-token errors cluster within a
      sequence; measured runtime-minus-floor differences spread about 1.4x the binomial figure).

    A wrong weight, scale or graph moves the runtime orders of magnitude past the floor in KL.
    """
    floor = parity.get("noise_floor")
    if not floor:
        return {"top1_min": top1_min, "kl_max": kl_max, "basis": "configured (eval.parity_top1, eval.parity_kl)"}
    p, n = floor["top1_agreement"], floor["positions"]
    sigma = (2 * p * (1 - p) / (n / 2)) ** 0.5
    # ... but never past a ceiling: a floor that high means the student itself is too fragile to check
    top1 = max(p - TOP1_SIGMAS * sigma, top1_min - MAX_WIDENING_TOP1)
    kl = min(NOISE_FLOOR_KL_FACTOR * floor["kl"], kl_max * MAX_WIDENING_KL)
    return {"top1_min": min(top1_min, top1), "kl_max": max(kl_max, kl),
            "basis": f"configured ({top1_min}, {kl_max}) or the reference's own noise floor, the worst of three "
                     f"last-bit perturbations (top-1 {p:.4f} less {TOP1_SIGMAS} standard errors, KL {floor['kl']:.3g} x "
                     f"{NOISE_FLOOR_KL_FACTOR}), whichever is wider: the runtime rounds activations to int8"}


def noise_floor(reference: torch.nn.Module, ref_logits: np.ndarray, seqs: list[list[int]]) -> dict:
    """How well the reference agrees with itself under last-bit perturbations: run in float64, and
    with each input embedding value moved by a seeded random ~2 float32 ulps (per value: a common
    scale would cancel in the first RMSNorm). The worst of the three."""
    runs = [logit_agreement(ref_logits, _logits(copy.deepcopy(reference).double(), seqs))]
    for seed in (1, 2):
        perturbed = copy.deepcopy(reference)
        perturbed.get_input_embeddings().register_forward_hook(_ulp_noise(seed))
        runs.append(logit_agreement(ref_logits, _logits(perturbed, seqs)))
    # the worst of them: a runtime changes the rounding of every operation, as float64 does, while
    # a nudge to the input alone may stay below the rounding boundaries for a while (measured:
    # Q4_0 floor KL 1.7e-3 in float64, 5e-4 and 7e-4 under the input nudges)
    return {"top1_agreement": min(r["top1_agreement"] for r in runs), "kl": max(r["kl"] for r in runs),
            "positions": runs[0]["positions"], "realisations": runs}


def gate(parity: dict, top1_min: float, kl_max: float) -> list[dict]:
    """The parity gate as report checks: weights equal, then runtime logits close to the fake-quant student."""
    w, b = parity["weights"], bounds(parity, top1_min, kl_max)
    top1, kl = parity["top1_agreement"], parity["kl"]
    return [
        {"name": "parity_weights", "value": w["worst_diff"], "limit": w["worst_allowed"], "op": "<=",
         "ok": w["ok"], "basis": "measured", "message": _weights_message(w)},
        {"name": "parity_top1", "value": top1, "limit": b["top1_min"], "op": ">=", "ok": top1 >= b["top1_min"],
         "basis": "measured", "bound": b["basis"],
         "message": f"runtime top-1 agreement with the fake-quant student {top1:.4f} "
                    f"{'>=' if top1 >= b['top1_min'] else '<'} {b['top1_min']:.4f}"},
        {"name": "parity_kl", "value": kl, "limit": b["kl_max"], "op": "<=", "ok": kl <= b["kl_max"],
         "basis": "measured", "bound": b["basis"],
         "message": f"runtime KL to the fake-quant student {kl:.3g} {'<=' if kl <= b['kl_max'] else '>'} "
                    f"{b['kl_max']:.3g}"},
    ]


def _weights_message(w: dict) -> str:
    if w.get("missing"):
        return (f"{len(w['missing'])} of {w['tensors_expected']} quantized tensors missing from the file or of "
                f"another shape: {', '.join(w['missing'][:3])}")
    if w["worst_tensor"] is None:
        return "no quantized tensor could be read back from the file"
    return (f"weights read back from the file {'equal' if w['ok'] else 'differ from'} the fake-quant student's: "
            f"{w['worst_tensor']} by {w['worst_diff']:.3g} (allowed {w['worst_allowed']:.3g})")


def _ulp_noise(seed: int):
    def hook(module, args, out):
        g = torch.Generator().manual_seed(seed)
        return out * (1 + torch.randn(out.shape, generator=g) * 2.0 ** -22)

    return hook


def _logits(model: torch.nn.Module, seqs: list[list[int]]) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(torch.tensor([ids])).logits[0].float().numpy() for ids in seqs])


TOKENS_FILE = "verify_tokens.json"  # the held-out sequences the gate ran on, published for `edgedistill verify`


def check_artifact(path: Path, fmt: str, student: torch.nn.Module, learned: dict | None, spec, tokens: dict,
                   tok, *, top1_min: float, kl_max: float) -> dict:
    """The parity gate for one artifact: its runtime's logits on tokens["sequences"] and its weights
    against the fake-quant student of `spec` (the artifact's quantization, act=True where the runtime
    rounds activations); the figures, the gate's checks and a sample reply to tokens["prompt"]."""
    from dataclasses import replace

    from edgedistill.distill.qat import fake_quant_model_copy
    from edgedistill.runtime import load_runner

    reference = fake_quant_model_copy(student, spec, learned=learned).eval()
    seqs, prompt = tokens["sequences"], tokens["prompt"]
    runner = load_runner(path, fmt)
    try:
        got = np.concatenate([runner.logits(ids) for ids in seqs])
        gen = runner.generate(prompt, 32, stop_ids=[tok.eos_token_id])
    finally:
        runner.close()
    ref_logits = _logits(reference, seqs)
    parity = logit_agreement(ref_logits, got)
    parity["reference"] = ("fake-quant weights and the runtime's int8 activation rounding" if spec.act
                           else "fake-quant weights, float activations (as the runtime computes)")
    if spec.act:
        # how well the reference matches itself under last-bit changes (see bounds()), and what
        # modelling the activations buys: the same runtime logits against a weights-only reference
        parity["noise_floor"] = noise_floor(reference, ref_logits, seqs)
        weights_only = fake_quant_model_copy(student, replace(spec, act=False), learned=learned).eval()
        parity["weights_only_reference"] = logit_agreement(_logits(weights_only, seqs), got)
    parity["weights"] = weight_parity(path, fmt, reference)
    parity["checks"] = gate(parity, top1_min, kl_max)
    parity["sample"] = {"prompt": tok.decode(prompt), "reply": tok.decode(gen.tokens, skip_special_tokens=True),
                        "tokens": len(gen.tokens)}
    return parity


def run(ctx) -> dict:
    from edgedistill import atomic
    from edgedistill.distill.quantized import load_learned_scales
    from edgedistill.distill.stage import load_student, quant_spec

    _, tok = ctx.session.teacher(ctx["teacher"])
    student = load_student(ctx["distill"].path("student"))
    learned = load_learned_scales(ctx["distill"].path("student"))  # the exporters used them too
    heldout = read_jsonl(ctx["data"].path("heldout_tokens.jsonl"))
    tokens = {"sequences": eval_sequences(heldout, ctx.cfg.eval.verify_tokens), "prompt": prompt_part(heldout[0])}
    atomic.write_json(ctx.dir / TOKENS_FILE, tokens)
    results = {}
    artifacts = ctx["export"].summary["artifacts"]
    group_bits = ctx["plan"].summary["student"].get("group_bits") or None
    with task_progress("verify", len(artifacts), ctx.session.progress) as advance:
        for fmt, art in artifacts.items():
            spec = quant_spec(ctx.cfg, fmt, group_bits, act=True)
            parity = check_artifact(ctx["export"].path(art["file"]), fmt, student, learned, spec, tokens, tok,
                                    top1_min=ctx.cfg.eval.parity_top1, kl_max=ctx.cfg.eval.parity_kl)
            parity["quant"] = spec.to_dict()
            results[fmt] = parity
            advance()
    return {"artifacts": results, "tokens_file": TOKENS_FILE,
            "bounds": {"top1": ctx.cfg.eval.parity_top1, "kl": ctx.cfg.eval.parity_kl}}


def verify_published(folder: Path, *, parity: bool = True, progress: bool = True) -> dict:
    """`edgedistill verify OUT/T`: the published files against manifest.json, the reports against
    report.json, then the parity gate re-run on the folder alone (its student, its tokens, each
    artifact in its runtime).

    An artifact is run only when its files, the student's and the tokens' match the manifest, and
    the hardened reader of `inspect` accepts it: the gate would otherwise measure a file the build
    never checked, inside a runtime that trusts its input. ok is False on any problem or failed check.
    """
    from edgedistill.build import quiet_libraries
    from edgedistill.export.manifest import check_files, read_manifest, under

    quiet_libraries()
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = check_files(folder, manifest)
    bad = {p.path for p in problems}
    problems += _rendering_problems(folder, bad)
    result = {"folder": str(folder), "target": manifest["target"], "files_checked": len(manifest["files"]),
              "problems": [{"path": p.path, "problem": p.problem, "detail": p.detail} for p in problems],
              "artifacts": {}}

    shared_ok = not any(under(p, bad) for p in (manifest["student"], manifest["parity"]["tokens_file"]))
    runnable = []
    for a in manifest["artifacts"]:
        why = _why_not_runnable(folder, a, shared_ok and not under(a["file"], bad))
        if why:
            result["artifacts"][a["format"]] = {"file": a["file"], "ran": False, "ok": False, "why": why}
        else:
            runnable.append(a)
    if parity and runnable:
        result["artifacts"] |= _rerun_gate(folder, manifest, runnable, progress)
    result["ok"] = not problems and all(r["ok"] for r in result["artifacts"].values())
    return result


def _rendering_problems(folder: Path, bad: set[str]) -> list:
    """report.md and report.html are not hashed (`edgedistill report` rewrites them), but they must be
    what report.json renders to: a hand-edited verdict is a tampered file too."""
    from edgedistill.export.manifest import FileProblem
    from edgedistill.report import HTML_NAME, JSON_NAME, MD_NAME, load_report, to_html, to_markdown

    if JSON_NAME in bad or not (folder / JSON_NAME).is_file():
        return []
    report = load_report(folder)
    problems = []
    for name, render in ((MD_NAME, to_markdown), (HTML_NAME, to_html)):
        path = folder / name
        if path.is_file() and path.read_text(encoding="utf-8", errors="replace") != render(report):
            problems.append(FileProblem(name, "rendering", "differs from what report.json renders to (edited after "
                                                           "the build); `edgedistill report` renders it again"))
    return problems


def _why_not_runnable(folder: Path, artifact: dict, files_ok: bool) -> str | None:
    from edgedistill.distill.quantized import QuantSpec
    from edgedistill.errors import UserError
    from edgedistill.inspect import describe_artifact

    if not files_ok:
        return "its files, the student or the tokens do not match the manifest"
    if artifact["format"] not in FORMATS:
        return f"unknown format {artifact['format']!r}"
    try:
        QuantSpec.from_dict(artifact["quant"])
        describe_artifact(folder / artifact["file"])
    except (TypeError, ValueError) as e:
        return f"its quantization record is malformed ({e})"
    except UserError as e:
        return f"it does not read as a sound artifact: {e}"
    return None


def _rerun_gate(folder: Path, manifest: dict, artifacts: list[dict], progress: bool) -> dict:
    import json

    from transformers import AutoTokenizer

    from edgedistill.distill.quantized import QuantSpec, load_learned_scales
    from edgedistill.distill.stage import load_student

    student_dir = folder / manifest["student"]
    student, learned = load_student(student_dir), load_learned_scales(student_dir)
    tok = AutoTokenizer.from_pretrained(student_dir)
    tokens = json.loads((folder / manifest["parity"]["tokens_file"]).read_text())
    bounds = manifest["parity"]
    results = {}
    with task_progress("verify", len(artifacts), progress) as advance:
        for a in artifacts:
            got = check_artifact(folder / a["file"], a["format"], student, learned, QuantSpec.from_dict(a["quant"]),
                                 tokens, tok, top1_min=bounds["top1"], kl_max=bounds["kl"])
            results[a["format"]] = {
                "file": a["file"], "ran": True, "ok": all(c["ok"] for c in got["checks"]),
                "recorded": a["parity"], "checks": got["checks"],
                "now": {"top1_agreement": got["top1_agreement"], "kl": got["kl"], "weights_ok": got["weights"]["ok"]},
            }
            advance()
    return results


def print_result(result: dict, console) -> None:
    """verify_published()'s result for a person: each file problem, then each artifact's gate."""
    from rich.markup import escape
    from rich.table import Table

    n, problems = result["files_checked"], result["problems"]
    if problems:
        console.print(f"[red]✗[/red] {len(problems)} of {n} files do not match manifest.json:")
        for p in problems:
            console.print(f"    {p['path']!r}: {p['detail']}" if not p["path"].isprintable()
                          else f"    {p['path']}: {p['detail']}", markup=False, highlight=False)
    else:
        console.print(f"[green]✓[/green] {n} files match manifest.json (size and sha256), none missing or added")
    if result["artifacts"]:
        table = Table("artifact", "ran", "weights", "top-1 recorded → now", "KL recorded → now", "ok",
                      title="parity gate, re-run on this folder", title_justify="left")
        for fmt, r in result["artifacts"].items():
            if not r["ran"]:
                table.add_row(escape(r["file"]), "no", "-", "-", "-", "[red]NO[/red]")
                continue
            rec, now = r["recorded"], r["now"]
            table.add_row(escape(r["file"]), "yes", "equal" if now["weights_ok"] else "[red]differ[/red]",
                          f"{rec['top1_agreement']:.4f} → {now['top1_agreement']:.4f}",
                          f"{rec['kl']:.3g} → {now['kl']:.3g}", "yes" if r["ok"] else "[red]NO[/red]")
        console.print(table)
        for r in result["artifacts"].values():
            for c in r.get("checks", []):
                if not c["ok"]:
                    console.print(f"  ✗ {r['file']}: {c['message']}", markup=False, highlight=False)
            if not r["ran"]:
                console.print(f"  ✗ {r['file']} not run: {r['why']}", markup=False, highlight=False)
    verdict = "[green]VERIFIED[/green]" if result["ok"] else "[red]NOT VERIFIED[/red]"
    console.print(f"{verdict} {escape(result['folder'])}", highlight=False)

"""Safety: no pickle loading of untrusted files, no remote code unless asked, no text ever evaluated."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import TINY_STUDENT, cli

ROOT = Path(__file__).resolve().parent.parent
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def unsafe_calls(source: str, name: str = "<source>") -> list[str]:
    """Every construct that could run code hidden in a file or a text: unpickling, eval/exec,
    torch.load without weights_only=True, numpy pickles, unsafe YAML, remote code switched on."""
    found, tree = [], ast.parse(source)
    # yaml.load(..., Loader=L) is safe when L is SafeLoader or a class of this module built on it
    safe_loaders = {"SafeLoader", "CSafeLoader"} | {
        c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
        and any((isinstance(b, ast.Attribute) and b.attr in {"SafeLoader", "CSafeLoader"}) for b in c.bases)}

    def at(node, what):
        found.append(f"{name}:{node.lineno}: {what}")

    def loader(value) -> str | None:
        return value.attr if isinstance(value, ast.Attribute) else getattr(value, "id", None)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f, kw = node.func, {k.arg: k.value for k in node.keywords}
            if isinstance(f, ast.Name) and f.id in {"eval", "exec", "compile", "__import__"}:
                at(node, f"{f.id}()")
            if isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else None
                if owner in UNPICKLERS and f.attr != "UnpicklingError":
                    at(node, f"{owner}.{f.attr}()")
                if owner == "torch" and f.attr == "load":
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        at(node, "torch.load() without weights_only=True")
                if owner == "yaml" and f.attr in {"load", "load_all", "unsafe_load", "full_load"} and not (
                        f.attr in {"load", "load_all"} and loader(kw.get("Loader")) in safe_loaders):
                    at(node, f"yaml.{f.attr}()")
            allow = kw.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                at(node, "allow_pickle=True")
            trc = kw.get("trust_remote_code")
            if isinstance(trc, ast.Constant) and trc.value is True:
                at(node, "trust_remote_code=True")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                if n.split(".")[0] in UNPICKLERS - {"pickle"}:
                    at(node, f"import {n}")
    return found


def test_the_scanner_finds_each_unsafe_construct():
    bad = '''
import dill
torch.load(f)
torch.load(f, weights_only=False)
pickle.loads(b)
eval("1")
exec("x = 1")
yaml.load(t)
yaml.load(t, Loader=yaml.Loader)
np.load(p, allow_pickle=True)
AutoModel.from_pretrained(p, trust_remote_code=True)
'''
    assert len(unsafe_calls(bad)) == 10
    ok = ('torch.load(f, weights_only=True)\nyaml.safe_load(t)\nmodel.eval()\nfrom_pretrained(p, trust_remote_code=flag)\n'
          'class Strict(yaml.SafeLoader):\n    pass\nyaml.load(t, Loader=Strict)\nyaml.load(t, Loader=yaml.SafeLoader)\n')
    assert unsafe_calls(ok) == []


def test_no_source_file_loads_pickles_evaluates_text_or_trusts_remote_code():
    files = [p for d in ("edgedistill", "benchmarks", "sample_apps") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 30
    found = [hit for p in files for hit in unsafe_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


class _Payload:
    """What a hostile checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _raw_pickle(path: Path, marker: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))


def _torch_zip_pickle(path: Path, marker: Path) -> None:
    """torch.save's zip layout, with the hostile object in its data.pkl (torch.save itself would run it)."""
    import pickle
    import zipfile

    import torch

    torch.save({"model.embed_tokens.weight": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)


@pytest.mark.parametrize("write, needle", [(_raw_pickle, "not a torch checkpoint of tensors"),
                                           (_torch_zip_pickle, "unpickling would call posix.system")])
def test_a_hostile_pickle_teacher_is_refused_and_never_runs(tmp_path, tiny_teacher_dir, write, needle):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    write(teacher / "pytorch_model.bin", marker)
    out = tmp_path / "out"
    res = cli("build", "--teacher", teacher, "--student", TINY_STUDENT, "--target", "rpi5-8gb",
              "--out", out, "--no-progress")
    assert not marker.exists(), "the pickle's code ran"
    assert res.returncode == 2, res.stderr[-2000:]
    assert "refused the teacher's pickle weights" in res.stderr and needle in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists(), "refused before anything is written"


def test_plain_pickle_weights_still_load_through_weights_only(tmp_path, tiny_teacher_dir):
    """The check refuses hostile pickles, not *.bin teachers: tensors alone pass and the build plans."""
    import torch
    from safetensors.torch import load_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    torch.save(load_file(teacher / "model.safetensors"), teacher / "pytorch_model.bin")
    (teacher / "model.safetensors").unlink()
    res = cli("build", "--teacher", teacher, "--student", TINY_STUDENT, "--target", "rpi5-8gb",
              "--out", tmp_path / "out", "--dry-run")
    assert res.returncode == 0, res.stderr[-2000:]


def test_remote_code_is_never_run_unless_asked(tmp_path, tiny_teacher_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    marker = tmp_path / "PWNED"
    cfg = json.loads((teacher / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                            "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (teacher / "config.json").write_text(json.dumps(cfg))
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    (teacher / "configuration_evil.py").write_text(code)
    (teacher / "modeling_evil.py").write_text(code)
    res = cli("build", "--teacher", teacher, "--student", TINY_STUDENT, "--target", "rpi5-8gb",
              "--out", tmp_path / "out", "--dry-run")
    assert not marker.exists(), "the teacher's own Python code ran without --trust-remote-code"
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "ships its own Python code" in res.stderr and "--trust-remote-code" in res.stderr


@pytest.mark.parametrize("text", ["{{ 7*7 }}", "__import__('os').system('touch PWNED')", "${HOME} $(whoami)",
                                  "{% for x in range(3) %}x{% endfor %}"])
def test_prompt_text_is_data_never_code(tmp_path, tokenizer_dir, text):
    """Prompts pass through JSON parsing and the chat template as values: they come out verbatim."""
    from transformers import AutoTokenizer

    from edgedistill.data.prompts import load_user_file
    from edgedistill.data.teacher_answers import chat_ids

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": text}) + "\n")
    (prompt,) = load_user_file(path)
    assert prompt.messages[-1]["content"] == text
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert text in tok.decode(chat_ids(tok, prompt.messages, add_generation_prompt=True))
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()

"""The reports of a real (tiny) build: drawn in headless Chromium, re-rendered by `edgedistill report`,
documented key by key in docs/report-schema.md, and --strict failing on an untrusted projection model."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

from edgedistill.report import (COMPARISON_HTML, COMPARISON_MD, HTML_NAME, JSON_NAME, MD_NAME, comparison_html,
                                load_report, target_folders)

from conftest import cli, fast_config  # noqa: E402

SCHEMA_DOC = Path(__file__).resolve().parent.parent / "docs" / "report-schema.md"
TARGETS = ("phone-4gb", "rpi5-8gb")
# The plots every target report draws, by their aria-label (report.py)
PLOTS = ("checks: value against limit", "memory breakdown", "quality: teacher, students and artifacts",
         "projection model on the host: measured vs projected")


def built(tiny_build) -> Path:
    res, out, _ = tiny_build
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------------ Chromium


def open_offline(browser, path: Path, shot: Path):
    """Load a report from file:// and return (page, console errors, non-file requests); screenshot it."""
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith("file://") else requests.append(r.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.screenshot(path=str(shot), full_page=True)
    return page, errors, requests


def drawn_plots(page) -> dict[str, dict]:
    """Per SVG plot (aria-label): its box and how many of its shapes have a non-empty box on screen."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('svg[aria-label]')].map(svg => {
        const box = svg.getBoundingClientRect();
        const shapes = [...svg.querySelectorAll('rect, line')].filter(s => {
            const b = s.getBoundingClientRect(); return b.width > 0 && b.height > 0; }).length;
        return [svg.getAttribute('aria-label') + '#' + [...document.querySelectorAll('svg')].indexOf(svg),
                {width: box.width, height: box.height, shapes: shapes, texts: svg.querySelectorAll('text').length}];
    }))""")


def png_pixels(png: bytes) -> list[bytes]:
    """The pixel rows of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium's screenshots are), as
    bytes of 4 per pixel (RGB padded). Decoded here because no image library is a test dependency."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        filt, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a, b = line[i - bpp] if i >= bpp else 0, prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if filt == 1:
                line[i] = (line[i] + a) & 255
            elif filt == 2:
                line[i] = (line[i] + b) & 255
            elif filt == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 4 else b"".join(bytes(line[i:i + 3]) + b"\xff" for i in range(0, stride, 3)))
        prev = line
    return rows


def ink(png: bytes) -> tuple[float, int]:
    """What a screenshot shows: the fraction of pixels that are not the page's white, and how many
    distinct colours there are (axis text alone is one grey; bars add their own colours)."""
    rows = png_pixels(png)
    pixels = [row[i:i + 3] for row in rows for i in range(0, len(row), 4)]
    return sum(p != b"\xff\xff\xff" for p in pixels) / len(pixels), len(set(pixels))


def test_png_reader_and_ink_on_a_blank_and_a_drawn_page(browser):
    page = browser.new_page(viewport={"width": 200, "height": 100})
    page.set_content("<body style='margin:0;background:#fff'></body>")
    assert ink(page.screenshot()) == (0.0, 1)
    page.set_content("<body style='margin:0;background:#fff;display:flex;align-items:flex-start'>"
                     "<div style='width:50px;height:100px;background:#0a7'></div>"
                     "<div style='width:20px;height:50px;background:#c22'></div></body>")
    share, colours = ink(page.screenshot())
    assert abs(share - (50 * 100 + 20 * 50) / (200 * 100)) < 0.01 and colours == 3
    page.close()


def test_target_report_draws_every_plot_offline(browser, tiny_build, tmp_path):
    out = built(tiny_build)
    for target in TARGETS:
        shot = tmp_path / f"{target}.png"
        page, errors, requests = open_offline(browser, out / target / HTML_NAME, shot)
        plots = drawn_plots(page)
        for label in PLOTS:
            drawn = [p for key, p in plots.items() if key.startswith(label + "#")]
            assert drawn, f"{target}: no '{label}' plot"
            for p in drawn:
                assert p["width"] > 100 and p["height"] > 30 and p["shapes"] >= 2 and p["texts"] >= 2, (label, p)
            # what is on screen: the plot's own screenshot has bars and text in several colours
            share, colours = ink(page.locator(f'svg[aria-label="{label}"]').first.screenshot())
            assert share > 0.02 and colours >= 4, (target, label, share, colours)
        # the per-artifact check plots: one per artifact
        n_artifacts = len(json.loads((out / target / JSON_NAME).read_text())["artifacts"])
        assert sum(key.startswith(PLOTS[0] + "#") for key in plots) == n_artifacts
        assert page.locator("#trust").count() == 1  # the host check's verdict, near the top
        assert errors == [] and requests == []
        assert shot.stat().st_size > 20_000  # a real, non-blank screenshot
        page.close()


def test_comparison_across_targets_is_drawn(browser, tiny_build, tmp_path):
    out = built(tiny_build)
    assert (out / COMPARISON_MD).is_file()
    page, errors, requests = open_offline(browser, out / COMPARISON_HTML, tmp_path / "comparison.png")
    plots = drawn_plots(page)
    [margins] = [p for key, p in plots.items() if key.startswith("margin per check and target#")]
    assert margins["width"] > 100 and margins["shapes"] >= 2 * 4  # a bar per target for every budget check
    text = page.inner_text("body")
    assert all(t in text for t in TARGETS)
    assert errors == [] and requests == []
    page.close()


# --------------------------------------------------------------------------------- edgedistill report


def test_report_command_rerenders_every_target_and_the_comparison(tiny_build, tmp_path):
    out = built(tiny_build)
    copy = tmp_path / "out"
    # every target folder (other tests may have built more targets into the shared folder): report.json
    # alone, md and html must come back from it
    targets = [p.name for p in target_folders(out)]
    assert set(TARGETS) <= set(targets)
    for target in targets:
        (copy / target).mkdir(parents=True)
        shutil.copy(out / target / JSON_NAME, copy / target / JSON_NAME)
    res = cli("report", copy)
    assert res.returncode == 0, res.stderr
    for target in targets:
        for name in (MD_NAME, HTML_NAME):  # byte for byte what the build wrote: rendering is deterministic
            assert (copy / target / name).read_bytes() == (out / target / name).read_bytes(), (target, name)
    assert (copy / COMPARISON_HTML).read_text() == comparison_html([load_report(copy / t) for t in targets])
    assert all(t in (copy / COMPARISON_MD).read_text() for t in targets)
    # one target folder alone
    (copy / TARGETS[0] / MD_NAME).unlink()
    res = cli("report", copy / TARGETS[0])
    assert res.returncode == 0 and (copy / TARGETS[0] / MD_NAME).is_file()
    # a folder without any report: one line, exit 2
    res = cli("report", tmp_path / "empty")
    assert res.returncode == 2 and "no report found" in res.stderr


def test_published_reports_still_verify(tiny_build):
    out = built(tiny_build)
    res = cli("verify", out / TARGETS[0], "--files-only")
    assert res.returncode == 0, res.stdout[-2000:]


# -------------------------------------------------------------------------------------- schema document


def key_paths(obj, prefix: str = "") -> set[str]:
    """Every key path of a JSON value: `a.b`, list items as `a[]`."""
    paths = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{prefix}.{k}" if prefix else k
            paths.add(p)
            paths |= key_paths(v, p)
    elif isinstance(obj, list):
        for v in obj:
            paths |= key_paths(v, prefix + "[]")
    return paths


def documented_patterns() -> list[re.Pattern]:
    """The first backticked cell of each table row in the schema doc; `*` stands for one map key."""
    pats = []
    for line in SCHEMA_DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if m:
            rx = re.escape(m.group(1)).replace(r"\*", r"[^.\[\]]+")
            pats.append(re.compile(rx + r"$"))
    return pats


def test_schema_doc_lists_every_key_of_a_real_report(tiny_build):
    out = built(tiny_build)
    pats = documented_patterns()
    assert len(pats) > 50
    for target in TARGETS:
        report = json.loads((out / target / JSON_NAME).read_text())
        undocumented = sorted(p for p in key_paths(report) if not any(rx.match(p) for rx in pats))
        assert undocumented == [], f"{target}: keys of report.json missing from {SCHEMA_DOC.name}: {undocumented}"
    text = SCHEMA_DOC.read_text(encoding="utf-8")
    assert "schema_version" in text and "measured" in text and "projected" in text


def test_schema_doc_matcher_catches_a_new_key(tiny_build):
    out = built(tiny_build)
    report = json.loads((out / TARGETS[0] / JSON_NAME).read_text())
    report["artifacts"][0]["host"]["brand_new_figure"] = 1.0
    pats = documented_patterns()
    assert [p for p in key_paths(report) if not any(rx.match(p) for rx in pats)] == ["artifacts[].host.brand_new_figure"]


# -------------------------------------------------------------------------------------------------- strict


def test_strict_fails_figures_projected_with_an_untrusted_model(tmp_path, tiny_teacher_dir, small_prompts, tiny_build):
    """The tiny student is all fixed per-token overhead, so the roofline misses the host's own measurements
    by far more than 30%: the plain build passes (with a warning), --strict fails those figures (exit 1)."""
    _, shared_out, _ = tiny_build
    out = tmp_path / "out"
    shutil.copytree(shared_out / ".stages", out / ".stages")  # reuse everything up to the budget stage
    plain = json.loads((shared_out / TARGETS[0] / JSON_NAME).read_text())
    assert plain["ok"] is True and plain["strict"] is False
    assert plain["calibration"]["trusted"] is False, "precondition: the tiny student's host error is out of bounds"
    assert plain["calibration"]["message"] in (shared_out / TARGETS[0] / MD_NAME).read_text()

    cfg = fast_config(tmp_path, out, tiny_teacher_dir, small_prompts)
    res = cli("build", "--config", cfg, "--no-progress", "--strict")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "fails under --strict" in res.stderr
    report = json.loads((out / TARGETS[0] / JSON_NAME).read_text())
    assert report["ok"] is False and report["strict"] is True
    failed = [c for a in report["artifacts"] for c in a["checks"] if not c["ok"]]
    assert failed and all(c["basis"] == "projected" and c["trusted"] is False for c in failed)
    assert all("fails under --strict" in c["message"] for c in failed)
    # the option is in the written config, so a replay is strict too
    assert "strict = true" in (out / "build-config.toml").read_text()

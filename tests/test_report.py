"""``lmforge report``: a report card of a trained run, as Markdown and as one self-contained HTML
page — every section there, evaluation next to chance, text escaped, nothing fetched; and a real
headless browser renders the page (when Debian's chromium is installed)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmforge.errors import ConfigError, InputError
from lmforge.report import ReportConfig, write_report
from lmforge.train.metrics import read_metrics

SECTIONS = ("Summary", "Configs", "Data", "Tokenizer", "Training curves", "Evaluation",
            "Samples", "Timings", "Environment")
EVAL = {"model": {"source": "run/checkpoints/step_0000030.pt", "kind": "run", "dtype": "fp32"},
        "tasks": {"mmlu": {"metrics": {"acc": 0.2611, "acc_macro": 0.2598, "n": 570,
                                       "subjects": {"anatomy": 0.3}},
                           "chance": 0.25, "n": 570, "config": {"shots": 5}},
                  "gsm8k": {"metrics": {"exact_match_strict": 0.0125}, "chance": 0.0, "n": 80,
                            "config": {"shots": 8}},
                  "humaneval": {"metrics": {"pass@1": 0.0}, "chance": 0.0, "n": 164,
                                "config": {}},
                  "bpb": {"metrics": {"bpb": 2.875, "perplexity": 30.5, "tokens": 1000},
                          "chance": None, "n": 2, "config": {}}},
        "seconds": 12.5, "environment": {"device": "cpu", "torch": "2.13.0"}}
SAMPLE = '<script>alert("pwned")</script> & <b>bold</b>'


@pytest.fixture(scope="module")
def run(trained_run: Path, tmp_path_factory) -> Path:
    """A copy of the trained run with an evaluation result and samples (one of them hostile)."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(trained_run, run)
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps(EVAL))
    (run / "samples.txt").write_text(f"--- step 0\ndef x\n--- step 30\n{SAMPLE}\n")
    write_report(ReportConfig(run=str(run)))
    return run


def test_markdown_has_every_section_the_eval_table_and_the_final_bpb(run: Path) -> None:
    md = (run / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings == list(SECTIONS)
    done = read_metrics(run / "metrics.jsonl")[-1]
    assert done["event"] == "done"
    assert (f"Final validation: {done['val_bpb']:.4f} bits per byte against the unigram "
            f"baseline's {done['unigram_bpb']:.4f}") in md
    assert f"| parameters | {done['params']:,} |" in md
    # each metric next to its chance level; bpb against the run's unigram baseline
    assert "| mmlu | acc | 0.2611 | 0.2500 | 570 |" in md
    assert "| gsm8k | exact_match_strict | 0.0125 | 0.0000 | 80 |" in md
    assert "| humaneval | pass@1 | 0.0000 | 0.0000 | 164 |" in md
    assert f"| bpb | bpb | 2.8750 | {done['unigram_bpb']:.4f} (unigram) | 2 |" in md
    assert "subjects" not in md.split("## Evaluation")[1].split("## Samples")[0]
    data_dir = Path(json.loads((run / "config.json").read_text())["train"]["data"])
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert f"| tokens | {manifest['num_tokens']:,} |" in md
    assert "| vocabulary size | 320 |" in md and "<\\|endoftext\\|>" in md
    assert "![loss.png: training loss and validation bpb (from training)](loss.png)" in md
    assert "median tokens/s" in md and "| lmforge |" in md and "| torch |" in md


def test_html_is_self_contained_and_escaped(run: Path) -> None:
    page = (run / "report.html").read_text()
    assert 'src="http' not in page and "<link" not in page and "url(" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # loss.png and the curves drawn from metrics.jsonl
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert "<script>alert" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; &lt;b&gt;" in page
    assert page.count("<script>") == 1  # the page's own, which counts decoded images
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page


def test_regenerated_in_the_run_dir_refused_elsewhere_without_force(run: Path,
                                                                    tmp_path: Path) -> None:
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    paths = write_report(ReportConfig(run=str(run)))  # the run owns its report: replaced
    assert paths == [run / "report.md", run / "report.html"]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before

    out = tmp_path / "elsewhere"
    assert write_report(ReportConfig(run=str(run), out=str(out))) == [
        out / "report.md", out / "report.html"]
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    with pytest.raises(InputError, match=r"report\.md: already exists.*--force"):
        write_report(ReportConfig(run=str(run), out=str(out)))
    write_report(ReportConfig(run=str(run), out=str(out), force=True))
    # the loss plot is linked from where the Markdown lies
    assert f"]({os.path.relpath(run / 'loss.png', out)})" in (out / "report.md").read_text()


def test_missing_parts_are_left_out_with_a_line(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "loss.png").unlink()
    records = read_metrics(run / "metrics.jsonl")  # as if stopped by Ctrl-C before the end
    done = records.pop()
    records.append({"step": 29, "event": "interrupted", "signal": "SIGINT"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = json.loads((run / "config.json").read_text())
    config["train"]["data"] = str(tmp_path / "moved")
    (run / "config.json").write_text(json.dumps(config))
    write_report(ReportConfig(run=str(run)))
    md = (run / "report.md").read_text()
    assert re.findall(r"^## (.+)$", md, flags=re.M) == list(SECTIONS)
    assert f"{tmp_path / 'moved' / 'manifest.json'}: not found" in md
    assert "loss.png: not found" in md
    assert "eval/eval.json: not found (the run has not been evaluated)" in md
    assert "samples.txt: not found (the run sampled nothing: sample_tokens 0)" in md
    assert "drawn from metrics.jsonl: shown in report.html" in md
    assert "Interrupted at step 29 (SIGINT)." in md
    assert f"| parameters | {done['params']:,} |" in md  # counted from the model config


def test_a_directory_that_is_not_a_run_is_refused(tmp_path: Path, run: Path) -> None:
    with pytest.raises(InputError, match="not a run directory") as e:
        write_report(ReportConfig(run=str(tmp_path)))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="run: required"):
        ReportConfig()
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "eval" / "eval.json").write_text('{"tasks": [1, 2]}')
    with pytest.raises(InputError, match=re.escape(str(broken / "eval" / "eval.json"))):
        write_report(ReportConfig(run=str(broken)))
    (broken / "eval" / "eval.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        write_report(ReportConfig(run=str(broken)))


def test_the_quickstart_directory_reports_its_train_run(trained_run: Path,
                                                        tmp_path: Path) -> None:
    quickstart = tmp_path / "quickstart"  # its tokenizer and config sit beside train/
    shutil.copytree(trained_run, quickstart / "train")
    shutil.copy(trained_run / "tokenizer.lmforge.json", quickstart)
    (quickstart / "config.json").write_text(json.dumps({"out_dir": str(quickstart)}))
    paths = write_report(ReportConfig(run=str(quickstart)))
    assert paths == [quickstart / "train" / "report.md", quickstart / "train" / "report.html"]
    assert not (quickstart / "report.md").exists()


def _chromium(*args: str, tmp: Path) -> str:
    """Run headless Chromium offline (no sandbox: CI runs as root; small /dev/shm in
    containers); returns its standard output."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed: apt-get install chromium to run the browser check")
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}",
         *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_headless_browser_renders_the_report(run: Path, tmp_path: Path) -> None:
    url = (run / "report.html").as_uri()
    dom = _chromium("--dump-dom", url, tmp=tmp_path)
    assert 'data-images-loaded="2"' in dom  # both images decoded (naturalWidth > 0)
    evaluation = dom.split('<section id="evaluation">')[1].split("</section>")[0]
    for row in ("<td>mmlu</td><td>acc</td><td>0.2611</td><td>0.2500</td>",
                "<td>gsm8k</td><td>exact_match_strict</td><td>0.0125</td><td>0.0000</td>",
                "<td>humaneval</td>"):
        assert row in evaluation
    assert "&lt;script&gt;alert(\"pwned\")&lt;/script&gt;" in dom  # text, not a script

    shot = tmp_path / "report.png"
    _chromium("--window-size=1200,3000", f"--screenshot={shot}", url, tmp=tmp_path)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.var() > 0  # not a blank page: text, tables and plots on white
    assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.01

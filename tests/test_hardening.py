"""Every bad input is one line ``lmforge: error: ...`` with exit status 2, never a traceback;
every output is written safely (umask respected, never silently replaced); messages name the
flags as typed. One test per class, parametrised over the commands it applies to."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.files import atomic_write_text

from .conftest import synthetic_documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    path = root / "corpus.txt"
    path.write_text("\n\n".join(synthetic_documents(40)), encoding="utf-8")
    return path


def one_line_error(capsys, code: int, *needles: str) -> str:
    """The command failed with status 2 and printed one error line holding ``needles``."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _run_and_data(trained_run: Path) -> tuple[str, str]:
    return str(trained_run), str(trained_run.parent / "data")


@pytest.mark.parametrize("argv,flag", [
    (["train", "--data", "d", "--lr", "inf"], "--lr"),
    (["train", "--data", "d", "--min-lr-ratio", "nan"], "--min-lr-ratio"),
    (["quantize", "--checkpoint", "r", "--out", "q", "--damp=-inf"], "--damp"),
    (["generate", "--checkpoint", "r", "--temperature", "inf"], "--temperature"),
    (["generate", "--checkpoint", "r", "--num-samples", "-1"], "--num-samples"),
    (["chat", "--checkpoint", "r", "--top-p", "nan"], "--top-p"),
])
def test_non_finite_and_out_of_range_values_name_the_flag(argv, flag, capsys):
    one_line_error(capsys, main(argv), flag)
    assert capsys.readouterr().out == ""  # nothing printed before the check (generate's prompt)


def test_os_errors_on_paths_are_one_line(corpus, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    # a file where a directory is expected, and a directory where a file is expected
    one_line_error(capsys, main(["tokenizer", "train", "--input", str(corpus), "--vocab-size",
                                 "300", "--out", str(a_file / "tok.json"), "--no-progress"]),
                   str(a_file))
    one_line_error(capsys, main(["tokenizer", "train", "--input", str(corpus), "--vocab-size",
                                 "300", "--out", str(tmp_path), "--no-progress"]),
                   str(tmp_path), "is a directory")
    one_line_error(capsys, main(["tokenizer", "encode", "--tokenizer", str(tmp_path),
                                 "--text", "x"]), str(tmp_path))
    one_line_error(capsys, main(["data", "stats", str(a_file)]), str(a_file))


def test_permission_denied_is_one_line(corpus, tmp_path, capsys):
    if os.geteuid() == 0:  # root is refused by sysfs, not by file permissions
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no /sys to be refused by")
        locked = Path("/sys/lmforge-test")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
    one_line_error(capsys, main(["tokenizer", "train", "--input", str(corpus), "--vocab-size",
                                 "300", "--out", str(locked / "tok.json"), "--no-progress"]),
                   str(locked), "check its permissions")


def test_config_files_that_are_not_yaml(tmp_path, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1,\n  2\nbatch: {")
    for path, needle in ((tmp_path, "is a directory"), (binary, "not a text file"),
                         (broken, "not valid YAML")):
        one_line_error(capsys, main(["train", "--config", str(path), "--data", "d"]), needle)


def test_bad_regex_and_empty_separator(corpus, tmp_path, capsys):
    base = ["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "t.json")]
    one_line_error(capsys, main([*base, "--pattern", "(unclosed"]), "--pattern", "regex")
    one_line_error(capsys, main([*base, "--separator", ""]), "--separator")
    one_line_error(capsys, main(["data", "prepare", "--input", str(corpus), "--tokenizer", "t",
                                 "--out", str(tmp_path / "d"), "--separator", ""]),
                   "--separator")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_the_machine_lacks(trained_run, tmp_path, capsys):
    run, data = _run_and_data(trained_run)
    one_line_error(capsys, main(["quantize", "--checkpoint", run, "--out",
                                 str(tmp_path / "q"), "--device", "cuda"]), "--device", "CUDA")
    one_line_error(capsys, main(["train", "--data", data, "--out", str(tmp_path / "t"),
                                 "--device", "cuda:1"]), "CUDA")


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = atomic_write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def _outputs(trained_run: Path, tmp_path: Path) -> dict[str, tuple[list[str], Path]]:
    run, data = _run_and_data(trained_run)
    tok = str(trained_run / "tokenizer.lmforge.json")
    return {
        "tokenizer train": (["tokenizer", "train", "--input", str(tmp_path / "c.txt"),
                             "--vocab-size", "300", "--no-progress"], tmp_path / "t.json"),
        "tokenizer import": (["tokenizer", "import", "--source", str(tmp_path / "hf_tok")],
                             tmp_path / "imported.json"),
        "tokenizer export": (["tokenizer", "export", "--tokenizer", tok, "--format",
                              "tiktoken"], tmp_path / "tik"),
        "quantize": (["quantize", "--checkpoint", run, "--data", data, "--mode", "int8",
                      "--batch-size", "4", "--eval-batches", "1", "--no-progress"],
                     tmp_path / "q.safetensors"),
        "export gguf": (["export", "gguf", "--checkpoint", run], tmp_path / "m.gguf"),
        "export hf": (["export", "hf", "--checkpoint", run], tmp_path / "hf"),
    }


@pytest.mark.parametrize("command", ["tokenizer train", "tokenizer import", "tokenizer export",
                                     "quantize", "export gguf", "export hf"])
def test_existing_outputs_are_refused_unless_force(command, trained_run, tmp_path, capsys):
    (tmp_path / "c.txt").write_text("\n".join(synthetic_documents(30)))
    tok = lmforge.load(str(trained_run)).tokenizer
    from lmforge.tokenizer.hf import save_hf

    save_hf(tok, tmp_path / "hf_tok")
    argv, out = _outputs(trained_run, tmp_path)[command]
    if command in ("export hf", "tokenizer export"):
        out.mkdir()
        (out / "config.json").write_text("mine")
        precious = out / "config.json"
    else:
        out.write_text("mine")
        precious = out
    one_line_error(capsys, main([*argv, "--out", str(out)]), str(out), "--force")
    assert precious.read_text() == "mine"  # untouched
    assert main([*argv, "--out", str(out), "--force"]) == 0, capsys.readouterr().err
    assert out.exists() and (out.is_dir() or out.read_bytes() != b"mine")


def test_version_help_and_debug(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("lmforge ")
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "stages, in pipeline order" in help_text and "``" not in help_text
    with pytest.raises(Exception, match="no such checkpoint"):
        main(["--debug", "generate", "--checkpoint", "nowhere"])  # the traceback, not a line


def test_generate_says_when_it_cuts_the_length(trained_run, capsys):
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "the",
                 "--max-new-tokens", "1000"]) == 0
    captured = capsys.readouterr()
    assert "max_new_tokens 1000 cut to" in captured.err
    assert captured.out.startswith("the")


def test_the_run_config_records_resolved_paths(trained_run):
    import json

    recorded = json.loads((trained_run / "config.json").read_text())["train"]
    assert Path(recorded["data"]).is_absolute() and Path(recorded["out"]).is_absolute()

"""Tests for the command line (qgraph.cli) and the progress-bar switch (qgraph.progress).

Everything runs in-process through ``qgraph.cli.main`` and never loads a real model: argument and
output-path checks must fail before ``qgraph.workflow.Job`` is constructed.
"""

from __future__ import annotations

import io
import os
import tempfile

import pytest
import torch

import qgraph.workflow
from qgraph import progress
from qgraph.cli import check_output_path, main
from qgraph.errors import DataError, QGraphError
from qgraph.evaluate import perplexity

NOT_ROOT = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="permissions need non-root POSIX"
)


@pytest.fixture(autouse=True)
def _restore_progress_switch():
    before = progress.enabled()
    yield
    progress.set_enabled(before)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI constructs a Job (that is, loads a model)."""

    def refuse(*args, **kwargs):
        pytest.fail("the CLI loaded a model before checking its arguments")

    monkeypatch.setattr(qgraph.workflow, "Job", refuse)


class Reached(QGraphError):
    """Raised by a stand-in Job: the CLI got past its checks."""


@pytest.fixture
def reach_job(monkeypatch):
    """Replace Job by one that records its arguments and stops the command with Reached."""
    calls = []

    def job(*args, **kwargs):
        calls.append((args, kwargs))
        raise Reached("reached Job")

    monkeypatch.setattr(qgraph.workflow, "Job", job)
    return calls


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("qgraph: error: ")
    return lines[0]


# ------------------------------------------------------------------ numeric arguments


@pytest.mark.parametrize(
    "argv, option",
    [
        (["run", "--pipeline", "fuse-norms", "--eval-windows", "0"], "--eval-windows"),
        (["run", "--pipeline", "fuse-norms", "--eval-windows", "-3"], "--eval-windows"),
        (["run", "--pipeline", "fuse-norms", "--eval-windows", "2.5"], "--eval-windows"),
        (["run", "--pipeline", "fuse-norms", "--calib-windows", "0"], "--calib-windows"),
        (["run", "--pipeline", "fuse-norms", "--window", "0"], "--window"),
        (["run", "--pipeline", "fuse-norms", "--calib-seed", "-1"], "--calib-seed"),
        (["run", "--pipeline", "fuse-norms", "--window", "1"], "--window"),
        (["run", "--pipeline", "fuse-norms", "--window", "abc"], "--window"),
        (["run", "--pipeline", "fuse-norms", "--seed", "-1"], "--seed"),
        (["run", "--pipeline", "fuse-norms", "--seed", str(2**64)], "--seed"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--prompt", "x", "--top-k", "-1"], "--top-k"),
        (["demo", "--eval-windows", "0"], "--eval-windows"),
        (["demo", "--eval-windows", "-1"], "--eval-windows"),
    ],
)
def test_bad_numbers_exit_2_before_loading(capsys, no_loading, argv, option) -> None:
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"argument {option}: expected an integer" in line
    assert argv[-1] in line


def test_usage_errors_are_one_line(capsys, no_loading) -> None:
    assert main(["run"]) == 2
    assert "--pipeline" in _one_error_line(capsys.readouterr().err)
    assert main(["bogus"]) == 2
    assert "bogus" in _one_error_line(capsys.readouterr().err)


def test_help_returns_0(capsys) -> None:
    assert main(["run", "--help"]) == 0
    assert "--eval-windows" in capsys.readouterr().out


def test_good_numbers_reach_job(capsys, reach_job) -> None:
    argv = ["run", "--pipeline", "fuse-norms", "--eval-windows", "1", "--calib-windows", "1"]
    assert main([*argv, "--window", "2", "--seed", "0", "--calib-seed", "3"]) == 2
    assert "reached Job" in capsys.readouterr().err
    ((args, kwargs),) = reach_job
    assert args[3:6] == (1, 1, 2) and kwargs["calib_seed"] == 3


# ------------------------------------------------------------------ output paths


@pytest.mark.parametrize("option", ["--export", "--report", "--save"])
@pytest.mark.parametrize("kind", ["missing-dir", "directory", "parent-is-file"])
def test_unwritable_output_fails_before_loading(tmp_path, capsys, no_loading, option, kind) -> None:
    if kind == "missing-dir":
        path = tmp_path / "nope" / "out.file"
    elif kind == "directory":
        path = tmp_path / "adir"
        path.mkdir()
    else:
        (tmp_path / "plain").write_text("x")
        path = tmp_path / "plain" / "out.file"
    assert main(["run", "--pipeline", "fuse-norms", option, str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{option} {path}" in line
    expected = {
        "missing-dir": "does not exist",
        "directory": "is a directory",
        "parent-is-file": "is not a directory",
    }
    assert expected[kind] in line


def test_unwritable_directory_is_reported(tmp_path, capsys, no_loading, monkeypatch) -> None:
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    path = tmp_path / "r.json"
    assert main(["run", "--pipeline", "fuse-norms", "--report", str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--report {path}" in line and "not writable" in line


def test_unwritable_existing_file_is_reported(tmp_path, capsys, no_loading, monkeypatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == path else real_access(p, mode))
    assert main(["run", "--pipeline", "fuse-norms", "--export", str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--export {path}" in line and "existing file is not writable" in line


@NOT_ROOT
def test_read_only_directory_and_file(tmp_path, capsys, no_loading) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["run", "--pipeline", "fuse-norms", "--save", str(ro / "m.pt2")]) == 2
        assert "not writable" in _one_error_line(capsys.readouterr().err)
    finally:
        ro.chmod(0o700)
    f = tmp_path / "r.json"
    f.write_text("{}")
    f.chmod(0o444)
    assert main(["run", "--pipeline", "fuse-norms", "--report", str(f)]) == 2
    assert "existing file is not writable" in _one_error_line(capsys.readouterr().err)


def test_writable_outputs_pass_and_leave_nothing(tmp_path, capsys, reach_job) -> None:
    (tmp_path / "old.json").write_text("{}")  # an existing writable file may be replaced
    argv = ["run", "--pipeline", "fuse-norms", "--export", str(tmp_path / "m.onnx")]
    argv += ["--report", str(tmp_path / "old.json"), "--save", str(tmp_path / "m.pt2")]
    assert main(argv) == 2
    assert "reached Job" in capsys.readouterr().err
    assert len(reach_job) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


def test_same_output_twice_is_rejected(tmp_path, capsys, no_loading) -> None:
    path = str(tmp_path / "x")
    assert main(["run", "--pipeline", "fuse-norms", "--export", path, "--report", path]) == 2
    assert "--export and --report" in _one_error_line(capsys.readouterr().err)


def test_check_output_path_helper(tmp_path) -> None:
    assert check_output_path("--report", tmp_path / "a.json") == tmp_path / "a.json"
    with pytest.raises(QGraphError, match="--report .*does not exist"):
        check_output_path("--report", tmp_path / "missing" / "a.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["file", "report-is-dir"])
def test_demo_out_checked_before_loading(tmp_path, capsys, no_loading, kind) -> None:
    if kind == "file":
        out = tmp_path / "out"
        out.write_text("not a directory")
        fragment = "exists and is not a directory"
    else:
        out = tmp_path / "out"
        (out / "demo-report.json").mkdir(parents=True)
        fragment = "is a directory"
    assert main(["demo", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--out" in line and str(out) in line and fragment in line


def test_demo_out_created_then_job(tmp_path, capsys, reach_job) -> None:
    out = tmp_path / "a" / "b"
    assert main(["demo", "--out", str(out), "--eval-windows", "2", "--no-progress"]) == 2
    assert out.is_dir() and list(out.iterdir()) == []
    assert reach_job[0][1]["eval_windows"] == 2


# ------------------------------------------------------------------ unexpected exceptions


def test_internal_error_exit_3_without_traceback(capsys, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("something broke")

    monkeypatch.setattr(qgraph.workflow, "Job", boom)
    monkeypatch.delenv("QGRAPH_DEBUG", raising=False)
    assert main(["run", "--pipeline", "fuse-norms"]) == 3
    err = capsys.readouterr().err
    assert err.strip() == (
        "qgraph: internal error: RuntimeError: something broke "
        "(set QGRAPH_DEBUG=1 for the traceback)"
    )
    monkeypatch.setenv("QGRAPH_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        main(["run", "--pipeline", "fuse-norms"])


def test_qgraph_error_exit_2(capsys, monkeypatch) -> None:
    def bad(*args, **kwargs):
        raise DataError("text too short")

    monkeypatch.setattr(qgraph.workflow, "Job", bad)
    assert main(["run", "--pipeline", "fuse-norms"]) == 2
    assert _one_error_line(capsys.readouterr().err) == "qgraph: error: text too short"


def test_keyboard_interrupt_exit_130(capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qgraph.workflow, "Job", interrupted)
    assert main(["run", "--pipeline", "fuse-norms"]) == 130
    assert capsys.readouterr().err.strip() == "qgraph: interrupted"


# ------------------------------------------------------------------ qgraph passes


def test_passes_lists_forbids(capsys) -> None:
    from qgraph.pass_manager import registry

    assert main(["passes"]) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if "  [" in line]
    forbidding = [cls for cls in registry().values() if cls.forbids]
    assert forbidding
    for cls in forbidding:
        header = next(line for line in headers if line.startswith(f"{cls.name}  ["))
        assert "forbids " + ",".join(sorted(cls.forbids)) in header


# ------------------------------------------------------------------ progress switch


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_switch() -> None:
    progress.set_enabled(False)
    assert not progress.enabled()
    assert progress.bar(range(3)).disable is True
    assert progress.bar(range(3), disable=False, file=_Tty()).disable is True
    progress.set_enabled(True)
    assert progress.enabled()
    assert not progress.bar(range(3), file=_Tty()).disable  # tqdm's automatic choice: shown
    assert progress.bar(range(3), file=io.StringIO()).disable is True  # not a terminal
    assert progress.bar(total=3, disable=True, file=_Tty()).disable is True


def _uniform_forward(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*ids.shape, 7)


WINDOWS = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(0))


def test_perplexity_bar_obeys_switch_and_argument(capsys) -> None:
    progress.set_enabled(True)
    assert perplexity(_uniform_forward, WINDOWS, progress=True, desc="tiny") == pytest.approx(7)
    assert "tiny" in capsys.readouterr().err  # the bar is written when both allow it
    perplexity(_uniform_forward, WINDOWS, progress=False, desc="tiny")
    assert capsys.readouterr().err == ""
    progress.set_enabled(False)
    perplexity(_uniform_forward, WINDOWS, progress=True, desc="tiny")
    assert capsys.readouterr().err == ""


class _FakeJob:
    """Stands in for workflow.Job: evaluates a tiny model with the Job's progress setting."""

    def __init__(self, *args, progress: bool = True, **kwargs):
        self.progress = progress

    switch_seen: list[bool] = []

    def run(self, pipeline: str, **kwargs) -> dict:
        self.switch_seen.append(progress.enabled())  # what a pass's progress.bar would obey
        ppl = perplexity(_uniform_forward, WINDOWS, progress=self.progress, desc="fake ppl")
        return {
            "ppl": ppl,
            "ppl_float": ppl,
            "params": 1,
            "params_float": 1,
            "volume_bits": 8,
            "volume_bits_float": 8,
            "passes": [],
        }


def test_no_progress_flag_silences_bars(capsys, monkeypatch) -> None:
    monkeypatch.setattr(qgraph.workflow, "Job", _FakeJob)
    monkeypatch.setattr(_FakeJob, "switch_seen", [])
    assert main(["run", "--pipeline", "fuse-norms", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "rewritten" in captured.out
    assert "fake ppl" not in captured.err
    assert progress.enabled()  # main restores the switch when the command ends
    assert main(["run", "--pipeline", "fuse-norms"]) == 0
    assert "fake ppl" in capsys.readouterr().err
    assert _FakeJob.switch_seen == [False, True]


def test_integer_activations_flag_reaches_the_export(tmp_path, monkeypatch, capsys) -> None:
    seen: dict = {}

    class RecordingJob:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def run(self, pipeline, **kwargs):
            seen.update(kwargs)
            raise Reached("reached run")

    monkeypatch.setattr(qgraph.workflow, "Job", RecordingJob)
    argv = ["run", "--pipeline", "fuse-norms", "--export", str(tmp_path / "m.onnx")]
    assert main([*argv, "--integer-activations"]) == 2
    assert seen["integer_activations"] is True and seen["export"] == str(tmp_path / "m.onnx")
    assert main(argv) == 2
    assert seen["integer_activations"] is False  # the float path is the default

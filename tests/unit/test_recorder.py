"""The step log: a resumed run drops the steps past its checkpoint and keeps counting wall time."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from dreambooth.training.recorder import Recorder

_ACCELERATOR = SimpleNamespace(log=lambda values, step: None)


def test_resume_truncates_the_log_and_sums_wall_time(tmp_path: Path) -> None:
    log = tmp_path / "base.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "loss/total": 1.0, "elapsed_s": 100.0 * s}) + "\n" for s in (1, 2, 3))
    )

    recorder = Recorder(log, _ACCELERATOR, resume_step=2)
    recorder.log(3, {"loss/total": 0.5})

    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss/total"] == 0.5
    assert 200.0 <= rows[-1]["elapsed_s"] < 260.0  # the first run's 200 s plus this one's few


def test_a_torn_last_line_does_not_stop_a_resume(tmp_path: Path) -> None:
    """A power loss mid-write leaves half a line: the run resumes, dropping it."""
    log = tmp_path / "base.jsonl"
    log.write_text(json.dumps({"step": 1, "loss/total": 1.0}) + "\n" + '{"step": 2, "loss/to')
    recorder = Recorder(log, _ACCELERATOR, resume_step=2)
    recorder.log(2, {"loss/total": 0.5})
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_each_step_is_on_disk_as_soon_as_it_is_logged(tmp_path: Path) -> None:
    """The log stays open between steps, yet a crash after step n leaves steps 1..n readable."""
    log = tmp_path / "base.jsonl"
    recorder = Recorder(log, _ACCELERATOR)
    for step in (1, 2):
        recorder.log(step, {"loss/total": 1.0 / step})
        assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, step + 1))
    recorder.close()
    recorder.log(3, {"loss/total": 0.3})  # a closed recorder reopens the file to append
    recorder.close()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]

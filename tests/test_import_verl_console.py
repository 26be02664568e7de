"""`import` of verl's console log: the lines verl's own `LocalLogger` prints, as a Ray driver
prints them (an actor's tag, colour codes), read as verl's own file logger's JSON lines of the
same metrics are read; other lines passed over; detection among the other formats."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli import open_run
from stabledrl_cli.cli.app import app
from stabledrl_cli.importers import detect_format, read_log

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

# verl's trainer's rows (its metric names): a validation before training at step 0, then
# training steps whose values are numpy numbers, a NaN grad norm, ints and a bool.
LOGGED = textwrap.dedent(
    """
    import sys, time
    import numpy as np

    def rows():
        yield 0, {"val-core/openai/gsm8k/reward/mean@1": np.float64(0.25)}
        for step in range(1, 6):
            yield step, {
                "actor/pg_loss": np.float64(-0.01 * step),
                "actor/grad_norm": float("nan") if step == 3 else np.float32(1.5 + step),
                "actor/pg_clipfrac": np.float32(0.125),
                "actor/ppo_kl": 1e-07 * step,
                "critic/score/mean": np.float64(0.1 * step),
                "response_length/mean": 181.5,
                "timing_s/gen": np.float64(2.0),
                "training/global_step": step,
                "training/epoch": np.int64(0),
                "actor/lr_warmup_done": step > 2,
            }

    def log():
        from verl.utils.logger import LocalLogger
        from verl.utils.tracking import FileLogger

        console = LocalLogger(print_to_console=True)
        file_log = FileLogger("project", "experiment")
        print("loading the model", flush=True)
        for step, data in rows():
            console.log(data=data, step=step)
            file_log.log(data=data, step=step)
        file_log.finish()

    import ray

    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
    ray.get(ray.remote(log).options(name="TaskRunner").remote())
    waited = time.monotonic() + 60  # the driver prints its actors' lines as they come
    while "step:5 - " not in open(sys.argv[1]).read() and time.monotonic() < waited:
        time.sleep(0.2)
    ray.shutdown()
    """
)


def _logged(tmp_path: Path) -> tuple[Path, Path]:
    """Runs LOGGED, its lines printed by Ray's driver: (its console output, verl's file log
    of the same rows)."""
    script, console, file_log = tmp_path / "train.py", tmp_path / "out.log", tmp_path / "f.jsonl"
    script.write_text(LOGGED, encoding="utf-8")
    env = {**os.environ, "VERL_FILE_LOGGER_PATH": str(file_log), "RAY_AUTH_MODE": "disabled"}
    with console.open("w", encoding="utf-8") as out:
        done = subprocess.run(
            [sys.executable, str(script), str(console)], stdout=out, stderr=subprocess.PIPE,
            text=True, env=env, timeout=240,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return console, file_log


def _scalars(run: Path) -> dict[int, dict[str, float]]:
    """Each step's scalars but the time the import wrote it."""
    opened = open_run(run)
    return {
        s.step: {k: v for k, v in s.scalars.items() if k != "wall_time"}
        for s in opened.step_headers()
    }


def _same(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]) -> bool:
    return a.keys() == b.keys() and all(
        a[s].keys() == b[s].keys()
        and all(a[s][k] == b[s][k] or (math.isnan(a[s][k]) and math.isnan(b[s][k])) for k in a[s])
        for s in a
    )


def test_a_console_log_imports_as_verls_file_log_of_the_same_rows(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    console, file_log = _logged(tmp_path)
    text = console.read_text(encoding="utf-8")
    assert "step:1 - actor/pg_loss:np.float64(-0.01)" in text  # verl's own spelling
    assert "\x1b[36m(TaskRunner pid=" in text and ")\x1b[0m step:1 - " in text
    assert detect_format(console) == "verl_console"
    runner = CliRunner()
    results = [
        runner.invoke(app, ["import", str(log), "--out", str(tmp_path / name), "--format", "json"])
        for log, name in ((console, "console"), (file_log, "file"))
    ]
    for result in results:
        assert result.exit_code == 0, result.output
    from_console, from_file = (json.loads(r.stdout) for r in results)
    assert from_console["format"] == "verl_console" and from_file["format"] == "jsonl"
    for key in ("steps", "first_step", "last_step", "mapped", "extra", "counts", "nonfinite",
                "skipped_rows", "not_imported", "non_numeric"):  # fmt: skip
        assert from_console[key] == from_file[key], key
    assert from_console["steps"] == 5 and from_console["skipped_rows"] == {"eval": 1}
    assert from_console["nonfinite"] == {"grad_norm": 1}
    assert from_console["non_numeric"] == {"actor/lr_warmup_done": 5}
    assert _same(_scalars(tmp_path / "console"), _scalars(tmp_path / "file"))


@pytest.mark.parametrize(
    "first",
    [
        "2026-12-05 10:00:00 INFO worker.py:1 -- Started a local Ray instance.",
        # as Ray's logging prints it (milliseconds after a comma, a tab): was taken for a CSV
        # header, "no step column"
        "2026-12-05 10:00:00,123\tINFO worker.py:1 -- Started a local Ray instance.",
    ],
)
def test_lines_that_are_not_verls_are_passed_over_and_a_bad_step_line_counted(tmp_path, first):
    log = tmp_path / "slurm-1.out"
    log.write_text(
        first + "\n"
        "{'actor_rollout_ref': {'actor': {'ppo_epochs': 1}}}\n"
        "global step:3 - loss:1\n"  # not at a line's start: another program's
        "step:1 - actor/pg_loss:0.5 - critic/score/mean:0.25\n"
        "(TaskRunner pid=7) step:2 - actor/pg_loss:0.25 - critic/score/mean:0.5 "
        "[repeated 2x across cluster]\n"
        "step:3 - actor/pg_loss 0.1\n"
        "step:4 - actor/pg_loss:inf - critic/score/mean:np.float32(nan)\n",
        encoding="utf-8",
    )
    _, found, table = read_log(log)
    assert found == "verl_console"
    assert table.steps == {
        1: {"actor/pg_loss": 0.5, "critic/score/mean": 0.25},
        2: {"actor/pg_loss": 0.25, "critic/score/mean": 0.5},
        4: {"actor/pg_loss": math.inf, "critic/score/mean": table.steps[4]["critic/score/mean"]},
    }
    assert math.isnan(table.steps[4]["critic/score/mean"])
    assert table.skipped_rows == {"not name:value pairs": 1}


SLOW_LINES = {
    "spaces": b" " * 100_000 + b"x",
    "unclosed bar ends": b"[00:00<" * 100_000,
    "bar end of many commas": b"[00:00<" + b", " * 20_000,
}
"""Lines a pattern read in quadratic time. Ray's ` [repeated 2x across cluster]` was looked
for with a pattern starting with ` *`, tried at each space of a line (40,000 spaces took 7 s);
a tqdm bar's end (`[00:00<00:01, 1.0it/s]`) with `[^\\]]*`, which ran to the line's end at
each `[00:00<` that never closes (8,000 of them took 2 s), and split its remaining time from
its rate at each `, ` in turn (`[00:00<` then 20,000 of them took 18 s). Each line here
took minutes, the last 18 s."""


@pytest.mark.parametrize("line", SLOW_LINES.values(), ids=SLOW_LINES)
def test_a_line_that_was_read_in_quadratic_time_is_read_in_linear_time(tmp_path, line):
    log = tmp_path / "slurm-1.out"
    log.write_bytes(b"step:1 - actor/pg_loss:0.5\n" + line + b"\n")
    started = time.perf_counter()
    _, found, table = read_log(log)
    assert time.perf_counter() - started < 5.0
    assert found == "verl_console" and table.steps == {1: {"actor/pg_loss": 0.5}}


def test_a_log_of_no_known_kind_names_what_was_looked_for(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("epoch 1 loss 0.5\nepoch 2 loss 0.4\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "r")])
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines() == [
        f"error: {log}: cannot tell what kind of log this is (no JSON, CSV or TensorBoard data, "
        "no verl console line `step:N - name:value` in its first 64 MiB); pass --format-in"
    ]
    forced = CliRunner().invoke(
        app, ["import", str(log), "--out", str(tmp_path / "r"), "--format-in", "verl_console"]
    )
    assert forced.exit_code == 3 and "no training step in this log" in forced.stderr


def test_verls_lines_stuck_to_its_progress_bar_import(tmp_path):
    """verl's trainer draws a tqdm bar on stderr and logs each step on stdout: in one file
    the step's line follows the bar's last draw with no newline
    (`\\rTraining Progress:  33%|...| 1/3 [00:00<00:00, 6.66it/s]step:2 - ...`). The file was
    read as CSV (the bar's commas: 'line 1: not CSV', exit 3), and a step line stuck to the
    bar was passed over (2 steps of 3 imported). The log is written by a process of its own,
    as a job's is: taken from this process's captured stdout, which every thread of the
    test process shares, it lost step 3 in two whole-suite runs and never alone."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from tqdm import tqdm
            from verl.utils.logger import LocalLogger

            console = LocalLogger(print_to_console=True)
            bar = tqdm(total=3, desc="Training Progress", file=sys.stdout, mininterval=0,
                       miniters=1)
            for step in range(1, 4):
                console.log(data={"critic/score/mean": 0.25 * step, "actor/pg_loss": -0.5},
                            step=step)
                bar.update(1)
            bar.close()
            """
        )
    )
    log = tmp_path / "slurm-1.out"
    with log.open("wb") as out:
        subprocess.run([sys.executable, str(script)], stdout=out, check=True, timeout=300)
    text = log.read_bytes().decode()
    assert re.search(r"\] *step:2 - ", text) and re.search(r"\] *step:3 - ", text), repr(text)
    assert detect_format(log) == "verl_console"
    result = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    scalars = _scalars(tmp_path / "run")
    assert sorted(scalars) == [1, 2, 3], repr(text)
    assert [scalars[s]["reward_mean"] for s in (1, 2, 3)] == [0.25, 0.5, 0.75]


def test_a_step_line_after_a_bar_tqdm_padded_with_spaces_imports(tmp_path):
    """tqdm pads a bar with spaces when its text is shorter than the one it draws over (its
    rate fell from 16777.22it/s to 8802.86it/s): verl's step line then follows `] `, not `]`.
    Such a line was passed over, and the import ended 0 with 2 steps of 3."""
    log = tmp_path / "slurm-2.out"
    log.write_text(
        "\rTraining Progress:   0%|   | 0/3 [00:00<?, ?it/s]step:1 - critic/score/mean:0.25\n"
        "\rTraining Progress:  33%|#  | 1/3 [00:00<00:00, 16777.22it/s]step:2 - "
        "critic/score/mean:0.5\n"
        "\rTraining Progress:  67%|## | 2/3 [00:00<00:00, 8802.86it/s]   step:3 - "
        "critic/score/mean:0.75\n"
        "\rTraining Progress: 100%|###| 3/3 [00:00<00:00, 9204.76it/s] \n"
    )
    assert detect_format(log) == "verl_console"
    result = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    scalars = _scalars(tmp_path / "run")
    assert [scalars[s]["reward_mean"] for s in sorted(scalars)] == [0.25, 0.5, 0.75]


def test_a_step_line_cut_short_at_the_end_of_the_log_is_ignored_with_a_warning(tmp_path, capsys):
    """verl's console log cut in its last line's last number (a job stopped as it printed,
    or a log still being written): its step 3 was imported with the reward 0.5 where verl
    printed 0.5700000000000001, without a word. verl prints whole lines: one without its
    newline is ignored, with a warning naming it; a whole last line is read."""
    from verl.utils.logger import LocalLogger

    console = LocalLogger(print_to_console=True)
    for step in range(1, 4):
        console.log(
            data={"actor/pg_loss": -0.5, "critic/score/mean": 0.5 + (step + 4) / 100}, step=step
        )
    printed = capsys.readouterr().out
    assert printed.endswith("critic/score/mean:0.5700000000000001\n")
    log = tmp_path / "slurm-1.out"
    log.write_text(printed[: printed.rindex("0.57") + 3])
    result = CliRunner().invoke(
        app, ["import", str(log), "--out", str(tmp_path / "run"), "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(_scalars(tmp_path / "run")) == [1, 2]
    assert json.loads(result.stdout)["warnings"] == [f"{log}: line 3: unfinished last line ignored"]
    log.write_text(printed)
    assert sorted(read_log(log)[2].steps) == [1, 2, 3]

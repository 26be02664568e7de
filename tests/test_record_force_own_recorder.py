"""`stabledrl record --force` of a script that opens its own Recorder on $STABLEDRL_RUN_DIR
(a custom loop, run with --no-optimizer-hooks): --force reaches that Recorder, as it reaches
the hooks' run and the integrations'. Before, the script's Recorder refused the run record
had been told to replace ('... already exists and is not empty (manifest.json); pass
overwrite=True ...', exit 2)."""

from __future__ import annotations

from _record_here import record_python_here

from stabledrl_cli.dump import open_run

SCRIPT = """
import os
import stabledrl_cli as sd

def record(steps, **kwargs):
    with sd.Recorder(os.environ["STABLEDRL_RUN_DIR"], unit="sequence", **kwargs) as rec:
        for step in range(rec.last_step + 1 if rec.last_step is not None else 0, steps):
            rec.log_step(step, logp=[-1.0], logp_old=[-1.0], advantages=[float(step)])

record({steps}, resume={resume})
{again}
"""
HOOKS_OFF = "--no-optimizer-hooks"


def _record(monkeypatch, capfd, tmp_path, *options, steps, resume=False, again=""):
    script = SCRIPT.format(steps=steps, resume=resume, again=again)
    return record_python_here(monkeypatch, capfd, script, HOOKS_OFF, *options, cwd=tmp_path)


def test_force_replaces_the_run_a_scripts_own_recorder_opens(tmp_path, monkeypatch, capfd):
    done, errors = _record(monkeypatch, capfd, tmp_path, steps=5)
    assert done.returncode == 0 and not errors, done.stderr
    first = open_run(tmp_path / "run").manifest["run_id"]

    done, errors = _record(monkeypatch, capfd, tmp_path, "--force", steps=2)
    assert done.returncode == 0 and not errors, done.stderr
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1]  # the old steps 2..4 are gone: a new run
    assert run.manifest["run_id"] != first


def test_force_continues_the_run_a_scripts_recorder_resumes(tmp_path, monkeypatch, capfd):
    done, _ = _record(monkeypatch, capfd, tmp_path, steps=3)
    assert done.returncode == 0, done.stderr
    first = open_run(tmp_path / "run").manifest["run_id"]

    done, errors = _record(monkeypatch, capfd, tmp_path, "--force", steps=5, resume=True)
    assert done.returncode == 0 and not errors, done.stderr
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2, 3, 4]
    assert run.manifest["run_id"] == first  # appended to, not replaced


def test_the_switch_is_the_first_recorders_a_second_keeps_the_new_steps(
    tmp_path, monkeypatch, capfd
):
    """A second Recorder of the script on the run (no overwrite=, no resume=) must not wipe
    the steps the first just recorded under --force: it is refused, and they stay."""
    done, _ = _record(monkeypatch, capfd, tmp_path, steps=3)
    assert done.returncode == 0, done.stderr
    done, errors = _record(monkeypatch, capfd, tmp_path, "--force", steps=2, again="record(4)")
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and "pass overwrite=True" in errors[0], done.stderr
    assert open_run(tmp_path / "run").step_numbers == [0, 1]

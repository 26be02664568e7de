"""`stabledrl inspect` through CliRunner, and once as a real process for its exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run_cli
from _record_worker import killed_while_recording
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """60 steps: reward 0.8 then 0.05 from step 40, a grad-norm spike at 25, a NaN at 33, the
    own-sample log-likelihood 1 nat lower from step 36."""
    path = tmp_path / "run"
    gen = torch.Generator().manual_seed(3)
    with sd.Recorder(
        path,
        policy="grpo",
        policy_params={"eps_low": 0.2},
        meta={"model": "tiny-mdlm"},
        estimator={"mc_samples": 2},
        reward_range=(0.0, 1.0),
    ) as rec:
        for step in range(60):
            logp = -torch.rand(4, 8, generator=gen) - (1.0 if step >= 36 else 0.0)
            mask = torch.ones(4, 8)
            mask[:, 8 - step % 3 :] = 0  # 32, 28 or 24 scored tokens
            logp_old = logp + 0.05 * torch.randn(4, 8, generator=gen)
            if step == 33:
                logp_old[1, 1] = float("inf")
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp_old,
                advantages=torch.randn(4, generator=gen),
                mask=mask,
                group_id=np.array([0, 0, 1, 1]),
                reward=torch.full((4,), 0.8 if step < 40 else 0.05),
                grad_norm=40.0 if step == 25 else 1.0,
                inner_step=step % 2,
                scalars={"kl": 0.01},
            )
    return path


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_json(run_dir):
    data = _json(["inspect", str(run_dir), "--format", "json"])
    assert data["run"] == str(run_dir)
    assert data["format_version"] == "1.0" and data["tool_version"] == sd.__version__
    assert data["policy"]["spec"] == "grpo:eps_low=0.2" and data["unit"] == "token"
    assert data["meta"] == {"model": "tiny-mdlm"} and data["estimator"] == {"mc_samples": 2}
    assert data["reward_range"] == [0.0, 1.0] and data["world_size"] == 1
    assert (data["steps"], data["first_step"], data["last_step"]) == (60, 0, 59)
    assert data["tokens_per_step"] == {"min": 24, "median": 28.0, "max": 32}
    assert data["fields"] == sorted(
        ["advantages", "group_id", "logp", "logp_old", "mask", "reward", "seq_id"]
    )
    assert "kl" in data["scalars"] and "grad_norm" in data["scalars"]
    on_disk = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    assert data["size_bytes"] == on_disk
    assert data["integrity"] == {"ok": True, "findings": [], "groups": []}
    observed = data["observed"]
    assert observed["first_reward_collapse"] == 50  # one reward a rollout: the even steps
    assert observed["recorded_spike_steps"] == [25] and observed["nonfinite_steps"] == [33]
    assert 0.03 < observed["noise_floor_logratio_std"] < 0.07  # the 0.05 noise we put in
    assert observed["reward_curve"]["first"] == pytest.approx(0.8)
    # Measured at inner_step 0 (even steps): the median of 3 falls > 0.5 nats at step 38, and
    # again at step 40, the second in a row: it warns.
    warning = observed["collapse_warning"]
    assert warning["first_step"] == 40 and warning["lead_steps"] == 50 - 40
    assert warning["steps"][0] == 40 and all(s % 2 == 0 for s in warning["steps"])


def test_the_docs_document_every_key_of_the_inspect_json():
    """A script reads `inspect --format json`; docs/recording.md (once the README) documented
    `integrity` alone."""
    data = _json(["inspect", str(ROOT / "fixtures" / "grpo"), "--format", "json"])
    text = (ROOT / "docs" / "recording.md").read_text()
    section = text[text.index("The whole of `inspect --format json`") :]
    section = section[: section.index("\n\n", section.index("| key |"))]
    rows = {
        key: line
        for line in section.splitlines()
        for key in re.findall(r"`([a-z_]+)`", line.split(" | ")[0])
    }
    assert set(rows) == set(data), set(rows) ^ set(data)
    for key, value in data["observed"].items():
        assert f"`{key}`" in rows["observed"], key
        for inner in value if isinstance(value, dict) else {}:
            assert f"`{inner}`" in rows["observed"], (key, inner)
    for guard in data["observed"]["guards"]:
        assert all(f"`{key}`" in rows["observed"] for key in guard), guard
    for stat in data["series"]["loss"]:
        assert f"`{stat}`" in rows["series"], stat


def test_inspect_table(run_dir):
    result = runner.invoke(app, ["inspect", str(run_dir)])
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in (
        "grpo:eps_low=0.2",
        "min 24, median 28, max 32",
        "Integrity: ok",
        "first reward collapse",
        "step 50",
        "collapse warning",
        "first at step 40 (own-sample likelihood fell by > 0.5 nats",
        "meta.model",
    ):
        assert expected in text, expected
    assert result.stderr == ""


def test_corrupt_step_is_a_finding_not_a_failure(run_dir):
    victim = run_dir / "steps" / "step-00000010.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    (run_dir / "steps" / "step-00000020.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["inspect", str(run_dir), "-f", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == 58
    assert [(f["kind"], f["step"]) for f in data["integrity"]["findings"]] == [
        ("unreadable", 10),
        ("torn", 20),
    ]
    assert data["integrity"]["ok"] is False
    table = runner.invoke(app, ["inspect", str(run_dir)])
    assert table.exit_code == 0 and "2 finding(s)" in table.stdout
    assert "data checksum mismatch" in table.stdout


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not_a_run",
        "plain_file",
        "corrupt_manifest",
        "wrong_manifest_field",
        "wrong_run_id",
        "newer_major",
    ],
)
def test_bad_runs_exit_3_with_one_line(tmp_path, run_dir, case):
    target = tmp_path / "missing"
    if case == "not_a_run":
        target = tmp_path / "plain"
        target.mkdir()
    elif case == "plain_file":
        target = tmp_path / "notes.txt"
        target.write_text("not a run")
    elif case == "wrong_manifest_field":
        target = run_dir
        manifest = json.loads((run_dir / "manifest.json").read_text())
        manifest["reward_range"] = "0..1"
        (run_dir / "manifest.json").write_text(json.dumps(manifest))
    elif case == "wrong_run_id":
        target = run_dir
        manifest = json.loads((run_dir / "manifest.json").read_text())
        manifest["run_id"] = 7
        (run_dir / "manifest.json").write_text(json.dumps(manifest))
    elif case == "corrupt_manifest":
        target = run_dir
        (run_dir / "manifest.json").write_text('{"format": "stabledrl-run", "form')
    elif case == "newer_major":
        target = run_dir
        manifest = json.loads((run_dir / "manifest.json").read_text())
        manifest["format_version"] = "3.1"
        (run_dir / "manifest.json").write_text(json.dumps(manifest))
    for fmt in ("json", "table"):
        result = runner.invoke(app, ["inspect", str(target), "--format", fmt])
        assert result.exit_code == 3, result.stderr
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and "error:" in result.stderr
        assert "internal error" not in result.stderr


def test_a_run_of_a_newer_minor_says_what_is_not_read(run_dir):
    """A manifest of format 1.9 with a field this stabledrl does not know was shown as 'v1.9'
    with no word that what 1.9 adds is not read."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.update(format_version="1.9", shiny_new={"a": 1})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    table = runner.invoke(app, ["inspect", str(run_dir)], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    note = "v1.9 (written by stabledrl {}); newer than the v1.3 this stabledrl reads: fields it "
    assert note.format(sd.__version__) + "adds are not read (upgrade stabledrl)" in table.stdout
    data = json.loads(runner.invoke(app, ["inspect", str(run_dir), "-f", "json"]).stdout)
    assert (data["format_version"], data["format_known"]) == ("1.9", "1.3")
    manifest["format_version"] = "1.3"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    data = json.loads(runner.invoke(app, ["inspect", str(run_dir), "-f", "json"]).stdout)
    assert data["format_known"] is None


@pytest.mark.parametrize(("version", "known"), [("2.7", "2.0"), ("1.9", "1.3"), ("2.0", None)])
def test_an_archive_of_a_newer_minor_says_what_is_not_read(run_dir, tmp_path, version, known):
    """An archive whose own format_version said 2.7 (or 1.9) was shown by its manifest's
    version alone, 'v1.0 (written by stabledrl X)', with no word of the archive's nor that
    what its newer minor adds is not read. The format row now names the archive's version
    with the manifest's note; the JSON archive_version and archive_known."""
    import h5py

    from stabledrl_cli.dump._packer import pack_run

    archive = tmp_path / "run.h5"
    pack_run(sd.open_run(run_dir), archive)
    with h5py.File(archive, "a") as handle:
        handle.attrs["format_version"] = version
    table = runner.invoke(app, ["inspect", str(archive)], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    newer = f"; newer than the v{known} this stabledrl reads: fields it adds are not read"
    row = f"; archive v{version}" + (newer if known else " ")
    assert row in table.stdout, table.stdout
    data = json.loads(runner.invoke(app, ["inspect", str(archive), "-f", "json"]).stdout)
    assert (data["archive_version"], data["archive_known"], data["format_known"]) == (
        version, known, None,
    )  # fmt: skip
    data = json.loads(runner.invoke(app, ["inspect", str(run_dir), "-f", "json"]).stdout)
    assert (data["archive_version"], data["archive_known"]) == (None, None)


def test_exit_code_in_a_real_process(tmp_path):
    """The error map end to end: exit 3, one line on stderr, nothing on stdout, no traceback."""
    missing = run_cli("inspect", tmp_path / "nope")
    assert missing.returncode == 3
    assert missing.stdout == "" and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == f"error: no such run: {tmp_path / 'nope'}"


def test_inspect_says_whether_the_recording_closed(tmp_path):
    """A closed Recorder marks its run `recording_closed`; inspect shows it in the table and
    the JSON (and nothing for a run without the mark, such as a recording that was killed)."""
    closed, still_open = tmp_path / "closed", tmp_path / "open"
    with sd.Recorder(closed, policy=None) as recorder:
        recorder.log_step(0, grad_norm=1.0, loss=0.5)
    recorder = sd.Recorder(still_open, policy=None)
    recorder.log_step(0, grad_norm=1.0, loss=0.5)
    for path, marked in ((closed, True), (still_open, False)):
        shown = runner.invoke(app, ["inspect", str(path), "--format", "json"])
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout)["recording_closed"] is marked
        table = runner.invoke(app, ["inspect", str(path)])
        assert ("closed: its Recorder finished" in table.output) is marked
    recorder.close()


def test_inspect_says_whether_a_recorder_is_live_or_died(tmp_path):
    """A run a live Recorder holds says so, and one whose recording process was killed (its
    lock files left, held by no process) says that it died, rank by rank (JSON
    `recording_live`, `recording_died`); a closed run, an archive and a run at a URL say
    neither. Before, a killed recording showed nothing."""
    live, killed = tmp_path / "live", tmp_path / "killed"
    recorder = sd.Recorder(live, policy=None)
    recorder.log_step(0, grad_norm=1.0, loss=0.5)
    killed_while_recording(killed, ranks=2)
    expected = {live: ([0], [], "under way: rank 0 recording now")}
    expected[killed] = ([], [0, 1], "ended unclosed: the process recording ranks 0, 1 died")
    for path, (held, died, line) in expected.items():
        summary = _json(["inspect", str(path), "--format", "json"])
        assert (summary["recording_live"], summary["recording_died"]) == (held, died)
        table = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "100"})
        assert re.search(rf"recording +│ {re.escape(line)} +│", table.stdout), table.output
    recorder.close()
    from stabledrl_cli.dump._packer import pack_run

    pack_run(sd.open_run(killed), tmp_path / "killed.h5")
    for path in (live, tmp_path / "killed.h5", f"file://{killed}"):
        summary = _json(["inspect", str(path), "--format", "json"])
        assert (summary["recording_live"], summary["recording_died"]) == ([], [])


def test_inspect_tells_a_step_in_flight_from_a_lost_one(tmp_path):
    """Rank 1 of a live 2-rank run is two steps behind rank 0 (steps 4, 5 in flight) and lost
    step 1 (it went past it): inspect listed all three as integrity findings ("incomplete");
    the steps a live rank may still write are in flight, not findings (JSON
    `in_flight_steps`), and named so in the recording row."""
    run = tmp_path / "run"
    ranks = [sd.Recorder(run, policy=None, world_size=2, rank=rank) for rank in (0, 1)]
    for rank, steps in enumerate(([0, 1, 2, 3, 4, 5], [0, 2, 3])):
        for n in steps:
            ranks[rank].log_step(n, grad_norm=1.0, loss=0.5)
    summary = _json(["inspect", str(run), "--format", "json"])
    table = runner.invoke(app, ["inspect", str(run)], env={"COLUMNS": "120"})
    for recorder in ranks:
        recorder.close()
    assert summary["in_flight_steps"] == [4, 5]
    assert [f["step"] for f in summary["integrity"]["findings"]] == [1]
    assert "in flight: 2 steps (4, 5) a live rank has not written yet" in table.stdout
    closed = _json(["inspect", str(run), "--format", "json"])
    assert closed["in_flight_steps"] == []
    assert [f["step"] for f in closed["integrity"]["findings"]] == [1, 4, 5]


def test_an_intact_archive_is_not_said_to_hold_step_files(tmp_path, run_dir):
    """Integrity ok of a packed run said 'every step file complete', words of a run directory:
    an archive holds no step file. The line names steps, true of both."""
    from stabledrl_cli.dump._packer import pack_run

    archive = tmp_path / "run.h5"
    pack_run(sd.open_run(run_dir), archive)
    for run in (run_dir, archive):
        result = runner.invoke(app, ["inspect", str(run)])
        assert result.exit_code == 0, result.output
        assert "Integrity: ok (every step whole, checksums match, no gaps)" in result.stdout
        assert "step file" not in result.stdout


def test_inspect_shows_the_run_identity_a_pack_keeps(tmp_path, run_dir, grpo_fixture):
    """The manifest's run_id, in the table and the JSON, of the run and of its packed archive;
    a run recorded before run ids (the committed fixture) reads, its identity not recorded."""
    from stabledrl_cli.dump._packer import pack_run

    run_id = json.loads((run_dir / "manifest.json").read_text())["run_id"]
    archive = tmp_path / "run.h5"
    pack_run(sd.open_run(run_dir), archive)
    for path in (run_dir, archive):
        assert _json(["inspect", str(path), "--format", "json"])["run_id"] == run_id
        table = runner.invoke(app, ["inspect", str(path)])
        shown = re.search(rf"run id +│ {run_id} ", table.stdout)
        assert table.exit_code == 0 and shown, table.output
    assert _json(["inspect", str(grpo_fixture), "--format", "json"])["run_id"] is None
    table = runner.invoke(app, ["inspect", str(grpo_fixture)])
    assert table.exit_code == 0 and "not recorded (a run recorded before run ids)" in table.stdout


def test_an_archive_says_how_the_recording_stood_when_packed(tmp_path):
    """`inspect` of a run a live Recorder holds says `under way`, of one whose process was
    killed `ended unclosed`; the archive `pack` made of either said neither (integrity ok, as
    if the recording had finished). The archive's manifest now keeps how the Recorders stood
    (`recording_when_packed`) and its inspect says so; a closed run's archive says nothing of
    it, and a repack keeps it."""
    from stabledrl_cli.dump._packer import pack_run

    live, killed, closed = tmp_path / "live", tmp_path / "killed", tmp_path / "closed"
    recorder = sd.Recorder(live, policy=None)
    recorder.log_step(0, grad_norm=1.0, loss=0.5)
    killed_while_recording(killed, ranks=2)
    with sd.Recorder(closed, policy=None) as finished:
        finished.log_step(0, grad_norm=1.0, loss=0.5)
    for run in (live, killed, closed):
        pack_run(sd.open_run(run), tmp_path / f"{run.name}.h5")
    recorder.close()
    pack_run(sd.open_run(tmp_path / "live.h5"), tmp_path / "repacked.h5")
    expected = {
        "live": ({"live": [0], "died": []}, "under way when packed: rank 0 recording then"),
        "repacked": ({"live": [0], "died": []}, "under way when packed: rank 0 recording then"),
        "killed": (
            {"live": [], "died": [0, 1]},
            "ended unclosed when packed: the process recording ranks 0, 1 had died",
        ),
    }
    for name, (packed, line) in expected.items():
        archive = str(tmp_path / f"{name}.h5")
        summary = _json(["inspect", archive, "--format", "json"])
        assert summary["recording_when_packed"] == packed
        assert (summary["recording_live"], summary["recording_died"]) == ([], [])
        table = runner.invoke(app, ["inspect", archive], env={"COLUMNS": "200"})
        assert re.search(rf"recording +│ {re.escape(line)}", table.stdout), table.output
    summary = _json(["inspect", str(tmp_path / "closed.h5"), "--format", "json"])
    assert summary["recording_when_packed"] is None and summary["recording_closed"] is True


def test_a_malformed_recording_when_packed_is_a_corrupt_manifest(tmp_path):
    """The archive manifest's `recording_when_packed` is {"live": [ranks], "died": [ranks]};
    another shape is refused as a corrupt manifest (exit 3), naming the field."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        recorder.log_step(0, grad_norm=1.0, loss=0.5)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["recording_when_packed"] = {"live": ["0"]}
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["inspect", str(run)])
    assert result.exit_code == 3, result.output
    assert "corrupt manifest: recording_when_packed must be" in result.stderr


def test_control_characters_from_a_run_reach_the_terminal_escaped(tmp_path):
    """A crafted manifest's text (a meta value, the source, the recording_stopped note) and a
    scalar's name are shown with their control characters escaped: they never clear the
    screen, retitle or recolour the terminal of whoever inspects or watches the run. Before,
    inspect's table and watch's warning wrote the ESC sequences as they were."""
    path = tmp_path / "run"
    with sd.Recorder(path, policy=None) as recorder:
        recorder.log_step(0, grad_norm=1.0, scalars={"acc\x1b[8m": 0.5})
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["meta"] = {"note": "\x1b]0;owned\x1b\\\x1b[2Jcleared\x9b31m"}
    manifest["source"] = {"kind": "import\x1b[31m", "file": "log\x7f.json"}
    manifest["recording_stopped"] = {"step": 0, "rank": 0, "reason": "disk\x1b[Kfull"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    table = runner.invoke(app, ["inspect", str(path)])
    watched = runner.invoke(app, ["watch", str(path), "--once", "--device", "cpu"])
    for shown in (table, watched):
        assert shown.exit_code == 0, shown.output
        assert not {"\x1b", "\x7f", "\x9b"} & set(shown.output), repr(shown.output)
    for escaped in (r"\x1b]0;owned\x1b\\x1b[2Jcleared\x9b31m", r"import\x1b[31m", r"log\x7f.json"):
        assert escaped in table.stdout, table.stdout
    assert r"acc\x1b[8m" in table.stdout
    assert r"disk\x1b[Kfull" in watched.stderr


def test_a_recorded_policy_spec_with_control_characters_is_shown_escaped_by_watch(tmp_path):
    """watch's view (`--once`, and the live view, the same lines) names the manifest's policy
    spec when it is not in the catalogue: escaped as every other text of a run. Before, its
    lines were rich Text objects, which the console's escaping never sees: the ESC went to
    the terminal as it was."""
    path = tmp_path / "run"
    with sd.Recorder(path, policy=None) as recorder:
        recorder.log_step(0, grad_norm=1.0)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["policy"] = {"spec": "evil\x1b[2Jx"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    watched = runner.invoke(app, ["watch", str(path), "--once", "--device", "cpu"])
    assert watched.exit_code == 0, watched.output
    assert "\x1b" not in watched.output, repr(watched.output)
    assert r"own policy: evil\x1b[2Jx (not in the catalogue" in watched.stdout


def _ranks_run(path: Path, steps_of_rank: dict[int, list[int]]) -> Path:
    """A scalar run of len(steps_of_rank) ranks, each rank recording its own steps."""
    for rank, steps in steps_of_rank.items():
        with sd.Recorder(path, policy=None, world_size=len(steps_of_rank), rank=rank) as rec:
            for step in steps:
                rec.log_step(step, grad_norm=1.0)
    return path


def test_consecutive_steps_with_the_same_finding_are_one_row(tmp_path):
    """A rank that died at step 3 of 40 is one row of the integrity table, not 37; a step
    both ranks wrote (step 20) splits the row. Before, the table had a row per step (37 + 19
    rows here, 4997 for a rank dead at step 3 of 5000). The JSON keeps every finding and
    gives the rows beside them."""
    rank1 = [*range(3), 20]
    path = _ranks_run(tmp_path / "run", {0: list(range(40)), 1: rank1})
    table = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert "Integrity: 36 finding(s)" in table.stdout
    rows = [line for line in table.stdout.splitlines() if line.startswith("│ missing_rank")]
    assert len(rows) == 2, table.stdout
    assert "3..19" in rows[0] and "steps 3..19 (17 steps): incomplete, no file" in rows[0]
    assert "21..39" in rows[1] and "steps 21..39 (19 steps): incomplete, no" in rows[1]
    data = _json(["inspect", str(path), "--format", "json"])
    findings = data["integrity"]["findings"]
    assert [f["step"] for f in findings] == [*range(3, 20), *range(21, 40)]
    assert findings[0]["message"] == "step 3: incomplete, no file for rank(s) [1]"
    assert data["integrity"]["groups"] == [
        {
            "kind": "missing_rank",
            "first_step": first,
            "last_step": last,
            "steps": last - first + 1,
            "first_finding": index,
            "message": f"steps {first}..{last} ({last - first + 1} steps): incomplete, no file "
            "for rank(s) [1]",
        }
        for first, last, index in ((3, 19, 0), (21, 39, 17))
    ]


def test_a_finding_on_one_step_keeps_its_own_message(run_dir):
    """Findings of different reasons, or of steps a readable step lies between, stay rows of
    their own, each with its finding's message."""
    for step, cut in ((10, 0), (11, 1), (30, 0)):
        victim = run_dir / "steps" / f"step-{step:08d}.safetensors"
        victim.write_bytes(victim.read_bytes()[:cut])
    data = _json(["inspect", str(run_dir), "--format", "json"])
    groups = data["integrity"]["groups"]
    assert [(g["kind"], g["first_step"], g["last_step"], g["steps"]) for g in groups] == [
        ("torn", 10, 10, 1),
        ("torn", 11, 11, 1),
        ("torn", 30, 30, 1),
    ]
    messages = [f["message"] for f in data["integrity"]["findings"]]
    assert [g["message"] for g in groups] == messages


def test_each_ranks_damaged_files_over_the_same_steps_are_a_row_each():
    from stabledrl_cli.dump import Finding
    from stabledrl_cli.replay.inspection import group_findings

    findings = [
        Finding("unreadable", n, f"steps/step-{n:08d}.rank-{r:04d}.safetensors", f"step {n}: bad")
        for n in (3, 4, 5)
        for r in (0, 1)
    ]
    groups = group_findings(findings, readable=[0, 1, 2, 6])
    assert [(g.first_step, g.last_step, g.steps, g.first_finding) for g in groups] == [
        (3, 5, 3, 0),
        (3, 5, 3, 1),
    ]
    assert groups[0].message == "steps 3..5 (3 steps): bad"


def test_integrity_cells_fold_at_80_columns_and_are_never_cut(tmp_path):
    """A step number of 19 digits and a stray file's long name: each is whole in its cell at
    80 columns, folded over lines. Before, Rich cut them with an ellipsis: the missing_rank
    row read "4611686018427387898..4611…", its last step lost, and the stray file's name was
    cut in both its file and message cells."""
    big = 2**62
    path = _ranks_run(tmp_path / "run", {0: [0, 1, big - 2, big - 1, big], 1: [0, 1]})
    stray = "notes-from-the-operator-about-this-run-and-its-restarts.txt"
    (path / "steps" / stray).write_text("")
    table = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    integrity = lines[next(i for i, line in enumerate(lines) if line.startswith("Integrity")) :]
    rows = integrity[: next(i for i, line in enumerate(integrity) if line.startswith("└"))]
    assert all(len(line) <= 80 for line in rows) and not any("…" in line for line in rows)
    columns = [
        "".join(cells).replace(" ", "")
        for cells in zip(*(r.split("│")[1:5] for r in rows[4:]), strict=True)
    ]
    assert f"{big - 2}..{big}" in columns[1]
    assert columns[2].count(stray) == 1
    assert f"steps{big - 2}..{big}(3steps):incomplete" in columns[3]


def test_the_integrity_table_shows_20_rows_and_counts_the_rest_by_kind(tmp_path):
    """Rank 1 recorded every other step of 100, and one of rank 0's files is torn: 51 rows,
    none consecutive. Before, the table printed all 51 (2500 for 5000 steps); it shows 20 and
    one line counting the rest by kind, so a torn file past them is not hidden unsaid."""
    path = _ranks_run(tmp_path / "run", {0: list(range(100)), 1: list(range(0, 100, 2))})
    torn = path / "steps" / "step-00000090.rank-0000.safetensors"
    torn.write_bytes(torn.read_bytes()[:50])
    table = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("│ missing_rank", "│ torn"))]
    assert len(rows) == 20 and "step 39: incomplete" in rows[-1]
    assert "... 31 more rows (missing_rank: 30, torn: 1): --format json has them all" in lines
    assert len(_json(["inspect", str(path), "--format", "json"])["integrity"]["groups"]) == 51


@pytest.mark.parametrize(
    ("logged", "shown"), [("unit_grad_gram", "gram"), ("unit_grad_sketch", "sketch")]
)
def test_geometry_a_loop_logs_undeclared_is_named_from_its_steps(tmp_path, logged, shown):
    """A loop of one's own that logs a Gram (or a sketch) per step without declaring geometry
    to the Recorder: inspect said 'geometry none' where replay used it ('geometry gram
    (coverage 100%)')."""
    rng = np.random.default_rng(0)
    with sd.Recorder(tmp_path / "run", policy="grpo", unit="sequence") as recorder:
        for step in range(2):
            grads = rng.normal(size=(4, 10)).astype(np.float32)
            geometry = (
                {"unit_grad_gram": grads @ grads.T}
                if logged == "unit_grad_gram"
                else {"unit_grad_sketch": grads}
            )
            recorder.log_step(
                step,
                logp=np.zeros(4, np.float32),
                logp_old=np.zeros(4, np.float32),
                advantages=np.array([1, -1, 1, -1], np.float32),
                grad_norm_covered=1.0,
                **geometry,
            )
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "run")], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "│ geometry" in line)
    assert f"{shown} on its steps (the manifest declares none)" in row

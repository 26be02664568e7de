"""Two reports of one command (`check --write-baseline --junit --plot`, `replay --out --plot`)
given the same file."""

from __future__ import annotations

from pathlib import Path

from _cli import run_cli
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

REPO = Path(__file__).resolve().parents[1]
GRPO = REPO / "fixtures" / "grpo"
runner = CliRunner()


def test_two_reports_given_one_file_are_refused_before_the_replay(tmp_path):
    """`check --write-baseline F --junit F` wrote the baseline, then the JUnit report over
    it (exit 0: the baseline lost, 'wrote baseline F' said); the same through a link to F, and
    for `replay --out F.png --plot F.png`. Each is refused, nothing written."""
    report = tmp_path / "report.png"
    (tmp_path / "link.png").symlink_to(report)
    refused = [
        ["check", GRPO, "--write-baseline", report, "--junit", report],
        ["check", GRPO, "--max-collapsed", "100", "--junit", report, "--plot", report],
        ["check", GRPO, "--write-baseline", report, "--junit", tmp_path / "link.png"],
        ["replay", GRPO, "-p", "grpo", "--out", report, "--plot", tmp_path / "link.png"],
    ]
    for args in refused:
        result = runner.invoke(app, list(map(str, args)))
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and "the same file" in result.stderr, args
        assert len(result.stderr.splitlines()) == 1, args
        assert not report.exists(), args


def test_a_report_given_a_directory_is_refused_before_the_replay(tmp_path):
    """Before, the replay ran to its end and then the write failed (`check --junit DIR`:
    'check passed', then exit 4), on a large run hours later."""
    (tmp_path / "link").symlink_to(tmp_path)
    for flag, args in [
        ("--junit", ["check", GRPO, "--max-collapsed", "100"]),
        ("--write-baseline", ["check", GRPO]),
        ("--out", ["replay", GRPO, "-p", "grpo"]),
        ("--plot", ["replay", GRPO, "-p", "grpo"]),
    ]:
        for directory in (tmp_path, tmp_path / "link"):
            result = runner.invoke(app, list(map(str, [*args, flag, directory])))
            assert (result.exit_code, result.stderr) == (
                2,
                f"error: {flag} {directory} is a directory; give a file name\n",
            ), (flag, result.output)


def test_two_reports_given_one_file_exit_2_in_a_real_process(tmp_path):
    report = tmp_path / "report.json"
    done = run_cli("check", GRPO, "--write-baseline", report, "--junit", report)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"error: --write-baseline {report} and --junit {report} name the same file; give "
        "each report a file of its own"
    ]
    assert not report.exists()


def test_two_reports_may_share_a_device(tmp_path):
    """A device is written in place, not replaced: both reports to /dev/null is no clash."""
    result = runner.invoke(
        app, ["check", str(GRPO), "--write-baseline", "/dev/null", "--junit", "/dev/null"]
    )
    assert result.exit_code == 0, result.output


def test_a_report_given_the_baseline_it_checks_against_is_refused(tmp_path):
    """`check -b F --junit F` replaced the baseline with the JUnit XML (exit 0, 'wrote F'):
    the next check against F then failed as a malformed baseline. So did a link to F. The
    JUnit report and the plot may not name the baseline read; refused before the replay,
    the baseline as it was. --write-baseline may (it writes the next baseline)."""
    baseline = tmp_path / "base.png"
    wrote = ["check", str(GRPO), "-p", "grpo", "--write-baseline", str(baseline)]
    assert runner.invoke(app, wrote).exit_code == 0
    before = baseline.read_bytes()
    (tmp_path / "link.xml").symlink_to(baseline)
    for flag, target in (
        ("--junit", baseline),
        ("--junit", tmp_path / "link.xml"),
        ("--plot", baseline),
    ):
        result = runner.invoke(app, list(map(str, ["check", GRPO, "-b", baseline, flag, target])))
        assert (result.exit_code, result.stderr) == (
            2,
            f"error: {flag} {target} is the baseline the check reads (-b {baseline}); give the "
            "report a file of its own\n",
        ), result.output
        assert baseline.read_bytes() == before
    result = runner.invoke(
        app, list(map(str, ["check", GRPO, "-b", baseline, "--write-baseline", baseline]))
    )
    assert result.exit_code == 0, result.output


def test_a_report_given_a_url_is_refused_before_the_replay(tmp_path, monkeypatch):
    """`replay RUN --out s3://b/r.h5` (or --plot, --junit, --write-baseline, tune --plot):
    typer's Path made the URL the local path `s3:/b/r.h5`; where a directory `s3:/b` was
    there, the report was written into it (exit 0, 'wrote s3:/b/r.h5'), else the line blamed a
    missing directory `s3:/b`. A report is written to a local path: a URL is refused, exit 2,
    one line, nothing written."""
    (tmp_path / "s3:" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cases = [
        ("--out", ["replay", GRPO, "-p", "grpo"], "s3://b/r.h5"),
        ("--plot", ["replay", GRPO, "-p", "grpo"], "s3://b/r.png"),
        ("--junit", ["check", GRPO, "--max-collapsed", "100"], "s3://b/j.xml"),
        ("--write-baseline", ["check", GRPO], "s3://b/b.json"),
        ("--plot", ["tune", GRPO, "-p", "stabledrl:c=3..5:2"], "s3://b/t.png"),
    ]
    for flag, args, url in cases:
        done = runner.invoke(app, [*map(str, args), flag, url])
        assert done.exit_code == 2, (flag, done.stderr)
        (line,) = done.stderr.splitlines()
        assert line.startswith("error: Invalid value for '") and (
            f"{url} is a URL; give a local path" in line
        ), line
    assert list((tmp_path / "s3:" / "b").iterdir()) == []


def test_a_report_replaces_its_file_but_never_a_packed_run(tmp_path):
    """`replay --out run.h5` over `pack`'s archive replaced it with a replay report (exit 0;
    inspect then: 'run.h5 is a replay report, not a run'), and `check --write-baseline` with a
    baseline, where `pack` itself replaces no file without --force: a run may be kept nowhere
    else. Refused before the replay, the archive kept; a report still replaces a report."""
    run = tmp_path / "run.h5"
    assert runner.invoke(app, ["pack", str(GRPO), str(run)]).exit_code == 0
    before = run.read_bytes()
    (tmp_path / "link.h5").symlink_to(run)
    for flag, args in [
        ("--out", ["replay", GRPO, "-p", "grpo"]),
        ("--write-baseline", ["check", GRPO]),
        ("--junit", ["check", GRPO, "--max-collapsed", "100"]),
    ]:
        for given in (run, tmp_path / "link.h5"):
            result = runner.invoke(app, list(map(str, [*args, flag, given])))
            assert (result.exit_code, result.stderr) == (
                2,
                f"error: {flag} {given} is a packed run (stabledrl pack); a report replaces "
                "its file, never a run: give another file\n",
            ), args
    assert run.read_bytes() == before
    report = tmp_path / "report.h5"
    report.write_text("an older report")
    replayed = runner.invoke(app, ["replay", str(GRPO), "-p", "grpo", "--out", str(report)])
    assert replayed.exit_code == 0, replayed.stderr
    assert report.read_bytes().startswith(b"\x89HDF")


def test_a_packed_run_this_version_cannot_read_is_not_replaced_by_a_report(tmp_path):
    """A packed run of a newer format, or one cut short (an interrupted copy), failed to open
    here, so `replay --out` replaced it with a report (exit 0; inspect then: 'a replay report,
    not a run'): it may be the run's only copy. Refused as a readable one is; an HDF5 file of
    another kind is still replaced."""
    import h5py

    run = tmp_path / "run.h5"
    assert runner.invoke(app, ["pack", str(GRPO), str(run)]).exit_code == 0
    newer = tmp_path / "newer.h5"
    newer.write_bytes(run.read_bytes())
    with h5py.File(newer, "r+") as handle:
        handle.attrs["format_version"] = "99.0"
    cut = tmp_path / "cut.h5"
    cut.write_bytes(run.read_bytes()[:200_000])
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle.attrs["kind"] = "something-else"
    for given in (newer, cut):
        before = given.read_bytes()
        result = runner.invoke(app, ["replay", str(GRPO), "-p", "grpo", "--out", str(given)])
        assert (result.exit_code, result.stderr) == (
            2,
            f"error: --out {given} is maybe a packed run this version cannot read (stabledrl "
            "pack); a report replaces its file, never a run: give another file\n",
        ), result.output
        assert given.read_bytes() == before
    replayed = runner.invoke(app, ["replay", str(GRPO), "-p", "grpo", "--out", str(other)])
    assert replayed.exit_code == 0, replayed.stderr


def test_a_report_over_an_hdf5_file_of_another_kind_reads_its_kind_alone(tmp_path, monkeypatch):
    """Telling a packed run from another HDF5 file walked all its objects in a child first:
    100,000 datasets took 6.6 s per report, and one past the 20 s bound was taken for a run
    this version cannot read and kept. The kind is read first: the walk never runs."""
    import time

    import h5py

    from stabledrl_cli.dump import _archive_probe

    def slow_walk(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(_archive_probe, "walk_objects", slow_walk)
    monkeypatch.setattr(_archive_probe, "PROBE_SECONDS", 1.0)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle.create_dataset("data", data=[1.0, 2.0])
    replayed = runner.invoke(app, ["replay", str(GRPO), "-p", "grpo", "--out", str(other)])
    assert replayed.exit_code == 0, replayed.stderr

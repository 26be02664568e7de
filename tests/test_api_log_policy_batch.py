"""`log_policy_batch` given a name the Recorder does not take: a usage error (exit 2) that
names it, as log_step's own refusals are, not Python's TypeError reported as bad input (3)."""

from __future__ import annotations

import pytest
from _record_here import record_python_here

REST = "logp_old=[-1.0, -2.0], advantages=[1.0, -1.0], seq_id=[0, 1]"
BATCH = f"logp=[-1.0, -2.0], {REST}"


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (f"sd.log_policy_batch(0, logpp=[-1.0, -2.0], {REST})",
         "'logpp' is not a field of log_policy_batch (did you mean 'logp'?)"),
        (f"sd.log_policy_batch(0, recorder_kwargs={{'units': 'sequence'}}, {BATCH})",
         "'units' is not a key of recorder_kwargs (did you mean 'unit'?)"),
        (f"sd.log_policy_batch(0, recorder_kwargs={{'policy': 'gspo'}}, {BATCH})",
         "'policy' is not a key of recorder_kwargs (record sets it: --out, "
         "log_policy_batch's policy or --policy, --force)"),
        (f"sd.log_policy_batch(0, recorder_kwargs=['unit'], {BATCH})",
         "recorder_kwargs must be a dict, got list"),
    ],
)  # fmt: skip
def test_a_name_the_recorder_does_not_take_is_a_usage_error_naming_it(
    tmp_path, monkeypatch, capfd, call, said
):
    """Before: TypeError (`Recorder.log_step() got an unexpected keyword argument 'logpp'`,
    `Recorder.__init__() got multiple values for keyword argument 'policy'`), exit 3; and
    recorder_kwargs=['unit'] dict()'s ValueError ('dictionary update sequence element #0 has
    length 4; 2 is required'), exit 3."""
    script = f"import stabledrl_cli as sd\nprint({call})\n"
    done, errors = record_python_here(monkeypatch, capfd, script, "-p", "grpo", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout.splitlines()[-1] == "False"
    assert errors == [f"error: recording failed: log_policy_batch failed at step 0: {said}"]
    assert "TypeError" not in done.stderr and "Traceback" not in done.stderr

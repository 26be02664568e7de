"""Several training scripts recorded as phases of one process: each Python that imports
torch and steps an optimizer costs seconds, most of a test's time."""

from __future__ import annotations

import textwrap

PHASES_SCRIPT = textwrap.dedent(
    """
    import gc, json, runpy, sys
    import torch

    for name, path, args in json.load(open(sys.argv[1])):
        for stream in (sys.stdout, sys.stderr):
            print(f"== {name}", file=stream, flush=True)
        sys.argv = [path, *args]
        runpy.run_path(path, run_name="__main__")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        gc.collect()
    """
)
"""A script that runs each phase (argv[1]: a JSON list of [name, script, its arguments])
as a script of its own, one after the other in this one recorded process: it prints
`== NAME` on stdout and stderr before it, and frees its optimizers after it (its process
group too), so that the next phase's optimizer becomes the run's and the numbering goes on
(docs/recording.md). torch is imported first: a script that imported it first stayed alive,
its optimizer too (torch imports multiprocessing, which keeps the __main__ of its import as
__mp_main__)."""

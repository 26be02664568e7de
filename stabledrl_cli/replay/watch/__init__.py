"""Watch: following a run while it is written, the machinery of `stabledrl watch`
(docs/watch.md).

`follow` (`RunWatcher`: each poll reads the steps that landed and replays them with the run's
own policy), `state` (`WatchState`: what the view and `--format json` show), `alerts` (raised
once each), `manifest` (the run's manifest as the polls find it), `rank_files` (how far each
rank got) and `writers` (whether the run's Recorders may still write). The incremental replay
they use, `replay.incremental`, stays in `replay`: `diff` uses it too.
"""

"""`stabledrl tune`: a sweep of policy parameters over a recorded run, in one streamed replay.

`grid` expands sweep specs (`ppo:eps_high=0.2..0.5:8`) into settings; the replay evaluates
them all together on each chunk; `front` ranks them by discarded gradient against risk steps
and recommends one.
"""

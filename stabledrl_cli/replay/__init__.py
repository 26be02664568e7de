"""Replay: stream a recorded run through policies; collapse detectors; observed behaviour."""

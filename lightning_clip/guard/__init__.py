"""ExplosionGuard's machinery: the per-step decision, known-good states, checkpoint files, the event log.

* :mod:`~lightning_clip.guard.decision`: pure; a step's observations in, a decision out.
* :mod:`~lightning_clip.guard.snapshot`: capture the live training state, restore it.
* :mod:`~lightning_clip.guard.checkpoints`: find and read the Trainer's checkpoint files safely.
* :mod:`~lightning_clip.guard.events`: the event record and ``lightning_clip_events.jsonl``.
"""

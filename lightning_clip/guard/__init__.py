"""ExplosionGuard's machinery: the per-step decision, known-good states, checkpoint files, the event log.

* `decision`: pure; a step's observations in, a decision out.
* `snapshot`: capture the live training state, restore it.
* `checkpoints`: find and read the Trainer's checkpoint files safely.
* `events`: the event record and ``lightning_clip_events.jsonl``.
"""

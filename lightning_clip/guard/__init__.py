"""ExplosionGuard's machinery: the per-step decision, known-good states, the rollback pipeline, the event log.

* `decision`: pure; a step's observations in, a decision out (`observe` gathers them).
* `recovery`: what the guard does about an event (skip, roll back, raise).
* `snapshot`: capture the live training state; `known_good`: the snapshot and when the next is due.
* `rollback`: the pipeline that finds, chooses, reads, validates and restores a known-good state.
* `events` / `recorder`: the event record and ``lightning_clip_events.jsonl``.
"""

"""Celery tasks for the Batch API. Thin: ids in, a service call, nothing else.

`batch_run` may run any number of times, concurrently, on any worker: lines are
claimed by compare-and-set and billed under request ids derived from the batch.
"""

from __future__ import annotations

from config.celery import app, durable
from gateway import batches


@app.task(name="gateway.batch_run", **durable())
def batch_run(batch_id: int) -> str:
    return batches.batch_process(batch_id=batch_id)


@app.task(name="gateway.batches_resume", **durable())
def batches_resume() -> list[int]:
    return batches.batches_resume()

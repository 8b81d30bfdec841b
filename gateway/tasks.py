"""Celery tasks for the Batch API. Thin: ids in, a service call, nothing else.

`batch_run` may run any number of times, concurrently, on any worker: lines are
claimed by compare-and-set and billed under request ids derived from the batch.
"""

from __future__ import annotations

from core.tasks import durable, task, time_limits
from gateway import batch_runner, native_batches


# A batch can outlast any limit: when this one interrupts a run, its line claims lapse
# and gateway.batches_resume (beat, every minute) queues the rest; lines are claimed
# by compare-and-set, so nothing runs twice.
@task("gateway.batch_run", **durable(**time_limits(3600)))
def batch_run(batch_id: int) -> str:
    return batch_runner.batch_process(batch_id=batch_id)


@task("gateway.batches_resume", **durable())
def batches_resume() -> list[int]:
    return batch_runner.batches_resume()


# One step of a native batch (gateway.native_batches): safe to repeat and to run
# concurrently, each step is claimed by compare-and-set and resumes where one stopped.
@task("gateway.native_batch_step", **durable(**time_limits(3600)))
def native_batch_step(batch_id: int) -> str:
    return native_batches.native_step(batch_id=batch_id)


@task("gateway.native_batches_poll", **durable())
def native_batches_poll() -> list[int]:
    return native_batches.native_batches_poll()

"""Media decoded ahead: data workers load the next steps' examples (decode, resize, the contrast
shuffles, the prompts: data.load_example's work) while the current step computes; the scripts'
data_workers (0: loaded in the step itself, as before).

A Prefetcher runs a stream of Jobs, each a module-level load function of a data.Loader and the
job's own arguments, and hands their results back in the stream's order: the same function on the
same arguments as the main process would run, so the examples are the same bit for bit. What a
job draws from a random generator it draws from a copy of the generator that travels with it, and
returns that copy, so the main process goes on drawing where the job left off (tgrpo.rollout).

The workers are "spawn"ed: fresh interpreters that import what they need. A fork would copy the
main process as it is, torch's thread pools (whose threads do not survive a fork: a pool used
after it can deadlock) and the model, whose memory the child would hold on to; a worker needs the
tokenizer and the config only, sent once as it starts."""
import collections
import multiprocessing
import multiprocessing.connection
import signal
import traceback
from typing import Callable, NamedTuple
import torch
import data

# data_timeout's default: seconds the main process waits for a job's result before it calls the
# worker hung. A batch of 8 clips of 64 frames decodes in about 10 s on one core (DETAILS.md)
TIMEOUT = 300.0
# seconds a worker gets to stop when asked at the end of a run, before it is killed
STOP_SECONDS = 5


class Job(NamedTuple):
    """One batch to load: load(loader, *args) in a worker (load is imported there by name)."""
    load: Callable
    args: tuple
    records: list  # the records it loads, to name them when a worker fails


class Reply(NamedTuple):
    """A worker's answer to one job: its result, or the error it raised and where."""
    result: object
    error: Exception | None
    trace: str  # the worker's traceback of the error


class Worker(NamedTuple):
    process: multiprocessing.Process
    conn: multiprocessing.connection.Connection  # the main process's end of its pipe


class DataWorkerError(RuntimeError):
    """A data worker that died or hung; the message names the records it was loading."""


def serve(conn, loader):
    """A worker's loop: run each job received, send back its Reply; stop at None, or when the main
    process is gone (its end of the pipe closed)."""
    # the workers share the cores with the main process and each other
    torch.set_num_threads(1)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        load, args = job
        try:
            reply = Reply(load(loader, *args), None, "")
        except Exception as err:  # any error: the main process raises it, as it would unprefetched
            reply = Reply(None, err, traceback.format_exc())
        conn.send(reply)


def read(conn):
    """The next message on a pipe, or None where the other end closed before a whole one came (a
    worker that died mid-reply)."""
    try:
        return conn.recv()
    # the pipe is a socket pair: a peer killed with unread data in it resets the connection
    except (EOFError, ConnectionResetError):
        return None


def describe(records) -> str:
    """The records of a job as messages name them."""
    return "; ".join(data.record_name(r["json"], r["index"], r) for r in records)


def exit_reason(process) -> str:
    """How a worker process ended: its exit code, or the signal that killed it."""
    process.join(STOP_SECONDS)  # it has ended: this reaps it, so that exitcode is set
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Prefetcher:
    """The results of `jobs` (an iterable of Job) in order, loaded by `workers` spawned processes
    up to `workers` jobs ahead of the one asked for (so at most that many results wait in memory),
    or with workers=0 by the main process when asked. A worker that dies or gives no result within
    `timeout` seconds fails the run (DataWorkerError); an error a job raises is raised here.

    close() at the end stops the workers. On an error they end too: a failure here kills them, and
    an exception elsewhere ends the interpreter, whose exit terminates daemonic processes; a worker
    whose main process is killed sees its pipe close and returns."""

    def __init__(self, jobs, loader, workers, timeout=TIMEOUT):
        self.jobs = iter(jobs)
        self.loader = loader
        self.timeout = timeout
        self.workers = []
        self.pending = collections.deque()  # (Job, Worker) sent and not yet handed back, in order
        self.sent = 0  # jobs sent so far: job k goes to worker k % workers
        self.closed = False
        context = multiprocessing.get_context("spawn")  # not a fork: the module's docstring
        for i in range(workers):
            here, there = context.Pipe()
            process = context.Process(target=serve, args=(there, loader), daemon=True,
                                      name=f"data worker {i}")
            process.start()
            there.close()  # the worker's end lives in the worker: it alone keeps the pipe open
            self.workers.append(Worker(process, here))

    def __iter__(self):
        return self

    def __next__(self):
        if self.closed:
            raise RuntimeError("the prefetcher is closed")
        if not self.workers:
            job = next(self.jobs)
            return job.load(self.loader, *job.args)
        self.send_ahead()
        if not self.pending:
            raise StopIteration
        job, worker = self.pending.popleft()
        reply = self.receive(job, worker)
        if reply.error is not None:
            self.close(wait=0)
            reply.error.add_note(f"raised in a data worker while loading {describe(job.records)}:"
                                 f"\n{reply.trace}")
            raise reply.error
        # the next job starts while the caller computes on this one
        self.send_ahead()
        return reply.result

    def send_ahead(self):
        """Send jobs until `workers` are out; each worker has at most one at a time."""
        while len(self.pending) < len(self.workers):
            job = next(self.jobs, None)
            if job is None:
                return
            worker = self.workers[self.sent % len(self.workers)]
            worker.conn.send((job.load, job.args))
            self.pending.append((job, worker))
            self.sent += 1

    def receive(self, job, worker) -> Reply:
        """The worker's reply to `job`; a worker that dies first or is silent for `timeout` seconds
        ends every worker and fails the run, naming the job's records."""
        ready = multiprocessing.connection.wait([worker.conn, worker.process.sentinel],
                                                self.timeout)
        name = worker.process.name
        pid = worker.process.pid
        if not ready:
            self.close(wait=0)
            raise DataWorkerError(
                f"{name} (pid {pid}) gave no result in data_timeout={self.timeout} s: hung, or "
                f"media slower than that (raise data_timeout); it was loading "
                f"{describe(job.records)}")
        reply = None
        if worker.conn in ready:
            reply = read(worker.conn)
        if reply is not None:
            return reply
        self.close(wait=0)
        raise DataWorkerError(f"{name} (pid {pid}) died ({exit_reason(worker.process)}) while "
                              f"loading {describe(job.records)}")

    def close(self, wait=STOP_SECONDS):
        """Stop the workers: asked to, and killed if still running after `wait` seconds (0: at
        once, after an error)."""
        self.closed = True
        for worker in self.workers:
            if wait and worker.process.is_alive():
                worker.conn.send(None)
        for worker in self.workers:
            worker.process.join(wait)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # on an error the workers may be busy with jobs nobody will ask for: end them at once
        wait = STOP_SECONDS
        if exc[0] is not None:
            wait = 0
        self.close(wait)

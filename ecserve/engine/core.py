"""The engine core in a process of its own: engine steps back to back, fed and drained
over ZMQ by two I/O threads (as vLLM v1's EngineCoreProc).

    front end --CoreInput--> [input thread] -> queue -> busy loop: apply inputs, step
    front end <-CoreOutput-- [output thread] <- queue <-----------'

The busy loop only applies inputs and steps; socket reads, msgpack decoding and sends happen
on the I/O threads, which run while the step's torch kernels have released the GIL. The core
never detokenizes: events go out as token ids, and the front end's text stage turns them
into text and finds stop sequences (then aborts the request here).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from ecserve.config import EngineConfig
from ecserve.engine.core_protocol import Codec, CoreHello, CoreInput, CoreOutput, CoreReady
from ecserve.engine.engine import Engine
from ecserve.errors import UserError
from ecserve.types import RequestStats, StepPlan, StepStats

log = logging.getLogger("ecserve.core")

# What the core runs: a picklable callable (the process is spawned) that loads the engine
# and returns it with what to call once the loop has ended.
EngineLoader = Callable[[], tuple[Engine, Callable[[], None] | None]]


def load_engine(model: str | None, cfg: EngineConfig) -> tuple[Engine, None]:
    """The plain loader: one engine on one device."""
    return Engine(model, cfg), None


@dataclass(frozen=True)
class CoreSpec:
    """How to run the engine-core process."""

    torch_threads: int | None = None  # None: torch's default (OMP_NUM_THREADS or every core)
    cpus: tuple[int, ...] | None = None  # pin the process to these CPUs; None: no pinning
    log_level: str = "INFO"
    env: tuple[tuple[str, str], ...] = ()  # set for the process before it imports torch


CORE_IGNORES = {signal.SIGINT, signal.SIGTERM}  # the core stops when the front end says


def run_core(load: EngineLoader, spec: CoreSpec, input_addr: str, output_addr: str,
             parent_pid: int) -> None:
    """The engine-core process's entry point."""
    # The front end owns the lifecycle: a terminal's Ctrl-C reaches the whole process group,
    # but the core stops only when told (after the drain) or when its parent is gone. (Its
    # front end starts it with them ignored already, so none cuts its start-up short.)
    for sig in CORE_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    if spec.cpus is not None:
        os.sched_setaffinity(0, spec.cpus)
    import torch

    if spec.torch_threads is not None:
        torch.set_num_threads(spec.torch_threads)
    ctx = zmq.Context()
    codec = Codec()
    # The core binds; the front end connected before starting it, so neither side waits.
    inputs = ctx.socket(zmq.PULL)
    inputs.bind(input_addr)
    outputs = ctx.socket(zmq.PUSH)
    outputs.setsockopt(zmq.LINGER, 5000)
    outputs.bind(output_addr)
    try:
        engine, close = load()
    except Exception as e:  # the front end reports it (one line) and exits 2
        log.debug("the engine core could not load its model", exc_info=True)
        outputs.send(codec.encode(CoreHello(error=f"{e}", error_type=type(e).__name__,
                                             user_error=isinstance(e, UserError))))
        inputs.close()
        outputs.close()
        ctx.term()
        raise SystemExit(2) from None
    log.info("engine core ready (pid %d, %d torch threads, OMP_WAIT_POLICY=%s%s)", os.getpid(),
             torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY", "unset"),
             f" GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"
             if "GOMP_SPINCOUNT" in os.environ else "")
    outputs.send(codec.encode(CoreHello(ready=core_ready(engine))))
    core = EngineCore(engine)
    try:
        settled = core.run(inputs, outputs, parent_pid)
    finally:
        if close is not None:
            close()
    if not settled:
        # The writer is stuck sending to a front end that is gone (a PUSH socket without a
        # peer blocks): nothing is left to deliver, and closing its socket would block too.
        log.warning("engine core stopped without its front end")
        os._exit(1)
    inputs.close()
    outputs.close()
    ctx.term()
    log.info("engine core stopped")


def core_ready(engine: Engine) -> CoreReady:
    """What the front end learns of a loaded engine."""
    return CoreReady(pid=os.getpid(), model_name=engine.model_name, model_cfg=engine.model_cfg,
                     limits=engine.limits, dtype=engine.dtype_name, device=str(engine.device),
                     held_experts=engine.runner.held_experts(),
                     expert_parallel=bool(engine.runner.expert_traffic()))


class EngineCore:
    """The busy loop over one engine: inputs from a queue, each step's output to `emit`
    (default: the output queue a writer thread sends from). The same loop runs in the engine
    core's process and on a thread of the server's (server/core_thread.py)."""

    def __init__(self, engine: Engine, emit: Callable[[CoreOutput], None] | None = None
                 ) -> None:
        self.engine = engine
        self.inputs: queue.Queue[CoreInput] = queue.Queue()
        self.outputs: queue.Queue[CoreOutput | None] = queue.Queue()
        self.emit = emit or self.outputs.put
        self._finished: list[RequestStats] = []
        self._step: StepStats | None = None
        self._lost_sent = False
        engine.observer = self  # collects what each output frame reports
        engine.on_admitted = lambda ids: self.emit(CoreOutput(admitted=list(ids)))

    # EngineObserver: called on the loop's thread, inside engine calls.
    def step_done(self, stats: StepStats) -> None:
        self._step = dataclasses.replace(stats, plan=StepPlan((), stats.plan.group_sizes))

    def request_done(self, stats: RequestStats) -> None:
        self._finished.append(stats)

    def run(self, inputs: zmq.Socket, outputs: zmq.Socket, parent_pid: int) -> bool:
        """Step until told to stop (or the front end is gone); True when both I/O threads
        ended, False when one is stuck on its socket."""
        codec = Codec()
        reader = threading.Thread(target=self._read, args=(inputs, codec, parent_pid),
                                  name="ecserve-core-in", daemon=True)
        writer = threading.Thread(target=self._write, args=(outputs, codec),
                                  name="ecserve-core-out", daemon=True)
        reader.start()
        writer.start()
        try:
            self.loop()
        finally:
            self.outputs.put(None)
            writer.join(timeout=5.0)
            reader.join(timeout=2.0)  # it ends on the stop frame (or the parent's death)
        return not writer.is_alive() and not reader.is_alive()

    def loop(self) -> None:
        """Apply what arrived, step, emit; until a stop frame."""
        engine = self.engine
        while True:
            batch = self._take(block=not engine.has_unfinished())
            if batch is None:
                return
            out = CoreOutput()
            for item in batch:
                self._apply(item, out)
            if engine.has_unfinished():
                out.events += engine.step()
            self._send(out)

    def _take(self, block: bool) -> list[CoreInput] | None:
        """Every input waiting (blocking for the first when idle); None: stop."""
        batch = []
        try:
            # Idle: wake every second to report a runner lost meanwhile (a dead worker rank).
            batch.append(self.inputs.get(timeout=1.0) if block else self.inputs.get_nowait())
            while True:
                batch.append(self.inputs.get_nowait())
        except queue.Empty:
            pass
        return None if any(b.stop for b in batch) else batch

    def _apply(self, item: CoreInput, out: CoreOutput) -> None:
        # Aborts first: the front end already counted their queue places as free.
        for rid, reason in item.aborts:
            self.engine.abort(rid, reason)
        for request in item.requests:
            try:
                self.engine.add_request(request)
            except Exception as e:  # the front end checked it; a lost runner, or a bug
                out.refused.append((request.request_id, f"{type(e).__name__}: {e}"))

    def _send(self, out: CoreOutput) -> None:
        out.step, self._step = self._step, None
        out.finished, self._finished = self._finished, []
        engine = self.engine
        if engine.lost is not None and not self._lost_sent:
            out.lost, self._lost_sent = engine.lost, True
        if out.step is not None and (traffic := engine.runner.expert_traffic()):
            out.traffic = traffic
        if out.events or out.step or out.finished or out.refused or out.lost:
            self.emit(out)

    # ---------------------------------------------------------------- I/O threads

    def _read(self, sock: zmq.Socket, codec: Codec, parent_pid: int) -> None:
        while True:
            if sock.poll(1000):
                item = codec.input(sock.recv(copy=False).buffer)
                self.inputs.put(item)
                if item.stop:
                    return
            elif os.getppid() != parent_pid:  # the front end died without a word
                log.error("the front-end process is gone; stopping")
                self.inputs.put(CoreInput(stop=True))
                return

    def _write(self, sock: zmq.Socket, codec: Codec) -> None:
        while (out := self.outputs.get()) is not None:
            sock.send(codec.encode(out), copy=False)

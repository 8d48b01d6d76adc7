"""The one way this repository times speculative decoding against autoregressive decoding.

``draftrl eval`` (``tools.benchmark``), the study's scorings (``bench/compare_drafters.py``) and
``bench/one_bench.py`` all call :func:`measure_speedup`; nothing else times the two and divides.
Ray-free core: the caller brings the decoders, the questions and the conversation driver.

What is timed, and how (see docs/benchmarking.md):

* a *decoder* is a callable ``(prompt_ids, max_new_tokens, eos) -> result`` whose result has
  ``tokens`` (and, for speculation, ``accept_lengths``); :func:`speculative_decoder` wraps the tree
  engine, :func:`autoregressive_decoder` the fastest batch-1 AR the repository has (``batch``:
  ``BatchGenerator`` with ``chain_length=0``, the whole step one CUDA graph) or the tree engine's
  own ``generate_autoregressive`` (``static``);
* every generation is timed here, the same way for every decoder: ``torch.cuda.synchronize``,
  ``perf_counter``, the call, ``torch.cuda.synchronize``, ``perf_counter``. Tokenisation and the
  chat template stay outside (the driver renders a prompt before calling the decoder);
* warm-up is explicit and untimed (:func:`warm_up`): every decoder runs full-length generations
  first (graph capture, allocator, cuBLAS, GPU clocks), then a short generation from one prompt of
  every first-turn length: prefills run eagerly, and the first call at a new length pays one-off
  costs (cuDNN builds an attention graph per shape) that would otherwise land in the timed region
  of whichever side met that prompt first;
* speculation and AR alternate per question (speculation first on even questions, AR first on odd
  ones, the parity flipping each repeat) and benches are visited round-robin (question 0 of every
  bench, then question 1, ...), so clock or thermal drift hits both sides alike and a run cut by
  its deadline stays balanced. With more than two decoders (several speculative ones, e.g. tree
  shapes, or several AR engines) odd questions run them in the reverse order: every pair swaps
  order each question and every decoder has the same mean position;
* several speculative decoders (``spec`` a mapping ``{name: decoder}``) are timed against the
  *same* AR generations of the same questions: one AR baseline for all of them (a tree sweep);
* repeats run in the same process; each bench reports the mean, min and max over the finished
  repeats of speculative tokens/s, AR tokens/s and their ratio;
* GPU clocks, temperature and power are sampled before and after every repeat (best effort:
  ``nvidia-smi``, else ``torch.cuda.clock_rate``).

tau = 1 + accepted draft tokens / verification forwards (bonus included, prefill excluded),
EAGLE's definition; at T = 0 every speculative generation is compared token for token with the
AR one of the same turn (a bf16 near-tie can split them: reported, not asserted).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

AR_ENGINES = ("batch", "static")
# On an H200 (SmolLM2-135M, bf16, batch 1) the batched engine's AR ran 593 tokens/s and the tree
# engine's generate_autoregressive 324 (bench/results/batched_experience_h200): the faster one is
# the baseline by default; ``bench/one_bench.py --ar-engine batch,static`` times both.
DEFAULT_AR_ENGINE = "batch"
ORDERS = ("alternate", "spec-first", "ar-first")


# ---------------------------------------------------------------------------------- decoders


class Decoder:
    """A named generation function with ``reseed`` and a settable ``temperature``."""

    def __init__(self, name: str, engine: Any, call: Callable[[list[int], int, set[int]], Any]):
        self.name, self.engine, self._call = name, engine, call

    def __call__(self, prompt_ids: Sequence[int], max_new_tokens: int, eos: set[int]):
        return self._call(list(prompt_ids), max_new_tokens, eos)

    def reseed(self, seed: int) -> None:
        self.engine.reseed(seed)

    @property
    def temperature(self) -> float:
        return self.engine.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if hasattr(self.engine, "set_temperature"):  # BatchGenerator: its graphs bake it in
            self.engine.set_temperature(value)
        else:
            self.engine.temperature = float(value)

    @property
    def compile(self) -> str:
        return self.engine.compile


@dataclass
class Generated:
    tokens: list[int]
    accept_lengths: list[int] = field(default_factory=list)
    wall_time: float = 0.0


def speculative_decoder(engine) -> Decoder:
    """The tree engine (``speculative.engine.SpeculativeGenerator`` with a drafter)."""
    return Decoder("tree", engine, engine.generate)


def autoregressive_decoder(target, kind: str = DEFAULT_AR_ENGINE, *, compile: str = "auto",
                           max_len: int | None = None, temperature: float = 0.0, seed: int = 0,
                           engine=None) -> Decoder:
    """The target's own decoding at batch 1.

    ``batch``: ``speculative.batch_engine.BatchGenerator`` without a drafter (fused target, whole
    step one CUDA graph, a host check every 8 steps). ``static``: ``generate_autoregressive`` of
    the tree engine's static decoder (one graph replay and one host sync per token); ``engine``
    reuses an existing ``SpeculativeGenerator`` for it, else one without a drafter is built.
    """
    if kind == "batch":
        from speculative.batch_engine import BatchGenerator

        generator = BatchGenerator(target, None, 0, temperature, seed, compile=compile, max_batch=1,
                                   max_len=max_len)

        def call(ids, max_new_tokens, eos):
            result = generator.generate([ids], max_new_tokens, eos)
            return Generated(result.tokens[0], [], result.wall_time)

        return Decoder("batch", generator, call)
    if kind == "static":
        from speculative.engine import SpeculativeGenerator

        if engine is None:
            engine = SpeculativeGenerator(target, None, temperature=temperature, seed=seed,
                                          compile=compile, max_len=max_len)
        return Decoder("static", engine, engine.generate_autoregressive)
    raise ValueError(f"AR engine must be one of {AR_ENGINES}, got {kind!r}")


def parse_ar_engines(spec: str) -> list[str]:
    """``"batch"``, ``"static"`` or ``"batch,static"`` (the first is the speed-up's baseline)."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in AR_ENGINES]
    if not kinds or bad or len(set(kinds)) != len(kinds):
        raise ValueError(f"--ar-engine: comma-separated names from {AR_ENGINES}, got {spec!r}")
    return kinds


# ---------------------------------------------------------------------------------- clocks


_SMI_FIELDS = ("clocks.sm", "clocks.mem", "clocks.max.sm", "temperature.gpu", "power.draw",
               "clocks_event_reasons.active")


def gpu_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Clocks (MHz), temperature (C), power (W) and throttle reasons of the GPU; {} on CPU.

    Best effort: ``nvidia-smi`` if it is on PATH, else ``torch.cuda.clock_rate`` (needs pynvml).
    """
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return {}
    index = torch.device(device).index if device is not None and torch.device(device).index is not None \
        else torch.cuda.current_device()
    state: dict[str, Any] = {"time": round(time.time(), 3)}
    if shutil.which("nvidia-smi"):
        for fields in (_SMI_FIELDS, _SMI_FIELDS[:-1]):  # older drivers lack the last field
            try:
                out = subprocess.run(
                    ["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(fields)}",
                     "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10, check=True,
                ).stdout.strip().splitlines()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                continue
            for name, value in zip(fields, (v.strip() for v in out.split(","))):
                try:
                    state[name] = float(value)
                except ValueError:
                    state[name] = value
            return state
    try:
        state["clocks.sm"] = float(torch.cuda.clock_rate(index))
    except Exception as error:  # no pynvml / no NVML: say so
        state["error"] = f"{type(error).__name__}: {error}"
    return state


# ---------------------------------------------------------------------------------- statistics


@dataclass
class BlockStats:
    """Speculation vs AR on one bench (one temperature), over the pairs added so far."""

    bench: str
    temperature: float
    questions: int = 0
    generations: int = 0
    spec_tokens: int = 0
    spec_time_s: float = 0.0
    verify_forwards: int = 0
    accepted_tokens: int = 0
    baseline_tokens: int = 0
    baseline_time_s: float = 0.0
    mismatches: int | None = None  # T = 0 only: generations where speculative != baseline
    first_mismatch_at: list[int] = field(default_factory=list)  # token index, per mismatch
    accept_histogram: list[int] = field(default_factory=list)  # verifications per accept length
    other_ar: dict[str, list[float]] = field(default_factory=dict)  # more AR engines: [tokens, seconds]

    def add(self, spec, base, spec_time: float | None = None, base_time: float | None = None) -> None:
        """One generation of each side: results with ``tokens`` (and ``accept_lengths``)."""
        self.generations += 1
        self.spec_tokens += len(spec.tokens)
        self.spec_time_s += spec.wall_time if spec_time is None else spec_time
        self.verify_forwards += len(spec.accept_lengths)
        self.accepted_tokens += sum(spec.accept_lengths)
        for a in spec.accept_lengths:
            if a >= len(self.accept_histogram):
                self.accept_histogram += [0] * (a + 1 - len(self.accept_histogram))
            self.accept_histogram[a] += 1
        if base is None:
            return
        self.baseline_tokens += len(base.tokens)
        self.baseline_time_s += base.wall_time if base_time is None else base_time
        if self.temperature == 0:
            self.mismatches = self.mismatches or 0
            if list(spec.tokens) != list(base.tokens):
                self.mismatches += 1
                pairs = zip(spec.tokens, base.tokens)
                self.first_mismatch_at.append(
                    next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(spec.tokens), len(base.tokens)))
                )

    def add_other(self, name: str, tokens: int, seconds: float) -> None:
        totals = self.other_ar.setdefault(name, [0, 0.0])
        totals[0] += tokens
        totals[1] += seconds

    def merge(self, other: BlockStats) -> None:
        for name in ("questions", "generations", "spec_tokens", "spec_time_s", "verify_forwards",
                     "accepted_tokens", "baseline_tokens", "baseline_time_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.mismatches is not None:
            self.mismatches = (self.mismatches or 0) + other.mismatches
        self.first_mismatch_at += other.first_mismatch_at
        for a, n in enumerate(other.accept_histogram):
            if a >= len(self.accept_histogram):
                self.accept_histogram += [0] * (a + 1 - len(self.accept_histogram))
            self.accept_histogram[a] += n
        for name, (tokens, seconds) in other.other_ar.items():
            self.add_other(name, tokens, seconds)

    @property
    def tau(self) -> float:
        """Mean tokens per verification forward, bonus included; prefill forwards excluded."""
        return 1.0 + self.accepted_tokens / self.verify_forwards if self.verify_forwards else 1.0

    @property
    def spec_tokens_per_s(self) -> float:
        return self.spec_tokens / self.spec_time_s if self.spec_time_s else 0.0

    @property
    def baseline_tokens_per_s(self) -> float:
        return self.baseline_tokens / self.baseline_time_s if self.baseline_time_s else 0.0

    @property
    def speedup(self) -> float | None:
        base = self.baseline_tokens_per_s
        return self.spec_tokens_per_s / base if base else None

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            tau=round(self.tau, 4),
            mean_accept_length=round(self.tau - 1.0, 4),
            # speculative seconds per verification forward (the prefill's share included): the cycle
            cycle_ms=round(1000 * self.spec_time_s / self.verify_forwards, 4) if self.verify_forwards else None,
            spec_tokens_per_s=round(self.spec_tokens_per_s, 2),
            baseline_tokens_per_s=round(self.baseline_tokens_per_s, 2),
            speedup=round(self.speedup, 4) if self.speedup is not None else None,
            other_ar_tokens_per_s={name: round(t / s, 2) if s else 0.0 for name, (t, s) in self.other_ar.items()},
        )
        return data


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """mean / min / max (and the population standard deviation) of the values; None if none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": round(statistics.fmean(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "std": round(statistics.pstdev(values), 4), "n": len(values)}


@dataclass
class BenchTiming:
    """One bench: a ``BlockStats`` per repeat (the last may be partial)."""

    bench: str
    temperature: float
    repeats: list[BlockStats] = field(default_factory=list)
    complete: list[bool] = field(default_factory=list)
    ar_engine: str | None = None
    spec: str | None = None  # the speculative decoder's name when several were timed

    def total(self) -> BlockStats:
        total = BlockStats(self.bench, self.temperature)
        for block in self.repeats:
            total.merge(block)
        if self.repeats:  # counts per repeat, not summed over repeats
            total.questions = max(b.questions for b in self.repeats)
            total.generations = max(b.generations for b in self.repeats)
        return total

    def summary(self) -> dict[str, Any]:
        """Totals over every timed pair (rates = tokens / seconds over all repeats), plus the spread
        over finished repeats of the per-repeat rates and speed-ups."""
        data = self.total().summary()
        done = [b for b, ok in zip(self.repeats, self.complete) if ok] or self.repeats[:1]
        if self.spec is not None:
            data["spec"] = self.spec
        data.update(
            ar_engine=self.ar_engine,
            timed_generations=sum(b.generations for b in self.repeats),
            repeats=len(self.repeats),
            complete_repeats=sum(self.complete),
            per_repeat=[{"repeat": i, "complete": ok, "questions": b.questions, "generations": b.generations,
                         "tau": round(b.tau, 4), "spec_tokens_per_s": round(b.spec_tokens_per_s, 2),
                         "baseline_tokens_per_s": round(b.baseline_tokens_per_s, 2),
                         "speedup": round(b.speedup, 4) if b.speedup is not None else None}
                        for i, (b, ok) in enumerate(zip(self.repeats, self.complete))],
            spread={"spec_tokens_per_s": spread(b.spec_tokens_per_s for b in done),
                    "baseline_tokens_per_s": spread(b.baseline_tokens_per_s for b in done if b.baseline_time_s),
                    "speedup": spread(b.speedup for b in done)},
        )
        return data


@dataclass
class Measurement:
    """What :func:`measure_speedup` returns: per bench timings, clocks, and whether it finished.

    ``benches`` is keyed by bench name, or by ``(spec name, bench)`` when several speculative
    decoders were timed (``spec`` a mapping)."""

    benches: dict[Any, BenchTiming]
    temperature: float
    repeats_asked: int
    stopped_early: bool = False
    seconds: float = 0.0
    gpu: list[dict[str, Any]] = field(default_factory=list)  # samples: before/after each repeat
    order: str = "alternate"

    def summaries(self) -> list[dict[str, Any]]:
        return [timing.summary() for timing in self.benches.values()]

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "repeats_asked": self.repeats_asked,
                "stopped_early": self.stopped_early, "seconds": round(self.seconds, 2), "order": self.order,
                "gpu": self.gpu, "benches": self.summaries()}


# ---------------------------------------------------------------------------------- timing


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(decoder: Callable, prompt_ids: Sequence[int], max_new_tokens: int, eos: set[int],
          device: torch.device | None) -> tuple[Any, float]:
    """(result, seconds): the call between two device synchronisations."""
    _sync(device)
    start = time.perf_counter()
    result = decoder(prompt_ids, max_new_tokens, eos)
    _sync(device)
    return result, time.perf_counter() - start


def warm_up(decoders: Iterable[Callable], prompt_ids: Sequence[int], max_new_tokens: int, eos: set[int],
            rounds: int = 2, prompts: Iterable[Sequence[int]] = (), prompt_tokens: int = 2) -> int:
    """Untimed generations of every decoder before anything is timed; returns how many prompt
    lengths were pre-filled.

    ``rounds`` full-length generations of ``prompt_ids`` (``eos`` ignored on purpose: every step
    shape is reached), then ``prompt_tokens`` new tokens from one prompt of every distinct length in
    ``prompts`` (e.g. every question's first turn). The prefills run eagerly with the prompt's length
    as a shape, and the first call at a new shape pays one-off costs (a cuDNN attention graph is
    built per shape, cuBLAS picks kernels, the allocator grows); without this, whichever decoder
    meets a prompt first pays them inside its timed region (see docs/benchmarking.md)."""
    del eos
    decoders = list(decoders)
    for _ in range(rounds):
        for decoder in decoders:
            decoder(prompt_ids, max_new_tokens, set())
    by_length = {len(p): list(p) for p in prompts}
    for prompt in by_length.values():
        for decoder in decoders:
            decoder(prompt, prompt_tokens, set())
    return len(by_length)


def _device_of(decoder: Decoder | None) -> torch.device | None:
    engine = getattr(decoder, "engine", None)
    return getattr(engine, "device", None)


Conversation = Callable[[Callable[[list[int], int], Any], Any], list[Any]]


def measure_speedup(
    spec: Callable | Mapping[str, Callable] | None,
    ar: Mapping[str, Callable] | Callable | None,
    benches: Mapping[str, Sequence[Any]],
    conversation: Conversation,
    *,
    max_new_tokens: int,
    eos: set[int],
    temperature: float = 0.0,
    repeats: int = 1,
    seed_for: Callable[[str, int, int], int] | None = None,
    deadline: float | None = None,
    on_pair: Callable[[str, int, int, Any, list, list | None], None] | None = None,
    on_repeat: Callable[[Measurement], None] | None = None,
    log: Callable[[str], None] | None = None,
    device: torch.device | None = None,
    record_gpu: bool = True,
    order: str = "alternate",
) -> Measurement:
    """Time ``spec`` against ``ar`` on every question of every bench, ``repeats`` times.

    ``conversation(generate, question)`` runs all turns of a question with ``generate(ids, turn)``
    and returns per-turn results with ``tokens`` (``tools.benchmark.run_conversation`` bound to a
    tokenizer). ``ar``: one decoder or ``{name: decoder}``, the first being the speed-up baseline
    (the others' tokens/s are reported too); None: speculation only (tau, no speed-up). ``spec``
    None: AR only; ``{name: decoder}``: several speculative decoders (e.g. tree shapes), each
    compared with the same AR generations (``benches`` then keyed by ``(name, bench)``, each
    summary with ``spec``: the name; ``on_pair`` then gets ``{name: turns}`` as ``spec_turns``).
    ``seed_for(bench, question, turn)`` reseeds a decoder before each turn (AR gets seed + 1).
    ``deadline`` (a ``time.perf_counter()`` value): no question starts after it; what was timed is
    kept and ``stopped_early`` is set. ``on_pair(bench, repeat, index, question, spec_turns,
    ar_turns)`` sees every timed pair (e.g. to write the generations); ``on_repeat(measurement)``
    runs after every repeat (e.g. to write what is done so far). ``order``: ``alternate`` (the
    default and the only fair one), ``spec-first`` (what ``draftrl eval`` did before issue 23) or
    ``ar-first``: the last two exist to measure how much the order matters.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if spec is None and not ar:
        raise ValueError("nothing to time: no speculative and no autoregressive decoder")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    ars: dict[str, Callable] = dict(ar) if isinstance(ar, Mapping) else ({"ar": ar} if ar is not None else {})
    several = isinstance(spec, Mapping)
    specs: dict[str | None, Callable] = dict(spec) if several else ({None: spec} if spec is not None else {})
    if several and not specs:
        raise ValueError("an empty mapping of speculative decoders")
    decoders = [*specs.values(), *ars.values()]
    for decoder in decoders:
        if hasattr(decoder, "temperature"):
            decoder.temperature = temperature
    device = device or next((d for d in map(_device_of, decoders) if d is not None), None)
    seed_for = seed_for or (lambda bench, index, turn: index * 101 + turn)
    primary = next(iter(ars), None)
    first_name = getattr(ars.get(primary), "name", primary) if primary else None

    def key(variant: str | None, bench: str):
        return bench if variant is None else (variant, bench)

    variants: list[str | None] = list(specs) or [None]  # AR only: one block per bench
    result = Measurement({key(v, name): BenchTiming(name, temperature, ar_engine=first_name, spec=v)
                          for v in variants for name in benches}, temperature, repeats, order=order)
    started = time.perf_counter()
    longest = max((len(qs) for qs in benches.values()), default=0)

    def side(decoder, bench: str, index: int, offset: int):
        times: list[float] = []

        def generate(ids, turn):
            if hasattr(decoder, "reseed"):
                decoder.reseed(seed_for(bench, index, turn) + offset)
            out, seconds = timed(decoder, ids, max_new_tokens, eos, device)
            times.append(seconds)
            return out

        return generate, times

    for repeat in range(repeats):
        if record_gpu:
            result.gpu.append({"repeat": repeat, "when": "before", **gpu_state(device)})
        blocks = {k: BlockStats(timing.bench, temperature) for k, timing in result.benches.items()}
        for k, timing in result.benches.items():
            timing.repeats.append(blocks[k])
            timing.complete.append(False)
        stopped = False
        for index in range(longest):
            for position, (name, questions) in enumerate(benches.items()):
                if index >= len(questions):
                    continue
                if deadline is not None and time.perf_counter() > deadline:
                    stopped = True
                    break
                question = questions[index]
                runs: dict[Any, tuple[list, list[float]]] = {}
                spec_sides = [(("spec", v), decoder, 0) for v, decoder in specs.items()]
                ar_sides = [(("ar", k), decoder, 1) for k, decoder in ars.items()]
                sides = spec_sides + ar_sides
                if order == "ar-first":
                    sides = ar_sides + spec_sides
                elif order == "alternate" and (index + repeat + position) % 2:
                    sides = sides[::-1]  # AR first; with more decoders every pair swaps each question
                for side_key, decoder, offset in sides:
                    generate, times = side(decoder, name, index, offset)
                    turns = conversation(generate, question)
                    runs[side_key] = (turns, times)
                base_turns, base_times = runs[("ar", primary)] if primary else (None, None)
                for variant in variants:
                    block = blocks[key(variant, name)]
                    block.questions += 1
                    spec_turns, spec_times = runs.get(("spec", variant), (None, None))
                    count = len(spec_turns if spec_turns is not None else base_turns)
                    for t in range(count):
                        if spec_turns is not None:
                            block.add(spec_turns[t], base_turns[t] if base_turns else None, spec_times[t],
                                      base_times[t] if base_times else None)
                        else:  # AR only: the baseline side alone
                            block.generations += 1
                            block.baseline_tokens += len(base_turns[t].tokens)
                            block.baseline_time_s += base_times[t]
                    for other in list(ars)[1:]:
                        turns, times = runs[("ar", other)]
                        block.add_other(other, sum(len(t.tokens) for t in turns), sum(times))
                if on_pair is not None:
                    spec_turns = ({v: runs[("spec", v)][0] for v in specs} if several
                                  else runs.get(("spec", None), (None, None))[0])
                    on_pair(name, repeat, index, question, spec_turns, base_turns)
            if stopped:
                break
        for timing in result.benches.values():
            timing.complete[-1] = not stopped
        if record_gpu:
            result.gpu.append({"repeat": repeat, "when": "after", **gpu_state(device)})
        if log is not None:
            rows = ", ".join(_short(b, k[0] if isinstance(k, tuple) else None)
                             for k, b in blocks.items() if b.generations)
            log(f"[timing] T={temperature:g} repeat {repeat + 1}/{repeats}{' (stopped: deadline)' if stopped else ''}"
                f": {rows}")
        result.seconds = time.perf_counter() - started
        result.stopped_early = stopped
        if on_repeat is not None:
            on_repeat(result)
        if stopped:
            break
    result.seconds = time.perf_counter() - started
    return result


def _short(block: BlockStats, variant: str | None = None) -> str:
    text = f"{block.bench}{f' [{variant}]' if variant else ''} tau {block.tau:.3f} spec {block.spec_tokens_per_s:.1f}"
    if block.baseline_time_s:
        text += f" AR {block.baseline_tokens_per_s:.1f} tok/s x{block.speedup:.3f}"
    return text + f" ({block.questions} q)"


def markdown_summary(measurement: Measurement, title: str = "") -> str:
    """One table: tau, speculative and AR tokens/s, speed-up (mean over repeats, min-max)."""
    lines = [title, ""] if title else []
    lines += ["| bench | T | tau | spec tok/s (min-max) | AR tok/s (min-max) | speed-up (min-max) | "
              "questions | repeats | T=0 spec != AR |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(s: dict[str, float] | None, fmt: str, suffix: str = "") -> str:
        if not s:
            return "-"
        return f"{s['mean']:{fmt}}{suffix} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    for b in measurement.summaries():
        mism = "-" if b["mismatches"] is None else f"{b['mismatches']}/{b['timed_generations']}"
        bench = f"{b['bench']} `{b['spec']}`" if "spec" in b else b["bench"]
        lines.append(
            f"| {bench} | {b['temperature']:g} | {b['tau']:.3f} | {cell(b['spread']['spec_tokens_per_s'], '.1f')} "
            f"| {cell(b['spread']['baseline_tokens_per_s'], '.1f')} | {cell(b['spread']['speedup'], '.3f', 'x')} "
            f"| {b['questions']} | {b['complete_repeats']}/{b['repeats']} | {mism} |")
        for name, rate in b["other_ar_tokens_per_s"].items():
            lines.append(f"|   AR `{name}` | | | | {rate:.1f} | | | | |")
    return "\n".join(lines) + "\n"

"""Record the Triton launches that Triton's interpreter runs, then compile each for a GPU, on a CPU.

The interpreter runs a kernel as Python, so it accepts things the compiler refuses: a plain Python
helper called from a kernel ran in the tests and fell back on the H200 ("Unsupported function
referenced"). Triton compiles to PTX and cubin without a GPU, so every launch the interpreter
tests make can be compiled here too:

* ``record(path)`` (in a process with ``TRITON_INTERPRET=1``, before the launches): every
  interpreted launch's kernel (module and name), argument types and constexpr values go to the JSON
  ``path`` when the process exits;
* ``compile_recorded(path, capability)`` (in a process without the interpreter): each distinct
  launch compiled with ``triton.compile`` for ``cuda`` at that compute capability (90: H100/H200).
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import json
import sys

import torch

_POINTEE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
            torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
            torch.bool: "i1"}


def _argument(value, constexpr: bool):
    """(signature type, constexpr value or None) of one launch argument, as ``triton.compile`` takes them."""
    if constexpr or value is None:
        return "constexpr", value
    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[value.dtype], None
    if isinstance(value, bool):
        return "i1", None
    if isinstance(value, int):
        return ("i32" if -2**31 <= value < 2**31 else "i64"), None
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"no Triton signature type for a {type(value).__name__} argument")


def record(path: str) -> None:
    """Make every interpreted launch of this process land in ``path`` (JSON) at exit."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        parameters = inspect.signature(fn).parameters
        options = {k: v for k, v in kwargs.items() if k not in parameters}  # num_warps, num_stages, ...
        bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in parameters}).arguments
        hints = inspect.get_annotations(fn)
        signature, constexprs = {}, {}
        for name, value in bound.items():
            is_constexpr = "constexpr" in str(hints.get(name, ""))
            kind, constant = _argument(value, is_constexpr)
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = constant
        launch = {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
                  "options": options}
        launches[json.dumps(launch, sort_keys=True)] = launch
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    atexit.register(lambda: open(path, "w").write(json.dumps(list(launches.values()), indent=1)))


def compile_recorded(path: str, capability: int = 90) -> list[str]:
    """Compile every launch recorded in ``path``; returns one line per failure (empty: all compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for launch in json.loads(open(path).read()):
        kernel = triton.jit(getattr(importlib.import_module(launch["module"]), launch["name"]))
        source = ASTSource(kernel, launch["signature"], launch["constexprs"])
        try:
            triton.compile(source, target=GPUTarget("cuda", capability, 32), options=launch["options"])
        except Exception as error:  # noqa: BLE001 - each failure is reported, with the launch it came from
            failures.append(f"{launch['module']}.{launch['name']} {launch['signature']}: "
                            f"{type(error).__name__}: {str(error)[:300]}")
    return failures


if __name__ == "__main__":  # python -m tests.kernel_launches LAUNCHES.json [CAPABILITY]
    problems = compile_recorded(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 90)
    print("\n".join(problems) or "all compiled")
    sys.exit(1 if problems else 0)

"""Registers, spills, shared memory and SASS opcode counts of the compiled decode kernels.

Triton keeps every compiled specialization of a ``@triton.jit`` function in ``fn.device_caches``:
``{device: (kernel cache, ...)}``, the kernel cache mapping a specialization key to a CompiledKernel
with ``n_regs`` / ``n_spills`` (set once loaded on the GPU), ``metadata`` (shared bytes, warps,
stages), ``src`` (the ASTSource: its ``constants`` map ``(argument index,)`` to the constexpr values)
and ``asm["sass"]`` (Triton's ``get_sass``: cuobjdump output, one ``control-codes<TAB>INSTR operands;``
line per instruction).
"""

from __future__ import annotations

import collections
import re

MAX_SASS_KERNELS = 2  # SASS histograms per session: disassembling is slow and two show the loop
MAX_OPCODES = 40


def sass_opcodes(sass: str) -> collections.Counter:
    """Instruction count per opcode (``IMAD.WIDE``, ``HMMA.16816.F32.BF16``, ...) of ``get_sass`` text.

    Guard predicates (``@P0``, ``@!UP1``) are skipped; labels and the ``Function:`` line hold no tab."""
    ops = collections.Counter()
    for line in sass.splitlines():
        toks = line.split("\t", 1)[-1].split() if "\t" in line else []
        toks = toks[1:] if toks and toks[0].startswith("@") else toks
        if toks and re.match(r"[A-Z]", toks[0]):
            ops[toks[0].rstrip(";")] += 1
    return ops


def block_constants(constants: dict, arg_names: list[str], prefix: str = "BLOCK") -> dict:
    """The constexprs named ``prefix...`` of an ASTSource's ``constants`` (keys ``(arg index,)``)."""
    consts = {}
    for key, value in (constants or {}).items():
        idx = key[0] if isinstance(key, tuple) and key else key
        name = arg_names[idx] if isinstance(idx, int) and idx < len(arg_names) else str(key)
        if name.startswith(prefix):
            consts[name] = value
    return consts


def kernel_row(kern, arg_names: list[str]) -> dict:
    """Registers, spills, shared bytes, warps, stages and BLOCK constants of one CompiledKernel."""
    md = kern.metadata
    consts = block_constants(getattr(getattr(kern, "src", None), "constants", None), arg_names)
    return dict(
        n_regs=getattr(kern, "n_regs", None),
        n_spills=getattr(kern, "n_spills", None),
        shared=getattr(md, "shared", None),
        warps=getattr(md, "num_warps", None),
        stages=getattr(md, "num_stages", None),
        consts=str(consts)[:200],
    )


def compiled_kernel_stats(jit_fn, with_sass: bool) -> tuple[list[dict], dict]:
    """([kernel_row of every compiled specialization], {label: opcode counts} of the first two).

    ``with_sass`` only on a GPU: the interpreter compiles nothing. Errors are recorded, not raised."""
    stats, hists = [], {}
    try:
        for cache in jit_fn.device_caches.values():
            for kern in list(cache[0].values()):
                row = kernel_row(kern, jit_fn.arg_names)
                stats.append(row)
                if len(hists) < MAX_SASS_KERNELS and with_sass:
                    try:
                        ops = sass_opcodes(kern.asm["sass"]).most_common(MAX_OPCODES)
                        hists[f"kernel{len(hists)} regs{row['n_regs']} {row['consts']}"] = dict(ops)
                    except Exception as e:  # cuobjdump missing or failing: say so in the JSON
                        hists[f"kernel{len(hists)}"] = f"no SASS: {type(e).__name__}: {str(e)[:200]}"
    except Exception as e:  # no device_caches (interpreter) or another Triton layout: recorded
        stats.append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
    return stats, hists

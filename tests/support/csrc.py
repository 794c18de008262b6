"""The C parameter lists of the CPU kernels, read from their sources in ops/cpu/csrc (the ABI tests compare
them with the ctypes declarations and with csrc/replay.cpp's own declarations)."""

import ctypes
import re

from blackmamba.ops.cpu import build as cpu

_C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}
_DEFINITION = re.compile(r"^(?:extern \"C\" )?(void|int|int64_t) (bm_\w+)\(([^)]*)\)\s*\{", re.M)


def c_kind(decl: str) -> str:
    """A C declaration's type as the ABI tests name it: "pointer", "void" or the ctypes class name."""
    decl = " ".join(decl.split())
    if "*" in decl:
        return "pointer"
    base = decl.replace("const ", "").rsplit(" ", 1)[0]
    return _C_TYPES[base].__name__ if base != "void" else "void"


def signature(ret: str, params: str) -> tuple[str, list[str]]:
    args = [p for p in params.split(",") if p.strip() and p.strip() != "void"]
    return c_kind(ret + " r"), [c_kind(p) for p in args]


def c_signatures() -> dict:
    """name → (return kind, parameter kinds) of every kernel defined in csrc/*.cpp."""
    out = {}
    for src in sorted(cpu.CSRC.glob("*.cpp")):
        for ret, name, params in _DEFINITION.findall(src.read_text()):
            out[name] = signature(ret, params)
    return out

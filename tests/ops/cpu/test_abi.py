"""The ctypes declarations of the CPU kernels against their C definitions in ops/csrc.

ctypes converts an argument beyond ``argtypes`` with its default rule and one of the wrong width as declared,
silently: a C ``int`` declared where the function takes an ``int64_t`` stack argument leaves the upper half
of that slot as whatever the stack held (this once made the scan backward's range count garbage, a rare
segfault). So every parameter list is read from the sources and compared, type by type.
"""

import ctypes
import re

from blackmamba.ops.cpu import build as cpu

_C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}
_DEFINITION = re.compile(r"^(?:extern \"C\" )?(void|int|int64_t) (bm_\w+)\(([^)]*)\)\s*\{", re.M)


def _kind(ctype) -> str:
    if ctype is None:
        return "void"
    if ctype is ctypes.c_void_p or (isinstance(ctype, type) and issubclass(ctype, ctypes._Pointer)):
        return "pointer"
    return ctype.__name__


def _c_kind(decl: str) -> str:
    decl = " ".join(decl.split())
    if "*" in decl:
        return "pointer"
    base = decl.replace("const ", "").rsplit(" ", 1)[0]
    return _C_TYPES[base].__name__ if base != "void" else "void"


def c_signatures() -> dict:
    out = {}
    for src in sorted(cpu.CSRC.glob("*.cpp")):
        for ret, name, params in _DEFINITION.findall(src.read_text()):
            args = [p for p in params.split(",") if p.strip() and p.strip() != "void"]
            out[name] = (_c_kind(ret + " r"), [_c_kind(p) for p in args])
    return out


def test_every_kernel_is_declared_with_its_exact_parameter_types():
    c = c_signatures()
    assert len(c) >= 15 and "bm_scan_backward" in c  # the parser found the definitions
    declared = {name: (_kind(res), [_kind(a) for a in args]) for name, (res, args) in cpu.SIGNATURES.items()}
    assert declared == c

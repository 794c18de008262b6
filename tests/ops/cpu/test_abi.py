"""The ctypes declarations of the CPU kernels against their C definitions in ops/csrc.

ctypes converts an argument beyond ``argtypes`` with its default rule and one of the wrong width as declared,
silently: a C ``int`` declared where the function takes an ``int64_t`` stack argument leaves the upper half
of that slot as whatever the stack held (this once made the scan backward's range count garbage, a rare
segfault). So every parameter list is read from the sources and compared, type by type.
"""

import ctypes

from support.csrc import c_signatures

from blackmamba.ops.cpu import build as cpu


def _kind(ctype) -> str:
    if ctype is None:
        return "void"
    if ctype is ctypes.c_void_p or (isinstance(ctype, type) and issubclass(ctype, ctypes._Pointer)):
        return "pointer"
    return ctype.__name__


def test_every_kernel_is_declared_with_its_exact_parameter_types():
    c = c_signatures()
    assert len(c) >= 15 and "bm_scan_backward" in c  # the parser found the definitions
    declared = {name: (_kind(res), [_kind(a) for a in args]) for name, (res, args) in cpu.SIGNATURES.items()}
    assert declared == c

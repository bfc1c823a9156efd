"""The `effconv_kernels` sources as flat remote-code files of an export, so that the exported model runs its Triton
kernels on a machine without effconv (plain transformers with trust_remote_code).

transformers copies a remote-code module and the sibling files it imports as `from .name import ...`; it does not
copy packages. So every module `effconv_kernels/a/b.py` becomes the sibling file `effconv_kernels_a_b.py` (the
package's `__init__.py` becomes `effconv_kernels_bundle.py`; the prefix keeps them clear of other packages, e.g.
PyPI's `kernels`), with its relative imports renamed to match. Imports of triton are wrapped in `try` blocks, which
transformers' import check skips: a machine without triton loads the model and runs the PyTorch path
(modeling/backend.py says so once on CUDA). Not shipped: the MoE kernel's pinned launch configs (JSON beside its
module), so an export's MoE kernel autotunes instead.
"""

from __future__ import annotations

import re
from pathlib import Path

PREFIX = "effconv_kernels"
ROOT_MODULE = f"{PREFIX}_bundle"  # modeling/backend.py imports it as `from .effconv_kernels_bundle import KERNELS`
_RELATIVE = re.compile(r"^(\s*)from\s+(\.+)([\w.]*)\s+import\s+", re.MULTILINE)
_TRITON = re.compile(r"^([ \t]*)(import triton\S*(?: as \w+)?|from triton\S* import [\w, ]+)[ \t]*$")


def _flat_name(parts: tuple[str, ...]) -> str:
    return ROOT_MODULE if not parts else "_".join((PREFIX, *parts))


def _package_dir() -> Path:
    import effconv_kernels

    return Path(effconv_kernels.__file__).resolve().parent


def _rewrite_relative(source: str, package: tuple[str, ...]) -> str:
    def replace(match: re.Match) -> str:
        indent, dots, rest = match.group(1), match.group(2), match.group(3)
        base = package[: len(package) - (len(dots) - 1)] if len(dots) > 1 else package
        target = (*base, *[p for p in rest.split(".") if p])
        return f"{indent}from .{_flat_name(target)} import "

    return _RELATIVE.sub(replace, source)


def _wrap_triton_imports(source: str) -> str:
    out: list[str] = []
    lines = source.split("\n")
    i = 0
    while i < len(lines):
        match = _TRITON.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group(1)
        block = []
        while i < len(lines) and (m := _TRITON.match(lines[i])) and m.group(1) == indent:
            block.append(lines[i].strip())
            i += 1
        out.append(f"{indent}try:  # triton is optional for the model: without it the PyTorch path runs")
        out.extend(f"{indent}    {line}" for line in block)
        out.append(f"{indent}except ImportError:")
        out.append(f"{indent}    raise")
    return "\n".join(out)


def kernel_bundle() -> dict[str, str]:
    """{file name: source} of the flattened kernels."""
    root = _package_dir()
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            if len(parts) > 1:
                continue  # subpackage re-exports: nothing imports them by the package name
            parts = ()
        package = parts[:-1] if parts else ()
        source = _wrap_triton_imports(_rewrite_relative(path.read_text(), package))
        if not parts:
            source += "\n\nimport sys as _sys\n\nKERNELS = _sys.modules[__name__]  # the module itself, for backend.py\n"
        files[f"{_flat_name(parts)}.py"] = source
    return files


def write_kernel_bundle(directory: Path) -> list[str]:
    """Write the flattened kernels into `directory`; returns the file names."""
    files = kernel_bundle()
    for name, source in files.items():
        (Path(directory) / name).write_text(source)
    return sorted(files)

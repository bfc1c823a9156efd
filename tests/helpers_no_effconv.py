"""The start of a `python -c` script that runs as on a machine without effconv: importing effconv or
effconv_kernels fails, so an export must load and run from its own files."""

WITHOUT_EFFCONV = """
import importlib.abc, sys
class NoEffconv(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("effconv", "effconv_kernels"):
            raise ImportError(name)
sys.meta_path.insert(0, NoEffconv())
"""

"""Triton kernels, installed as `physkern.kernels` (setup.py maps this folder there). Each kernel
module has a torch reference beside it.

Why the code below: Hugging Face publishes a PyPI package called `kernels`, which transformers
imports at load time. Whenever Python runs from the repository root (`python -m pytest`,
`python -c ...`), the root is first on sys.path and this folder would be found first as the
top-level package `kernels`, shadowing Hugging Face's and breaking `import transformers`. A
namespace folder (no __init__.py) would not shadow, but setuptools' editable install cannot map a
namespace sub-package (`physkern.kernels` is then not found). So this file, when it is imported
under the top-level name, hands the import over: it loads whatever `kernels` the rest of sys.path
holds (or raises ModuleNotFoundError as if this folder were not there) and puts that module in
sys.modules, which is what the import statement returns. Imported as `physkern.kernels` it does
nothing. tests/test_install.py checks both cases in subprocesses from the repository root.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _hand_over_top_level_import() -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        elsewhere = [p for p in sys.path
                     if not isinstance(p, str) or os.path.abspath(p or os.getcwd()) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ "
                                      "folder is physkern.kernels, not a top-level package)",
                                      name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        spec.loader.exec_module(module)

    _hand_over_top_level_import()

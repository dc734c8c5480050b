"""Build script: maps kernels/ to physkern.kernels and builds physkern._C from csrc/.

The folder is called kernels/ but installs as physkern.kernels: a top-level package named
`kernels` would collide with Hugging Face's package of that name.
"""
import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    """CppExtension on CPU torch; CUDAExtension when torch has CUDA and nvcc is present."""
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources or os.environ.get("PHYSKERN_NO_EXT") == "1":
        return [], {}
    from torch.utils import cpp_extension as ce
    import torch

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = (torch.version.cuda is not None and shutil.which("nvcc") is not None
                 and os.environ.get("PHYSKERN_NO_CUDA") != "1")
    extra = {"cxx": ["-O3", "-fopenmp"]}
    if want_cuda and cuda_sources:
        extra["nvcc"] = ["-O3"]
        ext = ce.CUDAExtension("physkern._C", cpp_sources + cuda_sources,
                               extra_compile_args=extra, define_macros=[("PHYSKERN_WITH_CUDA", "1")],
                               extra_link_args=["-fopenmp"])
    else:
        ext = ce.CppExtension("physkern._C", cpp_sources, extra_compile_args=extra,
                              extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": ce.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=["physkern", "physkern.quant", "physkern.research.analysis", "physkern.commands",
              "physkern.kernels", "physkern.methods", "physkern.research", "physkern.sweeps"],
    package_dir={"physkern.kernels": "kernels"},
    # recipes shipped with the package (physkern.recipe.load_preset, `quantize --preset NAME`)
    package_data={"physkern": ["presets/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

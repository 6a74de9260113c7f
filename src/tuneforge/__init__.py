"""tuneforge: fine-tune pretrained causal language models for your task."""

import logging
import sys
import warnings

# peft still calls a transformers method deprecated in v5; the notice is not for our users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# bitsandbytes logs an optional-kernel notice on import (through peft) that is noise to our users;
# real problems reach them as errors.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class _NoHubKernels:
    """bitsandbytes' CPU backend (imported through peft) asks the Hugging Face hub for a compiled
    kernel when it is imported on a CPU with AVX512-BF16 and the ``kernels`` package is installed
    (transformers pulls it in): a network request at run time, which tuneforge never makes. While
    that one module executes, ``kernels.get_kernel`` refuses, and bitsandbytes keeps its own code
    (it catches the error). Nothing else is touched."""

    MODULE = "bitsandbytes.backends.cpu.ops"

    def find_spec(self, name, path=None, target=None):
        if name != self.MODULE:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _OfflineLoader(spec.loader)
        return spec


class _OfflineLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        try:
            import kernels
        except ImportError:
            return self.loader.exec_module(module)

        def refuse(*args, **kwargs):
            raise RuntimeError("tuneforge fetches no hub kernels at run time")

        fetch, kernels.get_kernel = kernels.get_kernel, refuse
        try:
            return self.loader.exec_module(module)
        finally:
            kernels.get_kernel = fetch


if not any(isinstance(f, _NoHubKernels) for f in sys.meta_path):
    sys.meta_path.insert(0, _NoHubKernels())

__version__ = "0.1.0"

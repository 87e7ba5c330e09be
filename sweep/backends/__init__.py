"""Generation backends, by name (`backend:` in models.yaml).

Each backend is one module with one class implementing `HFModel.generate`; adding one
(vLLM, say) is a new module and a line in `BACKENDS`. Backends import torch and model
code, so they are imported only inside a worker, when a model is loaded: this module
itself imports nothing heavy (the config validates names against it).
"""

from __future__ import annotations

from importlib import import_module

# name -> "module:class", imported on first use
BACKENDS = {
    "transformers": "sweep.backends.transformers:TransformersBackend",
    "compiled": "sweep.backends.compiled:CompiledBackend",
}
DEFAULT_BACKEND = "transformers"


def backend_class(name: str):
    module, cls = BACKENDS[name].split(":")
    return getattr(import_module(module), cls)


def load_backend(spec, settings, device: str):
    """The model of `spec`, loaded by its backend for `device` ("cuda" or "cpu")."""
    return backend_class(spec.backend)(spec, settings, device)

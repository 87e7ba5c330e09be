"""Generation backends, by name (`backend:` in models.yaml).

Each backend is one module with one class implementing `Backend.generate`
(sweep/backends/base.py); adding one is a new module and a line in `BACKENDS`. Backends
import torch and model code, so they are imported only inside a worker, when a model is
loaded: this module itself imports nothing heavy (the config validates names against it,
and each backend's own option checks, `SPEC_CHECKS`, live here for that reason).
"""

from __future__ import annotations

from importlib import import_module

# name -> "module:class", imported on first use
BACKENDS = {
    "transformers": "sweep.backends.transformers:TransformersBackend",
    "compiled": "sweep.backends.compiled:CompiledBackend",
    "server": "sweep.backends.server:ServerBackend",
}
DEFAULT_BACKEND = "transformers"


def backend_class(name: str):
    module, cls = BACKENDS[name].split(":")
    return getattr(import_module(module), cls)


def load_backend(spec, settings, device: str):
    """The model of `spec`, loaded by its backend for `device` ("cuda" or "cpu")."""
    return backend_class(spec.backend)(spec, settings, device)


def _compiled_spec(spec) -> None:
    if spec.gpus > 1:
        raise ValueError("backend compiled runs a model on one GPU (gpus: 1); use backend: transformers for gpus > 1")


def _server_spec(spec) -> None:
    from sweep.backends.server_command import check_server

    check_server(spec.server)


def _in_process_spec(spec) -> None:
    if spec.server is not None:
        raise ValueError(f"server: is for backend: server (this model's backend is {spec.backend})")


# backend -> its own check of a models.yaml entry (ValueError saying what to change)
SPEC_CHECKS = {"transformers": _in_process_spec, "compiled": lambda s: (_in_process_spec(s), _compiled_spec(s)),
               "server": _server_spec}

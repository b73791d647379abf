"""overnight's start-up hook for experiment processes: stdlib only, any Python 3.9+.

Python imports the first `sitecustomize` on sys.path while it starts. overnight puts this
directory first on PYTHONPATH, which hides the interpreter's own sitecustomize (a distro's,
a venv's): so after installing the attestation (when OVERNIGHT_ATTEST_OUT is set; see
_overnight_attest.py) this runs the sitecustomize it hides, whatever happens.
"""

import os
import sys


def _chain() -> None:
    """Run the next `sitecustomize` on sys.path after this directory, as Python would have."""
    import importlib.machinery

    here = os.path.normcase(os.path.dirname(os.path.abspath(__file__)))
    ours = [i for i, p in enumerate(sys.path)
            if os.path.normcase(os.path.abspath(p or os.curdir)) == here]
    rest = sys.path[ours[-1] + 1:] if ours else list(sys.path)
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = type(sys)(spec.name)
    module.__spec__ = spec
    module.__loader__ = spec.loader
    if spec.has_location:
        module.__file__ = spec.origin
        module.__cached__ = spec.cached
    if spec.submodule_search_locations is not None:
        module.__path__ = spec.submodule_search_locations
    module.__package__ = spec.parent
    # The import of `sitecustomize` now in progress ends by taking sys.modules' entry:
    # `import sitecustomize` elsewhere finds the one we hide, as it would without us.
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


try:
    if os.environ.get("OVERNIGHT_ATTEST_OUT"):
        import _overnight_attest

        _overnight_attest.install()
finally:
    _chain()

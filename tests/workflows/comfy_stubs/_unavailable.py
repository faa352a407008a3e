"""Import-time stand-ins: every submodule exists, every attribute raises when it is actually used."""
import importlib.abc
import importlib.machinery
import sys
import types


class Unavailable:
    """A name from a package that is not really installed; usable at import time, raises on use."""

    def __init__(self, name):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a test stub (torchvision/torchaudio are not installed for the "
                           "ComfyUI engine tests)")

    __call__ = _fail

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Unavailable(f"{self._name}.{attr}")

    def __mro_entries__(self, bases):  # `class X(torchvision.Something)` at import time
        return (object,)


def _module_getattr(name):
    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Unavailable(f"{name}.{attr}")
    return __getattr__


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


def install(package):
    """Make ``package``'s submodules importable as stubs and give it a stub ``__getattr__``."""
    sys.meta_path.append(_Finder(package.__name__))
    package.__getattr__ = _module_getattr(package.__name__)

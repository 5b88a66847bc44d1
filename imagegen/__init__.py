"""imagegen: a gRPC serving system for diffusion image models.

Layout: in a source checkout the server's packages sit beside this one (`common/`, `services/`); installed, they
live inside it (`imagegen/common`, `imagegen/services`), so nothing generic lands at the top of site-packages.
Either way they import as `imagegen.common` and `imagegen.services`.
"""

from pathlib import Path

_package = Path(__file__).resolve().parent
if not (_package / "common").is_dir() and (_package.parent / "common" / "__init__.py").is_file():
    # A source checkout (run in place or installed editable): imagegen.common is the checkout's common/.
    __path__.append(str(_package.parent))  # noqa: F821 (the package's module search path)

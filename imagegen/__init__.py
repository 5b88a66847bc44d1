"""imagegen: a gRPC serving system for diffusion image models.

Layout: the server's packages keep their top-level folders in the repository (`common/`, `services/`) and are
reached through `imagegen/common` and `imagegen/services`, committed relative symlinks; so the source tree is the
import tree (`imagegen.common.kernels` is `imagegen/common/kernels.py`, that is `common/kernels.py`), and the
wheel holds the real files under `imagegen/`, nothing generic at the top of site-packages.
"""

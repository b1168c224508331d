"""The one compiled part: the data plane's wire codec (hsm/dataplane/_wire.c).

It runs BatchWrap's per-item loop and reads single Wrap and Unwrap
requests (docs/adr/0001). Everything else is in pyproject.toml. The extension links OpenSSL's
libcrypto (the library CPython's ssl and hashlib modules already load) and
needs its headers to build (Debian: libssl-dev). It is optional: where it
cannot be built, install still succeeds and the data plane runs its Python
path, which is the reference for every result anyway (docs/adr/0001).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "keyquorum.hsm.dataplane._wire",
            sources=["hsm/dataplane/_wire.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=c11"],
            optional=True,
        )
    ]
)

"""Hypothesis profiles for the property tests in ``fuzz/`` (``--hypothesis-profile=NAME``).

Registered here, at the root, because Hypothesis applies the command-line
profile before conftests in subdirectories are loaded.

* ``ci`` (default): a few dozen interleavings, seeded (derandomized), minutes at most;
* ``slow``: like ``ci`` for the real-process-fault test (``-m slow``);
* ``long``: thousands of interleavings, random seeds, for hours;
* ``mutation``: generated interleavings only, for ``python -m fuzz.mutations``.
"""

import pytest
from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
    print_blob=True,
)
settings.register_profile("ci", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("slow", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)
# The mutation check: generated interleavings only (not the pinned @examples),
# so a catch shows the fuzzer finds the bug by itself.
settings.register_profile(
    "mutation",
    max_examples=200,
    derandomize=True,
    phases=[Phase.generate, Phase.shrink],
    database=None,
    **_COMMON,
)

settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=None,
        metavar="N",
        help="override max_examples of the Hypothesis profile (e.g. a shorter long run)",
    )


@pytest.hookimpl(trylast=True)  # after Hypothesis loaded --hypothesis-profile
def pytest_configure(config):
    n = config.getoption("--fuzz-examples")
    if n:
        settings.register_profile("cli-examples", parent=settings.default, max_examples=n)
        settings.load_profile("cli-examples")

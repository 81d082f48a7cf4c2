#!/usr/bin/env bash
# The test command. In a fresh virtual environment (.venv-test, or $FLEXTRON_TEST_VENV):
# install the pinned test dependencies, build a wheel of this checkout and install it,
# then run pytest against the installed package. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FLEXTRON_TEST_VENV:-.venv-test}
rm -rf "$venv" dist-test
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -r requirements-test.txt
echo "building the wheel (the extension too, unless FLEXTRON_SKIP_EXT=1)"
"$py" -m pip wheel -q --no-deps . -w dist-test
"$py" -m pip install -q dist-test/flextron_kernels-*.whl
# Unless the extension was skipped, the tests insist that it was built and installed.
if [ "${FLEXTRON_SKIP_EXT:-0}" = 1 ]; then export FLEXTRON_EXPECT_EXT=0; else export FLEXTRON_EXPECT_EXT=1; fi
# Run from tests/ so that the checkout's source folder cannot shadow the installed package.
cd tests
"../$venv/bin/python" -m pytest -p no:cacheprovider "$@" .
# The pytest-benchmark suites, once each as a smoke test (untimed).
"../$venv/bin/python" -m pytest -p no:cacheprovider -q --benchmark-disable ../benchmarks

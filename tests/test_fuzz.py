"""Bad input, fuzzed: at least 1,000 malformed requests each get a clear error; valid ones keep working.

Runs on the shared hello-world deployment and checks at the end that no worker restarted.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdask import TdaskError

pytestmark = pytest.mark.timeout(900)

DTYPES = [np.float32, np.float64, np.int32, np.int16, np.uint8, np.uint64, np.bool_]
LIMIT = 1 << 20  # per-request size limit set for this test (1 MiB)

bad_arrays = st.one_of(
    st.sampled_from(DTYPES).map(lambda dt: np.arange(5).astype(dt)),  # wrong dtype
    st.integers(0, 3).map(lambda n: np.zeros((n, 2), dtype=np.int64)),  # wrong rank
    st.just(np.array(7, dtype=np.int64)),  # a scalar, not a vector
    st.just(np.zeros((0, 0), dtype=np.int64)),  # empty, wrong shape
    st.just(np.zeros(LIMIT // 8 + 1, dtype=np.int64)),  # oversized
)
non_tensors = st.one_of(st.none(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                        st.lists(st.text(max_size=2), min_size=1, max_size=3))
good = st.integers(0, 50).map(lambda n: np.arange(n, dtype=np.int64))


@st.composite
def malformed(draw):
    kind = draw(st.sampled_from(["dtype", "missing", "extra", "non-tensor", "param", "operator", "version",
                                 "copies-shape"]))
    operator = draw(st.sampled_from(["encoder", "decoder", "encoder_decoder"]))
    inputs = {"input": draw(good)}
    params: dict = {}
    version = None
    if kind == "dtype":
        inputs = {"input": draw(bad_arrays)}
    elif kind == "missing":
        inputs = draw(st.sampled_from([{}, {"inputs": inputs["input"]}, {"INPUT": inputs["input"]}]))
    elif kind == "extra":
        inputs[draw(st.sampled_from(["extra", "input_copies", "x"]))] = draw(good)
        if operator == "encoder_decoder":  # a Python operator may ignore extra inputs: make it otherwise bad
            inputs["input"] = draw(bad_arrays)
    elif kind == "non-tensor":
        inputs = {"input": draw(non_tensors)}
    elif kind == "param":
        params = {"input_copies": draw(st.one_of(st.text(min_size=1, max_size=4).filter(lambda s: not s.isdigit()),
                                                 st.integers(-5, 0), st.floats(allow_nan=True), st.lists(st.integers(),
                                                 min_size=1, max_size=2), st.none()))}
    elif kind == "operator":
        operator = draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in ("encoder", "decoder",
                                                                                     "encoder_decoder")))
    elif kind == "version":
        version = draw(st.integers(2, 100))
    elif kind == "copies-shape":
        operator = "decoder"
        inputs = {"input": np.arange(7, dtype=np.int64)}
        params = {"input_copies": 2}
    return kind, operator, version, inputs, params


def test_a_thousand_malformed_requests_get_clear_errors_and_valid_ones_keep_working(loop, client, session,
                                                                                    hello_world):
    import dask.config

    pids_before = loop.run(lambda: client.run(os.getpid))
    loop.run(lambda: client.run(dask.config.set, {"tdask.replica.max-request-bytes": LIMIT}))
    seen: Counter = Counter()

    async def one(kind, operator, version, inputs, params):
        try:
            op = await session.operator(operator, version)
            await op.infer(inputs, params, timeout=60)
        except TdaskError as e:
            assert str(e).strip(), "an error says what is wrong"
            if kind == "dtype" and isinstance(inputs.get("input"), np.ndarray) and inputs["input"].nbytes > LIMIT:
                assert "limit" in str(e)
            seen[type(e).__name__] += 1
            return
        raise AssertionError(f"{kind} request to {operator} was accepted: {inputs!r:.200} {params!r:.100}")

    async def valid():
        op = await session.operator("encoder_decoder")
        x = np.arange(10, dtype=np.int64)
        out = await op.infer({"input": x})
        assert np.array_equal(out["output"], x)

    with dask.config.set({"tdask.replica.max-request-bytes": LIMIT}):

        @settings(max_examples=1000, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(malformed())
        def check(case):
            loop.run(one(*case), timeout=120)
            seen["malformed"] += 1
            if seen["malformed"] % 50 == 0:
                loop.run(valid())

        check()
    loop.run(lambda: client.run(dask.config.set, {"tdask.replica.max-request-bytes": 268435456}))
    # the same malformed requests at once, interleaved with valid ones
    async def burst():
        await asyncio.gather(*(valid() for _ in range(20)))

    loop.run(burst())
    print("fuzz outcome:", dict(seen))
    assert seen["malformed"] >= 1000
    assert loop.run(lambda: client.run(os.getpid)) == pids_before, "no worker restarted"
    assert {"TritonError", "InvalidRequestError", "OperatorNotFoundError"} <= set(seen), seen

"""Schemathesis against the served OpenAPI schema: generated requests (valid and not),
500 examples per operation, a fixed seed; checks: not_a_server_error (no 5xx),
response_schema_conformance (every response matches its documented schema) and
content_type_conformance."""
import pytest

schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import seed as fixed_seed  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance  # noqa: E402

from perseq.cli import main  # noqa: E402
from perseq.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.slow
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz")
    assert main(["train", "--set", "data.synthetic={n_users: 40, n_items: 40, n_clusters: 4, mean_len: 20, max_len: 40}",
                 "--set", "model.name=gru4rec", "--set", "model.d=8", "--set", "train.epochs=1", "--out", str(out),
                 "--name", "g", "--no-progress"]) == 0
    app = create_app(str(out / "g-s0"), str(out / "state.sqlite"))
    with TestClient(app):  # runs the lifespan: the model is loaded, as in a served app
        yield app


def test_no_5xx_and_every_response_matches_the_schema(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 9
    calls = {}
    for op in operations:
        @given(case=op.as_strategy())
        @fixed_seed(20261205)
        @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            calls[op.label] = calls.get(op.label, 0) + 1
            case.call_and_validate(checks=CHECKS)

        fuzz()
    print(calls)
    # every operation with inputs got its 500 examples (one without, e.g. GET /healthz, has
    # a single distinct request, which hypothesis does not repeat)
    for op in operations:
        if op.body or any(True for _ in op.iter_parameters()):
            assert calls[op.label] >= 500, (op.label, calls[op.label])

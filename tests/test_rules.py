"""Pure rules: templates, output keys, job state transitions, settings and the model registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispatcher.template import TemplateError, placeholders, render
from schemas.errors import ConfigError, ModelError, StaleStateError
from schemas.job import TRANSITIONS, JobStatus, check_transition
from schemas.keys import key_problem
from schemas.models import REGISTRY, resolve_model
from schemas.settings import load_settings


@pytest.mark.parametrize(("template", "names"), [
    ("plain", []), ("{a} and {b c}", ["a", "b c"]), ("{{literal}} {x}", ["x"]), ("{0.__class__}", ["0.__class__"]),
])
def test_placeholders(template: str, names: list[str]) -> None:
    assert placeholders(template) == names


def test_render_never_evaluates_attribute_or_index_syntax() -> None:
    assert render("{a.b}{c[0]}", {"a.b": "1", "c[0]": "2"}) == "12"
    with pytest.raises(TemplateError, match="not a column"):
        render("{a.__class__}", {"a": "x"})


@pytest.mark.parametrize("template", ["{}", "{ }", "{a:>10}", "{a!s}", "{a", "a}"])
def test_malformed_templates(template: str) -> None:
    with pytest.raises(TemplateError):
        placeholders(template)


@pytest.mark.parametrize(("key", "ok"), [
    ("a.png", True), ("Vendor Name/x-1.png", True), ("ünïcode/ключ.png", True), ("a/../b.png", False),
    ("..", False), ("./a.png", False), ("/a.png", False), ("a//b.png", False), ("a\\b.png", False),
    ("a\nb.png", False), ("a\x7fb", False), ("", False), ("a/", False), ("k" * 1025, False), ("é" * 512, True),
    ("é" * 513, False), ("s3:/x.png", False),
])
def test_output_keys_stay_inside_their_prefix(key: str, ok: bool) -> None:
    assert (key_problem(key) is None) is ok


@pytest.mark.parametrize("current", list(JobStatus))
@pytest.mark.parametrize("target", list(JobStatus))
def test_only_listed_transitions_are_allowed(current: JobStatus, target: JobStatus) -> None:
    if target in TRANSITIONS[current]:
        check_transition(current, target)
    else:
        with pytest.raises(StaleStateError):
            check_transition(current, target)


def test_a_succeeded_job_never_moves_again() -> None:
    assert TRANSITIONS[JobStatus.SUCCEEDED] == frozenset()


def test_bad_settings_name_the_variable_and_the_legal_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_DEVICE", "gpu")
    with pytest.raises(ConfigError, match="KILN_DEVICE: Input should be 'auto', 'cuda', 'mps' or 'cpu'; got 'gpu'"):
        load_settings()
    monkeypatch.delenv("KILN_DEVICE")
    with pytest.raises(ConfigError, match="--batch-size: Input should be greater than or equal to 1; got 0"):
        load_settings(batch_size=0)
    with pytest.raises(ConfigError, match="--database-url: must be sqlite:///FILE or postgresql"):
        load_settings(database_url="mysql://x")
    monkeypatch.setenv("KILN_DATABASE_URL", "mysql://x")
    with pytest.raises(ConfigError, match="KILN_DATABASE_URL: must be sqlite:///FILE or postgresql"):
        load_settings()


def test_rediss_urls_check_the_server_certificate_unless_told_otherwise() -> None:
    assert load_settings(broker_url="rediss://h:6380/0").broker_url == "rediss://h:6380/0?ssl_cert_reqs=required"
    assert load_settings(broker_url="rediss://h/0?ssl_ca_certs=/ca.pem").broker_url == \
        "rediss://h/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
    assert load_settings(broker_url="rediss://h/0?ssl_cert_reqs=none").broker_url == "rediss://h/0?ssl_cert_reqs=none"
    assert load_settings(broker_url="redis://h/0").broker_url == "redis://h/0"

def test_registry_names_licences_and_tiny_profiles() -> None:
    assert {n: m.commercial for n, m in REGISTRY.items()} == {
        "klein-4b": True, "klein-9b": False, "klein-base-4b": True, "klein-base-9b": False, "tiny": True}
    tiny9 = resolve_model("tiny:klein-9b")
    assert (tiny9.is_tiny, tiny9.commercial, tiny9.profile, tiny9.default_steps) == (True, False, "klein-9b", 4)
    with pytest.raises(ModelError, match="unknown model 'tiny:tiny'"):
        resolve_model("tiny:tiny")


def test_a_local_copy_of_a_9b_model_keeps_the_9b_licence(tmp_path: Path) -> None:
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline",
                                                           "is_distilled": True}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"num_attention_heads": 32}))
    spec = resolve_model(str(tmp_path))
    assert (spec.commercial, spec.profile, spec.source) == (False, "klein-9b", str(tmp_path.resolve()))

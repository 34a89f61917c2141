"""The one redaction (distrib_face/redact.py): text, structures, registered values, log records, and the
split / restore that lets a config travel redacted through Ray."""

from __future__ import annotations

import io
import json
import logging

import yaml

from distrib_face.redact import (
    REDACTED,
    install_log_redaction,
    redact,
    redact_text,
    register_secrets,
    restore_secrets,
    secret_values,
    split_secrets,
)

CONFIG = {
    "tracking": {"tracking_uri": "https://alice:Pw-url-7781@mlflow.example.com:5000", "experiment": "faces"},
    "deepspeed": {"extra": {"comet": {"enabled": False, "api_key": "Comet-key-5512"}, "upload_token": "tok-90cc1",
                            "steps_per_print": 10}},
    "loss": {"options": {"credentials": {"user": "bob", "password": "Pw-nested-33"}, "easy_margin": True}},
    "data": {"shards": ["s3://bucket/a", "postgresql://u:Pw-list-42@db:5432/x"]},
    "optim": {"lr": 0.1, "num_tokens": 7},
}
SECRETS = ("Pw-url-7781", "Comet-key-5512", "tok-90cc1", "Pw-nested-33", "Pw-list-42")


def test_redact_structure_masks_every_secret_and_keeps_the_rest():
    out = redact(CONFIG)
    assert out["tracking"]["tracking_uri"] == f"https://alice:{REDACTED}@mlflow.example.com:5000"
    assert out["deepspeed"]["extra"]["comet"] == {"enabled": False, "api_key": REDACTED}
    assert out["deepspeed"]["extra"]["upload_token"] == REDACTED
    assert out["deepspeed"]["extra"]["steps_per_print"] == 10
    assert out["loss"]["options"] == {"credentials": REDACTED, "easy_margin": True}
    assert out["data"]["shards"] == ["s3://bucket/a", f"postgresql://u:{REDACTED}@db:5432/x"]
    assert out["optim"] == {"lr": 0.1, "num_tokens": 7}
    assert not any(secret in json.dumps(out) for secret in SECRETS)
    assert redact({"api_key": None, "token": ""}) == {"api_key": None, "token": ""}  # unset stays visibly unset


def test_secret_values_finds_exactly_the_planted_ones():
    # "bob" is under credentials, a secret key: the whole sub-mapping is secret.
    assert secret_values(CONFIG) == {*SECRETS, "bob"}


def test_redact_text_forms():
    cases = {
        "POST https://u:Pw-url-7781@h/api": f"POST https://u:{REDACTED}@h/api",
        '{"api_key": "abc123", "lr": 0.1}': f'{{"api_key": "{REDACTED}", "lr": 0.1}}',
        "comet: enabled=False api_key='abc123' project=None": f"comet: enabled=False api_key='{REDACTED}' project=None",
        "upload_token: abc123\nlr: 0.1": f"upload_token: {REDACTED}\nlr: 0.1",
        "--set deepspeed.extra.secret=abc123 --set optim.lr=1": f"--set deepspeed.extra.secret={REDACTED} --set optim.lr=1",
        "num_tokens=5 keep_last: 3 api_key=None": "num_tokens=5 keep_last: 3 api_key=None",
    }
    for text, expected in cases.items():
        assert redact_text(text) == expected, text


def test_registered_values_are_masked_in_any_format():
    registered = register_secrets({"a": {"password": "Reg-value-8812"}, "short": {"token": "abc"}})
    assert registered == {"Reg-value-8812"}  # under 4 characters: never masked in free text
    text = yaml.safe_dump({"nested": ["x", {"weird name": "prefix Reg-value-8812 suffix"}]})
    assert "Reg-value-8812" not in redact_text(text) and REDACTED in redact_text(text)


def test_split_and_restore_round_trip():
    redacted, secrets = split_secrets(CONFIG)
    assert redacted == redact(CONFIG)
    assert not any(secret in json.dumps(redacted) for secret in SECRETS)
    assert {path for path, _ in secrets} == {
        ("tracking", "tracking_uri"), ("deepspeed", "extra", "comet", "api_key"), ("deepspeed", "extra", "upload_token"),
        ("loss", "options", "credentials"), ("data", "shards", 1),
    }
    before = json.dumps(redacted)
    assert restore_secrets(redacted, secrets) == CONFIG
    assert json.dumps(redacted) == before  # the redacted copy is left as it was
    assert restore_secrets(redacted, []) == redacted and restore_secrets(redacted, []) is not redacted
    with_tuple = {"hosts": ("plain", "https://u:Pw-tuple-55@h")}
    assert restore_secrets(*split_secrets(with_tuple)) == with_tuple


def test_log_records_are_redacted_whatever_handler_prints_them():
    install_log_redaction({"monitor": {"api_key": "Log-key-4471"}})
    # A library logger with its own handler that does not propagate, as DeepSpeed's.
    stream = io.StringIO()
    library = logging.getLogger("test_redact.library")
    library.propagate = False
    library.setLevel(logging.INFO)
    handler = logging.StreamHandler(stream)
    library.addHandler(handler)
    try:
        library.info("config: %s", {"monitor": {"api_key": "Log-key-4471"}, "lr": 0.1})
        library.info("json = %s", json.dumps({"nested": {"value": "Log-key-4471"}}))
        library.warning("API request to http://bob:Pw-log-93@127.0.0.1:5000/api failed")
        try:
            raise RuntimeError("cannot reach https://bob:Pw-exc-27@host/ with Log-key-4471")
        except RuntimeError:
            library.exception("failed")
    finally:
        library.removeHandler(handler)
    text = stream.getvalue()
    for secret in ("Log-key-4471", "Pw-log-93", "Pw-exc-27"):
        assert secret not in text, text
    assert text.count(REDACTED) >= 5 and "Traceback" in text and "'lr': 0.1" in text

"""Secrets never land in a store: storage options and credentials inside URLs stay out of attrs, arrays, summary."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import config_from_dict
from pipeline.run import run
from pipeline.secrets import redact
from helpers.runs import manifest, values

SECRETS = ("AKIAEXAMPLEKEY42", "hunter2-secret-value", "s3cr3t-pw", "SIGNATURE0123")


def all_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


def test_urls_are_recorded_without_credentials():
    assert redact("https://user:s3cr3t-pw@host/w.pt") == "https://***@host/w.pt"
    assert redact("s3://bucket/a.png?X-Amz-Signature=SIGNATURE0123&X-Amz-Date=1") == \
        "s3://bucket/a.png?X-Amz-Signature=***&X-Amz-Date=1"
    assert redact("data/images/cat 1.png") == "data/images/cat 1.png"
    config = config_from_dict({"dataset": "https://me:s3cr3t-pw@host/manifest.csv", "store": "s.zarr",
                               "model": {"name": "resnet18", "weights": "https://x/w.pt?token=SIGNATURE0123"}})
    text = repr(config.identity())
    assert not any(secret in text for secret in SECRETS) and "host/manifest.csv" in text


def test_storage_options_and_url_credentials_never_reach_the_store(ray_cluster, tmp_path):
    bad = "https://me:s3cr3t-pw@127.0.0.1:9/missing.png?X-Amz-Signature=SIGNATURE0123"
    source = manifest(tmp_path, 3, extra=[(bad, "1")])
    options = {"key": SECRETS[0], "secret": SECRETS[1]}
    store = f"file://{tmp_path}/run.zarr"
    settings = values(tmp_path, source, store=store, storage_options=options)
    settings["dataset"]["storage_options"] = options
    summary = run(config_from_dict(settings))
    assert summary.groups["ab"]["ok"] == 3 and summary.groups["ab"]["failed"] == 1  # the URL row failed, recorded
    stored = all_bytes(tmp_path / "run.zarr")
    assert b"127.0.0.1:9/missing.png" in stored  # the row is there, its path masked
    for secret in SECRETS:
        assert secret.encode() not in stored and secret not in summary.format()

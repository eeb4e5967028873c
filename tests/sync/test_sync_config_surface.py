"""The ``[sync.*]`` tables as an operator writes them for a real box: a typo, a wrong shape or a
file that is not there is refused when the agent (and ``annotator doctor``) starts, naming the
key and what to write, not found at the first upload, pull or trained bundle hours later."""
from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.doctor import FAIL, OK, check_sync
from sync.agent import validated_settings
from sync.config import load_sync_config
from sync.errors import SyncConfigError

TRAINING = """
[sync.models.registry]
root = "registry"
[sync.training]
role_arn = "arn:aws:iam::123456789012:role/t"
image_uri = "123456789012.dkr.ecr.eu-central-1.amazonaws.com/annotator:train"
input_s3 = "s3://edge-training/datasets"
output_s3 = "s3://edge-training/jobs"
"""
GT_JOB = """
[sync.target]
kind = "s3"
bucket = "edge-review"
[sync.review]
kind = "groundtruth"
[sync.review.groundtruth.job]
role_arn = "arn:aws:iam::123456789012:role/GroundTruthRole"
workteam_arn = "arn:aws:sagemaker:eu-central-1:123456789012:workteam/private-crowd/cabin"
ui_template_s3_uri = "s3://edge-review/templates/keypoints.liquid.html"
"""


def _write(tmp_path: Path, body: str) -> Path:
    config = tmp_path / "annotator.toml"
    config.write_text('[store]\nroot = "store"\n[sync]\nappliance_id = "box-1"\n' + body)
    return config


def _refused(tmp_path: Path, body: str) -> str:
    """The message the agent starts with (load, then every task's settings), as build_agent and
    doctor's sync check run them."""
    with pytest.raises(SyncConfigError) as info:
        validated_settings(load_sync_config(_write(tmp_path, body), env={}), env={})
    return str(info.value)


@pytest.mark.parametrize("body, words", [
    ("batch_sise = 5\n", r"sync.batch_sise: unknown key \(from .*annotator.toml\); did you mean 'batch_size'\?"),
    ("[sync.modles]\nmargin = 0.1\n", r"\[sync.modles\]: unknown table .*did you mean '\[sync.models\]'\?"),
    ("[sync.target]\nbuckett = 'b'\n", r"sync.target.buckett: unknown key .*did you mean 'bucket'\?"),
    ("[sync.review]\nkindd = 'none'\n", r"sync.review.kindd: unknown key \(from .*annotator.toml\); did you mean 'kind'\?"),
    ("[sync.models]\npublic_kye = 'k.pub'\n", r"sync.models.public_kye: unknown key \(from .*annotator.toml\); did you mean 'public_key'\?"),
])
def test_a_misspelt_key_or_table_gets_a_did_you_mean(tmp_path: Path, body: str, words: str) -> None:
    with pytest.raises(SyncConfigError, match=words):
        validated_settings(load_sync_config(_write(tmp_path, body), env={}), env={})


@pytest.mark.parametrize("bucket, words", [
    ("s3://edge-review", "sync.target.bucket: expected a bucket name, not a URL: bucket = 'edge-review', got"),
    ("s3://edge-review/edge/", "bucket = 'edge-review' and prefix = 'edge'"),
    ("edge-review/edge", "sync.target.bucket: expected a bucket name without '/': bucket = 'edge-review' and "
                         "prefix = 'edge'"),
])
def test_a_bucket_written_as_a_url_is_refused_at_start(tmp_path: Path, bucket: str, words: str) -> None:
    # HEAD: taken; the agent stopped at its first HeadBucket with botocore's "Invalid bucket name".
    assert words in _refused(tmp_path, f'[sync.target]\nkind = "s3"\nbucket = "{bucket}"\n')


@pytest.mark.parametrize("body, key", [
    ('[sync.target]\nkind = "s3"\nbucket = "b"\nendpoint_url = "127.0.0.1:8333"\n', "sync.target.endpoint_url"),
    ('[sync.target]\nkind = "s3"\nbucket = "b"\nendpoint_url = "htp://127.0.0.1:8333"\n', "sync.target.endpoint_url"),
    ('[sync.models.registry]\nkind = "s3"\nbucket = "b"\nendpoint_url = "127.0.0.1:8333"\n',
     "sync.models.registry.endpoint_url"),
    (TRAINING + 'endpoint_url = "localhost:5000"\n', "sync.training.endpoint_url"),
])
def test_an_endpoint_without_its_scheme_is_refused_at_start(tmp_path: Path, body: str, key: str) -> None:
    # HEAD: "error: Invalid endpoint: 127.0.0.1:8333" naming no key (or, with htp://, retried for ever).
    assert f"{key}: expected http(s)://host[:port]" in _refused(tmp_path, body)


def test_the_registry_is_held_to_the_targets_types(tmp_path: Path) -> None:
    # HEAD: any type was taken ({k: object}); the string reached `<< 20` at the first pull.
    body = '[sync.models.registry]\nkind = "s3"\nbucket = "edge-models"\nmultipart_threshold_mb = "16"\n'
    assert "sync.models.registry.multipart_threshold_mb: expected an integer" in _refused(tmp_path, body)
    body = '[sync.models.registry]\nkind = "s3"\nbucket = "s3://edge-models"\n'
    assert "sync.models.registry.bucket: expected a bucket name, not a URL" in _refused(tmp_path, body)


def test_a_reload_address_without_a_port_is_refused(tmp_path: Path) -> None:
    # HEAD: taken; the agent started and the reload after the first pulled bundle failed.
    body = '[sync.models]\ndaemon = "127.0.0.1"\n[sync.models.registry]\nroot = "registry"\n'
    assert "sync.models.daemon: expected host:port" in _refused(tmp_path, body)


def test_a_missing_public_key_fails_doctor_as_it_fails_the_agent(tmp_path: Path) -> None:
    # HEAD: doctor said OK (its check builds no puller); `annotator sync` then refused to start.
    config = _write(tmp_path, '[sync.models]\npublic_key = "registry.pub"\n[sync.models.registry]\nroot = "r"\n')
    check = check_sync(config, {})
    assert check.level == FAIL and check.detail.startswith("sync.models.public_key: cannot read ")
    assert str(tmp_path / "registry.pub") in check.detail
    key = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "registry.pub").write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    assert check_sync(config, {}).detail.startswith("sync.models.registry: model registry ")  # not made yet
    (tmp_path / "r").mkdir()
    assert check_sync(config, {}).level == OK



def test_dataset_commands_run_where_the_public_key_cannot_be_read(tmp_path: Path) -> None:
    """`annotator dataset status` uses no key: it ran with a copy of the config where the key is
    not (review of the change: reading the key with the settings refused it, exit 2)."""
    import subprocess
    import sys

    from service.store import Store

    config = _write(tmp_path, '[sync.models]\npublic_key = "registry.pub"\n')
    Store(tmp_path / "store").close()
    done = subprocess.run([sys.executable, "-m", "service.cli", "dataset", "status", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "images 0" in done.stdout


def test_the_training_sign_key_is_read_at_start(tmp_path: Path) -> None:
    # HEAD: read only to sign the first trained bundle, after a paid job had run for hours.
    body = TRAINING + 'sign_key = "registry.key"\n'
    assert "sync.training.sign_key: " in _refused(tmp_path, body) and "registry.key" in _refused(tmp_path, body)
    private = Ed25519PrivateKey.generate()
    # The public half where the private key belongs: refused too.
    (tmp_path / "registry.key").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert "sync.training.sign_key: " in _refused(tmp_path, body)
    (tmp_path / "registry.key").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    training = validated_settings(load_sync_config(_write(tmp_path, body), env={}), env={})[2]
    assert training.sign_key == tmp_path / "registry.key"


@pytest.mark.parametrize("timeout", ["0", "-1"])
def test_a_label_studio_timeout_must_be_positive(tmp_path: Path, timeout: str) -> None:
    # HEAD: 0 failed every request "Operation now in progress", -1 with a ValueError, each pass.
    body = (f'[sync.review]\nkind = "labelstudio"\n[sync.review.labelstudio]\nurl = "http://127.0.0.1:8080"\n'
            f'token = "abcdefgh"\ndocument_root = "."\ntimeout = {timeout}\n')
    assert "sync.review.labelstudio.timeout: expected a number of seconds > 0" in _refused(tmp_path, body)


@pytest.mark.parametrize("line, words", [
    ('ui_template_s3_uri = "s3:/edge-review/templates/k.html"', "job.ui_template_s3_uri: expected s3://bucket/key"),
    ('label_category_config_s3_uri = "edge-review/labels.json"', "job.label_category_config_s3_uri: expected s3://"),
    ('pre_lambda_arn = "edge-pre"', "job.pre_lambda_arn: expected an ARN"),
    ('workers_per_object = 0', "job.workers_per_object: expected >= 1"),
    ('task_time_limit_s = 10', "job.task_time_limit_s: expected >= 30"),
])
def test_labeling_job_uris_and_arns_are_checked_at_start(tmp_path: Path, line: str, words: str) -> None:
    # HEAD: taken; CreateLabelingJob refused it at the first batch and the agent stopped.
    body = GT_JOB.replace('ui_template_s3_uri = "s3://edge-review/templates/keypoints.liquid.html"\n', "") \
        if line.startswith("ui_template") else GT_JOB
    assert words in _refused(tmp_path, body + line + "\n")


def test_the_example_job_table_passes(tmp_path: Path) -> None:
    review = validated_settings(load_sync_config(_write(tmp_path, GT_JOB), env={}), env={})[0]
    assert review.groundtruth is not None and review.groundtruth.job is not None

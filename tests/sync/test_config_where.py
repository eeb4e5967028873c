"""Every ``[sync.*]`` error says where the value came from, as the daemon's ``[server]`` ones do:
the config file (``(from /etc/annotator/annotator.toml)``), the environment variable (the Label
Studio token, ``ANNOTATOR_STORE__ROOT``) or the command line. HEAD named the key only, except
in ``[sync]`` and ``[sync.target]``: on a box with several configs, or one named by
``ANNOTATOR_CONFIG`` in a unit file, the operator had to find which file the agent had read."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.doctor import FAIL, check_sync
from sync.agent import validated_settings
from sync.config import load_sync_config
from sync.errors import SyncConfigError
from sync.pull_settings import settings_from

ROOT = Path(__file__).resolve().parents[2]
LS = '[sync.review]\nkind = "labelstudio"\n[sync.review.labelstudio]\nurl = "http://127.0.0.1:8080"\n'
GT_JOB = ('[sync.target]\nkind = "s3"\nbucket = "edge-review"\n[sync.review]\nkind = "groundtruth"\n'
          '[sync.review.groundtruth.job]\nrole_arn = "arn:aws:iam::123456789012:role/GroundTruthRole"\n'
          'workteam_arn = "arn:aws:sagemaker:eu-central-1:123456789012:workteam/private-crowd/cabin"\n'
          'ui_template_s3_uri = "s3://edge-review/templates/keypoints.liquid.html"\n')
TRAINING = ('[sync.models.registry]\nroot = "registry"\n[sync.training]\n'
            'role_arn = "arn:aws:iam::123456789012:role/t"\n'
            'image_uri = "123456789012.dkr.ecr.eu-central-1.amazonaws.com/annotator:train"\n'
            'input_s3 = "s3://edge-training/datasets"\noutput_s3 = "s3://edge-training/jobs"\n')


def _write(tmp_path: Path, body: str) -> Path:
    config = tmp_path / "annotator.toml"
    config.write_text('[store]\nroot = "store"\n[sync]\nappliance_id = "box-1"\n' + body)
    return config


def _refused(config: Path, env: dict[str, str] | None = None) -> str:
    """The agent's start-up checks (``build_agent`` and doctor run these)."""
    env = env or {}
    with pytest.raises(SyncConfigError) as info:
        validated_settings(load_sync_config(config, env=env), env=env)
    return str(info.value)


@pytest.mark.parametrize("body, key", [
    ('[sync.review]\nkind = "grondtruth"\n', "sync.review.kind"),
    ('[sync.review]\ncollect_interval = -1\n', "sync.review.collect_interval"),
    ('[sync.review]\nkindd = "none"\n', "sync.review.kindd"),
    ('[sync.review.labelstudio]\nurl = 5\n', "sync.review.labelstudio.url"),
    ('[sync.review]\ngroundtruth = 3\n', "sync.review.groundtruth"),
    ('[sync.review]\nkind = "labelstudio"\n[sync.review.labelstudio]\nurl = "127.0.0.1:8080"\n',
     "sync.review.labelstudio.url"),
    (LS + 'token = "0123456789abcdef"\ntimeout = 0\n', "sync.review.labelstudio.timeout"),
    (LS, "sync.review.labelstudio.token"),
    (LS + 'token = "0123456789abcdef"\ndocument_root = "/nowhere/else"\n', "sync.review.labelstudio.document_root"),
    (GT_JOB.replace('role_arn = "arn:aws:iam::123456789012:role/GroundTruthRole"\n', ""),
     "sync.review.groundtruth.job.role_arn"),
    (GT_JOB.replace('kind = "s3"\nbucket = "edge-review"\n', ""), "sync.review.groundtruth.job"),
    (GT_JOB + 'label_category_config_s3_uri = "s3:/edge/x.json"\n',
     "sync.review.groundtruth.job.label_category_config_s3_uri"),
    (GT_JOB + 'pre_lambda_arn = "lambda-name"\n', "sync.review.groundtruth.job.pre_lambda_arn"),
    (GT_JOB + 'workers_per_object = 0\n', "sync.review.groundtruth.job.workers_per_object"),
    (GT_JOB + 'job_prefix = "' + "x" * 60 + '"\n', "sync.review.groundtruth.job.job_prefix"),
    (GT_JOB + 'output_s3_path = "s3://edge-review/elsewhere"\n', "sync.review.groundtruth.job.output_s3_path"),
    (GT_JOB.replace('[sync.review.groundtruth.job]', '[sync.review.groundtruth]\noutput_prefix = "/"\n'
                    '[sync.review.groundtruth.job]'), "sync.review.groundtruth.output_prefix"),
    ('[sync.dataset]\nholdout_fraction = 2\n', "sync.dataset.holdout_fraction"),
    ('[sync.dataset]\nroot = 3\n', "sync.dataset.root"),
    ('[sync.models]\nmargin = 2.0\n', "sync.models.margin"),
    ('[sync.models]\nmin_holdout = 0\n', "sync.models.min_holdout"),
    ('[sync.models]\npoll_interval = -1\n', "sync.models.poll_interval"),
    ('[sync.models]\ndaemon = "127.0.0.1"\n', "sync.models.daemon"),
    ('[sync.models]\npublic_key = "missing.pub"\n', "sync.models.public_key"),
    ('[sync.models.registry]\nkind = "local"\n', "sync.models.registry.root"),
    ('[sync.models.registry]\nkind = "s3"\nbucket = "s3://b/x"\n', "sync.models.registry.bucket"),
    ('[sync.models.registry]\nmultipart_threshold_mb = "16"\n', "sync.models.registry.multipart_threshold_mb"),
    (TRAINING.replace('role_arn = "arn:aws:iam::123456789012:role/t"\n', ""), "sync.training.role_arn"),
    (TRAINING.replace("s3://edge-training/jobs", "edge-training/jobs"), "sync.training.output_s3"),
    (TRAINING + "volume_gb = 0\n", "sync.training.volume_gb"),
    (TRAINING + "propagate = 99\n", "sync.training.propagate"),
    (TRAINING + "poll_interval = -1\n", "sync.training.poll_interval"),
    (TRAINING + 'endpoint_url = "127.0.0.1:9000"\n', "sync.training.endpoint_url"),
    (TRAINING + 'sign_key = "missing.key"\n', "sync.training.sign_key"),
    (TRAINING + "[sync.training.hyperparameters]\nepochz = 3\n", "sync.training.hyperparameters"),
    (TRAINING + "[sync.training.hyperparameters.nested]\na = 1\n", "sync.training.hyperparameters.nested"),
    (TRAINING + "instance_typo = 'x'\n", "sync.training.instance_typo"),
    (TRAINING.replace('[sync.models.registry]\nroot = "registry"\n', ""), "sync.training"),
])
def test_every_sync_table_error_names_the_file(tmp_path: Path, body: str, key: str) -> None:
    config = _write(tmp_path, body)
    message = _refused(config)
    assert message.startswith(key + ":"), message
    assert f"(from {config})" in message, message


def test_a_token_or_store_root_from_the_environment_is_named_by_its_variable(tmp_path: Path) -> None:
    """The Label Studio token and the store root may come from the environment: the message says
    which variable, and still names the file for the value read there. A short token read from
    the file names the file."""
    config = _write(tmp_path, LS + 'document_root = "docs"\n')
    (tmp_path / "docs").mkdir()
    message = _refused(config, env={"ANNOTATOR_LABEL_STUDIO_TOKEN": "abc"})
    assert "token: too short (3 characters, from ANNOTATOR_LABEL_STUDIO_TOKEN)" in message
    elsewhere = str(tmp_path / "elsewhere")
    message = _refused(config, env={"ANNOTATOR_LABEL_STUDIO_TOKEN": "0123456789abcdef",
                                    "ANNOTATOR_STORE__ROOT": elsewhere})
    assert f"the store {elsewhere} (store.root, from environment ANNOTATOR_STORE__ROOT) must lie under it" in message
    assert message.endswith(f"(from {config})"), message
    short = _write(tmp_path, LS + 'token = "abc"\n')
    assert f"token: too short (3 characters, from {short})" in _refused(short)


def test_a_command_line_value_is_named_so(tmp_path: Path) -> None:
    """``dataset`` and ``models`` commands override the tables with options: a bad option is the
    command line's, not the file's."""
    with pytest.raises(SyncConfigError, match=r"sync.models.margin: expected 0..1, got 3.0 \(from the command line\)"):
        settings_from(tmp_path, {}, tmp_path, {"margin": 3.0}, source=f"from {tmp_path / 'annotator.toml'}")


def test_the_real_agent_and_doctor_name_the_file(tmp_path: Path) -> None:
    """``annotator sync --once`` exits 2 with the one line; doctor's sync check says the same."""
    config = _write(tmp_path, '[sync.models]\nmargin = 2.0\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ANNOTATOR_CONFIG": ""}
    run = subprocess.run([sys.executable, "-m", "service.cli", "sync", "--config", str(config), "--once"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"sync.models.margin: expected 0..1, got 2.0 (from {config})" in run.stderr
    check = check_sync(config, {})
    assert check.level == FAIL and f"(from {config})" in check.detail

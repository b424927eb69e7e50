"""An S3 bucket as the shared DVC remote: docs/scale-out.md's two machines, through the S3 API.

moto's S3 server stands in for the bucket, on a free port of 127.0.0.1 and with authentication
on; DVC and its S3 client are the real ones, so a wrong key and a missing bucket fail as they
would against AWS.
"""

import hashlib
import json
import logging
import os
import re
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer
from pipeline_helpers import make_project, run, stages_run

pytestmark = pytest.mark.pipeline

BUCKET = "team-cache"
REMOTE = f"s3://{BUCKET}/fashion-mixer"
WRONG_KEY = r"Forbidden|SignatureDoesNotMatch"  # a HEAD's answer has no body: only the status
NO_BUCKET = r"NoSuchBucket"
STUDIES = {"final": {"final": "final model"}}
ALLOW_S3 = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}


def moto_api(endpoint: str, action: str, body: str = "") -> dict:
    """POST to moto's own API; `reset-auth` sets its INITIAL_NO_AUTH_ACTION_COUNT."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/{action}",
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},  # moto reads the body as is, not as a form
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture
def s3(monkeypatch, tmp_path) -> str:
    """moto's S3 server with one bucket, and the keys of a user allowed to use it in the
    environment that `run` gives DVC; every request after the setup must be signed by a known
    key (moto accepts any key until authentication is on). Yields the endpoint URL."""
    monkeypatch.setattr(logging.getLogger("werkzeug"), "level", logging.WARNING)  # per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        admin = {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup",
        }
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="team")
        iam.put_user_policy(UserName="team", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3))
        key = iam.create_access_key(UserName="team")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        previous = moto_api(endpoint, "reset-auth", "0")["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
        try:
            # only these credentials: none from the machine's own AWS profile or config
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
            monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
            monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
            monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
            monkeypatch.setenv("NO_PROXY", host)
            monkeypatch.setenv("no_proxy", host)
            yield endpoint
        finally:
            moto_api(endpoint, "reset-auth", previous)
            moto_api(endpoint, "reset")  # frees the pushed objects
    finally:
        server.stop()


def fingerprint(project: Path) -> dict[str, str]:
    """MD5 of every file of the project but git's and DVC's scratch files."""
    skip = (project / ".git", project / ".dvc" / "tmp", project / ".dvc" / "config.local")
    return {
        str(path.relative_to(project)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(project.rglob("*"))
        if path.is_file() and not any(path.is_relative_to(s) for s in skip)
    }


def cause_line(project: Path, fault: str, *args: str) -> str:
    """The one ERROR line saying why the remote refused a DVC command that must fail.

    Besides it, DVC prints a line per object it could not transfer (each must name the same
    fault) and may sum up ("failed to pull data from the cloud - ..."); no traceback.
    """
    proc = run(project, *args, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    per_object = [line for line in errors if line.startswith("ERROR: failed to transfer '")]
    assert all(re.search(fault, line) for line in per_object), output
    summary = re.compile(r"ERROR: failed to (pull|push|fetch) data from the cloud - \d+ files")
    rest = [line for line in errors if line not in per_object and not summary.match(line)]
    assert len(rest) == 1 and re.search(fault, rest[0]), output
    return rest[0]


def local_remote_config(project: Path, **options: str) -> None:
    """Options of the remote in .dvc/config.local, as `dvc remote modify --local` writes them."""
    lines = "".join(f"    {name} = {value}\n" for name, value in options.items())
    (project / ".dvc" / "config.local").write_text(f"['remote \"shared\"']\n{lines}")


def refused(project: Path, command: str) -> list[str]:
    """`command` fails with a wrong secret key, then with a missing bucket, and changes no file
    of the project; returns both cause lines."""
    before = fingerprint(project)
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    local_remote_config(project, access_key_id=key_id, secret_access_key="wrong")
    wrong_key = cause_line(project, WRONG_KEY, *command.split())
    local_remote_config(project, url=f"s3://no-{BUCKET}/fashion-mixer")
    no_bucket = cause_line(project, NO_BUCKET, *command.split())
    (project / ".dvc" / "config.local").unlink()
    assert fingerprint(project) == before
    return [wrong_key, no_bucket]


def test_results_are_shared_through_an_s3_bucket(s3, tmp_path, fashion_mnist):
    """Machine A trains and pushes to the bucket; machine B (a clone) pulls and trains nothing;
    a wrong key or a missing bucket fails with the remote's reason and costs nothing local."""
    a = make_project(tmp_path / "machine-a", fashion_mnist, runs={"final": {}}, studies=STUDIES)
    run(a, "dvc", "remote", "add", "-d", "shared", REMOTE)
    run(a, "dvc", "remote", "modify", "shared", "endpointurl", s3)
    run(a, "dvc", "repro")
    run(a, "git", "add", "-A")
    run(a, "git", "commit", "-qm", "repro, and the team's S3 remote")
    run(a, "dvc", "push")  # the committed results
    run(a, "dvc", "exp", "run", "-S", "lr=0.003", "--name", "trained-on-a")
    metrics_a = (a / "results" / "metrics.json").read_text()
    run(a, "dvc", "push", "--run-cache")  # the experiment's outputs and every run record
    print(*refused(a, "dvc push --run-cache"), sep="\n")
    assert "up to date" in run(a, "dvc", "status").stdout

    b = tmp_path / "machine-b"
    run(tmp_path, "git", "clone", "-q", str(a), str(b))
    print(*refused(b, "dvc pull"), sep="\n")
    run(b, "dvc", "pull")
    repro = run(b, "dvc", "repro")
    assert stages_run(repro.stdout) == set(), repro.stdout

    exp = run(b, "dvc", "exp", "run", "--pull", "-S", "lr=0.003")
    locked = yaml.safe_load((b / "dvc.lock").read_text())["stages"]
    trained = [s for s in locked if s.startswith(("train@", "evaluate@"))]
    assert trained, exp.stdout
    for stage in trained:
        assert f"Stage '{stage}' is cached - skipping run" in exp.stdout, exp.stdout
    assert not set(trained) & stages_run(exp.stdout), exp.stdout
    assert (b / "results" / "metrics.json").read_text() == metrics_a

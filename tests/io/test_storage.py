"""`dpsynth.io` object storage (`s3`, `cache`, `published`, `work`) against a real S3
server on loopback (moto's, see the `s3` fixture): URIs, atomic publish (a reader never sees a half-written output, even
when the writer is killed), verified and cached reads, multipart transfers,
retries, conditional writes, and errors that name the URI and the fix."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpsynth.config import StorageConfig
from dpsynth.errors import InputError
from dpsynth.io import cache, published, s3 as s3_io, work as work_io


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _make(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _keys(s3, prefix: str = "") -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


V1 = {"manifest.json": b'{"v": 1}', "shard-00000.npz": b"a" * 1000, "sub/extra.txt": b"old"}
V2 = {"manifest.json": b'{"v": 2}', "shard-00000.npz": b"b" * 2000}


# --------------------------------------------------------------------------- URIs


def test_uris_parse_and_work_locations() -> None:
    uri = s3_io.S3Uri.parse("s3://my-bucket/a/b/")
    assert (uri.bucket, uri.key, uri.name) == ("my-bucket", "a/b", "b")
    assert str(uri) == "s3://my-bucket/a/b"
    assert str(uri.child("x/y.json")) == "s3://my-bucket/a/b/x/y.json"
    assert s3_io.is_s3("s3://b/k") and not s3_io.is_s3(Path("s3://b/k"))
    assert work_io.work_location("s3://bkt/art/finetune") == "s3://bkt/art/.work/finetune"
    assert work_io.work_location("s3://bkt/finetune") == "s3://bkt/.work/finetune"
    assert work_io.work_location(Path("art/sample")) == Path("art/.work/sample")
    for bad in ("s3://", "s3://B_ad/k", "s3://ok-bucket//k", "http://x/y"):
        with pytest.raises(InputError, match="s3://"):
            s3_io.S3Uri.parse(bad)
    with pytest.raises(InputError, match="needs a key under the bucket"):
        work_io.work_location("s3://bkt")


def test_local_paths_pass_through(tmp_path: Path) -> None:
    with published.local_input(tmp_path) as got:
        assert got == tmp_path
    with work_io.publish(tmp_path / "out") as staged:
        out = staged.path
        assert out == tmp_path / "out"  # the stage's own atomic_dir publishes it
    assert cache.fetch(str(tmp_path)) == tmp_path


# --------------------------------------------------------------------------- publish and read


def test_publish_then_read_back_verified(s3, tmp_path: Path) -> None:
    uri = s3.uri("art/prepare")
    with work_io.publish(uri) as staged:
        out = staged.path
        assert not out.exists()  # like a local target: the stage creates it
        _make(out, V1)
    assert _keys(s3, "art/") == sorted(f"art/prepare/{k}" for k in [*V1, published.MARKER])
    marker = json.loads(s3.client.get_object(Bucket=s3.bucket,
                                             Key=f"art/prepare/{published.MARKER}")["Body"].read())
    assert {f["path"]: f["sha256"] for f in marker["files"]} == {
        k: hashlib.sha256(v).hexdigest() for k, v in V1.items()}
    with published.local_input(uri) as local:
        assert _tree(local) == V1
    # cached by the marker's content hash: no object is read again
    s3.client.delete_object(Bucket=s3.bucket, Key="art/prepare/shard-00000.npz")
    with published.local_input(uri) as again:
        assert again == local and _tree(again) == V1


def test_a_stage_that_writes_nothing_publishes_nothing(s3) -> None:
    with work_io.publish(s3.uri("art/sample")):
        pass  # e.g. a non-zero rank, or a run stopped early
    assert _keys(s3) == []


def test_failed_stage_publishes_nothing_and_leaves_no_staging(s3, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with work_io.publish(s3.uri("art/x")) as staged:
            out = staged.path
            _make(out, V1)
            raise RuntimeError("stage failed")
    assert _keys(s3) == []
    assert list((cache.cache_root() / "staging").iterdir()) == []


def test_republish_replaces_the_whole_output(s3) -> None:
    uri = s3.uri("out")
    for files in (V1, V2):
        with work_io.publish(uri) as staged:
            out = staged.path
            _make(out, files)
    assert _keys(s3) == sorted(f"out/{k}" for k in [*V2, published.MARKER])  # stale files gone
    with published.local_input(uri) as local:
        assert _tree(local) == V2


def test_reader_refuses_a_prefix_without_marker(s3) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key="half/manifest.json", Body=b"{}")
    with pytest.raises(InputError, match=rf"s3://{s3.bucket}/half: no _SUCCESS.json, so not a "
                                         "complete output"):
        published.download_published(s3.uri("half"))
    with pytest.raises(InputError, match="nothing there"):
        published.download_published(s3.uri("never-written"))


def test_reader_detects_a_changed_file(s3) -> None:
    with work_io.publish(s3.uri("out")) as staged:
        out = staged.path
        _make(out, V1)
    s3.client.put_object(Bucket=s3.bucket, Key="out/shard-00000.npz", Body=b"x" * 1000)
    with pytest.raises(InputError, match="shard-00000.npz: sha256 differs from _SUCCESS.json"):
        published.download_published(s3.uri("out"))
    assert not list((cache.cache_root() / "inputs").iterdir())  # nothing half-cached


def test_marker_paths_cannot_escape_the_cache(s3) -> None:
    bad = {"schema": 1, "files": [{"path": "../../evil", "size": 1, "sha256": "0" * 64}]}
    s3.client.put_object(Bucket=s3.bucket, Key=f"out/{published.MARKER}",
                         Body=json.dumps(bad).encode())
    with pytest.raises(InputError, match="bad file path '../../evil'"):
        published.download_published(s3.uri("out"))


_SLOW_PUBLISHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dpsynth.io import cache, published, s3 as s3_io, work as work_io

    real = s3_io.upload_file
    done = []
    def upload_then_hang(c, path, uri):
        real(c, path, uri)
        done.append(uri)
        if len(done) == 2:  # two files are up; the writer dies here
            print("two files uploaded", flush=True)
            time.sleep(300)
    s3_io.upload_file = upload_then_hang
    published.upload_published(Path(sys.argv[1]), sys.argv[2])
""")


@pytest.mark.parametrize("republish", [False, True], ids=["first-publish", "re-publish"])
def test_writer_killed_mid_upload_is_never_read(s3, tmp_path: Path, republish: bool) -> None:
    uri = s3.uri("art/sample")
    if republish:
        with work_io.publish(uri) as staged:
            out = staged.path
            _make(out, V1)
    new = _make(tmp_path / "new", {"a.npz": b"1" * 10, "b.npz": b"2" * 10, "c.json": b"{}"})
    child = subprocess.Popen([sys.executable, "-c", _SLOW_PUBLISHER, str(new), uri],
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert child.stdout.readline().strip() == "two files uploaded"
        child.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
    finally:
        child.kill()
        child.wait(timeout=30)
    keys = _keys(s3, "art/sample/")
    assert "art/sample/a.npz" in keys and "art/sample/b.npz" in keys  # half-written...
    assert f"art/sample/{published.MARKER}" not in keys  # ...and not marked complete
    with pytest.raises(InputError, match="no _SUCCESS.json, so not a complete output"):
        published.download_published(uri)


# --------------------------------------------------------------------------- transfers


def test_large_files_go_in_parts_and_verify(s3, tmp_path: Path) -> None:
    s3_io.configure(StorageConfig(multipart_threshold_mb=5, multipart_chunksize_mb=5))
    big = os.urandom(11 * 1024 * 1024)  # 5 + 5 + 1 MiB
    with work_io.publish(s3.uri("big")) as staged:
        out = staged.path
        _make(out, {"weights.bin": big})
    head = s3.client.head_object(Bucket=s3.bucket, Key="big/weights.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a 3-part multipart upload
    with published.local_input(s3.uri("big")) as local:
        assert (local / "weights.bin").read_bytes() == big


def test_transient_errors_are_retried(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.awsrequest import AWSResponse
    from botocore.retries.standard import ExponentialBackoff

    class NoBody:
        def stream(self):
            return iter([b""])

    s3_io.configure(StorageConfig(max_attempts=3))
    s3.client.put_object(Bucket=s3.bucket, Key="k", Body=b"v")
    # botocore backs off up to seconds between attempts; not worth waiting for here
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.01)
    calls = []

    def unavailable(request, **_):  # the server is briefly overloaded
        calls.append(request.url)
        if len(calls) <= fail:
            return AWSResponse(request.url, 503, {}, NoBody())
        return None  # send for real

    c = s3_io.new_client()
    c.meta.events.register("before-send.s3", unavailable)
    monkeypatch.setattr(s3_io, "client", lambda: c)
    fail = 2
    assert s3_io.read_bytes(s3.uri("k")) == b"v" and len(calls) == 3
    calls.clear()
    fail = 3  # more failures than attempts: a clear error, not a hang
    with pytest.raises(s3_io.StorageError, match=rf"s3://{s3.bucket}/k .*failed after 3 "
                                                   "attempts"):
        s3_io.read_bytes(s3.uri("k"))
    assert c.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}


def test_conditional_writes_detect_a_concurrent_writer(s3) -> None:
    uri = s3.uri("ledger/x.json")
    assert s3_io.read_versioned(uri) == (None, None)
    assert s3_io.write_if(uri, b"first", None)
    assert not s3_io.write_if(uri, b"second creator", None)  # IfNoneMatch='*'
    data, etag = s3_io.read_versioned(uri)
    assert data == b"first"
    assert s3_io.write_if(uri, b"update", etag)
    assert not s3_io.write_if(uri, b"stale update", etag)  # IfMatch an old ETag
    assert s3_io.read_versioned(uri)[0] == b"update"


# --------------------------------------------------------------------------- raw sources


def test_fetch_an_object_and_a_prefix(s3) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key="raw/data.npz", Body=b"npz bytes")
    for rel in ("cat/1.png", "cat/2.png", "dog/1.png"):
        s3.client.put_object(Bucket=s3.bucket, Key=f"raw/folder/{rel}", Body=rel.encode())
    path = cache.fetch(s3.uri("raw/data.npz"))
    assert path.name == "data.npz" and path.read_bytes() == b"npz bytes"
    folder = cache.fetch(s3.uri("raw/folder"))
    assert folder.name == "folder" and _tree(folder) == {
        "cat/1.png": b"cat/1.png", "cat/2.png": b"cat/2.png", "dog/1.png": b"dog/1.png"}
    assert cache.fetch(s3.uri("raw/data.npz")) == path  # cached
    s3.client.put_object(Bucket=s3.bucket, Key="raw/data.npz", Body=b"new bytes")
    assert cache.fetch(s3.uri("raw/data.npz")).read_bytes() == b"new bytes"  # changed: again
    with pytest.raises(InputError, match=rf"s3://{s3.bucket}/raw/nope: no object or prefix"):
        cache.fetch(s3.uri("raw/nope"))


# --------------------------------------------------------------------------- errors


def test_missing_bucket_names_the_uri_and_what_to_check(s3) -> None:
    for call in (lambda: cache.fetch("s3://no-such-bucket-dpsynth/raw.npz"),
                 lambda: published.download_published("s3://no-such-bucket-dpsynth/out"),
                 lambda: s3_io.read_bytes("s3://no-such-bucket-dpsynth/w.pth")):
        with pytest.raises(InputError, match=r"s3://no-such-bucket-dpsynth/.*bucket "
                                             r"'no-such-bucket-dpsynth' does not exist; check"):
            call()
    with pytest.raises(InputError, match="bucket 'no-such-bucket-dpsynth' does not exist"):
        with work_io.publish("s3://no-such-bucket-dpsynth/out") as staged:
            out = staged.path
            _make(out, V1)


def test_denied_access_names_the_credentials_to_check(s3, monkeypatch) -> None:
    from botocore.stub import Stubber

    c = s3_io.new_client()
    stub = Stubber(c)
    stub.add_client_error("get_object", service_error_code="AccessDenied",
                          service_message="Access Denied", http_status_code=403)
    monkeypatch.setattr(s3_io, "client", lambda: c)
    with stub, pytest.raises(InputError, match=rf"s3://{s3.bucket}/k \(read, .*access denied "
                                              r"\(AccessDenied\); check the credentials"):
        s3_io.read_bytes(s3.uri("k"))


def test_missing_credentials_say_where_they_come_from(s3, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(InputError, match="no usable S3 credentials. Set AWS_ACCESS_KEY_ID.*never "
                                         "takes credentials from params.yaml"):
        s3_io.read_bytes(s3.uri("k"))


def test_endpoint_from_config_unless_the_environment_sets_one(s3, monkeypatch) -> None:
    s3_io.configure(StorageConfig(endpoint_url="http://config-endpoint:9000"))
    assert s3_io.client().meta.endpoint_url == s3.endpoint  # AWS_ENDPOINT_URL wins
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    c = s3_io.client()
    assert c.meta.endpoint_url == "http://config-endpoint:9000"
    assert c.meta.config.s3["addressing_style"] == "path"  # what MinIO serves


def test_a_folder_inside_a_published_output_is_readable(s3) -> None:
    # prepare publishes one output with public/, private/, test/; later stages read one
    with work_io.publish(s3.uri("art/prepare")) as staged:
        out = staged.path
        _make(out, {"metrics.json": b"{}", "public/manifest.json": b"p",
                    "private/manifest.json": b"q", "private/shard-00000.npz": b"x"})
    with published.local_input(s3.uri("art/prepare/private")) as local:
        assert _tree(local) == {"manifest.json": b"q", "shard-00000.npz": b"x"}
    with pytest.raises(InputError, match="has no folder 'nope'"):
        published.download_published(s3.uri("art/prepare/nope"))


def test_work_mirror_pulls_the_latest_checkpoint_and_pushes_the_pointer_last(
        s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = "art/.work/finetune/"
    remote = {"latest.json": b'{"checkpoint": "ckpt-00000004", "step": 4}',
              "ckpt-00000004/state.json": b"4", "ckpt-00000004/model.safetensors": b"w4",
              "ckpt-00000008/model.safetensors": b"half",  # a crash mid-upload of step 8
              "shard-00001.npz": b"s", "shard-00001.json": b"{}"}
    for rel, data in remote.items():
        s3.client.put_object(Bucket=s3.bucket, Key=work + rel, Body=data)
    mirror = work_io.WorkMirror(s3.uri(work), tmp_path / "work")
    mirror.pull()
    assert sorted(_tree(tmp_path / "work")) == sorted(k for k in remote if "00000008" not in k)

    _make(tmp_path / "work", {"ckpt-00000006/model.safetensors": b"w6",
                              "ckpt-00000006/state.json": b"6",
                              "latest.json": b'{"checkpoint": "ckpt-00000006", "step": 6}',
                              ".ckpt-00000007.tmp-1234/model.safetensors": b"writing"})
    for old in (tmp_path / "work" / "ckpt-00000004").iterdir():  # pruned by the trainer
        old.unlink()
    uploaded = []
    real = s3_io.upload_file
    monkeypatch.setattr(s3_io, "upload_file", lambda c, p, u: (uploaded.append(u.key[len(work):]),
                                                             real(c, p, u)))
    mirror.push()  # the `sync` the driver hands the stage, which calls it at checkpoints
    assert uploaded == ["ckpt-00000006/model.safetensors", "ckpt-00000006/state.json",
                        "latest.json"]  # data, then sidecars, the pointer last
    left = [k[len(work):] for k in _keys(s3, work)]
    assert "ckpt-00000004/state.json" not in left and ".ckpt-00000007.tmp-1234" not in str(left)
    mirror.push()  # nothing changed since: nothing sent
    assert len(uploaded) == 3


def test_the_work_folder_is_synced_only_through_the_sync_it_comes_with(
        s3, tmp_path: Path) -> None:
    """No module-global registry of mirrors: a stage's checkpoints reach S3 when it
    calls the `sync` its driver handed it, and not otherwise (until the end)."""
    assert not [name for name, value in vars(work_io).items()
                if isinstance(value, (list, dict, set)) and not name.startswith("__")]
    work = "art/.work/sample/"
    with work_io.publish(s3.uri("art/sample")) as staged:
        _make(work_io.work_location(staged.path), {"shard-00000.npz": b"s"})
        assert _keys(s3, work) == []  # written, not synced
        staged.sync()
        assert [k[len(work):] for k in _keys(s3, work)] == ["shard-00000.npz"]
        _make(work_io.work_location(staged.path), {"shard-00001.npz": b"t"})
    # the block ended without output: the work folder is kept for a retry, all of it
    assert [k[len(work):] for k in _keys(s3, work)] == ["shard-00000.npz", "shard-00001.npz"]
    with work_io.publish(tmp_path / "local") as local:
        assert local.sync is work_io.no_sync and local.path == tmp_path / "local"


def test_a_worker_but_rank_0_pulls_the_work_folder_and_never_sends(s3) -> None:
    """On a node of a multi-node job, a worker other than rank 0 resumes from the
    same checkpoint (pulled) but sends nothing: no output, no checkpoint, no
    deletion of what rank 0 wrote, even when it fails."""
    work = "art/.work/pretrain/"
    remote = {"latest.json": b'{"checkpoint": "ckpt-00000004", "step": 4}',
              "ckpt-00000004/model.safetensors": b"w4"}
    for rel, data in remote.items():
        s3.client.put_object(Bucket=s3.bucket, Key=work + rel, Body=data)
    with work_io.publish(s3.uri("art/pretrain"), main=False) as staged:
        local_work = Path(work_io.work_location(staged.path))
        assert _tree(local_work) == remote
        assert staged.sync is work_io.no_sync
        (local_work / "ckpt-00000004" / "model.safetensors").unlink()  # as a stale node might
        _make(local_work, {"ckpt-00000006/model.safetensors": b"w6"})
        _make(staged.path, {"model.safetensors": b"m"})
    assert _keys(s3, "art/pretrain/") == []  # rank 0 alone publishes
    assert sorted(k[len(work):] for k in _keys(s3, work)) == sorted(remote)
    with pytest.raises(RuntimeError):
        with work_io.publish(s3.uri("art/pretrain"), main=False) as staged:
            _make(Path(work_io.work_location(staged.path)), {"ckpt-00000009/x": b"9"})
            raise RuntimeError("a worker fails")
    assert sorted(k[len(work):] for k in _keys(s3, work)) == sorted(remote)

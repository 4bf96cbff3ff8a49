"""Signed patches (issue 24 items 1-2): a real P-256 keypair, signatures made by the stock `model_signing` CLI;
with DMP_PATCH_PUBLIC_KEYS set, uploads, DMP_PATCH_DIR files and Redis records all need a valid signature."""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
from conftest import (
    ADMIN_TOKEN,
    AUTH,
    asgi_client,
    copy_dirs,
    make_patch_bytes,
    poll,
    wait_ready,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

CLI = str(Path(sys.executable).parent / "model_signing")


def keypair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {"trusted": keypair(folder, "trusted"), "other": keypair(folder, "other"), "folder": folder}


def cli_sign(data: bytes, private: Path, folder: Path, name: str = "p") -> bytes:
    """Sign with the stock CLI, exactly as its docs show; returns the bundle."""
    model, signature = folder / f"{name}.safetensors", folder / f"{name}.sig"
    model.write_bytes(data)
    subprocess.run([CLI, "sign", "key", "--private_key", str(private), "--signature", str(signature), str(model)],
                   check=True, capture_output=True)
    return signature.read_bytes()


def header(bundle: bytes) -> dict:
    return AUTH | {"X-DMP-Signature": base64.b64encode(bundle).decode()}


def test_uploads_and_files_need_a_valid_signature(keys, class_only_dirs, tmp_path):
    digits = class_only_dirs["bases"]["digits"]
    (private, public), (other, _) = keys["trusted"], keys["other"]
    kid = hashlib.sha256(public.read_bytes()).hexdigest()
    dirs = copy_dirs(class_only_dirs, tmp_path)  # its digits-dmp has no .sig
    shipped = make_patch_bytes(digits, "digits", 5)
    (dirs["patches"] / "signed.safetensors").write_bytes(shipped)
    (dirs["patches"] / "signed.safetensors.sig").write_bytes(cli_sign(shipped, private, tmp_path, "signed"))
    with asgi_client(dirs, admin_token=ADMIN_TOKEN, patch_public_keys=str(public), warmup=False) as c:
        wait_ready(c)
        unsigned_file = c.get("/patches/digits-dmp").json()
        assert unsigned_file["state"] == "failed" and "signed" in unsigned_file["error"], unsigned_file
        assert c.get("/patches/signed").json()["state"] == "ready"
        assert c.get("/patches/signed").json()["signer"] == kid

        data = make_patch_bytes(digits, "digits", 1)
        bundle = cli_sign(data, private, tmp_path)
        r = c.put("/patches/up", content=data, headers=header(bundle))
        assert r.status_code == 201, r.text
        assert r.json()["signer"] == kid and c.get("/patches/up").json()["signer"] == kid
        served = r.json()["version"]

        new = make_patch_bytes(digits, "digits", 2)
        flipped = bytearray(new)
        flipped[-3] ^= 0x01  # one bit of one weight: still a valid patch file
        refusals = {
            "unsigned_patch": c.put("/patches/up", content=new, headers=AUTH),
            "tampered": c.put("/patches/up", content=bytes(flipped), headers=header(cli_sign(new, private, tmp_path))),
            "other key": c.put("/patches/up", content=new, headers=header(cli_sign(new, other, tmp_path))),
            "another patch's signature": c.put("/patches/up", content=new, headers=header(bundle)),
            "garbage bundle": c.put("/patches/up", content=new, headers=header(b"garbage")),
            "empty JSON bundle": c.put("/patches/up", content=new, headers=header(b"{}")),
            "not base64": c.put("/patches/up", content=new, headers=AUTH | {"X-DMP-Signature": "!!not base64!!"}),
        }
        for what, reply in refusals.items():
            want = "unsigned_patch" if what == "unsigned_patch" else "bad_signature"
            assert reply.status_code == 422 and reply.json()["error_type"] == want, (what, reply.text)
        assert c.get("/patches/up").json()["version"] == served  # nothing changed
        good = c.put("/patches/up", content=new, headers=header(cli_sign(new, private, tmp_path)))
        assert good.status_code == 200 and good.json()["version"] != served


def put_raw(r: redis.Redis, name: str, data: bytes, signature: bytes | None = None) -> None:
    """A record written straight into Redis (no replica involved)."""
    r.set(f"dmp:patch:{name}", data)
    r.hset("dmp:patch-versions", name, "0123456789abcdef")
    if signature is not None:
        r.hset("dmp:patch-signatures", name, signature)
    r.publish("dmp:patch-events", json.dumps({"op": "put", "name": name, "origin": "elsewhere"}))


@pytest.mark.redis
def test_no_replica_serves_an_unsigned_redis_record(keys, redis_server, class_only_dirs, tmp_path):
    digits = class_only_dirs["bases"]["digits"]
    private, public = keys["trusted"]
    r = redis.Redis.from_url(redis_server.url)
    with ExitStack() as stack:
        replicas = [stack.enter_context(asgi_client(copy_dirs(class_only_dirs, tmp_path / f"r{i}"), warmup=False,
                                                    admin_token=ADMIN_TOKEN, redis_url=redis_server.url,
                                                    patch_public_keys=str(public))) for i in range(2)]
        for c in replicas:
            wait_ready(c)
        signed = make_patch_bytes(digits, "digits", 1)
        assert replicas[0].put("/patches/signed", content=signed,
                               headers=header(cli_sign(signed, private, tmp_path))).status_code == 201
        put_raw(r, "raw", make_patch_bytes(digits, "digits", 2))
        put_raw(r, "borrowed", make_patch_bytes(digits, "digits", 3), r.hget("dmp:patch-signatures", "signed"))
        for c in replicas:
            assert poll(lambda c=c: c.get("/patches/signed").json().get("state") == "ready", 5)
            for name in ("raw", "borrowed"):
                assert poll(lambda c=c, name=name: c.get(f"/patches/{name}").json().get("state") == "failed", 5)
                gen = c.post("/generate", json={"patch": name, "class_label": 1, "steps": 2})
                assert gen.status_code == 422 and gen.json()["error_type"] == "patch_not_ready", gen.text
            assert c.get("/patches/signed").json()["signer"] == hashlib.sha256(public.read_bytes()).hexdigest()


def test_the_trainer_signs_what_it_writes(keys, tmp_path, capsys):
    from app.trainer.__main__ import main
    from app.trainer.train import TrainConfig, Trainer

    private, public = keys["trusted"]
    tiny = dict(image_size=8, hidden_size=32, depth=2, num_heads=2, patch_size=2, batch_size=16, device="cpu")
    base = tmp_path / "digits.safetensors"
    Trainer(TrainConfig(method="pretrain", dataset="digits", out=str(base), steps=2, **tiny), progress=False).run()
    out = tmp_path / "p.safetensors"
    args = ["patch", "--base", str(base), "--dataset", "digits", "--image-size", "8", "--steps", "2",
            "--batch-size", "16", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main([*args, "--sign-key", str(public)]) == 2  # a public key: refused before training
    assert "not a readable unencrypted PEM private key" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--sign-key", str(private)]) == 0
    verify = subprocess.run([CLI, "verify", "key", "--public_key", str(public), "--signature", f"{out}.sig",
                             str(out)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0 and "Verification succeeded" in verify.stdout, verify.stdout + verify.stderr


def test_a_key_that_cannot_verify_stops_the_start(keys, tmp_path):
    from pydantic import ValidationError

    from app.core.config import Settings, describe_errors

    private, public = keys["trusted"]
    for bad in (str(private), str(tmp_path / "missing.pub"), f"{public},{tmp_path / 'missing.pub'}"):
        with pytest.raises(ValidationError) as e:
            Settings(patch_public_keys=bad)
        assert "DMP_PATCH_PUBLIC_KEYS" in describe_errors(e.value) and "not a readable PEM public key" in str(e.value)
    assert Settings(patch_public_keys=f"{public}, ").public_key_paths == [str(public)]

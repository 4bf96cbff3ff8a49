"""What verifying a model-signing bundle costs per upload (issue 24): a 33 MB file (the size of an XL/2 patch),
signed by the stock CLI, verified by app/core/signing.py as an upload is; median of --repeats after one warm-up.

    PYTHONPATH=. python tests/bench/signature_cost.py [--mb 33] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.core.signing import PatchVerifier


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=33)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dmp-sigcost-"))
    key = ec.generate_private_key(ec.SECP256R1())
    (folder / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (folder / "k.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    data = os.urandom(int(args.mb * 1024 * 1024))
    (folder / "p.safetensors").write_bytes(data)
    cli = str(Path(sys.executable).parent / "model_signing")
    t0 = time.perf_counter()
    subprocess.run([cli, "sign", "key", "--private_key", str(folder / "k.pem"), "--signature",
                    str(folder / "p.sig"), str(folder / "p.safetensors")], check=True, capture_output=True)
    sign_s = time.perf_counter() - t0
    verifier, bundle = PatchVerifier([folder / "k.pub"]), (folder / "p.sig").read_bytes()
    verifier.verify(data, bundle)  # warm-up: imports model_signing
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        verifier.verify(data, bundle)
        times.append(time.perf_counter() - t0)
    print(f"{len(data) / 1e6:.1f} MB: verify median {1000 * statistics.median(times):.0f} ms "
          f"(min {1000 * min(times):.0f}, max {1000 * max(times):.0f}, n={args.repeats}); "
          f"stock CLI sign (a process, imports included) {sign_s:.2f} s")


if __name__ == "__main__":
    main()

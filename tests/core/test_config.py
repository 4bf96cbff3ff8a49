"""Settings come from DMP_* variables only, with checked values."""
from __future__ import annotations

import pydantic
import pytest

from app.core.config import Settings


def test_env_prefix_and_types(monkeypatch):
    monkeypatch.setenv("DMP_MAX_QUEUE", "7")
    monkeypatch.setenv("DMP_ADMIN_TOKEN", "s3cr3t-value")
    monkeypatch.setenv("DMP_DEVICE", "cpu")
    monkeypatch.setenv("MAX_QUEUE", "99")  # unprefixed: ignored
    s = Settings()
    assert s.max_queue == 7 and s.admin_token.get_secret_value() == "s3cr3t-value" and "s3cr3t" not in repr(s)
    assert s.torch_device == "cpu" and str(s.torch_dtype) == "torch.float32"
    assert s.redis_url is None and str(s.model_dir) == "models" and str(s.patch_dir) == "patches"


@pytest.mark.parametrize("key,value", [("DMP_DEVICE", "tpu"), ("DMP_MAX_QUEUE", "0"), ("DMP_PATCH_SLOTS", "1"),
                                       ("DMP_FUSED_KERNELS", "maybe"), ("DMP_CUDA_COMPILE", "2")])
def test_bad_values_are_refused(monkeypatch, key, value):
    monkeypatch.setenv(key, value)
    with pytest.raises(pydantic.ValidationError):
        Settings()

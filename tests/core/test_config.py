"""Settings come from DMP_* variables only, with checked values."""
from __future__ import annotations

import pydantic
import pytest

from app.core.config import EXAMPLE_ADMIN_TOKENS, Settings, describe_errors


def test_env_prefix_and_types(monkeypatch):
    monkeypatch.setenv("DMP_MAX_QUEUE", "7")
    monkeypatch.setenv("DMP_ADMIN_TOKEN", "s3cr3t-value-of-16+chars")
    monkeypatch.setenv("DMP_DEVICE", "cpu")
    monkeypatch.setenv("MAX_QUEUE", "99")  # unprefixed: ignored
    s = Settings()
    assert s.max_queue == 7 and s.admin_token.get_secret_value() == "s3cr3t-value-of-16+chars"
    assert "s3cr3t" not in repr(s)
    assert s.torch_device == "cpu" and str(s.torch_dtype) == "torch.float32"
    assert s.redis_url is None and str(s.model_dir) == "models" and str(s.shipped_patch_dir) == "patches"
    assert s.patch_dir is None and s.patch_root.parts[-2:] == ("dmp", "patches")  # uploads outside the checkout


@pytest.mark.parametrize("key,value", [("DMP_DEVICE", "tpu"), ("DMP_MAX_QUEUE", "0"), ("DMP_PATCH_SLOTS", "1"),
                                       ("DMP_FUSED_KERNELS", "maybe"), ("DMP_CUDA_COMPILE", "2")])
def test_bad_values_are_refused(monkeypatch, key, value):
    monkeypatch.setenv(key, value)
    with pytest.raises(pydantic.ValidationError):
        Settings()


@pytest.mark.parametrize("token", ["s3cret", "x" * 15, "", "replace-me-at-deploy-time"])
def test_guessable_admin_tokens_are_refused_without_echoing_them(monkeypatch, token):
    monkeypatch.setenv("DMP_ADMIN_TOKEN", token)
    with pytest.raises(pydantic.ValidationError) as raised:
        Settings()
    message = describe_errors(raised.value)
    assert message.startswith("DMP_ADMIN_TOKEN: ") and "openssl rand" in message
    assert not token or token not in message


def test_every_documented_example_token_is_refused():
    """Each example value stays refused even where it is long enough to pass the length rule."""
    for token in EXAMPLE_ADMIN_TOKENS:
        with pytest.raises(pydantic.ValidationError):
            Settings(admin_token=token)
    assert Settings(admin_token="0123456789abcdef").admin_token.get_secret_value() == "0123456789abcdef"

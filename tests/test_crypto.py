"""The key ring and the sealed values of jobyard.job_engine.crypto: round trips, the job id as
associated data, rotation, and a missing key named."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from jobyard.job_engine import crypto, env

#: Fixed keys: test ids (parametrized below) must be the same in every pytest-xdist worker.
K1 = base64.b64encode(bytes(range(32))).decode()
K2 = base64.b64encode(bytes(range(32, 64))).decode()
CANARY = "canary-7f3a payload: alice@example.com"


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Encryption on with k1 alone; the test may change the setting and `crypto.reset()`."""
    monkeypatch.setenv(env.ENCRYPTION_KEYS, f"k1:{K1}")
    crypto.reset()
    yield monkeypatch
    monkeypatch.delenv(env.ENCRYPTION_KEYS, raising=False)
    crypto.reset()


def use(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv(env.ENCRYPTION_KEYS, setting)
    crypto.reset()


@pytest.mark.parametrize(
    "value", [{"to": CANARY, "n": [1, 2.5, None, True]}, CANARY, 0.5, [], "", "é ✓"]
)
def test_a_value_round_trips_and_its_text_is_not_in_the_sealed_form(
    keys: pytest.MonkeyPatch, value: object
) -> None:
    sealed = crypto.seal("job-1", value)
    assert crypto.is_sealed(sealed) and sealed.startswith("$jy1$k1$")
    assert "canary" not in sealed and "alice" not in sealed
    assert crypto.unseal("job-1", sealed) == value
    assert crypto.seal("job-1", value) != sealed  # a fresh nonce each time


def test_json_text_round_trips_and_stays_json(keys: pytest.MonkeyPatch) -> None:
    text = json.dumps({"secret": CANARY})
    sealed = crypto.seal_json("job-1", text)
    assert crypto.is_sealed(json.loads(sealed)) and "canary" not in sealed
    assert crypto.unseal_json("job-1", sealed) == text
    assert crypto.unseal("job-1", json.loads(sealed)) == {"secret": CANARY}
    assert crypto.seal_json("job-1", sealed) == sealed  # sealing twice seals once


def test_another_jobs_id_does_not_decrypt(keys: pytest.MonkeyPatch) -> None:
    sealed = crypto.seal("job-1", CANARY)
    with pytest.raises(crypto.DecryptionError, match="job-2"):
        crypto.unseal("job-2", sealed)


def test_an_altered_or_truncated_value_does_not_decrypt(keys: pytest.MonkeyPatch) -> None:
    sealed = crypto.seal("job-1", CANARY)
    flipped = sealed[:-3] + ("A" if sealed[-3] != "A" else "B") + sealed[-2:]
    for bad in (flipped, sealed[:-10], sealed.replace("$k1$", "$k1$AAAA")):
        with pytest.raises(crypto.DecryptionError):
            crypto.unseal("job-1", bad)


def test_off_by_default_values_pass_through_and_plain_values_read_back() -> None:
    assert crypto.key_ring() is None
    assert crypto.seal("job-1", CANARY) == CANARY
    assert crypto.seal_json("job-1", '{"a": 1}') == '{"a": 1}'
    assert crypto.unseal("job-1", {"a": 1}) == {"a": 1}


def test_plain_values_written_before_encryption_read_back(keys: pytest.MonkeyPatch) -> None:
    assert crypto.unseal("job-1", {"a": 1}) == {"a": 1}
    assert crypto.unseal_json("job-1", '"plain"') == '"plain"'
    assert crypto.seal("job-1", None) is None


def test_rotation_new_key_encrypts_old_still_decrypts_reseal_moves_it(
    keys: pytest.MonkeyPatch,
) -> None:
    old = crypto.seal("job-1", CANARY)
    use(keys, f"k2:{K2},k1:{K1}")
    new = crypto.seal("job-1", CANARY)
    assert crypto.key_id_of(old) == "k1" and crypto.key_id_of(new) == "k2"
    assert crypto.unseal("job-1", old) == crypto.unseal("job-1", new) == CANARY
    moved = crypto.reseal("job-1", old)
    assert crypto.key_id_of(moved) == "k2"
    assert crypto.reseal("job-1", moved) is moved  # already on the primary key: untouched
    use(keys, f"k2:{K2}")  # the old key removed
    assert crypto.unseal("job-1", moved) == CANARY


def test_a_missing_key_is_named(keys: pytest.MonkeyPatch) -> None:
    sealed = crypto.seal("job-1", CANARY)
    use(keys, f"k2:{K2}")
    with pytest.raises(crypto.MissingEncryptionKeyError, match="'k1'") as raised:
        crypto.unseal("job-1", sealed)
    assert raised.value.key_id == "k1"
    keys.delenv(env.ENCRYPTION_KEYS)
    crypto.reset()
    with pytest.raises(crypto.MissingEncryptionKeyError, match="'k1'"):
        crypto.unseal("job-1", sealed)


@pytest.mark.parametrize(
    "setting, complaint",
    [
        ("k1", "each key is"),
        ("k1:c2hvcnQ=", "32"),
        (f"k1:{K1},k1:{K2}", "twice"),
        (f"bad id:{K1}", "each key is"),
        ("k1:not base64!", "32"),
    ],
)
def test_a_malformed_setting_is_refused_without_echoing_the_key(
    keys: pytest.MonkeyPatch, setting: str, complaint: str
) -> None:
    keys.setenv(env.ENCRYPTION_KEYS, setting)
    with pytest.raises(crypto.EncryptionConfigError, match=complaint) as raised:
        crypto.reset()
    assert K1 not in str(raised.value) and K2 not in str(raised.value)

"""Bad configuration is normal input: each error names the key or file, the rule and the value."""

from __future__ import annotations

import pytest

from nadray.config import load_config
from nadray.errors import ConfigError


@pytest.mark.parametrize("override, match", [
    ("train.bogus=1", r"config key 'train\.bogus': unknown; train has \[.*'max_epochs'"),
    ("train.max_epochs=-1", r"config key 'train\.max_epochs': must be >= 1, got -1"),
    ("model.objective=magic", r"config key 'model\.objective': must be one of \[.*\], got 'magic'"),
    ("train.max_epochs", r"--set 'train\.max_epochs': expected key=value"),
    ("data.local_networks=[not-a-cidr]", r"'data\.local_networks\[0\]': expected a CIDR network .* got 'not-a-cidr'"),
])
def test_bad_override_names_key_rule_and_value(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unreadable_config_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml: not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"cannot read it as UTF-8 YAML text \(IsADirectoryError"):
        load_config(str(tmp_path))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe train: 1")
    with pytest.raises(ConfigError, match=r"binary\.yaml: cannot read it as UTF-8 YAML text \(UnicodeDecodeError"):
        load_config(str(binary))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(str(broken))


def test_file_then_overrides(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text("train:\n  max_epochs: 3\nmodel:\n  hidden_size: 16\n")
    cfg = load_config(str(f), ["train.max_epochs=5"])
    assert (cfg.train.max_epochs, cfg.model.hidden_size) == (5, 16)

"""Settings: defaults, then file, then environment, then flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from vibecast.server.config import ServerConfig, load_config


def test_defaults_match_the_documented_limits() -> None:
    limits = ServerConfig().limits
    assert (limits.max_speakers, limits.max_chars, limits.max_frame_bytes) == (
        4,
        100_000,
        10 * 1024 * 1024,
    )
    assert limits.max_audio_s == 96 * 60


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "vibecast.toml"
    f.write_text('port = 9001\nmodel = "piper"\n[limits]\nmax_chars = 500\nmax_speakers = 2\n')
    c = load_config(
        f, env={"VIBECAST_MAX_CHARS": "700", "VIBECAST_API_KEYS": "a, b"}, flags={"port": "9002"}
    )
    assert c.port == 9002 and c.limits.max_chars == 700 and c.limits.max_speakers == 2
    assert c.api_keys == ("a", "b")


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ({"env": {"VIBECAST_PORT": "eighty"}}, "VIBECAST_PORT"),
        ({"env": {"VIBECAST_PUBLIC": "maybe"}}, "VIBECAST_PUBLIC"),
        ({"flags": {"max_chars": "lots"}}, "--max-chars"),
    ],
)
def test_bad_values_name_where_they_came_from(source: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        load_config(env=source.get("env", {}), flags=source.get("flags"))


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("max_char = 5\n")
    with pytest.raises(ValueError, match="unknown setting 'max_char'"):
        load_config(f, env={})


def test_proxy_and_metrics_settings_come_from_every_source(tmp_path: Path) -> None:
    # Off unless asked for: a forwarded address is believed from nobody, /metrics is not public.
    assert (ServerConfig().forwarded_allow_ips, ServerConfig().metrics_public) == (None, False)
    f = tmp_path / "vibecast.toml"
    f.write_text('forwarded_allow_ips = "10.0.0.1"\nmetrics_public = true\n')
    assert load_config(f, env={}).forwarded_allow_ips == "10.0.0.1"
    assert load_config(f, env={}).metrics_public is True
    env = {"VIBECAST_FORWARDED_ALLOW_IPS": "10.0.0.2", "VIBECAST_METRICS_PUBLIC": "no"}
    c = load_config(f, env=env)
    assert c.forwarded_allow_ips == "10.0.0.2" and c.metrics_public is False
    flags = {"forwarded_allow_ips": "10.0.0.3,10.0.0.4", "metrics_public": True}
    c = load_config(f, env=env, flags=flags)
    assert c.forwarded_allow_ips == "10.0.0.3,10.0.0.4" and c.metrics_public is True

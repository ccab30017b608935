"""The dashboard's pure parts: URLs and their round trips, HTML escaping, the numbers behind the
charts, and the perfdb-web command line."""

from __future__ import annotations

import argparse
import urllib.parse
from pathlib import Path

import pytest

from perfdb.config import Config as ServerConfig
from perfdb.config import ConfigError
from perfdb.config import build_parser as server_parser
from perfdb.web.analysis import axis_scale, histogram, leaderboard, sort_rows
from perfdb.web.app import asset_urls, build_parser, config_from_args, main
from perfdb.web.markup import Markup, render
from perfdb.web.pages import flatten
from perfdb.web.queries import (
    MICROS_PER_DAY,
    OPTIONAL_COLUMNS,
    OverviewView,
    QueryError,
    TableView,
    UserView,
    parse_moment,
    quick_range,
)
from perfdb.web.source import ResultRow
from tests.support import DASHBOARD, REPO_ROOT, Spawn


def _row(record_id: str, user: str = "u", test: str = "t", **metrics: float) -> ResultRow:
    return ResultRow(record_id, user, "2026-01-01T00:00:00.000000Z", test, "", dict(metrics))


def _params(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True))


# -- URLs --------------------------------------------------------------------------------------


def test_table_view_round_trips_through_its_url() -> None:
    view = TableView.from_params(
        {"test": "unary", "q": "ada", "from": "2026-01-01", "sort": "perc_lat_99", "order": "desc",
         "cols": "qps,perc_lat_99", "per_page": "100", "page": "3"}
    )  # fmt: skip
    assert TableView.from_params(_params(view.url())) == view
    assert view.descending and view.columns == ("qps", "perc_lat_99") and view.page == 3
    # Defaults stay out of the URL; the first page of the default view is just "/".
    assert TableView().url() == "/"
    assert TableView.from_params({"sort": "qps"}).url() == "/?sort=qps"  # highest first is the default
    assert TableView.from_params({"sort": "perc_lat_99"}).descending is False  # lowest latency first
    # Sorting by time is paged by position, by anything else by number: each keeps only its own.
    assert "page" not in _params(TableView.from_params({"page": "4"}).url())
    assert "before" not in _params(TableView.from_params({"sort": "qps", "before": "0" * 20}).url())


def test_a_header_click_sorts_then_flips() -> None:
    view = TableView.from_params({"before": "0661660d462d38000000"})
    by_qps = view.sorted_by("qps")
    assert (by_qps.sort, by_qps.descending, by_qps.before) == ("qps", True, None)
    assert by_qps.sorted_by("qps").descending is False
    assert view.sorted_by("time").descending is False  # time is already newest first
    assert view.sorted_by("test").descending is False


def test_dates_are_whole_utc_days_or_rfc3339_times() -> None:
    day = parse_moment("2026-01-31", "from", end_of_day=False)
    assert day % MICROS_PER_DAY == 0
    assert parse_moment("2026-01-31", "to", end_of_day=True) == day + MICROS_PER_DAY
    assert parse_moment("2026-01-31T12:00:00+01:00", "from", end_of_day=False) == day + 11 * 3600 * 1_000_000
    for bad in ("2026-1-31", "31/01/2026", "2026-01-31T12:00", "1969-12-31"):
        with pytest.raises(QueryError):
            parse_moment(bad, "from", end_of_day=False)
    date_from, date_to = quick_range(7, today_micros=day + 5)
    assert (date_from, date_to) == ("2026-01-25", "2026-01-31")


def test_user_and_overview_views() -> None:
    user = UserView.from_params("static:ci/bot", {"test": "unary", "user": "ignored", "q": "ignored"})
    assert user.path == "/users/static%3Aci%2Fbot"
    assert user.url() == "/users/static%3Aci%2Fbot?test=unary"
    assert user.api_url() == "/api/users/static%3Aci%2Fbot/series?test=unary"
    with pytest.raises(QueryError):
        UserView.from_params("bad\nid", {})
    first_visit = OverviewView.from_params({})
    assert first_visit.filters.date_from and first_visit.filters.date_to  # the last 30 days
    everything = OverviewView.from_params({"from": "", "to": "", "test": ""})
    assert everything.filters.since is None and OverviewView.from_params(_params(everything.url())) == everything
    assert _params(everything.url()) == {"metric": "qps", "test": "", "from": "", "to": ""}


def test_columns_list_and_defaults() -> None:
    assert TableView.from_params({}).visible_columns[:4] == ["time", "user", "test", "tag"]
    assert TableView.from_params({"cols": ""}).visible_columns == ["time", "test"]
    assert TableView.from_params({"cols": ",".join(OPTIONAL_COLUMNS)}).url() == "/"


# -- HTML ---------------------------------------------------------------------------------------


def test_templates_escape_every_value_that_is_not_markup() -> None:
    html = render('<a title="{title}">{body}</a>', title='"><script>', body=Markup("<b>ok</b>"))
    assert html == '<a title="&quot;&gt;&lt;script&gt;"><b>ok</b></a>'


def test_nested_configuration_flattens_to_paths() -> None:
    config = {"a": {"b": [1, 2], "c": [{"d": None}], "e": {}}, "f": True, "g": "x"}
    assert flatten(config) == [("a.b", "1, 2"), ("a.c[0].d", None), ("a.e", "{}"), ("f", True), ("g", "x")]


# -- numbers behind the pages ---------------------------------------------------------------------


def test_sorting_puts_missing_values_last_either_way() -> None:
    rows = [_row("03", qps=5), _row("01"), _row("02", qps=9), _row("04", qps=5)]
    assert [row.record_id for row in sort_rows(rows, "qps", True, {})] == ["02", "04", "03", "01"]
    assert [row.record_id for row in sort_rows(rows, "qps", False, {})] == ["04", "03", "02", "01"]
    assert [row.record_id for row in sort_rows(rows, "time", True, {})] == ["04", "03", "02", "01"]


def test_histogram_bins_hold_every_value_once() -> None:
    rows = [_row(f"{index:02d}", user=f"u{index % 3}", qps=float(value)) for index, value in enumerate(range(10, 110))]
    linear = histogram(rows, "qps", 10)
    assert linear["scale"] == "linear" and linear["count"] == 100
    assert [item["count"] for item in linear["bins"]] == [10] * 10
    assert (linear["bins"][0]["low"], linear["bins"][-1]["high"]) == (10, 109)
    assert linear["bins"][0]["users"] == 3
    latencies = [_row(f"{index:02d}", perc_lat_99=value) for index, value in enumerate((10.0, 100.0, 1000.0, 10_000.0))]
    log = histogram(latencies, "perc_lat_99", 3)
    assert log["scale"] == "log" and [item["count"] for item in log["bins"]] == [1, 1, 2]
    assert log["bins"][0]["label"] == "10 µs \u2013 100 µs"
    single = histogram([_row("01", qps=7.0), _row("02", qps=7.0)], "qps", 20)
    assert [item["count"] for item in single["bins"]] == [2]
    assert histogram([_row("01")], "qps", 20) == {"scale": "linear", "bins": [], "count": 0}


def test_leaderboard_keeps_each_users_best_by_the_metrics_direction() -> None:
    rows = [
        _row("01", "ann", qps=100, perc_lat_99=50),
        _row("02", "ann", qps=300, perc_lat_99=80),
        _row("03", "bob", qps=200, perc_lat_99=40),
        _row("04", "bob", test="other", qps=900, perc_lat_99=1),
    ]
    users = {"ann": {"name": "Ann"}}
    by_qps = leaderboard(rows, users, "t", "qps")
    assert [(entry.user_name, entry.value, entry.record_id, entry.results) for entry in by_qps] == [
        ("Ann", 300, "02", 2),
        ("bob", 200, "03", 1),
    ]
    by_latency = leaderboard(rows, users, "t", "perc_lat_99")
    assert [(entry.rank, entry.user_id, entry.text) for entry in by_latency] == [
        (1, "bob", "40 µs"),
        (2, "ann", "50 µs"),
    ]


def test_chart_axes_show_latencies_in_a_unit_that_suits_them() -> None:
    assert axis_scale("us", [900.0, 2500.0]) == {"label": "ms", "divisor": 1000}
    assert axis_scale("us", [90.0]) == {"label": "µs", "divisor": 1}


def test_asset_urls_change_with_the_content(tmp_path: Path) -> None:
    (tmp_path / "a.js").write_text("one")
    first = asset_urls(tmp_path)["a.js"]
    (tmp_path / "a.js").write_text("two")
    assert asset_urls(tmp_path)["a.js"] != first and first.startswith("/static/a.js?v=")


# -- the command line -----------------------------------------------------------------------------


def test_help_documents_every_option(spawn: Spawn) -> None:
    dashboard = spawn("--help", command=DASHBOARD, cwd=REPO_ROOT)
    code, stderr = dashboard.wait_exit(timeout=30)
    assert code == 0, stderr
    text = dashboard.stdout.decode()
    options = [action.option_strings[-1] for action in build_parser()._actions if action.option_strings]
    assert len(options) >= 10
    for option in options:
        assert option in text
    for documented in ("--server", "--listen", "--read-key-file", "--timeout", "--scan-limit", "--tls"):
        assert documented in options


def test_settings_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERFDB_READ_KEY", raising=False)
    key_file = tmp_path / "read.key"
    key_file.write_text("  read-key-0123456789abcdef\n")
    config = config_from_args(["--server", "db:5000", "--listen", "0.0.0.0:9000", "--read-key-file", str(key_file)])
    assert (config.server, config.listen, config.read_key) == ("db:5000", "0.0.0.0:9000", "read-key-0123456789abcdef")
    assert config_from_args([]).read_key is None
    monkeypatch.setenv("PERFDB_READ_KEY", "from-the-environment")
    assert config_from_args([]).read_key == "from-the-environment"
    with pytest.raises(ConfigError, match="cannot read --read-key-file"):
        config_from_args(["--read-key-file", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="--listen"):
        config_from_args(["--listen", "nowhere"])


def test_dashboard_and_server_take_the_same_log_settings_and_zero_cache_seconds() -> None:
    def choices(parser: argparse.ArgumentParser, option: str) -> tuple[object, ...]:
        (action,) = [action for action in parser._actions if option in action.option_strings]
        assert action.choices is not None
        return tuple(action.choices)

    for option in ("--log-level", "--log-format"):
        assert choices(build_parser(), option) == choices(server_parser(), option), option
    defaults, server_defaults = config_from_args([]), ServerConfig()
    assert (defaults.log_level, defaults.log_format) == (server_defaults.log_level, server_defaults.log_format)
    assert config_from_args(["--cache-seconds", "0"]).cache_seconds == 0.0  # 0 turns the reuse off
    for refused in ("-1", "nan"):
        with pytest.raises(SystemExit):
            config_from_args(["--cache-seconds", refused])


def test_bad_settings_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.key").write_text("\n")
    assert main(["--read-key-file", str(tmp_path / "empty.key")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"perfdb-web: error: --read-key-file {tmp_path}/empty.key is empty"
    ]
    assert main(["--server", "no-port"]) == 2
    assert "--server must be hostname:port" in capsys.readouterr().err
